import gzip
import json
import os
import struct
import zlib

import cv2
import numpy as np
import pycolmap
import pytest

import synthetic


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
