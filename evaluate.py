"""
Evaluate models and classical baselines on ReasonMatch-style matching tasks, side by side.

Usage (CPU demo, after make_tasks.py and tiny_model.py / grpo.py; the tiny model is trained to 48 tokens):
    python evaluate.py demo_data/tiny-qwen3vl runs/grpo --tasks tasks/test.jsonl --out eval \
        --baseline sift random none --show 4 --max-new-tokens 48
1 GPU (a real checkpoint; a hub id works where the machine can download it; the default budget is the
paper's training budget, 5120 new tokens, so a model that reasons at length is not cut off):
    python evaluate.py runs/grpo/step_000200 Qwen/Qwen3-VL-8B-Instruct --tasks tasks/test.jsonl --out eval \
        --batch-size 16 --device cuda
Baselines only (no torch needed; sift and --show need OpenCV; random, none, --answers and --api-base without
--api-tokenizer need neither torch nor OpenCV: both are imported only where used):
    python evaluate.py --tasks tasks/test.jsonl --out eval --baseline sift random none
A model behind an OpenAI-compatible chat-completions endpoint (vLLM, SGLang, TGI, hosted APIs; README
"Evaluating other models"), the key read from the environment variable named by --api-key-env, never a flag:
    OPENAI_API_KEY=... python evaluate.py --api-base http://gpu-host:8000/v1 --api-model Qwen/Qwen3-VL-235B-A22B-Instruct \
        --api-workers 32 --tasks tasks/test.jsonl --out eval
    One request per task: one user message, content [image_url(image 1), image_url(image 2), text(prompt)] (the
    order grpo.encode gives our model), each image a data URL of the prompted image file's bytes, unchanged;
    temperature --temperature (0) unless --api-no-temperature; --max-new-tokens sent as --api-max-tokens-param
    (max_tokens, or max_completion_tokens for reasoning models). --api-workers requests in flight; our own retry
    loop (the client's is off) backs off on 429 / 5xx / 408 / 409, timeouts (--api-timeout) and dropped
    connections, --api-retries times from --api-backoff s doubling (max 60 s, Retry-After honoured); 401/403 and
    other 4xx, a malformed response, a missing key variable, or a server still failing after the retries end
    the run with one line naming the cause; the rerun resumes. Row and report name: --api-model (or --name).
The same local model through vLLM (--engine vllm: rollout.VllmEngine, one engine, --batch-size 256 tasks submitted at
once and batched continuously; the same prompts, checked token for token against grpo.encode's, the same banned
tokens and greedy decoding, so the same predictions as the transformers path: tested on CPU, fp32):
    python evaluate.py runs/grpo/step_000200 --engine vllm --tasks tasks/test.jsonl --out eval --device cuda
Our own checkpoint served by vLLM, answers equal to local greedy `evaluate.py STEP` (tested on CPU, fp32 server):
    vllm serve runs/grpo/step_000200 --limit-mm-per-prompt '{"image": 2}' --port 8000   # CPU: see README
    OPENAI_API_KEY=EMPTY python evaluate.py --api-base http://gpu-host:8000/v1 --api-model runs/grpo/step_000200 \
        --api-tokenizer runs/grpo/step_000200 --tasks tasks/test.jsonl --out eval
    --api-tokenizer DIR (the served checkpoint, local) adds vLLM-only request fields (vllm_decoding): our stop
    tokens, the complement of the special tokens our generate bans as allowed_token_ids, no top-k / top-p /
    min-p / repetition penalty whatever the checkpoint's generation_config.json says, and return_token_ids: the
    row's text is DIR's tokenizer's decoding of the returned ids (vLLM's own text drops a trailing incomplete
    UTF-8 character). A server that returns no token ids stops the run with one line.
A model larger than one GPU, loaded here: --device-map auto (accelerate spreads it over the visible GPUs) and
--dtype (auto = bfloat16 on GPUs, float32 on CPU).
Answers made by any other tool (no model, no torch, no OpenCV):
    python evaluate.py --answers their_answers.jsonl --name their-model --tasks tasks/test.jsonl --out eval
    their_answers.jsonl: one JSON object a line, {"task_id": "<a task_id of the tasks file>", "text": "<the
    model's raw answer to that task's prompt>"}. Scored with reward.score like our models' completions, from
    scratch on every run (edit the file, rerun); a task without a line is scored as an unanswered (empty) answer
    and counted in n_missing; a task_id the tasks file lacks, or one given twice, is an error naming it.
    The harnesses' own outputs of export_bench.py's exports work the same way (README "The benchmark in lmms-eval
    and VLMEvalKit"), with the tasks file the export was made from:
    python evaluate.py --answers lmms_out/MODEL/<date>_samples_widematch.jsonl --name MODEL --tasks tasks/test.jsonl
        lmms-eval's --log_samples file: doc_id = the task's row in the tasks file (the export keeps its order),
        text = filtered_resps; each line is checked against the task (the task_id in its micro_f1 item, or its
        target against the reference answer), so a samples file of another export stops with the line named.
    python evaluate.py --answers outputs/MODEL/<eval id>/MODEL_WideMatch.tsv --name MODEL --tasks tasks/test.jsonl
        VLMEvalKit's prediction file (.tsv with PRED_FORMAT=tsv, .json with PRED_FORMAT=json, or its default .xlsx,
        read with the standard library; .xlsx cells stop at 32,767 characters, a full cell is warned about):
        rows by their task_id column, checked against index.
The released ReasonMatch-Bench (the extracted reasonmatch_bench/ or its annotation_index.json; docs/reasonmatch.md):
    python evaluate.py CKPT --reasonmatch reasonmatch_bench --prompt-template ReasonMatch/evaluate/matchbench/utils.py \
        --scene-map ReasonMatch/evaluate/matchbench/scene_labels.json --out eval_rm
    (also --api-base / --api-model, --answers: {sample_id, text} lines or the released evaluator's samples.jsonl;
    --dataset-filter, --stage-filter, --limit, --no-think). The released protocol: system message, image 1, image
    2 (JPEG data URLs on the API route), the prompt; 8192 new tokens by default; scored with reward.py's released
    rule; <out>/<name>/samples.jsonl + summary.json in the release's schema, <out>/report.md beside our match / F1.
The paper's transfer table (lmms-eval results of the base model and the trained one; README "Transfer benchmarks"):
    python evaluate.py --transfer lmms_base/*/*_results.json lmms_dcrl/*/*_results.json --out eval
    Models are told apart by the files' model_name and ordered by first appearance: the first is the base, each
    other gets a Δ column. Rows: OmniSpatial, MindCube, SAT Real, MME-RealWorld, MMStar, RealWorldQA, V*Bench and
    our own lmms-eval task, each the headline metric lmms-eval 0.7.3 reports (TRANSFER_BENCHMARKS), in percent,
    beside the paper's numbers; notes flag different generation settings and --limit'ed runs. Written to
    <out>/transfer.json and as report.md's last section (kept when the report is rebuilt); needs no --tasks.

CKPT may be a checkpoint dir (runs/x/step_000010/), a run dir (its latest step_*/ via grpo.latest_checkpoint),
any local Hugging Face model dir, or a hub id; put CKPTs before --baseline. Decoding is greedy unless
--temperature > 0 (then seeded per batch, so a resumed sampling run is not token-identical to an uninterrupted one).
--limit N evaluates the first N tasks only (quick looks; a later full run into the same --out resumes from them).

Outputs, per model (name derived from the path: runs/grpo/step_000010 -> grpo_step_000010; baselines are
baseline_sift, baseline_random, baseline_none):
    <out>/<name>/predictions.jsonl  one JSON object per task: task_id, text (raw completion, or the formatted
        answer of a baseline), parsed ({"1": "C", "2": null, ...}; null when the answer did not parse), format,
        match, reward, precision, recall, f1 and the counts n_pred / n_correct / n_pos (all from reward.score,
        the training reward's own code), n and n_hits (points answered exactly right), and the task's source,
        scene_type, level, spatial, bin, delta_v; for models also truncated (no stop token; for an API model
        finish_reason == "length", the raw finish_reason kept beside it), n_tokens and usage ({prompt_tokens,
        completion_tokens}: the server's count for an API model; ours, image pads included, for a local one).
        Appended and flushed line by line, in the order answers arrive (an API model's come out of task order);
        a rerun skips the task_ids already there (a truncated last line from a killed run is dropped), so an
        interrupted run resumes where it stopped and no task is asked twice. An --answers model's file is
        rewritten whole on every run.
    <out>/<name>/run.json           what the predictions were made with (ckpt or model @ URL, tasks file hash,
        decoding, dtype);
        a rerun with different settings into the same dir stops with an error instead of mixing predictions.
    <out>/<name>/metrics.json       aggregate(rows): overall and by source / level / scene_type / spatial / bin /
        level x bin, scene_type x level (the paper's difficulty table), truncated_rate (models), and the widest
        subset (widest: its pairs, sources, overall and by source; see below); plus model / kind (model, answers,
        baseline) / source, tasks_sha (sha256 of the tasks file, first 16 hex) and limit (--limit) that say which
        tasks it was made on, n_missing (tasks with no answer in an --answers file; their rows carry
        "missing": true), usage ({prompt_tokens, completion_tokens} summed over the rows that report token
        usage, else null) and, for models, max_new_tokens.
    <out>/<name>/show/*.png         with --show K: both images side by side with the labelled points; model links
        green (correct) or red (wrong), ground-truth links dashed grey, rings on points answered "none"
        (green: correct none, orange: missed match) or not answered (magenta).
    <out>/report.md (overall with each model's truncation rate, F1 by source / level / scene type / layout /
        bin, scene type x level, the widest subset with per-source columns and how it was chosen, and last the
        transfer table when <out>/transfer.json exists),
        <out>/f1_vs_bin.png (F1 vs overlap bin, one panel per level), <out>/f1_by_source.png:
        every model with a <out>/*/metrics.json made on the same tasks file (same tasks_sha and limit), this run's
        and earlier runs', one row each under its directory name; so models evaluated in separate runs (a local
        checkpoint, an API model, an answers file) land in one table.

Widest subset (the paper's human-control subset, "90 largest viewpoint differences", reported Overall / DL3DV /
RE10K / uCO3D): widest_pairs() ranks each pair's Δv as a percentile among the task file's pairs of the same source
(Δv = 1 - overlap is not comparable across sources: RGB-D pixel overlap vs SfM shared landmarks), keeps the
--widest pairs (default 90) with the highest rank from --widest-sources (default dl3dv, re10k, uco3d where any is
present, otherwise every source; ties: larger Δv, then pair_id) and takes every task of those pairs (a pure
function, for the human-baseline page to share). A model whose metrics.json holds another subset (an earlier
run with other --widest settings) shows "-" in that table.

Metrics. Per task, reward.score gives precision = correct links / links predicted (answers other than none),
recall = correct links / ground-truth links, f1 (both ratios are 1 when nothing is claimed and nothing exists),
match = fraction of the n image-1 points answered exactly right (a correct none counts, as in the paper's r_match)
and format (1 when every point is answered once in the grammar). Headline F1 / P / R are MACRO: the per-task
numbers averaged over tasks, so every task weighs the same whatever its size. metrics.json also has MICRO (pooled)
numbers: counts summed over the tasks first (micro_precision = sum n_correct / sum n_pred, micro_recall =
sum n_correct / sum n_pos, micro_f1 from those two, micro_match_acc = sum n_hits / sum n), which weigh tasks by
their number of links / points. match_acc, format_rate and reward are means over tasks. Overlap bins are numbered
within each source (as in the pool), so "bin k" pools sources whose Δv scales differ (the paper's caveat).

SIFT baseline rule (answers from the clean originals and the point coordinates, scored by the same reward code
via reward.format_answer -> reward.score): (1) a SIFT descriptor is computed AT every labelled point (upright,
keypoint size --sift-size x the longer image side), unit-normalised; (2) dense SIFT on both images (<= 4000
features), Lowe ratio test 0.8, RANSAC fundamental matrix F (1.5 px); if F has >= 15 inliers, y_j is compatible
with x_i when their symmetric epipolar distance is below --sift-epi x the longer side of image 2 (otherwise every
y_j is compatible); (3) x_i takes its nearest compatible y_j by descriptor distance d1 if d1 < --sift-max-dist and
d1 < --sift-ratio x d2 (d2 = second nearest compatible, infinite if none), else none; (4) when several x claim one
y, the closest keeps it and the others answer none. The random baseline draws each answer uniformly from Y and
none (seeded per task, so resumes and reruns agree; not one-to-one); the none baseline answers none everywhere.
On the default synthetic demo test split (demo.sh: 145 pairs, one task each, 3-5 points, 640 px) SIFT gets F1
38.9 overall, 96.5 in overlap bin 1 falling to 0 in bin 10, and 23.8 on the 90 widest pairs (16.9 co3d, 11.0
colmap, 69.6 scannet); random gets 18.4.

Departures from the paper: the paper does not spell out its P/R aggregation; we report macro (per-task mean)
as headline and micro beside it. The paper does not say how its 90 widest pairs are ranked across sources; we
rank within each source (above). The SIFT baseline is ours (the paper
discusses classical matchers but lists no numbers for them).
"""

import argparse
import base64
import hashlib
import json
import math
import mimetypes
import os
import re
import sys
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import ConnectionPatch
from matplotlib.ticker import MaxNLocator
from tqdm import tqdm

import reward

BASELINES = ("sift", "random", "none")
BREAKDOWNS = ("source", "level", "scene_type", "spatial", "bin")
TASK_FIELDS = ("pair_id", "source", "scene_type", "level", "spatial", "bin", "delta_v")

# -----------------------------------------------------------------------------
# tasks and model names

def json_lines(path, name):
    """(where, object) of each non-blank line of a JSON-lines file, where = "<name> line <k>"; a line that is not
    JSON stops the run naming it."""
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{name} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"evaluate.py: error: {where} is not JSON ({e})")
            yield where, obj


def load_tasks(path):
    """Tasks of a make_tasks.py jsonl file, in file order."""
    tasks = [t for _, t in json_lines(path, str(path))]
    ids = [t["task_id"] for t in tasks]
    if len(set(ids)) != len(ids):
        sys.exit(f"evaluate.py: error: {path} has duplicate task_ids")
    return tasks


def model_name(path):
    """A readable, filesystem-safe name from a checkpoint path or hub id: runs/grpo/step_000010 ->
    grpo_step_000010 (the run name disambiguates steps of different runs), demo_data/tiny-qwen3vl ->
    tiny-qwen3vl, Qwen/Qwen3-VL-8B-Instruct -> Qwen_Qwen3-VL-8B-Instruct."""
    p = Path(path)
    if re.fullmatch(r"step_\d+", p.name) and p.parent.name:
        name = f"{p.parent.name}_{p.name}"
    elif p.exists():
        name = p.resolve().name
    else:  # hub id owner/name
        name = str(path).strip("/").replace("/", "_")
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).strip("._") or "model"


def unique_names(names):
    """Suffix -2, -3, ... onto repeated names, keeping order."""
    seen, out = {}, []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


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
# scoring one answer and the resumable predictions file

def score_row(task, text, **extra):
    """One predictions.jsonl row: the reward code's scores and counts, the task's fields (+ extra, e.g. the
    model's truncated flag)."""
    s = reward.score(text, task)
    parsed = s["parsed"]
    row = dict(task_id=task["task_id"], text=text,
               parsed=None if parsed is None else {str(k): v for k, v in sorted(parsed.items())})
    row.update({k: s[k] for k in ("format", "match", "reward", "precision", "recall", "f1",
                                  "n_pred", "n_correct", "n_pos", "n_hits")})  # n_hits: points answered right
    row.update(n=task["n"])
    row.update({k: task[k] for k in TASK_FIELDS})
    if task.get("actor") and task.get("R") is not None and task.get("t") is not None:  # ActoR tasks (HATCH)
        a = reward.action_reward(text, task["R"], task["t"], tol_deg=task.get("action_step", reward.ACTION_STEP_DEG))
        row.update({k: a[k] for k in ("action", "yaw_ok", "pitch_ok", "roll_ok", "move_ok")})
    row.update(extra)
    return row


def read_predictions(path):
    """Rows already in a predictions file. A truncated last line (a run killed mid-write) is dropped and the
    file rewritten without it, so appending continues on a clean line; a bad line elsewhere is an error."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                sys.exit(f"evaluate.py: error: {path} line {i + 1} is corrupt (not the last line; delete the file)")
            path.write_text("".join(lines[:-1]))
            break
    else:
        if lines and not lines[-1].endswith("\n"):  # complete JSON but cut before its newline
            with open(path, "a") as f:
                f.write("\n")
    return rows


def check_run_info(model_dir, info, keys=None):
    """Refuse to resume into predictions that were made with different settings (only `keys` compared, if given:
    re-scored answers replace their predictions whatever changed, but never a model's)."""
    p = model_dir / "run.json"
    if p.exists():
        old = json.loads(p.read_text())
        diff = sorted(k for k in set(old) | set(info) if old.get(k) != info.get(k) and (keys is None or k in keys))
        if diff:
            sys.exit(f"evaluate.py: error: {p} was made with other settings ({', '.join(diff)}); "
                     f"use another --out or delete {model_dir}")
    model_dir.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(info, indent=2) + "\n")


def read_answers(path, all_ids):
    """{task_id: text} of an answers file (one JSON object {"task_id": ..., "text": ...} a line, made by any
    tool). A line that is not such an object, a task_id the tasks file does not have, or one given twice is an
    error naming the file, the line and the task_id."""
    answers = {}
    for where, a in json_lines(path, f"--answers {path}"):
        if not isinstance(a, dict) or not isinstance(a.get("task_id"), str) or not isinstance(a.get("text"), str):
            sys.exit(f"evaluate.py: error: {where} is not an object with a string task_id and a string text")
        tid = a["task_id"]
        if tid not in all_ids:
            sys.exit(f"evaluate.py: error: {where}: unknown task_id {tid!r} (not in the tasks file)")
        if tid in answers:
            sys.exit(f"evaluate.py: error: {where}: duplicate task_id {tid!r} (answered twice)")
        answers[tid] = a["text"]
    return answers


def score_answers(tasks, answers, model_dir):
    """Score every task from scratch (answers are cheap to re-score, and the file may have changed) and rewrite
    predictions.jsonl; a task without an answer is scored as the empty (unparseable) answer, flagged missing."""
    rows = [score_row(t, answers[t["task_id"]]) if t["task_id"] in answers else score_row(t, "", missing=True)
            for t in tasks]
    (model_dir / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows

# answers written by the harnesses (export_bench.py's exports): lmms-eval's --log_samples file and VLMEvalKit's
# prediction file, mapped back to the tasks file's rows (the export keeps its order)


def read_any_answers(path, all_tasks):
    """{task_id: text} of an --answers file in any of the formats the usage card lists, told apart by the name
    and the first record: VLMEvalKit's prediction file (.tsv, .xlsx, .json), lmms-eval's samples log (.jsonl
    lines with a doc_id), or our own {task_id, text} lines."""
    path = Path(path)
    if path.suffix.lower() in (".tsv", ".xlsx"):
        return read_vlmevalkit_predictions(path, all_tasks)
    if path.suffix.lower() == ".json":  # VLMEvalKit's is one JSON list of records; else our lines, named .json
        try:
            whole = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            whole = None
        if isinstance(whole, list):
            return read_vlmevalkit_predictions(path, all_tasks)
    with open(path) as f:
        first = next((line for line in f if line.strip()), "")
    try:
        head = json.loads(first) if first else {}
    except json.JSONDecodeError:
        head = {}  # read_answers names the bad line
    if isinstance(head, dict) and "doc_id" in head:
        return read_lmms_samples(path, all_tasks)
    return read_answers(path, {t["task_id"] for t in all_tasks})


def read_lmms_samples(path, all_tasks):
    """{task_id: text} of lmms-eval's --log_samples file (<output_path>/<model>/<date>_samples_widematch.jsonl).
    It drops the doc, so doc_id (the row of the exported parquet = the line of the tasks file, counting tasks)
    names the task; the answer is filtered_resps (what lmms-eval scored; the widematch task keeps it raw). Each
    line is checked against the tasks file: the task_id its micro_f1 item carries (export_bench.py's task), or
    else its target against the task's reference answer; a mismatch means the export came from another tasks
    file and stops the run, as do a doc_id outside the file, a doc given twice or a line without a text answer."""
    answers = {}
    for where, s in json_lines(path, f"--answers {path}"):
        doc_id = s.get("doc_id") if isinstance(s, dict) else None
        if not isinstance(doc_id, int) or isinstance(doc_id, bool) or not 0 <= doc_id < len(all_tasks):
            sys.exit(f"evaluate.py: error: {where}: doc_id {doc_id!r} is not a row of the tasks file "
                     f"(0..{len(all_tasks) - 1}); lmms-eval samples map back by row")
        task = all_tasks[doc_id]
        claimed = s["micro_f1"].get("task_id") if isinstance(s.get("micro_f1"), dict) else None
        target = s.get("target")
        if claimed is not None and claimed != task["task_id"]:
            sys.exit(f"evaluate.py: error: {where}: doc_id {doc_id} is task {task['task_id']!r} in the tasks file "
                     f"but {claimed!r} in the samples: the export was made from another tasks file")
        if claimed is None and target is not None and target != reward.format_answer(
                {i + 1: v for i, v in enumerate(task["target"])}):
            sys.exit(f"evaluate.py: error: {where}: the target of doc_id {doc_id} is not the reference answer of "
                     f"task {task['task_id']!r}: the export was made from another tasks file")
        text = s.get("filtered_resps", s.get("resps"))
        while isinstance(text, list) and len(text) == 1:  # [[text]] before lmms-eval flattens it, [text] after
            text = text[0]
        if not isinstance(text, str):
            sys.exit(f"evaluate.py: error: {where}: filtered_resps holds no single text answer ({str(text)[:80]})")
        if task["task_id"] in answers:
            sys.exit(f"evaluate.py: error: {where}: doc_id {doc_id} (task {task['task_id']!r}) answered twice")
        answers[task["task_id"]] = text
    return answers


XLSX_CELL_LIMIT = 32767  # characters per cell: VLMEvalKit's default .xlsx output cuts longer answers there


def read_vlmevalkit_predictions(path, all_tasks):
    """{task_id: text} of VLMEvalKit's prediction file (<work-dir>/<model>/<eval id>/<model>_WideMatch.xlsx, or
    .tsv with PRED_FORMAT=tsv, .json with PRED_FORMAT=json): the TSV's columns without the image, plus prediction.
    Rows map by the task_id column export_bench.py puts in the TSV, checked against index (= the row of the tasks
    file); without task_id, by index alone. An empty prediction is an empty answer; a row of another tasks file,
    a row given twice or a file without prediction / index stops the run."""
    records = vlmevalkit_records(path)
    where = f"--answers {path}"
    if not records or "prediction" not in records[0] or ("index" not in records[0] and "task_id" not in records[0]):
        sys.exit(f"evaluate.py: error: {where} has no prediction rows with an index or task_id column "
                 "(not a VLMEvalKit prediction file)")
    ids = {t["task_id"] for t in all_tasks}
    answers, long = {}, 0
    for k, r in enumerate(records, 2):  # row 1 is the header
        try:
            index = int(float(r["index"])) if r.get("index") not in (None, "") else None
        except (TypeError, ValueError):
            sys.exit(f"evaluate.py: error: {where} row {k}: index {r['index']!r} is not a number")
        tid = r.get("task_id")
        if tid in (None, ""):
            if index is None or not 0 <= index < len(all_tasks):
                sys.exit(f"evaluate.py: error: {where} row {k}: index {index} is not a row of the tasks file")
            tid = all_tasks[index]["task_id"]
        elif tid not in ids:
            sys.exit(f"evaluate.py: error: {where} row {k}: unknown task_id {tid!r} (not in the tasks file)")
        elif index is not None and (not 0 <= index < len(all_tasks) or all_tasks[index]["task_id"] != tid):
            sys.exit(f"evaluate.py: error: {where} row {k}: index {index} is not task {tid!r} in the tasks file: the "
                     "TSV was made from another tasks file")
        if tid in answers:
            sys.exit(f"evaluate.py: error: {where} row {k}: duplicate task_id {tid!r} (answered twice)")
        p = r["prediction"]
        text = "" if p is None or (isinstance(p, float) and math.isnan(p)) else str(p)
        long += len(text) >= XLSX_CELL_LIMIT
        answers[tid] = text
    if long and path.suffix.lower() == ".xlsx":
        print(f"evaluate.py: warning: {long} predictions in {path} fill a whole .xlsx cell ({XLSX_CELL_LIMIT} characters)"
              ": probably cut by VLMEvalKit; rerun its inference with PRED_FORMAT=tsv")
    return answers


def vlmevalkit_records(path):
    """Rows of a VLMEvalKit prediction file as dicts of the header's columns (TSV and XLSX cells as text)."""
    import xml.etree.ElementTree as ET
    import zipfile
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(path.read_text())
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                sys.exit(f"evaluate.py: error: --answers {path} is not a JSON list of records")
            return data
        rows = xlsx_rows(path) if suffix == ".xlsx" else tsv_rows(path)
    except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile, ET.ParseError) as e:
        sys.exit(f"evaluate.py: error: --answers {path} cannot be read as a {suffix} file ({one_line(e)})")
    if not rows:
        return []
    header = rows[0]
    return [dict(zip(header, r + [""] * (len(header) - len(r)))) for r in rows[1:] if any(r)]


def tsv_rows(path):
    import csv
    csv.field_size_limit(sys.maxsize)  # long answers (and images in a dataset TSV) exceed the default
    with open(path, newline="", encoding="utf-8") as f:
        return [row for row in csv.reader(f, delimiter="\t")]


def xlsx_rows(path):
    """The first worksheet of an .xlsx file as lists of cell texts, with the standard library: an .xlsx is a zip of
    XML (shared strings, inline strings, numbers; OOXML's _xHHHH_ escapes of control characters undone)."""
    import xml.etree.ElementTree as ET
    import zipfile
    m = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"
    unescape = lambda s: re.sub(r"_x([0-9A-Fa-f]{4})_", lambda mo: chr(int(mo.group(1), 16)), s)
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        shared = [] if "xl/sharedStrings.xml" not in names else \
            ["".join(t.text or "" for t in si.iter(f"{m}t")) for si in ET.fromstring(z.read("xl/sharedStrings.xml"))]
        sheets = sorted((n for n in names if re.fullmatch(r"xl/worksheets/sheet\d+\.xml", n)),
                        key=lambda n: int(re.findall(r"\d+", n)[-1]))
        if not sheets:
            raise ValueError("no worksheet")
        rows = []
        for row in ET.fromstring(z.read(sheets[0])).iter(f"{m}row"):
            cells, col = {}, -1
            for c in row.findall(f"{m}c"):
                ref = re.match(r"[A-Z]+", c.get("r", ""))  # "C5" -> column C; cells without r follow on
                col = sum((ord(ch) - 64) * 26 ** i for i, ch in enumerate(reversed(ref.group(0)))) - 1 if ref else col + 1
                v, kind = c.find(f"{m}v"), c.get("t")
                if kind == "s":
                    cells[col] = shared[int(v.text)]
                elif kind == "inlineStr":
                    cells[col] = "".join(t.text or "" for t in c.iter(f"{m}t"))
                else:
                    cells[col] = "" if v is None or v.text is None else v.text
            rows.append([unescape(cells.get(i, "")) for i in range(max(cells, default=-1) + 1)])
    return rows


def in_batches(answer_batch, batch_size):
    """A batch answerer (list of tasks -> list of answers) as a stream of (task, answer), batch after batch."""
    def stream(todo):
        for b in range(0, len(todo), batch_size):
            batch = todo[b:b + batch_size]
            yield from zip(batch, answer_batch(batch))
    return stream


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

# -----------------------------------------------------------------------------
# answerers: the model, then the baselines; each maps a batch of tasks to [dict(text=completion, ...)]

def model_dtype(args):
    """--dtype, with auto = bfloat16 when the model goes to GPUs (--device cuda*, or --device-map with a GPU
    visible), float32 on CPU."""
    if args.dtype != "auto":
        return args.dtype
    import torch
    on_gpu = args.device.startswith("cuda") or (args.device_map and torch.cuda.is_available())
    return "bfloat16" if on_gpu else "float32"


def model_answerer(ckpt, tasks_dir, tasks, args):
    """A local model through a rollout engine (rollout.py): --engine hf, transformers generate on the model loaded
    here; --engine vllm, one vLLM engine (prompt ids checked against encode's, the same banned tokens and stops),
    each batch of --batch-size tasks submitted at once (continuous batching). Either way the prompts are
    grpo.encode's, and each batch is written when it is done."""
    from widematch import model_io  # torch, transformers (and vllm) only when a model is evaluated
    import rollout
    import torch
    from PIL import Image
    dtype = getattr(torch, model_dtype(args))
    if args.engine == "vllm":
        tokenizer, image_processor = model_io.load_processors(ckpt)
        cfg = json.loads(model_io.read_model_file(ckpt, "config.json") or "null")  # a local dir, or a hub id in the cache
        if not isinstance(cfg, dict):
            sys.exit(f"evaluate.py: error: {ckpt}: no config.json (a local model dir, or a hub id in the HF cache)")
        side = max(max(Image.open(tasks_dir / p).size) for t in tasks for p in t["images"])  # headers only
        room = rollout.prompt_bound(cfg, side, max(t["n"] for t in tasks), max(t["m"] for t in tasks))
        # a prompt of another wording (the released benchmark's, with its system message): its length on top
        room += max((len(t["system"]) + len(t["prompt"]) for t in tasks if t.get("system") is not None), default=0)
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

# the API answerer: one chat-completions request per task to an OpenAI-compatible server, --api-workers at a time


def data_url(path, prog="evaluate.py"):
    """The image file's bytes, unchanged, as a data URL (no re-encoding: the server, or human.py's page, shows what
    our model sees). prog names the script in the error."""
    mime = mimetypes.guess_type(path.name)[0]
    if mime not in ("image/jpeg", "image/png"):
        sys.exit(f"{prog}: error: {path} is not a .jpg or .png image (only those are sent as data URLs)")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def api_request(task, tasks_dir, args, extra=None):
    """One task's chat-completions body: one user message, the prompted images then the prompt's text (the
    order grpo.encode gives our own model), decoding settings from the flags; extra: fields outside OpenAI's
    protocol (vllm_decoding), sent as the client's extra_body."""
    content = [{"type": "image_url", "image_url": {"url": data_url(tasks_dir / p)}} for p in task["images"]]
    body = dict(model=args.api_model, messages=[{"role": "user", "content": content +
                                                 [{"type": "text", "text": task["prompt"]}]}])
    body[args.api_max_tokens_param] = args.max_new_tokens
    if not args.api_no_temperature:
        body["temperature"] = args.temperature
    if extra:
        body["extra_body"] = extra
    return body


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
    import rollout
    from transformers import AutoConfig
    tokenizer, _ = model_io.load_processors(model_dir)
    vocab = AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size
    banned = set(rollout.banned_ids(tokenizer, vocab))
    extra = dict(stop_token_ids=rollout.stop_ids(tokenizer),
                 allowed_token_ids=[i for i in range(vocab) if i not in banned], top_k=0, top_p=1.0, min_p=0.0,
                 repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, return_token_ids=True)
    return tokenizer, extra


class ApiStopped(Exception):
    """Another request failed for good: this one gives up instead of retrying."""


def one_line(e, limit=300):
    return " ".join(str(e).split())[:limit]


def api_answer(client, task, body, args, stop, tokenizer=None):
    """Our retry loop around one request (the client itself never retries): 429, 5xx, 408/409, timeouts and
    dropped connections back off (--api-backoff doubling, capped at 60 s, Retry-After honoured up to that cap)
    and retry up to --api-retries times; anything else, or no luck after the retries, exits with one line."""
    import openai  # slow to import: only when an API model is evaluated
    base, tid = args.api_base, task["task_id"]
    for attempt in range(args.api_retries + 1):
        if stop.is_set():
            raise ApiStopped
        wait = min(args.api_backoff * 2 ** attempt, 60.0)
        try:
            resp = client.chat.completions.create(**body)
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            sys.exit(f"evaluate.py: error: {base} refused the key in ${args.api_key_env} "
                     f"(HTTP {e.status_code}: {one_line(e.message)})")
        except openai.APIStatusError as e:
            if e.status_code not in (408, 409, 429) and e.status_code < 500:
                sys.exit(f"evaluate.py: error: {base} rejected the request for task {tid} (HTTP {e.status_code}: "
                         f"{one_line(e.message)}); if it is the temperature or the token limit, see "
                         "--api-no-temperature and --api-max-tokens-param")
            cause = f"HTTP {e.status_code} ({one_line(e.message, 120)})"
            retry_after = e.response.headers.get("retry-after", "")
            if re.fullmatch(r"\d+(\.\d+)?", retry_after.strip()):
                wait = min(max(wait, float(retry_after)), 60.0)
        except openai.APITimeoutError:  # before APIConnectionError: it is one
            cause = f"no answer within --api-timeout {args.api_timeout:g} s"
        except openai.APIConnectionError as e:
            cause = f"cannot connect ({one_line(e.__cause__ or e, 120)})"
        except (json.JSONDecodeError, openai.APIResponseValidationError) as e:
            sys.exit(f"evaluate.py: error: {base} sent a malformed response for task {tid} ({one_line(e, 120)})")
        else:
            return api_completion(resp, base, tid, tokenizer)
        if attempt < args.api_retries:
            stop.wait(wait)
    sys.exit(f"evaluate.py: error: {base} still failing after {args.api_retries + 1} attempts: {cause}; "
             "rerun the same command to resume")


def api_completion(resp, base, tid, tokenizer=None):
    """Row fields of a chat completion: text, truncated (finish_reason "length"), finish_reason, usage. With a
    tokenizer (--api-tokenizer) the text is its decoding of the completion's token ids, as the local path's."""
    choices = getattr(resp, "choices", None)
    message = choices[0].message if isinstance(choices, list) and choices else None
    if message is None or not isinstance(message.content, (str, type(None))):
        what = "not a chat completion" if choices is None else "no choices[0].message with text content"
        sys.exit(f"evaluate.py: error: {base} sent a malformed response for task {tid} ({what})")
    u = getattr(resp, "usage", None)
    usage = None
    if u is not None and isinstance(u.prompt_tokens, int) and isinstance(u.completion_tokens, int):
        usage = dict(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens)
    reason = choices[0].finish_reason
    text = message.content or ""
    if tokenizer is not None:
        ids = getattr(choices[0], "token_ids", None)
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            sys.exit(f"evaluate.py: error: {base} sent no token_ids for task {tid}: --api-tokenizer needs a vLLM "
                     "server (return_token_ids is vLLM's field)")
        text = tokenizer.decode(ids, skip_special_tokens=True)
    return dict(text=text, truncated=reason == "length", finish_reason=reason,
                n_tokens=usage and usage["completion_tokens"], usage=usage)


def api_answerer(tasks_dir, args, key, request=None):
    """Stream of (task, answer) in the order the answers arrive, --api-workers requests in flight. When one
    request fails for good the others stop, the answers already back are still handed out (written), then its
    one-line error is raised: a rerun resumes from what was written. request: the body builder (default
    api_request; the --reasonmatch route passes the released protocol's)."""
    request = request or api_request
    import openai
    client = openai.OpenAI(base_url=args.api_base, api_key=key, max_retries=0, timeout=args.api_timeout)
    tokenizer, extra = vllm_decoding(args.api_tokenizer) if args.api_tokenizer else (None, None)

    def ask(task, stop):
        if stop.is_set():
            raise ApiStopped
        return api_answer(client, task, request(task, tasks_dir, args, extra), args, stop, tokenizer)

    def stream(todo):
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=args.api_workers)
        jobs = {pool.submit(ask, t, stop): t for t in todo}
        error = None
        try:
            for fut in as_completed(jobs):
                if isinstance(fut.exception(), ApiStopped):
                    continue
                if fut.exception() is not None:
                    if error is None:  # the first failure is the one reported; the queued requests stop at once
                        error = fut.exception()  # (not cancel_futures: as_completed never hears of those)
                        stop.set()
                    continue
                yield jobs[fut], fut.result()
        finally:  # also when the caller stops early (Ctrl-C): nothing more is asked
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
        if error is not None:
            raise error
    return stream


def task_rng(seed, task_id):
    """A generator that depends only on the seed and the task, so order, batching and resumes do not matter."""
    return np.random.default_rng([seed, zlib.crc32(task_id.encode())])


def answer_random(task, seed):
    rng = task_rng(seed, task["task_id"])
    options = list(task["y_labels"]) + [None]
    return {i + 1: options[rng.integers(len(options))] for i in range(task["n"])}


def answer_none(task):
    return {i + 1: None for i in range(task["n"])}


def sift_at(sift, gray, points, size):
    """Unit-normalised upright SIFT descriptors at the given (x, y) points."""
    import cv2
    kps = [cv2.KeyPoint(float(x), float(y), size, 0.0) for x, y in points]
    kps_out, desc = sift.compute(gray, kps)
    assert len(kps_out) == len(kps), "SIFT dropped a labelled point"
    return desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-6)


def epipolar_distance(F, x, y):
    """Symmetric point-to-epipolar-line distance in pixels, (n, m) for x (n,2) in image 1, y (m,2) in image 2."""
    xh = np.c_[x, np.ones(len(x))]
    yh = np.c_[y, np.ones(len(y))]
    l2 = xh @ F.T  # lines in image 2, one per x
    l1 = yh @ F    # lines in image 1, one per y
    num = np.abs(l2 @ yh.T)  # (n, m): |y_j^T F x_i|
    d2 = num / np.maximum(np.hypot(l2[:, 0], l2[:, 1])[:, None], 1e-12)
    d1 = num / np.maximum(np.hypot(l1[:, 0], l1[:, 1])[None, :], 1e-12)
    return np.maximum(d1, d2)


class SiftMatcher:
    """The SIFT rule of the docstring. Caches per run: dense features per image (LRU; the same frame recurs in
    many pairs and dense detection is most of the cost) and F per image pair (several tasks share a pair)."""

    def __init__(self, args, min_inliers=15, cache_images=64):
        import cv2  # OpenCV only for the SIFT baseline and --show: --answers and the API path run without it
        self.args, self.min_inliers, self.cache_images = args, min_inliers, cache_images
        self.sift = cv2.SIFT_create(nfeatures=4000)
        self.images, self.fmats = OrderedDict(), {}

    def features(self, path, task):
        """(gray image, dense keypoints, dense descriptors) of one image."""
        import cv2
        if path in self.images:
            self.images.move_to_end(path)
            return self.images[path]
        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if gray is None:
            sys.exit(f"evaluate.py: error: cannot read image {path} of task {task['task_id']}")
        self.images[path] = (gray, *self.sift.detectAndCompute(gray, None))
        if len(self.images) > self.cache_images:
            self.images.popitem(last=False)
        return self.images[path]

    def fundamental_matrix(self, f1, f2):
        """F from dense SIFT + ratio test + RANSAC, or None when too few inliers to trust it."""
        import cv2
        (_, k1, d1), (_, k2, d2) = f1, f2
        if d1 is None or d2 is None or len(k1) < 2 or len(k2) < 2:
            return None
        good = [m for m, n in cv2.BFMatcher(cv2.NORM_L2).knnMatch(d1, d2, k=2) if m.distance < 0.8 * n.distance]
        if len(good) < self.min_inliers:
            return None
        p1 = np.float32([k1[m.queryIdx].pt for m in good])
        p2 = np.float32([k2[m.trainIdx].pt for m in good])
        cv2.setRNGSeed(0)
        F, mask = cv2.findFundamentalMat(p1, p2, cv2.FM_RANSAC, 1.5, 0.999)
        if F is None or F.shape != (3, 3) or mask.sum() < self.min_inliers:
            return None
        return F

    def answer(self, task):
        """{i: Y label or None}: descriptors at the points, epipolar gate, nearest + ratio, one-to-one."""
        a = self.args
        f1, f2 = (self.features(p, task) for p in task["originals"])
        (g1, g2), pair = (f1[0], f2[0]), tuple(task["originals"])
        x, y = np.float64(task["x_points"]), np.float64(task["y_points"])
        dx = sift_at(self.sift, g1, x, a.sift_size * max(g1.shape))
        dy = sift_at(self.sift, g2, y, a.sift_size * max(g2.shape))
        dist = np.linalg.norm(dx[:, None] - dy[None], axis=2)  # (n, m)
        if pair not in self.fmats:
            self.fmats[pair] = self.fundamental_matrix(f1, f2)
        if self.fmats[pair] is not None:
            dist[epipolar_distance(self.fmats[pair], x, y) > a.sift_epi * max(g2.shape)] = np.inf
        choice = {}
        for i in range(len(x)):
            order = np.argsort(dist[i], kind="stable")
            d1 = dist[i, order[0]]
            d2 = dist[i, order[1]] if len(order) > 1 else np.inf
            if d1 < a.sift_max_dist and d1 < a.sift_ratio * d2:
                choice[i] = (order[0], d1)
        mapping = {i + 1: None for i in range(len(x))}
        claimed = set()
        for i, (j, _) in sorted(choice.items(), key=lambda kv: (kv[1][1], kv[0])):  # closest claim first
            if j not in claimed:
                claimed.add(j)
                mapping[i + 1] = task["y_labels"][j]
        return mapping


def baseline_answerer(kind, args):
    if kind == "sift":
        rule = SiftMatcher(args).answer
    elif kind == "random":
        rule = lambda t: answer_random(t, args.seed)
    else:
        rule = answer_none
    return in_batches(lambda batch: [dict(text=reward.format_answer(rule(t))) for t in batch], args.batch_size)

# -----------------------------------------------------------------------------
# metrics: a pure function of the prediction rows

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


def report_metrics(out, current, tasks_sha, limit):
    """This run's metrics plus every other <out>/*/metrics.json made on the same tasks (file hash and --limit),
    so models evaluated in separate runs share one report; models first, then baselines, each by name."""
    found = dict(current)
    for p in sorted(out.glob("*/metrics.json")):
        if p.parent.name in found:
            continue
        try:
            m = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            sys.exit(f"evaluate.py: error: {p} is not JSON ({e}); delete it or rerun that model")
        if m.get("tasks_sha") == tasks_sha and m.get("limit") == limit and m.get("overall"):
            found[p.parent.name] = m
    return dict(sorted(found.items(), key=lambda kv: (kv[1].get("kind") == "baseline", kv[0])))

# -----------------------------------------------------------------------------
# outputs: report, plots, side-by-side pictures

def pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def breakdown_table(all_metrics, get):
    """Models as rows, the groups of one breakdown as columns (F1, macro)."""
    keys = list(dict.fromkeys(k for m in all_metrics.values() for k in get(m)))  # aggregate's order
    first = next(iter(all_metrics.values()))
    header = ["model"] + [f"{k} (n={get(first)[k]['n_tasks']})" if k in get(first) else k for k in keys]
    return table(header, [[name] + [pct(get(m)[k]["f1"]) if k in get(m) else "-" for k in keys]
                          for name, m in all_metrics.items()])


def truncation_cell(m):
    """'12.5 (5120)' for a model, '-' for a baseline."""
    rate = m["overall"].get("truncated_rate")
    return "-" if rate is None else f"{pct(rate)} ({m.get('max_new_tokens', '?')})"


def scene_level_table(all_metrics):
    """One row per (model, scene type): F1 at L1, L2, L3 and over all levels."""
    first = next(iter(all_metrics.values()))
    levels = list(first["by_level"])
    rows = []
    for name, m in all_metrics.items():
        for st, by_level in m.get("by_scene_type_level", {}).items():  # absent in metrics.json of older runs
            rows.append([name, f"{st} (n={m['by_scene_type'][st]['n_tasks']})"]
                        + [pct(by_level[lv]["f1"]) if lv in by_level else "-" for lv in levels]
                        + [pct(m["by_scene_type"][st]["f1"])])
    return table(["model", "scene type (tasks)"] + levels + ["all levels"], rows)


def widest_section(all_metrics):
    """The widest subset: how it was chosen, then Overall and one column per widest source (F1). Models whose
    metrics.json holds another subset (older runs, other --widest settings) get "-"."""
    w = next((m["widest"] for m in all_metrics.values() if "pairs" in m.get("widest", {})), None)
    if w is None:
        return ["\n## Widest subset\n\nNone of these metrics.json files has one (made by an older evaluate.py).\n"]
    same = lambda m: m.get("widest", {}).get("pairs") == w["pairs"] and m["widest"].get("sources") == w["sources"]
    n_src = {s: w["by_source"][s]["n_tasks"] if s in w["by_source"] else 0 for s in w["sources"]}
    how = (f"\n## Widest subset: the {w['k']} pairs with the largest viewpoint difference ({w['n_tasks']} tasks), "
           "F1\n\nChosen as the paper's human-control subset (its 90 largest viewpoint differences, reported "
           "Overall / DL3DV / RE10K / uCO3D): each pair's Δv percentile rank among this task file's pairs of the same "
           "source (Δv = 1 - overlap is not comparable across sources), then the pairs with the highest rank from "
           f"{', '.join(w['sources'])} (ties: larger Δv, then pair_id), with every task of those pairs "
           "(evaluate.widest_pairs; --widest, --widest-sources).\n")
    rows = [[n, pct(m["widest"]["overall"]["f1"]) if same(m) and m["widest"]["overall"] else "-"]
            + [pct(m["widest"]["by_source"][s]["f1"]) if same(m) and s in m["widest"]["by_source"] else "-"
               for s in w["sources"]]
            for n, m in all_metrics.items()]
    return [how, table(["model", f"overall (n={w['n_tasks']})"] + [f"{s} (n={n_src[s]})" for s in w["sources"]],
                       rows)]


def write_report(out, all_metrics, tasks_path, shows):
    parts = [f"# widematch evaluation\n\nTasks: `{tasks_path}`. Numbers in percent. F1 / P / R are macro "
             "(per-task, averaged over tasks); micro F1 pools the link counts of all tasks first. Match acc: "
             "points answered exactly right (a correct none counts); format: answers that parse.\n",
             "Models: " + "; ".join(f"{n} = `{m['source']}`" for n, m in all_metrics.items()) + "\n",
             "## Overall\n",
             "Truncated: completions that reached the decoding budget (max new tokens, in brackets) without a stop "
             "token; they usually score 0, so a high rate means the budget, not the model, sets the number.\n",
             table(["model", "F1", "P", "R", "match acc", "format", "micro F1", "truncated", "tasks"],
                   [[n, pct(m["overall"]["f1"]), pct(m["overall"]["precision"]), pct(m["overall"]["recall"]),
                     pct(m["overall"]["match_acc"]), pct(m["overall"]["format_rate"]),
                     pct(m["overall"]["micro_f1"]), truncation_cell(m), m["overall"]["n_tasks"]]
                    for n, m in all_metrics.items()])]
    if any(m["overall"].get("action_acc") is not None for m in all_metrics.values()):  # ActoR tasks
        parts += ["\n## ActoR: camera actions before the answer (HATCH)\n",
                  "Action acc: mean of the four components (yaw, pitch, roll within the task's step, dominant move "
                  "direction) against the pool's relative pose; see reward.action_reward.\n",
                  table(["model", "action acc", "yaw", "pitch", "roll", "move", "F1"],
                        [[n] + [pct(m["overall"].get(k)) for k in ("action_acc", "yaw_acc", "pitch_acc", "roll_acc",
                                                                   "move_acc", "f1")]
                         for n, m in all_metrics.items()])]
    for key, title in [("source", "source"), ("level", "level"), ("scene_type", "scene type"),
                       ("spatial", "point layout"), ("bin", "overlap bin (numbered within each source)")]:
        parts += [f"\n## F1 by {title}\n", breakdown_table(all_metrics, lambda m, k=key: m[f"by_{k}"])]
    parts += ["\n## F1 by scene type x level (the paper's difficulty table)\n", scene_level_table(all_metrics)]
    parts += widest_section(all_metrics)
    parts += ["\n## Plots\n", "![F1 vs overlap bin](f1_vs_bin.png)\n", "![F1 by source](f1_by_source.png)\n"]
    if shows:
        parts += ["\n## Examples\n", "Links: green correct, red wrong, dashed grey ground truth; rings on points "
                  "answered none (green correct, orange missed) or not answered (magenta).\n"]
        parts += [f"- {name}: " + ", ".join(f"[{p.stem}]({p.relative_to(out).as_posix()})" for p in ps)
                  for name, ps in shows.items()]
    parts += transfer_section(out)  # an earlier --transfer's table stays in the rebuilt report
    (out / "report.md").write_text("\n".join(parts) + "\n")

# -----------------------------------------------------------------------------
# the paper's transfer table (evaluate.py --transfer RESULTS...): lmms-eval results of the base and the trained model

# (row, lmms-eval 0.7.3 task names (the first one present is used), the headline metric's key in its results JSON,
# factor to percent (V*Bench already reports percent), the paper's Qwen3-VL-8B base -> DCRL numbers)
TRANSFER_BENCHMARKS = (
    ("OmniSpatial", ("omni_spatial",), "omni_spatial_score,none", 100, (43.60, 48.87)),
    ("MindCube", ("mindcube_full", "mindcube_tiny"), "overall_accuracy,none", 100, (40.01, 43.52)),
    ("SAT Real", ("sat",), "exact_match,flexible-extract", 100, (70.0, 75.3)),
    ("MME-RealWorld", ("mmerealworld",), "mme_realworld_score,none", 100, (62.8, 63.8)),
    ("MMStar", ("mmstar",), "average,none", 100, (59.8, 62.5)),
    ("RealWorldQA", ("realworldqa",), "exact_match,none", 100, (69.5, 70.5)),
    ("V*Bench", ("vstar_bench",), "vstar_overall_acc,none", 1, (84.8, 85.9)),
    ("ReasonMatch-style F1 (export_bench.py's widematch)", ("widematch",), "f1,none", 100, (27.5, 70.5)),
)
TRANSFER_HEADING = "## Transfer: lmms-eval benchmarks, base vs trained"


def read_lmms_results(path):
    """(model name, dict) of one lmms-eval results file (<output_path>/<model>/<date>_results.json); the name is
    its model_name (the model / pretrained argument), else its model_args, else its directory's name."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        sys.exit(f"evaluate.py: error: --transfer {path} cannot be read as JSON ({one_line(e)})")
    if not isinstance(d, dict) or not isinstance(d.get("results"), dict):
        sys.exit(f"evaluate.py: error: --transfer {path} is not an lmms-eval results file (no \"results\" object)")
    name = d.get("model_name") or (d.get("config") or {}).get("model_args") or Path(path).parent.name
    return str(name), d


def transfer_table(paths):
    """The transfer table from lmms-eval results files: one column per model in order of first appearance (the
    first is the base; each other model gets a delta against it), one row per TRANSFER_BENCHMARKS entry
    (value None where a model has no run of it). A benchmark given twice for one model, or a results entry
    without the expected metric, stops the run. Notes flag runs made with different generation settings or on
    a --limit'ed part of a benchmark."""
    models = {}
    for p in paths:
        name, d = read_lmms_results(p)
        runs = models.setdefault(name, {})
        for task, res in d["results"].items():
            if task in runs:
                sys.exit(f"evaluate.py: error: --transfer: {task} of model {name} is in both {runs[task]['file']} "
                         f"and {p}: give one run per benchmark and model")
            runs[task] = dict(file=str(p), results=res, n=(d.get("n-samples") or {}).get(task) or {},
                              gen=(d.get("configs") or {}).get(task, {}).get("generation_kwargs"),
                              gen_cli=(d.get("config") or {}).get("gen_kwargs") or "")
    names = list(models)
    if len(names) < 2:
        sys.exit(f"evaluate.py: error: --transfer needs the results of two models (the base's files first, then the "
                 f"trained model's); these files are all of {names[0]!r}")
    rows, notes = [], []
    for label, task_names, key, scale, paper in TRANSFER_BENCHMARKS:
        task = next((t for t in task_names if any(t in runs for runs in models.values())), task_names[0])
        cells = []
        for name in names:
            run = models[name].get(task)
            if run is None:
                cells.append(None)
                continue
            v = run["results"].get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                sys.exit(f"evaluate.py: error: --transfer {run['file']}: {task} has no number under {key!r} "
                         f"(lmms-eval 0.7.3's headline metric of {label})")
            cells.append(dict(value=scale * v, n=run["n"].get("effective"), of=run["n"].get("original"),
                              gen=run["gen"], gen_cli=run["gen_cli"]))
        present = [(n, c) for n, c in zip(names, cells) if c]
        if len({json.dumps([c["gen"], c["gen_cli"]], sort_keys=True) for _, c in present}) > 1:
            notes.append(f"{label}: the models ran with different generation settings ("
                         + "; ".join(f"{n}: {c['gen']} {c['gen_cli']}".strip() for n, c in present) + ")")
        for n, c in present:
            if c["n"] is not None and c["of"] is not None and c["n"] < c["of"]:
                notes.append(f"{label}: {n} ran on {c['n']} of {c['of']} documents (--limit)")
        rows.append(dict(benchmark=label, task=task, metric=key, paper=list(paper), cells=cells))
    return dict(models=names, rows=rows, notes=notes, files=[str(p) for p in paths])


def transfer_markdown(t):
    """report.md's transfer section from transfer_table's dict."""
    base, others = t["models"][0], t["models"][1:]
    f2 = lambda c: "-" if c is None else f"{c['value']:.2f}"
    delta = lambda a, b: "-" if a is None or b is None else f"{b['value'] - a['value']:+.2f}"
    header = ["benchmark", "lmms-eval task (metric)", f"base: {base}"]
    for o in others:
        header += [o, "Δ"]
    header += ["docs (per model)", "paper: base → DCRL (Δ)"]
    rows = []
    for r in t["rows"]:
        cells = r["cells"]
        ns = ["-" if c is None or c["n"] is None else str(c["n"]) for c in cells]
        row = [r["benchmark"], f"`{r['task']}` ({r['metric']})", f2(cells[0])]
        for c in cells[1:]:
            row += [f2(c), delta(cells[0], c)]
        pb, pt = r["paper"]
        rows.append(row + [ns[0] if len(set(ns)) == 1 else " / ".join(ns), f"{pb:.2f} → {pt:.2f} ({pt - pb:+.2f})"])
    lines = [f"\n{TRANSFER_HEADING}\n",
             "Numbers in percent: each benchmark's headline metric as lmms-eval 0.7.3 computes it (its task and "
             "metric key in the second column), from " + ", ".join(f"`{p}`" for p in t["files"]) + " (made with "
             "`evaluate.py --transfer`; README \"Transfer benchmarks\" has the commands). Δ = model - base. The "
             "paper's column is Qwen3-VL-8B before and after DCRL, for orientation only (other checkpoints, other "
             "runs). SAT Real is lmms-eval's `sat` (each question asked once, not circularly); MindCube is the "
             "paper's `mindcube_full` unless only `mindcube_tiny` was run. Our ReasonMatch-style row is "
             "export_bench.py's task on our own test split, not the paper's ReasonMatch-Bench.\n",
             table(header, rows)]
    if t["notes"]:
        lines += ["\nCaveats found in the files:\n"] + [f"- {n}" for n in t["notes"]]
    return lines


def transfer_section(out):
    """The transfer section of <out>/transfer.json (written by --transfer), or nothing."""
    p = out / "transfer.json"
    return transfer_markdown(json.loads(p.read_text())) if p.is_file() else []


def write_transfer(out, paths):
    """--transfer: <out>/transfer.json, and the section put into <out>/report.md in place of an earlier one (the
    rest of the report is kept; without a report, one is started). Returns the table."""
    t = transfer_table(paths)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transfer.json").write_text(json.dumps(t, indent=2) + "\n")
    report = out / "report.md"
    text = report.read_text() if report.is_file() else "# widematch evaluation\n"
    kept = text.split(f"\n{TRANSFER_HEADING}\n")[0].rstrip("\n") + "\n"  # the section is always the report's last
    report.write_text(kept + "\n".join(transfer_section(out)) + "\n")
    return t


def plot_f1_vs_bin(out, all_metrics):
    levels = sorted({lvl for m in all_metrics.values() for lvl in m["by_level_bin"]})
    fig, axes = plt.subplots(1, len(levels), figsize=(4.5 * len(levels), 3.6), squeeze=False, sharey=True)
    for ax, lvl in zip(axes[0], levels):
        for name, m in all_metrics.items():
            bins = m["by_level_bin"].get(lvl, {})
            xs = sorted(bins, key=int)
            ax.plot([int(b) for b in xs], [100 * bins[b]["f1"] for b in xs], marker="o", label=name)
        ax.set(title=f"level {lvl}", xlabel="overlap bin (larger = wider baseline)", ylim=(0, 100))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("F1 (macro, %)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "f1_vs_bin.png", dpi=110)
    plt.close(fig)


def plot_f1_by_source(out, all_metrics):
    sources = sorted({s for m in all_metrics.values() for s in m["by_source"]})
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(sources) * max(1, len(all_metrics)) / 2), 3.6))
    width = 0.8 / len(all_metrics)
    for k, (name, m) in enumerate(all_metrics.items()):
        ax.bar(np.arange(len(sources)) + k * width, [100 * m["by_source"].get(s, {}).get("f1", 0) for s in sources],
               width, label=name)
    ax.set_xticks(np.arange(len(sources)) + 0.4 - width / 2, sources)
    ax.set(ylabel="F1 (macro, %)", ylim=(0, 100), title="F1 by source")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "f1_by_source.png", dpi=110)
    plt.close(fig)


def show_indices(tasks, k):
    """k tasks spread evenly over the Δv range, so the pictures cover easy and hard pairs."""
    order = sorted(range(len(tasks)), key=lambda i: (tasks[i]["delta_v"], tasks[i]["task_id"]))
    return [order[i] for i in sorted(set(np.linspace(0, len(order) - 1, k).round().astype(int)))] if k else []


def show_task(path, task, row, name):
    """Side-by-side picture of one task: points, ground truth, the model's answer."""
    import cv2
    imgs = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in task["originals"]]
    h, w = max(i.shape[0] for i in imgs), max(i.shape[1] for i in imgs)
    inch = 6 / max(h, w)  # the longer image side gets 6 inches, portrait or landscape
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(2 * w * inch + 0.4, h * inch + 1.2))
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.5 / (h * inch + 1.2), bottom=0.7 / (h * inch + 1.2),
                        wspace=0.04)
    for ax, img, pts, labels, col in [(a1, imgs[0], task["x_points"], task["x_labels"], "cyan"),
                                      (a2, imgs[1], task["y_points"], task["y_labels"], "yellow")]:
        ax.imshow(img)
        ax.axis("off")
        for (px, py), lab in zip(pts, labels):
            ax.plot(px, py, "o", ms=4, color=col, mec="black")
            ax.annotate(lab, (px, py), xytext=(3, 3), textcoords="offset points", color=col, fontsize=8,
                        weight="bold")
    ylab = {lab: j for j, lab in enumerate(task["y_labels"])}
    link = lambda i, j, **kw: fig.add_artist(ConnectionPatch(task["x_points"][i], task["y_points"][j], "data",
                                                             "data", axesA=a1, axesB=a2, **kw))
    for i, t in enumerate(task["target"]):
        if t is not None:
            link(i, ylab[t], color="0.85", ls="--", lw=1)
    parsed = row["parsed"]
    for i, t in enumerate(task["target"]):
        if parsed is None:
            break
        p = parsed.get(str(i + 1), "missing")
        if p in ylab:
            link(i, ylab[p], color="limegreen" if p == t else "red", lw=1.6)
        else:  # none, or not answered at all (a partial block): rings
            ring = "magenta" if p == "missing" else "limegreen" if t is None else "orange"
            a1.plot(*task["x_points"][i], "o", ms=11, mfc="none", mew=2, color=ring)
    status = "answer did not parse" if parsed is None else f"F1 {100 * row['f1']:.0f}, match {100 * row['match']:.0f}"
    fig.suptitle(f"{name} | {task['task_id']} | {task['source']} {task['level']} bin {task['bin']} "
                 f"Δv {task['delta_v']:.2f} | {status}", fontsize=9)
    handles = [Line2D([], [], color="limegreen", lw=2, label="correct link"),
               Line2D([], [], color="red", lw=2, label="wrong link"),
               Line2D([], [], color="0.6", ls="--", label="ground truth"),
               Line2D([], [], marker="o", ls="", mfc="none", color="limegreen", label="correct none"),
               Line2D([], [], marker="o", ls="", mfc="none", color="orange", label="missed (said none)"),
               Line2D([], [], marker="o", ls="", mfc="none", color="magenta", label="not answered")]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)

def write_shows(show_dir, tasks, rows, k, name):
    """show_task for k tasks spread over Δv; returns the PNG paths."""
    show_dir.mkdir(exist_ok=True)
    paths = []
    for i in show_indices(tasks, k):
        paths.append(show_dir / (re.sub(r"[^A-Za-z0-9._-]", "_", tasks[i]["task_id"]) + ".png"))
        show_task(paths[-1], tasks[i], rows[i], name)
    return paths

# -----------------------------------------------------------------------------

def main(argv=None):
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
    if args.reasonmatch:
        from widematch import reasonmatch
        return reasonmatch.evaluate_main(args)
    only_rm = [f for f, v in (("--dataset-filter", args.dataset_filter), ("--stage-filter", args.stage_filter),
                              ("--prompt-template", args.prompt_template), ("--no-think", args.no_think),
                              ("--scene-map", args.scene_map)) if v]
    if only_rm:  # our tasks carry their own prompt and fields
        sys.exit(f"evaluate.py: error: {only_rm[0]} goes with --reasonmatch PATH")

    if args.transfer:  # needs no tasks file; with models to evaluate too, their report keeps the section
        missing = [p for p in args.transfer if not Path(p).is_file()]
        if missing:
            sys.exit(f"evaluate.py: error: --transfer {missing[0]} does not exist")
        t = write_transfer(Path(args.out), args.transfer)
        if not (args.ckpts or args.baseline or args.answers or args.api_base):
            print(f"evaluate.py: transfer table of {len(t['models'])} models over {len(t['rows'])} benchmarks -> "
                  f"{args.out}/report.md")
            return
    tasks_path = Path(args.tasks)
    if not tasks_path.is_file():
        sys.exit(f"evaluate.py: error: --tasks {tasks_path} does not exist")
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    tasks = all_tasks = load_tasks(tasks_path)
    if args.limit:
        tasks = tasks[:args.limit]
    if not tasks:
        sys.exit(f"evaluate.py: error: --tasks {tasks_path} has no tasks")
    tasks_sha = hashlib.sha256(tasks_path.read_bytes()).hexdigest()[:16]
    widest_sources = args.widest_sources.split(",") if args.widest_sources else None
    if widest_sources and not set(widest_sources) & {t["source"] for t in tasks}:
        sys.exit(f"evaluate.py: error: --widest-sources {args.widest_sources}: no task of {tasks_path} is from them")

    # what to evaluate: models, answers files, then baselines, each under a unique directory name
    resolved = [resolve_ckpt(c) for c in args.ckpts]
    entries = [("model", c, model_name(c)) for c in resolved]
    if args.answers:
        entries.append(("answers", str(Path(args.answers).resolve()),
                        args.name or re.sub(r"[^A-Za-z0-9._-]", "_", Path(args.answers).stem).strip("._") or "answers"))
    if args.api_base:
        entries.append(("api", f"{args.api_model} @ {args.api_base}",
                        re.sub(r"[^A-Za-z0-9._-]", "_", args.name or args.api_model).strip("._") or "api"))
    entries += [("baseline", b, f"baseline_{b}") for b in args.baseline]
    entries = [(n, kind, what) for n, (kind, what, _) in zip(unique_names([e[2] for e in entries]), entries)]

    all_metrics, shows = {}, {}
    for name, kind, what in entries:
        model_dir = out / name
        info = dict(kind=kind, what=what, tasks_sha=tasks_sha, seed=args.seed)
        if kind == "answers":  # re-scored from scratch every run: nothing to resume, only a model's dir to protect
            check_run_info(model_dir, dict(kind=kind, what=what, tasks_sha=tasks_sha), keys=("kind",))
            rows = score_answers(tasks, read_any_answers(args.answers, all_tasks), model_dir)
        else:
            if kind == "model":
                info.update(temperature=args.temperature, max_new_tokens=args.max_new_tokens, dtype=model_dtype(args))
                if args.engine == "vllm":  # (hf runs keep the run.json they always had)
                    info["engine"] = "vllm"
                make_answerer = lambda: model_answerer(what, tasks_path.parent, tasks, args)
            elif kind == "api":
                info.update(temperature=None if args.api_no_temperature else args.temperature,
                            max_new_tokens=args.max_new_tokens, max_tokens_param=args.api_max_tokens_param,
                            api_tokenizer=args.api_tokenizer)
                make_answerer = lambda: api_answerer(tasks_path.parent, args, api_key)
            else:
                if what == "sift":
                    info.update({k: getattr(args, k) for k in ("sift_size", "sift_epi", "sift_ratio", "sift_max_dist")})
                make_answerer = lambda: baseline_answerer(what, args)
            check_run_info(model_dir, info)
            rows = predict(make_answerer, tasks, model_dir, name)
        metrics = run_metrics(name, kind, what, rows, tasks_sha, args.limit, args.widest, widest_sources)
        if kind in ("model", "api"):  # the budget the truncation rate is measured against
            metrics["max_new_tokens"] = args.max_new_tokens
        (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        all_metrics[name] = metrics
        if args.show:
            shows[name] = write_shows(model_dir / "show", tasks, rows, args.show, name)

    all_metrics = report_metrics(out, all_metrics, tasks_sha, args.limit)
    plot_f1_vs_bin(out, all_metrics)
    plot_f1_by_source(out, all_metrics)
    write_report(out, all_metrics, tasks_path, shows)
    summary = ", ".join(f"{n} F1 {pct(m['overall']['f1'])}" for n, m in all_metrics.items())
    print(f"evaluate.py: {len(tasks)} tasks -> {out}/report.md ({summary})")


if __name__ == "__main__":
    main()
