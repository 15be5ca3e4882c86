"""Loading a Qwen3-VL policy and its processors, encoding a prompt, and the completion log-probs: the model
plumbing grpo.py, evaluate.py, bench.py and tiny_model.py share.
  load_policy(path) -> (model, tokenizer, image_processor); load_processors(path) -> (tokenizer, image_processor)
  encode(tokenizer, image_processor, prompt, images) -> the model's inputs for one prompt (batch dim 1)
  completion_logprobs(model, batch, temperature) -> (B, T) log-probs of the completion tokens, chunked over T
AutoTokenizer + AutoImageProcessor, never AutoProcessor (its video half needs torchvision; see docs/grpo.md)."""
import contextlib
import json
import os
import shutil
import sys
import time

import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer


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


def cap_visual_tokens(image_processor, tokens):
    """The release's image budget: at most `tokens` visual tokens an image, i.e. max pixels = tokens x (patch x
    merge)^2 (the processor resizes larger images down, keeping the aspect ratio)."""
    image_processor.size["longest_edge"] = tokens * (image_processor.patch_size * image_processor.merge_size) ** 2


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


def autocast_for(device, world):
    """bf16 autocast on 1 GPU (FSDP2's mixed precision does it when sharded); off on CPU."""
    if device.type == "cuda" and world == 1:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return lambda: torch.autocast("cpu", enabled=False)


def sync_time(device):
    """time.perf_counter() once the device's queued work is done (CUDA runs asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


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
