"""
grpo.py: GRPO (hand-written, no TRL) that teaches Qwen3-VL wide-baseline matching with the dual-level curriculum.

Usage (every default is the paper's recipe; smaller runs pass their own flags):
    The paper's run (8 GPUs, FSDP2, Qwen3-VL-8B, G 32 x 16 prompts, 5,120 new tokens, lr 1e-6, 1,000 steps):
        torchrun --nproc_per_node=8 grpo.py --out runs/dcrl --rollout-engine vllm
    CPU demo (the tiny model and its recipe, ~0.5 s a step on 2 cores; demo.sh runs this):
        python grpo.py --model demo_data/tiny-qwen3vl --pool pool --out runs/grpo --group-size 4 \\
            --prompts-per-step 4 --micro-batch 8 --max-new-tokens 48 --lr 1e-3 --max-side 640 --n-min 3 --n-max 5 \\
            --steps 40 --save-every 10 --eval-every 10 --eval-tasks 6 --no-grad-checkpointing
    The memory plan before a launch:  python grpo.py --plan --gpus 8 --gpu-mem-gib 80 [the run's flags]
    After a crash: the same command + --resume.  As the authors' release trains: --recipe released (--help's table).
Inputs: --model (a local dir or a hub id), --pool (build_pool.py's pairs.jsonl + npz).
Outputs in --out: step_%06d/ checkpoints (+ a bf16 export evaluate.py loads), rollouts.jsonl (one line per
completion), metrics.jsonl + curves.png (one line per step), eval_tasks.jsonl, args.json.

One step, in this file's order: sample_tasks (the curriculum's stage) -> rollout (G completions per prompt) ->
score (reward.py) -> group_advantages -> grpo_loss -> train_on (AdamW) -> cur.update (curriculum.py).
The machinery lives in widematch/: model_io (loading, encode, log-probs), dist (torchrun, FSDP2), checkpoint
(save, resume, full disk, lock), metrics (the step's metrics, logs, curves), rollout (the engines, the memory
plan), testhooks (the hidden --debug-* flags). Every flag, command, output field, HATCH option and choice of ours:
docs/grpo.md.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import curriculum
import make_tasks
import pasta
import reward
from widematch import dist as wdist
from widematch import prompts, recipes, testhooks
from widematch.tis import tis_weights
# the machinery, imported by name so that tests and bench.py can replace any of it on this module
from widematch.checkpoint import (catch_enospc, disk_full_check, finish_save, latest_checkpoint, lock_run_dir,
                                  resume, save_checkpoint)
from widematch.dist import all_sum, gather_objects, print0, setup_distributed
from widematch.metrics import draw_curves, log_step, open_logs, step_metrics
from widematch.model_io import autocast_for, cap_visual_tokens, collate_samples, completion_logprobs, encode, sync_time
from widematch.rollout import (CPU_ROLLOUT_BATCH, HFEngine, VllmEngine, check_memory, format_plan, prompt_bound,
                               read_model_config)

# -----------------------------------------------------------------------------
# 1. Sampling: tasks drawn online from the pool (the curriculum picks the stage)


def read_pairs(pool_dir):
    if not os.path.isfile(os.path.join(pool_dir, "pairs.jsonl")):
        sys.exit(f"grpo.py: error: --pool {pool_dir} has no pairs.jsonl (run build_pool.py first)")
    return make_tasks.load_pairs(pool_dir)


def task_for_pair(pair, pool_dir, level, spatial, rng, max_side, n_range=(3, 5), actor=False,
                  action_step=reward.ACTION_STEP_DEG, prompt_template=None):
    """-> (task, [img1, img2]) drawn online from one pool pair, n uniform in n_range; raises TaskUnavailable.
    actor: the prompt also asks for the ActoR action block (make_tasks.build_prompt); prompt_template: the text
    of --prompt-template (None: our wording)."""
    n = int(rng.integers(n_range[0], n_range[1] + 1))
    return make_tasks.make_task(pair, make_tasks.load_arrays(pool_dir, pair), level, spatial, n, rng, pool_dir,
                                max_side, actor=actor, action_step=action_step, prompt_template=prompt_template)


_TEMPLATES = {}  # --prompt-template path -> its text, read once (kept out of args.json)


def prompt_text(args):
    """The question text of --prompt-template, None for our wording; a bad file stops with one line."""
    path = getattr(args, "prompt_template", None)
    if path is not None and path not in _TEMPLATES:
        try:
            _TEMPLATES[path] = prompts.read_template(path)
        except prompts.TemplateError as e:
            sys.exit(f"grpo.py: error: --prompt-template {e}")
    return _TEMPLATES.get(path)


def sample_tasks(cur, pairs_by_bin, count, rng, args, stage=None):
    """count tasks: the curriculum picks ONE (bin, level, spatial) for the step (so the step's one update feeds
    one stage window and the bin window once: the paper's 20-step average), a random train pair of that bin
    supplies each task (other pairs of the bin are tried when one cannot supply the level). stage: that draw,
    given (--filter-groups' redraws of the step)."""
    out = []
    b, level, spatial = stage or cur.sample(rng)
    while len(out) < count:
        candidates = pairs_by_bin[b]
        for k in rng.permutation(len(candidates)):
            try:
                task, images = task_for_pair(candidates[k], args.pool, level, spatial, rng, args.max_side,
                                             (args.n_min, args.n_max), args.actor, args.action_step, prompt_text(args))
            except make_tasks.TaskUnavailable:
                continue
            out.append((task, images))
            break
        else:
            raise SystemExit(f"grpo.py: error: no train pair of bin {b} can supply level {level} / {spatial}")
    return out


def load_data(args, rank=0, reuse=False):
    """-> pairs_by_id (pair_id -> pairs.jsonl row), pairs_by_bin (bin -> train pairs), the curriculum over those
    bins, eval_tasks (the fixed held-out tasks: held_out_tasks; empty with --eval-every 0)."""
    pairs = read_pairs(args.pool)
    pairs_by_id = {p["pair_id"]: p for p in pairs}
    pairs_by_bin = {}
    for p in pairs:
        if p["split"] == "train":
            pairs_by_bin.setdefault(int(p["bin"]), []).append(p)
    if not pairs_by_bin:
        sys.exit(f"grpo.py: error: --pool {args.pool} has no train pairs")
    cur = curriculum.Curriculum(sorted(pairs_by_bin), mode=args.curriculum, inner_on_new_bin=args.inner_on_new_bin,
                                max_steps_per_bin=args.max_steps_per_bin)
    eval_tasks = held_out_tasks(args, [p for p in pairs if p["split"] == "test"], rank, reuse)
    return pairs_by_id, pairs_by_bin, cur, eval_tasks


def held_out_tasks(args, test_pairs, rank, reuse):
    """The in-training eval set, drawn ONCE: --eval-tasks tasks from test pairs, stratified over bins (task k from
    bin k mod #bins, levels L1/L2/L3 in turn within a bin, sparse points; a bin's pairs in a seeded order, reused
    when it has fewer pairs than tasks). rank 0 saves the task dicts to <out>/eval_tasks.jsonl; reuse (a resumed
    run) reads that file back and redraws the prompted images from the tasks' own points (make_tasks.draw_prompts)
    -> [(task, [img1, img2])]."""
    path = os.path.join(args.out, "eval_tasks.jsonl")
    if args.eval_every <= 0:
        return []
    if reuse and os.path.isfile(path):
        with open(path) as f:
            tasks = [json.loads(line) for line in f if line.strip()]
        return [(t, list(make_tasks.draw_prompts(*[Image.open(o) for o in t["originals"]], t["x_points"],
                                                 t["y_points"], t["x_labels"], t["y_labels"], args.max_side)))
                for t in tasks]
    rng = np.random.default_rng(args.seed + 12345)
    by_bin = {}
    for p in test_pairs:
        by_bin.setdefault(int(p["bin"]), []).append(p)
    order = {b: rng.permutation(len(v)) for b, v in sorted(by_bin.items())}
    bins, out = sorted(by_bin), []
    for k in range(args.eval_tasks if bins else 0):
        b, j = bins[k % len(bins)], k // len(bins)
        for t in range(len(by_bin[b])):  # this bin's next pair that can supply the level
            pair = by_bin[b][order[b][(j + t) % len(by_bin[b])]]
            try:
                task, images = task_for_pair(pair, args.pool, make_tasks.LEVELS[j % 3], "sparse", rng,
                                             args.max_side, (args.n_min, args.n_max), args.actor, args.action_step,
                                             prompt_text(args))
            except make_tasks.TaskUnavailable:
                continue
            task["task_id"] = f"eval{k:04d}-{task['task_id']}"  # a pair may serve twice
            out.append((task, images))
            break
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(path, "w") as f:
            f.writelines(json.dumps(t) + "\n" for t, _ in out)
    return out


# -----------------------------------------------------------------------------
# 2. Rollout: G completions per prompt through the engine (widematch/rollout.py)


def make_engine(args, model, tokenizer, device, rank, world, resumed, image_processor=None):
    """The rollout engine of --rollout-engine (widematch.rollout): hf samples from the policy's own weights; vllm
    starts one colocated engine per rank from --model (its prompt + completion room from --max-side / --n-max /
    --max-new-tokens, two --max-side images per prompt) and pushes the policy's weights into it at once when it was
    resumed or when --vllm-sleep-level 2 discarded them (the sync is level 2's refill; the first session needs it).
    With --max-visual-tokens the engine's processor gets the trainer's capped image size (image_processor.size), so
    both see the same visual tokens (the engine checks every prompt token for token)."""
    if args.rollout_engine == "hf":
        return hf_engine(model, tokenizer, args, world, autocast_for(device, world))
    cfg, _ = read_model_config(args.model)
    longest = make_tasks.build_prompt(args.n_max, 2 * args.n_max, actor=True, template=prompt_text(args))
    room = prompt_bound(cfg, args.max_side, longest) + args.max_new_tokens
    engine = VllmEngine(args.model, tokenizer, device, room, seed=args.seed + rank,
                        gpu_memory_utilization=args.vllm_gpu_memory_utilization, world=world,
                        sleep_level=args.vllm_sleep_level, image_side=args.max_side,
                        mm_processor_kwargs=({"size": dict(image_processor.size)}
                                             if args.max_visual_tokens > 0 and image_processor is not None else None))
    if resumed or engine.stale:
        engine.sync_weights(model)
    return engine


def hf_engine(model, tokenizer, args, world, autocast=contextlib.nullcontext):
    """transformers generate on model (--rollout-impl, --rollout-batch prompts a call; ranks in lock-step when
    sharded): the hf rollout engine, and the reference the debug dumps compare against."""
    return HFEngine(model, tokenizer, args.rollout_impl, args.rollout_batch, autocast, synced=world > 1)


def rollout(engine, tokenizer, image_processor, tasks, args):
    """Generate G completions per task (inside engine.session()), score them -> list of samples (prompt-major)."""
    encs = [encode(tokenizer, image_processor, task["prompt"], images) for task, images in tasks]
    outs = engine.generate(encs, [images for _, images in tasks], args.max_new_tokens, args.temperature,
                           greedy=False, group_size=args.group_size, names=[t.get("task_id") for t, _ in tasks])
    samples = [dict(o, enc=encs[j // args.group_size], task=tasks[j // args.group_size][0],
                    **score(o["text"], tasks[j // args.group_size][0], args)) for j, o in enumerate(outs)]
    if getattr(args, "overlong_buffer", 0) > 0:  # DAPO's soft overlong punishment, added to the reward
        for s in samples:
            s["overlong"] = recipes.overlong_penalty(len(s["token_ids"]), args.max_new_tokens, args.overlong_buffer,
                                                     args.overlong_penalty_factor)
            s["reward"] += s["overlong"]
    return samples


# -----------------------------------------------------------------------------
# 3. Reward (reward.py)


def score(text, task, args):
    if args.toy_reward:  # share of digit characters: a trivially learnable signal (learning test only)
        r = sum(c.isdigit() for c in text) / max(1, len(text))
        return dict(format=0.0, match=0.0, reward=r, action=None)
    # ActoR: + w_action * action accuracy (None where the pair has no pose), angle tolerance = the rounding step
    s = reward.score(text, task, w_action=args.w_action if args.actor else 0.0, action_tol=args.action_step)
    out = dict(format=s["format"], match=s["match"], reward=s["reward"], action=s.get("action"))
    if getattr(args, "reward", "paper") == "released":  # the release's reward; format / match still logged
        r = reward.released_reward(text, task)
        out.update({k: r[k] for k in reward.RELEASED_PARTS},
                   reward=r["score"] + (args.w_action * s["action"] if s.get("action") is not None else 0.0))
    return out


# -----------------------------------------------------------------------------
# 4. Advantages: group-normalised rewards (--filter-groups: DAPO's dynamic sampling)


def group_advantages(rewards, group_size, eps=1e-4, std="population"):
    """rewards (N*G,) prompt-major -> (r - group mean) / (group std + eps), (N*G,). std: population (ours, eps
    1e-4) or unbiased (veRL's GRPO: the sample std, eps 1e-6)."""
    r = torch.as_tensor(rewards, dtype=torch.float64).view(-1, group_size)                        # (N, G)
    if std == "unbiased":
        eps = 1e-6
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=std == "unbiased", keepdim=True) + eps)  # (N, G)
    return adv.view(-1).float()                                                                    # (N*G,)


def constant_groups(rewards, group_size):
    """rewards (N*G,) prompt-major -> [bool] * N: the groups whose G rewards are all equal (advantage 0)."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, group_size)                              # (N, G)
    return (r.max(1) == r.min(1)).tolist()


def dynamic_sampling(samples, roll, stage, cur, pairs_by_bin, task_rng, args, world):
    """--filter-groups (DAPO's dynamic sampling): groups whose G rewards are all equal are dropped and prompts of
    the step's stage are redrawn until every rank holds its share of groups with a reward spread, at most
    --filter-max-retries rounds. Every rank draws the same global tasks (task_rng) and rolls out the same number
    per round (the largest shortfall of any rank, from the gathered counts), so the collectives stay in step; a
    rank still short after the last round fills up with dropped groups at weight 0 (out of the loss).
    -> (the samples to train on: this rank's share of groups, each with its weight; every sample rolled out;
    stats: groups dropped, prompts redrawn, filler groups, over all ranks)."""
    G = args.group_size
    share = len(samples) // G
    rolled, kept, dropped, redrawn = [], [], [], 0

    def split(new):
        rolled.extend(new)
        for g, const in enumerate(constant_groups([s["reward"] for s in new], G)):
            (dropped if const else kept).append(new[g * G:(g + 1) * G])
    split(samples)
    for _ in range(args.filter_max_retries):
        need = max(share - c for c in gather_objects(len(kept), world))
        if need <= 0:
            break
        redrawn += need * world
        split(roll(sample_tasks(cur, pairs_by_bin, need * world, task_rng, args, stage=stage)))
    groups = [[dict(s, weight=1.0) for s in g] for g in kept[:share]]
    fill = share - len(groups)
    groups += [[dict(s, weight=0.0) for s in g] for g in dropped[:fill]]
    for s in rolled:  # for the records: kept or not
        s["weight"] = 0.0
    for g in kept[:share]:
        for s in g:
            s["weight"] = 1.0
    return [s for g in groups for s in g], rolled, dict(
        filter_dropped=all_sum(len(dropped), world), filter_redrawn=redrawn, filter_filled=all_sum(max(0, fill), world))


# -----------------------------------------------------------------------------
# 5. Loss


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, beta, clip_eps, num_tokens, is_weight=None, *,
              loss_mode="vanilla", loss_agg_mode="token-mean", clip_ratio_low=None, clip_ratio_high=None,
              clip_ratio_c=0.0, entropy=None, entropy_coeff=0.0, kl_loss_type="k3", num_seqs=None):
    """GRPO loss of one micro-batch (the defaults: the paper's). logp / old_logp / ref_logp / mask: (B, T);
    advantages: (B,); ref_logp may be None (beta = 0). Policy term per token (veRL's names):
      vanilla: -min(r * A, clip(r, 1 - low, 1 + high) * A), r = exp(logp - old); clip_ratio_c > 1 (dual clip):
               for A < 0 the term is at most -c * A.
      gspo:    the same with r = sg[s] * exp(logp - sg[logp]) (value s, gradient of the token), s = exp(mean over the
               completion's tokens of logp - old), log r clamped at 10 (GSPO's sequence ratio, veRL's form); no dual
               clip, and aggregated seq-mean-token-mean whatever loss_agg_mode is (as veRL does).
    + beta * KL: k3 = exp(ref - logp) - (ref - logp) - 1, unclamped; low_var_kl (veRL): the same with ref - logp
    clamped to +-20 and the estimate to +-10. - entropy_coeff * entropy (B, T) (the bonus; needs its gradient).
    is_weight (B, T), optional: truncated importance-sampling weights on the policy term (--tis-cap).
    Aggregation (KL and entropy with loss_agg_mode, as veRL's actor): token-mean: SUMMED over tokens / num_tokens
    (completion tokens of the GLOBAL batch); seq-mean-token-mean: each completion's token mean, SUMMED over
    completions / num_seqs (completions of the global batch). Either way micro-batch losses add up to the global
    value, whatever the micro-batch size or world size. Returns (loss, stats of summed per-token values; kl_agg /
    entropy_agg / seq_clip_sum: this micro-batch's share of the aggregated KL and entropy and its clipped sequences)."""
    mask = mask.float()                                                                            # (B, T)
    low = clip_eps if clip_ratio_low is None else clip_ratio_low
    high = clip_eps if clip_ratio_high is None else clip_ratio_high
    adv = advantages[:, None]                                                                      # (B, 1)
    n_seq_tok = mask.sum(1).clamp(min=1)  # a weight-0 row (--filter-groups filler) counts 1, adds 0   # (B,)

    def agg(x, mode):  # (B, T) -> () this micro-batch's share of the global aggregate
        if mode == "token-mean":
            return (x * mask).sum() / num_tokens
        return ((x * mask).sum(1) / n_seq_tok).sum() / num_seqs

    if loss_mode == "gspo":
        log_seq = ((logp - old_logp) * mask).sum(1) / n_seq_tok                                    # (B,)
        ratio = torch.exp((logp - logp.detach() + log_seq.detach()[:, None]).clamp(max=10.0))      # (B, T)
    else:
        ratio = torch.exp(logp - old_logp)                                                         # (B, T)
    pg = -torch.minimum(ratio * adv, ratio.clamp(1 - low, 1 + high) * adv)                         # (B, T)
    if loss_mode == "vanilla" and clip_ratio_c > 1:
        pg = torch.where(adv < 0, torch.minimum(pg, -clip_ratio_c * adv), pg)                      # (B, T)
    if is_weight is not None:
        pg = pg * is_weight                                                                        # (B, T)
    if ref_logp is None:
        kl = torch.zeros_like(logp)                                                                # (B, T)
    else:
        d = ref_logp - logp                                                                        # (B, T)
        if kl_loss_type == "low_var_kl":
            d = d.clamp(-20, 20)
            kl = (torch.exp(d) - d - 1).clamp(-10, 10)                                             # (B, T)
        else:
            kl = torch.exp(d) - d - 1                                                              # (B, T)
    pg_mode = "seq-mean-token-mean" if loss_mode == "gspo" else loss_agg_mode
    if pg_mode == loss_agg_mode == "token-mean":  # the paper's form: one sum
        loss = ((pg + beta * kl) * mask).sum() / num_tokens                                        # ()
    else:
        loss = agg(pg, pg_mode) + beta * agg(kl, loss_agg_mode)                                    # ()
    ent_agg = torch.zeros(())
    if entropy is not None and entropy_coeff:
        ent_agg = agg(entropy.float(), loss_agg_mode)                                              # ()
        loss = loss - entropy_coeff * ent_agg
    clipped = ((ratio < 1 - low) | (ratio > 1 + high)).float()                                     # (B, T)
    live = (mask.sum(1) > 0).float()                                                               # (B,)
    stats = dict(kl_sum=float((kl.detach() * mask).sum()), clip_sum=float((clipped * mask).sum()),
                 pg_sum=float((pg.detach() * mask).sum()), kl_agg=float(agg(kl.detach(), loss_agg_mode)),
                 entropy_agg=float(ent_agg.detach()), seq_clip_sum=float((clipped[:, 0] * live).sum()))
    return loss, stats


# -----------------------------------------------------------------------------
# 6. Update: log-probs, loss and AdamW over the micro-batches


def train_on(samples, model, ref_model, opt, args, device, world, autocast, pairs_by_id=None):
    """One (or --ppo-epochs x --ppo-mini-batches) AdamW step(s) on this rank's samples; returns summed stats for
    logging and the global token count. --ppo-mini-batches K: this rank's groups in K consecutive slices, one AdamW
    step each (veRL's ppo_mini_batch_size); the slices after the first are off-policy, so the old log-probs (of the
    sampling policy) are computed before the first update and the ratio and its clip act. Each slice is normalised
    by its own global token / completion count (token-mean / seq-mean-token-mean).
    With --pasta-weight w > 0 the loss of each step is GRPO loss + w * mean over the step's prompts (all ranks) of
    pasta.pasta_term (pairs_by_id: pool pair_id -> pairs.jsonl row, for the pair's dense matches).
    Samples of weight 0 (--filter-groups fillers) are in the forward passes (every rank runs as many) but out of
    the loss and of the token count. Stats: sums over tokens (kl, clip, entropy, dlogp), grad_norm (mean over the
    updates, before clipping), seconds of the no-grad log-probs and of the update."""
    adv = group_advantages([s["reward"] for s in samples], args.group_size,
                           std=getattr(args, "advantage_std", "population"))                       # (N,)
    K = getattr(args, "ppo_mini_batches", 1)
    per_mini = len(samples) // K  # whole groups (checked in main)
    minis = [range(k * per_mini, (k + 1) * per_mini) for k in range(K)]
    # global completion tokens / completions of each slice's loss (at least 1: a batch of fillers has loss 0)
    n_toks = [max(1.0, all_sum(sum(len(samples[i]["token_ids"]) * samples[i].get("weight", 1.0) for i in m), world))
              for m in minis]
    n_seqs = [max(1.0, all_sum(sum(samples[i].get("weight", 1.0) > 0 for i in m), world)) for m in minis]
    mbs = [list(range(i, min(i + args.micro_batch, m.stop))) for m in minis for i in range(m.start, m.stop,
                                                                                          args.micro_batch)]
    mini_of = [mb[0] // per_mini for mb in mbs]
    batches = [collate_samples([samples[i] for i in mb], args.pad_id, device) for mb in mbs]
    ent_coeff = getattr(args, "entropy_coeff", 0.0)
    loss_kw = dict(loss_mode=getattr(args, "loss_mode", "vanilla"), loss_agg_mode=getattr(args, "loss_agg_mode",
                   "token-mean"), clip_ratio_low=getattr(args, "clip_ratio_low", None),
                   clip_ratio_high=getattr(args, "clip_ratio_high", None), clip_ratio_c=getattr(args, "clip_ratio_c",
                   0.0), entropy_coeff=ent_coeff, kl_loss_type=getattr(args, "kl_loss_type", "k3"))
    def logprob_fn(m, b):  # the FSDP-registered method when sharded (see shard()); entropy of the policy only
        kw = dict(entropy=m is model and torch.is_grad_enabled())
        if kw["entropy"] and ent_coeff:
            kw["entropy_grad"] = True  # the bonus' gradient
        return m.logprobs(b, args.temperature, **kw) if hasattr(m, "logprobs") else \
            completion_logprobs(m, b, args.temperature, **kw)

    def pasta_fn(m, *a, **k):
        return m.pasta(*a, **k) if hasattr(m, "pasta") else pasta.pasta_term(m, *a, **k)
    prompts = samples[::args.group_size] if args.pasta_weight > 0 else []  # samples are prompt-major
    n_prompts = all_sum(len(prompts), world) if prompts else 0
    # each prompt's pool pair and its dense matches, loaded once (not again in every --ppo-epochs pass)
    pasta_pairs = [pairs_by_id[s["task"]["pair_id"]] for s in prompts]
    pasta_pairs = [(pair, make_tasks.load_arrays(args.pool, pair)) for pair in pasta_pairs]
    t0 = time.perf_counter()
    with torch.no_grad(), autocast():
        ref = [logprob_fn(ref_model, b) if ref_model is not None else None for b in batches]
        old = [logprob_fn(model, b) for b in batches] if args.ppo_epochs > 1 or K > 1 else None
    t1 = sync_time(device)
    stats = dict(kl_sum=0.0, clip_sum=0.0, dlogp_sum=0.0, loss=0.0, pasta_sum=0.0, pasta_acc_sum=0.0,
                 pasta_acc_n=0.0, entropy_sum=0.0, grad_norm=0.0, tis_sum=0.0, tis_capped_sum=0.0,
                 seq_clip_sum=0.0, entropy_agg=0.0, n_seqs=sum(n_seqs), seconds_logprobs=t1 - t0)
    sampler = []  # the engine's log-probs of its own samples, padded like the batch: (B, T) per micro-batch
    for mb, b in zip(mbs, batches):
        sampler.append(torch.zeros_like(b["mask"]))
        for r, i in enumerate(mb):
            sampler[-1][r, :len(samples[i]["logprobs"])] = torch.tensor(samples[i]["logprobs"])
    for epoch in range(args.ppo_epochs):
        for mini in range(K):
            for k, (mb, b) in enumerate(zip(mbs, batches)):
                if mini_of[k] != mini:
                    continue
                with autocast():
                    logp, ent = logprob_fn(model, b)                                               # (B, T) x 2
                old_k = old[k] if old is not None else logp.detach()  # ratio 1 with one update per batch
                w = None
                if args.tis_cap > 0:  # the sampler's distribution is not quite the trainer's: reweight, capped
                    w = tis_weights(old_k, sampler[k], b["mask"], args.tis_cap, args.tis_level)      # (B, T)
                loss, st = grpo_loss(logp, old_k, ref[k], adv[mb].to(device), b["mask"], args.kl_beta,
                                     args.clip_eps, n_toks[mini], is_weight=w, entropy=ent, num_seqs=n_seqs[mini],
                                     **loss_kw)
                # FSDP2 averages gradients over ranks; x world makes the result the global-normalised sum
                (loss * world).backward()
                stats["loss"] += loss.item()
                stats["clip_sum"] += st["clip_sum"] / args.ppo_epochs  # ratio 1 in epoch 0: clipping starts at 1
                stats["seq_clip_sum"] += st["seq_clip_sum"] / args.ppo_epochs
                if epoch == 0:
                    stats["kl_sum"] += st["kl_sum"]
                    stats["entropy_sum"] += float((ent.detach().float() * b["mask"]).sum())
                    stats["entropy_agg"] += st["entropy_agg"] / K  # the mean over the slices' aggregates
                    stats["dlogp_sum"] += float(((logp.detach().float() - sampler[k]).abs() * b["mask"]).sum())
                    if w is not None:
                        stats["tis_sum"] += float((w * b["mask"]).sum())
                        stats["tis_capped_sum"] += float(((w >= args.tis_cap).float() * b["mask"]).sum())
            for j, (s, (pair, arrays)) in enumerate(zip(prompts, pasta_pairs)):  # PaStA: one vision forward per
                if j * args.group_size // per_mini != mini:  # prompt, normalised by the global prompt count
                    continue
                with autocast():
                    pl, pst = pasta_fn(model, s["enc"], arrays, pair, n=args.pasta_grid, layer=args.pasta_layer,
                                       tau=args.pasta_tau)
                (pl * args.pasta_weight / n_prompts * world).backward()  # x world: FSDP2 averages over ranks
                if epoch == 0:
                    stats["pasta_sum"] += pst["pasta_loss"]
                    if np.isfinite(pst["pasta_acc"]):  # nan: the pair has no corresponding cells
                        stats["pasta_acc_sum"] += pst["pasta_acc"]
                        stats["pasta_acc_n"] += 1
            if args.debug_grad_dump:
                return stats, sum(n_toks)
            # the norm before clipping (inf: measured, not clipped); a DTensor under FSDP2 (full_tensor: all ranks)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
            stats["grad_norm"] += float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm) / \
                (args.ppo_epochs * K)
            opt.step()
            opt.zero_grad(set_to_none=True)
    stats["seconds_update"] = sync_time(device) - t1
    return stats, sum(n_toks)


# -----------------------------------------------------------------------------
# 7. One step: sampling -> rollout -> reward -> advantages -> loss -> update -> curriculum


@dataclasses.dataclass
class Run:
    """What a step reads and changes, built once by setup_run: flags, processes, models, the rollout engine, the
    optimiser and schedule, the curriculum, the task sampler (the same on every rank) and the pool's pairs."""
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module
    ref_model: object            # the frozen reference; None with --kl-beta 0
    tokenizer: object
    image_processor: object
    opt: torch.optim.Optimizer
    sched: object
    cur: curriculum.Curriculum
    task_rng: np.random.Generator
    pairs_by_bin: dict           # bin -> train pairs
    pairs_by_id: dict            # pair_id -> pairs.jsonl row
    eval_tasks: list             # [(task, [img1, img2])], the fixed held-out set
    engine: object = None        # rollout.HFEngine or rollout.VllmEngine


def train_step(run, step):
    """One GRPO step -> (metrics, records). All ranks draw the same global prompts and each rolls out its share;
    the curriculum is updated ONCE per step from all ranks' samples, identically everywhere."""
    args = run.args
    samples, rolled, stage, seconds_rollout, fstats = sample_and_roll(run)       # sampling, rollout, reward
    stats, n_tok = train_on(samples, run.model, run.ref_model, run.opt, args, run.device, run.world,
                            autocast_for(run.device, run.world), run.pairs_by_id)  # advantages, loss, AdamW
    run.sched.step()
    if not args.debug_skip_weight_sync:  # (tests: prove that the sync matters)
        run.engine.sync_weights(run.model)  # vllm: the updated policy into the engine; hf: nothing to do
    records = step_records(step, rolled, args, run.world)  # every rank gets all ranks' completions
    # ONE curriculum update per step (its windows count steps, as the paper's 20-step moving average): the mean
    # match of this step's prompts (a replay draw of a mastered bin is ignored by update); with --filter-groups
    # all rolled-out prompts, so dropping the all-correct groups does not bias it
    events = run.cur.update(*stage, float(np.mean([r["match"] for r in records])))  # every prompt is from `stage`
    stats.update(fstats, seconds_rollout=seconds_rollout)
    zero_std = np.mean(constant_groups([r["reward"] for r in records], args.group_size))
    return step_metrics(step, records, stats, n_tok, run.sched, run.cur, events, args, run.world, zero_std,
                        reward.RELEASED_PARTS), records


def sample_and_roll(run):
    """The step's prompts (one curriculum stage) -> this rank's completions, scored (--filter-groups: the constant
    groups dropped and redrawn) -> (samples to train on, every sample rolled out, the stage, seconds, filter stats)."""
    args, world = run.args, run.world
    t0 = time.perf_counter()
    tasks = sample_tasks(run.cur, run.pairs_by_bin, args.prompts_per_step, run.task_rng, args)  # same on every rank
    stage = tuple(tasks[0][0][k] for k in ("bin", "level", "spatial"))  # the step's draw (cur.sample)

    def roll(tasks):  # this rank's share of the global tasks (all of them with --debug-grad-dump)
        n = len(tasks) // world
        mine = tasks if args.debug_grad_dump else tasks[run.rank * n:(run.rank + 1) * n]
        with run.engine.session():  # hf: the weights gathered once; vllm: the engine awake (CUDA sleep mode)
            return rollout(run.engine, run.tokenizer, run.image_processor, mine, args)
    rolled = roll(tasks)
    samples, fstats = rolled, {}
    if args.filter_groups:
        samples, rolled, fstats = dynamic_sampling(rolled, roll, stage, run.cur, run.pairs_by_bin, run.task_rng,
                                                   args, world)
    return samples, rolled, stage, sync_time(run.device) - t0, fstats


def step_records(step, rolled, args, world):
    """One record per completion rolled out (kept, i.e. trained on at weight 1, or not with --filter-groups),
    gathered to every rank (the curriculum must advance identically everywhere): rollouts.jsonl's lines."""
    records = [dict(step=step, task_id=s["task"].get("task_id"), pair_id=s["task"].get("pair_id"),
                    bin=s["task"].get("bin"), level=s["task"].get("level"), spatial=s["task"].get("spatial"),
                    n=s["task"]["n"], m=s["task"]["m"], text=s["text"], reward=s["reward"], format=s["format"],
                    match=s["match"], action=s["action"], length=len(s["token_ids"]), truncated=s["truncated"],
                    **({"overlong": s["overlong"]} if "overlong" in s else {}),
                    **{k: s[k] for k in reward.RELEASED_PARTS if k in s},
                    **({"kept": s.get("weight", 0.0) == 1.0} if args.filter_groups else {}))
               for s in rolled]
    return [r for part in gather_objects(records, world) for r in part]


@torch.no_grad()
def evaluate_match(engine, tokenizer, image_processor, eval_tasks, args, rank, world):
    """Greedy match accuracy on the fixed held-out tasks through the rollout engine, split over the ranks (task k on
    rank k % world) and gathered -> (mean match, rows: task_id, rank, text, token_ids, logprobs, match; every rank
    gets all rows). FSDP needs every rank to issue the same collectives: each rank's share is padded to the same
    length with copies of a task whose results are dropped; with --rollout-impl legacy generate runs with
    synced_gpus (ranks stop together), with resident the weights are gathered once for the whole eval."""
    if not eval_tasks:
        return float("nan"), []
    per_rank = -(-len(eval_tasks) // world)
    mine = list(range(rank, len(eval_tasks), world))
    padded = mine + [mine[0] if mine else 0] * (per_rank - len(mine))  # the copies get weight 0 (dropped)
    encs = [encode(tokenizer, image_processor, eval_tasks[k][0]["prompt"], eval_tasks[k][1]) for k in padded]
    with engine.session():  # hf: the weights gathered once for the whole eval
        outs = engine.generate(encs, [eval_tasks[k][1] for k in padded], args.max_new_tokens, 1.0, greedy=True,
                               names=[eval_tasks[k][0].get("task_id", k) for k in padded])
    rows = [dict(task_id=eval_tasks[k][0].get("task_id", k), index=k, rank=rank, text=o["text"],
                 token_ids=o["token_ids"], logprobs=o["logprobs"],
                 match=reward.score(o["text"], eval_tasks[k][0])["match"], bin=eval_tasks[k][0]["bin"])
            for k, o in zip(mine, outs)]
    rows = sorted((r for part in gather_objects(rows, world) for r in part), key=lambda r: r["index"])
    return float(np.mean([r["match"] for r in rows])), rows


# -----------------------------------------------------------------------------
# Setup: flags, seeds, models, optimiser (the memory check is rollout.check_memory)


def parse_args(argv=None):
    """The flags, then --recipe's preset values for every preset flag not given on the command line (so vars(args),
    args.json, records the resolved values)."""
    args = build_parser().parse_args(argv)
    quiet = build_parser()  # the same flags without defaults: what the command line gave
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    recipes.resolve(args, set(vars(quiet.parse_args(argv))))
    return args


def build_parser():
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass  # the usage card's layout, and every flag's default in --help
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Formatter,
                                 epilog="Each flag in full: docs/grpo.md. --recipe presets (a flag given on the "
                                 "command line wins; the defaults shown above are the paper's):\n" + recipes.table())
    add = ap.add_argument  # the paper's recipe is every default; one line a flag, the details in docs/grpo.md
    # what to train, on what, where
    add("--recipe", default="paper", choices=recipes.NAMES, help="flag presets: paper, or released (docs/recipes.md)")
    add("--reward", default="paper", choices=["paper", "released"], help="paper: format + match; released: its 4 parts")
    add("--prompt-template", default=None, help="ask with this question (released utils.py or a text file)")
    add("--model", default="Qwen/Qwen3-VL-8B-Instruct", help="policy init: local dir or hub id")
    add("--pool", default="pool", help="build_pool.py output (pairs.jsonl + npz)")
    add("--out", default="runs/dcrl", help="run dir")
    add("--device", default="auto", choices=["auto", "cpu"], help="auto: the GPU when torch sees one; cpu: gloo")
    # the step: G completions of each prompt, micro-batches
    add("--group-size", type=int, default=32, help="G completions per prompt (paper 32)")
    add("--prompts-per-step", type=int, default=16, help="prompts per step, all ranks (paper 16)")
    add("--micro-batch", type=int, default=4, help="sequences per forward/backward")
    add("--max-new-tokens", type=int, default=5120, help="paper 5120")
    add("--temperature", type=float, default=1.0, help="rollout temperature (paper 1.0)")
    add("--max-side", type=int, default=1024, help="longest side of the prompted images (paper 1024)")
    add("--n-min", type=int, default=4, help="points in image 1 per task, uniform in [n-min, n-max]")
    add("--n-max", type=int, default=12, help="(the paper: 4..12; the tiny model is trained on 3..5)")
    add("--max-visual-tokens", type=int, default=0, help="visual tokens an image at most (0: the processor's own)")
    # the rollout engine
    add("--rollout-engine", default="hf", choices=["hf", "vllm"], help="hf: transformers; vllm: colocated, synced")
    add("--rollout-impl", default="resident", choices=["resident", "legacy"], help="hf: resident or legacy (FSDP)")
    add("--rollout-batch", type=rollout_batch_arg, default="auto",
        help=f"prompts per generate call (auto: the largest the plan fits on CUDA, {CPU_ROLLOUT_BATCH} on CPU)")
    add("--vllm-gpu-memory-utilization", type=float, default=0.5, help="vllm: the engine's share of each GPU")
    add("--vllm-sleep-level", type=int, default=2, choices=[1, 2], help="vllm on CUDA: 2 drops weights, 1 keeps them")
    add("--tis-cap", type=float, default=0.0, help="truncated importance sampling cap (0: off, the paper)")
    add("--tis-level", default="token", choices=["token", "sequence"], help="--tis-cap per token or per completion")
    # the loss (veRL's names, actor_rollout_ref.actor.*) and the optimiser
    add("--kl-beta", type=float, default=0.005, help="KL coefficient (paper 0.005); 0: no reference model")
    add("--kl-loss-type", default="k3", choices=["k3", "low_var_kl"], help="k3 unclamped; low_var_kl clamped (veRL)")
    add("--clip-eps", type=float, default=0.2, help="PPO clip range")
    add("--clip-ratio-low", type=float, default=None, help="ratio clipped below at 1 - this (None: --clip-eps)")
    add("--clip-ratio-high", type=float, default=None, help="ratio clipped above at 1 + this (None: --clip-eps)")
    add("--clip-ratio-c", type=float, default=0.0, help="dual clip c > 1 (vanilla only); 0: off")
    add("--loss-mode", default="vanilla", choices=["vanilla", "gspo"], help="per-token or sequence-level ratio")
    add("--loss-agg-mode", default="token-mean", choices=["token-mean", "seq-mean-token-mean"], help="aggregation")
    add("--entropy-coeff", type=float, default=0.0, help="entropy bonus: loss -= coeff x entropy")
    add("--advantage-std", default="population", choices=["population", "unbiased"], help="group std (+1e-4 / +1e-6)")
    add("--overlong-buffer", type=int, default=0, help="DAPO overlong penalty over the last N tokens (0: off)")
    add("--overlong-penalty-factor", type=float, default=1.0, help="the penalty at max-new-tokens")
    add("--ppo-epochs", type=int, default=1, help="updates per batch (>1 makes the clip active)")
    add("--ppo-mini-batches", type=int, default=1, help="AdamW steps per batch, one per slice of its groups")
    add("--lr", type=float, default=1e-6, help="AdamW lr (paper 1e-6; the random tiny model needs 1e-3)")
    add("--warmup-steps", type=int, default=10, help="linear lr warm-up, then constant (paper 10)")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    add("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    add("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True, help="recompute activations")
    # the curriculum, DAPO's dynamic sampling
    add("--curriculum", default="dcrl", choices=["dcrl", "uniform", "easy", "hard"])
    add("--inner-on-new-bin", default="carry", choices=curriculum.INNER_ON_NEW_BIN, help="dcrl: point stages kept?")
    add("--max-steps-per-bin", type=int, default=0, help="dcrl: force the next bin after N steps (0 = off, the paper)")
    add("--filter-groups", action="store_true", help="drop constant-reward groups, redraw (off: the paper)")
    add("--filter-max-retries", type=int, default=3, help="--filter-groups: redraw rounds per step")
    # HATCH: PaStA, ActoR
    add("--pasta-weight", type=float, default=0.0, help="HATCH PaStA loss weight (0: off)")
    add("--pasta-grid", type=int, default=4, help="PaStA cells per side (HATCH's best: 4)")
    add("--pasta-layer", type=int, default=0, help="PaStA features: 0 the vision merger's output, k decoder layer k")
    add("--pasta-tau", type=float, default=0.1, help="PaStA InfoNCE temperature")
    add("--actor", action="store_true", help="HATCH ActoR: prompts ask for the camera motion block")
    add("--w-action", type=float, default=0.5, help="ActoR: reward += w-action * action accuracy")
    add("--action-step", type=float, default=reward.ACTION_STEP_DEG, help="ActoR: angle step and tolerance (deg)")
    add("--toy-reward", action="store_true", help="reward = share of digits in the text (tests)")
    # steps, checkpoints, eval, logs
    add("--steps", type=int, default=1000, help="training steps (paper 1000)")
    add("--seed", type=int, default=0, help="seed")
    add("--resume", action="store_true", help="continue from the latest complete <out>/step_*/")
    add("--save-every", type=int, default=50, help="checkpoint every N steps")
    add("--keep-last", type=int, default=3, help="checkpoints kept (0 keeps all)")
    add("--export-every", type=int, default=0, help="bf16 export in checkpoints of these steps (0: every one)")
    add("--async-save", action="store_true", help="write the checkpoint shards in the background")
    add("--dist-timeout-min", type=float, default=60, help="minutes a collective may wait (torch's default: 10)")
    add("--eval-every", type=int, default=25, help="greedy match accuracy on held-out tasks (0: off)")
    add("--eval-tasks", type=int, default=64, help="held-out tasks from test pairs (<out>/eval_tasks.jsonl)")
    add("--wandb", default=None, help="wandb project name (imported only when given)")
    add("--tensorboard", default=None, help="tensorboard log dir (imported only when given)")
    # the memory plan (--plan prints it and exits; a CUDA launch checks it)
    add("--plan", action="store_true", help="print the per-GPU memory plan of this run and exit")
    add("--gpus", type=int, default=8, help="--plan: GPUs (FSDP2 shards over all of them)")
    add("--gpu-mem-gib", type=float, default=80, help="--plan: memory per GPU, GiB")
    add("--model-config", default=None, help="--plan: a config.json to read instead of --model's")
    add("--plan-device", default="cuda", choices=["cuda", "cpu"], help="--plan: cuda (bf16) or cpu (fp32)")
    add("--memory-check", action=argparse.BooleanOptionalAction, default=True, help="CUDA: stop if the plan won't fit")
    # test hooks (widematch/testhooks.py), hidden
    for flag in ("--debug-grad-dump", "--stop-after-step", "--debug-dump", "--debug-engine-check"):
        add(flag, type=int if flag == "--stop-after-step" else None, default=None, help=argparse.SUPPRESS)
    add("--debug-skip-weight-sync", action="store_true", help=argparse.SUPPRESS)
    return ap


def rollout_batch_arg(value):
    """--rollout-batch: a positive integer or auto."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {value!r}")
    return int(value)


def check_flags(args, world):
    """Flag combinations argparse cannot check (some need the number of processes): one line each."""
    if args.prompts_per_step % world:
        sys.exit(f"grpo.py: error: --prompts-per-step {args.prompts_per_step} not divisible by {world} processes")
    if args.ppo_mini_batches < 1 or (args.prompts_per_step // world) % args.ppo_mini_batches:
        sys.exit(f"grpo.py: error: --ppo-mini-batches {args.ppo_mini_batches} does not divide the "
                 f"{args.prompts_per_step // world} prompts of each of {world} process(es)")
    if not 0 <= args.overlong_buffer <= args.max_new_tokens:
        sys.exit(f"grpo.py: error: --overlong-buffer {args.overlong_buffer} must be in 0..--max-new-tokens "
                 f"{args.max_new_tokens}")
    if 0 < args.clip_ratio_c <= 1:
        sys.exit(f"grpo.py: error: --clip-ratio-c {args.clip_ratio_c}: the dual clip needs c > 1 (0: off)")


def print_plan(args):
    """--plan: the per-GPU memory budget of this run from the model's config.json alone (rollout.format_plan)."""
    text, _ = format_plan(args)
    print(text)


def seed_everything(seed, rank, same_sampling=False):
    """Seeds python / numpy / torch per rank (so sampling differs per rank; same_sampling: every rank samples the
    same, for --debug-grad-dump) -> the task sampler, identical on every rank: every rank draws the global prompts."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + (0 if same_sampling else rank))
    return np.random.default_rng(seed)


def load_models(args, device, rank, world):
    """-> policy (--model; fp32, in train mode; a resumed run overwrites its weights from the checkpoint), frozen
    reference (--model; None with --kl-beta 0), tokenizer, image processor. Both FSDP2-sharded when world > 1, and
    then only rank 0 reads the weight files (widematch.dist.load_sharded)."""
    def prepare_policy(m):
        m.train()
        if args.grad_checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model, tokenizer, image_processor = wdist.load_sharded(args.model, device, torch.float32, rank, world,
                                                           prepare_policy, FORWARDS)
    args.pad_id = tokenizer.pad_token_id
    if args.max_visual_tokens > 0:
        cap_visual_tokens(image_processor, args.max_visual_tokens)
    ref_model = None
    if args.kl_beta > 0:
        ref_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        ref_model = wdist.load_sharded(args.model, device, ref_dtype, rank, world,
                                       lambda m: m.eval().requires_grad_(False), FORWARDS)[0]
    return model, ref_model, tokenizer, image_processor


FORWARDS = dict(logprobs=lambda m, batch, t, **k: completion_logprobs(m, batch, t, **k),
                pasta=lambda m, *a, **k: pasta.pasta_term(m, *a, **k))  # called on the root when FSDP-sharded


def shard(model, device):
    """FSDP2 (widematch.dist.shard) with the trainer's two direct forwards (model.logprobs, model.pasta)."""
    return wdist.shard(model, device, FORWARDS)


def make_optimizer(model, args):
    """AdamW and the learning-rate schedule: linear warm-up over --warmup-steps, then constant."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999),
                            weight_decay=getattr(args, "weight_decay", 0.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    return opt, sched


# -----------------------------------------------------------------------------
# Test hooks (hidden flags --debug-*, --stop-after-step): outside the loop, called at its edges; the ones
# that need no step of this file are in widematch/testhooks.py


def debug_grad_dump(run, step):
    """--debug-grad-dump PATH: every rank generates the SAME global batch (same seed), trains on its share of it
    (no optimizer step) and the full gradient is saved to PATH; 1 process vs torchrun must agree."""
    if step > run.args.steps:
        return
    samples = sample_and_roll(run)[0]  # every rank holds the whole batch
    n = len(samples) // run.world
    train_on(samples[run.rank * n:(run.rank + 1) * n], run.model, run.ref_model, run.opt, run.args, run.device,
             run.world, autocast_for(run.device, run.world), run.pairs_by_id)
    testhooks.dump_grads(run.model, run.args.debug_grad_dump, run.rank)
    print0(f"grpo.py: gradients of step {step} written to {run.args.debug_grad_dump}")
    if run.world > 1:
        dist.destroy_process_group()


def debug_engine_check(run):
    """--debug-engine-check PATH: greedy rows of the rollout engine next to transformers' on the trained policy."""
    check = {name: evaluate_match(e, run.tokenizer, run.image_processor, run.eval_tasks, run.args, run.rank,
                                  run.world)[1]
             for name, e in (("engine", run.engine), ("hf", hf_engine(run.model, run.tokenizer, run.args, run.world)))}
    if run.rank == 0:
        with open(run.args.debug_engine_check, "w") as f:
            json.dump(check, f)


# -----------------------------------------------------------------------------
# The run: main() is the table of contents


def main(argv=None):
    """flags -> processes -> checks -> the run dir's lock -> train: setup_run, then train_step once per step."""
    args = parse_args(argv)
    if args.plan:  # the memory plan only: no pool, no weights, no processes
        return print_plan(args)
    prompt_text(args)  # a bad --prompt-template stops here, before any process or weight
    rank, world, device = setup_distributed(args.dist_timeout_min, args.device)
    check_flags(args, world)
    check_memory(args, device, rank, world)  # before any weights are read; resolves --rollout-batch auto
    lock = lock_run_dir(args.out, rank, world)  # one live run per --out
    try:
        train(args, rank, world, device)
    finally:
        if lock is not None:
            lock.close()


def train(args, rank, world, device):
    """The run: set up (or resume), then one step at a time: step, eval, log, curves, checkpoint."""
    run, ckpt, start = setup_run(args, rank, world, device)
    sinks = open_logs(args, ckpt, start, rank)
    if args.debug_grad_dump:  # (tests) one step's gradients written, then stop
        return debug_grad_dump(run, start + 1)
    pending = {}  # an unfinished --async-save

    for step in testhooks.step_range(start, args):
        t0 = time.time()
        m, records = train_step(run, step)
        if args.eval_every > 0 and step % args.eval_every == 0:
            m["eval_match"], rows = evaluate_match(run.engine, run.tokenizer, run.image_processor, run.eval_tasks,
                                                   args, rank, world)
            m["eval_match_by_bin"] = {str(b): float(np.mean([r["match"] for r in rows if r["bin"] == b]))
                                      for b in sorted({r["bin"] for r in rows})}
        m["seconds"] = time.time() - t0
        log_step(m, records, args, rank, world, sinks)
        if "eval_match" in m or step == args.steps:
            full = []
            with catch_enospc(full):
                draw_curves(args.out, rank)
            disk_full_check(full, os.path.join(args.out, "curves.png"), 2 ** 20, rank, world)
        finish_save(pending, args, rank, world)  # the previous step's --async-save
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(step, run.model, run.opt, run.sched, run.cur, run.task_rng, run.tokenizer,
                            run.image_processor, args, rank, world, pending)
    finish_save(pending, args, rank, world)
    close_run(run, sinks, start)


def setup_run(args, rank, world, device):
    """Seeds, data, models, optimiser, the checkpoint to resume (--resume), the rollout engine -> (Run, ckpt, the
    step done). In this order: a resumed run's RNG state is restored after everything that draws at start."""
    task_rng = seed_everything(args.seed, rank, same_sampling=bool(args.debug_grad_dump))
    ckpt = latest_checkpoint(args.out) if args.resume else None
    pairs_by_id, pairs_by_bin, cur, eval_tasks = load_data(args, rank, reuse=ckpt is not None)
    model, ref_model, tokenizer, image_processor = load_models(args, device, rank, world)
    opt, sched = make_optimizer(model, args)
    start = resume(ckpt, args, model, opt, sched, cur, task_rng, rank, world)
    run = Run(args, rank, world, device, model, ref_model, tokenizer, image_processor, opt, sched, cur, task_rng,
              pairs_by_bin, pairs_by_id, eval_tasks)
    run.engine = make_engine(args, model, tokenizer, device, rank, world, resumed=ckpt is not None,
                             image_processor=image_processor)
    if args.debug_dump:  # greedy rows through transformers (the reference path), whatever --rollout-engine is
        testhooks.debug_dump(args.debug_dump, model, ref_model, opt, task_rng, lambda m: evaluate_match(
            hf_engine(m, tokenizer, args, world), tokenizer, image_processor, eval_tasks, args, rank, world)[1], rank)
    return run, ckpt, start


def close_run(run, sinks, start):
    """After the last step: the --debug-engine-check hook, the engine, the sinks, the process group."""
    args, rank, world = run.args, run.rank, run.world
    if args.debug_engine_check:
        debug_engine_check(run)
    run.engine.close()
    if sinks["tb"] is not None:
        sinks["tb"].close()
    if world > 1 and dist.is_initialized():  # vLLM's shutdown may have torn the (shared) process group down
        dist.destroy_process_group()
    print0(f"grpo.py: {args.steps - start} steps done -> {latest_checkpoint(args.out) if rank == 0 else ''}")


if __name__ == "__main__":
    main()
