"""grpo.py's logs: rollouts.jsonl and metrics.jsonl (one line per completion / per step), args.json, optional
wandb and tensorboard sinks, the printed step line, and curves.png redrawn from metrics.jsonl.
  open_logs(args, ckpt, start, rank) -> sinks; log_step(m, records, args, rank, world, sinks); draw_curves(out, rank)"""
import json
import os
import sys

import numpy as np

from widematch.checkpoint import catch_enospc, disk_full_check, truncate_jsonl


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
