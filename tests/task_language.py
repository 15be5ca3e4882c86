"""Tests: one task language with the released benchmark (issue 26): the JSON answer after a thinking block in
reward.score (ours beside the released scorer and reward, each value worked out by hand in the comment), the
numeric ids drawn on both images (read back from the pixels by colour) and the prompt template in make_tasks."""
import json

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

import export_bench
import make_tasks
import reward

TASK = dict(task_id="t", n=4, m=6, target=["3", None, "1", "6"])   # released truth {"1":"3","2":"none","3":"1","4":"6"}
PERFECT = '{"1": "3", "2": "none", "3": "1", "4": "6"}'


def fenced(body, thinking="t"):
    return f"<thinking>{thinking}</thinking>\n<answer>\n```json\n{body}\n```\n</answer>"


# (reply, ours: format, match, precision, recall, f1, released scorer: P, R, F1, released reward parts: thinking,
# content, repetition, accuracy)
CASES = [
    # fenced and perfect. Ours all 1. Released: the right "none" earns nothing: P 3/3, R 3/4, F1 6/7; reward 4/4
    ("fenced", fenced(PERFECT), (1, 1, 1, 1, 1), (1, 0.75, 6 / 7), (1, 1, 0, 1)),
    # unfenced, integer ids, null: ours the same as above. Released: 3 == "3" as strings, null skipped in the
    # scorer; in the reward null != "none": 3 of 4 right
    ("integers+null", '<thinking>t</thinking><answer>{"1": 3, "2": null, "3": 1, "4": 6}</answer>',
     (1, 1, 1, 1, 1), (1, 0.75, 6 / 7), (1, 1, 0, 0.75)),
    # missing key 2 (target none): format 0, match 3/4 (silence is not none); links 3/3 claimed right of 3: P=R=1.
    # Released: P 3/3, R 3/4; reward: 3 of 4 keys right
    ("missing key", fenced('{"1": "3", "3": "1", "4": "6"}'), (0, 0.75, 1, 1, 1), (1, 0.75, 6 / 7), (1, 1, 0, 0.75)),
    # extra key 5 (n = 4): ours malformed, all 0. Released: 4 claims, 3 right: P 3/4, R 3/4, F1 3/4; reward
    # (4 - 0.5 x 1 unknown key) / 4 = 0.875
    ("extra key", fenced('{"1": "3", "2": "none", "3": "1", "4": "6", "5": "2"}'), (0, 0, 0, 0, 0),
     (0.75, 0.75, 0.75), (1, 1, 0, 0.875)),
    # duplicate key 1: ours malformed. Released: json keeps the last "1": "2": 3 claims, 2 right: P 2/3, R 2/4,
    # F1 2 (1/3) / (7/6) = 4/7; reward: keys 2, 3, 4 right = 3/4
    ("duplicate key", fenced('{"1": "3", "1": "2", "2": "none", "3": "1", "4": "6"}'), (0, 0, 0, 0, 0),
     (2 / 3, 0.5, 4 / 7), (1, 1, 0, 0.75)),
    # text after the answer: ours malformed. Released scorer as the perfect reply; reward: thinking format 0
    ("text after", fenced(PERFECT) + "\nDone.", (0, 0, 0, 0, 0), (1, 0.75, 6 / 7), (0, 1, 0, 1)),
    # no thinking block, bare none, two mistakes: ours format 0, points 2, 3 right: match 1/2; claims 1 -> "1"
    # (wrong) and 3 -> "1" (right): P 1/2, R 1/3, F1 2 (1/6) / (5/6) = 0.4. Released: bare none is no JSON: 0;
    # reward: no thinking, content 0, accuracy 0
    ("bare none", '<answer>{"1": "1", "2": none, "3": "1", "4": "none"}</answer>', (0, 0.5, 0.5, 1 / 3, 0.4),
     (0, 0, 0), (0, 0, 0, 0)),
]


@pytest.mark.parametrize("name, text, ours, released, parts", CASES, ids=[c[0] for c in CASES])
def test_hand_written_replies_score_by_hand(name, text, ours, released, parts):
    s = reward.score(text, TASK)
    got = tuple(s[k] for k in ("format", "match", "precision", "recall", "f1"))
    assert got == pytest.approx(ours), name
    assert s["reward"] == pytest.approx(ours[0] + ours[1])
    assert tuple(s[k] for k in ("released_precision", "released_recall", "released_f1")) == pytest.approx(released)
    r = reward.released_reward(text, TASK)
    assert tuple(r[k] for k in reward.RELEASED_PARTS) == pytest.approx(parts), name
    assert r["score"] == pytest.approx(sum(parts))


def test_format_answer_is_read_alike_by_both_scorers():
    # our canonical reply gets the released reward's best score and our full reward
    text = reward.format_answer({1: "3", 2: None, 3: "1", 4: "6"}, thinking="the chair moved left")
    assert reward.score(text, TASK)["reward"] == 2.0
    assert reward.released_reward(text, TASK)["score"] == 3.0
    assert reward.released_json(text)[1] == json.loads(PERFECT)


def test_actor_block_between_thinking_and_answer():
    R, t = np.eye(3).tolist(), [0.0, 0.0, -1.0]  # camera 2 one unit forward: move forward, no turn
    act = reward.format_actions(dict(yaw=0, pitch=0, roll=0, move="forward"))
    text = "<thinking>t</thinking>\n" + act + "\n<answer>" + PERFECT + "</answer>"
    d = reward.score(text, dict(TASK, R=R, t=t), w_action=0.5)
    assert (d["format"], d["match"], d["action"], d["reward"]) == (1.0, 1.0, 1.0, 2.5)


def _fake_pair(tmp_path, w=800, h=600):
    """One pool pair on noisy coloured images (never pure green, nor grey), with the test_all fake arrays."""
    import test_all  # the fake pool helpers live there (imported lazily: test_all imports this module)
    rng = np.random.default_rng(0)
    for v in (1, 2):
        noise = rng.integers(60, 200, (h, w, 3)).astype(np.uint8)
        noise[..., 2] = np.where(noise[..., 2] == noise[..., 0], noise[..., 2] + 1, noise[..., 2])
        Image.fromarray(noise).save(tmp_path / f"im{v}.png")
    arrays = test_all.tasks_fake_arrays(seed=2, w=min(w, h) - 40, h=min(w, h) - 40)
    pair = dict(pair_id="p/0", source="scannet", scene="s", scene_type="indoor", split="test", bin=1,
                delta_v=0.5, image1="im1.png", image2="im2.png", width1=w, height1=h, width2=w, height2=h,
                K1=np.eye(3).tolist(), K2=np.eye(3).tolist(), R=None, t=None)
    return pair, arrays


def _read_label(img, box, candidates, font):
    """The candidate whose white text, drawn where make_tasks draws it, best matches the box's white pixels."""
    x0, y0, x1, y1 = (int(np.ceil(box[0])), int(np.ceil(box[1])), int(np.floor(box[2])), int(np.floor(box[3])))
    seen = np.asarray(img)[y0:y1, x0:x1].min(axis=-1) > 128  # inside the box only
    best = None
    for lab in candidates:
        ref = Image.new("RGB", img.size, make_tasks.BOX)
        tb = ImageDraw.Draw(ref).textbbox((0, 0), lab, font=font)
        ImageDraw.Draw(ref).text((box[0] + 3 - tb[0], box[1] + 2 - tb[1]), lab, font=font, fill=make_tasks.TEXT)
        want = np.asarray(ref)[y0:y1, x0:x1].min(axis=-1) > 128
        iou = (seen & want).sum() / max(1, (seen | want).sum())
        if best is None or iou > best[0]:
            best = (iou, lab)
    return best


@pytest.mark.parametrize("max_side", [640, 1024])
def test_drawn_tasks_carry_numeric_ids_on_both_images(tmp_path, max_side):
    pair, arrays = _fake_pair(tmp_path)
    task, imgs = make_tasks.make_task(pair, arrays, "L3", "dense", 10, np.random.default_rng(1), str(tmp_path),
                                      max_side=max_side, min_sep=20 * max_side / 640)
    assert task["x_labels"] == [str(i) for i in range(1, 11)] and task["y_labels"] == reward.y_labels_for(task["m"])
    assert all(t is None or t in task["y_labels"] for t in task["target"]) and None in task["target"]
    font_size, r = make_tasks.marker_sizes(max_side)
    font = make_tasks._font(font_size)
    _, _, geom = make_tasks.draw_prompts(*[Image.open(p) for p in task["originals"]], task["x_points"],
                                         task["y_points"], task["x_labels"], task["y_labels"], max_side,
                                         return_geometry=True)
    for img, key, labels, g in ((imgs[0], "x", task["x_labels"], geom["labels1"]),
                                (imgs[1], "y", task["y_labels"], geom["labels2"])):
        a = np.asarray(img)
        pts = make_tasks.to_drawn(task[f"{key}_points"], task["scale1" if key == "x" else "scale2"])
        # the green rings, found by colour alone: one per point, centred on it
        green = np.all(a == make_tasks.RING, axis=-1).astype(np.uint8)
        n_comp, comp, stats, centres = cv2.connectedComponentsWithStats(green, connectivity=8)
        assert n_comp - 1 == len(pts)
        for x, y in pts:
            ids = set(np.unique(comp[max(0, round(y) - r - 1):round(y) + r + 2,
                                     max(0, round(x) - r - 1):round(x) + r + 2])) - {0}
            assert len(ids) == 1  # this point's ring and no other near it
            (cx, cy) = centres[ids.pop()]
            if r + 1 <= x <= a.shape[1] - r - 2 and r + 1 <= y <= a.shape[0] - r - 2:
                assert abs(cx - x) <= 1.0 and abs(cy - y) <= 1.0
        # each label box: black and white only (no ring, no image over it), and its pixels read back as its id
        for p, lab in zip(g, labels):
            x0, y0, x1, y1 = (round(v) for v in p["box"])
            inner = a[y0 + 1:y1, x0 + 1:x1].astype(int)
            assert (inner.max(-1) == inner.min(-1)).all()  # grey levels only: white text anti-aliased on black
            assert (inner.min(-1) > 128).any() and (inner.max(-1) < 30).mean() > 0.4
            iou, read = _read_label(img, p["box"], labels, font)
            assert (read, iou) == (lab, 1.0), (read, iou, lab)


def test_make_tasks_prompt_template(tmp_path):
    import test_all
    pool = tmp_path / "pool"
    test_all.tasks_write_fake_pool(str(pool), n_pairs=2)
    (tmp_path / "utils.py").write_text('ANNO_MATCH_MULTI_TEMPLATE = """Their question."""\n'
                                       'ANNO_MATCH_MULTI_NO_THINK_TEMPLATE = "Just answer."\n')
    make_tasks.main(["--pool", str(pool), "--out", str(tmp_path / "t"), "--split", "test", "--max-side", "320",
                     "--min-sep", "12", "--prompt-template", str(tmp_path / "utils.py")])
    tasks = [json.loads(line) for line in open(tmp_path / "t" / "test.jsonl")]
    assert tasks and all(t["prompt"] == "Their question." for t in tasks)
    assert "ANNO_MATCH_MULTI_TEMPLATE" in json.load(open(tmp_path / "t" / "args_test.json"))["prompt"]
    with pytest.raises(SystemExit, match="no such file"):
        make_tasks.main(["--pool", str(pool), "--out", str(tmp_path / "u"), "--prompt-template",
                         str(tmp_path / "missing.txt")])


def test_grpo_released_reward_logs_its_four_parts_and_asks_the_template(grpo_env, tmp_path, monkeypatch):
    import grpo
    import test_all
    tpl = tmp_path / "question.txt"
    tpl.write_text("Match the ids. Think in <thinking></thinking>, answer JSON in <answer></answer>.\n")
    out = tmp_path / "run"
    asked, encode = [], grpo.encode
    monkeypatch.setattr(grpo, "encode", lambda tok, ip, prompt, images: asked.append(prompt) or encode(tok, ip, prompt,
                                                                                                    images))
    grpo.main(test_all.grpo_common(grpo_env, out, "--reward", "released", "--prompt-template", str(tpl),
                                   "--steps", "2", "--save-every", "100"))
    metrics = test_all.grpo_read(out / "metrics.jsonl")
    rows = test_all.grpo_read(out / "rollouts.jsonl")
    assert len(metrics) == 2 and len(rows) == 2 * 2 * 4
    for m in metrics:
        assert all(k in m for k in reward.RELEASED_PARTS) and "format" in m and "match" in m
        mine = [r for r in rows if r["step"] == m["step"]]
        for k in reward.RELEASED_PARTS:
            assert m[k] == pytest.approx(np.mean([r[k] for r in mine]))
    for r in rows:  # the reward is the sum of the four parts (no ActoR term here), each within its range
        assert r["reward"] == pytest.approx(sum(r[k] for k in reward.RELEASED_PARTS))
        assert r["thinking_format_reward"] in (0.0, 1.0) and r["content_format_reward"] in (0.0, 1.0)
        assert -3.0 <= r["repetition_penalty"] <= 0.0 and -2.0 <= r["accuracy_reward"] <= 1.0
    # the training prompts were the template; args.json keeps the path, not the text
    assert len(asked) == 2 * 2 and set(asked) == {tpl.read_text().rstrip()}
    assert json.load(open(out / "args.json"))["prompt_template"] == str(tpl)
    with pytest.raises(SystemExit, match="no such file"):
        grpo.main(test_all.grpo_common(grpo_env, tmp_path / "bad", "--prompt-template", str(tmp_path / "no.txt")))


def test_reference_answer_is_the_released_truth(tmp_path):
    # the exports' answer column and the released layout's answer (reward.released_truth) carry the same ids
    pair, arrays = _fake_pair(tmp_path)
    task, _ = make_tasks.make_task(pair, arrays, "L3", "sparse", 6, np.random.default_rng(4), str(tmp_path),
                                   max_side=640)
    ref = reward.reference_answer(task["target"])
    assert ref.startswith("<answer>\n```json\n") and ref.endswith("\n```\n</answer>")
    truth = reward.released_truth(task)
    assert reward.released_json(ref)[1] == truth and list(truth) == task["x_labels"]
    assert set(truth.values()) <= set(task["y_labels"]) | {"none"} and "none" in truth.values()
    # our scorer with think=False and the released accuracy both give it full marks
    assert reward.score(ref, task, think=False)["reward"] == 2.0
    assert reward.released_reward(ref, task)["accuracy_reward"] == 1.0


def test_human_page_types_multi_digit_ids(human_browser, human_page):
    """A task with 10 or more points on image 2: "1" then "0" answers 10, "1" then Enter answers 1, "1" then a
    pause answers 1, and a half-typed id does not follow the person to another task."""
    import evaluate
    import test_all
    tasks = evaluate.load_tasks(human_page / "page" / "tasks.jsonl")
    k = next((i for i, t in enumerate(tasks) if t["m"] >= 10 and t["n"] >= 3), None)
    if k is None:
        pytest.fail("the fixture's page has no task with 10 or more points on image 2 (the test needs one)")
    context, page, _ = test_all._human_open(human_browser, human_page / "page")
    for _ in range(k):
        page.keyboard.press("ArrowRight")
    rows = lambda: [r.split("\n")[-1] for r in page.locator(".row").all_inner_texts()]
    page.keyboard.press("1")
    page.keyboard.press("0")            # no id starts with "10" but 10: answered at once
    page.keyboard.press("1")
    page.keyboard.press("Enter")        # 1, though 10.. start with it
    page.keyboard.press("1")
    assert rows()[:3] == ["10", "1", "?"], rows()  # waiting for a second digit
    page.clock.run_for(900)             # the pause ends it
    assert rows()[:3] == ["10", "1", "1"]
    page.keyboard.press("ArrowUp")
    page.keyboard.press("1")
    away, back = ("ArrowRight", "ArrowLeft") if k == 0 else ("ArrowLeft", "ArrowRight")
    page.keyboard.press(away)           # another task, then the pause: nothing answered there or here
    page.clock.run_for(900)
    assert all(r == "?" for r in rows()), rows()
    page.keyboard.press(back)
    assert rows()[:3] == ["10", "1", "1"], (rows(), k)
    context.close()


def test_make_tasks_output_exported_in_the_released_layout_carries_the_same_ids(evaluate_tasks, tmp_path):
    """A task made by make_tasks.py and the same task exported in the released layout (export_bench.py --format
    reasonmatch) carry the same ids and answer: the released truth of each sample is our target with "none" for
    distractors, its images are the drawn bytes, and a reply that is right under our grammar is right there."""
    from widematch import reasonmatch
    tasks = [json.loads(line) for line in evaluate_tasks.read_text().splitlines() if line.strip()]
    out = tmp_path / "bench"
    export_bench.main(["--tasks", str(evaluate_tasks), "--format", "reasonmatch", "--out", str(out)])
    root, _, entries = reasonmatch.load_index(out)
    assert len(entries) == len(tasks)
    for task, entry in zip(tasks, entries):
        s = reasonmatch.load_sample(root, entry)
        assert s["error"] is None
        truth = s["metadata"]["answer"]
        assert truth == {x: ("none" if t is None else t) for x, t in zip(task["x_labels"], task["target"])}
        assert set(truth) == {str(i + 1) for i in range(task["n"])}
        assert all(v == "none" or 1 <= int(v) <= task["m"] for v in truth.values())
        for k in range(2):
            assert s["images"][k].read_bytes() == (evaluate_tasks.parent / task["images"][k]).read_bytes()
        reply = reward.format_answer({i + 1: t for i, t in enumerate(task["target"])})
        assert reward.score(reply, task)["match"] == 1.0
        assert reward.released_prf(truth, reward.released_json(reply)[1]) == \
            reward.released_prf(truth, {k: v for k, v in truth.items()})
