"""grpo.py's logs: rollouts.jsonl and metrics.jsonl (one line per completion / per step), args.json, optional
wandb and tensorboard sinks, the printed step line, and curves.png redrawn from metrics.jsonl.
  open_logs(args, ckpt, start, rank) -> sinks; step_metrics(...) -> the step's metrics line;
  log_step(m, records, args, rank, world, sinks); draw_curves(out, rank)"""
import json
import os
import sys

import numpy as np

from widematch.checkpoint import catch_enospc, disk_full_check, truncate_jsonl
from widematch.dist import all_sum


def open_logs(args, ckpt, start, rank):
    """rank 0: rollouts.jsonl / metrics.jsonl cut back to step `start` when resuming (else removed), args.json
    written, wandb (--wandb) and tensorboard (--tensorboard) started. -> dict(wandb=run, tb=writer), None when off
    (and on ranks > 0)."""
    sinks = dict(wandb=None, tb=None)
    if rank != 0:
        return sinks
    for name in ("rollouts.jsonl", "metrics.jsonl"):
        if ckpt is not None:
            truncate_jsonl(os.path.join(args.out, name), start)
        elif os.path.exists(os.path.join(args.out, name)):
            os.remove(os.path.join(args.out, name))
    with open(os.path.join(args.out, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2)
    if args.wandb:
        import wandb
        sinks["wandb"] = wandb.init(project=args.wandb, config=vars(args))
    if args.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            sys.exit(f"grpo.py: error: --tensorboard needs the tensorboard package (pip install tensorboard): {e}")
        sinks["tb"] = SummaryWriter(args.tensorboard, purge_step=start + 1 if ckpt is not None else None)
    return sinks


def step_metrics(step, records, stats, n_tok, sched, cur, events, args, world, zero_std_frac, parts):
    """The step's metrics line: means over all ranks' records, token-normalised kl / dlogp / entropy / clip_frac
    (over the tokens trained on), the group and length statistics, the update's grad norm, rank 0's seconds per
    phase and generated tokens per second of rollout (all ranks), HATCH extras. zero_std_frac: the share of groups
    whose rewards are all equal; parts: the reward parts logged under their own names when the records hold them
    (the released reward's)."""
    totals = [all_sum(stats[k], world)
              for k in ("kl_sum", "dlogp_sum", "pasta_sum", "pasta_acc_sum", "pasta_acc_n", "entropy_sum", "clip_sum")]
    lengths = [r["length"] for r in records]
    m = dict(step=step, reward=np.mean([r["reward"] for r in records]),
             format=np.mean([r["format"] for r in records]), match=np.mean([r["match"] for r in records]),
             kl=totals[0] / n_tok, entropy=totals[5] / n_tok, clip_frac=totals[6] / n_tok,
             zero_std_frac=zero_std_frac,
             length=np.mean(lengths), length_max=max(lengths), truncated=np.mean([r["truncated"] for r in records]),
             dlogp=totals[1] / n_tok, grad_norm=stats["grad_norm"], lr=sched.get_last_lr()[0],
             curriculum=list(cur.current()), curriculum_events=events,
             tokens_per_s=sum(lengths) / max(stats["seconds_rollout"], 1e-9),
             seconds_rollout=stats["seconds_rollout"], seconds_logprobs=stats["seconds_logprobs"],
             seconds_update=stats["seconds_update"])
    for k in ("filter_dropped", "filter_redrawn", "filter_filled"):
        if k in stats:
            m[k] = int(stats[k])
    if args.tis_cap > 0:  # --tis-cap: mean importance weight and share of tokens at the cap
        m["tis_weight"] = all_sum(stats["tis_sum"], world) / n_tok
        m["tis_capped"] = all_sum(stats["tis_capped_sum"], world) / n_tok
    if getattr(args, "loss_mode", "vanilla") == "gspo":  # share of completions whose sequence ratio was clipped
        m["seq_clip_frac"] = all_sum(stats["seq_clip_sum"], world) / stats["n_seqs"]
    if getattr(args, "entropy_coeff", 0.0):  # the bonus subtracted from the loss (coeff x aggregated entropy)
        m["entropy_bonus"] = args.entropy_coeff * all_sum(stats["entropy_agg"], world)
    if getattr(args, "overlong_buffer", 0) > 0:  # share of completions penalised, mean penalty over all
        pen = [r.get("overlong", 0.0) for r in records]
        m["overlong_frac"], m["overlong_penalty"] = float(np.mean([p < 0 for p in pen])), float(np.mean(pen))
    for k in parts:  # --reward released: its four parts, under the release's names
        if records and k in records[0]:
            m[k] = np.mean([r[k] for r in records])
    if args.actor and not args.toy_reward:  # mean action accuracy of the completions whose pair has a pose
        acts = [r["action"] for r in records if r["action"] is not None]
        m["action"] = np.mean(acts) if acts else float("nan")
    if args.pasta_weight > 0:  # mean PaStA loss over the step's prompts; cell accuracy over prompts with cells
        m["pasta"] = totals[2] / args.prompts_per_step
        m["pasta_acc"] = totals[3] / totals[4] if totals[4] else float("nan")
    return m


def log_step(m, records, args, rank, world, sinks):
    """rank 0: appends to rollouts.jsonl and metrics.jsonl (a full disk stops every rank with one line), logs to
    wandb / tensorboard, prints the step line and the curriculum's events."""
    m = {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in m.items()}
    full, line = [], json.dumps(m) + "\n"
    with catch_enospc(full):
        if rank == 0:
            with open(os.path.join(args.out, "rollouts.jsonl"), "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
                f.write(line)
    disk_full_check(full, os.path.join(args.out, "metrics.jsonl"), len(line) * 1000, rank, world)
    if rank != 0:
        return
    scalars = {k: v for k, v in m.items() if isinstance(v, (int, float)) and k != "step"}
    scalars.update({f"eval_match_bin{b}": v for b, v in m.get("eval_match_by_bin", {}).items()})
    if sinks["wandb"] is not None:
        sinks["wandb"].log(scalars, step=m["step"])
    if sinks["tb"] is not None:
        for k, v in scalars.items():
            sinks["tb"].add_scalar(k, v, m["step"])
        sinks["tb"].flush()
    ev = f" | eval match {m['eval_match']:.3f}" if "eval_match" in m else ""
    hatch = (f" | action {m['action']:.2f}" if "action" in m else "") + \
            (f" | pasta {m['pasta']:.3f} acc {m['pasta_acc']:.2f}" if "pasta" in m else "")
    filt = f" | dropped {m['filter_dropped']} redrawn {m['filter_redrawn']}" if "filter_dropped" in m else ""
    print(f"step {m['step']:5d} | reward {m['reward']:.3f} | format {m['format']:.2f} | match {m['match']:.3f} | "
          f"kl {m['kl']:.2e} | ent {m['entropy']:.2f} | clip {m['clip_frac']:.2f} | 0-std {m['zero_std_frac']:.2f} | "
          f"len {m['length']:.1f} max {m['length_max']} | trunc {m['truncated']:.2f} | |dlogp| {m['dlogp']:.1e} | "
          f"gnorm {m['grad_norm']:.2e}{hatch}{filt} | "
          f"bin {m['curriculum'][0]} {m['curriculum'][1]} {m['curriculum'][2]}{ev} | {m['tokens_per_s']:.0f} tok/s | "
          f"{m['seconds']:.1f}s (rollout {m['seconds_rollout']:.1f} logp {m['seconds_logprobs']:.1f} "
          f"update {m['seconds_update']:.1f})")
    for e in m["curriculum_events"]:
        print(f"step {m['step']:5d} | curriculum: {e}")


CURVES = [("reward", ["reward", "match", "format"]), ("held-out eval match", ["eval_match"]),
          ("entropy (nats / token)", ["entropy"]), ("KL to the reference", ["kl"]),
          ("completion length", ["length", "length_max"]), ("truncated / zero-std groups / clipped",
                                                            ["truncated", "zero_std_frac", "clip_frac"]),
          ("curriculum bin", ["bin"]), ("grad norm", ["grad_norm"])]


def draw_curves(out, rank):
    """rank 0: <out>/curves.png from <out>/metrics.jsonl, one panel per group of CURVES over steps (matplotlib,
    Agg backend: no display). Written to a temp name and renamed: a reader never sees half a picture."""
    path = os.path.join(out, "metrics.jsonl")
    if rank != 0 or not os.path.isfile(path):
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for r in rows:
        r["bin"] = r["curriculum"][0]
    fig, axes = plt.subplots(2, 4, figsize=(16, 6.5), constrained_layout=True)
    for ax, (title, keys) in zip(axes.flat, CURVES):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), "o-" if k == "eval_match" else "-", label=k, lw=1.2, ms=3)
        if title.startswith("held-out"):  # per bin, dashed
            for b in sorted({b for r in rows for b in r.get("eval_match_by_bin", {})}, key=int):
                pts = [(r["step"], r["eval_match_by_bin"][b]) for r in rows if b in r.get("eval_match_by_bin", {})]
                ax.plot(*zip(*pts), "--", lw=0.8, label=f"bin {b}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        if ax.lines and len(ax.lines) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(f"grpo.py: {out}", fontsize=10)
    fig.savefig(path_tmp := os.path.join(out, "curves.tmp.png"), dpi=80)
    plt.close(fig)
    os.replace(path_tmp, os.path.join(out, "curves.png"))
