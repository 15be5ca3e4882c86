"""Tests for reward.py, make_tasks.py and curriculum.py: /work/venv/bin/python -m pytest -q test_tasks.py"""
import json
import os
import random
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import curriculum
import make_tasks
import reward

# -----------------------------------------------------------------------------
# reward.py

TASKS_TASK = dict(task_id="t", n=4, m=6, target=["C", None, "A", "F"])
TASKS_GOOD = "The red chair is at 1...\n<answer>\n1: C\n2: none\n3: A\n4: F\n</answer>"


def tasks_close(d, **expected):
    for k, v in expected.items():
        assert d[k] == pytest.approx(v), (k, d[k], v)


def test_tasks_reward_good_and_tolerant_variants():
    tasks_close(reward.score(TASKS_GOOD, TASKS_TASK), format=1, match=1, reward=2, precision=1, recall=1, f1=1)
    variants = [
        "<ANSWER>\n 4 -> f\n\n3 = a\n1 - c\n2: None\n</Answer>\n",          # order, case, separators
        "<answer>1:C\n2:∅\n3 => A\n4. F</answer><|im_end|>",                 # compact, end token
        "<answer>\n1 : C\n2 : no   match\n3 → A\n4:F\n</answer>  \n\n",     # spaces, "no match"
    ]
    for v in variants:
        d = reward.score(v, TASKS_TASK)
        assert d["parsed"] == {1: "C", 2: None, 3: "A", 4: "F"}, v
        tasks_close(d, format=1, match=1, reward=2)


def test_tasks_reward_wrong_and_partial():
    # two right (1, 3), a false match on a none target (2), a wrong letter (4)
    d = reward.score("<answer>\n1: C\n2: B\n3: A\n4: E\n</answer>", TASKS_TASK)
    tasks_close(d, format=1, match=0.5, reward=1.5, precision=2 / 4, recall=2 / 3, f1=2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    # partial: points 2 and 4 missing -> format 0, missing count wrong (2's target none is NOT earned)
    d = reward.score("<answer>\n1: C\n3: A\n</answer>", TASKS_TASK)
    tasks_close(d, format=0, match=0.5, reward=0.5, precision=1, recall=2 / 3)
    assert d["n_answered"] == 2 and not d["malformed"]
    # empty block: partial with nothing answered
    d = reward.score("<answer>\n</answer>", TASKS_TASK)
    tasks_close(d, format=0, match=0, reward=0, precision=0, recall=0, f1=0)
    # weights
    d = reward.score("<answer>\n1: C\n2: B\n3: A\n4: E\n</answer>", TASKS_TASK, w_format=0.5, w_match=2.0)
    tasks_close(d, reward=0.5 + 2 * 0.5)


@pytest.mark.parametrize("text", [
    "1: C\n2: none\n3: A\n4: F",                                                   # no block
    "<answer>\n1: C\n2: none\n3: A\n4: F\n",                                       # unclosed
    "<answer>\n1: C\n2: none\n3: A\n4: F\n</answer>\nHope this helps",           # text after block
    "<answer>\n1: C\n2: none\n3: A\n4: F\n</answer>\n```",                        # fence after block
    "<answer>\n1: C\n</answer>\n<answer>\n1: C\n2: none\n3: A\n4: F\n</answer>",  # two blocks
    "I will answer in <answer> tags.\n<answer>\n1: C\n2: none\n3: A\n4: F\n</answer>",  # stray tag
    "<answer>\n1: C\n2: none\n3: A\n4: F\n5: B\n</answer>",                        # index out of range
    "<answer>\n0: C\n1: C\n2: none\n3: A\n4: F\n</answer>",                        # index 0
    "<answer>\n1: C\n2: none\n3: A\n4: G\n</answer>",                              # label out of range (m=6)
    "<answer>\n1: C\n2: none\n3: A\n4: F\n1: C\n</answer>",                        # answered twice
    "<answer>\n1: C\n2: none\n3: A\n4: F (the lamp)\n</answer>",                   # extra words
    "<answer>\n1: C, 2: none, 3: A, 4: F\n</answer>",                              # one line
    "<answer>\n1: C\n2: 3\n3: A\n4: F\n</answer>",                                 # numeric label
    "<answer>\n1 C\n2: none\n3: A\n4: F\n</answer>",                               # no separator
    "</answer>\n1: C\n2: none\n3: A\n4: F\n<answer>",                              # reversed tags
    "<answer>\n99999999999: C\n</answer>",                                         # huge index
])
def test_tasks_reward_malformed(text):
    assert reward.parse_answer(text, 4, 6) is None
    tasks_close(reward.score(text, TASKS_TASK), format=0, match=0, reward=0, precision=0, recall=0, f1=0)


def test_tasks_reward_anti_hacking():
    # all none: exactly the fraction of none targets (1 of 4), and no precision/recall
    d = reward.score(reward.format_answer({i: None for i in range(1, 5)}), TASKS_TASK)
    tasks_close(d, format=1, match=0.25, reward=1.25, precision=0, recall=0, f1=0)
    # one letter repeated: right only where it is the target
    d = reward.score(reward.format_answer({i: "A" for i in range(1, 5)}), TASKS_TASK)
    tasks_close(d, format=1, match=0.25, precision=0.25, recall=1 / 3)
    # every letter listed for point 1 (extra entries): malformed
    spam = "<answer>\n" + "\n".join(f"1: {c}" for c in "ABCDEF") + "\n2: none\n3: A\n4: F\n</answer>"
    tasks_close(reward.score(spam, TASKS_TASK), reward=0)
    # huge reasoning before a perfect block: over max_chars -> malformed; under it -> full reward
    long = "x" * (reward.MAX_CHARS + 1) + TASKS_GOOD
    tasks_close(reward.score(long, TASKS_TASK), reward=0)
    tasks_close(reward.score("x" * 1000 + TASKS_GOOD, TASKS_TASK, max_chars=2000), reward=2)
    tasks_close(reward.score("x" * 1000 + TASKS_GOOD, TASKS_TASK, max_chars=1000), reward=0)
    # all-none task: an all-none answer is perfect in every metric; one false match loses P/R/F1
    none_task = dict(n=2, m=3, target=[None, None])
    tasks_close(reward.score("<answer>\n1: none\n2: none\n</answer>", none_task), reward=2, precision=1,
                recall=1, f1=1)
    tasks_close(reward.score("<answer>\n1: none\n2: B\n</answer>", none_task), match=0.5, precision=0,
                recall=0, f1=0)


def test_tasks_reward_format_answer_roundtrip_and_labels():
    assert reward.y_labels_for(28)[-3:] == ["Z", "AA", "AB"]
    assert reward.x_labels_for(3) == ["1", "2", "3"]
    rng = random.Random(0)
    for _ in range(200):
        n, m = rng.randint(1, 12), rng.randint(1, 30)
        labels = reward.y_labels_for(m)
        mapping = {i: rng.choice(labels + [None]) for i in range(1, n + 1)}
        assert reward.parse_answer("reasoning\n" + reward.format_answer(mapping), n, m) == mapping
        task = dict(n=n, m=m, target=[mapping[i] for i in range(1, n + 1)])
        assert reward.score(reward.format_answer(mapping), task)["reward"] == 2.0


def test_tasks_reward_fuzz():
    rng = random.Random(1)
    alphabet = list("0123456789ABCDEFabcdef:-=>.<>/ \n\t∅→") + ["<answer>", "</answer>", "none", "no match",
                                                                  "<|im_end|>", "1: A\n", "\r\n", "\x00", "é"]
    base = [TASKS_GOOD, reward.format_answer({1: "A", 2: None, 3: "B", 4: "C"}), "<answer>\n</answer>"]
    t0, n_ok = time.time(), 0
    for k in range(12000):
        if k % 2:
            s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        else:  # mutate a good answer: delete / insert / replace a few characters
            s = list(rng.choice(base))
            for _ in range(rng.randint(1, 4)):
                p = rng.randrange(len(s) + 1)
                op = rng.random()
                if op < 0.33 and p < len(s):
                    del s[p]
                elif op < 0.66:
                    s.insert(p, rng.choice(alphabet))
                elif p < len(s):
                    s[p] = rng.choice(alphabet)
            s = "".join(s)
        d = reward.score(s, TASKS_TASK)
        assert 0.0 <= d["reward"] <= 2.0 and 0.0 <= d["f1"] <= 1.0
        assert (d["parsed"] is None) == d["malformed"]
        n_ok += not d["malformed"]
    assert 0 < n_ok < 12000  # the mutations produce both well-formed and malformed strings
    # pathological sizes stay cheap (bounded by max_chars) and never raise
    for s in [" " * 10**6, "<answer>" + " " * 30000 + "</answer>", "1" * 40000, "<answer>\n" + "1:" * 15000]:
        assert reward.score(s, TASKS_TASK)["reward"] == 0.0
    assert reward.parse_answer(None, 4, 6) is None and reward.parse_answer(b"<answer>", 4, 6) is None
    print(f"fuzz took {time.time() - t0:.2f}s")

# -----------------------------------------------------------------------------
# make_tasks.py


def tasks_fake_arrays(seed=0, n_match=30, n_un1=10, n_un2=10, n_dense=300, w=640, h=480):
    """A pool pair like build_pool.py writes: one pool match per cluster, distractors take the nearest match's
    cluster, dense matches under a known affine map image 1 -> image 2."""
    rng = np.random.default_rng(seed)
    A, b = np.array([[0.9, 0.05], [0.05, 0.9]]), np.array([20.0, 20.0])  # keeps kp2 inside image 2
    kp1 = rng.uniform([5, 5], [w - 6, h - 6], (n_match + n_un1, 2))
    kp2 = np.concatenate([rng.uniform([5, 5], [w - 6, h - 6], (n_un2, 2)), kp1[:n_match] @ A.T + b])
    match = np.full(n_match + n_un1, -1, np.int32)
    match[:n_match] = n_un2 + np.arange(n_match)
    cluster = np.concatenate([np.arange(n_match), make_tasks._nearest(kp1[n_match:], kp1[:n_match])])
    cluster2 = np.concatenate([make_tasks._nearest(kp2[:n_un2], kp2[n_un2:]), np.arange(n_match)])
    d1 = rng.uniform([5, 5], [w - 6, h - 6], (n_dense, 2))
    return dict(kp1=kp1.astype(np.float32), kp2=kp2.astype(np.float32), match=match,
                cluster=cluster.astype(np.int32), cluster2=cluster2.astype(np.int32),
                dense1=d1.astype(np.float32), dense2=(d1 @ A.T + b).astype(np.float32))


def tasks_lookup(arrays, side, idx):
    """A sample's point id -> (point, partner id in the other image or None)."""
    kp, dense = arrays[f"kp{side}"], arrays[f"dense{side}"]
    if idx >= len(kp):
        return dense[idx - len(kp)], idx - len(kp) + len(arrays["kp" + str(3 - side)])
    if side == 1:
        j = int(arrays["match"][idx])
        return kp[idx], (j if j >= 0 else None)
    rows = np.flatnonzero(arrays["match"] == idx)
    return kp[idx], (int(rows[0]) if len(rows) else None)


def tasks_check_sample(arrays, s, min_sep, per_cluster=3):
    """The invariants every sample must satisfy, checked against the arrays themselves."""
    n, m, target = s["n"], s["m"], s["target"]
    assert s["x_labels"] == [str(i + 1) for i in range(n)] and len(s["x_points"]) == n
    assert s["y_labels"] == reward.y_labels_for(m) and len(s["y_points"]) == m
    assert len(set(s["x_idx"])) == n and len(set(s["y_idx"])) == m
    for pts in (s["x_points"], s["y_points"]):  # min separation in each image
        P = np.asarray(pts)
        d = np.sqrt(((P[:, None] - P[None]) ** 2).sum(-1)) + np.eye(len(P)) * 1e9
        assert d.min() >= min_sep - 1e-6
    y_of = dict(zip(s["y_labels"], s["y_idx"]))
    for i, (xi, t) in enumerate(zip(s["x_idx"], target)):
        p, partner = tasks_lookup(arrays, 1, xi)
        assert np.allclose(p, s["x_points"][i])
        if t is None:  # a none target is a verified distractor of image 1
            assert xi < len(arrays["kp1"]) and arrays["match"][xi] == -1
        else:
            assert y_of[t] == partner
    matched_y = {y_of[t] for t in target if t is not None}
    assert len(matched_y) == sum(t is not None for t in target)  # one-to-one ground truth
    for yj in set(s["y_idx"]) - matched_y:  # distractor of image 2: verified, or partner of a far, unused kp1
        assert yj < len(arrays["kp2"])
        _, partner = tasks_lookup(arrays, 2, yj)
        if partner is not None:
            assert partner not in s["x_idx"]
            gap = np.sqrt(((np.asarray(s["x_points"]) - arrays["kp1"][partner]) ** 2).sum(-1)).min()
            assert gap >= min_sep - 1e-6
    level = s["level"]
    n_none = sum(t is None for t in target)
    if level == "L1":
        assert n_none == 0 and m == n
    elif level == "L2":
        assert n_none == 0 and m > n
    else:
        assert 1 <= n_none <= n - 1 and m > n - n_none
        assert np.ceil(0.25 * n) <= n_none <= max(np.ceil(0.25 * n), np.floor(0.5 * n))
    if s["spatial"] == "sparse":  # pool points only, one per cluster in each image
        assert all(i < len(arrays["kp1"]) for i in s["x_idx"]) and all(j < len(arrays["kp2"]) for j in s["y_idx"])
        assert len(set(s["x_cluster"])) == n and len(set(s["y_cluster"])) == m
        assert s["x_cluster"] == [int(arrays["cluster"][i]) for i in s["x_idx"]]
        assert s["y_cluster"] == [int(arrays["cluster2"][j]) for j in s["y_idx"]]
    elif s["spatial"] == "moderate":
        assert max(Counter(s["x_cluster"]).values()) <= per_cluster


@pytest.mark.parametrize("level", ["L1", "L2", "L3"])
@pytest.mark.parametrize("spatial", ["sparse", "moderate", "dense"])
def test_tasks_sample_points_invariants(level, spatial):
    arrays = tasks_fake_arrays()
    rng = np.random.default_rng(0)
    used_dense = 0
    for n in [4, 5, 8, 12] * 5:
        s = make_tasks.sample_points(arrays, level, spatial, n, rng, min_sep=25.0)
        assert s["n"] == n and s["level"] == level and s["spatial"] == spatial
        tasks_check_sample(arrays, s, 25.0)
        used_dense += sum(i >= len(arrays["kp1"]) for i in s["x_idx"])
    assert (used_dense > 0) == (spatial != "sparse")  # moderate/dense draw from the dense matches
    if spatial == "moderate":  # points come in groups: some cluster holds several
        s = make_tasks.sample_points(arrays, level, spatial, 9, rng, min_sep=10.0)
        assert max(Counter(s["x_cluster"]).values()) >= 2


def test_tasks_sample_points_shuffled_and_seeded():
    arrays = tasks_fake_arrays()
    a = make_tasks.sample_points(arrays, "L3", "dense", 8, np.random.default_rng(5), min_sep=20)
    b = make_tasks.sample_points(arrays, "L3", "dense", 8, np.random.default_rng(5), min_sep=20)
    assert a == b
    rng = np.random.default_rng(1)
    firsts, identity = Counter(), 0
    for _ in range(400):
        s = make_tasks.sample_points(arrays, "L1", "sparse", 4, rng, min_sep=20)
        firsts[s["target"][0]] += 1
        identity += s["target"] == ["A", "B", "C", "D"]
    assert set(firsts) == {"A", "B", "C", "D"} and min(firsts.values()) > 60  # ~100 each
    assert identity < 60  # ~400/24 = 17 by chance


def test_tasks_sample_points_unavailable():
    arrays = tasks_fake_arrays()
    no_un1 = dict(arrays, match=np.where(arrays["match"] < 0, 0, arrays["match"]))  # every kp1 matched
    with pytest.raises(make_tasks.TaskUnavailable):
        make_tasks.sample_points(no_un1, "L3", "dense", 6, np.random.default_rng(0))
    few = tasks_fake_arrays(n_match=5, n_un2=0, n_dense=0)
    with pytest.raises(make_tasks.TaskUnavailable):
        make_tasks.sample_points(few, "L1", "sparse", 6, np.random.default_rng(0))
    with pytest.raises(make_tasks.TaskUnavailable):  # every kp2 used by the 5 partners: no distractor
        make_tasks.sample_points(few, "L2", "dense", 5, np.random.default_rng(0))
    with pytest.raises(make_tasks.TaskUnavailable):  # separation impossible in a 640x480 image
        make_tasks.sample_points(arrays, "L1", "dense", 12, np.random.default_rng(0), min_sep=400)
    assert issubclass(make_tasks.TaskUnavailable, ValueError)
    # shared partners are ambiguous: never used as matched points
    shared = dict(arrays, match=arrays["match"].copy())
    shared["match"][1] = shared["match"][0]
    for _ in range(30):
        s = make_tasks.sample_points(shared, "L1", "sparse", 12, np.random.default_rng(_), min_sep=5)
        assert 0 not in s["x_idx"] and 1 not in s["x_idx"]


def tasks_write_fake_pool(root, n_pairs=4, size1=(1280, 960), size2=(600, 800)):
    """A pool folder with fake pairs (two sources, both splits) and plain images."""
    os.makedirs(os.path.join(root, "pairs"), exist_ok=True)
    lines = []
    for k in range(n_pairs):
        for src, stype in (("scannet", "indoor"), ("colmap", "outdoor")):
            pid = f"{src}/s{k % 2}/{k}"
            w1, h1 = size1
            w2, h2 = size2
            arrays = tasks_fake_arrays(seed=k, w=560, h=560)  # affine map keeps kp2 inside image 2
            npz = f"pairs/{src}_{k}.npz"
            np.savez(os.path.join(root, npz), **arrays)
            for v, (w, h) in ((1, size1), (2, size2)):
                Image.new("RGB", (w, h), (90 + 20 * v, 100, 110)).save(os.path.join(root, f"{src}_{k}_{v}.png"))
            lines.append(dict(pair_id=pid, source=src, scene=f"s{k % 2}", scene_type=stype,
                              split="test" if k % 2 else "train", image1=f"{src}_{k}_1.png",
                              image2=os.path.join(root, f"{src}_{k}_2.png"), width1=w1, height1=h1, width2=w2,
                              height2=h2, K1=np.eye(3).tolist(), K2=np.eye(3).tolist(), overlap=0.5,
                              delta_v=0.5, bin=1 + k, npz=npz, R=None, t=None, n_matches=30, n_dist1=10,
                              n_dist2=10))
    with open(os.path.join(root, "pairs.jsonl"), "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in lines)
    return lines


def test_tasks_drawing_geometry(tmp_path):
    pairs = tasks_write_fake_pool(str(tmp_path), n_pairs=1)
    pair = pairs[0]
    arrays = make_tasks.load_arrays(str(tmp_path), pair)
    rng = np.random.default_rng(3)
    for level, spatial in [("L3", "dense"), ("L2", "moderate"), ("L1", "sparse")]:
        task, imgs = make_tasks.make_task(pair, arrays, level, spatial, 12, rng, str(tmp_path), max_side=640,
                                          min_sep=20)
        assert imgs[0].size == (640, 480) and imgs[1].size == (480, 640)  # longer side 640, aspect kept
        assert task["scale1"] == [0.5, 0.5] and task["scale2"] == [0.8, 0.8]
        assert task["images"] is None and os.path.isabs(task["originals"][0])
        assert reward.score(reward.format_answer(dict(enumerate(task["target"], 1))), task)["reward"] == 2
        font, r = make_tasks.marker_sizes(640)
        for side, img, fill in ((1, imgs[0], make_tasks.STYLE1["fill"]), (2, imgs[1], make_tasks.STYLE2["fill"])):
            a = np.asarray(img).astype(int)
            pts = make_tasks.to_drawn(task[f"{'x' if side == 1 else 'y'}_points"], task[f"scale{side}"])
            # drawn separation holds at the drawn resolution
            P = np.asarray(pts)
            assert (np.sqrt(((P[:, None] - P[None]) ** 2).sum(-1)) + np.eye(len(P)) * 1e9).min() >= 20 - 1e-6
            for x, y in pts:
                # the marker colour is at the point, and the blob of that colour around it is centred on it
                assert tuple(a[round(y), round(x)]) == fill
                y0, x0 = max(0, round(y) - r - 1), max(0, round(x) - r - 1)
                win = np.all(a[y0:round(y) + r + 2, x0:round(x) + r + 2] == fill, axis=-1)
                ys, xs = np.nonzero(win)
                assert abs(xs.mean() + x0 - x) <= 1.0 and abs(ys.mean() + y0 - y) <= 1.0
        # label boxes: near their point, inside the image, never over a marker, not overlapping each other
        _, _, geom = make_tasks.draw_prompts(*[Image.open(p) for p in task["originals"]], task["x_points"],
                                             task["y_points"], task["x_labels"], task["y_labels"], 640,
                                             return_geometry=True)
        for img, g in ((imgs[0], geom["labels1"]), (imgs[1], geom["labels2"])):
            boxes = [p["box"] for p in g]
            for p in g:
                (x, y), (bx0, by0, bx1, by1) = p["point"], p["box"]
                assert 0 <= bx0 < bx1 <= img.width - 1 and 0 <= by0 < by1 <= img.height - 1
                assert make_tasks._box_dist(p["box"], (x, y)) <= 3 * font
                for q in g:
                    qx, qy = q["point"]
                    assert make_tasks._overlap(p["box"], (qx - r - 1, qy - r - 1, qx + r + 1, qy + r + 1)) == 0
            assert sum(make_tasks._overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]) == 0
        assert task["x_labels"] == [p["label"] for p in geom["labels1"]]


def test_tasks_prompt():
    p = make_tasks.build_prompt(5, 7)
    assert reward.ANSWER_INSTRUCTIONS in p and "1 to 5" in p and "A to G" in p
    assert make_tasks.STYLE1["name"] in p and make_tasks.STYLE2["name"] in p
    assert make_tasks.build_prompt(5, 7, actor=False) == p
    pa = make_tasks.build_prompt(5, 7, actor=True)
    assert pa != p and "<action>" in pa and reward.ANSWER_INSTRUCTIONS in pa


def test_tasks_cli_fake_pool(tmp_path, capsys):
    pool = tmp_path / "pool"
    tasks_write_fake_pool(str(pool), n_pairs=4)
    out = tmp_path / "tasks"
    make_tasks.main(["--pool", str(pool), "--out", str(out), "--split", "test", "--per-pair", "3", "--seed", "1",
                     "--max-side", "320", "--min-sep", "12"])
    assert "make_tasks.py: test: 12 tasks" in capsys.readouterr().out
    tasks = [json.loads(line) for line in open(out / "test.jsonl")]
    fields = ("task_id pair_id source scene scene_type split bin delta_v level spatial n m images originals x_points "
              "y_points x_labels y_labels prompt target K1 K2 R t").split()
    for t in tasks:
        assert all(k in t for k in fields) and t["split"] == "test"
        for rel, side in zip(t["images"], (1, 2)):
            assert Image.open(out / rel).size == tuple(t[f"size{side}"]) and max(t[f"size{side}"]) == 320
        assert reward.score(reward.format_answer(dict(enumerate(t["target"], 1))), t)["reward"] == 2
    assert len({t["task_id"] for t in tasks}) == 12
    # stratified: each source gets 6 tasks, 2 per level and 2 per spatial mode
    for src in ("scannet", "colmap"):
        mine = [t for t in tasks if t["source"] == src]
        assert Counter(t["level"] for t in mine) == {"L1": 2, "L2": 2, "L3": 2}
        assert Counter(t["spatial"] for t in mine) == {"sparse": 2, "moderate": 2, "dense": 2}
    assert json.load(open(out / "args_test.json"))["per_pair"] == 3
    # same seed, same tasks
    make_tasks.main(["--pool", str(pool), "--out", str(tmp_path / "again"), "--split", "test", "--per-pair", "3",
                     "--seed", "1", "--max-side", "320", "--min-sep", "12"])
    again = [json.loads(line) for line in open(tmp_path / "again" / "test.jsonl")]
    assert [t["target"] for t in again] == [t["target"] for t in tasks]
    with pytest.raises(SystemExit):
        make_tasks.main(["--pool", str(tmp_path / "nope"), "--out", str(out)])


def test_tasks_assign_configs_balanced():
    pairs = [dict(pair_id=f"p{i}", source="a" if i < 7 else "b") for i in range(10)]
    plan = make_tasks.assign_configs(pairs, 9, list(make_tasks.LEVELS), list(make_tasks.SPATIAL), seed=0)
    for src in ("a", "b"):
        combos = Counter((lv, sp) for p, _, lv, sp in plan if p["source"] == src)
        assert len(combos) == 9 and len(set(combos.values())) == 1  # every (level, spatial) equally often
    per_pair = Counter(lv for p, _, lv, _ in plan if p["pair_id"] == "p0")
    assert per_pair == {"L1": 3, "L2": 3, "L3": 3}

# -----------------------------------------------------------------------------
# curriculum.py


def tasks_feed(cur, accs):
    """Feed accuracies on the current config; return [(step, event)]."""
    events = []
    for k, acc in enumerate(accs):
        for e in cur.update(*cur.current(), acc):
            events.append((k, e))
    return events


def test_tasks_curriculum_dcrl_rule():
    cur = curriculum.Curriculum([1, 2, 4], window=4, threshold=0.75)  # bin 3 empty: skipped
    assert cur.current() == (1, "L1", "sparse")
    # a full window is needed; mean must EXCEED the threshold
    assert tasks_feed(cur, [1.0, 1.0, 1.0]) == [] and cur.current() == (1, "L1", "sparse")
    assert tasks_feed(cur, [0.0]) == []                      # window [1,1,1,0] mean .75: not > .75
    assert tasks_feed(cur, [0.5]) == []                      # [1,1,0,.5] .625
    ev = tasks_feed(cur, [1.0, 1.0, 1.0])                     # [1,0,.5,1] [0,.5,1,1] .625, [.5,1,1,1] .875
    assert [k for k, _ in ev] == [2] and ev[0][1].startswith("advance inner")
    assert cur.current() == (1, "L2", "moderate") and len(cur.recent) == 0  # window restarts
    assert tasks_feed(cur, [0.9] * 4)[0][1].startswith("advance inner")
    assert cur.current() == (1, "L3", "dense")
    ev = tasks_feed(cur, [0.9] * 4)
    assert len(ev) == 1 and ev[0][0] == 3 and ev[0][1].startswith("advance bin")
    assert cur.current() == (2, "L1", "sparse")              # inner restarts on the next bin
    rng = np.random.default_rng(0)
    assert {cur.sample(rng)[0] for _ in range(200)} == {2}  # bin 1 dropped for good (replay 0)
    assert tasks_feed(cur, [1.0] * 12) and cur.current() == (4, "L1", "sparse")  # bin 3 skipped
    # updates on other configs never count towards the current window
    for _ in range(10):
        assert cur.update(2, "L1", "sparse", 1.0) == [] and cur.update(4, "L2", "moderate", 1.0) == []
    assert len(cur.recent) == 0
    # after the last bin's last stage: finished, stays there
    ev = tasks_feed(cur, [1.0] * 12)
    assert [e.split()[0] + " " + e.split()[1] for _, e in ev] == ["advance inner", "advance inner", "mastered all"]
    assert cur.finished and cur.current() == (4, "L3", "dense")
    assert tasks_feed(cur, [1.0] * 8) == [] and cur.current() == (4, "L3", "dense")
    assert "finished" in cur.describe()


def test_tasks_curriculum_grid_restart_and_replay():
    cur = curriculum.Curriculum([5, 7], stages="grid", window=2, restart_inner=False)
    seen = [cur.current()]
    for _ in range(8):
        tasks_feed(cur, [1.0, 1.0])
        seen.append(cur.current())
    assert seen == [(5, lv, sp) for lv in ("L1", "L2", "L3") for sp in ("sparse", "moderate", "dense")]
    tasks_feed(cur, [1.0, 1.0])
    assert cur.current() == (7, "L3", "dense")  # restart_inner=False keeps the last stage
    rep = curriculum.Curriculum([1, 2, 3], window=1, threshold=0.5, replay=0.25)
    rng = np.random.default_rng(0)
    assert {rep.sample(rng) for _ in range(50)} == {(1, "L1", "sparse")}  # nothing mastered yet
    tasks_feed(rep, [1.0] * 3)
    draws = [rep.sample(rng) for _ in range(2000)]
    old = sum(b == 1 for b, _, _ in draws)
    assert rep.current() == (2, "L1", "sparse") and 380 < old < 620  # ~25 % replay of bin 1
    assert all(d == rep.current() for d in draws if d[0] != 1)


def test_tasks_curriculum_static_modes():
    bins = [1, 2, 3, 4, 5, 6, 8, 9, 10]
    rng = np.random.default_rng(0)
    for mode, want in (("uniform", set(bins)), ("easy", {1, 2, 3}), ("hard", {8, 9, 10})):
        cur = curriculum.Curriculum(bins, mode=mode)
        draws = Counter(cur.sample(rng) for _ in range(3000))
        assert {b for b, _, _ in draws} == want
        assert {(lv, sp) for _, lv, sp in draws} == set(curriculum.STAGES["joint"])
        assert min(draws.values()) > 0.5 * 3000 / len(draws)  # roughly uniform
        assert tasks_feed(cur, [1.0] * 50) == [] and cur.current() == (min(want), "L1", "sparse")
    with pytest.raises(ValueError):
        curriculum.Curriculum([], mode="dcrl")
    with pytest.raises(ValueError):
        curriculum.Curriculum([1], mode="fancy")


def test_tasks_curriculum_state_roundtrip():
    rng = random.Random(0)
    accs = [rng.random() ** 0.3 for _ in range(300)]
    for mode in curriculum.MODES:
        a = curriculum.Curriculum([1, 2, 3, 6], mode=mode, window=5, replay=0.1 if mode == "dcrl" else 0.0)
        r1 = np.random.default_rng(1)
        for acc in accs[:37]:
            b = a.sample(r1)
            a.update(*b, acc)
        sd = json.loads(json.dumps(a.state_dict()))
        b_cur = curriculum.Curriculum([1, 2, 3, 6], mode=mode, window=5, replay=0.1 if mode == "dcrl" else 0.0)
        b_cur.load_state_dict(sd)
        assert b_cur.state_dict() == a.state_dict() and b_cur.describe() == a.describe()
        r2 = np.random.default_rng(2)
        r3 = np.random.default_rng(2)
        log_a, log_b = [], []
        for acc in accs[37:]:
            sa, sb = a.sample(r2), b_cur.sample(r3)
            log_a.append((sa, a.update(*sa, acc)))
            log_b.append((sb, b_cur.update(*sb, acc)))
        assert log_a == log_b
        if mode == "dcrl":  # the sequence does move the curriculum, so the comparison covers transitions
            assert any(ev for _, ev in log_a)
    with pytest.raises(ValueError):  # a checkpoint from another configuration is refused
        curriculum.Curriculum([1, 2], window=5).load_state_dict(sd)


# -----------------------------------------------------------------------------
# make_tasks.py on a real (synthetic) pool from synthetic.py + build_pool.py


@pytest.fixture(scope="module")
def tasks_synthetic_pool(tmp_path_factory):
    import build_pool
    import synthetic
    root = tmp_path_factory.mktemp("tasks_synth")
    data, pool = str(root / "demo_data"), str(root / "pool")
    synthetic.main(["--out", data, "--scenes", "2", "--frames", "4", "--seed", "0"])
    build_pool.main(["--scannet", os.path.join(data, "scannet"), "--colmap", os.path.join(data, "colmap"),
                     "--co3d", os.path.join(data, "co3d"), "--out", pool, "--max-pairs-per-scene", "4",
                     "--workers", "1"])
    return root, pool


def test_tasks_synthetic_pool_sampling(tasks_synthetic_pool):
    _, pool = tasks_synthetic_pool
    pairs = make_tasks.load_pairs(pool)
    assert {p["source"] for p in pairs} == {"scannet", "colmap", "co3d"}
    rng = np.random.default_rng(0)
    made = Counter()
    for pair in pairs:
        arrays = make_tasks.load_arrays(pool, pair)
        for level in make_tasks.LEVELS:
            for spatial in make_tasks.SPATIAL:
                try:
                    s = make_tasks.sample_points(arrays, level, spatial, 8, rng, min_sep=15.0)
                except make_tasks.TaskUnavailable:
                    continue
                tasks_check_sample(arrays, s, 15.0)
                made[level, spatial] += 1
    assert len(made) == 9 and min(made.values()) >= len(pairs) // 2  # most pairs supply every configuration


def test_tasks_synthetic_pool_cli(tasks_synthetic_pool, capsys):
    root, pool = tasks_synthetic_pool
    out = str(root / "tasks")
    make_tasks.main(["--pool", pool, "--out", out, "--split", "test", "--per-pair", "3", "--max-side", "320",
                     "--image-format", "png"])  # lossless, so the marker colour can be checked exactly
    assert "make_tasks.py: test:" in capsys.readouterr().out
    tasks = [json.loads(line) for line in open(os.path.join(out, "test.jsonl"))]
    n_test = len(make_tasks.load_pairs(pool, "test"))
    assert len(tasks) >= 0.8 * 3 * n_test and all(t["split"] == "test" for t in tasks)
    levels = Counter(t["level"] for t in tasks)
    assert set(levels) == set(make_tasks.LEVELS) and max(levels.values()) - min(levels.values()) <= 0.2 * len(tasks)
    t = tasks[0]
    img = np.asarray(Image.open(os.path.join(out, t["images"][0]))).astype(int)
    for x, y in make_tasks.to_drawn(t["x_points"], t["scale1"]):
        assert tuple(img[round(y), round(x)]) == make_tasks.STYLE1["fill"]
