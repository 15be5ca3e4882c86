"""evaluate.py's outputs beside the numbers (docs/evaluate.md, "Outputs"): <out>/report.md with its tables, the
plots, the side-by-side pictures (--show) and the paper's transfer table (--transfer: lmms-eval results of the base
and the trained model). The metrics themselves are evaluate.py's aggregate.
"""

import json
import re
import sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import ConnectionPatch
from matplotlib.ticker import MaxNLocator

from widematch.answers import one_line


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
