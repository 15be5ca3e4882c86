"""ReasonMatch-Bench as released (github aim-uofa/ReasonMatch, evaluate/matchbench/): read the published benchmark,
score it with the released rule, write its layout from our tasks. docs/reasonmatch.md has the details.

Used by evaluate.py --reasonmatch PATH (reading, asking, scoring, summary.json, the report) and export_bench.py
(--format reasonmatch: our tasks in the released layout; --reasonmatch PATH: the released benchmark in the harnesses).
The scoring is evaluate.py's score_released (reward.py's released_json, released_prf), passed in; this module
only reads, aggregates and writes.

Layout (PATH = the extracted reasonmatch_bench/ folder, or its annotation_index.json; the root is the index's
folder): annotation_index.json is a list of entries {dataset, dataset_key, stage, difficulty, sample_id (or id),
metadata, viewA, viewB}, metadata a path relative to the root; each metadata JSON holds image1, image2 (paths whose
part after "testset/" is relative to the root), answer ({image-1 id: image-2 id or "none"}) and meta {stage,
difficulty, overlap, overlap_rank}.
"""
import base64
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
from collections import OrderedDict
from pathlib import Path

from widematch import hf_export

SYSTEM_PROMPT = "You are a helpful assistant."     # the released evaluator's default system message
MAX_TOKENS = 8192                                   # its default completion budget
INDEX_NAME = "annotation_index.json"
OVERLAP_BUCKETS = (("low", 0.0, 0.33), ("medium", 0.33, 0.66), ("high", 0.66, 1.01))  # by overlap_rank
STAGE_OF_LEVEL = {"L1": "one_to_one", "L2": "one_to_multi", "L3": "multi_to_multi"}
SCENE_LABELS = ("indoor", "outdoor", "object")
SCENE_DEFAULTS = {"uco3d": "object", "scannet": "indoor"}  # the release's fallback for samples not in the map
GROUPS = (("dataset", "dataset"), ("stage", "stage"), ("scene", "scene"), ("overlap bucket", "bucket"),
          ("difficulty", "difficulty"))


class BenchError(ValueError):
    """Input that cannot be used; the message is one line naming the file and what is wrong."""

# -----------------------------------------------------------------------------
# reading the released layout


def locate(path):
    """PATH -> (root, index file)."""
    p = Path(path)
    if p.is_dir():
        if not (p / INDEX_NAME).is_file():
            raise BenchError(f"{p}: no {INDEX_NAME} in it (--reasonmatch wants the extracted reasonmatch_bench/ "
                             f"folder or its {INDEX_NAME})")
        return p, p / INDEX_NAME
    if p.is_file():
        return p.parent, p
    raise BenchError(f"{p}: no such file or folder (--reasonmatch wants the extracted reasonmatch_bench/ folder or "
                     f"its {INDEX_NAME})")


def sample_key(entry):
    """The sample's identity in our files (resume, --answers): its sample_id, else id, else its metadata path."""
    sid = entry.get("sample_id") or entry.get("id")
    return str(sid) if sid not in (None, "") else entry["metadata"]


def load_index(path):
    """-> (root, index path, entries). Every entry must be an object with a metadata path and a unique key."""
    root, index = locate(path)
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchError(f"{index}: not JSON ({e})") from None
    if not isinstance(entries, list):
        raise BenchError(f"{index}: not a JSON list of samples (a {type(entries).__name__})")
    seen = set()
    for k, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("metadata"), str):
            raise BenchError(f"{index}: entry {k} is not an object with a metadata path")
        if sample_key(e) in seen:
            raise BenchError(f"{index}: entry {k}: sample {sample_key(e)!r} is listed twice")
        seen.add(sample_key(e))
    return root, index, entries


def select(entries, datasets=None, stages=None, limit=0):
    """The released evaluator's selection, in its order: dataset_key filter, stage filter (the index's stage),
    then the first `limit`."""
    if datasets:
        entries = [e for e in entries if e.get("dataset_key") in datasets]
    if stages:
        entries = [e for e in entries if e.get("stage") in stages]
    return entries[:limit] if limit and limit > 0 else entries


def image_path(root, p):
    """The release's rule: the part of the stored path after "testset/" is relative to the root."""
    return Path(root) / str(p).split("testset/")[-1]


def load_sample(root, entry):
    """-> dict(key, entry, metadata, images, error): metadata is None when it cannot be read; error (a string) when
    the sample cannot be asked (metadata, answer or an image unusable): it is then scored 0 and counted."""
    s = dict(key=sample_key(entry), entry=entry, metadata=None, images=None, error=None)
    meta_path = Path(root) / entry["metadata"]
    try:
        md = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        s["error"] = f"metadata_error: {meta_path}: {' '.join(str(e).split())}"
        return s
    if not isinstance(md, dict) or not isinstance(md.get("image1"), str) or not isinstance(md.get("image2"), str):
        s["error"] = f"metadata_error: {meta_path}: not an object with image1 and image2 paths"
        return s
    s["metadata"] = md
    if not isinstance(md.get("answer"), dict):
        s["error"] = f"answer_error: {meta_path}: answer is not an object of image-1 id -> image-2 id or \"none\""
        return s
    s["images"] = [image_path(root, md["image1"]), image_path(root, md["image2"])]
    from PIL import Image, UnidentifiedImageError
    for p in s["images"]:
        try:
            with Image.open(p) as im:
                im.size
        except (OSError, UnidentifiedImageError) as e:
            s["error"] = f"image_error: {p}: {' '.join(str(e).split())}"
            return s
    return s

# -----------------------------------------------------------------------------
# one sample's row (the released samples.jsonl schema, plus our own numbers under "widematch")


def sample_meta(s):
    """The row's meta as the released evaluator writes it (a sample without readable metadata gets the short
    form, without difficulty and overlap: the release then counts it under difficulty "unknown")."""
    e = s["entry"]
    if s["metadata"] is None:
        return dict(dataset=e.get("dataset"), dataset_key=e.get("dataset_key"), stage=e.get("stage"),
                    sample_id=e.get("sample_id"), metadata_path=e.get("metadata"), viewA_path=e.get("viewA"),
                    viewB_path=e.get("viewB"))
    mi = s["metadata"].get("meta") or {}
    return dict(dataset=e.get("dataset"), dataset_key=e.get("dataset_key"), stage=mi.get("stage") or e.get("stage"),
                difficulty=mi.get("difficulty") or e.get("difficulty"),
                sample_id=e.get("sample_id") or e.get("id"), metadata_path=e.get("metadata"),
                viewA_path=e.get("viewA"), viewB_path=e.get("viewB"), overlap=mi.get("overlap"),
                overlap_rank=mi.get("overlap_rank"))


# -----------------------------------------------------------------------------
# the summary (the released summary.json schema) and our groups


def bucket(rank):
    """overlap_rank -> low / medium / high (None without a rank; above 1.01 counts as high, as released)."""
    if rank is None:
        return None
    for name, lo, hi in OVERLAP_BUCKETS:
        if lo <= rank < hi:
            return name
    return OVERLAP_BUCKETS[-1][0]


def _acc(d, key, row):
    e = d.setdefault(key, dict(count=0, prec_sum=0.0, rec_sum=0.0, f1_sum=0.0))
    e["count"] += 1
    e["prec_sum"] += row["precision"]
    e["rec_sum"] += row["recall"]
    e["f1_sum"] += row["f1"]
    return e


def _avg(e, rec="rec_sum"):
    c = max(e["count"], 1)
    e["avg_precision"], e["avg_recall"], e["avg_f1"] = e.pop("prec_sum") / c, e.pop(rec) / c, e.pop("f1_sum") / c
    return e


def summarize(rows, config=None, samples_file=None):
    """summary.json as the released run_evaluation.py writes it (means over samples; overlap buckets by
    overlap_rank; json_quality), in row order."""
    stage, dataset, buckets, difficulty = {}, {}, {}, {}
    q = dict(total=0, json_absent=0, json_parse_fail=0, request_errors=0)
    for r in rows:
        m = r.get("meta") or {}
        key, st, df = m.get("dataset_key") or "unknown", m.get("stage") or "unknown", m.get("difficulty") or "unknown"
        ov, rank, b = m.get("overlap"), m.get("overlap_rank"), bucket(m.get("overlap_rank"))
        _acc(stage, st, r)
        _acc(difficulty, df, r)
        d = dataset.setdefault(key, dict(dataset=m.get("dataset"), count=0, prec_sum=0.0, recall_sum=0.0, f1_sum=0.0,
                                         overlap_sum=0.0, overlap_rank_sum=0.0, overlap_min=None, overlap_max=None,
                                         overlap_rank_min=None, overlap_rank_max=None, stages={},
                                         overlap_buckets={}, difficulties={}))
        d["count"] += 1
        d["prec_sum"] += r["precision"]
        d["recall_sum"] += r["recall"]
        d["f1_sum"] += r["f1"]
        for v, name in ((ov, "overlap"), (rank, "overlap_rank")):
            if v is not None:
                d[f"{name}_sum"] += v
                d[f"{name}_min"] = v if d[f"{name}_min"] is None else min(d[f"{name}_min"], v)
                d[f"{name}_max"] = v if d[f"{name}_max"] is None else max(d[f"{name}_max"], v)
        _acc(d["stages"], st, r)
        _acc(d["difficulties"], df, r)
        if b:
            _acc(d["overlap_buckets"], b, r)
            _acc(buckets, b, r)
        q["total"] += 1
        q["request_errors"] += bool(r.get("error"))
        if r.get("prediction_json_raw") is None:
            q["json_absent"] += 1
        elif not isinstance(r.get("prediction_parsed"), dict):
            q["json_parse_fail"] += 1
    for d in dataset.values():
        c = max(d["count"], 1)
        _avg(d, rec="recall_sum")
        d["avg_overlap"] = d.pop("overlap_sum") / c if d["overlap_min"] is not None else None
        d["avg_overlap_rank"] = d.pop("overlap_rank_sum") / c if d["overlap_rank_min"] is not None else None
        d.pop("overlap_sum", None)
        d.pop("overlap_rank_sum", None)
        for sub in ("stages", "overlap_buckets", "difficulties"):
            for e in d[sub].values():
                _avg(e)
    for g in (stage, buckets, difficulty):
        for e in g.values():
            _avg(e)
    q["json_success"] = q["total"] - q["json_absent"] - q["json_parse_fail"]
    n = max(len(rows), 1)
    return dict(total_samples=len(rows), avg_precision=sum(r["precision"] for r in rows) / n,
                avg_recall=sum(r["recall"] for r in rows) / n, avg_f1=sum(r["f1"] for r in rows) / n,
                config=config or {}, samples_file=samples_file, stage_metrics=stage, dataset_metrics=dataset,
                overlap_buckets=buckets, difficulty_metrics=difficulty, json_quality=q)


def load_scene_map(path):
    """{sample_id: indoor / outdoor / object} from the release's scene_labels.json form ({id: {"scene": ...}}),
    {id: label}, or a list of {sample_id, scene}; a label outside the three stops naming the file and the id."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise BenchError(f"--scene-map {p}: cannot be read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchError(f"--scene-map {p}: not JSON ({e})") from None
    if isinstance(raw, dict):
        items = list(raw.items())
    elif isinstance(raw, list):
        items = [(e.get("sample_id"), e) for e in raw if isinstance(e, dict) and e.get("sample_id")]
    else:
        raise BenchError(f"--scene-map {p}: not a JSON object or list")
    out = {}
    for sid, v in items:
        label = v if isinstance(v, str) else (v.get("scene") or v.get("label")) if isinstance(v, dict) else None
        label = label.strip().lower() if isinstance(label, str) else None
        if label not in SCENE_LABELS:
            raise BenchError(f"--scene-map {p}: sample {sid!r} has no scene among {', '.join(SCENE_LABELS)}")
        out[str(sid)] = label
    return out


def group_of(row, what, scene_map):
    m = row.get("meta") or {}
    if what == "dataset":
        return m.get("dataset_key") or "unknown"
    if what == "stage":
        return m.get("stage") or "unknown"
    if what == "difficulty":
        return m.get("difficulty") or "unknown"
    if what == "bucket":
        return bucket(m.get("overlap_rank"))
    sid = m.get("sample_id")
    return (scene_map.get(str(sid)) if sid is not None else None) or \
        SCENE_DEFAULTS.get(str(m.get("dataset_key") or "").lower())


def _means(rows):
    n = len(rows)
    w = [r.get("widematch") or {} for r in rows]
    f = lambda xs: math.fsum(xs) / n if n else 0.0
    return dict(count=n, precision=f(r["precision"] for r in rows), recall=f(r["recall"] for r in rows),
                f1=f(r["f1"] for r in rows), our_match=f(x.get("our_match", 0.0) for x in w),
                our_f1=f(x.get("our_f1", 0.0) for x in w))


def breakdown(rows, scene_map=None):
    """{"overall": means, "<group name>": {value: means}}: the released P / R / F1 and our match / F1 of the same
    replies, overall and by dataset, stage, scene (the map, else uco3d -> object, scannet -> indoor; samples
    with neither are left out, as released), overlap bucket and difficulty."""
    scene_map = scene_map or {}
    out = dict(overall=_means(rows))
    for title, what in GROUPS:
        g = OrderedDict()
        for r in rows:
            v = group_of(r, what, scene_map)
            if v is not None:
                g.setdefault(v, []).append(r)
        order = [b for b, _, _ in OVERLAP_BUCKETS] if what == "bucket" else sorted(g)
        out[title] = {k: _means(g[k]) for k in order if k in g}
    return out

# -----------------------------------------------------------------------------
# the report section


def _pct(x):
    return f"{100 * x:.1f}"


def report_markdown(summaries):
    """summaries: {model name: summary dict with its "widematch" part} -> the ReasonMatch-Bench report."""
    lines = ["# ReasonMatch-Bench", "",
             "Scored with the released evaluator's rule (reward.released_prf): per sample, precision = correct / "
             "non-\"none\" predictions (at least 1), recall = correct / ground-truth keys (the \"none\" keys "
             "included), F1 of the two; means over samples. Beside them, on the same replies, widematch's own "
             "rules: match accuracy (a correct \"none\" counted) and F1 over the real links only.", ""]
    lines += ["| model | samples | P | R | F1 | JSON ok | errors | our match acc (∅ counted) | our F1 | prompt |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        w, q = s["widematch"], s["json_quality"]
        o = w["breakdown"]["overall"]
        lines.append(f"| {name} | {s['total_samples']} | {_pct(s['avg_precision'])} | {_pct(s['avg_recall'])} | "
                     f"{_pct(s['avg_f1'])} | {q['json_success']} | {q['request_errors']} | {_pct(o['our_match'])} | "
                     f"{_pct(o['our_f1'])} | {w.get('template', '-')} |")
    for title, _ in GROUPS:
        lines += ["", f"## By {title}", "",
                  f"| model | {title} | samples | P | R | F1 | our match acc (∅ counted) | our F1 |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, s in summaries.items():
            for k, o in s["widematch"]["breakdown"][title].items():
                lines.append(f"| {name} | {k} | {o['count']} | {_pct(o['precision'])} | {_pct(o['recall'])} | "
                             f"{_pct(o['f1'])} | {_pct(o['our_match'])} | {_pct(o['our_f1'])} |")
    lines += ["", "Only a run asked with the released prompt template (--prompt-template evaluate/matchbench/utils.py) "
              "is comparable with the paper's table.", ""]
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# the released evaluator's own samples.jsonl, and {sample_id, text} answers


def _harness_text(line):
    """lmms-eval's answer of one --log_samples line: filtered_resps ([[text]] or [text]), else resps."""
    text = line.get("filtered_resps", line.get("resps"))
    while isinstance(text, list) and len(text) == 1:
        text = text[0]
    return text


def read_answers(path, samples, entries):
    """{key: dict(text, error, latency)} of an --answers file for the benchmark, one of: the released evaluator's
    samples.jsonl (rows with meta and prediction; their error kept, their gt checked against ours); lines
    {"sample_id" (or "task_id"): ..., "text": ...}; lmms-eval's --log_samples file of export_bench.py
    --reasonmatch (doc_id = the entry's row in the index, checked against the sample_id its metric items carry);
    VLMEvalKit's prediction file of that export (.tsv / .xlsx / .json, rows by their sample_id column).
    entries: the whole index (answers to samples the filters left out are skipped). A sample the index lacks, one
    answered twice, or a gt that differs from the benchmark's answer stops with one line naming the file and line."""
    from widematch.answers import json_lines, vlmevalkit_records
    keys = [sample_key(e) for e in entries]
    known, by_meta = set(keys), {e["metadata"]: sample_key(e) for e in entries}
    chosen = {s["key"]: s for s in samples}
    out = {}

    def add(where, key, text, error=None, latency=None):
        if key not in known:
            raise BenchError(f"{where}: sample {key!r} is not in the benchmark's index")
        if key in out:
            raise BenchError(f"{where}: sample {key!r} answered twice")
        if key in chosen:
            out[key] = dict(text=text if isinstance(text, str) else "", error=error, latency=latency)

    p = Path(path)
    if p.suffix.lower() in (".tsv", ".xlsx") or (p.suffix.lower() == ".json" and p.read_text().lstrip()[:1] == "["):
        for k, r in enumerate(vlmevalkit_records(p), 2):
            if "prediction" not in r or not r.get("sample_id"):
                raise BenchError(f"--answers {p} row {k} has no prediction and sample_id (not a VLMEvalKit "
                                 "prediction file of export_bench.py --reasonmatch)")
            pred = r["prediction"]
            add(f"--answers {p} row {k}", str(r["sample_id"]),
                "" if pred is None or (isinstance(pred, float) and math.isnan(pred)) else str(pred))
        return out
    for where, a in json_lines(p, f"--answers {p}"):  # a line that is not JSON stops the run naming it
        if not isinstance(a, dict):
            raise BenchError(f"{where} is not a JSON object")
        if isinstance(a.get("meta"), dict) and "prediction" in a:
            m = a["meta"]
            key = str(m.get("sample_id")) if str(m.get("sample_id")) in known else \
                by_meta.get(m.get("metadata_path"), str(m.get("sample_id")))
            s = chosen.get(key)
            if s is not None and not a.get("error") and s["metadata"] is not None and \
                    a.get("gt") != s["metadata"].get("answer"):
                raise BenchError(f"{where}: sample {key!r}: its gt differs from the benchmark's answer (a run "
                                 "on another version of the benchmark?)")
            add(where, key, a.get("prediction") or "", a.get("error"), a.get("latency"))
        elif "doc_id" in a:
            doc = a["doc_id"]
            if not isinstance(doc, int) or isinstance(doc, bool) or not 0 <= doc < len(keys):
                raise BenchError(f"{where}: doc_id {doc!r} is not a row of the index (0..{len(keys) - 1})")
            item = a.get("f1")
            if isinstance(item, dict) and item.get("sample_id") not in (None, keys[doc]):
                raise BenchError(f"{where}: doc_id {doc} is sample {keys[doc]!r} in the index but "
                                 f"{item.get('sample_id')!r} in the samples: an export of another index")
            text = _harness_text(a)
            if not isinstance(text, str):
                raise BenchError(f"{where}: filtered_resps holds no single text answer")
            add(where, keys[doc], text)
        elif isinstance(a.get("text"), str) and (a.get("sample_id") or a.get("task_id")):
            add(where, str(a.get("sample_id") or a.get("task_id")), a["text"])
        else:
            raise BenchError(f"{where} is neither a released samples.jsonl row, an lmms-eval sample nor "
                             "{sample_id, text}")
    return out

# -----------------------------------------------------------------------------
# asking: the released protocol's request, and the resumable loop


def jpeg_data_url(path):
    """The image re-encoded as JPEG with PIL's defaults, as the released evaluator sends it (a mode JPEG cannot
    hold is converted to RGB first, where the release would fail the sample)."""
    from PIL import Image
    buf = io.BytesIO()
    with Image.open(path) as im:
        (im if im.mode in ("RGB", "L", "CMYK") else im.convert("RGB")).save(buf, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def api_request(task, tasks_dir, args, extra=None):
    """One sample's chat-completions body, the released protocol: the system message, then one user message
    with image 1, image 2 (JPEG data URLs) and the prompt text; the decoding fields as evaluate.py's."""
    content = [{"type": "image_url", "image_url": {"url": jpeg_data_url(p)}} for p in task["images"]]
    from widematch.api import request_body
    return request_body(args, [{"role": "system", "content": task["system"]},
                               {"role": "user", "content": content + [{"type": "text", "text": task["prompt"]}]}],
                        extra)


def as_task(s, prompt, system=SYSTEM_PROMPT):
    """A sample in the shape evaluate.py's answerers take (task_id, images, prompt, n, m) + its system message."""
    n = max(len(s["metadata"]["answer"]), 1)
    return dict(task_id=s["key"], images=[str(p) for p in s["images"]], prompt=prompt, system=system, n=n, m=n)


def predict(samples, make_answerer, path, prompt, desc, read_done, score_sample):
    """Rows of all samples in order: those already in `path` (samples.jsonl; read_done = evaluate.py's resumable
    reader) kept, the unusable ones scored as errors without a request, the rest asked through make_answerer()
    (a stream of (task, answer dict)), scored (score_sample) and appended one by one as they arrive: a killed run
    resumes, no sample is asked twice."""
    from tqdm import tqdm
    done = {(r.get("widematch") or {}).get("key"): r for r in read_done(path)}
    todo = [s for s in samples if s["key"] not in done]
    ask = [s for s in todo if not s["error"]]
    by_key = {s["key"]: s for s in ask}
    with open(path, "a", encoding="utf-8") as f, tqdm(total=len(samples), initial=len(samples) - len(todo),
                                                       desc=desc) as bar:
        def write(row):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            done[row["widematch"]["key"]] = row
            bar.update(1)
        for s in todo:
            if s["error"]:
                write(score_sample(s, ""))
        if ask:
            for task, answer in make_answerer()([as_task(s, prompt) for s in ask]):
                assert task["task_id"] not in done, f"{task['task_id']} answered twice"
                answer = dict(answer)
                write(score_sample(by_key[task["task_id"]], answer.pop("text"), **answer))
    return [done[s["key"]] for s in samples]


def bench_sha(index_path, datasets, stages, limit):
    """What a run was made on: the index file's bytes and the selection."""
    h = hashlib.sha256(Path(index_path).read_bytes())
    h.update(json.dumps([sorted(datasets or []), sorted(stages or []), limit or 0]).encode())
    return h.hexdigest()[:16]

# -----------------------------------------------------------------------------
# evaluate.py --reasonmatch


def evaluate_main(args, resolve_ckpt, model_answerer, api_answerer, score_sample):
    """The --reasonmatch route of evaluate.py: every CKPT (--engine hf / vllm), --api-base and --answers on the
    released benchmark; per model <out>/<name>/samples.jsonl + summary.json, then <out>/report.md from every
    summary made on the same selection of the same index. resolve_ckpt, model_answerer, api_answerer, score_sample:
    evaluate.py's (they load models and score with reward.py; passed in, so this helper imports no stage script)."""
    from widematch.runs import check_run_info, model_dtype, model_name, read_predictions, unique_names
    from widematch import prompts
    fail = lambda msg: sys.exit(f"evaluate.py: error: {msg}")
    try:
        root, index, entries = load_index(args.reasonmatch)
        scene_map = load_scene_map(args.scene_map) if args.scene_map else {}
        think = not args.no_think
        prompt = prompts.read_template(args.prompt_template, think) if args.prompt_template else \
            prompts.default_prompt(think)
    except (BenchError, prompts.TemplateError) as e:
        fail(str(e))
    template = prompts.describe(args.prompt_template, think)
    if not (args.ckpts or args.answers or args.api_base):
        fail("--reasonmatch: give at least one CKPT, --answers or --api-base (the baselines need our tasks)")
    if args.baseline:
        fail("--baseline needs our tasks' point coordinates: it does not run on --reasonmatch")
    if args.answers and not Path(args.answers).is_file():
        fail(f"--answers {args.answers} does not exist")
    if bool(args.api_base) != bool(args.api_model):
        fail("--api-base and --api-model go together")
    api_key = None
    if args.api_base:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            fail(f"--api-key-env {args.api_key_env}: environment variable {args.api_key_env} is not set (export it; "
                 "any value such as EMPTY for a server started without a key)")
    chosen = select(entries, args.dataset_filter, args.stage_filter, args.limit)
    if not chosen:
        fail(f"--reasonmatch {index}: no sample left after the filters")
    samples = [load_sample(root, e) for e in chosen]
    sha = bench_sha(index, args.dataset_filter, args.stage_filter, args.limit)
    index_sha = bench_sha(index, None, None, 0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")

    entries_ = [("model", c, model_name(c)) for c in (resolve_ckpt(c) for c in args.ckpts)]
    if args.answers:
        entries_.append(("answers", str(Path(args.answers).resolve()),
                         args.name or re.sub(r"[^A-Za-z0-9._-]", "_", Path(args.answers).parent.name
                                             if Path(args.answers).name == "samples.jsonl"
                                             else Path(args.answers).stem).strip("._") or "answers"))
    if args.api_base:
        entries_.append(("api", f"{args.api_model} @ {args.api_base}",
                         re.sub(r"[^A-Za-z0-9._-]", "_", args.name or args.api_model).strip("._") or "api"))
    names = unique_names([e[2] for e in entries_])
    summaries = {}
    for name, (kind, what, _) in zip(names, entries_):
        model_dir = out / name
        # the index, not the selection: a --limit run, then a full one into the same --out, resumes (as --tasks)
        info = dict(kind=kind, what=what, index_sha=index_sha, template=template, seed=args.seed)
        config = dict(model_name=name, runner=kind, model_id=what, temperature=args.temperature,
                      max_tokens=args.max_new_tokens, system_prompt=SYSTEM_PROMPT,
                      dataset_filter=args.dataset_filter, stage_filter=args.stage_filter,
                      annotation_index=str(index), testset_root=str(root), think=think, template=template)
        path = model_dir / "samples.jsonl"
        if kind == "answers":  # re-scored from scratch every run
            check_run_info(model_dir, dict(kind=kind, what=what, index_sha=index_sha), keys=("kind",))
            try:
                answers = read_answers(args.answers, samples, entries)
            except BenchError as e:
                fail(str(e))
            config.update(runner="answers", template="as in the answers file", think=None)
            rows = [score_sample(s, **answers[s["key"]]) if s["key"] in answers else
                    score_sample(s, "", missing=True) for s in samples]
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            template_used = "as in the answers file"
        else:
            info.update(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
            if kind == "model":
                info.update(dtype=model_dtype(args), engine=args.engine)
                make = lambda what=what: model_answerer(what, Path("."), [as_task(s, prompt) for s in samples
                                                                         if not s["error"]], args)
            else:
                info.update(max_tokens_param=args.api_max_tokens_param)
                make = lambda: api_answerer(Path("."), args, api_key, request=api_request)
            check_run_info(model_dir, info)
            rows = predict(samples, make, path, prompt, name, read_predictions, score_sample)
            template_used = template
        summary = summarize(rows, config, str(path))
        summary["widematch"] = dict(bench_sha=sha, template=template_used,
                                    breakdown=breakdown(rows, scene_map))
        (model_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        summaries[name] = summary
    for p in sorted(out.glob("*/summary.json")):  # earlier runs into the same --out on the same selection
        if p.parent.name not in summaries:
            s = json.loads(p.read_text())
            if (s.get("widematch") or {}).get("bench_sha") == sha:
                rows = [json.loads(x) for x in (p.parent / "samples.jsonl").read_text(encoding="utf-8").splitlines()
                        if x.strip()] if (p.parent / "samples.jsonl").is_file() else []
                s["widematch"]["breakdown"] = breakdown(rows, scene_map)
                summaries[p.parent.name] = s
    (out / "report.md").write_text(report_markdown(summaries), encoding="utf-8")
    line = ", ".join(f"{n} F1 {_pct(s['avg_f1'])} (ours {_pct(s['widematch']['breakdown']['overall']['our_f1'])})"
                     for n, s in summaries.items())
    print(f"evaluate.py: ReasonMatch-Bench, {len(samples)} samples -> {out}/report.md ({line}; prompt: {template})")

# -----------------------------------------------------------------------------
# our tasks -> the released layout (export_bench.py --format reasonmatch)


def percentile_ranks(values):
    """Each value's rank among all, in [0, 1]: 0 the smallest, 1 the largest, ties share their mean rank; a
    single value gets 0.5."""
    n = len(values)
    if n == 1:
        return [0.5]
    order = sorted(range(n), key=lambda i: values[i])
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 / (n - 1)
        i = j + 1
    return ranks


def check_numeric(t, where):
    """Our task language with numeric ids on both images; older letter tasks cannot be exported."""
    missing = [k for k in ("task_id", "source", "level", "delta_v", "n", "m", "images", "target", "y_labels")
               if k not in t]
    if missing:
        raise BenchError(f"{where} lacks {', '.join(missing)}: not a make_tasks.py task")
    m = t.get("m")
    if not isinstance(m, int) or t.get("y_labels") != [str(j + 1) for j in range(m)]:
        raise BenchError(f"{where}: the tasks predate numeric ids on image 2 (y_labels are not \"1\"..\"{m}\"): "
                         "remake them with make_tasks.py")
    n = t.get("n")
    if not isinstance(n, int) or not isinstance(t.get("target"), list) or len(t["target"]) != n or \
            any(v is not None and str(v) not in t["y_labels"] for v in t["target"]):
        raise BenchError(f"{where}: target must hold n entries, each an image-2 id or null")
    if not isinstance(t.get("images"), list) or len(t["images"]) != 2:
        raise BenchError(f"{where}: images must list the two prompted image files")


def write_layout(tasks, tasks_dir, out, tasks_name="tasks"):
    """Our (numeric-id) tasks -> the released layout in `out`: annotation_index.json, and per sample
    <source>/<task_id>/{metadata.json, image1.*, image2.*} (the prompted images copied as drawn). Metadata
    image paths start with "testset/" so the release's rule finds them. stage from level, difficulty = our
    point layout (sparse / moderate / dense), overlap = ω = 1 - Δv, overlap_rank its percentile rank among the
    tasks of its source. -> the index entries."""
    from tqdm import tqdm
    out = Path(out)
    for k, t in enumerate(tasks):
        check_numeric(t, f"{tasks_name} task {k + 1} ({t.get('task_id')!r})")
    by_source = OrderedDict()
    for k, t in enumerate(tasks):
        by_source.setdefault(t["source"], []).append(k)
    rank = {}
    for ks in by_source.values():
        for k, r in zip(ks, percentile_ranks([1.0 - float(tasks[k]["delta_v"]) for k in ks])):
            rank[k] = r
    entries = []
    for k, t in enumerate(tqdm(tasks, desc="reasonmatch layout")):
        sid = re.sub(r"[^A-Za-z0-9._-]", "_", str(t["task_id"]))
        rel = Path(str(t["source"])) / sid
        (out / rel).mkdir(parents=True, exist_ok=True)
        views = []
        for i, p in enumerate(t["images"]):
            src = Path(tasks_dir) / p
            if not src.is_file():
                raise BenchError(f"{tasks_name} task {t['task_id']!r}: image {src} does not exist")
            dst = rel / f"image{i + 1}{src.suffix.lower()}"
            shutil.copyfile(src, out / dst)
            views.append(dst.as_posix())
        stage = STAGE_OF_LEVEL.get(t["level"], t["level"])
        meta = dict(stage=stage, difficulty=t.get("spatial"), overlap=1.0 - float(t["delta_v"]),
                    overlap_rank=rank[k], level=t["level"], pair_id=t.get("pair_id"), scene=t.get("scene"),
                    scene_type=t.get("scene_type"), task_id=t["task_id"])
        md = dict(image1=f"testset/{views[0]}", image2=f"testset/{views[1]}",
                  answer={str(i + 1): "none" if v is None else str(v) for i, v in enumerate(t["target"])}, meta=meta)
        (out / rel / "metadata.json").write_text(json.dumps(md, indent=2) + "\n")
        entries.append(dict(dataset=t["source"], dataset_key=t["source"], stage=stage, difficulty=t.get("spatial"),
                            sample_id=sid, metadata=(rel / "metadata.json").as_posix(), viewA=views[0],
                            viewB=views[1]))
    (out / INDEX_NAME).write_text(json.dumps(entries, indent=2) + "\n")
    return entries

# -----------------------------------------------------------------------------
# the released benchmark in the harnesses (export_bench.py --reasonmatch PATH)

HARNESS_TSV = "ReasonMatchBench"      # VLMEvalKit's --data name
HARNESS_TASK = "reasonmatch_bench"    # lmms-eval's --tasks name
HARNESS_TSV_COLUMNS = ("index", "image", "question", "answer", "sample_id", "dataset_key", "stage", "difficulty",
                       "overlap", "overlap_rank")

HARNESS_YAML_HEAD = """\
# lmms-eval 0.7.3 task: ReasonMatch-Bench as released (written by widematch's export_bench.py --reasonmatch; index
# sha256 {sha}). The released protocol has a system message: pass it with --system_instruction.
#   python -m lmms_eval --model openai --model_args model=MODEL,base_url=http://HOST:PORT/v1 \\
#       --system_instruction "{system}" --include_path <export dir>/lmms_eval --tasks {task} \\
#       --batch_size 1 --log_samples --output_path lmms_out"""

HARNESS_UTILS = hf_export.lmms_utils_head(
    """lmms-eval task functions of reasonmatch_bench.yaml (written by widematch's export_bench.py --reasonmatch).

Each reply is scored by the released ReasonMatch-Bench rule as widematch implements it (reward.released_json and
reward.released_prf in reward.py beside this file, a verbatim copy): per sample precision = correct / non-"none"
predictions (at least 1), recall = correct / ground-truth keys ("none" keys included), F1; means over samples.
Every metric item carries the sample_id, so a --log_samples line maps back to its sample.
""", ("json", "math"), "rm",
    "Image 1 and image 2 (PIL, decoded from the exported bytes; their labels are drawn already).",
    "The prompt the export was made with.") + '''\
def rm_process_results(doc, results):
    """The released scores of the reply; a missing or non-text reply scores as one without JSON."""
    text = results[0] if results and isinstance(results[0], str) else ""
    raw, parsed = reward.released_json(text)
    p, r, f = reward.released_prf(json.loads(doc["answer"]), parsed)
    sid = doc["sample_id"]
    return {"f1": {"sample_id": sid, "value": f}, "precision": {"sample_id": sid, "value": p},
            "recall": {"sample_id": sid, "value": r},
            "json_success": {"sample_id": sid, "value": float(isinstance(parsed, dict))}}


def rm_mean(items):
    """Mean over samples."""
    return math.fsum(i["value"] for i in items) / len(items)
'''


def harness_samples(path):
    """The whole released benchmark, every sample usable (an export of a broken sample stops naming it)."""
    root, index, entries = load_index(path)
    samples = [load_sample(root, e) for e in entries]
    bad = next((s for s in samples if s["error"]), None)
    if bad is not None:
        raise BenchError(f"{index}: sample {bad['key']!r}: {bad['error']}")
    if not samples:
        raise BenchError(f"{index}: no samples")
    return root, index, samples


def write_harness(path, out, prompt, template, reward_file, title="ReasonMatch-Bench (as released)"):
    """The released benchmark as export_bench.py writes our tasks: data/test-00000-of-00001.parquet (HF dataset,
    one row per index entry in index order = lmms-eval's doc_id), README.md, ReasonMatchBench.tsv (VLMEvalKit) and
    lmms_eval/reasonmatch_bench/ (scored with the released rule: a copy of reward_file, reward.py, beside its
    utils.py). -> the number of samples."""
    import csv
    from datasets import Features, Image, List, Value
    from tqdm import tqdm
    root, index, samples = harness_samples(path)
    out = Path(out)
    s_, f64 = Value("string"), Value("float64")
    features = Features({"sample_id": s_, "images": List(Image()), "system": s_, "prompt": s_, "answer": s_,
                         "dataset": s_, "dataset_key": s_, "stage": s_, "difficulty": s_, "overlap": f64,
                         "overlap_rank": f64})
    (out / "data").mkdir(parents=True, exist_ok=True)
    for old in (out / "data").glob("*.parquet"):
        old.unlink()
    parquet = out / "data" / "test-00000-of-00001.parquet"
    rows = hf_export.ParquetRows(parquet, features)
    csv.field_size_limit(sys.maxsize)
    with open(out / f"{HARNESS_TSV}.tsv", "w", newline="", encoding="utf-8") as f:
        tsv = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\n")
        tsv.writerow(HARNESS_TSV_COLUMNS)
        for k, s in enumerate(tqdm(samples, desc="export_bench")):
            meta = sample_meta(s)
            images = [(p.name, p.read_bytes()) for p in s["images"]]
            answer = json.dumps(s["metadata"]["answer"], ensure_ascii=False)
            num = lambda v: float(v) if isinstance(v, (int, float)) else None
            rows.add(dict(sample_id=s["key"], images=[{"bytes": b, "path": n} for n, b in images],
                          system=SYSTEM_PROMPT, prompt=prompt, answer=answer, dataset=meta.get("dataset"),
                          dataset_key=meta.get("dataset_key"), stage=meta.get("stage"),
                          difficulty=meta.get("difficulty"), overlap=num(meta.get("overlap")),
                          overlap_rank=num(meta.get("overlap_rank"))))
            tsv.writerow([k, repr([base64.b64encode(b).decode("ascii") for _, b in images]), prompt, answer, s["key"],
                          meta.get("dataset_key"), meta.get("stage"), meta.get("difficulty"), meta.get("overlap"),
                          meta.get("overlap_rank")])
    rows.close()
    sha = hashlib.sha256(Path(index).read_bytes()).hexdigest()
    d = out / "lmms_eval" / HARNESS_TASK
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    (d / f"{HARNESS_TASK}.yaml").write_text(hf_export.lmms_task_yaml(
        head=HARNESS_YAML_HEAD.format(sha=sha, system=SYSTEM_PROMPT, task=HARNESS_TASK), task=HARNESS_TASK,
        split="test", parquet=parquet.name, prefix="rm",
        raw_note="# The released scorer reads the raw reply (its JSON), so nothing is stripped first.",
        max_new_tokens=MAX_TOKENS,
        decoding_note=f"# The released evaluator's decoding: temperature 0, {MAX_TOKENS} new tokens.",
        metrics_note="# Fractions: means over samples of the released per-sample precision / recall / F1; "
                     "json_success the share of\n# replies whose JSON is an object.",
        metrics=[(m, "rm_mean") for m in ("f1", "precision", "recall", "json_success")],
        metadata=[("index_sha256", sha), ("n_samples", len(samples))]))
    (d / "utils.py").write_text(HARNESS_UTILS)
    shutil.copyfile(reward_file, d / "reward.py")
    counts = OrderedDict()
    for s in samples:
        key = (sample_meta(s).get("dataset_key"), sample_meta(s).get("stage"))
        counts[key] = counts.get(key, 0) + 1
    card = [f"# {title}", "",
            f"The released ReasonMatch-Bench (`{Path(index).name}`, sha256 `{sha}`), {len(samples)} samples, in the "
            "layout widematch's export_bench.py writes for harnesses. Images: the benchmark's files, bytes unchanged "
            "(their labels are drawn already). Prompt: " + template + "; system message \"" + SYSTEM_PROMPT + "\".",
            "", "| dataset | stage | samples |", "|---|---|---|"]
    card += [f"| {ds} | {st} | {c} |" for (ds, st), c in counts.items()]
    card += ["", "Scored with the released rule: per sample precision = correct / non-\"none\" predictions (at "
             "least 1), recall = correct / ground-truth keys (\"none\" keys included), F1; means over samples.", "",
             f"- lmms-eval 0.7.3: `python -m lmms_eval --model openai --model_args model=MODEL,base_url=URL "
             f"--system_instruction \"{SYSTEM_PROMPT}\" --include_path lmms_eval --tasks {HARNESS_TASK} "
             "--log_samples --output_path lmms_out`",
             f"- VLMEvalKit: `LMUData=<this folder> PRED_FORMAT=tsv python run.py --data {HARNESS_TSV} --model MODEL "
             "--mode infer` (inference only)",
             "- Either output back into widematch's report: `python evaluate.py --reasonmatch BENCH --answers FILE "
             "--name MODEL --out eval_rm`.", ""]
    header = hf_export.card_header(features, "test", len(samples), parquet.name, parquet.stat().st_size, title)
    (out / "README.md").write_text(header + "\n".join(card))
    return len(samples)
