"""
Evaluate models and classical baselines on ReasonMatch-style matching tasks, side by side: every model answers
each task's prompt, reward.py scores the answer, the scores are aggregated overall and by source / level / scene
type / layout / overlap bin and on the widest-Δv subset, and one report puts all models in a table.

    python evaluate.py --tasks tasks/test.jsonl --out eval --baseline sift random none   # no model needed
    python evaluate.py runs/grpo/step_000200 Qwen/Qwen3-VL-8B-Instruct --tasks tasks/test.jsonl --out eval --device cuda
    OPENAI_API_KEY=... python evaluate.py --api-base http://gpu-host:8000/v1 --api-model MODEL --tasks tasks/test.jsonl
    python evaluate.py --answers their_answers.jsonl --name their-model --tasks tasks/test.jsonl --out eval

Also: --engine vllm, --answers from lmms-eval / VLMEvalKit, --reasonmatch (the released ReasonMatch-Bench),
--transfer (the paper's transfer table from lmms-eval results).

Inputs: make_tasks.py's tasks jsonl (images beside it); CKPTs, an endpoint, an answers file or --baseline.
Outputs: <out>/<name>/predictions.jsonl (one scored row per task, resumable), run.json, metrics.json,
show/*.png (--show K); <out>/report.md, f1_vs_bin.png, f1_by_source.png over every model evaluated into <out>.

Every command, format, output field, metric, the SIFT rule and the departures from the paper: docs/evaluate.md.
"""

import argparse
import hashlib
import json
import math
import os
import re
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

import reward
from widematch import api, reasonmatch
from widematch.answers import json_lines, read_any_answers
from widematch.api import api_request
from widematch.baselines import SiftMatcher, answer_none, answer_random
from widematch.report import (pct, plot_f1_by_source, plot_f1_vs_bin, report_metrics, write_report, write_shows,
                              write_transfer)
from widematch.runs import check_run_info, model_dtype, model_name, read_predictions, unique_names

BASELINES = ("sift", "random", "none")
BREAKDOWNS = ("source", "level", "scene_type", "spatial", "bin")
TASK_FIELDS = ("pair_id", "source", "scene_type", "level", "spatial", "bin", "delta_v")


# -----------------------------------------------------------------------------
# 1. the tasks, and what answers them


def load_tasks(path):
    """Tasks of a make_tasks.py jsonl file, in file order."""
    tasks = [t for _, t in json_lines(path, str(path))]
    ids = [t["task_id"] for t in tasks]
    if len(set(ids)) != len(ids):
        sys.exit(f"evaluate.py: error: {path} has duplicate task_ids")
    return tasks


def resolve_ckpt(ckpt):
    """Checkpoint dir / HF dir -> its absolute path, run dir -> its latest step, owner/name -> a hub id."""
    p = Path(ckpt)
    if p.is_dir():
        if (p / "config.json").exists():
            return str(p.resolve())
        from widematch.checkpoint import latest_checkpoint  # torch and transformers only when a model is evaluated
        latest = latest_checkpoint(str(p), with_weights=True)  # the newest with the bf16 export
        if latest is None:
            hint = " (a grpo.py checkpoint without the bf16 export: see its --export-every)" \
                if (p / "meta.json").exists() else ""
            sys.exit(f"evaluate.py: error: {ckpt} has no config.json and no complete step_* checkpoint{hint}")
        return str(Path(latest).resolve())
    if p.exists() or len(p.parts) != 2 or p.parent.exists():  # a local path that is not a model dir
        sys.exit(f"evaluate.py: error: CKPT {ckpt} is neither a model dir, a run dir nor a hub id (owner/name)")
    return str(ckpt)


# -----------------------------------------------------------------------------
# 2. ask: each answerer maps tasks to a stream of (task, dict(text=answer, ...extra row fields))


def in_batches(answer_batch, batch_size):
    """A batch answerer (list of tasks -> list of answers) as a stream of (task, answer), batch after batch."""
    def stream(todo):
        for b in range(0, len(todo), batch_size):
            batch = todo[b:b + batch_size]
            yield from zip(batch, answer_batch(batch))
    return stream


def model_answerer(ckpt, tasks_dir, tasks, args):
    """A local model through a rollout engine (widematch.rollout): --engine hf, transformers generate on the model
    loaded here; --engine vllm, one vLLM engine (prompt ids checked against encode's, the same banned tokens and
    stops, room for the longest prompt of the tasks), each batch of --batch-size tasks submitted at once (continuous
    batching). Either way the prompts are model_io.encode's, and each batch is written when it is done."""
    from widematch import model_io  # torch, transformers (and vllm) only when a model is evaluated
    from widematch import rollout
    import torch
    from PIL import Image
    dtype = getattr(torch, model_dtype(args))
    if args.engine == "vllm":
        tokenizer, image_processor = model_io.load_processors(ckpt)
        cfg = json.loads(model_io.read_model_file(ckpt, "config.json") or "null")  # a local dir, or a hub id in the cache
        if not isinstance(cfg, dict):
            sys.exit(f"evaluate.py: error: {ckpt}: no config.json (a local model dir, or a hub id in the HF cache)")
        side = max(max(Image.open(tasks_dir / p).size) for t in tasks for p in t["images"])  # headers only
        longest = max(((t.get("system") or "") + t["prompt"] for t in tasks), key=len)  # system message included
        room = rollout.prompt_bound(cfg, side, longest)
        engine = rollout.VllmEngine(ckpt, tokenizer, args.device, room + args.max_new_tokens, seed=args.seed,
                                    gpu_memory_utilization=args.vllm_gpu_memory_utilization, sleep=False, dtype=dtype,
                                    image_side=side)  # vLLM profiles with two images of the tasks' largest side
    else:
        model, tokenizer, image_processor = model_io.load_policy(ckpt, args.device, dtype, device_map=args.device_map)
        engine = rollout.HFEngine(model, tokenizer, batch=args.batch_size)

    def answer(batch):
        images = [[Image.open(tasks_dir / p).convert("RGB") for p in task["images"]] for task in batch]
        encs = [model_io.encode(tokenizer, image_processor, t["prompt"], ims, system=t.get("system"))
                for t, ims in zip(batch, images)]
        # seeded per batch by its first task, so a rerun of the same batches samples the same tokens (vllm: the
        # per-request seeds are drawn from this)
        torch.manual_seed(args.seed + zlib.crc32(batch[0]["task_id"].encode()))
        with engine.session():
            outs = engine.generate(encs, images, args.max_new_tokens, args.temperature, args.temperature <= 0,
                                   names=[t["task_id"] for t in batch])
        return [dict(text=o["text"], truncated=o["truncated"], n_tokens=len(o["token_ids"]),
                     usage=dict(prompt_tokens=e["input_ids"].shape[1], completion_tokens=len(o["token_ids"])))
                for e, o in zip(encs, outs)]
    return in_batches(answer, args.batch_size)


def vllm_decoding(model_dir):
    """--api-tokenizer: (tokenizer, extra request fields) that make a vLLM server decode the checkpoint it serves
    as our own generate does (rollout.generate, the local evaluate.py path): stop at <|im_end|> / <|endoftext|>
    (stop_token_ids: vLLM alone stops only at the tokenizer's eos); never sample the special tokens we ban
    (rollout.banned_ids: image pads, vision markers, im_start, padded rows; sent as their complement,
    allowed_token_ids, which masks to -inf: logit_bias is clamped at -100, bad_words cannot name padded rows);
    no top-k / top-p / min-p / repetition penalty whatever the checkpoint's generation_config.json says (a server
    started without --generation-config vllm takes those as request defaults: Qwen ships top_k 20, top_p 0.8);
    and the token ids back (return_token_ids), decoded here with the same tokenizer: vLLM's incremental
    detokenizer drops a trailing incomplete UTF-8 character that tokenizer.decode renders as U+FFFD, which can
    change the parse ("</answer>" followed by half a character is malformed)."""
    from widematch import model_io  # torch and transformers only on this path
    from widematch import rollout
    from transformers import AutoConfig
    tokenizer, _ = model_io.load_processors(model_dir)
    vocab = AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size
    banned = set(rollout.banned_ids(tokenizer, vocab))
    extra = dict(stop_token_ids=rollout.stop_ids(tokenizer),
                 allowed_token_ids=[i for i in range(vocab) if i not in banned], top_k=0, top_p=1.0, min_p=0.0,
                 repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, return_token_ids=True)
    return tokenizer, extra


def api_answerer(tasks_dir, args, key, request=None):
    """A model behind an OpenAI-compatible endpoint (widematch/api.py: one request per task, our retries,
    --api-workers in flight), answers streamed as they arrive; with --api-tokenizer, decoded as our generate does
    (vllm_decoding). request: the body builder (default api_request; --reasonmatch passes the released one)."""
    tokenizer, extra = vllm_decoding(args.api_tokenizer) if args.api_tokenizer else (None, None)
    return api.answerer(tasks_dir, args, key, request or api_request, tokenizer, extra)


def baseline_answerer(kind, args):
    """A --baseline (widematch/baselines.py: sift, random, none), its mapping formatted as a model's answer."""
    if kind == "sift":
        rule = SiftMatcher(args).answer
    elif kind == "random":
        rule = lambda t: answer_random(t, args.seed)
    else:
        rule = answer_none
    return in_batches(lambda batch: [dict(text=reward.format_answer(rule(t))) for t in batch], args.batch_size)


# -----------------------------------------------------------------------------
# 3. score: reward.py on every answer, rows appended as they come (resumable)


def score_row(task, text, **extra):
    """One predictions.jsonl row: the reward code's scores and counts, the task's fields (+ extra, e.g. the
    model's truncated flag)."""
    s = reward.score(text, task)
    parsed = s["parsed"]
    row = dict(task_id=task["task_id"], text=text,
               parsed=None if parsed is None else {str(k): v for k, v in sorted(parsed.items())})
    row.update({k: s[k] for k in ("format", "match", "reward", "precision", "recall", "f1",
                                  "n_pred", "n_correct", "n_pos", "n_hits")})  # n_hits: points answered right
    row.update({k: s[k] for k in ("released_precision", "released_recall", "released_f1")})  # the release's rule
    row.update(n=task["n"])
    row.update({k: task[k] for k in TASK_FIELDS})
    if task.get("actor") and task.get("R") is not None and task.get("t") is not None:  # ActoR tasks (HATCH)
        a = reward.action_reward(text, task["R"], task["t"], tol_deg=task.get("action_step", reward.ACTION_STEP_DEG))
        row.update({k: a[k] for k in ("action", "yaw_ok", "pitch_ok", "roll_ok", "move_ok")})
    row.update(extra)
    return row


def predict(make_answerer, tasks, model_dir, desc):
    """Run make_answerer()(tasks) -> stream of (task, dict of text + extra row fields), in any order, over the
    tasks not yet in predictions.jsonl, appending each scored row as it arrives; returns all rows in task order.
    The answerer is only made (a model only loaded) when something is left to do."""
    path = model_dir / "predictions.jsonl"
    done = {r["task_id"]: r for r in read_predictions(path)}
    todo = [t for t in tasks if t["task_id"] not in done]
    answers = make_answerer() if todo else None
    with open(path, "a") as f, tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc=desc) as bar:
        for task, answer in (answers(todo) if todo else ()):
            assert task["task_id"] not in done, f"{task['task_id']} answered twice"
            row = score_row(task, **answer)
            f.write(json.dumps(row) + "\n")
            f.flush()
            done[task["task_id"]] = row
            bar.update(1)
    for t in tasks:  # rows written before a task field was recorded (e.g. pair_id) take it from the task
        for k in TASK_FIELDS:
            done[t["task_id"]].setdefault(k, t.get(k))
    return [done[t["task_id"]] for t in tasks]


def score_answers(tasks, answers, model_dir):
    """Score every task from scratch (answers are cheap to re-score, and the file may have changed) and rewrite
    predictions.jsonl; a task without an answer is scored as the empty (unparseable) answer, flagged missing."""
    rows = [score_row(t, answers[t["task_id"]]) if t["task_id"] in answers else score_row(t, "", missing=True)
            for t in tasks]
    (model_dir / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _id_or_none(v):
    return None if v is None or (isinstance(v, str) and v.lower() == "none") else str(v)


def our_scores_released(truth, pred):
    """widematch's rules on a parsed reply to a released sample: match = share of the truth's image-1 ids answered
    right, a correct "none" counted (a key left out is wrong); precision / recall / f1 over the real links only
    (reward.prf: both 1 when nothing is claimed and nothing exists). A reply that is not a JSON object scores 0."""
    if not isinstance(truth, dict) or not truth or not isinstance(pred, dict):
        return dict(match=0.0, precision=0.0, recall=0.0, f1=0.0)
    hits = sum(k in pred and _id_or_none(pred[k]) == _id_or_none(t) for k, t in truth.items())
    claims = {k: _id_or_none(v) for k, v in pred.items() if _id_or_none(v) is not None}
    n_correct = sum(k in truth and v == _id_or_none(truth[k]) for k, v in claims.items())
    n_pos = sum(_id_or_none(t) is not None for t in truth.values())
    p, r, f = reward.prf(n_correct, len(claims), n_pos)
    return dict(match=hits / len(truth), precision=p, recall=r, f1=f)


def score_released(s, text, error=None, latency=None, **extra):
    """--reasonmatch: one samples.jsonl row of a released sample s (widematch.reasonmatch.load_sample): meta, gt,
    prediction, prediction_json_raw, prediction_parsed, precision, recall, f1 (the release's rule), latency, error
    (the released schema; a failed request has no JSON, as there), then "widematch": the key, our match /
    precision / recall / f1 on the same reply and the answerer's extra fields (truncated, usage, ...)."""
    error = error or s["error"]
    gt = s["metadata"].get("answer", {}) if s["metadata"] is not None else {}
    raw, parsed = (None, None) if error else reward.released_json(text)
    precision, recall, f1 = reward.released_prf(gt, parsed)
    ours = our_scores_released(gt, parsed)
    return dict(meta=reasonmatch.sample_meta(s), gt=gt, prediction=text, prediction_json_raw=raw,
                prediction_parsed=parsed, precision=precision, recall=recall, f1=f1, latency=latency, error=error,
                widematch=dict(key=s["key"], **{f"our_{k}": v for k, v in ours.items()}, **extra))

# -----------------------------------------------------------------------------
# 4. aggregate: metrics as a pure function of the prediction rows


def group_metrics(rows):
    """Macro (per-task mean) and micro (pooled counts) numbers for one group of rows."""
    n = len(rows)
    mean = lambda k: math.fsum(r[k] for r in rows) / n
    total = lambda k: sum(r[k] for r in rows)
    # pooled P/R with the reward's own empty-denominator rule (1 only when nothing is claimed and nothing exists)
    mp, mr, mf1 = reward.prf(total("n_correct"), total("n_pred"), total("n_pos"))
    gen = [r for r in rows if "truncated" in r]  # model rows (baselines do not generate)
    return dict(n_tasks=n, f1=mean("f1"), precision=mean("precision"), recall=mean("recall"),
                match_acc=mean("match"), format_rate=mean("format"), reward=mean("reward"),
                truncated_rate=sum(bool(r["truncated"]) for r in gen) / len(gen) if gen else None,
                micro_f1=mf1, micro_precision=mp, micro_recall=mr,
                micro_match_acc=total("n_hits") / total("n"),
                n_correct=total("n_correct"), n_pred=total("n_pred"), n_pos=total("n_pos"),
                **action_metrics(rows))


def action_metrics(rows):
    """ActoR (HATCH): mean action reward and per-component accuracy over the rows of tasks made with --actor
    (None when there are none, e.g. plain matching tasks)."""
    acts = [r for r in rows if "action" in r]
    keys = ("action", "yaw_ok", "pitch_ok", "roll_ok", "move_ok")
    names = ("action_acc", "yaw_acc", "pitch_acc", "roll_acc", "move_acc")
    return {n: (math.fsum(r[k] for r in acts) / len(acts) if acts else None) for n, k in zip(names, keys)}


def breakdown(rows, key):
    groups = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    return {str(k): group_metrics(groups[k]) for k in sorted(groups)}


WIDEST_SOURCES = ("dl3dv", "re10k", "uco3d")  # the sources of the paper's widest table


def widest_default_sources(tasks):
    """The paper's widest-table sources (dl3dv, re10k, uco3d) that occur in the tasks; all their sources when
    none of them does (e.g. the synthetic demo)."""
    present = sorted({t["source"] for t in tasks})
    return [s for s in present if s in WIDEST_SOURCES] or present


def widest_pairs(tasks, k=90, sources=None):
    """The paper's "90 largest viewpoint differences" as a pure rule on task dicts (pair_id, source, delta_v):
    each pair's Δv percentile rank among the pairs of its own source (fraction of that source's pairs whose Δv
    is <= its own, so the widest pair of every source has rank 1; Δv scales differ between sources, so raw Δv
    is never compared across them), then the k pairs with the highest rank from `sources` (default
    widest_default_sources), ties broken by larger Δv, then pair_id. Returns the pair_ids, highest rank first.
    Every task of a chosen pair belongs to the subset."""
    dv = {}
    for t in tasks:
        pid = t["pair_id"]
        if pid in dv and dv[pid][1] != t["delta_v"]:
            raise ValueError(f"widest_pairs: pair {pid} has tasks with different delta_v "
                             f"({dv[pid][1]} and {t['delta_v']})")
        dv[pid] = (t["source"], t["delta_v"])
    keep = set(widest_default_sources(tasks) if sources is None else sources)
    ranked = []
    for src in sorted({s for s, _ in dv.values()} & keep):
        values = np.sort([v for s, v in dv.values() if s == src])
        for pid, (s, v) in dv.items():
            if s == src:
                ranked.append((np.searchsorted(values, v, side="right") / len(values), v, pid))
    ranked.sort(key=lambda r: (-r[0], -r[1], r[2]))
    return [pid for _, _, pid in ranked[:k]]


def aggregate(rows, widest=90, widest_sources=None):
    """Metrics dict of prediction rows: overall, by_<field> for BREAKDOWNS, by_level_bin, by_scene_type_level
    (the paper's difficulty table) and the widest subset (widest_pairs: every row of the `widest` pairs with the
    highest per-source Δv rank among widest_sources). Rows are sorted by task_id first so the result does not
    depend on their order."""
    rows = sorted(rows, key=lambda r: r["task_id"])
    if not rows:
        return dict(overall=None)
    m = dict(overall=group_metrics(rows))
    for key in BREAKDOWNS:
        m[f"by_{key}"] = breakdown(rows, key)
    m["by_level_bin"] = {lvl: breakdown([r for r in rows if r["level"] == lvl], "bin") for lvl in m["by_level"]}
    m["by_scene_type_level"] = {st: breakdown([r for r in rows if r["scene_type"] == st], "level")
                                for st in m["by_scene_type"]}
    sources = widest_default_sources(rows) if widest_sources is None else list(widest_sources)
    pairs = widest_pairs(rows, widest, sources)
    chosen = set(pairs)
    w = [r for r in rows if r["pair_id"] in chosen]
    m["widest"] = dict(k=len(pairs), n_tasks=len(w), sources=sources, pairs=pairs,
                       overall=group_metrics(w) if w else None, by_source=breakdown(w, "source"))
    return m


def run_metrics(name, kind, source, rows, tasks_sha, limit, widest, widest_sources=None):
    """metrics.json of one model: aggregate(rows) plus what the report needs to put runs side by side (the tasks
    file's hash and --limit), the unanswered count and the summed token usage (None when no row has usage)."""
    used = [r["usage"] for r in rows if r.get("usage")]
    usage = {k: sum(u[k] for u in used) for k in ("prompt_tokens", "completion_tokens")} if used else None
    return dict(model=name, kind=kind, source=source, tasks_sha=tasks_sha, limit=limit,
                n_missing=sum(bool(r.get("missing")) for r in rows), usage=usage,
                **aggregate(rows, widest, widest_sources))


# -----------------------------------------------------------------------------
# 5. main: the steps above, then the report (widematch/report.py)


def parse_args(argv=None):
    """The flags (kebab-case, defaults the paper's protocol), with the defaults that depend on other flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpts", nargs="*", metavar="CKPT", help="step dir, run dir, HF model dir or hub id")
    parser.add_argument("--answers", help="score answers made by another tool: a jsonl of {task_id, text}, "
                        "lmms-eval's --log_samples file or VLMEvalKit's prediction file (.tsv/.xlsx/.json)")
    parser.add_argument("--transfer", nargs="+", metavar="RESULTS",
                        help="lmms-eval results JSON files, the base model's first: the transfer table into report.md")
    parser.add_argument("--api-base", help="evaluate --api-model behind this OpenAI-compatible URL (.../v1)")
    parser.add_argument("--api-model", help="the model name the --api-base server knows")
    parser.add_argument("--name", help="report name of the --answers or --api-base model "
                        "(default: the file's stem / --api-model)")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    parser.add_argument("--api-workers", type=int, default=4, help="concurrent API requests")
    parser.add_argument("--api-timeout", type=float, default=600.0, help="seconds to wait for one API answer")
    parser.add_argument("--api-retries", type=int, default=6, help="retries of a request on 429/5xx/timeout/drop")
    parser.add_argument("--api-backoff", type=float, default=1.0, help="first retry wait in s (doubles, max 60)")
    parser.add_argument("--api-max-tokens-param", default="max_tokens", choices=("max_tokens", "max_completion_tokens"),
                        help="request field carrying --max-new-tokens (OpenAI reasoning models want the second)")
    parser.add_argument("--api-no-temperature", action="store_true", help="send no temperature (for endpoints "
                        "that reject one; they then decode with their own default)")
    parser.add_argument("--api-tokenizer", metavar="DIR", help="a vLLM server serving our checkpoint DIR (a local "
                        "dir or hub id): decode as `evaluate.py DIR` does (stops, banned special tokens, no "
                        "sampling defaults, text decoded here from the token ids); vLLM-only request fields")
    parser.add_argument("--tasks", default="tasks/test.jsonl", help="make_tasks.py jsonl")
    parser.add_argument("--out", default="eval", help="output dir")
    parser.add_argument("--baseline", nargs="*", default=[], choices=BASELINES, help="classical / floor baselines")
    parser.add_argument("--engine", default="hf", choices=("hf", "vllm"),
                        help="CKPTs: transformers generate (hf), or one vLLM engine (vllm; same greedy decoding)")
    parser.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.9,
                        help="--engine vllm on a GPU: its share of the GPU's memory")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="tasks per generate call (default 8; --engine vllm: 256, batched continuously)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="completion budget per task (default 5120, the paper's training budget; 8192 on "
                        "--reasonmatch, the released evaluator's; the CPU demo passes 48)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--seed", type=int, default=0, help="sampling and random-baseline seed")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--device-map", choices=("auto", "balanced", "sequential"),
                        help="spread a model larger than one GPU over all visible GPUs (accelerate); "
                        "replaces --device")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="model weights and compute (auto: bfloat16 on GPUs, float32 on CPU)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N tasks (0 = all)")
    parser.add_argument("--widest", type=int, default=90, help="pairs in the widest subset (the paper: 90)")
    parser.add_argument("--widest-sources", default=None,
                        help="comma-separated sources the widest pairs come from (default: dl3dv, re10k, uco3d "
                             "where present, else all)")
    parser.add_argument("--show", type=int, default=0, help="side-by-side pictures for K tasks per model")
    parser.add_argument("--sift-size", type=float, default=0.05, help="SIFT keypoint size / longer image side")
    parser.add_argument("--sift-epi", type=float, default=0.02, help="epipolar gate / longer side of image 2")
    parser.add_argument("--sift-ratio", type=float, default=0.8, help="nearest / second-nearest distance ratio")
    parser.add_argument("--sift-max-dist", type=float, default=0.7, help="max unit-SIFT distance for a link")
    rm = parser.add_argument_group("the released ReasonMatch-Bench (docs/reasonmatch.md)")
    rm.add_argument("--reasonmatch", metavar="PATH", help="evaluate on the released benchmark instead of --tasks: "
                    "the extracted reasonmatch_bench/ folder or its annotation_index.json")
    rm.add_argument("--dataset-filter", nargs="+", metavar="KEY", help="only these dataset_keys (e.g. uco3d dl3dv)")
    rm.add_argument("--stage-filter", nargs="+", metavar="STAGE",
                    help="only these stages (one_to_one, one_to_multi, multi_to_multi)")
    rm.add_argument("--prompt-template", metavar="FILE", help="the question: the released evaluate/matchbench/"
                    "utils.py (its constants read, not imported) or a text file; default: our own wording")
    rm.add_argument("--no-think", action="store_true", help="the template's variant without thinking")
    rm.add_argument("--scene-map", metavar="JSON", help="sample_id -> indoor/outdoor/object (the release's "
                    "scene_labels.json) for the by-scene table; unmapped: uco3d object, scannet indoor")
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (256 if args.engine == "vllm" else 8)
    args.max_new_tokens = args.max_new_tokens or (8192 if args.reasonmatch else 5120)
    only_rm = [f for f, v in (("--dataset-filter", args.dataset_filter), ("--stage-filter", args.stage_filter),
                              ("--prompt-template", args.prompt_template), ("--no-think", args.no_think),
                              ("--scene-map", args.scene_map)) if v]
    if only_rm and not args.reasonmatch:  # our tasks carry their own prompt and fields
        sys.exit(f"evaluate.py: error: {only_rm[0]} goes with --reasonmatch PATH")
    return args


def transfer_only(args):
    """--transfer: the transfer table into <out>/transfer.json and report.md (widematch/report.py); True when
    nothing else is asked (with models to evaluate too, their report keeps the section)."""
    missing = [p for p in args.transfer if not Path(p).is_file()]
    if missing:
        sys.exit(f"evaluate.py: error: --transfer {missing[0]} does not exist")
    t = write_transfer(Path(args.out), args.transfer)
    if not (args.ckpts or args.baseline or args.answers or args.api_base):
        print(f"evaluate.py: transfer table of {len(t['models'])} models over {len(t['rows'])} benchmarks -> "
              f"{args.out}/report.md")
        return True
    return False


def check_args(args):
    """Inputs that are missing or flags that do not go together: one line each, before any work. Returns the API
    key (None without --api-base), read from the environment, never a flag."""
    if not Path(args.tasks).is_file():
        sys.exit(f"evaluate.py: error: --tasks {Path(args.tasks)} does not exist")
    if not args.ckpts and not args.baseline and not args.answers and not args.api_base:
        sys.exit("evaluate.py: error: give at least one CKPT, --baseline, --answers or --api-base")
    if args.answers and not Path(args.answers).is_file():
        sys.exit(f"evaluate.py: error: --answers {args.answers} does not exist")
    if bool(args.api_base) != bool(args.api_model):
        sys.exit("evaluate.py: error: --api-base and --api-model go together")
    if args.api_base and not re.match(r"https?://[^/]", args.api_base):
        sys.exit(f"evaluate.py: error: --api-base {args.api_base} is not an http(s):// URL")
    if args.api_tokenizer and not args.api_base:
        sys.exit("evaluate.py: error: --api-tokenizer goes with --api-base (a vLLM server of that checkpoint)")
    if args.api_tokenizer:  # a run dir: its latest exported step, as a CKPT
        args.api_tokenizer = resolve_ckpt(args.api_tokenizer)
    if args.name and bool(args.answers) == bool(args.api_base):
        sys.exit("evaluate.py: error: --name names the one --answers or --api-base model of a run")
    api_key = os.environ.get(args.api_key_env) if args.api_base else None
    if args.api_base and not api_key:  # a local server started without a key accepts any value, e.g. EMPTY
        sys.exit(f"evaluate.py: error: --api-key-env {args.api_key_env}: environment variable {args.api_key_env} "
                 "is not set (export it; any value such as EMPTY for a server started without a key)")
    if args.api_workers < 1 or args.api_retries < 0:
        sys.exit("evaluate.py: error: --api-workers must be >= 1 and --api-retries >= 0")
    return api_key


def load_task_set(args):
    """The tasks to evaluate (--limit: the first N) and what identifies them in metrics.json (the tasks file's
    hash); also all of the file's tasks (answers files map back by row) and the --widest-sources."""
    tasks_path = Path(args.tasks)
    tasks = all_tasks = load_tasks(tasks_path)
    if args.limit:
        tasks = tasks[:args.limit]
    if not tasks:
        sys.exit(f"evaluate.py: error: --tasks {tasks_path} has no tasks")
    widest_sources = args.widest_sources.split(",") if args.widest_sources else None
    if widest_sources and not set(widest_sources) & {t["source"] for t in tasks}:
        sys.exit(f"evaluate.py: error: --widest-sources {args.widest_sources}: no task of {tasks_path} is from them")
    return SimpleNamespace(tasks=tasks, all=all_tasks, path=tasks_path, dir=tasks_path.parent,
                           sha=hashlib.sha256(tasks_path.read_bytes()).hexdigest()[:16], widest_sources=widest_sources)


def what_to_evaluate(args):
    """(directory name, kind, what) of every model, answers file, endpoint and baseline, in that order, each under
    a unique name."""
    entries = [("model", c, model_name(c)) for c in (resolve_ckpt(c) for c in args.ckpts)]
    if args.answers:
        entries.append(("answers", str(Path(args.answers).resolve()),
                        args.name or re.sub(r"[^A-Za-z0-9._-]", "_", Path(args.answers).stem).strip("._") or "answers"))
    if args.api_base:
        entries.append(("api", f"{args.api_model} @ {args.api_base}",
                        re.sub(r"[^A-Za-z0-9._-]", "_", args.name or args.api_model).strip("._") or "api"))
    entries += [("baseline", b, f"baseline_{b}") for b in args.baseline]
    return [(n, kind, what) for n, (kind, what, _) in zip(unique_names([e[2] for e in entries]), entries)]


def ask_and_score(name, kind, what, ts, args, api_key, model_dir):
    """One model's scored rows, in task order: an answers file re-scored whole; anything else asked only for the
    tasks not yet in its predictions.jsonl, under a run.json that refuses other settings."""
    info = dict(kind=kind, what=what, tasks_sha=ts.sha, seed=args.seed)
    if kind == "answers":  # re-scored from scratch every run: nothing to resume, only a model's dir to protect
        check_run_info(model_dir, dict(kind=kind, what=what, tasks_sha=ts.sha), keys=("kind",))
        return score_answers(ts.tasks, read_any_answers(args.answers, ts.all, reward.reference_answer), model_dir)
    if kind == "model":
        info.update(temperature=args.temperature, max_new_tokens=args.max_new_tokens, dtype=model_dtype(args))
        if args.engine == "vllm":  # (hf runs keep the run.json they always had)
            info["engine"] = "vllm"
        make_answerer = lambda: model_answerer(what, ts.dir, ts.tasks, args)
    elif kind == "api":
        info.update(temperature=None if args.api_no_temperature else args.temperature,
                    max_new_tokens=args.max_new_tokens, max_tokens_param=args.api_max_tokens_param,
                    api_tokenizer=args.api_tokenizer)
        make_answerer = lambda: api_answerer(ts.dir, args, api_key)
    else:
        if what == "sift":
            info.update({k: getattr(args, k) for k in ("sift_size", "sift_epi", "sift_ratio", "sift_max_dist")})
        make_answerer = lambda: baseline_answerer(what, args)
    check_run_info(model_dir, info)
    return predict(make_answerer, ts.tasks, model_dir, name)


def main(argv=None):
    args = parse_args(argv)
    if args.reasonmatch:  # the released benchmark: its own index, prompt and schema (widematch/reasonmatch.py)
        return reasonmatch.evaluate_main(args, resolve_ckpt, model_answerer, api_answerer, score_released)
    if args.transfer and transfer_only(args):  # needs no tasks file
        return
    api_key = check_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    ts = load_task_set(args)

    all_metrics, shows = {}, {}
    for name, kind, what in what_to_evaluate(args):
        rows = ask_and_score(name, kind, what, ts, args, api_key, out / name)  # ask, score (resumable)
        metrics = run_metrics(name, kind, what, rows, ts.sha, args.limit, args.widest, ts.widest_sources)
        if kind in ("model", "api"):  # the budget the truncation rate is measured against
            metrics["max_new_tokens"] = args.max_new_tokens
        (out / name / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        all_metrics[name] = metrics
        if args.show:
            shows[name] = write_shows(out / name / "show", ts.tasks, rows, args.show, name)

    all_metrics = report_metrics(out, all_metrics, ts.sha, args.limit)  # + earlier runs on the same tasks
    plot_f1_vs_bin(out, all_metrics)
    plot_f1_by_source(out, all_metrics)
    write_report(out, all_metrics, ts.path, shows)
    summary = ", ".join(f"{n} F1 {pct(m['overall']['f1'])}" for n, m in all_metrics.items())
    print(f"evaluate.py: {len(ts.tasks)} tasks -> {out}/report.md ({summary})")


if __name__ == "__main__":
    main()
