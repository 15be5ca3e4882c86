"""
export_bench.py: a make_tasks.py task file as a benchmark for the harnesses people use: a Hugging Face dataset
(parquet + dataset card), a VLMEvalKit TSV and an lmms-eval task folder, all scored by reward.py.

Usage:
    python export_bench.py --tasks tasks/test.jsonl --out bench_hf                # the demo's test split, seconds
    python export_bench.py --tasks bench/test.jsonl --out ReasonMatch-Bench --name ReasonMatch-Bench  # 2,810 tasks
    python export_bench.py --tasks tasks/test.jsonl --format reasonmatch --out rm_bench   # the released layout
    python export_bench.py --pool pool --split train --format reasonmatch-lmdb --out train_lmdb   # training LMDB

Input: --tasks, a make_tasks.py jsonl (prompted images read relative to its directory; args_<split>.json and
composition_<split>.json beside it go into the card); a bad line, a missing field or image stops with one line
naming the file, the line and the task.
Outputs (in --out; files of an earlier export there are replaced): data/<split>-00000-of-00001.parquet (one row
per task, in the tasks file's order), README.md (the dataset card), WideMatch.tsv (VLMEvalKit), lmms_eval/widematch/
(an lmms-eval --include_path task folder with a verbatim copy of reward.py), export_args.json.
Then run a harness and score its answers with evaluate.py --answers (README "The benchmark in lmms-eval and
VLMEvalKit").

Details: docs/harnesses.md, "export_bench.py in full" (every command, each output's columns, the departures).
"""
import argparse
import base64
import csv
import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

import reward
from widematch import hf_export
from widematch.answers import json_lines
from widematch.hf_export import ParquetRows, card_header

EXPORT_FIELDS = ("task_id", "pair_id", "source", "scene", "scene_type", "split", "level", "spatial", "bin",
                 "delta_v", "n", "m", "images", "prompt", "target", "x_labels", "y_labels", "x_points", "y_points")
TSV_NAME = "WideMatch"    # VLMEvalKit's --data name is the TSV's stem
TASK_NAME = "widematch"   # lmms-eval's --tasks name
IMAGE_MAGIC = {".jpg": b"\xff\xd8\xff", ".jpeg": b"\xff\xd8\xff", ".png": b"\x89PNG\r\n\x1a\n"}


def fail(msg):
    sys.exit(f"export_bench.py: error: {msg}")

# -----------------------------------------------------------------------------
# reading and checking the tasks


def load_tasks(path):
    """Tasks of a make_tasks.py jsonl in file order, each checked (fields, labels, target, unique task_id)."""
    tasks, seen = [], set()
    for where, t in json_lines(path, str(path), prog="export_bench.py"):
        if not isinstance(t, dict):
            fail(f"{where} is not a JSON object")
        missing = [k for k in EXPORT_FIELDS if k not in t]
        if missing:
            fail(f"{where} (task {t.get('task_id')!r}) lacks {', '.join(missing)}: not a make_tasks.py task")
        check_task(t, f"{where} (task {t['task_id']!r})")
        if t["task_id"] in seen:
            fail(f"{where}: duplicate task_id {t['task_id']!r}")
        seen.add(t["task_id"])
        tasks.append(t)
    if not tasks:
        fail(f"--tasks {path} has no tasks")
    splits = sorted({t["split"] for t in tasks})
    if len(splits) != 1:
        fail(f"--tasks {path} mixes splits ({', '.join(map(str, splits))}): export one split per file")
    return tasks


def check_task(t, where):
    """The invariants the reward and the harness rows rely on."""
    n, m = t["n"], t["m"]
    if not (isinstance(n, int) and isinstance(m, int) and n >= 1 and m >= 1):
        fail(f"{where}: n and m must be positive integers (got {n!r}, {m!r})")
    if t["x_labels"] != reward.x_labels_for(n) or t["y_labels"] != reward.y_labels_for(m):
        fail(f"{where}: x_labels / y_labels are not 1..{n} / 1..{m}")
    if len(t["x_points"]) != n or len(t["y_points"]) != m:
        fail(f"{where}: {len(t['x_points'])} x_points and {len(t['y_points'])} y_points for n={n}, m={m}")
    if not isinstance(t["target"], list) or len(t["target"]) != n or \
            any(v is not None and v not in t["y_labels"] for v in t["target"]):
        fail(f"{where}: target must hold n={n} entries, each an image-2 id of y_labels or null")
    if not isinstance(t["images"], list) or len(t["images"]) != 2:
        fail(f"{where}: images must list the two prompted image files")
    if not isinstance(t["prompt"], str) or not t["prompt"].strip():
        fail(f"{where}: empty prompt")


def image_bytes(tasks_dir, rel, task_id):
    """The prompted image file's bytes, unchanged; a missing file or one that is not the JPEG / PNG its name says
    stops the export."""
    p = tasks_dir / rel
    magic = IMAGE_MAGIC.get(p.suffix.lower())
    if magic is None:
        fail(f"task {task_id!r}: image {p} is not a .jpg/.jpeg/.png file")
    if not p.is_file():
        fail(f"task {task_id!r}: image {p} does not exist (images are read relative to the tasks file's directory)")
    data = p.read_bytes()
    if not data.startswith(magic):
        fail(f"task {task_id!r}: image {p} does not start like a {p.suffix} file (corrupt or renamed)")
    return data


def reference_answer(task):
    """The answer block that scores 100: the JSON object of the target (reward.reference_answer)."""
    return reward.reference_answer(task["target"])

# -----------------------------------------------------------------------------
# the Hugging Face dataset: features, rows, parquet


def hf_features():
    from datasets import Features, Image, List, Value  # only the export needs datasets (pyarrow)
    s, i32, f64 = Value("string"), Value("int32"), Value("float64")
    return Features({
        "task_id": s, "images": List(Image()), "prompt": s, "answer": s, "target": List(s), "n": i32, "m": i32,
        "x_labels": List(s), "y_labels": List(s), "x_points": List(List(f64)), "y_points": List(List(f64)),
        "pair_id": s, "source": s, "scene": s, "scene_type": s, "split": s, "level": s, "spatial": s, "bin": i32,
        "delta_v": f64, "actor": Value("bool")})


def hf_row(task, images):
    """One parquet row; images: [(file name, bytes)] of the two prompted images."""
    row = {k: task[k] for k in ("task_id", "prompt", "target", "n", "m", "x_labels", "y_labels", "pair_id",
                                "source", "scene", "scene_type", "split", "level", "spatial", "bin", "delta_v")}
    row.update(images=[{"bytes": b, "path": name} for name, b in images], answer=reference_answer(task),
               x_points=[[float(v) for v in p] for p in task["x_points"]],
               y_points=[[float(v) for v in p] for p in task["y_points"]],
               actor=bool(task.get("actor", False)))
    return row


# -----------------------------------------------------------------------------
# VLMEvalKit's TSV

TSV_COLUMNS = ("index", "image", "question", "answer", "task_id", "pair_id", "source", "scene", "scene_type", "split",
               "level", "spatial", "bin", "delta_v", "n", "m", "target")


def tsv_row(index, task, images):
    """index, the images as a Python list literal of base64 strings (VLMEvalKit evaluates it back into a list),
    the prompt as the question, the reference block as the answer, then metadata (target as JSON)."""
    b64 = [base64.b64encode(b).decode("ascii") for _, b in images]
    return [index, repr(b64), task["prompt"], reference_answer(task), *(task[k] for k in TSV_COLUMNS[4:-1]),
            json.dumps(task["target"])]

# -----------------------------------------------------------------------------
# lmms-eval's task folder

LMMS_YAML_HEAD = """\
# lmms-eval 0.7.3 task: {title} (written by widematch's export_bench.py; tasks file sha256 {sha}).
#   python -m lmms_eval --model openai --model_args model=MODEL,base_url=http://HOST:PORT/v1 \\
#       --include_path <export dir>/lmms_eval --tasks {task} --batch_size 1 --log_samples --output_path lmms_out
# The data is the local parquet two folders up (relative data_files are resolved against this yaml: offline)."""

LMMS_METRICS = ("f1", "precision", "recall", "match_acc", "format_rate", "micro_f1")
PAPER_MAX_NEW_TOKENS = 5120  # the lmms-eval task's decoding budget: the paper's

LMMS_UTILS = hf_export.lmms_utils_head(
    """lmms-eval task functions of widematch.yaml (written by widematch's export_bench.py).

Each answer is scored by reward.score, widematch's training reward (reward.py beside this file, a verbatim copy),
and the metrics are aggregated exactly as widematch's evaluate.py aggregates them: f1, precision, recall,
match_acc and format_rate are per-task values averaged over tasks with math.fsum (macro); micro_f1 comes from the
link counts summed over tasks (reward.prf). Values are fractions, as in evaluate.py's metrics.json. The micro_f1
item carries the task_id, so a --log_samples line maps back to its task even without the doc.
""", ("math",), "widematch",
    "The two prompted images (PIL, decoded from the exported bytes), image 1 first.",
    "The task's prompt, unchanged (it already holds the answer format).") + '''\
def widematch_process_results(doc, results):
    """reward.score of the model's answer; a missing or non-text answer scores as an unparseable one."""
    text = results[0] if results and isinstance(results[0], str) else ""
    s = reward.score(text, {"task_id": doc["task_id"], "n": doc["n"], "m": doc["m"], "target": list(doc["target"])})
    return {"f1": s["f1"], "precision": s["precision"], "recall": s["recall"], "match_acc": s["match"],
            "format_rate": s["format"],
            "micro_f1": {"task_id": doc["task_id"], "n_correct": s["n_correct"], "n_pred": s["n_pred"],
                         "n_pos": s["n_pos"]}}


def widematch_mean(items):
    """Mean over tasks (evaluate.group_metrics: math.fsum / n)."""
    return math.fsum(items) / len(items)


def widematch_micro_f1(items):
    """F1 of the link counts pooled over tasks (evaluate.group_metrics: reward.prf of the sums)."""
    return reward.prf(*(sum(i[k] for i in items) for k in ("n_correct", "n_pred", "n_pos")))[2]
'''


def lmms_yaml(tasks, split, parquet, sha, title):
    return hf_export.lmms_task_yaml(
        head=LMMS_YAML_HEAD.format(title=title, sha=sha, task=TASK_NAME), task=TASK_NAME, split=split,
        parquet=parquet, prefix="widematch",
        raw_note="# Score the raw answer, as widematch's training reward and evaluate.py do (lmms-eval would strip "
                 "<think> first).",
        max_new_tokens=PAPER_MAX_NEW_TOKENS,
        decoding_note=f"# The paper's budget ({PAPER_MAX_NEW_TOKENS} new tokens), greedy; no stop strings (the answer "
                      "block ends the reply).",
        metrics_note="# Fractions, as in widematch's metrics.json: macro means over tasks (F1, P, R, match, format), "
                     "micro F1 pooled.",
        metrics=[(k, "widematch_micro_f1" if k == "micro_f1" else "widematch_mean") for k in LMMS_METRICS],
        metadata=[("tasks_sha256", sha), ("n_tasks", len(tasks))])


def write_lmms_folder(out, tasks, split, parquet, sha, title):
    d = out / "lmms_eval" / TASK_NAME
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    (d / f"{TASK_NAME}.yaml").write_text(lmms_yaml(tasks, split, parquet, sha, title))
    (d / "utils.py").write_text(LMMS_UTILS)
    shutil.copyfile(Path(reward.__file__), d / "reward.py")

# -----------------------------------------------------------------------------
# the dataset card


def pct(c, n):
    return f"{100 * c / n:.1f}"


def count_table(tasks, key, title):
    c = Counter(t[key] for t in tasks)
    keys = sorted(c, key=lambda k: (isinstance(k, str), k))
    return [f"| {title} | tasks | % |", "|---|---|---|"] + [f"| {k} | {c[k]} | {pct(c[k], len(tasks))} |" for k in keys]


def cross_table(tasks, row, col):
    rows, cols = sorted({t[row] for t in tasks}), sorted({t[col] for t in tasks})
    c = Counter((t[row], t[col]) for t in tasks)
    return ([f"| {row} \\ {col} | " + " | ".join(map(str, cols)) + " | all |", "|---|" + "---|" * (len(cols) + 1)]
            + [f"| {r} | " + " | ".join(str(c[r, k]) for k in cols) + f" | {sum(c[r, k] for k in cols)} |"
               for r in rows])


def card_text(tasks, tasks_path, sha, split, parquet, args_info, comp_info, title):
    n = len(tasks)
    points = [t["n"] for t in tasks]
    lines = [f"# {title}", "",
             "Wide-baseline matching as a language task (ReasonMatch-style, after *Eliciting Complex Spatial "
             "Reasoning in MLLMs through Wide-Baseline Matching*): two images of one scene from very different "
             "viewpoints, numbered points drawn on both images; the model reasons, then "
             "answers which point of image 1 is which point of image 2, or `none` when it has no labelled partner.",
             "", f"{n} tasks ({len({t['pair_id'] for t in tasks})} image pairs), split `{split}`, "
             f"{min(points)}-{max(points)} numbered points per task (mean {sum(points) / n:.1f}), "
             f"{min(t['m'] for t in tasks)}-{max(t['m'] for t in tasks)} points on image 2.", "",
             "## How it was built", "",
             f"Exported by widematch's `export_bench.py` from `{tasks_path.name}` (sha256 `{sha}`), the output of "
             "`make_tasks.py` on a pool of verified correspondences (`build_pool.py`: depth reprojection for RGB-D "
             "scans, SfM tracks for COLMAP / CO3D-style captures); each pair's Δv = 1 - overlap is binned per "
             "source. Images: the prompted images exactly as the model sees them (the files' bytes, unchanged)."]
    if args_info:
        keep = {k: v for k, v in args_info.items() if k not in ("pool", "out") and v not in (None, "", False)}
        lines += ["", "make_tasks.py arguments: "
                  + ", ".join(f"`--{k.replace('_', '-')} {v}`" for k, v in keep.items())]
    shares = lambda key, kind: (comp_info or {}).get(key, {}).get(kind)
    if shares("source", "achieved") and shares("level", "achieved"):
        lines += ["", "Composition asked and achieved (make_tasks.py, percent): sources "
                  f"{shares('source', 'asked')} -> {shares('source', 'achieved')}; levels "
                  f"{shares('level', 'asked')} -> {shares('level', 'achieved')}."]
    lines += ["", "## Composition", ""]
    for key, title_ in (("source", "source"), ("level", "level"), ("scene_type", "scene type"),
                        ("spatial", "point layout"), ("bin", "overlap bin (within source)")):
        lines += count_table(tasks, key, title_) + [""]
    lines += ["Tasks per source and level:", ""] + cross_table(tasks, "source", "level") + [""]
    lines += ["Levels: L1 every numbered point has its partner, no distractors; L2 distractors in image 2; L3 "
              "distractors on both sides, some numbered points have no partner (answer `none`). Layouts: sparse, "
              "moderate (points in small local groups), dense (neighbours told apart by fine detail).", "",
              "## Fields", "",
              "`task_id`, `images` (image 1, image 2), `prompt` (the full user text, answer format included), "
              "`answer` (the reference answer block), `target` (per image-1 id its image-2 id or null), `n`, `m`, "
              "`x_labels`, `y_labels`, `x_points` / `y_points` (the points in the original images' pixels), "
              "`pair_id`, `source`, `scene`, `scene_type`, `split`, `level`, `spatial`, `bin`, `delta_v`, `actor`. "
              f"Row i is task i of `{tasks_path.name}` (lmms-eval's doc_id).", "",
              "## Answer and scoring", "", "Both images carry numeric ids. The reply reasons in a thinking block, "
              "then ends with exactly one answer block holding a JSON object from every image-1 id to an image-2 id "
              "or \"none\" (the released ReasonMatch-Bench's language):", "",
              "````", "<thinking>", "...", "</thinking>", "<answer>", "```json",
              '{"1": "3", "2": "none", "3": "1"}', "```", "</answer>", "````", "",
              "Scored by widematch's `reward.py`: per task precision = correct links / links claimed, recall = "
              "correct links / true links, F1 (both 1 when nothing is claimed and nothing exists); a reply without "
              "exactly one well-formed answer block scores 0. Headline F1 / P / R are macro (per task, averaged over "
              "tasks).",
              "", "## Use", "",
              "```python", "import datasets",
              "ds = datasets.load_dataset(\"path/to/this/folder\")[\"%s\"]   # or the hub repo id" % split, "```", "",
              f"- lmms-eval 0.7.3: `python -m lmms_eval --model openai --model_args model=MODEL,base_url=URL "
              f"--include_path lmms_eval --tasks {TASK_NAME} --log_samples --output_path lmms_out` (the task folder "
              "reads this parquet; scores with reward.py).",
              f"- VLMEvalKit: `LMUData=<this folder> PRED_FORMAT=tsv python run.py --data {TSV_NAME} --model MODEL "
              f"--mode infer` ({TSV_NAME}.tsv; inference only).",
              "- Either output goes back into widematch's report: `python evaluate.py --answers FILE --name MODEL "
              "--tasks tasks/test.jsonl --out eval`.", "",
              "Licence: the images derive from the source datasets (ScanNet, CO3D / uCO3D, DL3DV, RealEstate10K, "
              "...), each under its own terms; check them before redistributing.", ""]
    return "\n".join(lines)


def read_json_beside(tasks_path, name):
    p = tasks_path.parent / name
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        fail(f"{p} is not JSON ({e})")

# -----------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", help="make_tasks.py jsonl (images relative to its directory)")
    ap.add_argument("--out", required=True, help="output dir: data/*.parquet, README.md, WideMatch.tsv, lmms_eval/")
    ap.add_argument("--name", default="ReasonMatch-style wide-baseline matching (widematch)",
                    help="the dataset's title in the card")
    ap.add_argument("--format", default="harness", choices=("harness", "reasonmatch", "reasonmatch-lmdb"),
                    help="harness: the HF dataset, TSV and lmms-eval task from --tasks (default); reasonmatch: the "
                    "released ReasonMatch-Bench layout (annotation_index.json, metadata, images), for its own "
                    "evaluator; reasonmatch-lmdb: the --pool's --split pairs as the LMDB the release's trainer reads "
                    "(<out>/) + its manifest <out>.json")
    ap.add_argument("--pool", help="--format reasonmatch-lmdb: build_pool.py's output")
    ap.add_argument("--split", default="train", help="--format reasonmatch-lmdb: the pool split to export")
    ap.add_argument("--reasonmatch", metavar="PATH", help="instead of --tasks: the released ReasonMatch-Bench (its "
                    "folder or annotation_index.json) as the HF dataset, VLMEvalKit TSV and lmms-eval task, scored "
                    "with the released rule")
    ap.add_argument("--prompt-template", metavar="FILE", help="--reasonmatch: the question, the released "
                    "evaluate/matchbench/utils.py or a text file (default: our own wording)")
    ap.add_argument("--no-think", action="store_true", help="--reasonmatch: the template's variant without thinking")
    return ap.parse_args(argv)


def export_released(args):
    """--reasonmatch PATH: the released benchmark for the harnesses (widematch/reasonmatch.py write_harness)."""
    from widematch import prompts, reasonmatch
    try:
        prompt = prompts.read_template(args.prompt_template, not args.no_think) if args.prompt_template else \
            prompts.default_prompt(not args.no_think)
        n = reasonmatch.write_harness(args.reasonmatch, Path(args.out), prompt,
                                      prompts.describe(args.prompt_template, not args.no_think), reward.__file__)
    except (reasonmatch.BenchError, prompts.TemplateError) as e:
        fail(str(e))
    (Path(args.out) / "export_args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    print(f"export_bench.py: ReasonMatch-Bench, {n} samples -> {args.out}/data/, {args.out}/README.md, "
          f"{args.out}/{reasonmatch.HARNESS_TSV}.tsv, {args.out}/lmms_eval/{reasonmatch.HARNESS_TASK}/")


def export_reasonmatch(args, tasks_path, out):
    """--format reasonmatch: the tasks (numeric ids on both images) in the released layout (widematch/reasonmatch)."""
    from widematch import reasonmatch
    tasks = [t for _, t in json_lines(tasks_path, str(tasks_path), prog="export_bench.py")]
    if not tasks:
        fail(f"--tasks {tasks_path} has no tasks")
    try:
        entries = reasonmatch.write_layout(tasks, tasks_path.parent, out, str(tasks_path))
    except reasonmatch.BenchError as e:
        fail(str(e))
    (out / "export_args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    print(f"export_bench.py: {len(entries)} tasks -> {out}/{reasonmatch.INDEX_NAME} (the released ReasonMatch-Bench "
          "layout; evaluate.py --reasonmatch and the release's run_evaluation.py read it)")


def export_lmdb(args):
    """--format reasonmatch-lmdb: the pool's verified matches of one split in the release's training format."""
    import make_tasks
    from widematch import release_lmdb
    if not args.pool or not os.path.isfile(os.path.join(args.pool, "pairs.jsonl")):
        fail(f"--format reasonmatch-lmdb needs --pool DIR with a pairs.jsonl (got {args.pool})")
    pairs = make_tasks.load_pairs(args.pool, args.split)
    if not pairs:
        fail(f"--pool {args.pool} has no {args.split}-split pairs")
    try:
        s = release_lmdb.write_lmdb(pairs, args.pool, args.out, lambda p: make_tasks.load_arrays(args.pool, p))
    except ValueError as e:
        fail(str(e))
    print(f"export_bench.py: {s['num_samples']} {args.split} pairs -> {s['lmdb']}/ (LMDB) + {s['manifest']}"
          + (f"; {s['resized']} pair(s) of two image sizes: image 2 resized to image 1's size, its matches scaled"
             if s["resized"] else "")
          + (f"; {s['skipped_no_match']} pair(s) without a verified match skipped" if s["skipped_no_match"] else ""))


def main(argv=None):
    args = parse_args(argv)
    if args.reasonmatch:
        return export_released(args)
    if args.format == "reasonmatch-lmdb":
        return export_lmdb(args)
    if not args.tasks:
        fail("--tasks is required (or --reasonmatch PATH, or --format reasonmatch-lmdb with --pool)")
    tasks_path, out = Path(args.tasks), Path(args.out)
    if not tasks_path.is_file():
        fail(f"--tasks {tasks_path} does not exist")
    if out.resolve() == tasks_path.parent.resolve():
        fail(f"--out {out} is the tasks file's directory: export into a directory of its own")
    if args.format == "reasonmatch":
        return export_reasonmatch(args, tasks_path, out)
    tasks = load_tasks(tasks_path)
    split = tasks[0]["split"]
    sha = hashlib.sha256(tasks_path.read_bytes()).hexdigest()
    parquet = f"{split}-00000-of-00001.parquet"
    (out / "data").mkdir(parents=True, exist_ok=True)
    for old in (out / "data").glob("*.parquet"):  # an earlier export's split must not load beside this one
        old.unlink()
    features = hf_features()
    rows = ParquetRows(out / "data" / parquet, features)
    csv.field_size_limit(sys.maxsize)
    with open(out / f"{TSV_NAME}.tsv", "w", newline="", encoding="utf-8") as f:
        tsv = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\n")  # as VLMEvalKit dumps TSVs
        tsv.writerow(TSV_COLUMNS)
        for i, task in enumerate(tqdm(tasks, desc="export_bench")):
            images = [(Path(p).name, image_bytes(tasks_path.parent, p, task["task_id"])) for p in task["images"]]
            rows.add(hf_row(task, images))
            tsv.writerow(tsv_row(i, task, images))
    rows.close()
    n_bytes = (out / "data" / parquet).stat().st_size
    args_info = read_json_beside(tasks_path, f"args_{split}.json")
    comp_info = read_json_beside(tasks_path, f"composition_{split}.json")
    (out / "README.md").write_text(card_header(features, split, len(tasks), parquet, n_bytes, args.name)
                                   + card_text(tasks, tasks_path, sha, split, parquet, args_info, comp_info, args.name))
    write_lmms_folder(out, tasks, split, parquet, sha, args.name)
    (out / "export_args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    print(f"export_bench.py: {len(tasks)} tasks -> {out}/data/{parquet} ({n_bytes / 2**20:.1f} MiB), {out}/README.md, "
          f"{out}/{TSV_NAME}.tsv, {out}/lmms_eval/{TASK_NAME}/")


if __name__ == "__main__":
    main()
