"""Answers made by other tools, read back as {task_id: text} for evaluate.py --answers (docs/evaluate.md,
"Answers made by any other tool"): our own {task_id, text} lines, lmms-eval's --log_samples file and VLMEvalKit's
prediction file (.tsv / .xlsx / .json) of export_bench.py's exports, mapped back to the tasks file's rows (the
export keeps its order). A bad file stops the run with one line naming the file, the line or row and what is wrong.
"""

import json
import math
import re
import sys
from pathlib import Path


def json_lines(path, name, prog="evaluate.py"):
    """(where, object) of each non-blank line of a JSON-lines file, where = "<name> line <k>"; a line that is not
    JSON stops the run naming it, as prog's error (export_bench.py reads its tasks file through this too)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{name} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"{prog}: error: {where} is not JSON ({e})")
            yield where, obj


def one_line(e, limit=300):
    return " ".join(str(e).split())[:limit]


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


def read_any_answers(path, all_tasks, reference_answer):
    """{task_id: text} of an --answers file in any of the formats the usage card lists, told apart by the name
    and the first record: VLMEvalKit's prediction file (.tsv, .xlsx, .json), lmms-eval's samples log (.jsonl
    lines with a doc_id), or our own {task_id, text} lines. reference_answer: a task's target -> the answer the
    exports wrote for it (reward.reference_answer, given by evaluate.py), to check lmms-eval lines against."""
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
        return read_lmms_samples(path, all_tasks, reference_answer)
    return read_answers(path, {t["task_id"] for t in all_tasks})


def read_lmms_samples(path, all_tasks, reference_answer):
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
        if claimed is None and target is not None and target != reference_answer(task["target"]):
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
