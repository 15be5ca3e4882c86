"""
tiny_model.py: build a tiny, randomly initialised Qwen3-VL that the rest of widematch loads exactly like a real
checkpoint, so the whole pipeline (GRPO, evaluation) runs on a laptop CPU in minutes.

Usage:
    python tiny_model.py --out demo_data/tiny-qwen3vl                      # random model, no data needed
    python tiny_model.py --out demo_data/tiny-qwen3vl --pool pool          # + format warm-up (500 steps, ~1 min)
    python tiny_model.py --out demo_data/tiny-qwen3vl --pool pool --warmup-steps 0   # skip the warm-up
    python tiny_model.py --out demo_data/tiny-qwen3vl --pool pool --actor-share 0    # no ActoR prompts in it

Input: optionally --pool (the warm-up's prompts are drawn online by make_tasks from its train split).
Output: a model directory in --out (config.json + model.safetensors, tokenizer, processor configs, chat template,
generation_config.json, args.json), all with save_pretrained, so `model_io.load_policy(out)` / from_pretrained
just work. The optional warm-up teaches the answer format on RANDOM mappings (nothing about which label is
right) and ends by printing the format rate.

Details: docs/tiny_model.md (the model's sizes, the tokenizer, every file, the warm-up's loss and ActoR share,
its printout; not in the paper).
"""
import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (GenerationConfig, PreTrainedTokenizerFast, Qwen3VLConfig,
                          Qwen3VLForConditionalGeneration)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import make_tasks
import reward
from widematch import rollout  # generate
from widematch import model_io  # encode, the training batch, completion states
from widematch import prompts

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# Qwen-style chat template: each image becomes <|vision_start|><|image_pad|><|vision_end|>; model_io.encode expands
# the single <|image_pad|> to the image's number of visual tokens (what Qwen's processor does).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# -----------------------------------------------------------------------------
# Tokenizer


def tokenizer_corpus(seed=0):
    """A few hundred lines: plain sentences, the answer grammar and many answer blocks, digits and letters, so
    that prompts and answers tokenize into few tokens."""
    rng = random.Random(seed)
    lines = [
        "Two images of the same scene are shown, taken from very different viewpoints.",
        "Numbered points are drawn on the first image and on the second image.",
        "For each point of image 1, find the point of image 2 that shows the same 3D point, or answer none.",
        "Think about the geometry, the objects and the context before you answer.",
        "The camera moved to the left and rotated, so the table appears on the right side now.",
        "Point 3 lies on the corner of the chair; in image 2 that corner is hidden behind the sofa.",
        "Image 1 Image 2 point points match matches none visible occluded left right top bottom",
        prompts.default_prompt(think=True), prompts.default_prompt(think=False),
        *[make_tasks.build_prompt(n, m) for n, m in ((3, 5), (4, 12), (12, 26), (7, 9))],
        make_tasks.build_prompt(4, 6, actor=True), "user assistant system",
        " ".join(str(i) for i in range(100)),
        " ".join(reward.y_labels_for(60)),
        "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;!?()[]<>/-=+*'\"",
    ]
    for _ in range(400):
        n, m = rng.randint(1, 20), rng.randint(1, 26)
        labels = reward.y_labels_for(m) + [None]
        lines.append(reward.format_answer({i + 1: rng.choice(labels) for i in range(n)}, thinking=WARMUP_THINKING))
    for _ in range(100):  # ActoR action blocks (make_tasks.py --actor)
        a = {k: rng.randrange(-12, 13) * 15 for k in ("yaw", "pitch", "roll")}
        lines.append(reward.format_actions(dict(a, pitch=max(-90, min(90, a["pitch"])),
                                                move=rng.choice(("forward", "back", "left", "right", "up", "down")))))
    return lines


# GPT-2's pre-tokenizer regex plus pieces of the answer grammar kept whole, so BPE can make each point of the
# JSON answer two tokens ('", "3": "' + '5', the first '{"1": "', the end '"}'), the fence lines and the tags
# one token each: the sampled answer of the tiny model then has few places to go wrong.
PRETOKENIZE = (r"\n?</?[a-z]+>|\n```json\n|\n```|(?:\{|\", )\"[0-9]+\": \"|\"\}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|"
               r" ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
WARMUP_THINKING = ""  # the warm-up's thinking block is empty: it teaches the format, not reasoning


def build_tokenizer(vocab_size=2048):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
        additional_special_tokens=SPECIAL_TOKENS[1:], chat_template=CHAT_TEMPLATE)

# -----------------------------------------------------------------------------
# Model and image processor


def build_image_processor():
    # 16-px patches merged 2x2 -> one visual token per 32x32 pixels; max_pixels caps a 640x480 image at 256x192
    # (48 tokens) so CPU rollouts stay fast. Qwen3-VL uses mean = std = 0.5.
    return Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=32 * 32 * 4,
                                    max_pixels=32 * 32 * 48, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def write_processor_files(out, image_processor):
    """The rest of a hub VL repo's processor set: the processor's chat template in the legacy chat_template.json
    (where Qwen's hub repos keep it; the same template as the tokenizer's) and a video_preprocessor_config.json
    (Qwen3VLVideoProcessor; written as JSON because building that class needs torchvision), so
    AutoProcessor.from_pretrained and `vllm serve` load this dir as they load Qwen/Qwen3-VL-*."""
    with open(os.path.join(out, "chat_template.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE}, f, indent=2)
    ip = image_processor
    video = dict(video_processor_type="Qwen3VLVideoProcessor", patch_size=ip.patch_size,
                 temporal_patch_size=ip.temporal_patch_size, merge_size=ip.merge_size, image_mean=list(ip.image_mean),
                 image_std=list(ip.image_std), do_convert_rgb=True, do_resize=True, resample=3, do_rescale=True,
                 rescale_factor=1 / 255, do_normalize=True, do_sample_frames=True, fps=2, min_frames=4,
                 max_frames=64, size=dict(ip.size), return_metadata=False)
    with open(os.path.join(out, "video_preprocessor_config.json"), "w") as f:
        json.dump(video, f, indent=2)


def build_model(tokenizer, seed=0):
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 6, 6],
                                              mrope_interleaved=True),
                         pad_token_id=ids["<|endoftext|>"], bos_token_id=None, eos_token_id=ids["<|im_end|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                           num_position_embeddings=256, deepstack_visual_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                                               pad_token_id=ids["<|endoftext|>"])
    return model

# -----------------------------------------------------------------------------
# Optional format warm-up (supervised, random mappings)


MOVES = ("forward", "back", "left", "right", "up", "down", "stay")  # every move word of reward.py's grammar


def action_angles(step):
    """Every well-formed angle per axis: the multiples of step in (-180, 180] (yaw, roll) or [-90, 90] (pitch)."""
    turn = np.arange(int(np.floor(-180 / step)) + 1, int(np.floor(180 / step)) + 1) * step
    tilt = np.arange(int(np.ceil(-90 / step)), int(np.floor(90 / step)) + 1) * step
    return dict(yaw=[float(a) for a in turn], pitch=[float(a) for a in tilt], roll=[float(a) for a in turn])


def random_actions(rng, step):
    """Well-formed but RANDOM ActoR actions: each angle uniform over action_angles(step), a random move word.
    Teaches the action grammar, not the camera motion."""
    angles = action_angles(step)
    return dict({k: v[rng.integers(len(v))] for k, v in angles.items()}, move=MOVES[rng.integers(len(MOVES))])


def answer_tokens(tokenizer, task, rng):
    """A random well-formed answer for the task -> (token ids ending in <|im_end|>, the set of valid label token
    ids at each position: None where the token is fixed by the grammar or is an action token). ActoR tasks
    (task["actor"]) get a random action block before the answer block; its tokens keep one-hot targets (the
    draw is random, so in expectation the target is the random draw's own distribution, not the pose)."""
    labels = list(task["y_labels"]) + [None]
    mapping = {i + 1: labels[rng.integers(len(labels))] for i in range(task["n"])}
    text = reward.format_answer(mapping, thinking=WARMUP_THINKING)
    if task.get("actor"):  # the action block between the thinking block and the answer
        text = (f"<thinking>\n{WARMUP_THINKING}\n</thinking>\n" + reward.format_actions(random_actions(
            rng, task["action_step"])) + "\n" + reward.format_answer(mapping, thinking=None))
    ids = tokenizer(text + "<|im_end|>", add_special_tokens=False).input_ids
    valid = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize("none" if lab is None else lab)) for lab in labels]
    label_ids = {v[0] for v in valid if len(v) == 1}
    keys = [tokenizer.tokenize(f'{{"{i + 1}": "' if i == 0 else f'", "{i + 1}": "') for i in range(task["n"])]
    if len(label_ids) < len(labels) or any(len(k) != 1 for k in keys):  # not one token each: one-hot targets
        return ids, [None] * len(ids)
    # the action block has no key token, so only the answer's label positions get the uniform targets
    key_ids = set(tokenizer.convert_tokens_to_ids([k[0] for k in keys]))
    return ids, [label_ids if k > 0 and ids[k - 1] in key_ids else None for k in range(len(ids))]


def answer_loss(model, batch, soft):
    """Token-mean cross-entropy of the answer tokens where each label position's target is the UNIFORM
    distribution over the task's valid labels (the expectation of the random-mapping loss, without its noise) and
    every other position's target is its token. soft: per sample, per completion token, None or a set of ids."""
    hc, target = model_io.completion_hidden(model, batch)                                          # (B, T, H), (B, T)
    logp = torch.log_softmax(model.lm_head(hc).float(), -1)  # full logits: fine at a ~1k vocab      (B, T, V)
    q = torch.zeros_like(logp)                                                                     # (B, T, V)
    q.scatter_(2, target[..., None], 1.0)  # one-hot: the token itself
    for b, per_token in enumerate(soft):
        for k, ids in enumerate(per_token):
            if ids is not None:
                q[b, k] = 0.0
                q[b, k, sorted(ids)] = 1.0 / len(ids)
    return -((q * logp).sum(-1) * batch["mask"]).sum() / batch["mask"].sum()


def warmup(model, tokenizer, image_processor, pool_dir, steps, batch, lr, max_side, n_range, seed, actor_share=0.0,
           buffer=32, fresh=2):
    """SFT on well-formed answers with RANDOM mappings (answer_loss: uniform targets over the valid labels), so
    the model learns the format and the label range, and nothing about which label is right; a share actor_share
    of the tasks are ActoR prompts answered with random actions + random mappings (answer_tokens). Prompts come from a
    buffer of `buffer` train tasks of which `fresh` are replaced by newly drawn ones every step (drawing a task
    costs about as much as this tiny model's step), so the model sees many (n, m, image) combinations instead of
    memorising a few prompts. lr: 10-step linear warm-up, then cosine decay to 10%."""
    rng = np.random.default_rng(seed)
    train = split_pairs(pool_dir, "train")

    def draw(k):
        return [(task, model_io.encode(tokenizer, image_processor, task["prompt"], images))
                for task, images in draw_tasks(train, pool_dir, k, rng, max_side, n_range, actor_share)]
    prompts = draw(buffer)
    if not prompts:
        sys.exit(f"tiny_model.py: error: no train pair in {pool_dir} can supply a task")
    # the format does not depend on what the images show: the vision tower stays random (and skips its backward)
    model.model.visual.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / 10, 0.1 + 0.45 * (1 + np.cos(np.pi * s / max(1, steps)))))
    model.train()
    for step in range(steps):
        for new in draw(fresh):
            prompts[int(rng.integers(len(prompts)))] = new
        samples, soft = [], []
        for k in rng.integers(len(prompts), size=batch):
            task, enc = prompts[k]
            ids, valid = answer_tokens(tokenizer, task, rng)
            samples.append(dict(enc=enc, token_ids=ids))
            soft.append(valid)
        loss = answer_loss(model, model_io.collate_samples(samples, tokenizer.pad_token_id, "cpu"), soft)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"warm-up step {step:4d} | loss {loss.item():.3f} | lr {sched.get_last_lr()[0]:.1e}")
    model.model.visual.requires_grad_(True)
    model.eval()

def split_pairs(pool_dir, split):
    """The pool's pairs of one split (read once per run, not per draw); exits when there are none."""
    pairs = make_tasks.load_pairs(pool_dir, split)
    if not pairs:
        sys.exit(f"tiny_model.py: error: {pool_dir}/pairs.jsonl has no {split} pairs")
    return pairs


def draw_tasks(pairs, pool_dir, k, rng, max_side, n_range, actor_share=0.0):
    """k random tasks (any level / spatial mode) from these pool pairs -> [(task, [img1, img2])]; each is an
    ActoR prompt with probability actor_share."""
    out = []
    for _ in range(50 * k):
        if len(out) == k:
            break
        level, spatial = rng.choice(make_tasks.LEVELS), rng.choice(make_tasks.SPATIAL)
        # share 0 draws no extra random number: plain-only task sets (the format check) do not depend on it
        actor = actor_share > 0 and bool(rng.random() < actor_share)
        try:
            pair = pairs[rng.integers(len(pairs))]
            n = int(rng.integers(n_range[0], n_range[1] + 1))  # as grpo.py draws its tasks
            out.append(make_tasks.make_task(pair, make_tasks.load_arrays(pool_dir, pair), level, spatial, n, rng,
                                            pool_dir, max_side, actor=actor, action_step=reward.ACTION_STEP_DEG))
        except make_tasks.TaskUnavailable:
            continue
    return out


def well_formed(text, task):
    """1.0 when the answer block has the task's n lines, and for an ActoR task the action block parses too."""
    ok = reward.score(text, task)["format"] == 1.0
    return float(ok and (not task.get("actor") or reward.parse_actions(text) is not None))


@torch.no_grad()
def format_rate(model, tokenizer, image_processor, tasks, group_size=4, max_new_tokens=48):
    """Share of well-formed answers (reward format 1, and for ActoR tasks also a parsed action block) ->
    (sampled at temperature 1, group_size per task, greedy)."""
    encs = [model_io.encode(tokenizer, image_processor, t["prompt"], imgs) for t, imgs in tasks]
    model.eval()
    rates = []
    for greedy in (False, True):
        outs = rollout.generate(model, tokenizer, encs, max_new_tokens, 1.0, greedy=greedy,
                             group_size=1 if greedy else group_size)
        per = 1 if greedy else group_size
        rates.append(float(np.mean([well_formed(o["text"], tasks[i // per][0]) for i, o in enumerate(outs)])))
    return tuple(rates)

# -----------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_data/tiny-qwen3vl", help="output directory (save_pretrained)")
    ap.add_argument("--pool", default=None, help="pool dir for the optional format warm-up (needs pairs.jsonl)")
    ap.add_argument("--warmup-steps", type=int, default=500,
                    help="SFT steps on random well-formed answers (with --pool)")
    ap.add_argument("--warmup-batch", type=int, default=8)
    ap.add_argument("--warmup-lr", type=float, default=3e-3)
    ap.add_argument("--max-side", type=int, default=640, help="longest side of the prompted images (as demo.sh runs grpo.py)")
    ap.add_argument("--n-min", type=int, default=3, help="points in image 1 (as demo.sh passes grpo.py --n-min/--n-max)")
    ap.add_argument("--n-max", type=int, default=5)
    ap.add_argument("--actor-share", type=float, default=0.25,
                    help="share of warm-up tasks that are ActoR prompts (random action block + random answer)")
    ap.add_argument("--format-tasks", type=int, default=16, help="fresh tasks to measure the format rate on (0: skip)")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 0.0 <= args.actor_share <= 1.0:
        sys.exit(f"tiny_model.py: error: --actor-share {args.actor_share} is not in [0, 1]")
    if args.pool is not None and not os.path.isfile(os.path.join(args.pool, "pairs.jsonl")):
        sys.exit(f"tiny_model.py: error: --pool {args.pool} has no pairs.jsonl")
    t0 = time.time()

    tokenizer = build_tokenizer(args.vocab_size)
    image_processor = build_image_processor()
    model = build_model(tokenizer, args.seed)
    if args.pool is not None and args.warmup_steps > 0:
        warmup(model, tokenizer, image_processor, args.pool, args.warmup_steps, args.warmup_batch,
               args.warmup_lr, args.max_side, (args.n_min, args.n_max), args.seed, args.actor_share)
        if args.format_tasks > 0:  # held-out tasks (test split, another seed), as grpo.py samples them
            pairs, split = make_tasks.load_pairs(args.pool, "test"), "test"
            if not pairs:
                pairs, split = split_pairs(args.pool, "train"), "train"
            rng = np.random.default_rng(args.seed + 1)
            tasks = draw_tasks(pairs, args.pool, args.format_tasks, rng, args.max_side, (args.n_min, args.n_max))
            torch.manual_seed(args.seed)
            sampled, greedy = format_rate(model, tokenizer, image_processor, tasks)
            # ActoR prompts (as grpo.py --actor draws them), measured even at --actor-share 0 to show the gap
            actor_tasks = draw_tasks(pairs, args.pool, args.format_tasks, rng, args.max_side,
                                     (args.n_min, args.n_max), actor_share=1.0)
            a_sampled, a_greedy = format_rate(model, tokenizer, image_processor, actor_tasks)
            print(f"warm-up: format rate {sampled:.2f} (sampled), {greedy:.2f} (greedy) on {len(tasks)} fresh "
                  f"{split} tasks; actor {a_sampled:.2f} (sampled), {a_greedy:.2f} (greedy) on "
                  f"{len(actor_tasks)} (action + answer block)")

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    image_processor.save_pretrained(args.out)
    write_processor_files(args.out, image_processor)
    with open(os.path.join(args.out, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny_model.py: {n_params / 1e6:.2f} M parameters, vocab {len(tokenizer)}, "
          f"warm-up {args.warmup_steps if args.pool else 0} steps -> {args.out} ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
