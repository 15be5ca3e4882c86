"""Tests: ReasonMatch-Bench as released (widematch/reasonmatch.py, evaluate.py --reasonmatch, export_bench.py
--format reasonmatch). The tests build a small benchmark in the released layout; every expected number is worked
out by hand in the comments."""
import json
import threading

import pytest
from PIL import Image, ImageDraw

import evaluate
import export_bench
from tests.chat_server import ChatServer, completion, data_url_image
from widematch import model_io, reasonmatch

FENCE = "```"


def draw_labels(path, size, n, seed):
    """An image with n green circles holding white-on-black numeric ids, as the released samples carry."""
    w, h = size
    im = Image.new("RGB", size, (40 + 20 * seed, 90, 140))
    d = ImageDraw.Draw(im)
    for k in range(n):
        x, y = (k + 1) * w // (n + 1), h // 2
        d.ellipse([x - 9, y - 9, x + 9, y + 9], outline=(0, 255, 0), width=2)
        d.rectangle([x - 4, y - 5, x + 4, y + 5], fill=(0, 0, 0))
        d.text((x - 3, y - 5), str(k + 1), fill=(255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")


# key, dataset_key, stage, difficulty, overlap_rank, answer, reply; image widths differ per sample, so a stub server
# can tell from the image which sample it was asked. "s5" has no metadata file.
SAMPLES = [
    ("s1", "uco3d", "one_to_one", "easy", 0.10, {"1": "2", "2": "1"},
     f'<thinking>t</thinking><answer>{FENCE}json\n{{"1": "2", "2": "1"}}\n{FENCE}</answer>'),
    ("s2", "scannet", "multi_to_multi", "hard", 0.50, {"1": "2", "2": "none", "3": "1", "4": "none"},
     '<answer>{"1": "2", "2": "none", "3": "3", "9": "1"}</answer>'),
    ("s3", "dl3dv", "one_to_multi", "medium", 0.90, {"1": "3", "2": "1"},
     f'<answer>{FENCE}JSON\n["3", "1"]\n{FENCE}</answer>'),
    ("s4", "re10k", "multi_to_multi", "hard", 0.66, {"1": "none", "2": "none"},
     '<answer>{"1": "none", "2": null}</answer>'),
    ("s5", "scannet", "one_to_one", "easy", 0.20, {"1": "1"}, '{"1": "1"}'),
    ("s6", "uco3d", "one_to_multi", "easy", 0.33, {"1": "2", "2": "1"},
     f'<answer>{FENCE}json\n{{"1": "2",}}\n{FENCE}</answer>'),
]
# by hand, released rule (P, R, F1) and ours (match, F1):
# s1 all right: (1, 1, 1); ours (1, 1)
# s2 claims 1->2 (right), 3->3 (wrong), 9->1 (extra key: wrong), "2": "none" skipped: P 1/3, R 1/4 (4 keys),
#    F1 2/7; ours: keys 1, 2 right of 4 -> match 1/2; P 1/3, R 1/2 (2 real links), F1 2/5
# s3 a list: 0 (parse counts as "not an object"); ours 0
# s4 all "none" (null too): P 0/max(0,1) = 0: (0, 0, 0); ours: match 1, F1 1 (nothing claimed, nothing to find)
# s5 missing metadata: an error, 0; ours 0
# s6 a fenced block that does not parse: 0; ours 0
BY_HAND = {"s1": (1, 1, 1, 1, 1), "s2": (1 / 3, 1 / 4, 2 / 7, 1 / 2, 2 / 5), "s3": (0, 0, 0, 0, 0),
           "s4": (0, 0, 0, 1, 1), "s5": (0, 0, 0, 0, 0), "s6": (0, 0, 0, 0, 0)}


def width(key):
    return 96 + 8 * int(key[1:])


@pytest.fixture(scope="module")
def rm_bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm") / "reasonmatch_bench"
    index = []
    for k, (key, ds, stage, diff, rank, answer, _) in enumerate(SAMPLES):
        rel = f"{ds}/{stage}/{key}"
        n = len(answer)
        draw_labels(root / rel / "view_a.jpg", (width(key), 64), n, k)
        draw_labels(root / rel / "view_b.png", (width(key), 64), n + 1, k + 1)
        # stored paths as the release's: absolute on the authors' disk, the part after "testset/" under the root
        md = dict(image1=f"/mnt/authors/testset/{rel}/view_a.jpg", image2=f"testset/{rel}/view_b.png", answer=answer,
                  meta=dict(stage=stage, difficulty=diff, overlap=round(1 - rank, 2), overlap_rank=rank))
        if key != "s5":
            (root / rel / "meta.json").write_text(json.dumps(md))
        entry = dict(dataset=ds.upper(), dataset_key=ds, stage=stage, difficulty=diff, metadata=f"{rel}/meta.json",
                     viewA=f"{rel}/view_a.jpg", viewB=f"{rel}/view_b.png")
        entry["id" if key == "s3" else "sample_id"] = key  # the release reads sample_id, else id
        index.append(entry)
    (root / reasonmatch.INDEX_NAME).write_text(json.dumps(index))
    scene = root.parent / "scene_labels.json"   # the release's form; s3 (dl3dv) and s4 (re10k) need the map
    scene.write_text(json.dumps({"s3": {"scene": "indoor", "source": "rule"}, "s4": {"scene": "Outdoor"}}))
    return root


def _rows(path):
    return {r["widematch"]["key"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_reasonmatch_answers_scored_and_summarized_by_hand(rm_bench, tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(dict(sample_id=k, text=reply)) + "\n" for k, *_, reply in SAMPLES))
    out = tmp_path / "eval"
    evaluate.main(["--reasonmatch", str(rm_bench), "--answers", str(answers), "--name", "hand", "--out", str(out),
                   "--scene-map", str(rm_bench.parent / "scene_labels.json")])
    rows = _rows(out / "hand" / "samples.jsonl")
    assert list(rows) == [s[0] for s in SAMPLES]
    for key, (p, r, f, match, our_f1) in BY_HAND.items():
        got = rows[key]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f)), key
        assert (got["widematch"]["our_match"], got["widematch"]["our_f1"]) == pytest.approx((match, our_f1)), key
    assert set(rows["s1"]) == {"meta", "gt", "prediction", "prediction_json_raw", "prediction_parsed", "precision",
                               "recall", "f1", "latency", "error", "widematch"}
    assert rows["s5"]["error"].startswith("metadata_error") and rows["s5"]["gt"] == {}
    assert "difficulty" not in rows["s5"]["meta"]  # the release's short meta for unreadable metadata
    assert rows["s3"]["meta"]["sample_id"] == "s3" and rows["s3"]["prediction_parsed"] == ["3", "1"]
    assert rows["s6"]["prediction_json_raw"] == '{"1": "2",}' and rows["s6"]["prediction_parsed"] is None
    assert rows["s1"]["gt"] == {"1": "2", "2": "1"}

    s = json.loads((out / "hand" / "summary.json").read_text())
    assert s["total_samples"] == 6
    # overall: F1 (1 + 2/7) / 6 = 3/14, P (1 + 1/3) / 6 = 2/9, R (1 + 1/4) / 6 = 5/24
    assert (s["avg_precision"], s["avg_recall"], s["avg_f1"]) == pytest.approx((2 / 9, 5 / 24, 3 / 14))
    assert s["json_quality"] == dict(total=6, json_absent=1, json_parse_fail=2, request_errors=1, json_success=3)
    f1 = lambda g: {k: v["avg_f1"] for k, v in g.items()}
    counts = lambda g: {k: v["count"] for k, v in g.items()}
    assert f1(s["stage_metrics"]) == pytest.approx({"one_to_one": 0.5, "multi_to_multi": 1 / 7, "one_to_multi": 0})
    # the release counts unreadable metadata under difficulty "unknown" and in no overlap bucket
    assert f1(s["difficulty_metrics"]) == pytest.approx({"easy": 0.5, "hard": 1 / 7, "medium": 0, "unknown": 0})
    # ranks 0.10 low; 0.33 and 0.50 medium; 0.66 and 0.90 high (edges [0, .33) [.33, .66) [.66, 1.01])
    assert counts(s["overlap_buckets"]) == {"low": 1, "medium": 2, "high": 2}
    assert f1(s["overlap_buckets"]) == pytest.approx({"low": 1, "medium": 1 / 7, "high": 0})
    dm = s["dataset_metrics"]
    assert f1(dm) == pytest.approx({"uco3d": 0.5, "scannet": 1 / 7, "dl3dv": 0, "re10k": 0})
    assert dm["scannet"]["count"] == 2 and dm["scannet"]["dataset"] == "SCANNET"
    assert dm["scannet"]["avg_overlap"] == pytest.approx(0.5 / 2)  # s5 has no overlap: the sum over count 2
    assert (dm["uco3d"]["overlap_rank_min"], dm["uco3d"]["overlap_rank_max"]) == (0.10, 0.33)
    assert f1(dm["uco3d"]["stages"]) == pytest.approx({"one_to_one": 1, "one_to_multi": 0})
    assert f1(dm["uco3d"]["overlap_buckets"]) == pytest.approx({"low": 1, "medium": 0})
    assert f1(dm["scannet"]["difficulties"]) == pytest.approx({"hard": 2 / 7, "unknown": 0})
    w = s["widematch"]["breakdown"]
    # ours: match (1 + 1/2 + 0 + 1 + 0 + 0) / 6, F1 (1 + 2/5 + 1) / 6
    assert (w["overall"]["our_match"], w["overall"]["our_f1"]) == pytest.approx((2.5 / 6, 2.4 / 6))
    # scenes: uco3d -> object (s1, s6), scannet -> indoor (s2, s5), the map: s3 indoor, s4 outdoor
    assert {k: v["count"] for k, v in w["scene"].items()} == {"indoor": 3, "object": 2, "outdoor": 1}
    assert w["scene"]["indoor"]["f1"] == pytest.approx(2 / 21) and w["scene"]["outdoor"]["our_f1"] == 1
    report = (out / "report.md").read_text()
    assert "| hand | 6 | 22.2 | 20.8 | 21.4 | 3 | 1 | 41.7 | 40.0 |" in report
    assert "| hand | outdoor | 1 | 0.0 | 0.0 | 0.0 | 100.0 | 100.0 |" in report


def test_reasonmatch_rescores_the_released_samples_jsonl(rm_bench, tmp_path):
    """A samples.jsonl written by the released evaluator (its schema, out of order, a request error) is re-scored
    with our code onto the same report; a gt that differs from the benchmark's stops with one line."""
    released = []
    for key, ds, stage, diff, rank, answer, reply in reversed(SAMPLES):
        if key == "s5":
            continue  # their run lacks a sample: scored as unanswered
        row = dict(meta=dict(dataset=ds.upper(), dataset_key=ds, stage=stage, difficulty=diff, sample_id=key,
                             metadata_path=f"{ds}/{stage}/{key}/meta.json", overlap=1 - rank, overlap_rank=rank),
                   gt=answer, prediction=reply, prediction_json_raw=None, prediction_parsed=None, precision=0.0,
                   recall=0.0, f1=0.0, latency=1.5, error=None)
        if key == "s1":  # a request that failed there: its text has braces, but no JSON is taken from an error
            row.update(prediction='[error] HTTP 500 {"detail": "x"}', error='HTTP 500 {"detail": "x"}')
        released.append(row)
    run = tmp_path / "their_run" / "samples.jsonl"
    run.parent.mkdir()
    run.write_text("".join(json.dumps(r) + "\n" for r in released))
    out = tmp_path / "eval"
    evaluate.main(["--reasonmatch", str(rm_bench / reasonmatch.INDEX_NAME), "--answers", str(run), "--out", str(out)])
    rows = _rows(out / "their_run" / "samples.jsonl")
    assert rows["s1"]["f1"] == 0 and rows["s1"]["error"] and rows["s1"]["prediction_json_raw"] is None
    assert rows["s2"]["f1"] == pytest.approx(2 / 7) and rows["s2"]["latency"] == 1.5
    assert rows["s5"]["widematch"]["missing"] is True
    s = json.loads((out / "their_run" / "summary.json").read_text())
    assert s["avg_f1"] == pytest.approx((2 / 7) / 6)
    assert s["json_quality"]["request_errors"] == 2  # s1 (theirs) and s5 (metadata)
    released[0]["gt"] = {"1": "9"}
    run.write_text("".join(json.dumps(r) + "\n" for r in released))
    with pytest.raises(SystemExit, match=r"line 1: sample 's6': its gt differs from the benchmark's answer"):
        evaluate.main(["--reasonmatch", str(rm_bench), "--answers", str(run), "--out", str(out)])


def test_reasonmatch_bad_input_is_one_line(rm_bench, tmp_path):
    with pytest.raises(SystemExit, match=r"no_such_dir: no such file or folder \(--reasonmatch wants"):
        evaluate.main(["--reasonmatch", str(tmp_path / "no_such_dir"), "--answers", "x", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--stage-filter goes with --reasonmatch PATH"):
        evaluate.main(["--answers", "x", "--stage-filter", "one_to_one", "--out", str(tmp_path)])
    bad = tmp_path / "annotation_index.json"
    bad.write_text('{"not": "a list"}')
    with pytest.raises(SystemExit, match=r"annotation_index.json: not a JSON list of samples"):
        evaluate.main(["--reasonmatch", str(tmp_path), "--answers", "x", "--out", str(tmp_path)])
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps(dict(sample_id="nope", text="{}")) + "\n")
    with pytest.raises(SystemExit, match=r"line 1: sample 'nope' is not in the benchmark's index"):
        evaluate.main(["--reasonmatch", str(rm_bench), "--answers", str(answers), "--out", str(tmp_path / "e")])
    # an answer that is not an object, a missing image: that sample's error, not the run's
    root = tmp_path / "b"
    draw_labels(root / "a.jpg", (64, 48), 1, 0)
    (root / "m1.json").write_text(json.dumps(dict(image1="x/testset/a.jpg", image2="a.jpg", answer=["2"])))
    (root / "m2.json").write_text(json.dumps(dict(image1="testset/a.jpg", image2="testset/gone.jpg", answer={})))
    s1, s2 = (reasonmatch.load_sample(root, dict(sample_id=k, metadata=f"{k}.json")) for k in ("m1", "m2"))
    assert s1["error"].startswith("answer_error") and s2["error"].startswith("image_error")
    assert str(root / "gone.jpg") in s2["error"]
    row = evaluate.score_released(s1, '{"1": "2"}')
    assert (row["f1"], row["prediction_json_raw"], row["gt"]) == (0, None, ["2"])
    # the filters, in the release's order (dataset, stage, then the limit)
    _, _, entries = reasonmatch.load_index(rm_bench)
    assert [reasonmatch.sample_key(e) for e in reasonmatch.select(entries, ["uco3d", "scannet"], ["one_to_one"])] \
        == ["s1", "s5"]
    assert [reasonmatch.sample_key(e) for e in reasonmatch.select(entries, None, None, 2)] == ["s1", "s2"]

# -----------------------------------------------------------------------------
# the API route against a stub server on 127.0.0.1


class StubServer(ChatServer):
    """An OpenAI-compatible chat-completions stub: it answers each sample's reply (told apart by the width of the
    image it receives), records every request body, and refuses (HTTP 400) the widths in `refuse`."""

    def __init__(self):
        self.bodies, self.refuse, self.lock = [], set(), threading.Lock()
        self.replies = {width(k): reply for k, *_, reply in SAMPLES}
        super().__init__()

    def respond(self, path, headers, body):
        w = data_url_image(body["messages"][1]["content"][0]["image_url"]["url"]).size[0]
        with self.lock:
            self.bodies.append(body)
        if w in self.refuse:
            return 400, {"error": {"message": "bad request"}}
        return 200, completion(body["model"], self.replies[w], 10, 5)

    def widths(self):
        return [data_url_image(b["messages"][1]["content"][0]["image_url"]["url"]).size[0] for b in self.bodies]


def test_reasonmatch_api_route_request_body_and_resume(rm_bench, tmp_path, monkeypatch):
    template = tmp_path / "utils.py"  # the released utils.py's form: the constants are read, not imported
    template.write_text("import requests\nANNO_MATCH_MULTI_TEMPLATE = r'''think, then answer'''\n"
                        "ANNO_MATCH_MULTI_NO_THINK_TEMPLATE = '''just answer'''\n")
    monkeypatch.setenv("STUB_KEY", "EMPTY")
    out = tmp_path / "eval"
    with StubServer() as stub:
        argv = ["--reasonmatch", str(rm_bench), "--api-base", stub.url, "--api-model", "stub-vl", "--api-key-env",
                "STUB_KEY", "--api-workers", "1", "--api-retries", "0", "--prompt-template", str(template),
                "--out", str(out)]
        stub.refuse = {width("s4")}  # the 4th sample is refused: the run stops with one line, 3 rows kept
        with pytest.raises(SystemExit, match=r"rejected the request for task s4 \(HTTP 400"):
            evaluate.main(argv)
        assert list(_rows(out / "stub-vl" / "samples.jsonl")) == ["s5", "s1", "s2", "s3"]  # s5: no request
        body = stub.bodies[0]
        assert body["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
        content = body["messages"][1]["content"]
        assert [c["type"] for c in content] == ["image_url", "image_url", "text"]
        assert content[2]["text"] == "think, then answer"
        for c, size in zip(content[:2], [(width("s1"), 64)] * 2):  # image 2 was a PNG: re-encoded as JPEG too
            assert c["image_url"]["url"].startswith("data:image/jpeg;base64,")
            im = data_url_image(c["image_url"]["url"])
            assert im.format == "JPEG" and im.size == size
        assert body["temperature"] == 0 and body["max_tokens"] == 8192
        # a kill while the 3rd row was written: half a line left at the end
        path = out / "stub-vl" / "samples.jsonl"
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[:-1]) + lines[-1][:40])
        stub.refuse = set()
        evaluate.main(argv)
        # asked: s1, s2, s3, s4 (refused); then s3 (its row was lost), s4, s6; s5 never (no metadata)
        assert stub.widths() == [width(k) for k in ("s1", "s2", "s3", "s4", "s3", "s4", "s6")]
    rows = _rows(path)
    assert sorted(rows) == ["s1", "s2", "s3", "s4", "s5", "s6"]
    for key, (p, r, f, match, our_f1) in BY_HAND.items():
        assert (rows[key]["f1"], rows[key]["widematch"]["our_f1"]) == pytest.approx((f, our_f1)), key
    assert rows["s1"]["widematch"]["usage"] == {"prompt_tokens": 10, "completion_tokens": 5}
    s = json.loads((out / "stub-vl" / "summary.json").read_text())
    assert s["avg_f1"] == pytest.approx(3 / 14) and s["config"]["max_tokens"] == 8192
    assert "utils.py (ANNO_MATCH_MULTI_TEMPLATE)" in (out / "report.md").read_text()

# -----------------------------------------------------------------------------
# a local checkpoint: the tiny model (test_all's evaluate_tiny fixture, built once for both sections)


def test_reasonmatch_local_model_system_message_and_rows(rm_bench, evaluate_tiny, tmp_path):
    tok, ip = model_io.load_processors(str(evaluate_tiny))
    ims = [Image.new("RGB", (64, 48))] * 2
    enc = model_io.encode(tok, ip, "q", ims, system=reasonmatch.SYSTEM_PROMPT)
    text = tok.decode(enc["input_ids"][0])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert model_io.encode(tok, ip, "q", ims)["input_ids"].shape[1] < enc["input_ids"].shape[1]
    out = tmp_path / "eval"
    argv = [str(evaluate_tiny), "--reasonmatch", str(rm_bench), "--max-new-tokens", "4", "--batch-size", "2",
            "--no-think", "--out", str(out)]
    evaluate.main([*argv, "--limit", "2"])
    first = _rows(out / "tiny" / "samples.jsonl")
    evaluate.main([*argv, "--limit", "5"])  # a longer run into the same --out resumes: the first two kept as they are
    rows = _rows(out / "tiny" / "samples.jsonl")
    assert sorted(rows) == ["s1", "s2", "s3", "s4", "s5"] and all(rows[k] == first[k] for k in ("s1", "s2"))
    assert len((out / "tiny" / "samples.jsonl").read_text().splitlines()) == 5  # nothing asked twice
    assert all(isinstance(r["prediction"], str) for r in rows.values())
    assert rows["s5"]["error"].startswith("metadata_error") and rows["s1"]["widematch"]["n_tokens"] <= 4
    s = json.loads((out / "tiny" / "summary.json").read_text())
    assert s["total_samples"] == 5 and s["config"]["max_tokens"] == 4 and "no thinking" in s["config"]["template"]

# -----------------------------------------------------------------------------
# our tasks in the released layout


def numeric_tasks(d):
    """Tasks in the numeric-id language (ids on both images): y_labels "1".."m", target image-2 ids or null."""
    tasks = []
    for k, (src, level, spatial, dv, target, m) in enumerate([
            ("scannet", "L1", "sparse", 0.2, ["2", "1"], 2), ("scannet", "L3", "dense", 0.7, ["3", None, "1"], 4),
            ("scannet", "L2", "moderate", 0.5, ["1"], 3), ("dl3dv", "L2", "moderate", 0.9, ["2", "3"], 3)]):
        imgs = [f"images/t{k}_1.jpg", f"images/t{k}_2.jpg"]
        draw_labels(d / imgs[0], (80, 60), len(target), k)
        draw_labels(d / imgs[1], (80, 60), m, k + 5)
        tasks.append(dict(task_id=f"t{k}", pair_id=f"p{k}", source=src, scene=f"sc{k}", scene_type="indoor",
                          split="test", level=level, spatial=spatial, bin=k + 1, delta_v=dv, n=len(target), m=m,
                          images=imgs, prompt="q", target=target, x_labels=[str(i + 1) for i in range(len(target))],
                          y_labels=[str(j + 1) for j in range(m)]))
    (d / "test.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    return d / "test.jsonl"


def test_export_reasonmatch_layout_read_back(tmp_path):
    tasks_path = numeric_tasks(tmp_path / "tasks")
    out = tmp_path / "bench"
    export_bench.main(["--tasks", str(tasks_path), "--format", "reasonmatch", "--out", str(out)])
    root, _, entries = reasonmatch.load_index(out)
    samples = [reasonmatch.load_sample(root, e) for e in entries]
    assert [s["error"] for s in samples] == [None] * 4
    assert [e["stage"] for e in entries] == ["one_to_one", "multi_to_multi", "one_to_multi", "one_to_multi"]
    md = samples[1]["metadata"]
    assert md["answer"] == {"1": "3", "2": "none", "3": "1"} and md["image1"].startswith("testset/")
    # ω = 1 - Δv; ranks within scannet: ω 0.8, 0.3, 0.5 -> 1, 0, 0.5; dl3dv alone -> 0.5
    assert [s["metadata"]["meta"]["overlap"] for s in samples] == pytest.approx([0.8, 0.3, 0.5, 0.1])
    assert [s["metadata"]["meta"]["overlap_rank"] for s in samples] == [1.0, 0.0, 0.5, 0.5]
    assert samples[0]["images"][1].read_bytes() == (tasks_path.parent / "images/t0_2.jpg").read_bytes()
    # the released rule on a perfect reply: t1 has one "none" of 3 keys -> R 2/3, F1 0.8; the others 1
    answers = tmp_path / "perfect.jsonl"
    answers.write_text("".join(json.dumps(dict(sample_id=s["key"], text=json.dumps(s["metadata"]["answer"]))) + "\n"
                               for s in samples))
    evaluate.main(["--reasonmatch", str(out), "--answers", str(answers), "--out", str(tmp_path / "eval")])
    s = json.loads((tmp_path / "eval" / "perfect" / "summary.json").read_text())
    assert s["avg_f1"] == pytest.approx((3 + 0.8) / 4)
    assert s["widematch"]["breakdown"]["overall"]["our_f1"] == 1
    # letter tasks (made before numeric ids on image 2) stop with one line
    old = [dict(t, y_labels=[chr(65 + j) for j in range(t["m"])]) for t in map(json.loads, tasks_path.read_text()
                                                                             .splitlines())]
    tasks_path.write_text("".join(json.dumps(t) + "\n" for t in old))
    with pytest.raises(SystemExit, match=r"task 1 \('t0'\): the tasks predate numeric ids .* remake them with "
                                         r"make_tasks.py"):
        export_bench.main(["--tasks", str(tasks_path), "--format", "reasonmatch", "--out", str(tmp_path / "b2")])

# -----------------------------------------------------------------------------
# the released benchmark in the harnesses


def test_export_released_benchmark_for_harnesses_and_read_back(rm_bench, tmp_path):
    import csv
    import importlib.util
    import datasets
    with pytest.raises(SystemExit, match=r"sample 's5': metadata_error"):  # a broken sample stops the export
        export_bench.main(["--reasonmatch", str(rm_bench), "--out", str(tmp_path / "x")])
    index = json.loads((rm_bench / reasonmatch.INDEX_NAME).read_text())
    clean = rm_bench / "clean_index.json"  # the five usable samples; the root is the index's folder
    clean.write_text(json.dumps([e for e in index if e.get("sample_id") != "s5"]))
    out = tmp_path / "hf"
    export_bench.main(["--reasonmatch", str(clean), "--out", str(out), "--no-think"])
    ds = datasets.load_dataset(str(out))["test"]
    assert ds["sample_id"] == ["s1", "s2", "s3", "s4", "s6"] and ds[0]["system"] == reasonmatch.SYSTEM_PROMPT
    assert json.loads(ds[1]["answer"]) == {"1": "2", "2": "none", "3": "1", "4": "none"}
    assert ds[0]["images"][0].size == (width("s1"), 64) and ds[2]["overlap_rank"] == 0.90
    csv.field_size_limit(1 << 30)
    with open(out / f"{reasonmatch.HARNESS_TSV}.tsv", newline="") as f:
        tsv = list(csv.reader(f, delimiter="\t"))
    assert tsv[0][:4] == ["index", "image", "question", "answer"] and [r[4] for r in tsv[1:]] == ds["sample_id"]
    # the lmms-eval task's scorer (its reward.py copy) gives the released numbers by hand
    folder = out / "lmms_eval" / reasonmatch.HARNESS_TASK
    spec = importlib.util.spec_from_file_location("rm_lmms_utils", folder / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    replies = {k: reply for k, *_, reply in SAMPLES}
    items = [utils.rm_process_results(doc, [replies[doc["sample_id"]]]) for doc in ds]
    assert items[1]["f1"] == {"sample_id": "s2", "value": pytest.approx(2 / 7)}
    assert utils.rm_mean([i["f1"] for i in items]) == pytest.approx((1 + 2 / 7) / 5)
    assert "max_new_tokens: 8192" in (folder / f"{reasonmatch.HARNESS_TASK}.yaml").read_text()
    # lmms-eval's --log_samples lines and VLMEvalKit's prediction TSV go back into evaluate.py
    log = tmp_path / "samples_reasonmatch_bench.jsonl"
    log.write_text("".join(json.dumps(dict(doc_id=k, filtered_resps=[replies[doc["sample_id"]]], f1=items[k]["f1"]))
                           + "\n" for k, doc in enumerate(ds)))
    evaluate.main(["--reasonmatch", str(clean), "--answers", str(log), "--name", "lmms", "--out", str(tmp_path / "e")])
    pred = tmp_path / "M_ReasonMatchBench.tsv"
    with open(pred, "w", newline="") as f:  # as VLMEvalKit dumps a TSV: every cell quoted (replies hold newlines)
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL)
        w.writerows([["index", "sample_id", "prediction"]] + [[k, d["sample_id"], replies[d["sample_id"]]]
                                                              for k, d in enumerate(ds)])
    evaluate.main(["--reasonmatch", str(clean), "--answers", str(pred), "--name", "vlmeval", "--out",
                   str(tmp_path / "e")])
    for name in ("lmms", "vlmeval"):
        s = json.loads((tmp_path / "e" / name / "summary.json").read_text())
        assert s["total_samples"] == 5 and s["avg_f1"] == pytest.approx((1 + 2 / 7) / 5), name
    bad = [dict(doc_id=0, filtered_resps=["{}"], f1={"sample_id": "s2", "value": 0})]
    log.write_text(json.dumps(bad[0]) + "\n")
    with pytest.raises(SystemExit, match=r"doc_id 0 is sample 's1' in the index but 's2' in the samples"):
        evaluate.main(["--reasonmatch", str(clean), "--answers", str(log), "--name", "lmms", "--out",
                       str(tmp_path / "e")])
