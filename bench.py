"""
bench.py: measure the hot paths of widematch against straightforward versions of them, grpo.py's two rollout
engines against each other, and where one GRPO step's time goes. Every comparison first checks that both versions
give the SAME answer and stops with an error (non-zero exit) when they do not, so a speed-up can never hide a wrong
result.

Usage:
    python bench.py all --quick                 # CPU, everything but plan-check and gpu, ~4 min: the report's numbers
    python bench.py plan-check                  # grpo.py --plan vs the measured peak of one CPU step (~3 min)
    python bench.py rollout-engine --quick --threads 1   # HF generate vs colocated vLLM, same model/prompts/G (~1 min)
    python bench.py gpu --out bench/gpu.json    # 1 GPU, <= 8 min, no network: the first GPU any task is lent
Commands: logprobs, rollout, pool, step, rollout-fsdp, plan-check, rollout-engine, gpu, all.

Reads nothing (builds its own random models and synthetic scenes). Writes --out (default bench/results.json):
machine, date, vars(args) and one section per command with the raw numbers; prints small tables whose rows end
in "ok" or "MISSED". Only ratios are claims: both versions run side by side in one process.

Details (every command, what it measures, its target, --threads): docs/bench.md; the measured numbers:
docs/performance.md.
"""
import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import types

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import build_pool
import grpo
import make_tasks
from widematch import rollout
import synthetic
import tiny_model
from widematch import model_io

VOCAB = 151936  # Qwen3-VL's vocabulary (embedding rows)


class Mismatch(RuntimeError):
    """The fast and the straightforward version disagree: the benchmark is void."""

# -----------------------------------------------------------------------------
# Measuring


def cuda_sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _proc_status_mb(key):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024


class PeakMemory:
    """Extra peak memory (MiB) of the code inside `with`, above the level at entry. GPU: max_memory_allocated.
    CPU: the kernel's resident-set high-water mark (VmHWM), reset to the current RSS by writing 5 to
    /proc/self/clear_refs (Linux >= 4.0); tensors this large are mmap'ed by malloc, so freed ones leave RSS."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2 ** 20
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError as e:
                sys.exit(f"bench.py: error: CPU peak memory needs a writable /proc/self/clear_refs (Linux): {e}")
            self.base = _proc_status_mb("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2 ** 20 - self.base
        else:
            self.mb = _proc_status_mb("VmHWM") - self.base


def timed(fn, *a, **k):
    """-> (result, seconds)."""
    cuda_sync()
    t0 = time.perf_counter()
    out = fn(*a, **k)
    cuda_sync()
    return out, time.perf_counter() - t0


def print_table(title, rows, cols):
    """rows: list of dicts; cols: list of (key, header, format)."""
    print(f"\n{title}")
    cells = [[h for _, h, _ in cols]] + [[("-" if r.get(k) is None else fmt.format(r[k])) for k, _, fmt in cols]
                                         for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    for i, c in enumerate(cells):
        print("  " + "  ".join(s.rjust(w) for s, w in zip(c, widths)))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def verdict(ok):
    return "ok" if ok else "MISSED"

# -----------------------------------------------------------------------------
# 1) logprobs: chunked completion log-probs vs the naive full-vocabulary log_softmax


class _FixedHidden(torch.nn.Module):
    """Stands in for model.model: returns given hidden states (B, L, H), as the transformer trunk would."""

    def __init__(self, h):
        super().__init__()
        self.h = h

    def forward(self, **batch):
        return types.SimpleNamespace(last_hidden_state=self.h)


class LMHeadOnly(torch.nn.Module):
    """The smallest object model_io.completion_logprobs accepts: .model(...) -> last_hidden_state and .lm_head."""

    def __init__(self, h, vocab, dtype):
        super().__init__()
        self.model = _FixedHidden(h)
        self.lm_head = torch.nn.Linear(h.shape[-1], vocab, bias=False, device=h.device, dtype=dtype)
        self.lm_head.weight.requires_grad_(False)


def naive_logprobs(model, batch, temperature):
    """What one writes first: logits for every completion position at once, then log_softmax over the full
    vocabulary in fp32 and a gather. The positions and targets come from model_io.completion_hidden, as in
    model_io.completion_logprobs, so the only difference measured is the chunked log-softmax."""
    hc, target = model_io.completion_hidden(model, batch)                                          # (B, T, H), (B, T)
    logits = model.lm_head(hc).float() / temperature                                               # (B, T, V)
    return torch.log_softmax(logits, -1).gather(-1, target[..., None]).squeeze(-1)                 # (B, T)


def logprob_inputs(batch_size, prompt_len, T, hidden, vocab, device, dtype, seed=0):
    """Random hidden states + token ids shaped like a training micro-batch (the last row 7 tokens shorter, so the
    padding path is exercised)."""
    g = torch.Generator().manual_seed(seed)
    L = prompt_len + T
    h = torch.randn(batch_size, L, hidden, generator=g).to(device=device, dtype=dtype)
    ids = torch.randint(0, vocab, (batch_size, L), generator=g).to(device)
    comp_len = torch.full((batch_size,), T, device=device)
    comp_len[-1] = max(1, T - 7) if batch_size > 1 else T
    mask = (torch.arange(T, device=device)[None] < comp_len[:, None]).float()                      # (B, T)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=torch.zeros_like(ids),
                 pixel_values=None, image_grid_thw=None, comp_start=torch.full((batch_size,), prompt_len, device=device),
                 comp_len=comp_len, mask=mask)
    return h, batch


def compare_logprobs(T, hidden=64, batch_size=1, prompt_len=32, vocab=VOCAB, temperature=1.0, device=None,
                     dtype=None, modes=("train", "no_grad")):
    """Both paths on the same inputs. Raises Mismatch unless log-probs (and, in "train" mode, the gradients
    w.r.t. the hidden states) agree. -> list of rows (one per mode) with peak MiB, seconds and the ratios."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    atol = 1e-4 if dtype == torch.float32 else 5e-2  # bf16 logits: chunked GEMMs may round differently
    h, batch = logprob_inputs(batch_size, prompt_len, T, hidden, vocab, device, dtype)
    torch.manual_seed(0)
    model = LMHeadOnly(h, vocab, dtype)
    hw, bw = logprob_inputs(1, 8, 16, hidden, vocab, device, dtype, seed=1)  # warm-up: first calls pay set-up costs
    model.model.h = hw.requires_grad_(True)
    model_io.completion_logprobs(model, bw, temperature).sum().backward()
    naive_logprobs(model, bw, temperature).sum().backward()
    model.model.h = h
    paths = (("chunked", lambda: model_io.completion_logprobs(model, batch, temperature)),
             ("naive", lambda: naive_logprobs(model, batch, temperature)))
    rows = []
    for mode in modes:
        res = {}
        for name, fn in paths:
            h.requires_grad_(mode == "train")
            h.grad = None

            def run():
                if mode == "train":
                    logp = fn()
                    (logp * batch["mask"]).sum().backward()
                    return logp.detach(), h.grad.detach().clone()
                with torch.no_grad():
                    return fn(), None
            with PeakMemory(device) as mem:
                (logp, grad), sec = timed(run)
            res[name] = dict(logp=logp, grad=grad, mb=mem.mb, s=sec)
            h.grad = None
            del logp, grad
        m = batch["mask"].bool()
        diff = (res["chunked"]["logp"] - res["naive"]["logp"])[m].abs().max().item()
        if not diff <= atol:
            raise Mismatch(f"logprobs T={T} {mode}: chunked and naive log-probs differ by {diff:.2e} (> {atol})")
        gdiff = None
        if mode == "train":
            ga, gb = res["chunked"]["grad"].float(), res["naive"]["grad"].float()
            gdiff = ((ga - gb).norm() / gb.norm().clamp_min(1e-30)).item()
            if not gdiff <= atol * 10:
                raise Mismatch(f"logprobs T={T}: gradients differ (relative {gdiff:.2e} > {atol * 10})")
        c, n = res["chunked"], res["naive"]
        rows.append(dict(mode=mode, B=batch_size, T=T, H=hidden, V=vocab, chunked_mb=c["mb"], naive_mb=n["mb"],
                         mem_ratio=n["mb"] / max(c["mb"], 1e-9), chunked_s=c["s"], naive_s=n["s"],
                         time_ratio=n["s"] / max(c["s"], 1e-9), max_abs_diff=diff, grad_rel_diff=gdiff))
    return rows


def bench_logprobs(args, device):
    rows = []
    for T in args.lp_lengths:
        rows += compare_logprobs(T, args.lp_hidden, args.lp_batch, args.lp_prompt, device=device)
    longest = max(args.lp_lengths)
    for r in rows:
        r["target"] = verdict(r["mem_ratio"] >= 4) if r["T"] == longest else ""
    print_table(f"logprobs: model_io.completion_logprobs (chunked) vs naive log_softmax, vocab {VOCAB} "
                "[target: peak >= 4x lower at the longest T]", rows,
                [("mode", "mode", "{}"), ("B", "B", "{}"), ("T", "T", "{}"), ("H", "H", "{}"),
                 ("naive_mb", "naive MiB", "{:.0f}"), ("chunked_mb", "chunked MiB", "{:.0f}"),
                 ("mem_ratio", "peak x", "{:.1f}"), ("naive_s", "naive s", "{:.2f}"),
                 ("chunked_s", "chunked s", "{:.2f}"), ("time_ratio", "time x", "{:.2f}"),
                 ("max_abs_diff", "|dlogp|", "{:.1e}"), ("target", "", "{}")])
    return dict(rows=rows, chunk=_default_chunk())


def _default_chunk():
    import inspect
    return inspect.signature(model_io.completion_logprobs).parameters["chunk"].default

# -----------------------------------------------------------------------------
# 2) rollout: one shared prefill per group vs the prompt repeated G times


# Random Qwen3-VL sizes beyond tiny_model.py's (no weights needed to time them): text, vision, vocabulary, visual
# tokens per image and image side. "small" is a CPU stand-in whose prefill is compute-bound (like a real model's,
# unlike the overhead-bound tiny one); its vocabulary is the tiny tokenizer's, because rollout.generate's own prefill
# materialises (G, L, V) fp32 logits (10 GB at G=32, L=540, V=151,936; see the report). "mid" (~0.9 B parameters,
# Qwen's vocabulary, GPU only) sits between the tiny model and the paper's 2B-8B.
SIZES = dict(
    small=dict(text=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, mrope_section=[12, 10, 10]),
               vision=dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, deepstack_visual_indexes=[1, 3]),
               vocab=None, image_tokens=160, side=640),
    # plan: >= 1 GiB of fp32 weights + AdamW state (~107 M parameters), for checking grpo.py --plan on CPU
    plan=dict(text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=128, mrope_section=[24, 20, 20]),
              vision=dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, deepstack_visual_indexes=[1, 3]),
              vocab=None, image_tokens=160, side=640),
    mid=dict(text=dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4, head_dim=128, mrope_section=[24, 20, 20]),
             vision=dict(depth=12, hidden_size=768, intermediate_size=3072, num_heads=12,
                         deepstack_visual_indexes=[3, 7, 11]),
             vocab=VOCAB, image_tokens=768, side=1024),
    # 2b: Qwen3-VL-2B-Instruct's shape (configs/qwen3-vl-2b-instruct.json; untied lm_head here: +0.3 B), for gpu
    **{"2b": dict(text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=128, mrope_section=[24, 20, 20]),
                  vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                              deepstack_visual_indexes=[5, 11, 17]),
                  vocab=VOCAB, image_tokens=600, side=896)})


def random_vl_config(tokenizer, size):
    """Qwen3VLConfig of SIZES[size] (vocab None: the tokenizer's size) with the tiny tokenizer's special ids."""
    from transformers import Qwen3VLConfig
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tiny_model.SPECIAL_TOKENS}
    text = dict(SIZES[size]["text"])
    mrope = text.pop("mrope_section")
    return Qwen3VLConfig(
        text_config=dict(vocab_size=SIZES[size]["vocab"] or len(tokenizer), max_position_embeddings=32768, pad_token_id=ids["<|endoftext|>"],
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                         rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=mrope,
                                              mrope_interleaved=True), **text),
        vision_config=dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                           out_hidden_size=text["hidden_size"], **SIZES[size]["vision"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)


def build_model_dir(kind, out):
    """tiny: tiny_model.py's model (random, no warm-up; 48 visual tokens per 640x480 image). small / mid:
    random_vl_config with the tiny tokenizer and an image processor allowing SIZES[kind]["image_tokens"]."""
    if kind == "tiny":
        with contextlib.redirect_stdout(sys.stderr):
            tiny_model.main(["--out", out, "--warmup-steps", "0"])
        return out
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    tok = tiny_model.build_tokenizer()
    ip = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=32 * 32 * 4,
                                  max_pixels=32 * 32 * SIZES[kind]["image_tokens"], image_mean=[0.5] * 3,
                                  image_std=[0.5] * 3)
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(random_vl_config(tok, kind))
    model.generation_config = GenerationConfig(eos_token_id=rollout.stop_ids(tok), pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    ip.save_pretrained(out)
    return out


def bench_images(side=640, seed=0):
    """Two images of random colour blocks at side x 3/4 side (a new seed: new pixels, the same token count)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize((side, side * 3 // 4),
                                                                                  Image.NEAREST) for _ in range(2)]


def bench_prompt(tokenizer, image_processor, side=640, n=5, m=8, seed=0):
    """One prompt with two images (bench_images), encoded by model_io.encode."""
    return model_io.encode(tokenizer, image_processor, make_tasks.build_prompt(n, m), bench_images(side, seed))


def never_stop(model, tokenizer):
    """Zero the stop tokens' lm_head rows: greedy decoding then runs to max_new_tokens (fixed lengths to time)."""
    with torch.no_grad():
        model.lm_head.weight[rollout.stop_ids(tokenizer)] = 0


def compare_rollout(model, tokenizer, enc, G, lengths, repeats=1, prefill_repeats=None):
    """Shared-prefill group vs repeated prompts, greedy, at each completion length. Raises Mismatch unless the
    tokens are identical. -> one row per length with prefill / decode seconds, tokens/s and the ratios. Timings
    are minima over repeats, the two versions alternating so that machine load hits both alike; the prefill
    (a max_new_tokens=1 run) is measured once per G and shared by the rows."""
    def shared(k):
        return rollout.generate(model, tokenizer, [enc], k, greedy=True, group_size=G)

    def repeated(k):
        return rollout.generate(model, tokenizer, [enc] * G, k, greedy=True, group_size=1)

    def both(k, n):
        runs = {"shared": [], "repeated": []}
        for _ in range(n):
            for name, fn in (("shared", shared), ("repeated", repeated)):
                runs[name].append(timed(fn, k))
        return {name: min(s for _, s in r) for name, r in runs.items()}, {name: r[0][0] for name, r in runs.items()}
    repeated(2)  # warm-up at THIS G: the first call at a new batch shape pays one-time set-up (kernel choice,
    shared(2)    # allocator growth), which would otherwise land in the first timed prefill
    pre, _ = both(1, prefill_repeats or repeats)
    rows = []
    for k in lengths:
        tot, outs = both(k, repeats)
        a = [o["token_ids"] for o in outs["shared"]]
        b = [o["token_ids"] for o in outs["repeated"]]
        if a != b:
            bad = next(i for i in range(len(a)) if a[i] != b[i])
            raise Mismatch(f"rollout G={G}: completion {bad} differs between shared prefill and repeated prompts "
                           f"({a[bad][:12]} vs {b[bad][:12]})")
        n_tok = sum(len(x) for x in a)
        row = dict(G=G, new_tokens=k, prompt_tokens=int(enc["input_ids"].shape[1]), generated=n_tok)
        for name in ("shared", "repeated"):
            row[name + "_prefill"], row[name + "_total"] = pre[name], tot[name]
            row[name + "_decode"] = max(0.0, tot[name] - pre[name])
            row[name + "_tok_s"] = n_tok / tot[name]
        row["prefill_ratio"] = pre["repeated"] / pre["shared"]
        row["total_ratio"] = tot["repeated"] / tot["shared"]
        row["saved"] = max(0.0, pre["repeated"] - pre["shared"]) / tot["repeated"]
        rows.append(row)
    return rows


def bench_rollout(args, device, tmp):
    kinds = ["tiny", "small"] + (["mid"] if device.type == "cuda" else [])
    rows = []
    for kind in kinds:
        path = args.model if (args.model and kind == "tiny") else build_model_dir(kind, os.path.join(tmp, kind))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model, tok, ip = model_io.load_policy(path, device, dtype)
        never_stop(model, tok)
        enc = bench_prompt(tok, ip, side=SIZES.get(kind, {}).get("side", 640))
        lengths = dict(tiny=args.new_tokens, small=args.small_new_tokens, mid=args.mid_new_tokens)[kind]
        groups = args.group_sizes if kind != "small" else [max(args.group_sizes)]
        for G in groups:
            # the tiny model's calls take milliseconds, so one sample is mostly noise: minimum of 5 there
            reps = max(args.repeats, 5) if kind == "tiny" else args.repeats
            for row in compare_rollout(model, tok, enc, G, lengths, repeats=reps, prefill_repeats=reps):
                row["model"] = kind
                if G == max(args.group_sizes):
                    row["target"] = verdict(row["prefill_ratio"] >= G / 2)
                rows.append(row)
            print(f"  rollout {kind} G={G}: prefill x{row['prefill_ratio']:.1f}", file=sys.stderr)
        del model
        gc.collect()
    print_table("rollout: rollout.generate, one shared prefill per group vs the prompt repeated G times, greedy "
                "[target: prefill x >= G/2 at the largest G]", rows,
                [("model", "model", "{}"), ("G", "G", "{}"), ("prompt_tokens", "prompt", "{}"),
                 ("new_tokens", "new", "{}"), ("repeated_prefill", "rep prefill s", "{:.3f}"),
                 ("shared_prefill", "shared prefill s", "{:.3f}"), ("prefill_ratio", "prefill x", "{:.1f}"),
                 ("repeated_decode", "rep decode s", "{:.2f}"), ("shared_decode", "shared decode s", "{:.2f}"),
                 ("repeated_tok_s", "rep tok/s", "{:.0f}"), ("shared_tok_s", "shared tok/s", "{:.0f}"),
                 ("saved", "saved", "{:.0%}"), ("target", "", "{}")])
    return dict(rows=rows)

# -----------------------------------------------------------------------------
# 3) pool: build_pool's vectorised verification vs a per-point loop

# build_pool.py's defaults for the rules both versions apply: the one-way rule (the two-way check, the depth-edge
# window, the robust border and --max-stretch are not restated by the loop; without their keys match_rgbd skips them)
POOL_PARAMS = dict(depth_step=2, depth_rel_tol=0.03, occlusion_margin=0.2, photo_check=True, photo_tol=1.0,
                   min_matches=30)


def naive_match_rgbd(frame1, frame2, params):
    """build_pool.match_rgbd's rules, one depth sample at a time in plain Python: back-project with the depth
    intrinsics, move into camera 2, project with colour and depth intrinsics, check the 4 depth pixels around the
    projection, then the normalised colours. Same sampling grid (every depth_step-th pixel). -> counts."""
    step, tol, margin = params["depth_step"], params["depth_rel_tol"], params["occlusion_margin"]
    D1, M1 = frame1["depth"], frame1["depth_mask"]
    D2 = frame2["depth"].tolist()
    M2 = frame2["depth_mask"].tolist() if frame2["depth_mask"] is not None else None
    hd, wd = frame2["depth"].shape
    Ki = np.linalg.inv(frame1["Kd"]).tolist()
    K1, K2, Kd2 = frame1["K"].tolist(), frame2["K"].tolist(), frame2["Kd"].tolist()
    R, t = build_pool.relative_pose_rgbd(frame1, frame2)
    R, t = R.tolist(), t.tolist()
    W1, H1, W2, H2 = frame1["width"], frame1["height"], frame2["width"], frame2["height"]
    n1 = n2 = None
    counts = dict(valid=0, match=0, behind=0, outside=0, occluded=0)
    for y in range(0, D1.shape[0], step):
        row = D1[y].tolist()
        mrow = M1[y].tolist() if M1 is not None else None
        for x in range(0, D1.shape[1], step):
            z = row[x]
            if not (z > 0 and math.isfinite(z)) or (mrow is not None and not mrow[x]):
                continue
            counts["valid"] += 1
            X1 = [(Ki[i][0] * x + Ki[i][1] * y + Ki[i][2]) * z for i in range(3)]
            X2 = [R[i][0] * X1[0] + R[i][1] * X1[1] + R[i][2] * X1[2] + t[i] for i in range(3)]
            z2 = X2[2]
            if not z2 > 1e-6:
                counts["behind"] += 1
                continue
            px = (K2[0][0] * X2[0] + K2[0][1] * X2[1] + K2[0][2] * X2[2]) / z2
            py = (K2[1][0] * X2[0] + K2[1][1] * X2[1] + K2[1][2] * X2[2]) / z2
            b = build_pool.BORDER
            if not (-0.5 - b <= px <= W2 - 0.5 + b and -0.5 - b <= py <= H2 - 0.5 + b):
                counts["outside"] += 1
                continue
            if not (-0.5 <= px <= W2 - 0.5 and -0.5 <= py <= H2 - 0.5):
                continue  # the border band: unverifiable
            qx = (Kd2[0][0] * X2[0] + Kd2[0][1] * X2[1] + Kd2[0][2] * X2[2]) / z2
            qy = (Kd2[1][0] * X2[0] + Kd2[1][1] * X2[1] + Kd2[1][2] * X2[2]) / z2
            qx, qy = min(max(qx, 0.0), wd - 1), min(max(qy, 0.0), hd - 1)
            x0, y0 = int(math.floor(qx)), int(math.floor(qy))
            x1, y1 = min(x0 + 1, wd - 1), min(y0 + 1, hd - 1)
            corners = ((y0, x0), (y0, x1), (y1, x0), (y1, x1))
            nb = [D2[j][i] for j, i in corners]
            if not all(d > 0 and math.isfinite(d) for d in nb) or (M2 is not None and not all(M2[j][i]
                                                                                                for j, i in corners)):
                continue
            if all(d < z2 * (1.0 - margin) for d in nb):
                counts["occluded"] += 1
                continue
            if not all(abs(d - z2) <= tol * z2 for d in nb):
                continue
            if params["photo_check"]:
                if n1 is None:
                    n1, n2 = build_pool.normalised_colour(frame1), build_pool.normalised_colour(frame2)
                w = X1[0] * K1[2][0] + X1[1] * K1[2][1] + X1[2] * K1[2][2]
                u1 = (K1[0][0] * X1[0] + K1[0][1] * X1[1] + K1[0][2] * X1[2]) / w
                v1 = (K1[1][0] * X1[0] + K1[1][1] * X1[1] + K1[1][2] * X1[2]) / w
                a = n1[min(max(round(v1), 0), H1 - 1), min(max(round(u1), 0), W1 - 1)]
                c = n2[min(max(round(py), 0), H2 - 1), min(max(round(px), 0), W2 - 1)]
                if max(abs(float(a[k]) - float(c[k])) for k in range(3)) > params["photo_tol"]:
                    continue
            counts["match"] += 1
    counts["omega"] = counts["match"] / max(counts["valid"], 1)
    return counts


def compare_pool(pairs, params=POOL_PARAMS, repeats=1):
    """pairs: list of (frame1, frame2) build_pool frame dicts. Both versions, both directions of every pair.
    Raises Mismatch if any accept/reject decision differs. -> dict with pairs/s and agreement numbers."""
    def vectorised():
        return [(build_pool.match_rgbd(f1, f2, params), build_pool.match_rgbd(f2, f1, params)) for f1, f2 in pairs]

    def naive():
        return [(naive_match_rgbd(f1, f2, params), naive_match_rgbd(f2, f1, params)) for f1, f2 in pairs]
    for f1, f2 in pairs:  # the normalised colour images are cached per frame; build them outside the timing
        build_pool.normalised_colour(f1), build_pool.normalised_colour(f2)
    runs = [timed(vectorised) for _ in range(repeats)]
    fast, fast_s = runs[0][0], min(s for _, s in runs)
    slow, slow_s = timed(naive)
    dec_fast = [build_pool.enough_matches(r12["counts"]["match"], params) for r12, _ in fast]
    dec_slow = [build_pool.enough_matches(r12["match"], params) for r12, _ in slow]
    if dec_fast != dec_slow:
        bad = [i for i in range(len(pairs)) if dec_fast[i] != dec_slow[i]]
        raise Mismatch(f"pool: accept/reject differs on {len(bad)} of {len(pairs)} pairs, e.g. pair {bad[0]}: "
                       f"vectorised {fast[bad[0]][0]['counts']['match']} matches, naive {slow[bad[0]][0]['match']}")
    keys = ("match", "behind", "outside", "occluded")
    count_diff = max(abs(a[d]["counts"][k] - b[d][k]) for a, b in zip(fast, slow) for d in (0, 1) for k in keys)
    valid_diff = max(abs(a[d]["n_valid"] - b[d]["valid"]) for a, b in zip(fast, slow) for d in (0, 1))
    return dict(pairs=len(pairs), accepted=sum(dec_fast), rejected=len(pairs) - sum(dec_fast),
                vectorised_s=fast_s, naive_s=slow_s, vectorised_pairs_s=len(pairs) / fast_s,
                naive_pairs_s=len(pairs) / slow_s, speedup=slow_s / fast_s, max_count_diff=count_diff,
                valid_diff=valid_diff, samples_per_pair=float(np.mean([a[0]["n_valid"] for a in fast])))


def make_synthetic(out, frames, image_scale, layouts="scannet,co3d"):
    with contextlib.redirect_stdout(sys.stderr):
        synthetic.main(["--out", out, "--frames", str(frames), "--image-scale", str(image_scale), "--layouts", layouts])
    return out


def load_pool_pairs(data_dir, max_pairs):
    """All frame pairs i<j of every scannet/co3d scene under data_dir (frames decoded once), capped at max_pairs
    (evenly over the list)."""
    pairs = []
    scenes = [build_pool.open_scene("scannet", kind, p) for kind, p in build_pool.find_scannet(
        os.path.join(data_dir, "scannet"))]
    scenes += [build_pool.open_scene("co3d", None, s) for s in build_pool.find_co3d(os.path.join(data_dir, "co3d"))]
    for scene in scenes:
        frames = [scene.load(f) for f in scene.frame_ids]
        pairs += [(frames[i], frames[j]) for i in range(len(frames)) for j in range(i + 1, len(frames))]
    if max_pairs and len(pairs) > max_pairs:
        pairs = [pairs[int(k)] for k in np.linspace(0, len(pairs) - 1, max_pairs)]
    return pairs


def bench_pool(args, tmp):
    data = make_synthetic(os.path.join(tmp, "pool_data"), args.frames, args.image_scale)
    pairs = load_pool_pairs(data, args.max_pairs)
    r = compare_pool(pairs, repeats=args.repeats)
    f1 = pairs[0][0]
    r.update(colour=f"{f1['width']}x{f1['height']}", depth="{1}x{0}".format(*f1["depth"].shape),
             depth_step=POOL_PARAMS["depth_step"], target=verdict(r["speedup"] >= 10))
    print_table("pool: build_pool.match_rgbd (vectorised) vs per-point Python loop, both directions per pair, "
                "same depth grid [target: >= 10x pairs/s]", [r],
                [("pairs", "pairs", "{}"), ("accepted", "accepted", "{}"), ("colour", "colour", "{}"),
                 ("depth", "depth", "{}"), ("samples_per_pair", "samples/dir", "{:.0f}"),
                 ("naive_pairs_s", "naive pairs/s", "{:.1f}"), ("vectorised_pairs_s", "vectorised pairs/s", "{:.1f}"),
                 ("speedup", "x", "{:.0f}"), ("max_count_diff", "max |dcount|", "{}"), ("target", "", "{}")])
    return r

# -----------------------------------------------------------------------------
# 4) step: where one GRPO step's time goes


class PhaseTimer:
    """Wraps module-level functions so that grpo.main's own loop reports per-step seconds of each phase."""

    def __init__(self):
        self.step, self.t = 0, {}
        self.undo = []

    def add(self, phase, dt):
        d = self.t.setdefault(self.step, {})
        d[phase] = d.get(phase, 0.0) + dt

    def wrap(self, owner, name, phase_of, new_step=False):
        orig = getattr(owner, name)
        timer = self

        def wrapper(*a, **k):
            if new_step:
                timer.step += 1
            out, dt = timed(orig, *a, **k)
            timer.add(phase_of() if callable(phase_of) else phase_of, dt)
            return out
        setattr(owner, name, wrapper)
        self.undo.append((owner, name, orig))

    def restore(self):
        for owner, name, orig in reversed(self.undo):
            setattr(owner, name, orig)


PHASES = ("tasks", "rollout", "  of it generate", "ref/old logprobs", "policy logprobs", "loss+backward",
          "optimizer", "weight sync", "checkpoint", "other")


# grpo.py's defaults are the paper's 8B recipe; the step benchmark runs the tiny model's (the CPU demo's)
TINY_RECIPE = ["--lr", "1e-3", "--max-side", "640", "--n-min", "3", "--n-max", "5", "--micro-batch", "8",
               "--no-grad-checkpointing"]


def step_breakdown(model_dir, pool_dir, out_dir, steps, G, prompts, new_tokens, extra=()):
    """Run grpo.main for `steps` steps (checkpoint every step, no eval) with its functions timed. -> dict
    phase -> mean seconds per step over steps 2.. (all steps if only one), plus total."""
    pt = PhaseTimer()
    pt.wrap(grpo, "sample_tasks", "tasks", new_step=True)
    pt.wrap(grpo, "rollout", "rollout")
    for engine in (rollout.HFEngine, rollout.VllmEngine):  # grpo.rollout -> engine.generate (--rollout-engine)
        pt.wrap(engine, "generate", "  of it generate")
        pt.wrap(engine, "sync_weights", "weight sync")  # after every optimizer step (hf: nothing to do)
    pt.wrap(grpo, "completion_logprobs",
            lambda: "policy logprobs" if torch.is_grad_enabled() else "ref/old logprobs")
    pt.wrap(grpo, "collate_samples", "collate")
    pt.wrap(grpo, "train_on", "train_on")
    pt.wrap(torch.optim.AdamW, "step", "optimizer")
    pt.wrap(torch.nn.utils, "clip_grad_norm_", "optimizer")
    pt.wrap(grpo, "save_checkpoint", "checkpoint")
    argv = ["--model", model_dir, "--pool", pool_dir, "--out", out_dir, "--steps", str(steps), "--save-every", "1",
            "--eval-every", "0", "--group-size", str(G), "--prompts-per-step", str(prompts),
            "--max-new-tokens", str(new_tokens), *TINY_RECIPE, *extra]
    try:
        with contextlib.redirect_stdout(sys.stderr):
            grpo.main(argv)
    finally:
        pt.restore()
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    per_step = []
    for m in metrics:
        d = pt.t.get(m["step"], {})
        total = m["seconds"] + d.get("checkpoint", 0.0)  # grpo's "seconds" stop before the checkpoint
        p = {k: d.get(k, 0.0) for k in PHASES if k != "other"}
        p["loss+backward"] = d.get("train_on", 0.0) - d.get("collate", 0.0) - p["ref/old logprobs"] \
            - p["policy logprobs"] - p["optimizer"]
        p["other"] = total - sum(v for k, v in p.items() if not k.startswith(" "))
        p["total"] = total
        p["length"] = m["length"]
        per_step.append(p)
    use = per_step[1:] if len(per_step) > 1 else per_step
    return {k: float(np.mean([p[k] for p in use])) for k in use[0]}


def prefill_saving_per_step(model_dir, device, G, prompts):
    """Seconds the shared prefill saves in one step at this G: prompts x (repeated - shared prefill)."""
    model, tok, ip = model_io.load_policy(model_dir, device, torch.float32 if device.type == "cpu" else torch.bfloat16)
    enc = bench_prompt(tok, ip)
    rep = min(timed(rollout.generate, model, tok, [enc] * G, 1, greedy=True)[1] for _ in range(2))
    sh = min(timed(rollout.generate, model, tok, [enc], 1, greedy=True, group_size=G)[1] for _ in range(2))
    return prompts * max(0.0, rep - sh)


def trl_step(model_dir, pool_dir, out_dir, steps, G, prompts, new_tokens):
    """TRL's GRPOTrainer on the same model, tasks and G. -> mean seconds per step (steps 2..), or a skip reason."""
    if not torch.cuda.is_available():
        return dict(skipped="no GPU: TRL's GRPOTrainer cannot build a Qwen3-VL processor on the CPU machine "
                            "(its video processor needs torchvision)")
    try:
        import datasets
        import trl
        from transformers import TrainerCallback
        from transformers.models.qwen3_vl import Qwen3VLProcessor, Qwen3VLVideoProcessor
    except ImportError as e:
        return dict(skipped=f"TRL comparison needs `pip install -r bench-requirements.txt` ({e})")
    import dataclasses
    import reward
    _, tok, ip = model_io.load_policy(model_dir, "cpu")
    processor = Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen3VLVideoProcessor(),
                                 chat_template=tok.chat_template)
    rng = np.random.default_rng(0)
    train = [p for p in grpo.read_pairs(pool_dir) if p["split"] == "train"]
    rows = []
    for k in range(prompts * steps * 4):
        if len(rows) >= prompts * steps:
            break
        try:
            task, imgs = grpo.task_for_pair(train[k % len(train)], pool_dir, "L1", "sparse", rng, 640)
        except make_tasks.TaskUnavailable:
            continue
        rows.append(dict(prompt=[{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                                {"type": "text", "text": task["prompt"]}]}],
                         images=imgs, task=json.dumps(task)))

    def match_reward(prompts, completions, task, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [reward.score(t, json.loads(s))["reward"] for t, s in zip(texts, task)]

    times = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *a, **k):
            cuda_sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            cuda_sync()
            times.append(time.perf_counter() - self.t0)
    want = dict(output_dir=out_dir, num_generations=G, per_device_train_batch_size=G * prompts,
                generation_batch_size=G * prompts, max_completion_length=new_tokens, max_prompt_length=None,
                beta=0.005, temperature=1.0, learning_rate=1e-6, max_steps=steps, logging_steps=1, save_strategy="no",
                report_to="none", bf16=True, loss_type="dapo", scale_rewards="group", gradient_accumulation_steps=1)
    fields = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    config = trl.GRPOConfig(**{k: v for k, v in want.items() if k in fields})
    trainer = trl.GRPOTrainer(model=model_dir, reward_funcs=match_reward, args=config,
                              train_dataset=datasets.Dataset.from_list(rows), processing_class=processor,
                              callbacks=[StepTimes()])
    trainer.train()
    use = times[1:] if len(times) > 1 else times
    return dict(trl_version=trl.__version__, seconds_per_step=float(np.mean(use)), steps=len(times))


def bench_step(args, device, tmp):
    data = make_synthetic(os.path.join(tmp, "step_data"), args.frames, args.image_scale, layouts="scannet,co3d")
    pool = os.path.join(tmp, "step_pool")
    with contextlib.redirect_stdout(sys.stderr):
        build_pool.main(["--scannet", os.path.join(data, "scannet"), "--co3d", os.path.join(data, "co3d"),
                         "--out", pool, "--workers", "1"])
    model_dir = args.model or build_model_dir("tiny", os.path.join(tmp, "step_tiny"))
    G, P, k = args.step_group_size, args.step_prompts, args.step_new_tokens
    ours = step_breakdown(model_dir, pool, os.path.join(tmp, "run"), args.step_steps, G, P, k)
    saved = prefill_saving_per_step(model_dir, device, G, P)
    rows = [dict(phase=p, seconds=ours[p], share=ours[p] / ours["total"]) for p in PHASES]
    rows.append(dict(phase="total", seconds=ours["total"], share=1.0))
    print_table(f"step: one GRPO step of grpo.main, tiny model on {device.type}, G={G}, {P} prompts, "
                f"<= {k} new tokens (mean completion {ours['length']:.0f}), mean of steps 2..{args.step_steps}",
                rows, [("phase", "phase", "{}"), ("seconds", "s/step", "{:.3f}"), ("share", "share", "{:.0%}")])
    print(f"  shared prefill saves {saved:.3f} s of this step ({saved / (ours['total'] + saved):.0%} of the step "
          f"it would be with G repeated prefills)")
    trl = trl_step(model_dir, pool, os.path.join(tmp, "trl"), args.step_steps, G, P, k)
    if "skipped" in trl:
        print(f"  TRL GRPOTrainer comparison skipped: {trl['skipped']}")
    else:
        print(f"  TRL {trl['trl_version']} GRPOTrainer: {trl['seconds_per_step']:.3f} s/step vs ours "
              f"{ours['total']:.3f} s/step (x{trl['seconds_per_step'] / ours['total']:.2f})")
    return dict(phases=ours, prefill_saved_s=saved, prefill_saved_share=saved / (ours["total"] + saved), G=G,
                prompts=P, new_tokens=k, trl=trl)

# -----------------------------------------------------------------------------
# 5) rollout-fsdp: resident weights + a KV cache written in place vs the legacy path, 2 processes, FSDP2 over gloo


class RolloutCounter(TorchDispatchMode):
    """While active, counts c10d collectives and the bytes they move (the largest tensor argument: an all-gather's
    gathered output) and the KV-cache bytes copied: aten.cat along the sequence dim of 4-D (B, H, T, D) tensors
    (DynamicCache's append), copy_ into and index_copy_ of 4-D tensors (StaticCache's update, our one-time fill).
    Per model forward (a forward pre-hook on model) it also keeps the KV bytes, so the last decode step's can be
    read: legacy's grows with the context, resident's does not."""

    def __init__(self, model):
        super().__init__()
        self.collectives, self.comm_bytes, self.kv_bytes, self.kv_by_forward = 0, 0, 0, [0]
        self.hook = model.register_forward_pre_hook(lambda *_: self.kv_by_forward.append(0))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ns, name = func.namespace, func.overloadpacket.__name__
        if ns in ("c10d", "_c10d_functional"):
            flat = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])]
            self.collectives += 1
            self.comm_bytes += max((t.nbytes for t in flat if isinstance(t, torch.Tensor)), default=0)
        elif ns == "aten":
            moved = 0
            if name == "cat" and out.dim() == 4 and (args[1] if len(args) > 1 else kwargs.get("dim", 0)) in (2, -2):
                moved = out.nbytes
            elif name == "copy_" and args[0].dim() == 4:
                moved = args[0].nbytes
            elif name == "index_copy_" and args[0].dim() == 4:
                moved = args[3].nbytes
            self.kv_bytes += moved
            self.kv_by_forward[-1] += moved
        return out

    def __exit__(self, *exc):
        self.hook.remove()
        return super().__exit__(*exc)


def reshard_settings(model):
    """Each FSDP module's reshard-after-forward setting (per parameter group), to check that resident() restores
    them."""
    return [[g.post_forward_mesh_info is None for g in m._get_fsdp_state()._fsdp_param_groups]
            for m in rollout.fsdp_modules(model)]


def rollout_fsdp_worker(args):
    """One rank of `torchrun --nproc_per_node=2 bench.py rollout-fsdp --worker OUT`: every model of --fsdp-dirs,
    FSDP2-sharded by grpo.shard, rolls out G greedy completions of one prompt (rank r: prompt seed r) per impl and
    completion length, counted by RolloutCounter; rank 0 writes every rank's rows to OUT (JSON)."""
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rows = []
    for kind, path in (kv.split("=", 1) for kv in args.fsdp_dirs.split(",")):
        model, tok, ip = model_io.load_policy(path)
        never_stop(model, tok)
        model = grpo.shard(model, torch.device("cpu"))
        enc = bench_prompt(tok, ip, side=args.fsdp_side or SIZES.get(kind, {}).get("side", 640), seed=rank)
        for impl in rollout.IMPLS:  # warm-up: FSDP's lazy init and first-call set-up are not timed
            with rollout.resident(model, impl):
                rollout.generate(model, tok, [enc], 2, greedy=True, group_size=args.fsdp_group_size,
                                 synced_gpus=True)
        before = reshard_settings(model)
        for k in args.fsdp_lengths:
            for impl in rollout.IMPLS:
                counter = RolloutCounter(model)
                t0 = time.perf_counter()
                with counter, rollout.resident(model, impl):  # what one rollout costs, gathers included
                    outs = rollout.generate(model, tok, [enc], k, greedy=True, group_size=args.fsdp_group_size,
                                            synced_gpus=True)
                seconds = time.perf_counter() - t0
                n_tok = sum(len(o["token_ids"]) for o in outs)
                rows.append(dict(model=kind, impl=impl, rank=rank, new_tokens=k, G=args.fsdp_group_size,
                                 prompt_tokens=int(enc["input_ids"].shape[1]), generated=n_tok,
                                 collectives=counter.collectives, comm_bytes=counter.comm_bytes,
                                 kv_bytes=counter.kv_bytes, kv_bytes_last_step=counter.kv_by_forward[-1],
                                 seconds=seconds, tokens=[o["token_ids"] for o in outs],
                                 logprobs=[o["logprobs"] for o in outs],
                                 settings_restored=reshard_settings(model) == before))
        del model
        gc.collect()
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    if rank == 0:
        with open(args.worker, "w") as f:
            json.dump([r for p in parts for r in p], f)
    dist.destroy_process_group()


def run_rollout_fsdp(dirs, lengths, group_size, out_json, side=None, nproc=2):
    """Launches the 2-process worker (torchrun --standalone: a free port) -> its rows."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun if os.path.exists(torchrun) else "torchrun", "--standalone", f"--nproc_per_node={nproc}",
           os.path.abspath(__file__), "rollout-fsdp", "--worker", out_json,
           "--fsdp-dirs", ",".join(f"{k}={v}" for k, v in dirs.items()),
           "--fsdp-lengths", ",".join(map(str, lengths)), "--fsdp-group-size", str(group_size)] + \
          (["--fsdp-side", str(side)] if side else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if r.returncode != 0:
        raise RuntimeError(f"bench.py rollout-fsdp: the 2-process worker failed:\n{r.stderr[-3000:]}")
    with open(out_json) as f:
        return json.load(f)


def rollout_fsdp_table(rows, lengths):
    """Rank 0's rows -> one line per (model, impl): per generated token (slope between the two completion
    lengths) collectives, MB all-gathered and KV MB copied; the last decode step's KV MB at each length; time.
    Raises Mismatch unless resident's greedy tokens equal legacy's and its log-probs agree (1e-5)."""
    out = []
    by = {(r["model"], r["impl"], r["rank"], r["new_tokens"]): r for r in rows}
    for (model, impl, rank, k), r in by.items():
        leg = by[(model, "legacy", rank, k)]
        if r["tokens"] != leg["tokens"]:
            raise Mismatch(f"rollout-fsdp {model} rank {rank} k={k}: {impl} tokens differ from legacy")
        gap = max((abs(a - b) for x, y in zip(r["logprobs"], leg["logprobs"]) for a, b in zip(x, y)), default=0.0)
        if gap > 1e-5:
            raise Mismatch(f"rollout-fsdp {model} rank {rank} k={k}: {impl} log-probs differ from legacy by {gap}")
    k1, k2 = min(lengths), max(lengths)
    for model in dict.fromkeys(r["model"] for r in rows):
        for impl in rollout.IMPLS:
            a, b = by[(model, impl, 0, k1)], by[(model, impl, 0, k2)]
            dk = (b["generated"] - a["generated"]) / b["G"]   # decode steps between the two lengths
            out.append(dict(model=model, impl=impl, G=b["G"], prompt=b["prompt_tokens"], lengths=f"{k1},{k2}",
                            coll_rollout=f"{a['collectives']},{b['collectives']}",
                            coll_tok=(b["collectives"] - a["collectives"]) / dk,
                            comm_mb_tok=(b["comm_bytes"] - a["comm_bytes"]) / dk / 2 ** 20,
                            kv_mb_tok=(b["kv_bytes"] - a["kv_bytes"]) / dk / 2 ** 20,
                            kv_last=f"{a['kv_bytes_last_step'] / 2 ** 20:.3f},{b['kv_bytes_last_step'] / 2 ** 20:.3f}",
                            ms_tok=1000 * (b["seconds"] - a["seconds"]) / dk, seconds=b["seconds"]))
    for model in dict.fromkeys(r["model"] for r in out):
        leg, res = [next(r for r in out if r["model"] == model and r["impl"] == i) for i in ("legacy", "resident")]
        res["speedup"] = leg["ms_tok"] / res["ms_tok"] if res["ms_tok"] > 0 else None
        res["target"] = verdict(res["coll_tok"] == 0 and by[(model, "resident", 0, k1)]["kv_bytes_last_step"]
                                == by[(model, "resident", 0, k2)]["kv_bytes_last_step"])
    return out


def bench_rollout_fsdp(args, device, tmp):
    dirs = {kind: (args.model if (args.model and kind == "tiny") else build_model_dir(kind, os.path.join(tmp, kind)))
            for kind in ("tiny", "small")}
    rows = run_rollout_fsdp(dirs, args.fsdp_lengths, args.fsdp_group_size, os.path.join(tmp, "fsdp.json"),
                            side=args.fsdp_side)
    table = rollout_fsdp_table(rows, args.fsdp_lengths)
    print_table("rollout-fsdp: one rollout on 2 CPU processes (FSDP2 over gloo), greedy, G completions of one prompt "
                "per rank; per generated token = difference between the two lengths / decode steps [target: 0 "
                "collectives per token, KV bytes of the last decode step not growing with the length]", table,
                [("model", "model", "{}"), ("impl", "impl", "{}"), ("G", "G", "{}"), ("prompt", "prompt", "{}"),
                 ("lengths", "new", "{}"), ("coll_rollout", "collectives/rollout", "{}"),
                 ("coll_tok", "coll/token", "{:.1f}"), ("comm_mb_tok", "MB gathered/token", "{:.2f}"),
                 ("kv_mb_tok", "KV MB copied/token", "{:.3f}"), ("kv_last", "KV MB last step", "{}"),
                 ("ms_tok", "ms/token", "{:.1f}"), ("speedup", "x", "{:.2f}"), ("target", "", "{}")])
    return dict(rows=table, raw=[{k: v for k, v in r.items() if k not in ("tokens", "logprobs")} for r in rows])

# -----------------------------------------------------------------------------
# 6) plan-check: grpo.py --plan against the measured peak of one CPU step


PLAN_FLAGS = ["--group-size", "4", "--prompts-per-step", "1", "--rollout-batch", "1", "--micro-batch", "4",
              "--max-new-tokens", "128", "--kl-beta", "0.005", "--grad-checkpointing", "--max-side", "640",
              "--steps", "1", "--save-every", "100", "--eval-every", "0", "--lr", "1e-3", "--n-min", "3",
              "--n-max", "5"]


def plan_check_worker(args):
    """In a fresh process (`bench.py plan-check --worker OUT`): RSS after the imports, then grpo.main for one step
    with train_step wrapped: the resident-set high-water mark is reset (/proc/self/clear_refs) when the step
    starts and read when it ends. The prompt's real length and patches are recorded for the plan."""
    rss0 = _proc_status_mb("VmRSS")
    seen, peak = {}, {}
    orig_step, orig_rollout = grpo.train_step, grpo.rollout

    def step(*a, **k):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        out = orig_step(*a, **k)
        peak["mb"] = _proc_status_mb("VmHWM")
        return out

    def roll(engine, tokenizer, image_processor, tasks, a):  # grpo.rollout's signature
        samples = orig_rollout(engine, tokenizer, image_processor, tasks, a)
        seen["prompt_tokens"] = max(int(s["enc"]["input_ids"].shape[1]) for s in samples)
        seen["patches_per_image"] = max(int(s["enc"]["pixel_values"].shape[0]) // 2 for s in samples)
        seen["lengths"] = [len(s["token_ids"]) for s in samples]
        return samples
    grpo.train_step, grpo.rollout = step, roll
    try:
        with contextlib.redirect_stdout(sys.stderr):
            grpo.main(["--model", args.model, "--pool", args.plan_pool, "--out", args.plan_run, *PLAN_FLAGS])
    finally:
        grpo.train_step, grpo.rollout = orig_step, orig_rollout
    with open(args.worker, "w") as f:
        json.dump(dict(rss_after_imports_mb=rss0, step_peak_rss_mb=peak["mb"], **seen), f)


def bench_plan_check(args, device, tmp):
    """grpo.py's memory plan (1 process, --plan-device cpu) vs the measured peak of one step on CPU of a random
    Qwen3-VL with >= 1 GiB of weights + AdamW state. [within 25%]"""
    model_dir = build_model_dir("plan", os.path.join(tmp, "plan_model"))
    never_stop_dir(model_dir)
    data = make_synthetic(os.path.join(tmp, "plan_data"), 5, 1.0, layouts="scannet")
    pool = os.path.join(tmp, "plan_pool")
    with contextlib.redirect_stdout(sys.stderr):
        build_pool.main(["--scannet", os.path.join(data, "scannet"), "--out", pool, "--workers", "1"])
    out = os.path.join(tmp, "plan_check.json")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "plan-check", "--worker", out, "--model", model_dir,
                        "--plan-pool", pool, "--plan-run", os.path.join(tmp, "plan_run")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"bench.py plan-check: the measured run failed:\n{r.stderr[-3000:]}")
    with open(out) as f:
        m = json.load(f)
    pargs = grpo.parse_args(["--model", model_dir, "--plan", "--gpus", "1", "--gpu-mem-gib", "1000",
                             "--plan-device", "cpu", *PLAN_FLAGS])
    cfg, _ = rollout.read_model_config(model_dir)
    plan = rollout.memory_plan(cfg, 1, pargs.prompts_per_step, pargs.group_size, pargs.rollout_batch,
                               pargs.micro_batch, pargs.max_new_tokens, pargs.grad_checkpointing, pargs.kl_beta,
                               pargs.rollout_impl, "cpu", prompt_tokens=m["prompt_tokens"],
                               patches_per_image=m["patches_per_image"])
    n = plan["counts"]["total"]
    measured = m["step_peak_rss_mb"] - m["rss_after_imports_mb"]
    planned = plan["peak"] / 2 ** 20
    row = dict(parameters_m=n / 1e6, weights_optimizer_gib=12 * n / 2 ** 30, prompt=m["prompt_tokens"],
               completion=max(m["lengths"]), planned_mb=planned, planned_phase=plan["peak_phase"],
               measured_mb=measured, ratio=measured / planned, target=verdict(abs(measured / planned - 1) <= 0.25))
    print_table("plan-check: grpo.py --plan (1 process, cpu) vs max RSS during one step minus RSS after imports, "
                "random Qwen3-VL [target: within 25%]", [row],
                [("parameters_m", "params M", "{:.1f}"), ("weights_optimizer_gib", "weights+AdamW GiB", "{:.2f}"),
                 ("prompt", "prompt", "{}"), ("completion", "new", "{}"), ("planned_mb", "plan MiB", "{:.0f}"),
                 ("planned_phase", "plan peak in", "{}"), ("measured_mb", "measured MiB", "{:.0f}"),
                 ("ratio", "measured/plan", "{:.2f}"), ("target", "", "{}")])
    for phase in ("fixed", "rollout", "update", "optimizer"):
        print(f"  plan {phase:9s} {plan[phase] / 2 ** 20:8.0f} MiB")
    return dict(row=row, measured=m, plan={k: plan[k] for k in ("fixed", "rollout", "update", "optimizer", "peak")})


def never_stop_dir(model_dir):
    """never_stop on a saved model dir (the stop tokens' lm_head rows zeroed, saved back): every completion of the
    measured step runs to --max-new-tokens, the plan's worst case."""
    model, tok, _ = model_io.load_policy(model_dir)
    never_stop(model, tok)
    model.save_pretrained(model_dir)
    del model
    gc.collect()


# -----------------------------------------------------------------------------
# 7) rollout-engine: transformers generate (rollout.HFEngine) vs colocated vLLM (rollout.VllmEngine), side by side


@contextlib.contextmanager
def vllm_in_process():
    """Around in-process vLLM use (its import, an engine's whole life). Its log lines go to stderr, where bench.py's
    progress goes, and stdout keeps the tables (VLLM_LOGGING_STREAM: read at its import and again by every engine it
    starts). What it leaves behind is undone on exit, so later code in the same process (the next command, the
    tests, grpo.main) does not see it. Found on CPU (vllm 0.32): environment variables meant for worker processes
    that do not exist here (LD_PRELOAD=torch's libgomp, which every later subprocess would inherit,
    LOCAL_WORLD_SIZE, VLLM_*, TORCHINDUCTOR_*), torch.set_num_threads replaced by a function that only logs a warning
    (its CPU worker's), and a 1-process torch.distributed group that lives until the engine is garbage-collected."""
    import torch.distributed as dist
    env, initialised = dict(os.environ), dist.is_available() and dist.is_initialized()
    set_num_threads = torch.set_num_threads
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        yield
    finally:
        gc.collect()  # the engine's reference cycles: its shutdown destroys the group it made
        if dist.is_available() and dist.is_initialized() and not initialised:
            dist.destroy_process_group()
        for k in set(os.environ) - set(env):
            del os.environ[k]
        os.environ.update({k: v for k, v in env.items() if os.environ.get(k) != v})
        torch.set_num_threads = set_num_threads
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def vllm_import_error():
    """None when vllm imports here, else why not (one line, recorded in the JSON)."""
    with vllm_in_process():
        try:
            import vllm  # noqa: F401
        except Exception as e:  # noqa: BLE001 - recorded, not hidden: a missing or CUDA-mismatched wheel
            return f"vllm does not import: {type(e).__name__}: {str(e)[:300]}"
    return None


@contextlib.contextmanager
def no_stops():
    """Every completion runs to max_new_tokens in BOTH engines, at any temperature: rollout.stop_ids answers no stop
    tokens for the duration, so <|im_end|> / <|endoftext|> join the banned special tokens that neither engine can
    sample (rollout.banned_ids). Timed runs then do the same work in both engines (zeroing the stops' lm_head rows,
    never_stop, is enough for greedy decoding but not for sampling)."""
    real = rollout.stop_ids
    rollout.stop_ids = lambda tokenizer: []
    try:
        yield
    finally:
        rollout.stop_ids = real


def trainer_logprobs(model, enc, token_rows, device, autocast):
    """The trainer's teacher-forced log-probs (model_io.completion_logprobs at T 1, no grad, grpo's 1-GPU autocast) of
    completions of one prompt -> list of per-row lists."""
    samples = [dict(enc=enc, token_ids=list(r)) for r in token_rows]
    batch = model_io.collate_samples(samples, model.config.text_config.pad_token_id or 0, device)
    with torch.no_grad(), autocast():
        lp = model_io.completion_logprobs(model, batch, 1.0)
    return [lp[b, :len(r)].float().cpu().tolist() for b, r in enumerate(token_rows)]


def dlogp_stats(sampler, trainer):
    d = np.abs(np.concatenate([np.array(a) - np.array(b) for a, b in zip(sampler, trainer)]))
    return dict(dlogp_mean=float(d.mean()), dlogp_max=float(d.max()), tokens=int(d.size))


def engine_prompts(tokenizer, image_processor, side, count, seed):
    """count prompts of two images each (bench_images, seeds seed..) -> (encodings, images). Every timed call gets
    prompts of its own: vLLM keeps prefixes and vision-encoder outputs of earlier requests, and a GRPO step never
    sees the same images twice."""
    images = [bench_images(side, seed + k) for k in range(count)]
    return [model_io.encode(tokenizer, image_processor, make_tasks.build_prompt(5, 8), im) for im in images], images


def engine_run(engine, prompts, new_tokens, G, greedy=False):
    """One engine.generate call at temperature 1 inside its session (vLLM on CUDA: woken from sleep mode, as each
    of grpo's rollouts is) -> (outputs, seconds)."""
    encs, images = prompts
    with engine.session():
        return timed(engine.generate, encs, images, new_tokens, 1.0, greedy=greedy, group_size=G)


def compare_engines(model_dir, kind, device, P, G, N, repeats=1, check_tokens=16):
    """HFEngine (resident, all P prompts in one generate call) and VllmEngine on the same weights (model_dir), the
    same prompts, G and N, with no_stops. First the same answer: greedy tokens identical over check_tokens (raises
    Mismatch in fp32, i.e. on CPU; bf16 on CUDA: the share of equal rows is recorded). Then, after a warm-up call
    each at the timed shape, per repeat and engine (alternating which goes first): a prefill run (1 new token) and a
    full run (N new tokens) on fresh prompts; minima over repeats. tok/s = generated tokens / full run;
    decode tok/s = (generated - rows) / (full - prefill), None when the prefill run is not clearly shorter (noise
    on a loaded machine). The sampled tokens' sampler log-probs against the trainer's
    (model_io.completion_logprobs at T 1): |dlogp| (Mismatch above 1e-4 in fp32). -> one row."""
    side = SIZES.get(kind, {}).get("side", 640)
    model, tok, ip = model_io.load_policy(model_dir, device, torch.float32)
    autocast = model_io.autocast_for(device, 1)
    L = int(engine_prompts(tok, ip, side, 1, 0)[0][0]["input_ids"].shape[1])
    row = dict(model=kind, prompt_tokens=L, P=P, G=G, new_tokens=N, rows=P * G)
    exact = device.type == "cpu"  # fp32 both: the same tokens and log-probs expected
    with vllm_in_process(), no_stops():
        engines = dict(hf=rollout.HFEngine(model, tok, "resident", batch=P, autocast=autocast))
        t0 = time.perf_counter()
        engines["vllm"] = rollout.VllmEngine(model_dir, tok, device, L + N + 16, seed=0, image_side=side)
        if engines["vllm"].stale:  # CUDA sleep level 2 discarded its weights: the sync refills them, as in grpo.py
            engines["vllm"].sync_weights(model)
        row["vllm_start_s"] = time.perf_counter() - t0
        try:
            check = engine_prompts(tok, ip, side, P, 1000)
            greedy = {name: [o["token_ids"] for o in engine_run(e, check, check_tokens, 1, greedy=True)[0]]
                      for name, e in engines.items()}
            row["greedy_equal"] = float(np.mean([a == b for a, b in zip(greedy["hf"], greedy["vllm"])]))
            if exact and row["greedy_equal"] < 1:
                bad = next(i for i, (a, b) in enumerate(zip(greedy["hf"], greedy["vllm"])) if a != b)
                raise Mismatch(f"rollout-engine {kind}: greedy prompt {bad} differs between HF and vLLM "
                               f"({greedy['hf'][bad][:12]} vs {greedy['vllm'][bad][:12]})")
            warm = engine_prompts(tok, ip, side, P, 2000)
            for e in engines.values():  # first calls at a shape pay set-up (kernels, allocator, vLLM's buffers)
                engine_run(e, warm, 2, G)
            best = {name: dict(prefill=math.inf, full=math.inf) for name in engines}
            outs = {}
            for r in range(repeats):
                pre, full = (engine_prompts(tok, ip, side, P, 3000 + 100 * r + k * 50) for k in (0, 1))
                for name in (("hf", "vllm") if r % 2 == 0 else ("vllm", "hf")):
                    best[name]["prefill"] = min(best[name]["prefill"], engine_run(engines[name], pre, 1, G)[1])
                    o, sec = engine_run(engines[name], full, N, G)
                    best[name]["full"] = min(best[name]["full"], sec)
                    outs[name] = (o, full[0])
        finally:
            engines["vllm"].close()
            del engines
    for name, (o, encs) in outs.items():
        n_tok = sum(len(x["token_ids"]) for x in o)
        pre, full = best[name]["prefill"], best[name]["full"]
        trainer = [lp for j, enc in enumerate(encs)
                   for lp in trainer_logprobs(model, enc, [x["token_ids"] for x in o[j * G:(j + 1) * G]], device,
                                              autocast)]
        d = dlogp_stats([x["logprobs"] for x in o], trainer)
        decode = (n_tok - len(o)) / (full - pre) if full - pre > 0.1 * full else None  # else noise: not a rate
        row.update({f"{name}_generated": n_tok, f"{name}_prefill_s": pre, f"{name}_s": full,
                    f"{name}_tok_s": n_tok / full, f"{name}_decode_tok_s": decode,
                    f"{name}_dlogp_mean": d["dlogp_mean"], f"{name}_dlogp_max": d["dlogp_max"]})
        if exact and not d["dlogp_max"] <= 1e-4:
            raise Mismatch(f"rollout-engine {kind}: {name}'s sampler log-probs differ from the trainer's by "
                           f"{d['dlogp_max']:.2e} (> 1e-4, fp32)")
    row["ratio"] = row["vllm_tok_s"] / row["hf_tok_s"]
    row["decode_ratio"] = (row["vllm_decode_tok_s"] / row["hf_decode_tok_s"]
                           if row["vllm_decode_tok_s"] and row["hf_decode_tok_s"] else None)
    del model
    gc.collect()
    return row


def engine_steps(model_dir, pool, out_dir, engine, steps, G, P, N):
    """grpo.main for `steps` steps with --rollout-engine `engine` (tiny recipe, no eval, one checkpoint at the end),
    no_stops -> metrics.jsonl's rows of steps 2.. (step 1: warm-up). Their seconds_rollout is the whole rollout phase
    (session, prompts, generate, rewards)."""
    argv = ["--model", model_dir, "--pool", pool, "--out", out_dir, "--steps", str(steps), "--save-every",
            str(steps), "--eval-every", "0", "--group-size", str(G), "--prompts-per-step", str(P),
            "--max-new-tokens", str(N), "--rollout-engine", engine, *TINY_RECIPE]
    with vllm_in_process(), no_stops(), contextlib.redirect_stdout(sys.stderr):
        grpo.main(argv)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    return metrics[1:] if len(metrics) > 1 else metrics


def bench_rollout_engine(args, device, tmp):
    """rollout-engine: decode tokens/s of HFEngine vs VllmEngine on each of --engine-models (compare_engines), then
    one GRPO step's rollout seconds with each --rollout-engine (engine_steps) on the tiny model."""
    why = vllm_import_error()
    if why:
        print(f"\nrollout-engine skipped: {why}")
        return dict(skipped=why)
    P, G, N = args.engine_prompts, args.engine_group_size, args.engine_new_tokens
    rows = []
    for kind in args.engine_models:
        path = (args.model if (args.model and kind == "tiny")
                else build_model_dir(kind, os.path.join(tmp, "eng_" + kind)))
        # the tiny model's calls take about a second and the shared machine's load swings several-fold within
        # seconds: minimum of 2 (quick) or 3 there
        reps = max(args.repeats, 2 if args.quick else 3) if kind == "tiny" else args.repeats
        rows.append(compare_engines(path, kind, device, P, G, N, repeats=reps))
        print(f"  rollout-engine {kind}: vLLM / HF tok/s x{rows[-1]['ratio']:.2f}", file=sys.stderr)
    print_table(f"rollout-engine: rollout.HFEngine (transformers generate, resident, one prefill per prompt) vs "
                f"rollout.VllmEngine (colocated vLLM, in-process) on {device.type} (torch threads: "
                f"{torch.get_num_threads()}), the same weights, prompts and G, "
                f"temperature 1, no stop tokens (every row runs to its length); greedy tokens checked equal", rows,
                [("model", "model", "{}"), ("prompt_tokens", "prompt", "{}"), ("P", "prompts", "{}"), ("G", "G", "{}"),
                 ("new_tokens", "new", "{}"), ("hf_generated", "HF tokens", "{}"),
                 ("vllm_generated", "vLLM tokens", "{}"), ("hf_s", "HF s", "{:.2f}"), ("vllm_s", "vLLM s", "{:.2f}"),
                 ("hf_tok_s", "HF tok/s", "{:.0f}"), ("vllm_tok_s", "vLLM tok/s", "{:.0f}"),
                 ("ratio", "vLLM/HF", "{:.2f}"), ("hf_decode_tok_s", "HF decode tok/s", "{:.0f}"),
                 ("vllm_decode_tok_s", "vLLM decode tok/s", "{:.0f}"), ("decode_ratio", "decode vLLM/HF", "{:.2f}"),
                 ("vllm_dlogp_max", "vLLM |dlogp| max", "{:.1e}"), ("vllm_start_s", "vLLM start s", "{:.1f}")])
    data = make_synthetic(os.path.join(tmp, "eng_data"), args.frames, args.image_scale, layouts="scannet")
    pool = os.path.join(tmp, "eng_pool")
    with contextlib.redirect_stdout(sys.stderr):
        build_pool.main(["--scannet", os.path.join(data, "scannet"), "--out", pool, "--workers", "1"])
    model_dir = args.model or build_model_dir("tiny", os.path.join(tmp, "eng_step_tiny"))
    sp, sg, sn = args.step_prompts, args.step_group_size, args.step_new_tokens
    order = ("hf", "vllm") if args.quick else ("hf", "vllm", "vllm", "hf")  # ABBA: a drifting load hits both alike
    counted = {"hf": [], "vllm": []}
    for k, e in enumerate(order):
        counted[e] += engine_steps(model_dir, pool, os.path.join(tmp, f"eng_run{k}_{e}"), e, args.engine_steps, sg,
                                   sp, sn)
    keys = ("seconds_rollout", "tokens_per_s", "length", "dlogp", "seconds")
    # means as grpo.py logs them; the ratio from the best step of each (as the table above uses minima: the load of
    # a shared machine only ever adds time)
    steps = [dict(engine=e, runs=order.count(e), steps=len(ms), **{k: float(np.mean([m[k] for m in ms])) for k in keys},
                  best_seconds_rollout=min(m["seconds_rollout"] for m in ms), per_step=[{k: m[k] for k in keys}
                                                                                       for m in ms])
             for e, ms in counted.items()]
    step = dict(G=sg, prompts=sp, new_tokens=sn, order=order, hf=steps[0], vllm=steps[1],
                rollout_ratio=steps[0]["best_seconds_rollout"] / steps[1]["best_seconds_rollout"],
                tokens_per_s_ratio=steps[1]["tokens_per_s"] / steps[0]["tokens_per_s"])
    print_table(f"rollout-engine: one GRPO step of grpo.main per --rollout-engine, tiny model, G={sg}, {sp} prompts, "
                f"{sn} new tokens, no stop tokens; runs {' '.join(order)}, steps 2..{args.engine_steps} of each "
                f"(metrics.jsonl)", steps,
                [("engine", "engine", "{}"), ("seconds_rollout", "rollout s", "{:.2f}"),
                 ("best_seconds_rollout", "best rollout s", "{:.2f}"),
                 ("tokens_per_s", "rollout tok/s", "{:.0f}"), ("length", "mean length", "{:.0f}"),
                 ("seconds", "step s", "{:.2f}"), ("dlogp", "|dlogp|", "{:.1e}")])
    for r in rows:
        print(f"  {r['model']}: HF {r['hf_tok_s']:.0f} tok/s, vLLM {r['vllm_tok_s']:.0f} tok/s, "
              f"vLLM/HF x{r['ratio']:.2f}" + (f" (decode x{r['decode_ratio']:.2f})" if r["decode_ratio"] else ""))
    print(f"  GRPO step rollout (best of {steps[0]['steps']} steps each): HF {steps[0]['best_seconds_rollout']:.2f} s, "
          f"vLLM {steps[1]['best_seconds_rollout']:.2f} s (HF/vLLM x{step['rollout_ratio']:.2f}; mean rollout tok/s "
          f"vLLM/HF x{step['tokens_per_s_ratio']:.2f})")
    return dict(rows=rows, step=step)


# -----------------------------------------------------------------------------
# 8) gpu: one prepared command for the first GPU a task is lent (<= 8 min on one GPU, no network)

# real: a random Qwen3-VL-2B-shaped model, two 896 x 672 images (~1,200 visual tokens + the text), G 8, 1,024
# new tokens; dry: the same code on CPU with the tiny model and tiny lengths (the test that keeps it from rotting)
GPU_SHAPES = dict(real=dict(kind="2b", G=8, new_tokens=1024, steps=2, vllm_util=0.35),
                  dry=dict(kind="tiny", G=2, new_tokens=8, steps=2, vllm_util=None))


def gpu_versions(device):
    """Versions of what the GPU bench uses; vllm / torchvision: the version or why it does not import."""
    import transformers
    out = dict(torch=torch.__version__, transformers=transformers.__version__, cuda=torch.version.cuda,
               device=device.type)
    try:
        out["torchvision"] = __import__("torchvision").__version__
    except Exception as e:  # noqa: BLE001 - recorded, not hidden: a CUDA-linked wheel fails with OSError etc.
        out["torchvision"] = f"not importable: {type(e).__name__}: {str(e)[:200]}"
    why = vllm_import_error()  # imported under vllm_in_process: its import sets environment variables too
    out["vllm"] = why or __import__("vllm").__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, gpu_mem_gib=props.total_memory / 2 ** 30)
    return out


def gpu_model_dir(kind, out, device):
    """tiny: tiny_model.py's model; 2b: SIZES["2b"] random (bf16 on disk, built on `device`), with the tiny
    tokenizer, chat template and image processor files (max pixels raised to SIZES' image tokens). bench_gpu
    bans the stop tokens (no_stops), so every completion runs to its length in both engines."""
    if kind == "tiny":
        return build_model_dir("tiny", out)
    import shutil
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration
    tiny = build_model_dir("tiny", out + "_tiny")
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(tiny):  # tokenizer, chat template, image processor
        if not f.endswith((".safetensors", ".json")) or f.startswith(("tokenizer", "preprocessor", "chat", "special")):
            shutil.copy(os.path.join(tiny, f), out)
    with open(os.path.join(out, "preprocessor_config.json")) as f:
        pp = json.load(f)
    pp["size"] = dict(pp.get("size", {}), longest_edge=32 * 32 * SIZES[kind]["image_tokens"])
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump(pp, f, indent=2)
    tok = tiny_model.build_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration(random_vl_config(tok, kind)).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=rollout.stop_ids(tok), pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    del model
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return out


def gpu_hf(model, tok, prompt, warm, G, N, device, autocast):
    """rollout.HFEngine as grpo.py runs it on 1 GPU (fp32 weights, bf16 autocast; one shared prefill; resident):
    decode tokens/s of G x N on prompt = ([enc], [images]) after a warm-up call at this shape on `warm`, and the
    sampler's vs the trainer's log-probs of those tokens."""
    engine = rollout.HFEngine(model, tok, "resident", batch=1, autocast=autocast)
    engine_run(engine, warm, 2, G)
    outs, sec = engine_run(engine, prompt, N, G)
    rows = [o["token_ids"] for o in outs]
    n_tok = sum(len(r) for r in rows)
    return dict(seconds=sec, generated=n_tok, tok_s=n_tok / sec, **dlogp_stats(
        [o["logprobs"] for o in outs], trainer_logprobs(model, prompt[0][0], rows, device, autocast)))


def gpu_vllm(model_dir, model, tok, prompt, warm, G, N, device, autocast, util):
    """rollout.VllmEngine, i.e. exactly what grpo.py --rollout-engine vllm samples with (in-process; every request's
    prompt token ids checked against model_io.encode's; log-probs of logits / T over the whole vocabulary, as the
    trainer's): decode tokens/s of G x N on prompt = ([enc], [images]) after a warm-up call on `warm` (another
    prompt: vLLM caches prefixes and vision-encoder outputs), and its log-probs vs the trainer's of its tokens.
    -> dict, or dict(skipped=why) when vllm does not import, dict(error=the engine's one line) when it stops."""
    why = vllm_import_error()
    if why:
        return dict(skipped=why)
    import vllm
    L = int(prompt[0][0]["input_ids"].shape[1])
    res = dict(vllm=vllm.__version__, grpo_prompt_tokens=L)
    with vllm_in_process():
        t0 = time.perf_counter()
        engine = rollout.VllmEngine(model_dir, tok, device, L + N + 64, seed=0, gpu_memory_utilization=util or 0.5,
                                    image_side=max(max(im.size) for im in prompt[1][0]))
        res["start_s"] = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            engine.sync_weights(model)  # as grpo.py does at start: sleep level 2 (CUDA) discarded the weights
            res["sync_s"] = time.perf_counter() - t0
            engine_run(engine, warm, 2, G)
            outs, sec = engine_run(engine, prompt, N, G)
        except SystemExit as e:  # its one-line stop (a prompt that differs from grpo.encode's): kept in the JSON
            return dict(res, error=str(e), prompt_ids_equal="differs from grpo.encode" not in str(e))
        finally:
            engine.close()
            del engine
    rows = [o["token_ids"] for o in outs]
    n_tok = sum(len(r) for r in rows)
    res.update(seconds=sec, generated=n_tok, tok_s=n_tok / sec, prompt_ids_equal=True, prompt_tokens=L)
    res.update(dlogp_stats([o["logprobs"] for o in outs], trainer_logprobs(model, prompt[0][0], rows, device,
                                                                           autocast)))
    return res


def gpu_step(model_dir, pool, out_dir, shape, device, engine="hf"):
    """One GRPO step of grpo.main with --rollout-engine `engine` (steps 2.. averaged; step_breakdown's phases) at
    the shape's lengths, its sampler-vs-trainer |dlogp| from metrics.jsonl, its peak memory (GPU:
    max_memory_allocated; CPU: VmHWM) next to grpo.py --plan of the same flags on 1 GPU of this one's memory (not
    for vllm on CPU: the plan counts the engine's --vllm-gpu-memory-utilization share of a GPU, while on CPU it
    takes VLLM_CPU_KVCACHE_SPACE GiB of KV whatever the flags say)."""
    G, N = shape["G"], shape["new_tokens"]
    if shape["kind"] == "tiny":
        flags = []
    else:  # the paper's step shape on 1 GPU: 4..12 points, 896 px (~1,400-token prompts), checkpointing, KL
        flags = ["--max-side", str(SIZES[shape["kind"]]["side"]), "--n-min", "4", "--n-max", "12", "--micro-batch",
                 "4", "--grad-checkpointing", "--lr", "1e-6"]
    flags += ["--kl-beta", "0.005", "--rollout-engine", engine]
    with vllm_in_process() if engine == "vllm" else contextlib.nullcontext(), PeakMemory(device) as peak:
        phases = step_breakdown(model_dir, pool, out_dir, shape["steps"], G, 1, N, extra=flags)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    out = dict(phases=phases, dlogp=[m["dlogp"] for m in metrics], length=[m["length"] for m in metrics],
               tokens_per_s=[m.get("tokens_per_s") for m in metrics], peak_gib=peak.mb / 1024, flags=flags)
    if engine == "vllm" and device.type != "cuda":
        return dict(out, plan_peak_gib=None, plan_note="no plan: on CPU vLLM takes VLLM_CPU_KVCACHE_SPACE GiB")
    gib = torch.cuda.get_device_properties(device).total_memory / 2 ** 30 if device.type == "cuda" else 1000
    pargs = grpo.parse_args(["--model", model_dir, "--plan", "--gpus", "1", "--gpu-mem-gib", str(gib),
                             "--plan-device", device.type, "--group-size", str(G), "--prompts-per-step", "1",
                             "--max-new-tokens", str(N), *TINY_RECIPE, *flags])
    _, plan = rollout.format_plan(pargs)
    return dict(out, plan_peak_gib=plan["peak"] / 2 ** 30, plan_phase=plan["peak_phase"],
                measured_over_plan=peak.mb / 1024 / (plan["peak"] / 2 ** 30), plan_fits=plan["fits"])


class DeviceMemory:
    """Peak memory of the whole device while inside `with`, as the driver sees it: on CUDA a thread reads
    torch.cuda.mem_get_info every 20 ms (total - free: vLLM's own allocator and its sleep-mode unmapping included,
    which max_memory_allocated cannot see); on CPU PeakMemory's VmHWM. -> .gib (CUDA: the peak used, all processes
    on the device; CPU: the extra peak above entry)."""

    def __init__(self, device):
        self.cuda, self.cpu = device.type == "cuda", PeakMemory(device)

    def __enter__(self):
        if not self.cuda:
            self.cpu.__enter__()
            return self
        import threading
        self.free_min, self.stop = torch.cuda.mem_get_info()[0], threading.Event()

        def poll():
            while not self.stop.wait(0.02):
                self.free_min = min(self.free_min, torch.cuda.mem_get_info()[0])
        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if not self.cuda:
            self.cpu.__exit__(*exc)
            self.gib = self.cpu.mb / 1024
            return
        self.stop.set()
        self.thread.join()
        free, total = torch.cuda.mem_get_info()
        self.gib = (total - min(self.free_min, free)) / 2 ** 30


GPU_PARTS = ("hf", "vllm", "step_hf", "step_vllm")  # each in its own process, in this order


def gpu_part(part, model_dir, pool, tmp, shape, device):
    """One part of bench.py gpu, in this process -> its figures (+ peak_device_gib: mem_get_info's peak)."""
    G, N = shape["G"], shape["new_tokens"]
    with DeviceMemory(device) as mem:
        if part == "step_vllm" and vllm_import_error():
            return dict(skipped=vllm_import_error())
        if part.startswith("step_"):
            out = gpu_step(model_dir, pool, os.path.join(tmp, "gpu_run_" + part), shape, device, part[5:])
        else:
            model, tok, ip = model_io.load_policy(model_dir, device, torch.float32)
            autocast = model_io.autocast_for(device, 1)
            side = SIZES.get(shape["kind"], {}).get("side", 640)
            text = make_tasks.build_prompt(12, 24)
            prompt, warm = [([model_io.encode(tok, ip, text, im)], [im])
                            for im in (bench_images(side, 0), bench_images(side, 1))]
            with no_stops():
                if part == "hf":
                    out = gpu_hf(model, tok, prompt, warm, G, N, device, autocast)
                else:
                    out = gpu_vllm(model_dir, model, tok, prompt, warm, G, N, device, autocast, shape["vllm_util"])
            out["prompt_tokens"] = int(prompt[0][0]["input_ids"].shape[1])
    return dict(out, peak_device_gib=mem.gib)


def gpu_part_worker(args):
    """(bench.py gpu's child process) one part; whatever it raises is written into its JSON, not lost."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = GPU_SHAPES["dry" if args.dry_run else "real"]
    try:
        out = gpu_part(args.gpu_part, args.gpu_dir, args.gpu_pool, os.path.dirname(args.out), shape, device)
    except Exception as e:  # noqa: BLE001 - recorded in the JSON with its traceback; the other parts still run
        import traceback
        out = dict(error=f"{type(e).__name__}: {str(e)[:500]}", traceback=traceback.format_exc()[-3000:])
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2, default=float)


def run_gpu_part(part, model_dir, pool, tmp, dry):
    """bench.py gpu's part in a fresh process (vLLM allows one sleep-mode allocator per process, and a crash or
    an out-of-memory there must not take the other parts along) -> its figures, or dict(error=...)."""
    out = os.path.join(tmp, f"part_{part}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "gpu", "--worker", "gpu-part", "--gpu-part", part,
           "--gpu-dir", model_dir, "--gpu-pool", pool, "--out", out] + (["--dry-run"] if dry else [])
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(r.stdout[-20000:] + r.stderr[-20000:])  # its progress and log lines: stderr, as the rest
    if not os.path.isfile(out):
        return dict(error=f"its process exited {r.returncode} without a result: {r.stderr.strip()[-1500:]}",
                    part_s=time.perf_counter() - t0)
    with open(out) as f:
        return dict(json.load(f), part_s=time.perf_counter() - t0)


def nvidia_driver():
    """The NVIDIA driver version (nvidia-smi), or why not."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({type(e).__name__})"
    return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else "unknown"


def bench_gpu(args, device, tmp):
    """bench.py gpu [--dry-run]: versions and driver; then four parts, each in its own process (run_gpu_part) and
    each recorded whatever happens to the others: HF and vLLM decode tokens/s and sampler-vs-trainer |dlogp| on one
    prompt x G; one GRPO step by phase with each --rollout-engine, peak vs --plan. No stop tokens anywhere
    (no_stops): every completion runs to its length in both engines. The JSON (--out) is rewritten after every
    part; the one-page summary is printed at the end."""
    shape = GPU_SHAPES["dry" if args.dry_run else "real"]
    if device.type != "cuda" and not args.dry_run:
        sys.exit("bench.py gpu: error: no CUDA device; use --dry-run for the CPU rehearsal with the tiny model")
    res = dict(versions=gpu_versions(device), shape=shape)
    res["versions"]["driver"] = nvidia_driver() if device.type == "cuda" else None
    save = lambda: json.dump(res, open(args.out, "w"), indent=2, default=float)  # noqa: E731
    save()
    t0 = time.perf_counter()
    # built on the CPU: this process keeps no CUDA context, so each part's mem_get_info sees only itself
    model_dir = gpu_model_dir(shape["kind"], os.path.join(tmp, "gpu_" + shape["kind"]), torch.device("cpu"))
    pool = os.path.join(tmp, "gpu_pool")
    if any(p.startswith("step_") for p in args.gpu_parts):  # the steps' pool
        data = make_synthetic(os.path.join(tmp, "gpu_data"), 5, 0.5, layouts="scannet")
        with contextlib.redirect_stdout(sys.stderr):
            build_pool.main(["--scannet", os.path.join(data, "scannet"), "--out", pool, "--workers", "1"])
    res["build_s"] = time.perf_counter() - t0
    for part in GPU_PARTS:
        res[part] = (run_gpu_part(part, model_dir, pool, tmp, args.dry_run) if part in args.gpu_parts
                     else dict(skipped="not in --gpu-parts"))
        if part == "vllm" and "tok_s" in res["vllm"] and "tok_s" in res["hf"]:
            res["vllm_over_hf_tok_s"] = res["vllm"]["tok_s"] / res["hf"]["tok_s"]
        save()
    res["prompt_tokens"] = res["hf"].get("prompt_tokens", res["vllm"].get("prompt_tokens"))
    res["total_s"] = time.perf_counter() - t0
    save()
    print("\n".join(gpu_summary(res)))
    return res


def gpu_summary(res):
    """The one page a short GPU session needs: versions and driver, then each part's figures or its error."""
    v, shape = res["versions"], res["shape"]
    lines = [f"bench.py gpu on {v.get('gpu', v['device'])} ({v.get('gpu_mem_gib', 0):.0f} GiB), driver "
             f"{v.get('driver')}: torch {v['torch']} (CUDA {v['cuda']}), transformers {v['transformers']}, "
             f"vllm {v['vllm']}, torchvision {v['torchvision']}",
             f"  prompt {res.get('prompt_tokens')} tokens x G {shape['G']} x {shape['new_tokens']} new, "
             f"model {shape['kind']}; {res.get('total_s', 0):.0f} s in all"]
    for name in ("hf", "vllm"):
        p = res[name]
        if "tok_s" in p:
            lines.append(f"  {name:4s} decode {p['tok_s']:.0f} tok/s, |dlogp| mean {p['dlogp_mean']:.2e} max "
                         f"{p['dlogp_max']:.2e}, device peak {p['peak_device_gib']:.2f} GiB"
                         + (f" (x{res['vllm_over_hf_tok_s']:.2f} HF)" if name == "vllm" and
                            "vllm_over_hf_tok_s" in res else ""))
        else:
            lines.append(f"  {name:4s} {'skipped' if 'skipped' in p else 'FAILED'}: "
                         f"{p.get('skipped') or p.get('error')}")
    for name in ("step_hf", "step_vllm"):
        st = res[name]
        if "phases" in st:
            ph = st["phases"]
            plan = (f"vs plan {st['plan_peak_gib']:.2f} GiB (x{st['measured_over_plan']:.2f})"
                    if st.get("plan_peak_gib") else f"({st.get('plan_note')})")
            lines.append(f"  {name}: {ph['total']:.1f} s/step (" + ", ".join(
                f"{k.strip()} {ph[k]:.1f}" for k in PHASES if ph.get(k)) + f"), |dlogp| {max(st['dlogp']):.2e}, "
                f"peak {st['peak_gib']:.2f} GiB (device {st['peak_device_gib']:.2f}) {plan}")
        else:
            lines.append(f"  {name} {'skipped' if 'skipped' in st else 'FAILED'}: "
                         f"{st.get('skipped') or st.get('error')}")
    return lines

# -----------------------------------------------------------------------------


def machine_info(device):
    info = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), platform=platform.platform(),
                python=platform.python_version(), torch=torch.__version__, cpus=os.cpu_count(),
                threads=torch.get_num_threads(), device=device.type)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        with open("/proc/loadavg") as f:
            info["loadavg"] = f.read().split()[:3]
    except OSError:
        pass
    return info


def int_list(s):
    return [int(x) for x in s.split(",") if x]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["all", "logprobs", "rollout", "pool", "step", "rollout-fsdp", "plan-check",
                                        "rollout-engine", "gpu"])
    ap.add_argument("--dry-run", action="store_true",
                    help="gpu: the same code on CPU with the tiny model and tiny lengths (the test)")
    ap.add_argument("--quick", action="store_true", help="small shapes: `all --quick` takes ~2-3 min on 2 CPU cores")
    ap.add_argument("--out", default="bench/results.json")
    ap.add_argument("--model", default=None, help="model dir for rollout/step (default: build the tiny model)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch (OpenMP) threads of this process (default: torch's, one per core). On a shared CPU "
                         "machine use 1: with 2 threads on 2 cores other jobs' load inflated times 10-30x (OpenMP "
                         "threads waiting for a descheduled sibling), with 1 the minimum over repeats is stable")
    ap.add_argument("--repeats", type=int, default=None, help="timing repeats, the minimum is kept (quick 1, else 2)")
    ap.add_argument("--lp-lengths", type=int_list, default=None, help="completion lengths T (quick 3072, else 1024,2048,5120)")
    ap.add_argument("--lp-hidden", type=int, default=None, help="hidden size (quick 256, else 512)")
    ap.add_argument("--lp-batch", type=int, default=1)
    ap.add_argument("--lp-prompt", type=int, default=64, help="prompt tokens before the completion")
    ap.add_argument("--group-sizes", type=int_list, default=[8, 32])
    ap.add_argument("--new-tokens", type=int_list, default=None, help="tiny model completion lengths (quick 16,128)")
    ap.add_argument("--small-new-tokens", type=int_list, default=None, help="small model lengths (quick 16)")
    ap.add_argument("--mid-new-tokens", type=int_list, default=[16, 1024], help="mid model (GPU only) lengths")
    ap.add_argument("--frames", type=int, default=None, help="synthetic frames per scene (quick 5)")
    ap.add_argument("--image-scale", type=float, default=None, help="synthetic image scale (quick 0.5, else 1.0)")
    ap.add_argument("--max-pairs", type=int, default=None, help="pool pairs timed (quick 16, else 60)")
    ap.add_argument("--step-steps", type=int, default=3)
    ap.add_argument("--step-group-size", type=int, default=8)
    ap.add_argument("--step-prompts", type=int, default=2)
    ap.add_argument("--step-new-tokens", type=int, default=48)
    ap.add_argument("--engine-models", type=lambda v: [k for k in v.split(",") if k], default=None,
                    help="rollout-engine: models compared (tiny: tiny_model.py's; small: SIZES['small'], random; "
                         "quick tiny, else tiny,small)")
    ap.add_argument("--engine-prompts", type=int, default=2, help="rollout-engine: prompts per generate call")
    ap.add_argument("--engine-group-size", type=int, default=8, help="rollout-engine: G completions per prompt")
    ap.add_argument("--engine-new-tokens", type=int, default=None,
                    help="rollout-engine: new tokens (quick 64, else 256)")
    ap.add_argument("--engine-steps", type=int, default=None,
                    help="rollout-engine: grpo.py steps per engine, the first one not counted (quick 2, else 4); "
                         "G, prompts and new tokens: --step-group-size, --step-prompts, --step-new-tokens")
    ap.add_argument("--fsdp-lengths", type=int_list, default=None, help="rollout-fsdp lengths (quick 8,32, else 16,128)")
    ap.add_argument("--fsdp-group-size", type=int, default=4, help="rollout-fsdp: G per prompt")
    ap.add_argument("--fsdp-side", type=int, default=None, help="rollout-fsdp image side (default: per model)")
    ap.add_argument("--fsdp-dirs", default=None, help=argparse.SUPPRESS)  # kind=model dir,... (set by the launcher)
    ap.add_argument("--plan-pool", default=None, help=argparse.SUPPRESS)  # plan-check worker's pool and run dir
    ap.add_argument("--plan-run", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one rank of rollout-fsdp (torchrun)
    ap.add_argument("--gpu-parts", type=lambda v: [k for k in v.split(",") if k], default=list(GPU_PARTS),
                    help=f"gpu: the parts to run ({','.join(GPU_PARTS)}; each in its own process)")
    ap.add_argument("--gpu-part", default=None, choices=GPU_PARTS, help=argparse.SUPPRESS)  # gpu's child process
    ap.add_argument("--gpu-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gpu-pool", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    q = args.quick
    defaults = dict(repeats=1 if q else 2, lp_lengths=[3072] if q else [1024, 2048, 5120],
                    lp_hidden=256 if q else 512, new_tokens=[16, 128] if q else [16, 512],
                    small_new_tokens=[16] if q else [16, 256], frames=5 if q else 8,
                    image_scale=0.5 if q else 1.0, max_pairs=16 if q else 60, fsdp_lengths=[8, 32] if q else [16, 128],
                    engine_new_tokens=64 if q else 256, engine_models=["tiny"] if q else ["tiny", "small"],
                    engine_steps=2 if q else 4)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    unknown = set(args.engine_models) - set(SIZES) - {"tiny"}
    if unknown:
        sys.exit(f"bench.py: error: --engine-models {','.join(sorted(unknown))}: expected tiny or one of "
                 f"{', '.join(SIZES)}")
    if args.model is not None and not os.path.isdir(args.model):
        sys.exit(f"bench.py: error: --model {args.model} does not exist")
    if args.worker:
        if args.command == "gpu":
            return gpu_part_worker(args)
        return rollout_fsdp_worker(args) if args.command == "rollout-fsdp" else plan_check_worker(args)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = dict(machine=machine_info(device), args=vars(args))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    commands = ["logprobs", "rollout", "pool", "step", "rollout-fsdp", "rollout-engine"] if args.command == "all" \
        else [args.command]
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        for cmd in commands:
            if cmd == "logprobs":
                results[cmd] = bench_logprobs(args, device)
            elif cmd == "rollout":
                results[cmd] = bench_rollout(args, device, tmp)
            elif cmd == "pool":
                results[cmd] = bench_pool(args, tmp)
            elif cmd == "rollout-fsdp":
                results[cmd] = bench_rollout_fsdp(args, device, tmp)
            elif cmd == "plan-check":
                results[cmd] = bench_plan_check(args, device, tmp)
            elif cmd == "rollout-engine":
                results[cmd] = bench_rollout_engine(args, device, tmp)
            elif cmd == "gpu":  # writes its own JSON (--out) part by part
                results = bench_gpu(args, device, tmp)
                continue
            else:
                results[cmd] = bench_step(args, device, tmp)
            with open(args.out, "w") as f:  # after every command: a crash later keeps what was measured
                json.dump(results, f, indent=2, default=float)
    print(f"\nbench.py: {', '.join(commands)} on {device.type} in {time.time() - t0:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
