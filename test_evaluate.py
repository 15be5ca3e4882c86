import json
import shutil

import numpy as np
import pytest

import build_pool
import evaluate
import make_tasks
import reward
import synthetic
import tiny_model

# -----------------------------------------------------------------------------
# metrics aggregation on hand-made predictions (expected numbers worked out by hand below)


def _evaluate_task(task_id, target, source, level, scene_type, spatial, bin, delta_v, m=4):
    return dict(task_id=task_id, n=len(target), m=m, target=target, x_labels=reward.x_labels_for(len(target)),
                y_labels=reward.y_labels_for(m), source=source, level=level, scene_type=scene_type,
                spatial=spatial, bin=bin, delta_v=delta_v)


def _evaluate_hand_rows():
    ans = lambda *labels: reward.format_answer({i + 1: v for i, v in enumerate(labels)})
    cases = [
        # all right: P 1, R 1, F1 1, match 2/2
        (_evaluate_task("t1", ["A", "B"], "scannet", "L1", "indoor", "sparse", 1, 0.1), ans("A", "B")),
        # 1 of 2 claimed links right, the one real link found, 3 ends right: P 1/2, R 1, F1 2/3, match 2/3
        (_evaluate_task("t2", ["A", None, None], "scannet", "L2", "indoor", "dense", 2, 0.5), ans("A", "B", None)),
        # malformed: everything 0
        (_evaluate_task("t3", ["A", "B"], "co3d", "L1", "object", "sparse", 1, 0.9), "1: A\n2: B"),
        # swapped links, nones right: P 0, R 0, F1 0, match 2/4
        (_evaluate_task("t4", ["A", "B", None, None], "co3d", "L3", "object", "sparse", 2, 0.7),
         ans("B", "A", None, None)),
    ]
    return [evaluate.score_row(task, text) for task, text in cases]


def test_evaluate_rows_hold_reward_scores_and_counts():
    rows = _evaluate_hand_rows()
    got = [[r[k] for k in ("precision", "recall", "f1", "match", "format")] for r in rows]
    want = [(1, 1, 1, 1, 1), (0.5, 1, 2 / 3, 2 / 3, 1), (0, 0, 0, 0, 0), (0, 0, 0, 0.5, 1)]
    assert np.allclose(got, want)
    assert [(r["n_correct"], r["n_pred"], r["n_pos"], r["n_hits"], r["n"]) for r in rows] == \
        [(2, 2, 2, 2, 2), (1, 2, 1, 2, 3), (0, 0, 2, 0, 2), (0, 2, 2, 2, 4)]
    assert rows[1]["parsed"] == {"1": "A", "2": "B", "3": None} and rows[2]["parsed"] is None
    json.dumps(rows)  # rows go to predictions.jsonl as they are


def test_evaluate_aggregate_hand_made():
    rows = _evaluate_hand_rows()
    m = evaluate.aggregate(rows, widest=2)
    o = m["overall"]
    # macro: per-task numbers averaged over the 4 tasks
    assert o["n_tasks"] == 4
    assert o["f1"] == pytest.approx((1 + 2 / 3 + 0 + 0) / 4)
    assert o["precision"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert o["recall"] == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert o["match_acc"] == pytest.approx((1 + 2 / 3 + 0 + 0.5) / 4)
    assert o["format_rate"] == pytest.approx(3 / 4)
    # micro: correct links 2+1+0+0 = 3, claimed 2+2+0+2 = 6, real 2+1+2+2 = 7, exact points 6 of 11
    assert o["micro_precision"] == pytest.approx(3 / 6)
    assert o["micro_recall"] == pytest.approx(3 / 7)
    assert o["micro_f1"] == pytest.approx(2 * (1 / 2) * (3 / 7) / (1 / 2 + 3 / 7))  # = 6/13
    assert o["micro_match_acc"] == pytest.approx(6 / 11)
    # breakdowns: keys are strings (JSON), each group macro-averaged on its own tasks
    s = m["by_source"]
    assert set(s) == {"scannet", "co3d"}
    assert (s["scannet"]["f1"], s["scannet"]["precision"], s["scannet"]["recall"]) == \
        pytest.approx(((1 + 2 / 3) / 2, 0.75, 1.0))
    assert (s["co3d"]["f1"], s["co3d"]["match_acc"], s["co3d"]["n_tasks"]) == pytest.approx((0, 0.25, 2))
    assert m["by_scene_type"]["indoor"]["f1"] == pytest.approx(5 / 6)
    lv = m["by_level"]
    assert (lv["L1"]["f1"], lv["L2"]["f1"], lv["L3"]["f1"]) == pytest.approx((0.5, 2 / 3, 0.0))
    assert lv["L1"]["micro_recall"] == pytest.approx(2 / 4)
    b = m["by_bin"]
    assert set(b) == {"1", "2"}
    assert (b["1"]["f1"], b["2"]["f1"], b["2"]["precision"], b["2"]["recall"]) == \
        pytest.approx((0.5, 1 / 3, 0.25, 0.5))
    assert m["by_spatial"]["dense"]["n_tasks"] == 1 and m["by_spatial"]["sparse"]["n_tasks"] == 3
    assert set(m["by_level_bin"]["L1"]) == {"1"} and m["by_level_bin"]["L1"]["1"]["f1"] == pytest.approx(0.5)
    # widest 2: t3 (0.9) and t4 (0.7)
    w = m["widest"]
    assert (w["k"], w["min_delta_v"], w["overall"]["f1"], w["overall"]["match_acc"]) == pytest.approx((2, 0.7, 0, 0.25))
    assert set(w["by_source"]) == {"co3d"}
    # the order of the rows does not matter
    assert evaluate.aggregate(rows[::-1], widest=2) == m


def test_evaluate_aggregate_nothing_to_find():
    # all targets none and all answers none: P = R = 1 (reward's rule), pooled the same way
    row = evaluate.score_row(_evaluate_task("t", [None, None], "co3d", "L3", "object", "dense", 3, 0.5),
                             reward.format_answer({1: None, 2: None}))
    o = evaluate.aggregate([row])["overall"]
    assert (o["f1"], o["micro_f1"], o["micro_precision"], o["match_acc"]) == (1.0, 1.0, 1.0, 1.0)


def test_evaluate_model_names():
    names = [evaluate.model_name(p) for p in
             ["runs/grpo/step_000010", "runs/other/step_000010/", "Qwen/Qwen3-VL-8B-Instruct", "a b/c:d"]]
    assert names[:3] == ["grpo_step_000010", "other_step_000010", "Qwen_Qwen3-VL-8B-Instruct"]
    assert all(c.isalnum() or c in "._-" for n in names for c in n)
    assert evaluate.unique_names(["a", "b", "a", "a"]) == ["a", "b", "a-2", "a-3"]


def test_evaluate_resolve_ckpt(tmp_path):
    assert evaluate.resolve_ckpt("Qwen/Qwen3-VL-8B-Instruct") == "Qwen/Qwen3-VL-8B-Instruct"  # hub id
    (tmp_path / "step_000002.tmp").mkdir()  # an unfinished save is not a checkpoint
    for bad in [str(tmp_path), str(tmp_path / "missing"), "a/b/c"]:
        with pytest.raises(SystemExit):
            evaluate.resolve_ckpt(bad)


def test_evaluate_read_predictions_drops_truncated_last_line(tmp_path):
    p = tmp_path / "predictions.jsonl"
    p.write_text('{"task_id": "a"}\n{"task_id": "b"}\n{"task_id": "c", "te')
    assert [r["task_id"] for r in evaluate.read_predictions(p)] == ["a", "b"]
    assert p.read_text() == '{"task_id": "a"}\n{"task_id": "b"}\n'
    p.write_text('{"task_id": "a"}\n{"task_id": "b"}')  # whole last line, newline lost
    assert len(evaluate.read_predictions(p)) == 2 and p.read_text().endswith("}\n")
    p.write_text('{"task_id": "a"}\n{"task_\n{"task_id": "c"}\n')
    with pytest.raises(SystemExit):
        evaluate.read_predictions(p)

# -----------------------------------------------------------------------------
# baselines on the synthetic demo data: SIFT vs the floors, resume, determinism


@pytest.fixture(scope="module")
def evaluate_tasks(tmp_path_factory):
    """The demo pipeline's test split (synthetic scenes -> pool -> tasks), built once for this file."""
    d = tmp_path_factory.mktemp("evaluate_data")
    synthetic.main(["--out", str(d / "demo_data"), "--frames", "8"])  # small: this file must stay fast
    build_pool.main(["--scannet", str(d / "demo_data" / "scannet"), "--colmap", str(d / "demo_data" / "colmap"),
                     "--co3d", str(d / "demo_data" / "co3d"), "--out", str(d / "pool"), "--max-pairs-per-scene", "12"])
    make_tasks.main(["--pool", str(d / "pool"), "--out", str(d / "tasks"), "--split", "test", "--per-pair", "1"])
    return d / "tasks" / "test.jsonl"


@pytest.fixture(scope="module")
def evaluate_baselines(evaluate_tasks, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate_eval")
    evaluate.main(["--tasks", str(evaluate_tasks), "--out", str(out), "--baseline", "sift", "random", "none",
                   "--show", "2"])
    return out


def _evaluate_rows(out, name):
    return [json.loads(line) for line in (out / name / "predictions.jsonl").read_text().splitlines()]


def _evaluate_metrics(out, name):
    return json.loads((out / name / "metrics.json").read_text())


def test_evaluate_sift_beats_random_on_small_dv(evaluate_tasks, evaluate_baselines):
    tasks = evaluate.load_tasks(evaluate_tasks)
    out = evaluate_baselines
    for name in ("baseline_sift", "baseline_random", "baseline_none"):
        rows = _evaluate_rows(out, name)
        assert [r["task_id"] for r in rows] == [t["task_id"] for t in tasks]
        assert all(r["format"] == 1.0 for r in rows)  # baselines answer through reward.format_answer
    # small Δv = the easier half of the test tasks
    median = float(np.median([t["delta_v"] for t in tasks]))
    small = {t["task_id"] for t in tasks if t["delta_v"] <= median}
    f1 = {name: evaluate.aggregate([r for r in _evaluate_rows(out, name) if r["task_id"] in small])["overall"]["f1"]
          for name in ("baseline_sift", "baseline_random")}
    print(f"small-dv F1 ({len(small)} tasks): {f1}")
    assert f1["baseline_sift"] > f1["baseline_random"]
    # the all-none floor: match = share of none targets, F1 = 1 exactly on tasks with nothing to find
    none = _evaluate_metrics(out, "baseline_none")["overall"]
    assert none["match_acc"] == pytest.approx(np.mean([t["target"].count(None) / t["n"] for t in tasks]))
    assert none["f1"] == pytest.approx(np.mean([all(x is None for x in t["target"]) for t in tasks]))
    report = (out / "report.md").read_text()
    assert all(n in report for n in ("baseline_sift", "baseline_random", "baseline_none", "Widest"))
    assert (out / "f1_vs_bin.png").stat().st_size > 0 and (out / "f1_by_source.png").stat().st_size > 0
    assert len(list((out / "baseline_sift" / "show").glob("*.png"))) == 2


def test_evaluate_baselines_deterministic(evaluate_tasks, evaluate_baselines, tmp_path):
    evaluate.main(["--tasks", str(evaluate_tasks), "--out", str(tmp_path), "--baseline", "sift", "random", "none"])
    for name in ("baseline_sift", "baseline_random", "baseline_none"):
        assert _evaluate_metrics(tmp_path, name) == _evaluate_metrics(evaluate_baselines, name)
        assert _evaluate_rows(tmp_path, name) == _evaluate_rows(evaluate_baselines, name)


def test_evaluate_resume_after_kill(evaluate_tasks, evaluate_baselines, tmp_path, monkeypatch):
    args = ["--tasks", str(evaluate_tasks), "--out", str(tmp_path), "--baseline", "sift", "--batch-size", "2"]
    calls, real = [], evaluate.SiftMatcher.answer

    def dies_on_fifth(self, task):
        calls.append(task["task_id"])
        if len(calls) == 5:
            raise KeyboardInterrupt  # stands in for a kill in the middle of the third batch
        return real(self, task)
    monkeypatch.setattr(evaluate.SiftMatcher, "answer", dies_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(args)
    pred = tmp_path / "baseline_sift" / "predictions.jsonl"
    assert len(pred.read_text().splitlines()) == 4  # two whole batches were written
    with open(pred, "a") as f:
        f.write('{"task_id": "half a li')  # and the kill cut a line
    calls.clear()
    monkeypatch.setattr(evaluate.SiftMatcher, "answer", lambda self, t: calls.append(t["task_id"]) or real(self, t))
    evaluate.main(args)
    n = len(evaluate.load_tasks(evaluate_tasks))
    assert len(calls) == n - 4  # the 4 written tasks were not recomputed
    assert [r["task_id"] for r in _evaluate_rows(tmp_path, "baseline_sift")] == \
        [t["task_id"] for t in evaluate.load_tasks(evaluate_tasks)]
    assert _evaluate_metrics(tmp_path, "baseline_sift") == _evaluate_metrics(evaluate_baselines, "baseline_sift")
    with pytest.raises(SystemExit):  # other settings into the same dir: refused, not mixed
        evaluate.main(args + ["--sift-ratio", "0.5"])


# -----------------------------------------------------------------------------
# the model path with the tiny random Qwen3-VL


@pytest.fixture(scope="module")
def evaluate_tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaluate_tiny")
    tiny_model.main(["--out", str(d / "tiny"), "--warmup-steps", "0"])
    return d / "tiny"


def test_evaluate_tiny_model_run_dir_deterministic_resumes(evaluate_tasks, evaluate_tiny, tmp_path):
    run = tmp_path / "runs" / "demo"  # a run dir: evaluate must take its latest complete step
    for step in ("step_000001", "step_000003"):
        shutil.copytree(evaluate_tiny, run / step)
        (run / step / "meta.json").write_text("{}")
    args = lambda out: [str(run), str(evaluate_tiny), "--tasks", str(evaluate_tasks), "--out", str(out),
                        "--limit", "4", "--max-new-tokens", "12", "--batch-size", "2", "--baseline", "none",
                        "--show", "1"]
    evaluate.main(args(tmp_path / "a"))
    tasks = evaluate.load_tasks(evaluate_tasks)[:4]
    for name in ("demo_step_000003", "tiny"):
        rows = _evaluate_rows(tmp_path / "a", name)
        assert [r["task_id"] for r in rows] == [t["task_id"] for t in tasks]
        for r, t in zip(rows, tasks):  # scored by the reward code on the raw completion
            assert isinstance(r["text"], str) and isinstance(r["truncated"], bool)
            assert r["f1"] == reward.score(r["text"], t)["f1"]
        assert len(list((tmp_path / "a" / name / "show").glob("*.png"))) == 1
    assert json.loads((tmp_path / "a" / "demo_step_000003" / "run.json").read_text())["what"].endswith("step_000003")
    assert "demo_step_000003" in (tmp_path / "a" / "report.md").read_text()
    # same command, fresh dir: the same completions and metrics (greedy)
    evaluate.main(args(tmp_path / "b"))
    for name in ("demo_step_000003", "tiny", "baseline_none"):
        assert _evaluate_rows(tmp_path / "b", name) == _evaluate_rows(tmp_path / "a", name)
        assert _evaluate_metrics(tmp_path / "b", name) == _evaluate_metrics(tmp_path / "a", name)
    # killed after the first batch, mid-line: the rerun completes the file and gives the same metrics
    pred = tmp_path / "a" / "tiny" / "predictions.jsonl"
    lines = pred.read_text().splitlines(keepends=True)
    pred.write_text("".join(lines[:2]) + lines[2][:25])
    evaluate.main(args(tmp_path / "a"))
    assert pred.read_text() == "".join(lines)
    assert _evaluate_metrics(tmp_path / "a", "tiny") == _evaluate_metrics(tmp_path / "b", "tiny")
