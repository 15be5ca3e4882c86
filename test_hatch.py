"""Tests for HATCH on top of DCRL: pasta.py (PaStA) and the ActoR parts of reward.py / make_tasks.py.
/work/venv/bin/python -m pytest -q test_hatch.py"""
import argparse
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import build_pool
import grpo
import make_tasks
import pasta
import reward
import synthetic
import tiny_model

# -----------------------------------------------------------------------------
# PaStA: cell correspondence from known geometry


def hatch_grid_points(w, h, step=8):
    xs, ys = np.meshgrid(np.arange(0, w, step), np.arange(0, h, step))
    return np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float64)                             # (k, 2)


def hatch_rot_y(deg):
    a = math.radians(deg)
    return np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])


def hatch_rot_x(deg):
    a = math.radians(deg)
    return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


def hatch_rot_z(deg):
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


def test_hatch_cells_translation_and_resize():
    n = 4
    d1 = hatch_grid_points(640, 480)
    # content shifted right by exactly one cell (160 px): cell (r, c) -> (r, c + 1); column 3 leaves the image
    d2 = d1 + [160, 0]
    keep = d2[:, 0] < 640
    corr = pasta.cell_correspondence(d1[keep], d2[keep], (640, 480), (640, 480), n)
    for r in range(n):
        for c in range(n):
            assert corr[r * n + c] == (r * n + c + 1 if c < n - 1 else -1)
    # image 2 is image 1 at half resolution: normalised coordinates give the identity
    d2 = (d1 + 0.5) * 0.5 - 0.5
    assert (pasta.cell_correspondence(d1, d2, (640, 480), (320, 240), n) == np.arange(n * n)).all()
    # camera rolled by 180 degrees: (x, y) -> (w - 1 - x, h - 1 - y), cell (r, c) -> (n-1-r, n-1-c); other size
    d2 = np.stack([479 - d1[:, 0] * 0.75, 359 - d1[:, 1] * 0.75], -1)
    corr = pasta.cell_correspondence(d1, d2, (640, 480), (480, 360), n)
    assert [int(v) for v in corr] == [(n - 1 - r) * n + (n - 1 - c) for r in range(n) for c in range(n)]
    # too few matches -> -1
    corr = pasta.cell_correspondence(d1[:3], d1[:3], (640, 480), (640, 480), n, min_count=5)
    assert (corr == -1).all()


def test_hatch_cells_pure_rotation_homography():
    """Camera yaws right by ~1 cell's field of view: the scene shifts LEFT; each cell maps where the homography
    K R K^-1 sends it (checked on cells that the map keeps inside one target cell)."""
    n, w, h, f = 4, 640, 480, 500.0
    K = np.array([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1]])
    R = hatch_rot_y(math.degrees(math.atan(160 / f))).T       # x2 = R x1; camera 2 = camera 1 turned right
    H = K @ R @ np.linalg.inv(K)

    def warp(p):
        q = np.c_[p, np.ones(len(p))] @ H.T
        return q[:, :2] / q[:, 2:]
    d1 = hatch_grid_points(w, h, 4)
    d2 = warp(d1)
    keep = (d2[:, 0] >= -0.5) & (d2[:, 0] < w - 0.5) & (d2[:, 1] >= -0.5) & (d2[:, 1] < h - 0.5)
    corr = pasta.cell_correspondence(d1[keep], d2[keep], (w, h), (w, h), n)
    checked = 0
    for r in range(n):
        for c in range(n):
            # the inner 40% of the cell, mapped: if it stays in one cell, that cell must be the answer
            cx, cy = (c + 0.5) * w / n - 0.5, (r + 0.5) * h / n - 0.5
            box = np.array([[cx + sx * 0.2 * w / n, cy + sy * 0.2 * h / n] for sx in (-1, 1) for sy in (-1, 1)])
            cells = set(pasta.point_cells(warp(box), (w, h), n).tolist())
            if len(cells) == 1 and -1 not in cells:
                assert corr[r * n + c] == cells.pop(), (r, c)
                checked += 1
            if c == 0:
                assert corr[r * n + c] == -1  # the left column leaves the view
    assert checked >= 6
    valid = corr >= 0
    assert (corr[valid] % n < np.arange(n * n)[valid] % n).all()  # content moves left: column decreases

# -----------------------------------------------------------------------------
# PaStA: pooling, token layout, loss


def test_hatch_grid_pool_averages_the_right_tokens():
    merge, d = 2, 2
    for H, W, n in ((8, 12, 4), (6, 8, 4), (2, 3, 4), (9, 9, 3)):
        rows, cols = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64),
                                    indexing="ij")
        feats = torch.stack([rows, cols], -1).reshape(H * W, d)           # token k = r * W + c carries (r, c)
        g = pasta.grid_pool(feats, (1, H * merge, W * merge), merge, n).reshape(n, n, d)

        def expected(i, T):  # area-weighted mean token index of cell i among T tokens (brute force, fine grid)
            u = (np.arange(100000) + 0.5) / 100000
            inside = (u >= i / n) & (u < (i + 1) / n)
            return np.floor(u[inside] * T).mean()
        for i in range(n):
            for j in range(n):
                assert float(g[i, j, 0]) == pytest.approx(expected(i, H), abs=1e-3), (H, W, n, i, j)
                assert float(g[i, j, 1]) == pytest.approx(expected(j, W), abs=1e-3), (H, W, n, i, j)
    # divisible case exactly: cell (i, j) of a 8 x 12 grid = mean of rows 2i, 2i+1 and cols 3j..3j+2
    feats = torch.stack(torch.meshgrid(torch.arange(8.), torch.arange(12.), indexing="ij"), -1).reshape(96, 2)
    g = pasta.grid_pool(feats, (1, 16, 24), 2, 4).reshape(4, 4, 2)
    assert torch.allclose(g[2, 1], torch.tensor([4.5, 4.0]))
    # two frames are averaged
    g2 = pasta.grid_pool(torch.cat([feats, feats + 2]), (2, 16, 24), 2, 4).reshape(4, 4, 2)
    assert torch.allclose(g2, g + 1)
    with pytest.raises(ValueError):
        pasta.grid_pool(feats[:-1], (1, 16, 24), 2, 4)


def test_hatch_processor_token_layout_is_row_major():
    """Qwen's image processor + 2x2 merge give tokens row-major over the merged grid (what grid_pool assumes)."""
    ip = tiny_model.build_image_processor()
    Hm, Wm = 6, 8                                     # 192 x 256 image = 6 x 8 merged tokens of 32 x 32 px
    a = np.zeros((Hm * 32, Wm * 32, 3), np.uint8)
    for r in range(Hm):
        for c in range(Wm):
            a[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] = (20 * r, 20 * c, 128)
    out = ip(images=[Image.fromarray(a)], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, Hm * 2, Wm * 2]]
    pv = out["pixel_values"].reshape(Hm * Wm, 4, 3, -1)                  # (token, merge^2 patches, C, t*p*p)
    rgb = ((pv.mean(dim=(1, 3)) * 0.5 + 0.5) * 255).round()               # undo mean = std = 0.5
    for k in range(Hm * Wm):
        r, c = divmod(k, Wm)
        assert rgb[k, 0] == pytest.approx(20 * r, abs=1) and rgb[k, 1] == pytest.approx(20 * c, abs=1)


def test_hatch_pasta_loss_aligned_lower_than_shuffled():
    g = torch.Generator().manual_seed(0)
    f1 = torch.randn(16, 32, generator=g)
    f2 = f1 + 0.1 * torch.randn(16, 32, generator=g)
    corr = np.arange(16)
    corr[[3, 7]] = -1
    aligned = pasta.pasta_loss(f1, f2, corr)
    shuffled = pasta.pasta_loss(f1, f2[torch.randperm(16, generator=g)], corr)
    assert float(aligned) < 0.1 < float(shuffled)
    # cells without a correspondence do not count
    f2b = f2.clone()
    f2b[3] = -f1[3] * 5 + 1
    assert float(pasta.pasta_loss(f1, f2b, np.r_[np.full(4, -1), np.arange(4, 16)])) == pytest.approx(
        float(pasta.pasta_loss(f1, f2, np.r_[np.full(4, -1), np.arange(4, 16)])), abs=1e-3)
    # no correspondence at all: 0, graph intact
    f1g = f1.clone().requires_grad_(True)
    z = pasta.pasta_loss(f1g, f2, np.full(16, -1))
    assert float(z.detach()) == 0.0
    z.backward()
    assert f1g.grad is not None and float(f1g.grad.abs().sum()) == 0.0
    # the loss is trainable: a few gradient steps on free features lower it
    x = torch.randn(16, 8, generator=g, requires_grad=True)
    y = torch.randn(16, 8, generator=g)
    opt = torch.optim.SGD([x], lr=0.5)
    first = float(pasta.pasta_loss(x, y, np.arange(16)).detach())
    for _ in range(20):
        opt.zero_grad()
        pasta.pasta_loss(x, y, np.arange(16)).backward()
        opt.step()
    assert float(pasta.pasta_loss(x, y, np.arange(16)).detach()) < first

# -----------------------------------------------------------------------------
# PaStA on the tiny Qwen3-VL


@pytest.fixture(scope="module")
def hatch_tiny(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hatch_tiny"))
    tiny_model.main(["--out", out, "--warmup-steps", "0"])
    model, tokenizer, image_processor = grpo.load_policy(out)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 255, (640, 480, 3), dtype=np.uint8))]
    enc = grpo.encode(tokenizer, image_processor, make_tasks.build_prompt(3, 4, actor=True), imgs)
    return model, enc


def test_hatch_image_token_features_tiny(hatch_tiny):
    model, enc = hatch_tiny
    merge = model.model.visual.spatial_merge_size
    counts = (enc["image_grid_thw"].prod(-1) // merge ** 2).tolist()
    assert counts == [48, 48] and enc["image_grid_thw"].tolist() == [[1, 12, 16], [1, 16, 12]]
    with torch.no_grad():
        out = model.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                          mm_token_type_ids=enc["mm_token_type_ids"], pixel_values=enc["pixel_values"],
                          image_grid_thw=enc["image_grid_thw"], output_hidden_states=True, use_cache=False)
        mask = enc["input_ids"][0] == model.config.image_token_id
        assert int(mask.sum()) == sum(counts)
        for layer in (0, 1):
            feats = pasta.image_token_features(model, enc, layer)
            assert [tuple(f.shape) for f in feats] == [(c, model.config.text_config.hidden_size) for c in counts]
            # layer k = HF's hidden_states[k] at the image pads, image 1's tokens first
            assert torch.allclose(torch.cat(feats), out.hidden_states[layer][0][mask], atol=1e-5)
        assert not torch.allclose(feats[0], pasta.image_token_features(model, enc, 0)[0])
        with pytest.raises(ValueError):
            pasta.image_token_features(model, enc, 99)


def test_hatch_pasta_term_tiny(hatch_tiny):
    model, enc = hatch_tiny
    meta = dict(width1=640, height1=480, width2=480, height2=640)
    d1 = hatch_grid_points(640, 480, 16)
    arrays = dict(dense1=d1.astype(np.float32), dense2=(d1 * 0.75).astype(np.float32))  # smaller region of view 2
    model.zero_grad()
    loss, stats = pasta.pasta_term(model, enc, arrays, meta, n=4, layer=0)
    assert math.isfinite(stats["pasta_loss"]) and stats["pasta_loss"] > 0 and stats["pasta_cells"] == 16
    assert 0 <= stats["pasta_acc"] <= 1
    loss.backward()
    grads = [p.grad for p in model.model.visual.merger.parameters()]
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)
    model.zero_grad()
    loss, stats = pasta.pasta_term(model, enc, dict(dense1=np.zeros((0, 2)), dense2=np.zeros((0, 2))), meta,
                                   layer=1)
    assert stats["pasta_loss"] == 0 and stats["pasta_cells"] == 0 and math.isnan(stats["pasta_acc"])
    loss.backward()  # graph intact with nothing to align
    model.zero_grad()

# -----------------------------------------------------------------------------
# ActoR: canonical actions from the pose


def hatch_pose(M, centre):
    """Camera 2's orientation M (its axes in camera-1 coords) and centre -> the pool's (R, t), x2 = R x1 + t."""
    R = np.asarray(M).T
    return R.tolist(), (-R @ np.asarray(centre, float)).tolist()


def hatch_project(R, t, X1):
    x = np.asarray(R) @ np.asarray(X1, float) + np.asarray(t)
    return x[:2] / x[2]


def test_hatch_actions_known_poses_follow_geometry():
    ahead = (0, 0, 5)                                            # a scene point straight ahead of camera 1
    # camera turns right by 30 degrees: a point ahead of camera 1 appears LEFT of centre in image 2
    R, t = hatch_pose(hatch_rot_y(30), (0, 0, 0))
    assert hatch_project(R, t, ahead)[0] < 0
    a = reward.canonical_actions(R, t)
    assert (a["yaw"], a["pitch"], a["roll"], a["move"]) == (30, 0, 0, "stay")
    assert "yaw right 30" in reward.format_actions(a)
    # camera tilts up by 15: the point ahead appears LOWER (y down) in image 2
    R, t = hatch_pose(hatch_rot_x(15), (0, 0, 1))
    assert hatch_project(R, t, ahead)[1] > 0
    assert reward.format_actions(reward.canonical_actions(R, t)) == \
        "<action>\nyaw 0, pitch up 15, roll 0, move forward\n</action>"
    # camera rolls clockwise (as the photographer sees it) by 45: the scene turns counter-clockwise in image 2,
    # so a point right of centre in image 1 moves up
    R, t = hatch_pose(hatch_rot_z(45), (0, 0, 0))
    p = hatch_project(R, t, (1, 0, 5))
    assert p[0] > 0 and p[1] < 0
    assert "roll cw 45" in reward.format_actions(reward.canonical_actions(R, t))
    # combined: yaw left 60, pitch down 30, roll ccw 15 (intrinsic yaw-pitch-roll), camera moved to the left
    R, t = hatch_pose(hatch_rot_y(-60) @ hatch_rot_x(-30) @ hatch_rot_z(-15), (-2, 0.3, 0.5))
    assert reward.format_actions(reward.canonical_actions(R, t)) == \
        "<action>\nyaw left 60, pitch down 30, roll ccw 15, move left\n</action>"
    for centre, word in (((0, 0, -1), "back"), ((0, -1, 0.2), "up"), ((0.1, 2, 0), "down"), ((3, 0, 1), "right")):
        assert reward.canonical_actions(*hatch_pose(np.eye(3), centre))["move"] == word
    # quantisation with another step, and the +-180 wrap
    a = reward.canonical_actions(*hatch_pose(hatch_rot_y(37), (0, 0, 1)), step_deg=10)
    assert a["yaw"] == 40 and a["yaw_exact"] == pytest.approx(37)
    assert reward.canonical_actions(*hatch_pose(hatch_rot_y(-179), (0, 0, 1)))["yaw"] == 180


def test_hatch_actions_random_poses_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(300):
        yaw, pitch, roll = rng.uniform(-170, 170), rng.uniform(-80, 80), rng.uniform(-170, 170)
        M = hatch_rot_y(yaw) @ hatch_rot_x(pitch) @ hatch_rot_z(roll)
        R, t = hatch_pose(M, rng.normal(size=3))
        a = reward.canonical_actions(R, t)
        assert (a["yaw_exact"], a["pitch_exact"], a["roll_exact"]) == pytest.approx((yaw, pitch, roll), abs=1e-6)
        text = "Let me think.\n" + reward.format_actions(a) + "\n<answer>\n1: A\n</answer>"
        p = reward.parse_actions(text)
        assert p == {k: a[k] for k in ("yaw", "pitch", "roll", "move")}
        assert reward.action_reward(text, R, t)["action"] == 1.0
        assert reward.parse_answer(text, 1, 1) == {1: "A"}   # the answer parser accepts the action block before


def test_hatch_action_reward_wrong_actions_score_lower():
    R, t = hatch_pose(hatch_rot_y(45) @ hatch_rot_x(-30) @ hatch_rot_z(30), (0.2, 0.1, 1.0))
    good = reward.canonical_actions(R, t)
    assert reward.action_reward(reward.format_actions(good), R, t)["action"] == 1.0
    cases = [(dict(yaw=-good["yaw"]), "yaw_ok"), (dict(pitch=-good["pitch"]), "pitch_ok"),
             (dict(roll=-good["roll"]), "roll_ok"), (dict(move="back"), "move_ok"), (dict(move="left"), "move_ok"),
             (dict(move="stay"), "move_ok"), (dict(yaw=good["yaw"] + 30), "yaw_ok")]
    for change, bad_key in cases:
        d = reward.action_reward(reward.format_actions(dict(good, **change)), R, t)
        assert d[bad_key] == 0.0 and d["action"] == 0.75, change
    # one step off is within the default tolerance (15 degrees) of the exact angle 45
    assert reward.action_reward(reward.format_actions(dict(good, yaw=good["yaw"] + 15)), R, t)["yaw_ok"] == 1.0
    assert reward.action_reward(reward.format_actions(dict(good, yaw=good["yaw"] + 15)), R, t,
                                tol_deg=5)["yaw_ok"] == 0.0
    # move tolerance: a near tie accepts both axes, a clear winner only itself
    R2, t2 = hatch_pose(np.eye(3), (1.0, 0, 0.95))
    base = dict(yaw=0, pitch=0, roll=0)
    assert reward.action_reward(reward.format_actions(dict(base, move="forward")), R2, t2)["move_ok"] == 1.0
    assert reward.action_reward(reward.format_actions(dict(base, move="right")), R2, t2)["move_ok"] == 1.0
    R3, t3 = hatch_pose(np.eye(3), (1.0, 0, 0.5))
    assert reward.action_reward(reward.format_actions(dict(base, move="forward")), R3, t3)["move_ok"] == 0.0
    # "stay" only for a pure rotation
    R4, t4 = hatch_pose(hatch_rot_y(15), (0, 0, 0))
    assert reward.action_reward(reward.format_actions(dict(base, yaw=15, move="stay")), R4, t4)["action"] == 1.0
    # missing / malformed block scores 0
    assert reward.action_reward("<answer>\n1: A\n</answer>", R, t)["action"] == 0.0


@pytest.mark.parametrize("text", [
    "<action>\nyaw right 30, pitch down 15, roll 0, move forward\n</action>",
    "<ACTION>Yaw Right 30°; pitch DOWN 15 deg\nroll 0 ; move Forwards</action>",
    "<action>\nmove forward\nroll 0\npitch down 15 degrees\nyaw right 30\n</action>\n<answer>\n</answer>",
    "<action> yaw  right   30.0 ,pitch down 15, roll counterclockwise 0, move forward </action>",
])
def test_hatch_parse_actions_tolerant(text):
    assert reward.parse_actions(text) == dict(yaw=30.0, pitch=-15.0, roll=0.0, move="forward")


@pytest.mark.parametrize("text", [
    "yaw right 30, pitch down 15, roll 0, move forward",                                   # no block
    "<action>\nyaw right 30, pitch down 15, roll 0\n</action>",                           # move missing
    "<action>\nyaw right 30, yaw left 15, pitch 0, roll 0, move forward\n</action>",      # yaw twice
    "<action>\nyaw -30, pitch down 15, roll 0, move forward\n</action>",                  # sign as a number
    "<action>\nyaw 30, pitch down 15, roll 0, move forward\n</action>",                   # no direction word
    "<action>\nyaw up 30, pitch down 15, roll 0, move forward\n</action>",                # wrong word for yaw
    "<action>\nyaw right 30, pitch down 120, roll 0, move forward\n</action>",            # pitch > 90
    "<action>\nyaw right 200, pitch down 15, roll 0, move forward\n</action>",            # yaw > 180
    "<action>\nyaw right 30, pitch down 15, roll 0, move sideways\n</action>",            # unknown move
    "<action>\nyaw right 30, pitch down 15, roll 0, move forward, then stop\n</action>",  # extra item
    "<action>a</action><action>\nyaw right 30, pitch down 15, roll 0, move forward\n</action>",  # two blocks
    "<answer>\n1: A\n</answer>\n<action>\nyaw right 30, pitch down 15, roll 0, move forward\n</action>",  # after
    "</action>yaw right 30, pitch down 15, roll 0, move forward<action>",                 # reversed tags
])
def test_hatch_parse_actions_malformed(text):
    assert reward.parse_actions(text) is None


def test_hatch_parsers_never_raise_fuzz():
    rnd = random.Random(0)
    pieces = ["<action>", "</action>", "<answer>", "</answer>", "< action >", "yaw", "pitch", "roll", "move", "left",
              "right", "up", "down", "cw", "ccw", "forward", "back", "stay", "0", "15", "90", "180", "999", "1e9",
              "12.5", "-", ",", ";", "\n", " ", ":", "°", "deg", "1", "A", "none", "\x00", "é", "→", "∅", "..."]
    R, t = hatch_pose(hatch_rot_y(20), (0, 0, 1))
    valid = "ok\n<action>\nyaw right 30, pitch down 15, roll ccw 45, move forward\n</action>\n<answer>\n1: A\n</answer>"
    parsed = 0
    for k in range(10000):
        if k % 2:  # random token soup
            text = "".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 30)))
        else:      # a valid completion with a few characters replaced, inserted or deleted
            chars = list(valid)
            for _ in range(rnd.randint(1, 3)):
                i = rnd.randrange(len(chars))
                op = rnd.random()
                if op < 0.4:
                    chars[i] = rnd.choice(pieces)
                elif op < 0.7:
                    chars.insert(i, rnd.choice(pieces))
                else:
                    del chars[i]
            text = "".join(chars)
        p = reward.parse_actions(text)
        assert p is None or set(p) == {"yaw", "pitch", "roll", "move"}
        parsed += p is not None
        reward.parse_answer(text, 3, 4)
        d = reward.action_reward(text, R, t)
        assert 0.0 <= d["action"] <= 1.0
    assert 100 < parsed < 9000  # the mutations reach both outcomes
    for bad in (None, 5, b"<action>", "<action>" * 10 ** 5):
        assert reward.parse_actions(bad) is None


def test_hatch_score_with_action_weight():
    R, t = hatch_pose(hatch_rot_y(-30), (0, 0, 1))
    task = dict(task_id="t", n=2, m=3, target=["B", None], R=R, t=t)
    answer = reward.format_answer({1: "B", 2: None})
    act = reward.format_actions(reward.canonical_actions(R, t))
    good = "Reasoning.\n" + act + "\n" + answer
    # w_action = 0: exactly the old behaviour (same dict as without the argument)
    assert reward.score(good, task, w_action=0.0) == reward.score(good, task)
    assert "action" not in reward.score(good, task)
    d = reward.score(good, task, w_action=0.5)
    assert (d["format"], d["match"], d["action"], d["reward"]) == (1.0, 1.0, 1.0, 2.5)
    d = reward.score(answer, task, w_action=0.5)                 # no action block: no action reward
    assert (d["action"], d["reward"]) == (0.0, 2.0)
    d = reward.score(act + "\n<answer>\n1: B\n</answer>\nmore", task, w_action=0.5)  # malformed answer, action ok
    assert (d["format"], d["match"], d["action"], d["reward"]) == (0.0, 0.0, 1.0, 0.5)
    d = reward.score(good, dict(task, R=None, t=None), w_action=0.5)  # pose unknown: nothing added
    assert d["action"] is None and d["reward"] == 2.0

# -----------------------------------------------------------------------------
# ActoR prompts in make_tasks.py


def test_hatch_actor_prompt_and_task(tmp_path):
    plain = make_tasks.build_prompt(4, 6)
    p = make_tasks.build_prompt(4, 6, actor=True)
    assert make_tasks.build_prompt(4, 6, actor=False) == plain and p != plain
    assert reward.action_instructions(15) in p and p.endswith(reward.ANSWER_INSTRUCTIONS)
    assert p.index("<action>") < p.index("<answer>") and "1 to 4" in p and "A to F" in p
    assert "Then give the camera motion and your final answer." in p
    assert "multiples of 10" in make_tasks.build_prompt(4, 6, actor=True, action_step=10)
    # make_task passes actor through (a minimal fake pair: 6 matched keypoints, one per cluster)
    for k in (1, 2):
        Image.new("RGB", (320, 240), (90, 90, 90)).save(tmp_path / f"im{k}.png")
    kp = np.array([[40, 40], [160, 40], [280, 40], [40, 200], [160, 200], [280, 200]], np.float32)
    arrays = dict(kp1=kp, kp2=kp[::-1].copy(), match=np.arange(6, dtype=np.int32)[::-1].copy(),
                  cluster=np.arange(6, dtype=np.int32), cluster2=np.arange(6, dtype=np.int32)[::-1].copy())
    pair = dict(pair_id="p/0", source="scannet", scene="s", scene_type="indoor", split="test", bin=1, delta_v=0.5,
                image1="im1.png", image2="im2.png", width1=320, height1=240, width2=320, height2=240,
                K1=np.eye(3).tolist(), K2=np.eye(3).tolist(), R=np.eye(3).tolist(), t=[0, 0, 1])
    for actor in (False, True):
        task, _ = make_tasks.make_task(pair, arrays, "L1", "sparse", 3, np.random.default_rng(0), str(tmp_path),
                                       max_side=320, actor=actor)
        assert task["actor"] is actor and task["prompt"] == make_tasks.build_prompt(task["n"], task["m"], actor=actor)
    assert make_tasks.parse_args(["--actor"]).actor and not make_tasks.parse_args([]).actor

# -----------------------------------------------------------------------------
# PaStA + ActoR wired into grpo.py (a tiny synthetic pool, the random tiny model)


@pytest.fixture(scope="module")
def hatch_grpo_env(tmp_path_factory):
    d = tmp_path_factory.mktemp("hatch_grpo")
    synthetic.main(["--out", str(d / "demo_data"), "--frames", "6", "--image-scale", "0.5",
                    "--layouts", "scannet,co3d"])
    build_pool.main(["--scannet", str(d / "demo_data" / "scannet"), "--co3d", str(d / "demo_data" / "co3d"),
                     "--out", str(d / "pool"), "--max-pairs-per-scene", "8", "--min-matches", "10",
                     "--num-bins", "2"])
    tiny_model.main(["--out", str(d / "tiny"), "--warmup-steps", "0"])
    return d


def test_hatch_grpo_pasta_actor_run_logs_both_terms(hatch_grpo_env, tmp_path):
    d = hatch_grpo_env
    grpo.main(["--model", str(d / "tiny"), "--pool", str(d / "pool"), "--out", str(tmp_path), "--steps", "2",
               "--group-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "8", "--eval-every", "0",
               "--save-every", "100", "--pasta-weight", "0.1", "--actor"])
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert math.isfinite(m["pasta"]) and m["pasta"] > 0 and math.isfinite(m["action"]) and 0 <= m["action"] <= 1
        assert m["curriculum_events"] == []
    rollouts = [json.loads(line) for line in open(tmp_path / "rollouts.jsonl")]
    assert len(rollouts) == 8 and all(r["action"] is not None for r in rollouts)  # synthetic pairs have poses


def hatch_grad_of_pasta(d, weight):
    """Vision-tower gradients of one train_on call whose GRPO part is exactly zero (equal rewards, no KL)."""
    model, tok, ip = grpo.load_policy(str(d / "tiny"))
    pairs = [p for p in make_tasks.load_pairs(str(d / "pool"), "train")]
    rng = np.random.default_rng(0)
    samples = []
    for pair in pairs[:2]:
        task, images = grpo.task_for_pair(pair, str(d / "pool"), "L1", "sparse", rng, 320, actor=True)
        enc = grpo.encode(tok, ip, task["prompt"], images)
        samples += [dict(enc=enc, task=task, token_ids=[20, 21, 22], logprobs=[0.0] * 3, reward=1.0)] * 2
    args = argparse.Namespace(group_size=2, micro_batch=4, pad_id=tok.pad_token_id, temperature=1.0, kl_beta=0.0,
                              clip_eps=0.2, ppo_epochs=1, debug_grad_dump="x", max_grad_norm=0, pasta_weight=weight,
                              pasta_grid=4, pasta_layer=0, pasta_tau=0.1, pool=str(d / "pool"))
    model.train()
    stats, _ = grpo.train_on(samples, model, None, None, args, "cpu", 1, lambda: torch.autocast("cpu", enabled=False),
                             {p["pair_id"]: p for p in pairs})
    grads = [p.grad for p in model.model.visual.blocks[0].parameters()]
    return [0.0 if g is None else float(g.abs().sum()) for g in grads], stats


def test_hatch_pasta_term_reaches_vision_tower(hatch_grpo_env):
    on, stats = hatch_grad_of_pasta(hatch_grpo_env, 0.1)
    assert all(g > 0 for g in on) and stats["pasta_sum"] > 0 and stats["pasta_acc_n"] >= 1
    off, stats = hatch_grad_of_pasta(hatch_grpo_env, 0.0)
    assert all(g == 0 for g in off) and stats["pasta_sum"] == 0  # zero advantages: GRPO alone gives no gradient


def test_hatch_pasta_gradient_same_for_1_process_and_torchrun_2(hatch_grpo_env, tmp_path):
    """The PaStA term is normalised by the GLOBAL prompt count and runs through the FSDP2-registered method."""
    d, here = hatch_grpo_env, os.path.dirname(os.path.abspath(__file__))
    common = ["--model", str(d / "tiny"), "--pool", str(d / "pool"), "--eval-every", "0", "--group-size", "2",
              "--prompts-per-step", "2", "--max-new-tokens", "8", "--toy-reward", "--kl-beta", "0.1", "--steps", "1",
              "--pasta-weight", "0.5", "--actor"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, os.path.join(here, "grpo.py"), *common, "--out", str(tmp_path / "a"),
                    "--micro-batch", "1", "--debug-grad-dump", str(tmp_path / "g1.pt")],
                   check=True, cwd=here, env=env, capture_output=True)
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node=2",
                    os.path.join(here, "grpo.py"), *common, "--out", str(tmp_path / "b"), "--micro-batch", "8",
                    "--debug-grad-dump", str(tmp_path / "g2.pt")], check=True, cwd=here, env=env, capture_output=True)
    g1, g2 = torch.load(tmp_path / "g1.pt"), torch.load(tmp_path / "g2.pt")
    vision = [n for n in g1 if "visual.blocks.0." in n]
    assert vision and all(float(g1[n].abs().sum()) > 0 for n in vision)
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-6), n
