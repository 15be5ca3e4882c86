"""
human.py: the human baseline, reproducible. Writes one static page on which people answer the benchmark's tasks
in a browser; evaluate.py scores the answers they download next to the models, with the same reward code.

Usage:
    python human.py --tasks tasks/test.jsonl --out human             # the widest-Δv subset (evaluate.py's rule)
    python human.py --tasks tasks/test.jsonl --out human_all --all   # every task of the file
    python human.py --tasks tasks/train.jsonl --out look --all --show-truth   # inspect a pool or a prompt by hand
Then open human/index.html (double-click it: file://, no server, no network), answer, press "Download answers"
and score the file it saves:
    python evaluate.py --answers answers.jsonl --name human --tasks human/tasks.jsonl --out eval

Input: --tasks, a make_tasks.py jsonl. Outputs (in --out): index.html (one self-contained page, images embedded,
nothing fetched), tasks.jsonl (the tasks on the page, in page order), args.json.

Details: docs/human.md, "human.py in full" (more commands, the page's clicks and keys, where progress is kept,
answers.jsonl, --show-truth, the order, the departures from the paper).
"""

import argparse
import hashlib
import json
import os
import random
import sys
from pathlib import Path

from PIL import Image

import evaluate
import make_tasks
from widematch import api

PAGE_FIELDS = ("scale1", "scale2", "size1", "size2")  # drawing geometry make_tasks.py records per task

# -----------------------------------------------------------------------------
# which tasks, in which order


def select_tasks(tasks, widest, every, sources=None):
    """Every task (every=True) or every task of the widest pairs by evaluate.py's rule (--widest K pairs from
    --widest-sources; None: evaluate's default sources)."""
    if every:
        return list(tasks)
    chosen = set(evaluate.widest_pairs(tasks, k=widest, sources=sources))
    return [t for t in tasks if t["pair_id"] in chosen]


def page_order(tasks, seed):
    """A seeded shuffle, so one pair's tasks and one source's tasks do not come in a row."""
    tasks = sorted(tasks, key=lambda t: t["task_id"])  # independent of the input file's order
    random.Random(seed).shuffle(tasks)
    return tasks

# -----------------------------------------------------------------------------
# what the page needs per task


def marker_geometry(points, scale, size, labels):
    """Drawn marker positions and label boxes of one prompted image, recomputed with make_tasks.py's own drawing
    code on a blank canvas (placement depends only on points, labels and size), so a click on a label box
    counts like a click on its marker."""
    max_side = max(size)  # make_tasks.resize scales the longer side to exactly max_side
    drawn = make_tasks.to_drawn(points, scale)
    placed = make_tasks.draw_markers(Image.new("RGB", tuple(size)), drawn, labels, max_side)
    return ([[round(x, 2), round(y, 2)] for x, y in drawn],
            [[round(v, 2) for v in p["box"]] for p in placed],
            make_tasks.marker_sizes(max_side)[1])


def page_task(task, image_ids, show_truth):
    """The page's view of one task. Targets and pair metadata only with show_truth."""
    x_pts, x_boxes, r1 = marker_geometry(task["x_points"], task["scale1"], task["size1"], task["x_labels"])
    y_pts, y_boxes, r2 = marker_geometry(task["y_points"], task["scale2"], task["size2"], task["y_labels"])
    d = dict(task_id=task["task_id"], n=task["n"], m=task["m"], prompt=task["prompt"], images=image_ids,
             sizes=[task["size1"], task["size2"]], x_labels=task["x_labels"], y_labels=task["y_labels"],
             x_points=x_pts, y_points=y_pts, x_boxes=x_boxes, y_boxes=y_boxes, radius=[r1, r2])
    if show_truth:
        d.update(target=task["target"], info=f"{task['source']} · {task['level']} {task['spatial']} · "
                                             f"bin {task['bin']} · Δv {task['delta_v']:.3f}")
    return d


def check_task(task, tasks_path):
    missing = [k for k in ("images", "x_points", "y_points", "target") + PAGE_FIELDS if not task.get(k)]
    if missing:
        sys.exit(f"human.py: error: {tasks_path} task {task['task_id']} has no {', '.join(missing)} "
                 f"(make it again with make_tasks.py)")
    for p in task["images"]:
        if not (tasks_path.parent / p).is_file():
            sys.exit(f"human.py: error: {tasks_path} task {task['task_id']}: image {tasks_path.parent / p} not found")

# -----------------------------------------------------------------------------
# outputs


def write_tasks(path, tasks, tasks_dir, out):
    """tasks.jsonl in page order, image paths rewritten relative to out; returns its bytes' sha256 prefix."""
    lines = [json.dumps(dict(t, images=[os.path.relpath(tasks_dir / p, out) for p in t["images"]])) for t in tasks]
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()[:16]


def write_page(path, tasks, tasks_dir, storage_key, show_truth, title):
    images, ids = [], {}
    for t in tasks:
        for p in t["images"]:
            if p not in ids:  # a prompted image shared by tasks is embedded once
                ids[p] = len(images)
                images.append(api.data_url(tasks_dir / p, "human.py"))
    data = dict(storage_key=storage_key, show_truth=show_truth, title=title, images=images,
                tasks=[page_task(t, [ids[p] for p in t["images"]], show_truth) for t in tasks])
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")  # nothing in it can close the script tag
    html = PAGE.replace("__TITLE__", title.replace("&", "&amp;").replace("<", "&lt;")).replace("__DATA__", blob)
    path.write_text(html, encoding="utf-8")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="tasks/test.jsonl", help="make_tasks.py jsonl")
    ap.add_argument("--out", default="human", help="output dir (index.html, tasks.jsonl)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--widest", type=int, default=90, help="the K widest-Δv pairs, as evaluate.py --widest")
    which.add_argument("--all", action="store_true", help="every task of the file")
    ap.add_argument("--widest-sources", default=None, help="comma-separated sources of the widest pairs, as "
                    "evaluate.py (default: dl3dv, re10k, uco3d where present, else every source)")
    ap.add_argument("--show-truth", action="store_true", help="reveal the ground truth after each answer")
    ap.add_argument("--seed", type=int, default=0, help="page order shuffle")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    tasks_path, out = Path(args.tasks), Path(args.out)
    if not tasks_path.is_file():
        sys.exit(f"human.py: error: --tasks {tasks_path} does not exist")
    if not args.all and args.widest < 1:
        sys.exit("human.py: error: --widest must be at least 1 (or use --all)")
    sources = args.widest_sources.split(",") if args.widest_sources else None
    tasks = page_order(select_tasks(evaluate.load_tasks(tasks_path), args.widest, args.all, sources), args.seed)
    if not tasks:
        sys.exit(f"human.py: error: --tasks {tasks_path} has no tasks")
    for t in tasks:
        check_task(t, tasks_path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    sha = write_tasks(out / "tasks.jsonl", tasks, tasks_path.parent, out)
    key = f"widematch-human/{sha}" + ("/truth" if args.show_truth else "")
    title = f"widematch human baseline: {len(tasks)} tasks of {tasks_path.name}" + \
        (" (ground truth shown)" if args.show_truth else "")
    write_page(out / "index.html", tasks, tasks_path.parent, key, args.show_truth, title)
    mb = (out / "index.html").stat().st_size / 2 ** 20
    print(f"human.py: {len(tasks)} tasks ({len({t['pair_id'] for t in tasks})} pairs) -> {out}/index.html "
          f"({mb:.1f} MB), {out}/tasks.jsonl; progress key {key}")

# -----------------------------------------------------------------------------
# the page: plain HTML, CSS and JavaScript, no library; __DATA__ is the JSON above


PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.4 system-ui, sans-serif; color: #1d1d1f; background: #f3f3f5; }
  header { display: flex; flex-wrap: wrap; align-items: center; gap: 8px 14px; padding: 8px 14px;
           background: #fff; border-bottom: 1px solid #ddd; }
  header h1 { font-size: 15px; margin: 0 8px 0 0; }
  #progress { font-variant-numeric: tabular-nums; }
  #info { color: #8a4b00; }
  button { font: inherit; padding: 4px 10px; border: 1px solid #bbb; border-radius: 5px; background: #fafafa;
           cursor: pointer; }
  button:hover { background: #eee; }
  button.primary { background: #1f6feb; border-color: #1f6feb; color: #fff; }
  main { display: flex; gap: 12px; padding: 12px; align-items: flex-start; }
  .images { display: flex; gap: 12px; flex: 1 1 auto; min-width: 0; }
  figure { margin: 0; flex: 1 1 0; min-width: 0; }
  figcaption { font-weight: 600; margin-bottom: 4px; }
  .imgbox { position: relative; display: inline-block; max-width: 100%; line-height: 0; }
  .imgbox img { display: block; max-width: 100%; max-height: calc(100vh - 120px); user-select: none; }
  .imgbox svg { position: absolute; left: 0; top: 0; width: 100%; height: 100%; pointer-events: none; }
  #img1, #img2 { cursor: crosshair; }
  aside { flex: 0 0 250px; background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 10px; }
  aside h2 { font-size: 14px; margin: 0 0 6px; }
  .row { display: flex; align-items: center; gap: 8px; padding: 3px 6px; border-radius: 5px; cursor: pointer;
         border: 2px solid transparent; }
  .row.active { border-color: #d0169e; background: #fdf0fa; }
  .row .num { display: inline-block; min-width: 26px; text-align: center; border-radius: 3px;
              background: #000; color: #fff; font-weight: 700; }  /* as the id boxes on the images */
  .row .ans { font-weight: 700; min-width: 48px; }
  .row .ans.unset { color: #999; font-weight: 400; }
  .row .truth.ok { color: #11813a; } .row .truth.bad { color: #c21818; }
  .tools { display: flex; gap: 6px; margin: 8px 0; }
  .help { color: #555; font-size: 12px; margin-top: 8px; }
  kbd { border: 1px solid #bbb; border-bottom-width: 2px; border-radius: 3px; padding: 0 3px; font-size: 11px;
        background: #fafafa; }
  details { margin-top: 8px; font-size: 12px; }
  pre { white-space: pre-wrap; font-size: 11px; background: #f6f6f6; padding: 6px; }
  #banner { display: none; padding: 6px 14px; background: #ffe1e1; color: #800; }
</style>
</head>
<body>
<header>
  <h1>Which point is which?</h1>
  <span id="progress"></span>
  <span id="info"></span>
  <button id="prev" title="previous task (Left arrow)">&#9664; Prev</button>
  <button id="next" title="next task (Right arrow)">Next &#9654;</button>
  <button id="next-open" title="next task with an unanswered point (Enter)">Next unanswered</button>
  <button id="download" class="primary">Download answers</button>
  <button id="reset" title="forget every answer on this page">Reset</button>
</header>
<div id="banner"></div>
<main>
  <div class="images">
    <figure><figcaption>Image 1: numbered points</figcaption>
      <div class="imgbox"><img id="img1" alt="image 1" draggable="false"><svg id="ov1"></svg></div></figure>
    <figure><figcaption>Image 2: click the matching numbered point</figcaption>
      <div class="imgbox"><img id="img2" alt="image 2" draggable="false"><svg id="ov2"></svg></div></figure>
  </div>
  <aside>
    <h2>Answers: image-1 id &rarr; image-2 id</h2>
    <div id="rows"></div>
    <div class="tools"><button id="none">No match (0)</button><button id="clear">Clear (&#9003;)</button></div>
    <div class="help">For each numbered point of image 1, click the point of image 2 that shows the <b>same 3D
      point</b>, or "No match" if it has none there. Keys: the digits of an image-2 id (<kbd>Enter</kbd> ends one
      that a longer id starts with, e.g. 1 of 12), <kbd>0</kbd> or <kbd>-</kbd> no match,
      <kbd>&#9003;</kbd> clear, <kbd>&uarr;</kbd><kbd>&darr;</kbd> point, <kbd>&larr;</kbd><kbd>&rarr;</kbd> task,
      <kbd>Enter</kbd> next unanswered. Progress is saved in this browser.</div>
    <details><summary>The prompt, as the model reads it</summary><pre id="prompt"></pre></details>
  </aside>
</main>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const TASKS = DATA.tasks;
const KEY = DATA.storage_key;
const SVG = "http://www.w3.org/2000/svg";  // the SVG namespace name, not a resource: nothing is fetched
const $ = (id) => document.getElementById(id);

// ---- progress in localStorage: {cur, answers: {task_id: {"1": "3" | null}}, seconds: {task_id: s}}
function loadState() {
  const fresh = {cur: 0, answers: {}, seconds: {}};
  const raw = localStorage.getItem(KEY);
  if (raw === null) return fresh;
  try {
    const s = JSON.parse(raw);
    return {cur: Math.min(Math.max(s.cur | 0, 0), TASKS.length - 1), answers: s.answers || {}, seconds: s.seconds || {}};
  } catch (e) {  // keep the unreadable entry aside instead of silently overwriting it
    localStorage.setItem(KEY + "/unreadable-" + Date.now(), raw);
    $("banner").style.display = "block";
    $("banner").textContent = "Saved progress could not be read (" + e.message + "); it was kept under another key.";
    return fresh;
  }
}
let state = loadState();
const save = () => localStorage.setItem(KEY, JSON.stringify(state));
let active = 0;     // 0-based index of the numbered point being answered
let since = null;   // when the current task's on-screen time last started counting (ms)

// seconds per task: on-screen time while the tab is visible
function flushTime() {
  const now = Date.now();
  if (since !== null) {
    const id = TASKS[state.cur].task_id;
    state.seconds[id] = (state.seconds[id] || 0) + (now - since) / 1000;
  }
  since = document.visibilityState === "visible" ? now : null;
}

const task = () => TASKS[state.cur];
const answers = () => state.answers[task().task_id] || (state.answers[task().task_id] = {});
const nAnswered = (t) => Object.keys(state.answers[t.task_id] || {}).length;

function answerText(a) {  // reward.format_answer: an empty thinking block, the JSON object in point order
  const items = Object.keys(a).map(Number).sort((x, y) => x - y)
    .map((i) => JSON.stringify(String(i)) + ": " + JSON.stringify(a[i] === null ? "none" : a[i]));
  return "<thinking>\n\n</thinking>\n<answer>\n```json\n{" + items.join(", ") + "}\n```\n</answer>";
}

// ---- drawing: rings over the prompted images (SVG in drawn-pixel units; pixel centres at integers)
function ring(svg, p, r, color, width, dash) {  // a coloured ring on a white halo, visible on any texture
  for (const [stroke, w] of [["#fff", width + 2], [color, width]]) {
    const c = document.createElementNS(SVG, "circle");
    c.setAttribute("cx", p[0] + 0.5); c.setAttribute("cy", p[1] + 0.5); c.setAttribute("r", r);
    c.setAttribute("fill", "none"); c.setAttribute("stroke", stroke); c.setAttribute("stroke-width", w);
    c.setAttribute("vector-effect", "non-scaling-stroke");
    if (dash && stroke !== "#fff") c.setAttribute("stroke-dasharray", "6 4");
    svg.appendChild(c);
  }
}

function drawOverlays() {
  const t = task(), a = answers();
  const [ov1, ov2] = [$("ov1"), $("ov2")];
  [ov1, ov2].forEach((s, k) => { s.setAttribute("viewBox", "0 0 " + t.sizes[k][0] + " " + t.sizes[k][1]);
                                  s.setAttribute("preserveAspectRatio", "none"); s.replaceChildren(); });
  const [r1, r2] = t.radius.map((r) => r + 3);  // tight: the label boxes start just outside the marker
  for (let i = 0; i < t.n; i++) {
    const key = String(i + 1);
    if (key in a) ring(ov1, t.x_points[i], r1, a[key] === null ? "#888" : "#11813a", 2);
  }
  ring(ov1, t.x_points[active], r1 + 1, "#d0169e", 3);
  const mine = answers()[String(active + 1)];
  for (const [key, lab] of Object.entries(a)) {
    if (lab !== null && key !== String(active + 1)) ring(ov2, t.y_points[t.y_labels.indexOf(lab)], r2, "#11813a", 2);
  }
  if (mine) ring(ov2, t.y_points[t.y_labels.indexOf(mine)], r2 + 1, "#d0169e", 3);
  if (DATA.show_truth && mine !== undefined) {
    const truth = t.target[active];
    if (truth !== null) ring(ov2, t.y_points[t.y_labels.indexOf(truth)], r2 + 5, "#ff8c00", 2, true);
  }
}

function drawRows() {
  const t = task(), a = answers(), rows = $("rows");
  rows.replaceChildren();
  for (let i = 0; i < t.n; i++) {
    const key = String(i + 1), row = document.createElement("div");
    row.className = "row" + (i === active ? " active" : "");
    row.dataset.point = key;
    const num = document.createElement("span"); num.className = "num"; num.textContent = t.x_labels[i];
    const ans = document.createElement("span");
    ans.className = "ans" + (key in a ? "" : " unset");
    ans.textContent = key in a ? (a[key] === null ? "none" : a[key]) : "?";
    row.append(num, document.createTextNode("\u2192"), ans);
    if (DATA.show_truth && key in a) {
      const truth = t.target[i], ok = a[key] === truth, tr = document.createElement("span");
      tr.className = "truth " + (ok ? "ok" : "bad");
      tr.textContent = ok ? "\u2713" : "\u2717 truth: " + (truth === null ? "none" : truth);
      row.append(tr);
    }
    row.addEventListener("click", () => { active = i; render(); });
    rows.append(row);
  }
}

function render() {
  const t = task();
  for (const k of [0, 1]) {
    const img = $("img" + (k + 1)), src = DATA.images[t.images[k]];
    if (img.getAttribute("src") !== src) img.setAttribute("src", src);
  }
  $("prompt").textContent = t.prompt;
  const done = TASKS.filter((x) => nAnswered(x) === x.n).length;
  const partial = TASKS.filter((x) => nAnswered(x) > 0 && nAnswered(x) < x.n).length;
  $("progress").textContent = "Task " + (state.cur + 1) + " of " + TASKS.length + " \u00b7 " + done + " done" +
    (partial ? ", " + partial + " partly" : "");
  $("info").textContent = DATA.show_truth ? t.info : "";
  $("download").textContent = "Download answers (" + (done + partial) + ")";
  drawRows();
  drawOverlays();
}

// ---- actions
function firstOpen(from) {  // the next unanswered point at or after `from` (wrapping), or -1
  const t = task(), a = answers();
  for (let k = 0; k < t.n; k++) { const i = (from + k) % t.n; if (!(String(i + 1) in a)) return i; }
  return -1;
}

// typed ids: digits gather until no longer id of image 2 starts with them, a pause, or Enter
let typed = "", typedTimer = null;
function commitTyped() {
  clearTimeout(typedTimer); typedTimer = null;
  const id = typed; typed = "";
  if (task().y_labels.includes(id)) setAnswer(id);
}
function typeDigit(d) {
  typed += d;
  if (!task().y_labels.some((lab) => lab !== typed && lab.startsWith(typed))) commitTyped();
  else { clearTimeout(typedTimer); typedTimer = setTimeout(commitTyped, 800); }
}

function setAnswer(label) {  // label: an image-2 id or null (no match)
  answers()[String(active + 1)] = label;
  const next = firstOpen(active + 1);
  if (next >= 0) active = next;
  flushTime(); save(); render();
}

function clearAnswer() { delete answers()[String(active + 1)]; flushTime(); save(); render(); }

function goTo(index) {
  if (index < 0 || index >= TASKS.length) return;
  typed = ""; clearTimeout(typedTimer);  // a half-typed id stays with its task
  flushTime();
  state.cur = index;
  active = Math.max(firstOpen(0), 0);
  save(); render();
}

function nextOpenTask() {
  for (let k = 1; k <= TASKS.length; k++) {
    const i = (state.cur + k) % TASKS.length;
    if (nAnswered(TASKS[i]) < TASKS[i].n) return goTo(i);
  }
}

// a click on an image -> the point whose marker it is on, else whose label box holds it, else the nearest
// marker within reach (markers are drawn over label boxes, so a marker wins where the two overlap)
function hit(e, img, points, boxes, size, r) {
  const rect = img.getBoundingClientRect();
  const x = (e.clientX - rect.left) * size[0] / rect.width - 0.5;
  const y = (e.clientY - rect.top) * size[1] / rect.height - 0.5;
  const nearest = (reach) => {
    let best = -1, bestD = reach;
    points.forEach((p, j) => { const d = Math.hypot(p[0] - x, p[1] - y); if (d <= bestD) { best = j; bestD = d; } });
    return best;
  };
  const on = nearest(r + 2);
  if (on >= 0) return on;
  const box = boxes.findIndex((b) => x >= b[0] - 1 && x <= b[2] + 1 && y >= b[1] - 1 && y <= b[3] + 1);
  return box >= 0 ? box : nearest(2.5 * r + 4);
}

$("img2").addEventListener("click", (e) => {
  const t = task(), j = hit(e, $("img2"), t.y_points, t.y_boxes, t.sizes[1], t.radius[1]);
  if (j >= 0) setAnswer(t.y_labels[j]);
});
$("img1").addEventListener("click", (e) => {
  const t = task(), i = hit(e, $("img1"), t.x_points, t.x_boxes, t.sizes[0], t.radius[0]);
  if (i >= 0) { active = i; render(); }
});
$("none").addEventListener("click", () => setAnswer(null));
$("clear").addEventListener("click", clearAnswer);
$("prev").addEventListener("click", () => goTo(state.cur - 1));
$("next").addEventListener("click", () => goTo(state.cur + 1));
$("next-open").addEventListener("click", nextOpenTask);
$("reset").addEventListener("click", () => {
  if (!confirm("Forget every answer and time on this page?")) return;
  state = {cur: 0, answers: {}, seconds: {}}; since = null; save(); goTo(0);
});

function download() {
  flushTime(); save();
  const lines = TASKS.filter((t) => nAnswered(t) > 0).map((t) => JSON.stringify({
    task_id: t.task_id, text: answerText(state.answers[t.task_id]),
    seconds: Math.round(10 * (state.seconds[t.task_id] || 0)) / 10}));
  const blob = new Blob([lines.join("\n") + (lines.length ? "\n" : "")], {type: "application/jsonl"});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob); a.download = "answers.jsonl";
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}
$("download").addEventListener("click", download);

document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;  // leave browser shortcuts alone
  const t = task(), k = e.key;
  if (/^[0-9]$/.test(k) && (typed || k !== "0")) typeDigit(k);
  else if (k === "0" || k === "-") setAnswer(null);
  else if (k === "Enter" && typed) commitTyped();
  else if (k === "Backspace" || k === "Delete") clearAnswer();
  else if (k === "ArrowDown") { active = (active + 1) % t.n; render(); }
  else if (k === "ArrowUp") { active = (active + t.n - 1) % t.n; render(); }
  else if (k === "ArrowRight") goTo(state.cur + 1);
  else if (k === "ArrowLeft") goTo(state.cur - 1);
  else if (k === "Enter") nextOpenTask();
  else return;
  e.preventDefault();
});
document.addEventListener("visibilitychange", () => { flushTime(); save(); });
window.addEventListener("pagehide", () => { flushTime(); save(); });
setInterval(() => { flushTime(); save(); }, 1000);

active = Math.max(firstOpen(0), 0);
flushTime();
render();
</script>
</body>
</html>
"""


if __name__ == "__main__":
    main()
