"""
grpo.py: GRPO (hand-written, no TRL) that teaches Qwen3-VL wide-baseline matching with the dual-level curriculum.

Usage:
    CPU demo (tiny model, synthetic pool; defaults: 40 steps of 4 prompts x G=4, ~0.5 s a step on 2 cores):
        python grpo.py --model demo_data/tiny-qwen3vl --pool pool --out runs/grpo
    2 processes on CPU (FSDP2 over gloo; same result as 1 process up to float rounding):
        torchrun --nproc_per_node=2 grpo.py --model demo_data/tiny-qwen3vl --pool pool --out runs/grpo2
    1 GPU (a small model; bf16 autocast, fp32 weights and optimizer):
        python grpo.py --model Qwen/Qwen3-VL-2B-Instruct --pool pool --out runs/grpo_2b --group-size 8 \
            --prompts-per-step 4 --micro-batch 4 --max-new-tokens 1024 --lr 1e-6 --grad-checkpointing
    The paper's run (8 GPUs, FSDP2, bf16 compute / fp32 master weights):
        torchrun --nproc_per_node=8 grpo.py --model Qwen/Qwen3-VL-8B-Instruct --pool pool --out runs/dcrl \
            --group-size 32 --prompts-per-step 16 --micro-batch 4 --kl-beta 0.005 --max-new-tokens 5120 \
            --temperature 1.0 --lr 1e-6 --warmup-steps 10 --n-min 4 --n-max 12 --max-side 1024 --grad-checkpointing \
            --curriculum dcrl --steps 1000 --save-every 50 --eval-every 25
        (needs per node ~40 GiB host RAM on rank 0 while loading, ~12 GiB of disk per rank per checkpoint + a
        16 GiB bf16 export; add --async-save to write checkpoints in the background; see the README)
    Before launching it, the per-GPU memory plan (reads --model's config.json, or configs/ for the Qwen hub ids, or
    --model-config FILE; needs neither the pool nor the weights; says whether it fits and which flag to change):
        python grpo.py --plan --gpus 8 --gpu-mem-gib 80 --model Qwen/Qwen3-VL-8B-Instruct [the run's flags]
    Resume after a crash (same command + --resume): continues from the latest complete <out>/step_%06d/.
    HATCH extensions (PaStA + ActoR, see below; the tiny model on CPU):
        python grpo.py --model demo_data/tiny-qwen3vl --pool pool --out runs/hatch --pasta-weight 0.1 --actor

Inputs: --model (a local dir such as tiny_model.py's output or a checkpoint of this script, or a hub id),
--pool (build_pool.py's pairs.jsonl + npz; train-split pairs for training, test-split for --eval-every).
Outputs in --out:
    step_%06d/       dcp/ (torch.distributed.checkpoint: each rank writes its own shard of the fp32 weights and
                     the AdamW state; a checkpoint resumes on another number of processes, resharded on load, but
                     then not byte-identically: rank 0's RNG is used), scheduler.pt, curriculum.json, rng_<rank>.pt
                     (python, numpy, torch RNG + the task sampler), the base model's processor files verbatim
                     (PROCESSOR_FILES: tokenizer files, preprocessor_config.json, video_preprocessor_config.json,
                     chat_template.json / .jinja, generation_config.json; so AutoProcessor, lmms-eval and
                     `vllm serve STEP_DIR` load a step dir), and (--export-every, default every checkpoint) a bf16
                     save_pretrained export (config.json + model.safetensors) that evaluate.py and from_pretrained
                     load; meta.json (args, step, world size) written last. Written
                     to step_%06d.tmp/ then renamed (after the background write with --async-save, one step later),
                     so a crash never leaves a half-written step_%06d/; --keep-last K prunes older ones. --resume
                     rebuilds the models from --model and loads dcp/ into them.
    rollouts.jsonl   one line per completion: step, task_id, prompt meta (pair, bin, level, spatial, n, m), text,
                     reward parts (format, match, action: ActoR accuracy or null), length, truncated.
    metrics.jsonl    one line per step (the same numbers as the printed line): reward, format, match, kl, length,
                     truncated, dlogp, lr, curriculum (bin, newest unlocked stage after the update), curriculum_events
                     (what update() reported, e.g. "unlock L2/moderate ..."; also printed), eval_match
                     (every --eval-every), action (--actor), pasta + pasta_acc (--pasta-weight > 0), seconds.
    args.json

One step: the curriculum picks (bin, level, spatial) per prompt -> a random train pair of that bin ->
make_tasks.make_task (drawn images + prompt; other pairs are tried on TaskUnavailable) -> one prefill per prompt
whose KV cache is copied into the G rows of a StaticCache, the policy's FSDP weights gathered ONCE for the whole
rollout (rollout.py; --rollout-impl legacy: FSDP gathers every layer per token, DynamicCache) -> reward.score -> group-normalised advantages -> clipped policy
loss + beta * KL(k3) to the reference (+ the PaStA term) -> one AdamW step -> ONE curriculum.update per step with
the mean match accuracy of the step's prompts, all drawn from the one (bin, level, spatial) the curriculum sampled
for the step (a uniformly drawn unlocked stage of the current bin, or a replay draw that update ignores), so its
20-update windows are the paper's 20-step moving average (curriculum.py's usage card has the state machine;
--inner-on-new-bin, --max-steps-per-bin set it).

HATCH extensions (HATCH: patch-level spatial alignment + action-then-answer reasoning; off by default):
- PaStA (--pasta-weight w > 0, pasta.py): the visual tokens of each image are pooled into a --pasta-grid x
  --pasta-grid grid of cells; an InfoNCE loss (cosine / --pasta-tau) asks each image-1 cell to pick the image-2 cell
  that the pool's verified dense matches put it in (and vice versa). Features: --pasta-layer 0 = the vision
  merger's output (the vision tower sees each image alone), k = decoder layer k. Loss of a step = GRPO loss +
  w * mean over the step's prompts (all ranks) of the PaStA loss. Logged: pasta (that mean) and pasta_acc (share
  of corresponding image-1 cells whose most similar image-2 cell is the right one). OUR choices: HATCH's text
  does not give the loss form (InfoNCE is ours), nor how it is weighted against the RL loss.
- ActoR (--actor, reward.py): the prompt asks for the camera motion from view 1 to view 2 in an <action> block
  before the answer (yaw/pitch/roll rounded to --action-step degrees, then the main move direction); reward +=
  --w-action * action accuracy (mean of yaw, pitch, roll within one step and the move direction; pairs without a
  pose get no action term). Logged: action (mean accuracy per step). OUR choices: the canonical action form
  (intrinsic yaw-pitch-roll, direction-only move, since SfM translations have no scale) and the weight.

Choices the paper does not spell out (ours):
- Advantage (r - mean_group) / (std_group + 1e-4) with the POPULATION std over the G completions of a prompt
  (DeepSeekMath's normalisation; TRL uses the sample std). A group whose rewards are all equal gets 0 advantage.
- Loss normalisation: per-token losses are SUMMED over all completion tokens of the global batch and divided by
  the number of completion tokens in the global batch (all micro-batches, all ranks) - the token-level
  normalisation of DAPO / TRL's "dapo" loss. The gradient then does not depend on micro-batch size, gradient
  accumulation or world size (tested).
- Log-probs are of logits / temperature (the distribution that was sampled), as TRL does.
- Special tokens (image pad, vision start/end, im_start, ...) are banned from sampling; the recorded sampler
  log-probs are taken BEFORE the ban, i.e. of the same distribution the trainer computes, so |dlogp| measures
  numerics only (the banned tokens' mass is the difference between sampled and trained distribution; ~0 once
  the model never proposes them).
- Completions cut at --max-new-tokens are marked `truncated` (usually malformed, reward 0) and still trained on.
- The learning-rate schedule (10-step linear warm-up, then constant) counts training steps; with --ppo-epochs > 1
  each epoch is one AdamW step over the whole batch and the old log-probs are those of the sampling policy.
- `--toy-reward` replaces the matching reward by the share of digit characters in the completion: a signal any
  random model can learn in a few dozen steps; used by the learning test only.
- Multi-process (torchrun): only rank 0 reads the weight files (from_pretrained, policy and reference); the
  other ranks build the model on the meta device, and after sharding rank 0's state is broadcast into the shards
  (non-persistent buffers such as the rotary inv_freq sent from rank 0, tied embeddings re-tied). Held-out eval
  tasks are split over the ranks and gathered (same value as one process). The process group waits
  --dist-timeout-min (default 60) minutes on a collective, not torch's 10: a rank may wait that long on an eval
  at 5,120 tokens or on rank 0's export.
- `--debug-dump PATH` (tests): after loading / resuming, rank 0 saves its RNG state, the greedy eval rows (tokens,
  log-probs, which rank decoded them) of policy and reference, and the full model and optimizer state.
- `--debug-grad-dump PATH` (tests): every rank generates the SAME global batch (same seed), each rank computes the
  loss on its share, the full gradient is saved to PATH and the script exits - 1 process vs torchrun must agree.
- `--stop-after-step N` (tests): exits hard (os._exit, no clean-up) after step N, to test --resume.
"""
import argparse
import contextlib
import copy
import datetime
import json
import os
import random
import re
import shutil
import sys
import time
import types

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

import curriculum
import make_tasks
import pasta
import reward
# the rollout machinery (generate with one prefill per prompt, resident weights, the in-place KV cache, the memory
# plan) lives in rollout.py; grpo.generate and grpo.stop_ids stay importable for evaluate.py, tiny_model.py, bench.py
from rollout import format_plan, generate, resident, stop_ids

# -----------------------------------------------------------------------------
# Model plumbing (evaluate.py and tiny_model.py import these)


def load_policy(path, device="cpu", dtype=torch.float32, device_map=None):
    """-> (model, tokenizer, image_processor) from a local dir or hub id. AutoTokenizer + AutoImageProcessor, never
    AutoProcessor: Qwen3-VL's processor needs torchvision for its video half, which the CPU machine lacks.
    device_map ("auto", ...): accelerate spreads the layers over the visible GPUs (then CPU) instead of `device`,
    for a model larger than one device (inference only)."""
    p = str(path)
    if not os.path.isdir(p) and (os.path.exists(p) or p.startswith((".", "/", "~")) or p.count("/") != 1):
        sys.exit(f"grpo.py: error: model {p} is neither a local model dir nor a hub id (owner/name)")
    if os.path.isdir(p) and not os.path.isfile(os.path.join(p, "config.json")):
        sys.exit(f"grpo.py: error: model dir {p} has no config.json (a run dir? pass one of its step_* dirs)")
    if device_map:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, device_map=device_map)
    else:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device)
    return (model.eval(), *load_processors(path))


def load_processors(path):
    """-> (tokenizer with left padding, for generation; image processor) of a model dir or hub id. The chat
    template is the vision one (chat_template_for): hub VL repos keep it in the processor's chat_template.json,
    which AutoTokenizer does not read."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    tokenizer.chat_template = chat_template_for(path, tokenizer)
    return tokenizer, AutoImageProcessor.from_pretrained(path)


def read_model_file(path, name):
    """Text of the file `name` of a model dir or hub id (from the hub cache), or None when it has none."""
    from transformers.utils import cached_file
    f = cached_file(str(path), name, _raise_exceptions_for_missing_entries=False,
                    _raise_exceptions_for_connection_errors=False)
    if f is None:
        return None
    with open(f, encoding="utf-8") as fh:
        return fh.read()


def renders_images(tokenizer, template):
    """True when the template turns an image content part into one <|image_pad|> (what encode expands); a
    text-only template prints the part list, drops it or fails on it."""
    import jinja2
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError):
        return False
    return isinstance(text, str) and text.count("<|image_pad|>") == 1


def chat_template_for(path, tokenizer):
    """The chat template encode uses: the processor's (chat_template.json, else chat_template.jinja: the files
    AutoProcessor and vLLM read first) or the tokenizer's (tokenizer_config.json / chat_template.jinja), the
    first of them that handles image parts, else the first that exists. Says which when the two differ, so a
    text-only template on the tokenizer never silently wins over the vision one."""
    raw = read_model_file(path, "chat_template.json")
    if raw is not None:
        try:
            proc, where = json.loads(raw)["chat_template"], "the processor's chat_template.json"
        except (json.JSONDecodeError, KeyError, TypeError):
            sys.exit(f"grpo.py: error: {path}: chat_template.json is not an object with a chat_template string")
    else:
        proc, where = read_model_file(path, "chat_template.jinja"), "the processor's chat_template.jinja"
    tok = tokenizer.chat_template
    tok = tok.get("default") if isinstance(tok, dict) else tok  # named templates: the default one
    found = [(t, w) for t, w in ((proc, where), (tok, "the tokenizer's")) if isinstance(t, str)]
    if not found:
        sys.exit(f"grpo.py: error: {path} has no chat template (no chat_template.json, chat_template.jinja or "
                 "tokenizer_config.json chat_template)")
    vision = [(t, w) for t, w in found if renders_images(tokenizer, t)]
    template, used = (vision or found)[0]
    if len({t for t, _ in found}) > 1:
        other = [w for t, w in found if t != template][0]
        print(f"grpo.py: {path}: chat template from {used} ({'handles images' if vision else 'text-only'}); "
              f"{other} differs ({'handles images' if len(vision) > 1 else 'text-only'}) and is not used")
    return template


# The base model's processor files, copied verbatim into every checkpoint, so AutoProcessor.from_pretrained,
# lmms-eval and `vllm serve` load a step dir as they load the base model (tokenizer files, image and video
# preprocessor, the processor's chat template, generation defaults).
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                   "chat_template.json", "chat_template.jinja", "generation_config.json", "tokenizer.json",
                   "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model")


def copy_processor_files(src, dst):
    """Copy PROCESSOR_FILES that the model dir or hub id src has into dst, byte for byte -> names copied."""
    from transformers.utils import cached_file
    done = []
    for name in PROCESSOR_FILES:
        f = cached_file(str(src), name, _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False)
        if f is not None:
            shutil.copyfile(f, os.path.join(dst, name))
            done.append(name)
    return done


def encode(tokenizer, image_processor, prompt, images):
    """One chat-templated prompt (the images first, then the text) -> dict of CPU tensors with a batch dim of 1:
    input_ids (1,L), attention_mask (1,L), mm_token_type_ids (1,L) (1 at image pads), pixel_values (patches, D),
    image_grid_thw (n_images, 3). Each image's single <|image_pad|> is expanded to its number of visual tokens,
    exactly what Qwen's processor does."""
    messages = [{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    vis = image_processor(images=images, return_tensors="pt")
    merge = image_processor.merge_size
    parts = text.split("<|image_pad|>")
    assert len(parts) == len(images) + 1, f"chat template gave {len(parts) - 1} image pads for {len(images)} images"
    counts = [int(g.prod()) // merge ** 2 for g in vis["image_grid_thw"]]
    text = parts[0] + "".join("<|image_pad|>" * c + p for c, p in zip(counts, parts[1:]))
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids          # (1, L)
    mm = (ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")).long()                    # (1, L)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                pixel_values=vis["pixel_values"], image_grid_thw=vis["image_grid_thw"])


def latest_checkpoint(run_dir, with_weights=False):
    """Newest complete <run_dir>/step_%06d/ (one with meta.json, which is written last), or None. with_weights: the
    newest that also holds the save_pretrained export (config.json; see --export-every), for evaluate.py."""
    if not os.path.isdir(run_dir):
        return None
    steps = [d for d in os.listdir(run_dir) if re.fullmatch(r"step_\d{6}", d)
             and os.path.isfile(os.path.join(run_dir, d, "meta.json"))
             and (not with_weights or os.path.isfile(os.path.join(run_dir, d, "config.json")))]
    return os.path.join(run_dir, max(steps)) if steps else None

# -----------------------------------------------------------------------------
# Log-probs and the GRPO loss


def completion_hidden(model, batch):
    """The decoder's last hidden states that PREDICT the completion tokens, and those tokens:
    -> hc (B, T, H), target (B, T), T = longest completion (shorter rows padded; masked by the caller)."""
    out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      mm_token_type_ids=batch["mm_token_type_ids"], pixel_values=batch["pixel_values"],
                      image_grid_thw=batch["image_grid_thw"], use_cache=False)
    h = out.last_hidden_state                                                                      # (B, L, H)
    B, L, H = h.shape
    T = int(batch["comp_len"].max())
    pos = batch["comp_start"][:, None] - 1 + torch.arange(T, device=h.device)[None]                # (B, T)
    pos = pos.clamp(max=L - 2)  # padding positions beyond a row's completion (masked later)
    hc = h.gather(1, pos[..., None].expand(B, T, H))                                               # (B, T, H)
    return hc, batch["input_ids"].gather(1, pos + 1)                                               # (B, T)


def completion_logprobs(model, batch, temperature, chunk=512):
    """log p(completion token) under logits / temperature, (B, T) fp32, without materialising (B, L, V) logits:
    the model runs to hidden states, the hidden states that predict completion tokens are gathered, and lm_head +
    log_softmax run on chunks of T (each chunk recomputed in backward, so its fp32 logits are never kept)."""
    hc, target = completion_hidden(model, batch)                                                   # (B, T, H), (B, T)
    T = target.shape[1]

    def chunk_logp(hc_, tgt_):
        logits = model.lm_head(hc_).float() / temperature                                          # (B, c, V)
        return torch.log_softmax(logits, -1).gather(-1, tgt_[..., None]).squeeze(-1)               # (B, c)
    parts = []
    for s in range(0, T, chunk):
        if torch.is_grad_enabled():
            parts.append(torch.utils.checkpoint.checkpoint(chunk_logp, hc[:, s:s + chunk], target[:, s:s + chunk],
                                                           use_reentrant=False))
        else:
            parts.append(chunk_logp(hc[:, s:s + chunk], target[:, s:s + chunk]))
    return torch.cat(parts, 1)                                                                     # (B, T)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, beta, clip_eps, num_tokens):
    """GRPO loss of one micro-batch. logp / old_logp / ref_logp / mask: (B, T); advantages: (B,); ref_logp may be
    None (beta = 0). Per token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * KL_k3, where
    KL_k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's unbiased, always >= 0 estimator of KL(pi || ref)).
    SUMMED over the micro-batch's tokens and divided by num_tokens = completion tokens of the GLOBAL batch, so
    micro-batch losses add up to the global token mean. Returns (loss, stats of summed per-token values)."""
    mask = mask.float()                                                                            # (B, T)
    ratio = torch.exp(logp - old_logp)                                                             # (B, T)
    adv = advantages[:, None]                                                                      # (B, 1)
    pg = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)                # (B, T)
    if ref_logp is None:
        kl = torch.zeros_like(logp)                                                                # (B, T)
    else:
        d = ref_logp - logp                                                                        # (B, T)
        kl = torch.exp(d) - d - 1                                                                  # (B, T)
    per_token = pg + beta * kl                                                                     # (B, T)
    loss = (per_token * mask).sum() / num_tokens                                                   # ()
    clipped = ((ratio - 1).abs() > clip_eps).float()                                               # (B, T)
    stats = dict(kl_sum=float((kl.detach() * mask).sum()), clip_sum=float((clipped * mask).sum()),
                 pg_sum=float((pg.detach() * mask).sum()))
    return loss, stats


def group_advantages(rewards, group_size, eps=1e-4):
    """rewards (N*G,) prompt-major -> (r - group mean) / (group population std + eps), (N*G,)."""
    r = torch.as_tensor(rewards, dtype=torch.float64).view(-1, group_size)                        # (N, G)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)           # (N, G)
    return adv.view(-1).float()                                                                    # (N*G,)


def collate_samples(samples, pad_id, device):
    """Training micro-batch: each sample = its prompt (unpadded) + its completion, right-padded together.
    Positions (incl. Qwen3-VL's 3-D rope) are computed from attention_mask, so they equal the sampler's."""
    seqs = [torch.cat([s["enc"]["input_ids"][0], torch.tensor(s["token_ids"], dtype=torch.long)]) for s in samples]
    L = max(len(q) for q in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)                                    # (B, L)
    att = torch.zeros_like(ids)                                                                    # (B, L)
    mm = torch.zeros_like(ids)                                                                     # (B, L)
    T = max(len(s["token_ids"]) for s in samples)
    mask = torch.zeros(len(seqs), T)                                                               # (B, T)
    for b, (q, s) in enumerate(zip(seqs, samples)):
        P = s["enc"]["input_ids"].shape[1]
        ids[b, :len(q)], att[b, :len(q)], mm[b, :P] = q, 1, s["enc"]["mm_token_type_ids"][0]
        mask[b, :len(s["token_ids"])] = 1
    return dict(input_ids=ids.to(device), attention_mask=att.to(device), mm_token_type_ids=mm.to(device),
                pixel_values=torch.cat([s["enc"]["pixel_values"] for s in samples]).to(device),
                image_grid_thw=torch.cat([s["enc"]["image_grid_thw"] for s in samples]).to(device),
                comp_start=torch.tensor([s["enc"]["input_ids"].shape[1] for s in samples], device=device),
                comp_len=torch.tensor([len(s["token_ids"]) for s in samples], device=device),
                mask=mask.to(device))

# -----------------------------------------------------------------------------
# Tasks from the pool


def read_pairs(pool_dir):
    if not os.path.isfile(os.path.join(pool_dir, "pairs.jsonl")):
        sys.exit(f"grpo.py: error: --pool {pool_dir} has no pairs.jsonl (run build_pool.py first)")
    return make_tasks.load_pairs(pool_dir)


def task_for_pair(pair, pool_dir, level, spatial, rng, max_side, n_range=(3, 5), actor=False,
                  action_step=reward.ACTION_STEP_DEG):
    """-> (task, [img1, img2]) drawn online from one pool pair, n uniform in n_range; raises TaskUnavailable.
    actor: the prompt also asks for the ActoR action block (make_tasks.build_prompt)."""
    n = int(rng.integers(n_range[0], n_range[1] + 1))
    return make_tasks.make_task(pair, make_tasks.load_arrays(pool_dir, pair), level, spatial, n, rng, pool_dir,
                                max_side, actor=actor, action_step=action_step)


def sample_tasks(cur, pairs_by_bin, count, rng, args):
    """count tasks: the curriculum picks ONE (bin, level, spatial) for the step (so the step's one update feeds
    one stage window and the bin window once: the paper's 20-step average), a random train pair of that bin
    supplies each task (other pairs of the bin are tried when one cannot supply the level)."""
    out = []
    b, level, spatial = cur.sample(rng)
    while len(out) < count:
        candidates = pairs_by_bin[b]
        for k in rng.permutation(len(candidates)):
            try:
                task, images = task_for_pair(candidates[k], args.pool, level, spatial, rng, args.max_side,
                                             (args.n_min, args.n_max), args.actor, args.action_step)
            except make_tasks.TaskUnavailable:
                continue
            out.append((task, images))
            break
        else:
            raise SystemExit(f"grpo.py: error: no train pair of bin {b} can supply level {level} / {spatial}")
    return out


def score(text, task, args):
    if args.toy_reward:  # share of digit characters: a trivially learnable signal (learning test only)
        r = sum(c.isdigit() for c in text) / max(1, len(text))
        return dict(format=0.0, match=0.0, reward=r, action=None)
    # ActoR: + w_action * action accuracy (None where the pair has no pose), angle tolerance = the rounding step
    s = reward.score(text, task, w_action=args.w_action if args.actor else 0.0, action_tol=args.action_step)
    return dict(format=s["format"], match=s["match"], reward=s["reward"], action=s.get("action"))

# -----------------------------------------------------------------------------
# Distributed setup, sharding, checkpoints


def setup_distributed(timeout_min=60):
    """RANK / WORLD_SIZE from torchrun (absent: 1 process). gloo on CPU, nccl on GPU. timeout_min: how long a
    collective may wait (torch's default, 10 min, is shorter than an 8B export or a long eval at 5,120 tokens)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_min))
    return rank, world, device


def shard(model, device):
    """FSDP2: one unit per vision block and per decoder layer, the rest in the root. bf16 compute on GPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
        else MixedPrecisionPolicy()
    for block in list(model.model.visual.blocks) + list(model.model.language_model.layers):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # completion_logprobs calls model.model and model.lm_head directly: make it a root forward for FSDP
    model.logprobs = types.MethodType(lambda self, batch, t: completion_logprobs(self, batch, t), model)
    register_fsdp_forward_method(model, "logprobs")
    # likewise pasta.pasta_term (the vision tower alone, or one more forward of the prompt for --pasta-layer >= 1)
    model.pasta = types.MethodType(lambda self, *a, **k: pasta.pasta_term(self, *a, **k), model)
    register_fsdp_forward_method(model, "pasta")
    return model


def load_sharded(path, device, dtype, rank, world, prepare):
    """-> (model, tokenizer, image processor); prepare(model) sets modes / grad checkpointing / requires_grad before
    sharding. 1 process: load_policy. world > 1: only rank 0 reads the weights (from_pretrained, so transformers'
    key conversions apply); every rank builds the model from the config on the meta device (no memory), shards
    it, allocates its shard, and rank 0's full state is broadcast into the shards. Peak host RAM: one full copy on
    rank 0, the shards elsewhere (was: the full model on every rank, and on every GPU before sharding)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    if world == 1:
        model, tokenizer, image_processor = load_policy(path, device, dtype)
        prepare(model)
        return model, tokenizer, image_processor
    full, buffers, meta = {}, {}, [None]
    if rank == 0:
        src, tokenizer, image_processor = load_policy(path, "cpu", dtype)
        full = src.state_dict()
        # non-persistent buffers (the rotary inv_freq) are not in the state dict: sent from rank 0 below
        buffers = {n: b for n, b in src.named_buffers() if n not in full}
        meta = [(src.config, src.generation_config, sorted(buffers))]
        del src
    dist.broadcast_object_list(meta, src=0)  # config + generation config: ranks > 0 read no weight file
    if rank != 0:
        tokenizer, image_processor = load_processors(path)
    config, generation_config, buffer_names = meta[0]
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.generation_config = generation_config
    prepare(model)
    model = shard(model, device)
    model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    bufs = dict(model.named_buffers())
    for name in buffer_names:  # to_empty left them uninitialised
        if rank == 0:
            bufs[name].copy_(buffers[name])
        dist.broadcast(bufs[name], 0)
    model.tie_weights()  # a no-op unless tie_word_embeddings (to_empty may have split the tied pair)
    return model, tokenizer, image_processor


def all_sum(x, world):
    t = torch.tensor(float(x), dtype=torch.float64)
    if world > 1:
        t = t.to("cuda") if dist.get_backend() == "nccl" else t
        dist.all_reduce(t)
    return float(t)


def gather_objects(obj, world):
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def rng_state(task_rng):
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                task=task_rng.bit_generator.state)


def set_rng_state(s, task_rng):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None:
        torch.cuda.set_rng_state_all(s["cuda"])
    task_rng.bit_generator.state = s["task"]


def save_checkpoint(step, model, opt, sched, cur, task_rng, tokenizer, image_processor, args, rank, world, pending):
    """step_%06d.tmp/ -> step_%06d/. Each rank writes its own shard of the weights and the optimizer state
    (torch.distributed.checkpoint, dcp/) and its RNG state; rank 0 the scheduler, curriculum, the base model's
    processor files (copy_processor_files; our tokenizer / image processor saved only where the base lacks them)
    and (--export-every) a bf16 save_pretrained export; meta.json last, then the rename. With
    --async-save the shards are written in the background and pending (a dict) holds the unfinished save, which
    finish_save completes (the main loop calls it one step later)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    finish_save(pending, args, rank, world)
    final = os.path.join(args.out, f"step_{step:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if world > 1:
        dist.barrier()
    if args.export_every == 0 or step % args.export_every == 0 or step == args.steps:
        export_weights(model, tmp, rank)
    torch.save(rng_state(task_rng), os.path.join(tmp, f"rng_{rank}.pt"))
    if rank == 0:  # after export_weights: the base's generation_config.json replaces the one save_pretrained wrote
        copied = copy_processor_files(args.model, tmp)
        if not {"tokenizer.json", "tokenizer_config.json"} & set(copied):  # a base without them: save ours
            tokenizer.save_pretrained(tmp)
        if "preprocessor_config.json" not in copied:
            image_processor.save_pretrained(tmp)
        torch.save(sched.state_dict(), os.path.join(tmp, "scheduler.pt"))
        with open(os.path.join(tmp, "curriculum.json"), "w") as f:
            json.dump(cur.state_dict(), f)
    msd, osd = get_state_dict(model, opt)  # this rank's shards (DTensors) when sharded, no gather
    state = dict(model=msd, optim=osd)
    pending.update(step=step, tmp=tmp, final=final)
    if args.async_save:  # staged to CPU here, written by a thread; its own process group for its collectives
        if world > 1 and "group" not in pending:
            pending["group"] = dist.new_group(backend="gloo")
        pending["future"] = dcp.async_save(state, checkpoint_id=os.path.join(tmp, "dcp"),
                                           process_group=pending.get("group"))
    else:
        dcp.save(state, checkpoint_id=os.path.join(tmp, "dcp"))
        finish_save(pending, args, rank, world)


def finish_save(pending, args, rank, world):
    """Completes the save in pending (if any): waits for its shards on every rank, then rank 0 writes meta.json
    (its presence marks a complete checkpoint), renames step_%06d.tmp/ and prunes to --keep-last."""
    if "tmp" not in pending:
        return
    if "future" in pending:
        pending.pop("future").result()
    if world > 1:
        dist.barrier()
    step, tmp, final = pending.pop("step"), pending.pop("tmp"), pending.pop("final")
    if rank == 0:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(dict(step=step, world_size=world, args=vars(args)), f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        done = sorted(d for d in os.listdir(args.out) if re.fullmatch(r"step_\d{6}", d))
        for d in done[:-args.keep_last] if args.keep_last > 0 else []:
            shutil.rmtree(os.path.join(args.out, d))
    if world > 1:
        dist.barrier()


def export_weights(model, out_dir, rank):
    """A plain bf16 save_pretrained copy of the weights in out_dir (config.json + model.safetensors) for
    evaluate.py / transformers. One tensor at a time is gathered (a collective: every rank calls this); only
    rank 0 keeps them, so its host RAM peak is the bf16 model (16 GiB at 8B), not the fp32 one."""
    full = {}
    for name, t in model.state_dict().items():
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        if rank == 0:
            full[name] = t.detach().to("cpu", torch.bfloat16 if t.is_floating_point() else t.dtype).contiguous()
    if rank == 0:
        model.save_pretrained(out_dir, state_dict=full)
        config = copy.deepcopy(model.config)  # save_pretrained wrote the model's fp32 dtype: say what the file holds
        for c in [config] + [getattr(config, k) for k in config.sub_configs]:
            c.dtype = "bfloat16"
        config.save_pretrained(out_dir)


def load_training_state(ckpt, model, opt, sched, cur, task_rng, args, rank, world):
    """Restores weights + optimizer state (each rank reads its shards; a checkpoint of another world size is
    resharded by torch.distributed.checkpoint), scheduler, curriculum and RNG -> the step done. Another world size
    uses rank 0's RNG (ranks > 0 reseeded), so that run is not byte-identical to an uninterrupted one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    with open(os.path.join(ckpt, "meta.json")) as f:
        meta = json.load(f)
    if not os.path.isdir(os.path.join(ckpt, "dcp")):
        sys.exit(f"grpo.py: error: {ckpt} has no dcp/ (weights + optimizer shards): written by an older grpo.py; "
                 f"start a new run from its weights with --model {ckpt}")
    msd, osd = get_state_dict(model, opt)
    state = dict(model=msd, optim=osd)
    dcp.load(state, checkpoint_id=os.path.join(ckpt, "dcp"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sched.load_state_dict(torch.load(os.path.join(ckpt, "scheduler.pt"), weights_only=False))
    with open(os.path.join(ckpt, "curriculum.json")) as f:
        for note in cur.load_state_dict(json.load(f)):  # an older checkpoint's curriculum state is migrated
            print0(f"grpo.py: {ckpt}/curriculum.json: {note}")
    saved_world = meta.get("world_size", 1)
    same = saved_world == world
    set_rng_state(torch.load(os.path.join(ckpt, f"rng_{rank if same else 0}.pt"), weights_only=False), task_rng)
    if not same:
        if rank > 0:  # rank 0's python / numpy / torch state on every rank would sample the same completions
            s = args.seed + 1000 * meta["step"] + rank
            random.seed(s)
            np.random.seed(s)
            torch.manual_seed(s)
        print0(f"grpo.py: resuming a {saved_world}-process checkpoint on {world} process(es): weights and optimizer "
               f"resharded, rank 0's RNG state used; the run is NOT byte-identical to an uninterrupted one")
    return meta["step"]


def truncate_jsonl(path, last_step):
    """Drop lines of steps after the checkpoint we resume from (they will be redone)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(keep)

# -----------------------------------------------------------------------------
# Training


@contextlib.contextmanager
def generation_mode(model):
    """The policy in eval mode while it generates, then back in its mode: in train mode with gradient checkpointing
    transformers switches the KV cache off, and generate needs the prefill's cache."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def rollout(model, tokenizer, image_processor, tasks, args, synced):
    """Generate G completions per task, score them -> list of samples (prompt-major)."""
    encs = [encode(tokenizer, image_processor, task["prompt"], images) for task, images in tasks]
    samples = []
    for i in range(0, len(encs), args.rollout_batch):  # prompts per generate call (each with its G completions)
        outs = generate(model, tokenizer, encs[i:i + args.rollout_batch], args.max_new_tokens, args.temperature,
                        greedy=False, group_size=args.group_size, synced_gpus=synced)
        for j, o in enumerate(outs):
            k = i + j // args.group_size
            samples.append(dict(o, enc=encs[k], task=tasks[k][0], **score(o["text"], tasks[k][0], args)))
    return samples


def train_on(samples, model, ref_model, opt, args, device, world, autocast, pairs_by_id=None):
    """One (or --ppo-epochs) AdamW step(s) on this rank's samples; returns summed stats for logging.
    With --pasta-weight w > 0 the loss of each step is GRPO loss + w * mean over the step's prompts (all ranks) of
    pasta.pasta_term (pairs_by_id: pool pair_id -> pairs.jsonl row, for the pair's dense matches)."""
    adv = group_advantages([s["reward"] for s in samples], args.group_size)                       # (N,)
    n_tok = all_sum(sum(len(s["token_ids"]) for s in samples), world)  # global completion tokens
    mbs = [list(range(i, min(i + args.micro_batch, len(samples)))) for i in range(0, len(samples), args.micro_batch)]
    batches = [collate_samples([samples[i] for i in mb], args.pad_id, device) for mb in mbs]
    def logprob_fn(m, b):  # the FSDP-registered method when sharded (see shard())
        return m.logprobs(b, args.temperature) if hasattr(m, "logprobs") else completion_logprobs(m, b, args.temperature)

    def pasta_fn(m, *a, **k):
        return m.pasta(*a, **k) if hasattr(m, "pasta") else pasta.pasta_term(m, *a, **k)
    prompts = samples[::args.group_size] if args.pasta_weight > 0 else []  # samples are prompt-major
    n_prompts = all_sum(len(prompts), world) if prompts else 0
    # each prompt's pool pair and its dense matches, loaded once (not again in every --ppo-epochs pass)
    pasta_pairs = [pairs_by_id[s["task"]["pair_id"]] for s in prompts]
    pasta_pairs = [(pair, make_tasks.load_arrays(args.pool, pair)) for pair in pasta_pairs]
    with torch.no_grad(), autocast():
        ref = [logprob_fn(ref_model, b) if ref_model is not None else None for b in batches]
        old = [logprob_fn(model, b) for b in batches] if args.ppo_epochs > 1 else None
    stats = dict(kl_sum=0.0, clip_sum=0.0, dlogp_sum=0.0, loss=0.0, pasta_sum=0.0, pasta_acc_sum=0.0,
                 pasta_acc_n=0.0)
    for epoch in range(args.ppo_epochs):
        for k, (mb, b) in enumerate(zip(mbs, batches)):
            with autocast():
                logp = logprob_fn(model, b)                                             # (B, T)
            old_k = old[k] if old is not None else logp.detach()  # ratio 1 with one update per batch
            loss, st = grpo_loss(logp, old_k, ref[k], adv[mb].to(device), b["mask"], args.kl_beta, args.clip_eps,
                                 n_tok)
            # FSDP2 averages gradients over ranks; x world makes the result the global-token-normalised sum
            (loss * world).backward()
            stats["loss"] += loss.item()
            if epoch == 0:
                stats["kl_sum"] += st["kl_sum"]
                stats["clip_sum"] += st["clip_sum"]
                sampler = torch.zeros_like(b["mask"])                                              # (B, T)
                for r, i in enumerate(mb):
                    sampler[r, :len(samples[i]["logprobs"])] = torch.tensor(samples[i]["logprobs"])
                stats["dlogp_sum"] += float(((logp.detach().float() - sampler).abs() * b["mask"]).sum())
        for s, (pair, arrays) in zip(prompts, pasta_pairs):  # PaStA: one vision forward per prompt, normalised by
            with autocast():                                  # the global prompt count
                pl, pst = pasta_fn(model, s["enc"], arrays, pair, n=args.pasta_grid, layer=args.pasta_layer,
                                   tau=args.pasta_tau)
            (pl * args.pasta_weight / n_prompts * world).backward()  # x world: FSDP2 averages over ranks
            if epoch == 0:
                stats["pasta_sum"] += pst["pasta_loss"]
                if np.isfinite(pst["pasta_acc"]):  # nan: the pair has no corresponding cells
                    stats["pasta_acc_sum"] += pst["pasta_acc"]
                    stats["pasta_acc_n"] += 1
        if args.debug_grad_dump:
            return stats, n_tok
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return stats, n_tok


def debug_dump(path, model, ref_model, opt, task_rng, tokenizer, image_processor, eval_tasks, args, rank, world):
    """--debug-dump (tests): after loading / resuming, rank 0 saves its RNG state, the greedy eval rows of the policy
    and the reference (evaluate_match) and the full model and optimizer state."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    rng = rng_state(task_rng)  # before anything else runs

    def rows(m):
        return None if m is None else evaluate_match(m, tokenizer, image_processor, eval_tasks, args, rank, world)[1]
    out = dict(rng=rng, policy=rows(model), ref=rows(ref_model), model=get_model_state_dict(model, options=opts),
               optim=get_optimizer_state_dict(model, opt, options=opts))
    if rank == 0:
        torch.save(out, path)


def dump_grads(model, path, rank):
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()
        grads[name] = None if g is None else g.detach().cpu().clone()
    if rank == 0:
        torch.save(grads, path)


@torch.no_grad()
def evaluate_match(model, tokenizer, image_processor, eval_tasks, args, rank, world):
    """Greedy match accuracy on the fixed held-out tasks, split over the ranks (task k on rank k % world) and
    gathered -> (mean match, rows: task_id, rank, text, token_ids, logprobs, match; every rank gets all rows).
    FSDP needs every rank to issue the same collectives: each rank's share is padded to the same length with
    copies of a task whose results are dropped; with --rollout-impl legacy generate runs with synced_gpus (ranks
    stop together), with resident the weights are gathered once for the whole eval."""
    if not eval_tasks:
        return float("nan"), []
    per_rank = -(-len(eval_tasks) // world)
    mine = list(range(rank, len(eval_tasks), world))
    padded = mine + [mine[0] if mine else 0] * (per_rank - len(mine))  # the copies get weight 0 (dropped)
    encs = [encode(tokenizer, image_processor, eval_tasks[k][0]["prompt"], eval_tasks[k][1]) for k in padded]
    with generation_mode(model), resident(model, args.rollout_impl):  # weights gathered once for the whole eval
        outs = generate(model, tokenizer, encs, args.max_new_tokens, 1.0, greedy=True, synced_gpus=world > 1)
    rows = [dict(task_id=eval_tasks[k][0].get("task_id", k), index=k, rank=rank, text=o["text"],
                 token_ids=o["token_ids"], logprobs=o["logprobs"],
                 match=reward.score(o["text"], eval_tasks[k][0])["match"]) for k, o in zip(mine, outs)]
    rows = sorted((r for part in gather_objects(rows, world) for r in part), key=lambda r: r["index"])
    return float(np.mean([r["match"] for r in rows])), rows


# -----------------------------------------------------------------------------
# The run, in the order main() calls it: arguments, seeds, data, models, logs, then one step at a time


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo_data/tiny-qwen3vl", help="policy init: local dir or hub id")
    ap.add_argument("--pool", default="pool", help="build_pool.py output (pairs.jsonl + npz)")
    ap.add_argument("--out", default="runs/grpo")
    ap.add_argument("--group-size", type=int, default=4, help="G completions per prompt (paper 32)")
    ap.add_argument("--prompts-per-step", type=int, default=4, help="prompts per step, all ranks (paper 16)")
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    ap.add_argument("--rollout-batch", type=int, default=4, help="prompts per generate call on a rank")
    ap.add_argument("--rollout-impl", default="resident", choices=["resident", "legacy"],
                    help="resident: weights gathered once per rollout, StaticCache written in place (rollout.py); "
                         "legacy: FSDP gathers per token, DynamicCache concatenated (benchmark, tests)")
    ap.add_argument("--kl-beta", type=float, default=0.005, help="KL coefficient (paper 0.005); 0: no reference model")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="paper 5120")
    ap.add_argument("--temperature", type=float, default=1.0, help="rollout temperature (paper 1.0)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW lr (paper 1e-6; the random tiny model needs more)")
    ap.add_argument("--warmup-steps", type=int, default=10, help="linear lr warm-up, then constant (paper 10)")
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--resume", action="store_true", help="continue from the latest complete <out>/step_*/")
    ap.add_argument("--save-every", type=int, default=10)
    ap.add_argument("--keep-last", type=int, default=3, help="checkpoints kept (0 keeps all)")
    ap.add_argument("--export-every", type=int, default=0,
                    help="bf16 save_pretrained export in a checkpoint whose step is a multiple of this, and the "
                         "last one (0: in every checkpoint)")
    ap.add_argument("--async-save", action="store_true",
                    help="write the checkpoint shards in the background (the step dir appears one step later)")
    ap.add_argument("--dist-timeout-min", type=float, default=60,
                    help="minutes a collective may wait before the run fails (torch's default is 10)")
    ap.add_argument("--eval-every", type=int, default=10, help="greedy match accuracy on held-out tasks (0: off)")
    ap.add_argument("--eval-tasks", type=int, default=4, help="number of held-out test-split tasks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--curriculum", default="dcrl", choices=["dcrl", "uniform", "easy", "hard"])
    ap.add_argument("--inner-on-new-bin", default="carry", choices=curriculum.INNER_ON_NEW_BIN,
                    help="dcrl: unlocked point stages stay unlocked on the next bin (carry) or start over (restart)")
    ap.add_argument("--max-steps-per-bin", type=int, default=0,
                    help="dcrl: force the next bin after this many steps on one (0 = off, the paper)")
    ap.add_argument("--ppo-epochs", type=int, default=1, help="updates per batch (>1 makes the clip active)")
    ap.add_argument("--clip-eps", type=float, default=0.2)
    ap.add_argument("--max-side", type=int, default=640, help="longest side of the prompted images")
    ap.add_argument("--n-min", type=int, default=3, help="points in image 1 per task, uniform in [n-min, n-max]")
    ap.add_argument("--n-max", type=int, default=5, help="(make_tasks.py's choice for real runs: 4..12)")
    ap.add_argument("--pasta-weight", type=float, default=0.0, help="HATCH PaStA loss weight (0: off)")
    ap.add_argument("--pasta-grid", type=int, default=4, help="PaStA cells per side (HATCH's best: 4)")
    ap.add_argument("--pasta-layer", type=int, default=0,
                    help="PaStA features: 0 the vision merger's output, k decoder layer k")
    ap.add_argument("--pasta-tau", type=float, default=0.1, help="PaStA InfoNCE temperature")
    ap.add_argument("--actor", action="store_true", help="HATCH ActoR: prompts ask for the camera motion block")
    ap.add_argument("--w-action", type=float, default=0.5, help="ActoR: reward += w-action * action accuracy")
    ap.add_argument("--action-step", type=float, default=reward.ACTION_STEP_DEG,
                    help="ActoR: angles rounded to multiples of this (degrees); also the reward's tolerance")
    ap.add_argument("--toy-reward", action="store_true", help="reward = share of digits in the text (tests)")
    ap.add_argument("--wandb", default=None, help="wandb project name (imported only when given)")
    ap.add_argument("--plan", action="store_true",
                    help="print the per-GPU memory plan of this run (from --model's config.json) and exit")
    ap.add_argument("--gpus", type=int, default=8, help="--plan: GPUs (FSDP2 shards over all of them)")
    ap.add_argument("--gpu-mem-gib", type=float, default=80, help="--plan: memory per GPU, GiB")
    ap.add_argument("--model-config", default=None, help="--plan: a config.json to read instead of --model's")
    ap.add_argument("--plan-device", default="cuda", choices=["cuda", "cpu"],
                    help="--plan: cuda (bf16 compute and reference) or cpu (fp32, as grpo.py runs on CPU)")
    ap.add_argument("--debug-grad-dump", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--stop-after-step", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--debug-dump", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def print_plan(args):
    """--plan: the per-GPU memory budget of this run from the model's config.json alone (rollout.format_plan)."""
    text, _ = format_plan(args)
    print(text)


def print0(*a, **k):
    """print on rank 0 only (RANK from torchrun, as in setup_distributed)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k)


def seed_everything(seed, rank, same_sampling=False):
    """Seeds python / numpy / torch per rank (so sampling differs per rank; same_sampling: every rank samples the
    same, for --debug-grad-dump) -> the task sampler, identical on every rank: every rank draws the global prompts."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + (0 if same_sampling else rank))
    return np.random.default_rng(seed)


def load_data(args):
    """-> pairs_by_id (pair_id -> pairs.jsonl row), pairs_by_bin (bin -> train pairs), the curriculum over those
    bins, eval_tasks (fixed held-out tasks from test pairs; empty with --eval-every 0)."""
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
    eval_rng = np.random.default_rng(args.seed + 12345)
    test_pairs = [p for p in pairs if p["split"] == "test"]
    eval_tasks = []
    for k in range(min(args.eval_tasks, len(test_pairs)) if args.eval_every > 0 else 0):
        try:
            eval_tasks.append(task_for_pair(test_pairs[k], args.pool, ("L1", "L2", "L3")[k % 3], "sparse",
                                            eval_rng, args.max_side, (args.n_min, args.n_max), args.actor,
                                            args.action_step))
        except make_tasks.TaskUnavailable:
            continue
    return pairs_by_id, pairs_by_bin, cur, eval_tasks


def load_models(args, device, rank, world):
    """-> policy (--model; fp32, in train mode; a resumed run overwrites its weights from the checkpoint), frozen
    reference (--model; None with --kl-beta 0), tokenizer, image processor. Both FSDP2-sharded when world > 1, and
    then only rank 0 reads the weight files (load_sharded)."""
    def prepare_policy(m):
        m.train()
        if args.grad_checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model, tokenizer, image_processor = load_sharded(args.model, device, torch.float32, rank, world, prepare_policy)
    args.pad_id = tokenizer.pad_token_id
    ref_model = None
    if args.kl_beta > 0:
        ref_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        ref_model = load_sharded(args.model, device, ref_dtype, rank, world,
                                 lambda m: m.eval().requires_grad_(False))[0]
    return model, ref_model, tokenizer, image_processor


def make_optimizer(model, args):
    """AdamW and the learning-rate schedule: linear warm-up over --warmup-steps, then constant."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    return opt, sched


def resume(ckpt, args, model, opt, sched, cur, task_rng, rank, world):
    """Restores optimizer, scheduler, curriculum and RNG state from ckpt (None: a fresh run) -> the step done."""
    if ckpt is not None:
        start = load_training_state(ckpt, model, opt, sched, cur, task_rng, args, rank, world)
        print0(f"resumed from {ckpt} (step {start})")
        return start
    if args.resume:
        print0(f"--resume: no complete checkpoint in {args.out}, starting fresh")
    return 0


def open_logs(args, ckpt, start, rank):
    """rank 0: rollouts.jsonl / metrics.jsonl cut back to step `start` when resuming (else removed), args.json
    written, wandb started (--wandb). -> the wandb run or None."""
    if rank != 0:
        return None
    for name in ("rollouts.jsonl", "metrics.jsonl"):
        if ckpt is not None:
            truncate_jsonl(os.path.join(args.out, name), start)
        elif os.path.exists(os.path.join(args.out, name)):
            os.remove(os.path.join(args.out, name))
    with open(os.path.join(args.out, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2)
    if not args.wandb:
        return None
    import wandb
    return wandb.init(project=args.wandb, config=vars(args))


def autocast_for(device, world):
    """bf16 autocast on 1 GPU (FSDP2's mixed precision does it when sharded); off on CPU."""
    if device.type == "cuda" and world == 1:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return lambda: torch.autocast("cpu", enabled=False)


def train_step(step, model, ref_model, tokenizer, image_processor, opt, sched, cur, task_rng, pairs_by_bin,
               pairs_by_id, args, rank, world, device):
    """One GRPO step: sample the global prompts -> roll out this rank's share -> rewards, advantages, loss,
    backward, AdamW (train_on) -> ONE curriculum update from all ranks' samples.
    -> (metrics, records), or (None, None) with --debug-grad-dump once the gradients are written."""
    autocast = autocast_for(device, world)
    per_rank = args.prompts_per_step // world
    tasks = sample_tasks(cur, pairs_by_bin, args.prompts_per_step, task_rng, args)  # same on every rank
    stage = tuple(tasks[0][0][k] for k in ("bin", "level", "spatial"))  # the step's draw (cur.sample)
    mine = tasks if args.debug_grad_dump else tasks[rank * per_rank:(rank + 1) * per_rank]
    with generation_mode(model), resident(model, args.rollout_impl), autocast():  # weights gathered once per rollout
        samples = rollout(model, tokenizer, image_processor, mine, args, world > 1)
    if args.debug_grad_dump:  # every rank holds the whole batch; train on this rank's share of it
        n = len(samples) // world
        samples = samples[rank * n:(rank + 1) * n]
    stats, n_tok = train_on(samples, model, ref_model, opt, args, device, world, autocast, pairs_by_id)
    if args.debug_grad_dump:
        dump_grads(model, args.debug_grad_dump, rank)
        print0(f"grpo.py: gradients of step {step} written to {args.debug_grad_dump}")
        return None, None
    sched.step()

    # gather per-sample records to every rank (the curriculum must advance identically everywhere)
    records = [dict(step=step, task_id=s["task"].get("task_id"), pair_id=s["task"].get("pair_id"),
                    bin=s["task"].get("bin"), level=s["task"].get("level"), spatial=s["task"].get("spatial"),
                    n=s["task"]["n"], m=s["task"]["m"], text=s["text"], reward=s["reward"], format=s["format"],
                    match=s["match"], action=s["action"], length=len(s["token_ids"]), truncated=s["truncated"])
               for s in samples]
    records = [r for part in gather_objects(records, world) for r in part]
    # ONE curriculum update per step (its windows count steps, as the paper's 20-step moving average): the mean
    # match of this step's prompts (a replay draw of a mastered bin is ignored by update)
    events = cur.update(*stage, float(np.mean([r["match"] for r in records])))  # every prompt is from `stage`
    return step_metrics(step, records, stats, n_tok, sched, cur, events, args, world), records


def step_metrics(step, records, stats, n_tok, sched, cur, events, args, world):
    """The step's metrics line: means over all ranks' records, token-normalised kl / dlogp, HATCH extras."""
    totals = [all_sum(stats[k], world)
              for k in ("kl_sum", "dlogp_sum", "pasta_sum", "pasta_acc_sum", "pasta_acc_n")]
    m = dict(step=step, reward=np.mean([r["reward"] for r in records]),
             format=np.mean([r["format"] for r in records]), match=np.mean([r["match"] for r in records]),
             kl=totals[0] / n_tok, length=np.mean([r["length"] for r in records]),
             truncated=np.mean([r["truncated"] for r in records]), dlogp=totals[1] / n_tok,
             lr=sched.get_last_lr()[0], curriculum=list(cur.current()), curriculum_events=events)
    if args.actor and not args.toy_reward:  # mean action accuracy of the completions whose pair has a pose
        acts = [r["action"] for r in records if r["action"] is not None]
        m["action"] = np.mean(acts) if acts else float("nan")
    if args.pasta_weight > 0:  # mean PaStA loss over the step's prompts; cell accuracy over prompts with cells
        m["pasta"] = totals[2] / (len(records) // args.group_size)
        m["pasta_acc"] = totals[3] / totals[4] if totals[4] else float("nan")
    return m


def log_step(m, records, args, rank, run):
    """rank 0: appends to rollouts.jsonl and metrics.jsonl, logs to wandb, prints the step line and the
    curriculum's events."""
    m = {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in m.items()}
    if rank != 0:
        return
    with open(os.path.join(args.out, "rollouts.jsonl"), "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(m) + "\n")
    if run is not None:
        run.log({k: v for k, v in m.items() if k not in ("curriculum", "curriculum_events")}, step=m["step"])
    ev = f" | eval match {m['eval_match']:.3f}" if "eval_match" in m else ""
    hatch = (f" | action {m['action']:.2f}" if "action" in m else "") + \
            (f" | pasta {m['pasta']:.3f} acc {m['pasta_acc']:.2f}" if "pasta" in m else "")
    print(f"step {m['step']:5d} | reward {m['reward']:.3f} | format {m['format']:.2f} | match {m['match']:.3f} | "
          f"kl {m['kl']:.2e} | len {m['length']:.1f} | trunc {m['truncated']:.2f} | |dlogp| {m['dlogp']:.1e}"
          f"{hatch} | "
          f"bin {m['curriculum'][0]} {m['curriculum'][1]} {m['curriculum'][2]}{ev} | {m['seconds']:.1f}s")
    for e in m["curriculum_events"]:
        print(f"step {m['step']:5d} | curriculum: {e}")


def main(argv=None):
    args = parse_args(argv)
    if args.plan:  # the memory plan only: no pool, no weights, no processes
        return print_plan(args)
    rank, world, device = setup_distributed(args.dist_timeout_min)
    if args.prompts_per_step % world:
        sys.exit(f"grpo.py: error: --prompts-per-step {args.prompts_per_step} not divisible by {world} processes")
    os.makedirs(args.out, exist_ok=True)
    task_rng = seed_everything(args.seed, rank, same_sampling=bool(args.debug_grad_dump))
    pairs_by_id, pairs_by_bin, cur, eval_tasks = load_data(args)
    ckpt = latest_checkpoint(args.out) if args.resume else None
    model, ref_model, tokenizer, image_processor = load_models(args, device, rank, world)
    opt, sched = make_optimizer(model, args)
    start = resume(ckpt, args, model, opt, sched, cur, task_rng, rank, world)
    if args.debug_dump:
        debug_dump(args.debug_dump, model, ref_model, opt, task_rng, tokenizer, image_processor, eval_tasks, args, rank,
                   world)
    run = open_logs(args, ckpt, start, rank)
    pending = {}  # an unfinished --async-save

    for step in range(start + 1, args.steps + 1):
        t0 = time.time()
        m, records = train_step(step, model, ref_model, tokenizer, image_processor, opt, sched, cur, task_rng,
                                pairs_by_bin, pairs_by_id, args, rank, world, device)
        if m is None:  # --debug-grad-dump: this step's gradients are written, nothing more to do
            if world > 1:
                dist.destroy_process_group()
            return
        if args.eval_every > 0 and step % args.eval_every == 0:
            m["eval_match"] = evaluate_match(model, tokenizer, image_processor, eval_tasks, args, rank, world)[0]
        m["seconds"] = time.time() - t0
        log_step(m, records, args, rank, run)
        finish_save(pending, args, rank, world)  # the previous step's --async-save
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(step, model, opt, sched, cur, task_rng, tokenizer, image_processor, args, rank, world,
                            pending)
        if args.stop_after_step is not None and step >= args.stop_after_step:
            sys.stdout.flush()
            os._exit(17)  # a hard crash: no clean-up, no destructors
    finish_save(pending, args, rank, world)
    if world > 1:
        dist.destroy_process_group()
    print0(f"grpo.py: {args.steps - start} steps done -> {latest_checkpoint(args.out) if rank == 0 else ''}")


if __name__ == "__main__":
    main()
