"""Tests for build_pool.py: geometry against the synthetic renderer, bad input, .sens == export, splits, bins."""
import gzip
import json
import os
import shutil
import struct

import numpy as np
import pytest

import build_pool
import synthetic

POOL_FRAMES = 12


@pytest.fixture(scope="module")
def pool_demo(tmp_path_factory):
    """Synthetic data (2 scenes per layout) and one pool over all sources, built once for the module."""
    root = tmp_path_factory.mktemp("pool_demo")
    data, pool = str(root / "demo_data"), str(root / "pool")
    synthetic.main(["--out", data, "--scenes", "2", "--frames", str(POOL_FRAMES)])
    build_pool.main(["--scannet", f"{data}/scannet", "--colmap", f"{data}/colmap", "--co3d", f"{data}/co3d",
                     "--out", pool, "--max-pairs-per-scene", "0", "--workers", "1"])
    with open(os.path.join(pool, "pairs.jsonl")) as f:
        pairs = [json.loads(line) for line in f]
    return dict(root=str(root), data=data, pool=pool, pairs=pairs, meta=synthetic.load_meta(data))


def pool_load(pool, pair):
    with np.load(os.path.join(pool, pair["npz"])) as z:
        return {k: z[k] for k in z.files}


def pool_surface_points(scene, frame, kp):
    """Renderer ground truth: the first surface hit along the ray through each pixel."""
    K, T = np.array(frame["K"]), np.array(frame["cam_to_world"])
    rays = (np.c_[kp, np.ones(len(kp))] @ np.linalg.inv(K).T) @ T[:3, :3].T
    t = synthetic.raycast(scene, np.broadcast_to(T[:3, 3], rays.shape).copy(), rays)
    return T[:3, 3] + t[:, None] * rays, np.isfinite(t)


def pool_project(frame, X):
    K, T = np.array(frame["K"]), np.array(frame["cam_to_world"])
    Xc = (X - T[:3, 3]) @ T[:3, :3]
    z = Xc[:, 2]
    p = (Xc @ K.T)[:, :2] / np.where(np.abs(z) > 1e-12, z, 1e-12)[:, None]
    return p, z


def pool_visible(scene, frame, X, tol=1e-3):
    """Is each 3D point inside the image, in front of the camera and the first surface along its ray (up to a
    relative distance tol)?"""
    p, z = pool_project(frame, X)
    w, h = frame["width"], frame["height"]
    inside = (z > 0) & (p[:, 0] >= -0.5) & (p[:, 0] <= w - 0.5) & (p[:, 1] >= -0.5) & (p[:, 1] <= h - 0.5)
    T = np.array(frame["cam_to_world"])
    t = synthetic.raycast(scene, np.broadcast_to(T[:3, 3], X.shape).copy(), X - T[:3, 3])
    return inside & (t >= 1 - tol)


def pool_frame_meta(meta, data, pair, which):
    sc, fr = synthetic.find_frame(meta, pair[f"image{which}"])
    fr = dict(fr)
    fr.setdefault("width", pair[f"width{which}"])
    fr.setdefault("height", pair[f"height{which}"])
    return sc, fr


def test_pool_matches_reproject_and_distractors_invisible(pool_demo):
    scenes = {}
    worst, checked, n_dist = 0.0, 0, 0
    for pair in pool_demo["pairs"]:
        sc, f1 = pool_frame_meta(pool_demo["meta"], pool_demo["data"], pair, 1)
        _, f2 = pool_frame_meta(pool_demo["meta"], pool_demo["data"], pair, 2)
        key = (sc["seed"], sc["kind"])
        scene = scenes.setdefault(key, synthetic.make_scene(*key))
        a = pool_load(pool_demo["pool"], pair)
        m = a["match"]
        assert 10 <= (m >= 0).sum() <= 50
        assert len(np.unique(m[m >= 0])) == (m >= 0).sum()
        # every stored match: the surface point behind kp1 lands on kp2 within 1 px and is visible there
        X1, hit = pool_surface_points(scene, f1, a["kp1"][m >= 0])
        assert hit.all()
        p2, _ = pool_project(f2, X1)
        err = np.linalg.norm(p2 - a["kp2"][m[m >= 0]], axis=1)
        worst = max(worst, err.max())
        # visible in I2 up to the depth tolerance (a surface < 3% closer, e.g. at a contact seam, cannot be
        # told apart from the point itself by a depth test)
        assert pool_visible(scene, f2, X1, tol=0.03).all(), pair["pair_id"]
        # no distractor of either side is visible in the other image
        Xd1, hit1 = pool_surface_points(scene, f1, a["kp1"][m < 0])
        assert hit1.all() and not pool_visible(scene, f2, Xd1).any(), pair["pair_id"]
        free2 = np.setdiff1d(np.arange(len(a["kp2"])), m[m >= 0])
        Xd2, hit2 = pool_surface_points(scene, f2, a["kp2"][free2])
        assert hit2.all() and not pool_visible(scene, f1, Xd2).any(), pair["pair_id"]
        # dense matches too (a sample keeps the test fast)
        Xs, _ = pool_surface_points(scene, f1, a["dense1"][:100])
        ps, _ = pool_project(f2, Xs)
        assert np.linalg.norm(ps - a["dense2"][:100], axis=1).max() < 1.0
        checked += int((m >= 0).sum())
        n_dist += int((m < 0).sum() + len(free2))
    assert worst < 1.0 and checked > 1000 and n_dist > 1000


def test_pool_contract_fields_and_arrays(pool_demo):
    pairs = pool_demo["pairs"]
    assert {p["source"] for p in pairs} == {"scannet", "co3d", "colmap"}
    types = {p["source"]: p["scene_type"] for p in pairs}
    assert types == {"scannet": "indoor", "co3d": "object", "colmap": "outdoor"}
    for p in pairs:
        assert abs(p["overlap"] + p["delta_v"] - 1) < 1e-9 and 1 <= p["bin"] <= 10
        a = pool_load(pool_demo["pool"], p)
        n1, n2 = len(a["kp1"]), len(a["kp2"])
        assert a["kp1"].dtype == np.float32 and a["match"].dtype == np.int32 and a["cluster2"].shape == (n2,)
        assert a["cluster"].shape == (n1,) and a["dense1"].shape == a["dense2"].shape
        assert p["n_matches"] == (a["match"] >= 0).sum() and p["n_dist1"] + p["n_matches"] == n1
        assert p["n_dist2"] + p["n_matches"] == n2
        for kp, w, h in ((a["kp1"], p["width1"], p["height1"]), (a["kp2"], p["width2"], p["height2"])):
            assert (kp >= -0.5).all() and (kp[:, 0] <= w - 0.5).all() and (kp[:, 1] <= h - 0.5).all()
        # the matched points of both images share cluster ids; distractors keep a few px from kept matches
        m = a["match"]
        assert np.array_equal(a["cluster"][m >= 0], a["cluster2"][m[m >= 0]])
        d = np.linalg.norm(a["kp1"][m < 0][:, None] - a["kp1"][m >= 0][None], axis=2)
        assert d.size == 0 or d.min() >= 6.0 - 1e-4
        # R, t map camera 1 to camera 2 (checked against the renderer's poses)
        _, f1 = pool_frame_meta(pool_demo["meta"], pool_demo["data"], p, 1)
        _, f2 = pool_frame_meta(pool_demo["meta"], pool_demo["data"], p, 2)
        T = np.linalg.inv(np.array(f2["cam_to_world"])) @ np.array(f1["cam_to_world"])
        assert np.allclose(p["R"], T[:3, :3], atol=1e-5) and np.allclose(p["t"], T[:3, 3], atol=1e-4)
    splits = {(p["source"], p["scene"]): p["split"] for p in pairs}
    for src in ("scannet", "co3d", "colmap"):
        assert {s for (so, _), s in splits.items() if so == src} == {"train", "test"}


def test_pool_delta_v_spread_and_bins_per_source(pool_demo):
    with open(os.path.join(pool_demo["pool"], "summary.json")) as f:
        summary = json.load(f)
    for src in ("scannet", "co3d", "colmap"):
        dv = np.array([p["delta_v"] for p in pool_demo["pairs"] if p["source"] == src])
        assert dv.min() < 0.3 and dv.max() > 0.8, (src, dv.min(), dv.max())
        bins = np.array([p["bin"] for p in pool_demo["pairs"] if p["source"] == src])
        order = np.argsort(dv, kind="stable")
        assert (np.diff(bins[order]) >= 0).all()  # bins follow delta_v within a source
        assert set(bins) == set(range(1, 11))
        assert summary["sources"][src]["pairs"] == len(dv)
    assert summary["pairs"] == len(pool_demo["pairs"]) and summary["pairs_per_second"] > 0


def test_pool_omega_decreases_as_camera_moves_away(pool_demo):
    entry = next(e for e in pool_demo["meta"]["scenes"] if e["layout"] == "scannet")
    scene = build_pool.ScanNetExported(os.path.join(pool_demo["data"], entry["path"]))
    params = dict(depth_step=2, depth_rel_tol=0.03, occlusion_margin=0.1, photo_check=True, photo_tol=1.0)
    f0 = scene.load("0")
    omegas = [build_pool.match_rgbd(f0, scene.load(str(k)), params)["omega"] for k in range(0, 5)]
    assert omegas[0] > 0.97  # a frame against itself
    assert omegas[0] > omegas[1] > omegas[2] >= omegas[3] >= omegas[4], omegas


def test_pool_match_rgbd_on_rendered_frames():
    """match_rgbd straight on renderer output: a sideways step keeps most pixels; turning away loses them."""
    scene = synthetic.make_scene(3, "indoor")
    K = np.array([[300.0, 0, 159.5], [0, 300.0, 119.5], [0, 0, 1]])
    eye = np.array([2.0, 2.0, 1.4])

    def frame(eye, yaw):
        T = synthetic.look_at(eye, eye + np.array([np.cos(yaw), np.sin(yaw), -0.2]))
        rgb, depth = synthetic.render(scene, K, T, 320, 240)
        depth = np.where(np.isfinite(depth), depth, 0).astype(np.float32)
        return build_pool.rgbd_frame("x", rgb, depth, K, K, T, None)

    params = dict(depth_step=2, depth_rel_tol=0.03, occlusion_margin=0.1, photo_check=True, photo_tol=1.0)
    a = frame(eye, 0.3)
    om = [build_pool.match_rgbd(a, frame(eye, 0.3 + d), params)["omega"] for d in (0.0, 0.2, 0.5, 0.9, 3.1)]
    assert om[0] > 0.97 and all(x > y for x, y in zip(om, om[1:])) and om[-1] < 0.05, om


def test_pool_sens_equals_exported(pool_demo, tmp_path):
    data = pool_demo["data"]
    common = ["--max-pairs-per-scene", "20", "--workers", "1"]
    build_pool.main(["--scannet", f"{data}/scannet", "--out", str(tmp_path / "a")] + common)
    build_pool.main(["--scannet", f"{data}/scannet_sens", "--out", str(tmp_path / "b")] + common)
    rows = []
    for name in "ab":
        with open(tmp_path / name / "pairs.jsonl") as f:
            rows.append([json.loads(line) for line in f])
    assert len(rows[0]) == len(rows[1]) > 0
    for x, y in zip(*rows):
        assert {k: v for k, v in x.items() if not k.startswith("image")} == \
            {k: v for k, v in y.items() if not k.startswith("image")}
        ax, ay = pool_load(str(tmp_path / "a"), x), pool_load(str(tmp_path / "b"), y)
        assert all(np.array_equal(ax[k], ay[k]) for k in ax)
        for k in ("image1", "image2"):  # .sens frames are written into the pool as their original bytes
            assert not os.path.isabs(y[k])
            with open(x[k], "rb") as f1, open(tmp_path / "b" / y[k], "rb") as f2:
                assert f1.read() == f2.read()


def test_pool_corrupt_files_are_skipped_and_counted(pool_demo, tmp_path, capsys):
    src = os.path.join(pool_demo["data"], "scannet", "scene0000_00")
    scene = tmp_path / "scannet" / "scene0000_00"
    shutil.copytree(src, scene)
    jpg = scene / "color" / "2.jpg"
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])  # truncated JPEG
    (scene / "depth" / "4.png").write_bytes(b"not a png at all")
    pose = np.loadtxt(scene / "pose" / "6.txt")
    pose[0, 0] = np.nan
    np.savetxt(scene / "pose" / "6.txt", pose)
    (scene / "depth" / "8.png").unlink()
    out = tmp_path / "pool"
    build_pool.main(["--scannet", str(tmp_path / "scannet"), "--out", str(out), "--max-pairs-per-scene", "0",
                     "--workers", "1"])
    err = capsys.readouterr().err
    for bad in ("color/2.jpg", "depth/4.png", "pose/6.txt", "depth/8.png"):
        assert bad in err
    with open(out / "summary.json") as f:
        s = json.load(f)
    assert s["frames_skipped"] == {"corrupt image": 1, "corrupt depth": 1, "bad pose": 1, "missing depth": 1}
    assert s["pairs_skipped"]["bad frame"] == 4 * (POOL_FRAMES - 1) - 6  # pairs touching any of the 4 frames
    with open(out / "pairs.jsonl") as f:
        used = {json.loads(line)[k] for line in f for k in ("frame1", "frame2")}
    assert used and not used & {"2", "4", "6", "8"}


def test_pool_colmap_missing_image_skipped(pool_demo, tmp_path, capsys):
    scene = tmp_path / "plaza00"
    shutil.copytree(os.path.join(pool_demo["data"], "colmap", "plaza00"), scene)
    (scene / "images" / "000003.jpg").unlink()
    build_pool.main(["--colmap", str(scene), "--colmap-source", "dl3dv", "--out", str(tmp_path / "pool"),
                     "--workers", "1", "--max-pairs-per-scene", "0"])
    assert "000003.jpg" in capsys.readouterr().err
    with open(tmp_path / "pool" / "summary.json") as f:
        s = json.load(f)
    assert s["frames_skipped"] == {"missing image": 1} and "dl3dv" in s["sources"]


def test_pool_bad_paths_exit_with_message(tmp_path):
    with pytest.raises(SystemExit) as e:
        build_pool.main(["--scannet", str(tmp_path / "nope"), "--out", str(tmp_path / "pool")])
    assert "does not exist" in str(e.value) and "--scannet" in str(e.value)
    with pytest.raises(SystemExit) as e:
        build_pool.main(["--co3d", str(tmp_path), "--out", str(tmp_path / "pool")])
    assert "no co3d scenes" in str(e.value)
    with pytest.raises(SystemExit) as e:
        build_pool.main(["--re10k", str(tmp_path), "--out", str(tmp_path / "pool")])
    assert "not implemented" in str(e.value)


def test_pool_test_scenes_file_overrides_split(pool_demo, tmp_path):
    f = tmp_path / "test_scenes.txt"
    f.write_text("scene0001_00\n")
    build_pool.main(["--scannet", f"{pool_demo['data']}/scannet", "--out", str(tmp_path / "p"),
                     "--max-pairs-per-scene", "5", "--test-scenes", str(f), "--workers", "1"])
    with open(tmp_path / "p" / "pairs.jsonl") as fh:
        split = {(r["scene"], r["split"]) for r in map(json.loads, fh)}
    assert split == {("scene0000_00", "train"), ("scene0001_00", "test")}


def test_pool_ndc_to_opencv_matches_synthetic_writer():
    rng = np.random.default_rng(0)
    for w, h in ((360, 480), (640, 480)):
        K = np.array([[410.0, 0, 170.3], [0, 405.0, 251.7], [0, 0, 1]])
        T = synthetic.look_at(rng.normal(size=3) * 2, rng.normal(size=3) * 0.1)
        vp = synthetic.opencv_to_co3d(K, T, w, h)
        R_cw, t_cw, K2 = build_pool.ndc_to_opencv(vp["R"], vp["T"], vp["focal_length"], vp["principal_point"], (w, h))
        assert np.allclose(K2, K) and np.allclose(build_pool.world_to_cam_to_world(R_cw, t_cw), T)


def test_pool_uco3d_blob_decoding_and_depth_intrinsics():
    R = np.arange(9, dtype=np.float32).reshape(3, 3)
    assert np.array_equal(build_pool.unpack_floats(struct.pack("<9f", *R.ravel()), (3, 3)), R)
    assert build_pool.unpack_floats(None) is None
    K = np.array([[500.0, 0, 319.5], [0, 500.0, 239.5], [0, 0, 1]])
    Kd = build_pool.depth_intrinsics_from_colour(K, (640, 480), (320, 240))
    # colour pixel (x, y) and depth pixel see the same ray: centres map as x_d = (x_c + 0.5) / 2 - 0.5
    xc = np.array([0.0, 100.0, 639.0])
    assert np.allclose((xc - K[0, 2]) / K[0, 0], (((xc + 0.5) / 2 - 0.5) - Kd[0, 2]) / Kd[0, 0])


def test_pool_find_co3d_single_sequence(pool_demo):
    cat = os.path.join(pool_demo["data"], "co3d", "synthobject")
    with gzip.open(os.path.join(cat, "frame_annotations.jgz"), "rt") as f:
        seqs = sorted({a["sequence_name"] for a in json.load(f)})
    found = build_pool.find_co3d(os.path.join(cat, seqs[1]))
    assert [s[1] for s in found] == [seqs[1]] and len(build_pool.find_co3d(cat)) == 2
