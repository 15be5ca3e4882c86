"""The dataset readers of build_pool.py: ScanNet (exported folders and raw .sens), CO3D v2, uCO3D, COLMAP models
and RealEstate10K (triangulated from its known poses first), behind one small interface.

    gather_tasks(args, scenes_skipped) -> [(source, name_out, kind, spec, None)], one per scene (the find_* of
        each --SOURCE flag; unreadable index files are warned about and counted, a missing root exits)
    open_scene(source, kind, spec, params, frames_skipped) -> a scene with (params: the build's vars(args), which
        RE10K reads; frames_skipped: a Counter that readers skipping frames while opening add to)
        .name        its name (pool paths, pair ids, the split hash; task_scene(task): source/name, before opening)
        .frame_ids   frame ids (str) in trajectory order
        .load(fid)   one frame dict: id, K (3x3, OpenCV pixels: centres at integers), width, height, and image (a
                     path) or jpeg (bytes that build_pool.py copies into pool/images/); then
                     RGB-D (scannet, co3d, uco3d; see rgbd_frame): rgb, depth (metres, 0 = invalid), Kd (the depth
                     map's K), cam_to_world (4x4, OpenCV axes), depth_mask (None or bool), or
                     SfM (colmap, re10k; see ColmapScene.load): xy (n, 2) observations, pid (n,) their landmark ids,
                     X (n, 3) the landmarks, R, t (world to camera)
A missing or corrupt file raises BadInput(reason, message): the message names the file, the reason is the count
summary.json reports; a scene that cannot be opened is skipped, and so is a frame that cannot be loaded.
Each source's layout and conversions: docs/build_pool.md, "Inputs".
"""
import collections
import gzip
import io
import json
import math
import os
import shutil
import sqlite3
import struct
import sys
import zlib

import cv2
import numpy as np
from PIL import Image

PROG = "build_pool.py"  # the command these messages come from
SCENE_TYPE = {"scannet": "indoor", "co3d": "object", "uco3d": "object"}  # colmap / re10k: from a flag
SCENE_TYPES = ("indoor", "object", "outdoor")  # --scene-types overrides per scene
RGBD = tuple(SCENE_TYPE)  # verified by depth reprojection (match_rgbd); the others by SfM landmarks (match_sfm)


class BadInput(Exception):
    """A frame's file is missing or corrupt: the message names the file and what is wrong."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


def warn(message):
    print(f"{PROG}: warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# Small readers shared by the sources

def read_jpeg(data, name):
    """Decode image bytes to RGB uint8; PIL raises on truncated files where OpenCV would silently pad grey."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise BadInput("corrupt image", f"{name}: cannot decode image ({e})")


def read_image_file(path):
    if not os.path.isfile(path):
        raise BadInput("missing image", f"{path}: image file missing")
    with open(path, "rb") as f:
        return read_jpeg(f.read(), path)


def read_png16(path, what="depth"):
    if not os.path.isfile(path):
        raise BadInput(f"missing {what}", f"{path}: {what} file missing")
    d = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if d is None or d.dtype != np.uint16 or d.ndim != 2:
        raise BadInput(f"corrupt {what}", f"{path}: not a single-channel 16-bit PNG")
    return d


def read_matrix(path, shape=(4, 4)):
    try:
        m = np.loadtxt(path, dtype=np.float64)
    except (OSError, ValueError) as e:
        raise BadInput("bad pose", f"{path}: cannot read matrix ({e})")
    if m.size != np.prod(shape):
        raise BadInput("bad pose", f"{path}: expected {shape} matrix, got {m.shape}")
    return m.reshape(shape)


def check_pose(cam_to_world, name):
    if not np.all(np.isfinite(cam_to_world)):
        raise BadInput("bad pose", f"{name}: pose has -inf/NaN (lost tracking)")
    return cam_to_world


def depth_intrinsics_from_colour(K, colour_wh, depth_wh):
    """Rescale colour intrinsics to a depth map of another size, pixel centres at integer coordinates."""
    sx, sy = depth_wh[0] / colour_wh[0], depth_wh[1] / colour_wh[1]
    Kd = K.astype(np.float64).copy()
    Kd[0, 0] *= sx
    Kd[1, 1] *= sy
    Kd[0, 2] = sx * (K[0, 2] + 0.5) - 0.5
    Kd[1, 2] = sy * (K[1, 2] + 0.5) - 0.5
    return Kd


def ndc_to_opencv(R, T, focal, principal, image_wh):
    """PyTorch3D NDC-isotropic camera (X_view = X_world @ R + T; +X left, +Y up) -> OpenCV (R_cv, t_cv, K) with
    x_cam = R_cv X_world + t_cv, as pytorch3d.utils.opencv_from_cameras_projection."""
    R = np.asarray(R, np.float64).reshape(3, 3)
    T = np.asarray(T, np.float64).reshape(3)
    w, h = float(image_wh[0]), float(image_wh[1])
    scale = min(w, h) / 2.0
    f = np.broadcast_to(np.asarray(focal, np.float64).reshape(-1), (2,))
    p = np.asarray(principal, np.float64).reshape(2)
    fx, fy = f * scale
    cx, cy = -p[0] * scale + w / 2.0, -p[1] * scale + h / 2.0
    R_p = R.copy()
    R_p[:, :2] *= -1
    t_cv = T.copy()
    t_cv[:2] *= -1
    K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
    return R_p.T, t_cv, K


def world_to_cam_to_world(R_cw, t_cw):
    T = np.eye(4)
    T[:3, :3] = R_cw.T
    T[:3, 3] = -R_cw.T @ t_cw
    return T


def rgbd_frame(fid, rgb, depth, K, Kd, cam_to_world, image, depth_mask=None, jpeg=None):
    """The frame dict match_rgbd works on. depth in metres (0 = invalid), K for colour, Kd for depth."""
    return dict(id=str(fid), rgb=rgb, depth=depth.astype(np.float32), K=np.asarray(K, np.float64),
                Kd=np.asarray(Kd, np.float64), cam_to_world=np.asarray(cam_to_world, np.float64),
                image=image, jpeg=jpeg, depth_mask=depth_mask, width=rgb.shape[1], height=rgb.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# ScanNet: exported folders and raw .sens

def as_exported(m):
    """Canonical ScanNet matrix: float32 (as the .sens stores it) printed with "%f" (as SensReader's text export
    writes it) and read back. Applied to both inputs, .sens and exported folders give the identical pool."""
    return np.array([float(f"{x:f}") for x in np.asarray(m, np.float32).ravel()]).reshape(np.shape(m))


class ScanNetExported:
    def __init__(self, path):
        self.path, self.name = path, os.path.basename(os.path.normpath(path))
        ids = [os.path.splitext(f)[0] for f in os.listdir(os.path.join(path, "color")) if f.endswith(".jpg")]
        self.frame_ids = sorted((i for i in ids if i.isdigit()), key=int)
        self.K = as_exported(read_matrix(os.path.join(path, "intrinsic", "intrinsic_color.txt"))[:3, :3])
        self.Kd = as_exported(read_matrix(os.path.join(path, "intrinsic", "intrinsic_depth.txt"))[:3, :3])

    def load(self, fid):
        pose_path = os.path.join(self.path, "pose", f"{fid}.txt")
        pose = check_pose(as_exported(read_matrix(pose_path)), pose_path)
        image = os.path.join(self.path, "color", f"{fid}.jpg")
        rgb = read_image_file(image)
        depth = read_png16(os.path.join(self.path, "depth", f"{fid}.png")).astype(np.float32) / 1000.0
        return rgbd_frame(fid, rgb, depth, self.K, self.Kd, pose, os.path.abspath(image))


class ScanNetSens:
    """Streaming reader for ScanNet's .sens format (see ScanNet's SensReader/python/SensorData.py)."""

    def __init__(self, path, frames_skipped=None):
        self.path = path
        self.name = os.path.splitext(os.path.basename(path))[0]
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            try:
                version, = struct.unpack("<I", f.read(4))
                if version != 4:
                    raise BadInput("corrupt sens", f"{path}: unsupported .sens version {version}")
                n, = struct.unpack("<Q", f.read(8))
                f.read(n)  # sensor name
                mats = as_exported(np.frombuffer(f.read(16 * 4 * 4), np.float32).reshape(4, 4, 4))
                self.K, self.Kd = mats[0][:3, :3], mats[2][:3, :3]
                color_comp, depth_comp = struct.unpack("<ii", f.read(8))
                cw, ch, dw, dh = struct.unpack("<IIII", f.read(16))
                self.depth_shift, = struct.unpack("<f", f.read(4))
                num_frames, = struct.unpack("<Q", f.read(8))
                if color_comp != 2 or depth_comp != 1:
                    raise BadInput("corrupt sens", f"{path}: need JPEG colour and zlib depth "
                                   f"(got compression types {color_comp}, {depth_comp})")
                self.depth_wh = (dw, dh)
                # index pass: remember where each complete frame record starts, skip the blobs. A file cut short
                # (an interrupted download) keeps its complete frames: the first incomplete record ends the index.
                self.offsets = []
                for _ in range(num_frames):
                    start = f.tell()
                    head = f.read(64 + 32)
                    if len(head) < 96:
                        break
                    cs, ds = struct.unpack("<QQ", head[80:96])
                    if start + 96 + cs + ds > size:
                        break
                    self.offsets.append(start)
                    f.seek(cs + ds, 1)
            except (struct.error, ValueError) as e:  # a short read fails to unpack or to reshape
                raise BadInput("corrupt sens", f"{path}: truncated header ({e})")
        if len(self.offsets) < num_frames:
            warn(f"{path}: file ends inside frame {len(self.offsets)} (header says {num_frames} frames); "
                 f"keeping the {len(self.offsets)} complete frames")
            if frames_skipped is not None:
                frames_skipped["truncated sens"] += num_frames - len(self.offsets)
        self.frame_ids = [str(i) for i in range(len(self.offsets))]

    def load(self, fid):
        with open(self.path, "rb") as f:
            f.seek(self.offsets[int(fid)])
            head = f.read(96)
            pose = as_exported(np.frombuffer(head[:64], np.float32).reshape(4, 4))
            cs, ds = struct.unpack("<QQ", head[80:96])
            jpeg, zdepth = f.read(cs), f.read(ds)
        name = f"{self.path} frame {fid}"
        check_pose(pose, name)
        if len(jpeg) < cs or len(zdepth) < ds:
            raise BadInput("corrupt sens", f"{name}: truncated frame record")
        rgb = read_jpeg(jpeg, name)
        try:
            raw = zlib.decompress(zdepth)
        except zlib.error as e:
            raise BadInput("corrupt depth", f"{name}: cannot inflate depth ({e})")
        dw, dh = self.depth_wh
        if len(raw) != dw * dh * 2:
            raise BadInput("corrupt depth", f"{name}: depth has {len(raw)} bytes, expected {dw * dh * 2}")
        depth = np.frombuffer(raw, np.uint16).reshape(dh, dw).astype(np.float32) / self.depth_shift
        return rgbd_frame(fid, rgb, depth, self.K, self.Kd, pose, None, jpeg=jpeg)


def find_scannet(path):
    if os.path.isfile(path) and path.endswith(".sens"):
        return [("sens", path)]
    if os.path.isdir(os.path.join(path, "color")):
        return [("exported", path)]
    found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".sens"))
    if found:
        return [("sens", p) for p in found]
    out = []
    for d in sorted(os.listdir(path)):
        sub = os.path.join(path, d)
        if os.path.isdir(sub):
            if os.path.isdir(os.path.join(sub, "color")):
                out.append(("exported", sub))
            else:
                out += [("sens", os.path.join(sub, f)) for f in sorted(os.listdir(sub)) if f.endswith(".sens")]
    return out


# ----------------------------------------------------------------------------------------------------------------
# CO3D v2

CO3D_FIELDS = (("frame_number",), ("image", "path"), ("image", "size"), ("depth", "path"),
               ("depth", "scale_adjustment"), ("viewpoint", "R"), ("viewpoint", "T"), ("viewpoint", "focal_length"),
               ("viewpoint", "principal_point"))


class CO3DSequence:
    def __init__(self, spec):
        self.root, self.name, annots = spec[:3]
        source = spec[3] if len(spec) > 3 else "frame_annotations.jgz"
        for a in annots:  # a malformed entry makes the sequence unreadable: one warning naming the file
            for keys in CO3D_FIELDS:
                v = a
                for k in keys:
                    v = v.get(k) if isinstance(v, dict) else None
                if v is None:
                    raise BadInput("corrupt annotations", f"{source}: sequence {self.name} frame "
                                   f"{a.get('frame_number') if isinstance(a, dict) else '?'} has no {'.'.join(keys)}")
        self.frames = {str(a["frame_number"]): a for a in annots}
        self.frame_ids = sorted(self.frames, key=int)

    def load(self, fid):
        a = self.frames[fid]
        h, w = a["image"]["size"]
        vp = a["viewpoint"]
        if vp.get("intrinsics_format", "ndc_isotropic") != "ndc_isotropic":
            raise BadInput("bad pose", f"{self.name} frame {fid}: intrinsics_format {vp['intrinsics_format']}")
        R_cw, t_cw, K = ndc_to_opencv(vp["R"], vp["T"], vp["focal_length"], vp["principal_point"], (w, h))
        image = os.path.join(self.root, a["image"]["path"])
        rgb = read_image_file(image)
        if rgb.shape[:2] != (h, w):
            raise BadInput("corrupt image", f"{image}: size {rgb.shape[1]}x{rgb.shape[0]}, annotation says {w}x{h}")
        dpath = os.path.join(self.root, a["depth"]["path"])
        depth = read_png16(dpath).view(np.float16).astype(np.float32) * float(a["depth"]["scale_adjustment"])
        depth[~np.isfinite(depth)] = 0
        mask = None
        if a["depth"].get("mask_path"):
            mpath = os.path.join(self.root, a["depth"]["mask_path"])
            m = cv2.imread(mpath, cv2.IMREAD_GRAYSCALE)
            if m is None or m.shape != depth.shape:
                raise BadInput("corrupt depth", f"{mpath}: unreadable depth mask or wrong size")
            mask = m > 0
        Kd = depth_intrinsics_from_colour(K, (w, h), (depth.shape[1], depth.shape[0]))
        return rgbd_frame(fid, rgb, depth, K, Kd, world_to_cam_to_world(R_cw, t_cw), os.path.abspath(image),
                          depth_mask=mask)


def find_co3d(path, scenes_skipped=None):
    """Scenes (sequences) under a CO3D root, a category folder, or a single sequence folder. An unreadable
    frame_annotations.jgz skips its category with one warning (counted in scenes_skipped)."""
    if os.path.isfile(os.path.join(path, "frame_annotations.jgz")):
        cats, only = [path], None
    elif os.path.isfile(os.path.join(os.path.dirname(os.path.normpath(path)), "frame_annotations.jgz")):
        cats, only = [os.path.dirname(os.path.normpath(path))], os.path.basename(os.path.normpath(path))
    else:
        cats = [os.path.join(path, d) for d in sorted(os.listdir(path))
                if os.path.isfile(os.path.join(path, d, "frame_annotations.jgz"))]
        only = None
    out = []
    for cat in cats:
        fa = os.path.join(cat, "frame_annotations.jgz")
        try:
            with gzip.open(fa, "rt") as f:
                annots = json.load(f)
            if not isinstance(annots, list) or not all(isinstance(a, dict) and "sequence_name" in a for a in annots):
                raise ValueError("not a list of frame annotations with sequence_name")
        except (OSError, EOFError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            warn(f"{fa}: cannot read ({e}); skipping category")
            if scenes_skipped is not None:
                scenes_skipped["corrupt annotations"] += 1
            continue
        by_seq = collections.defaultdict(list)
        for a in annots:
            by_seq[a["sequence_name"]].append(a)
        root = os.path.dirname(os.path.normpath(cat))
        out += [(root, s, by_seq[s], fa) for s in sorted(by_seq) if only is None or s == only]
    return out


# ----------------------------------------------------------------------------------------------------------------
# uCO3D (released layout: metadata.sqlite + per-sequence videos and depth_maps.h5)

def unpack_floats(blob, shape=None):
    """uCO3D's sqlite stores tuples/matrices as struct-packed float32 bytes."""
    if blob is None:
        return None
    a = np.frombuffer(blob, dtype="<f4").astype(np.float64)
    return a.reshape(shape) if shape else a


class UCO3DSequence:
    def __init__(self, spec):
        self.root, self.name, self.video, self.depth_h5, rows = spec
        self.frames = {str(r["frame_number"]): r for r in rows}
        self.frame_ids = sorted(self.frames, key=int)

    def load(self, fid):
        import h5py  # optional dependency, checked in gather_tasks
        r = self.frames[fid]
        h, w = struct.unpack("<ii", r["_image_size"])
        R_cw, t_cw, K = ndc_to_opencv(unpack_floats(r["_viewpoint_R"], (3, 3)), unpack_floats(r["_viewpoint_T"]),
                                      unpack_floats(r["_viewpoint_focal_length"]),
                                      unpack_floats(r["_viewpoint_principal_point"]), (w, h))
        bgr = read_video_frame(os.path.join(self.root, self.video), float(r["frame_timestamp"]), (w, h))
        dist = unpack_floats(r["_viewpoint_colmap_distortion_coeffs"])
        if dist is not None and np.any(dist != 0):  # undistort as uCO3D's loader does
            newK, _ = cv2.getOptimalNewCameraMatrix(K, dist, (w, h), 0.0, (w, h))
            bgr = cv2.undistort(bgr, K, dist, None, newK)
            K = newK
        dpath = os.path.join(self.root, self.depth_h5)
        try:
            with h5py.File(dpath, "r") as f:
                depth = f[str(int(fid) + 1)][:].astype(np.float32).squeeze()
        except (OSError, KeyError) as e:
            raise BadInput("corrupt depth", f"{dpath}: frame {fid} ({e})")
        depth *= float(r["_depth_scale_adjustment"] or 1.0)
        depth[~np.isfinite(depth)] = 0
        Kd = depth_intrinsics_from_colour(K, (w, h), (depth.shape[1], depth.shape[0]))
        ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
        return rgbd_frame(fid, np.ascontiguousarray(bgr[..., ::-1]), depth, K, Kd,
                          world_to_cam_to_world(R_cw, t_cw), None, jpeg=jpeg.tobytes())


def read_video_frame(video, timestamp, size):
    """The BGR frame of video at timestamp (seconds). Its decoded size must be the annotation's `_image_size`
    (w, h): uCO3D's own loader raises on a mismatch, so the frame is an error (skipped), never silently resized
    (the cameras are for the annotated size)."""
    cap = cv2.VideoCapture(video)
    cap.set(cv2.CAP_PROP_POS_MSEC, timestamp * 1000)
    ok, bgr = cap.read()
    cap.release()
    if not ok:
        raise BadInput("corrupt image", f"{video}: cannot read frame at {timestamp} s")
    if bgr.shape[:2] != (size[1], size[0]):
        raise BadInput("frame size mismatch", f"{video}: frame at {timestamp} s decodes to {bgr.shape[1]}x"
                       f"{bgr.shape[0]}, the annotation's _image_size is {size[0]}x{size[1]}")
    return bgr


def find_uco3d(path, scenes_skipped=None):
    root, only = path, None
    while not os.path.isfile(os.path.join(root, "metadata.sqlite")):
        parent = os.path.dirname(os.path.normpath(root))
        if parent == root:
            sys.exit(f"{PROG}: error: --uco3d {path}: no metadata.sqlite here or in a parent folder")
        only, root = only or os.path.basename(os.path.normpath(path)), parent
    db = os.path.join(root, "metadata.sqlite")
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    rows = collections.defaultdict(list)
    try:
        seqs = {r["sequence_name"]: (r["_video_path"], r["_depth_video_path"])
                for r in con.execute("SELECT sequence_name, _video_path, _depth_video_path FROM sequence_annots")}
        for r in con.execute("SELECT * FROM frame_annots"):
            rows[r["sequence_name"]].append(dict(r))
    except (sqlite3.DatabaseError, IndexError) as e:  # not a database, a missing table or column
        warn(f"{db}: cannot read metadata ({e}); skipping uco3d")
        if scenes_skipped is not None:
            scenes_skipped["corrupt metadata"] += 1
        return []
    finally:
        con.close()
    return [(root, s, *seqs[s], rows[s]) for s in sorted(rows)
            if s in seqs and (only is None or s == only) and seqs[s][1]]


# ----------------------------------------------------------------------------------------------------------------
# COLMAP models

class ColmapScene:
    def __init__(self, spec):
        self.name, self.sparse, self.images = spec
        # images_N (DL3DV, Mip-NeRF 360): the images are the model's resolution divided by N
        suffix = os.path.basename(os.path.normpath(self.images)).rpartition("_")[2]
        self.downscale = int(suffix) if suffix.isdigit() and int(suffix) > 0 else 1
        import pycolmap
        for part in ("cameras", "images", "points3D"):  # name the missing file, not just the folder
            if not any(os.path.isfile(os.path.join(self.sparse, f"{part}.{e}")) for e in ("bin", "txt")):
                raise BadInput("corrupt model", f"{os.path.join(self.sparse, part)}.bin: missing (no .txt either)")
        try:
            rec = pycolmap.Reconstruction(self.sparse)
        except (RuntimeError, ValueError) as e:
            raise BadInput("corrupt model", f"{self.sparse}: cannot read COLMAP model ({e})")
        self.xyz = {pid: p.xyz for pid, p in rec.points3D.items()}
        posed = sorted((im for im in rec.images.values() if im.has_pose), key=lambda im: im.name)
        sizes = {}  # camera id -> (w, h) of its images in this folder
        for im in posed:
            if im.camera_id not in sizes:
                sizes[im.camera_id] = self.image_size(rec.cameras[im.camera_id], [i for i in posed
                                                                                   if i.camera_id == im.camera_id])
        self.frames = {}
        for im in posed:
            cam = rec.cameras[im.camera_id]
            pose = im.cam_from_world()
            pts = im.points2D
            # COLMAP puts the first pixel's centre at 0.5 (2D points and principal point alike); OpenCV at 0. Images
            # downscaled by f (DL3DV's images_4: f = 4) map COLMAP x to OpenCV (x_colmap / f) - 0.5, which is the
            # pixel-centre-correct (x_opencv_full + 0.5) / f - 0.5; f per axis is the exact ratio of the sizes
            # (a resizer resamples the whole image onto the smaller grid, also when the size does not divide evenly).
            w, h = sizes[im.camera_id]
            sx, sy = cam.width / w, cam.height / h
            xy = np.array([p.xy for p in pts], np.float64).reshape(-1, 2) / [sx, sy] - 0.5
            pid = np.array([p.point3D_id if p.has_point3D() else -1 for p in pts], np.int64)
            K = np.array(cam.calibration_matrix(), np.float64)
            K[0] /= sx
            K[1] /= sy
            K[:2, 2] -= 0.5
            self.frames[im.name] = dict(id=im.name, K=K, width=w, height=h, model_wh=(cam.width, cam.height),
                                        R=pose.rotation.matrix(), t=np.asarray(pose.translation), xy=xy, pid=pid,
                                        image=os.path.abspath(os.path.join(self.images, im.name)))
        self.frame_ids = sorted(self.frames)

    def image_size(self, cam, images):
        """(w, h) of one camera's images in this folder. At the model's resolution (no _N suffix) the camera's
        size. In images_N each axis is floor(full / N) (ffmpeg, PIL's thumbnail) or round(full / N) (ImageMagick):
        the first of the camera's images that exists says which (a header read); a size that is neither stops the
        scene (a wrong N would scale every point wrongly)."""
        if self.downscale == 1:
            return cam.width, cam.height
        cands = [sorted({full // self.downscale, math.floor(full / self.downscale + 0.5)})
                 for full in (cam.width, cam.height)]
        path = next((p for p in (os.path.join(self.images, im.name) for im in images) if os.path.isfile(p)), None)
        if path is None:  # no image at all: each load() names its missing file
            return cands[0][-1], cands[1][-1]
        with Image.open(path) as img:
            size = img.size
        if size[0] not in cands[0] or size[1] not in cands[1]:
            raise BadInput("image size mismatch", self.size_error(os.path.abspath(path), size, cam, cands))
        return size

    def size_error(self, path, size, cam, cands):
        expect = " or ".join(f"{w}x{h}" for w, h in dict.fromkeys(zip(*[(c[0], c[-1]) for c in cands])))
        return (f"{path}: image is {size[0]}x{size[1]}, but the model's camera is "
                f"{cam.width}x{cam.height} / {self.downscale} = {expect} (floor or round; "
                f"from the folder name {os.path.basename(self.images)})")

    def load(self, fid):
        f = dict(self.frames[fid])
        rgb = read_image_file(f["image"])  # checks the image decodes; geometry comes from the model
        if rgb.shape[:2] != (f["height"], f["width"]):
            if self.downscale != 1:  # the camera's size was read from another of its images
                raise BadInput("image size mismatch", f"{f['image']}: image is {rgb.shape[1]}x{rgb.shape[0]}, but "
                               f"the other images of its camera in {os.path.basename(self.images)} are "
                               f"{f['width']}x{f['height']} (the model's {f['model_wh'][0]}x{f['model_wh'][1]} / "
                               f"{self.downscale})")
            raise BadInput("corrupt image", f"{f['image']}: size {rgb.shape[1]}x{rgb.shape[0]} != camera "
                           f"{f['width']}x{f['height']}")
        valid = f["pid"] >= 0
        f["xy"], f["pid"] = f["xy"][valid], f["pid"][valid]
        f["pid"], first = np.unique(f["pid"], return_index=True)  # one observation per landmark
        f["xy"] = f["xy"][first]
        f["X"] = np.array([self.xyz[p] for p in f["pid"]], np.float64).reshape(-1, 3)
        return f


def find_colmap(path, images=None):
    """(name, model folder, image folder) per scene; images: the image folder's name (--colmap-images)."""
    def model_dir(scene):
        for cand in ("sparse/0", "sparse", "colmap/sparse/0"):
            d = os.path.join(scene, cand)
            if any(os.path.isfile(os.path.join(d, f"cameras.{e}")) for e in ("bin", "txt")):
                return d
        return None

    def images_dir(scene):
        if images:
            return os.path.join(scene, images)
        for cand in ("images", "dense/images"):
            if os.path.isdir(os.path.join(scene, cand)):
                return os.path.join(scene, cand)
        return os.path.join(scene, "images")

    if model_dir(path):
        scenes = [path]
    else:
        scenes = [os.path.join(path, d) for d in sorted(os.listdir(path)) if model_dir(os.path.join(path, d))]
    return [(os.path.basename(os.path.normpath(s)), model_dir(s), images_dir(s)) for s in scenes]


# ----------------------------------------------------------------------------------------------------------------
# RealEstate10K: camera txt files + frames -> a COLMAP model triangulated from the known poses

RE10K_IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def read_re10k(path):
    """(url, frames) from a RealEstate10K camera file: the first line is the YouTube URL, then one line per frame
    `timestamp_us fx fy cx cy k1 k2 r00 r01 r02 t0 r10 ... t2`: intrinsics divided by the image width (fx, cx)
    and height (fy, cy), then the 3x4 row-major world-to-camera [R|t] (OpenCV axes). frames: list of
    (timestamp str, normalised (fx, fy, cx, cy), w2c (3, 4))."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput("bad camera file", f"{path}: cannot read ({e})")
    frames = []
    for n, line in enumerate(lines[1:], start=2):
        v = line.split()
        if not v:
            continue
        try:
            x = np.array(v[1:], np.float64)
            int(v[0])
        except ValueError as e:
            raise BadInput("bad camera file", f"{path}:{n}: not a camera line ({e})")
        if len(x) != 18:
            raise BadInput("bad camera file", f"{path}:{n}: expected timestamp + 18 numbers, got {len(v)} fields")
        frames.append((v[0], x[:4], x[6:].reshape(3, 4)))
    if not frames:
        raise BadInput("bad camera file", f"{path}: no camera lines")
    return lines[0].strip(), frames


def re10k_intrinsics(norm, width, height):
    """OpenCV K in pixels from RE10K's normalised (fx, fy, cx, cy). RE10K normalises with the image's top-left
    CORNER at (0, 0) (pixelSplat's and real_estate_10k_tools' loaders agree), so cx * W is COLMAP's principal point
    (first pixel centre at 0.5) and OpenCV's (pixel centres at integers) is cx * W - 0.5: cx = 0.5 is the centre."""
    fx, fy, cx, cy = norm
    return np.array([[fx * width, 0, cx * width - 0.5], [0, fy * height, cy * height - 0.5], [0, 0, 1.0]])


def find_re10k(path, frames_root=None):
    """Clips (name, camera txt, frame folder or None) under ROOT/<split>/<clip>.txt or ROOT/<clip>.txt, or one
    <clip>.txt. Frames are looked up in FRAMES/<split>/<clip>/, then FRAMES/<clip>/ (FRAMES = --re10k-frames,
    else the folder of the txt's split root)."""
    if os.path.isfile(path):
        txts, root = [path], os.path.dirname(os.path.abspath(path))
    else:
        root = path
        txts = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".txt")]
        for d in sorted(os.listdir(path)):
            if os.path.isdir(os.path.join(path, d)):
                txts += [os.path.join(path, d, f) for f in sorted(os.listdir(os.path.join(path, d)))
                         if f.endswith(".txt")]
    base = frames_root or root
    out = []
    for txt in txts:
        name = os.path.splitext(os.path.basename(txt))[0]
        split = os.path.relpath(os.path.dirname(os.path.abspath(txt)), os.path.abspath(root))
        cands = [os.path.join(base, split, name), os.path.join(base, name)]
        frames = next((c for c in cands if os.path.isdir(c)), None)
        out.append((name, txt, frames))
    return out


def build_re10k_model(spec, params, frames_skipped):
    """Triangulate one clip with pycolmap from its known cameras: SIFT features, exhaustive (short clips) or
    sequential matching, then points triangulated with cameras and poses held fixed (no pose estimation).
    Work folder: <out>/colmap_re10k/<clip>/ (sparse/ kept for inspection, database.db only with
    --re10k-keep-database). Returns the model folder and the frame folder, for ColmapScene."""
    import pycolmap
    name, txt, frames_dir = spec
    if frames_dir is None:
        raise BadInput("missing image", f"{txt}: no frame folder {name}/ found (see --re10k-frames)")
    _, cams = read_re10k(txt)
    files, size, norm, w2c = [], None, {}, {}
    for ts, intr, P in cams[::params["frame_stride"]]:
        path = next((os.path.join(frames_dir, ts + e) for e in RE10K_IMAGE_EXTS
                     if os.path.isfile(os.path.join(frames_dir, ts + e))), None)
        reason, msg = None, None
        if path is None:
            reason, msg = "missing image", f"{os.path.join(frames_dir, ts)}.png/.jpg: image file missing"
        elif not (np.all(np.isfinite(P)) and np.all(np.isfinite(intr))):
            reason, msg = "bad pose", f"{txt}: frame {ts} has a non-finite camera"
        else:
            try:
                with Image.open(path) as im:  # header only: the size, and that it is an image at all
                    wh = im.size
            except (OSError, SyntaxError, ValueError) as e:
                reason, msg = "corrupt image", f"{path}: cannot decode image ({e})"
            else:
                size = size or wh
                if wh != size:
                    reason, msg = "corrupt image", f"{path}: size {wh[0]}x{wh[1]}, other frames {size[0]}x{size[1]}"
        if reason:
            warn(f"{msg}; skipping frame")
            frames_skipped[reason] += 1
            continue
        fname = os.path.basename(path)
        files.append(fname)
        norm[fname], w2c[fname] = intr, P
    if len(files) < 2:
        raise BadInput("too few frames", f"{txt}: {len(files)} usable frames (need 2)")
    work = os.path.join(params["out"], "colmap_re10k", safe(name))
    if os.path.isdir(work):
        shutil.rmtree(work)  # a previous run's model: always rebuilt, never mixed
    sparse = os.path.join(work, "sparse")
    os.makedirs(sparse)
    db = os.path.join(work, "database.db")
    # COLMAP logs lines per image, and warns that fixed poses leave no gauge to fix; its errors still show
    pycolmap.logging.minloglevel = max(pycolmap.logging.minloglevel, 2)
    threads = max(1, (os.cpu_count() or 1) // max(1, params["workers"]))
    K0 = re10k_intrinsics(norm[files[0]], *size)
    same = all(np.allclose(norm[f], norm[files[0]], rtol=0, atol=1e-9) for f in files)
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = "PINHOLE"
    reader.camera_params = ",".join(str(v) for v in (K0[0, 0], K0[1, 1], K0[0, 2] + 0.5, K0[1, 2] + 0.5))
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.num_threads = threads
    matching = pycolmap.FeatureMatchingOptions()
    matching.num_threads = threads
    verification = pycolmap.TwoViewGeometryOptions()
    verification.ransac.random_seed = params["seed"]
    try:
        pycolmap.extract_features(db, frames_dir, image_names=files,
                                  camera_mode=pycolmap.CameraMode.SINGLE if same else pycolmap.CameraMode.PER_IMAGE,
                                  reader_options=reader, extraction_options=extraction)
        if len(files) <= params["re10k_exhaustive_max"]:
            pycolmap.match_exhaustive(db, matching_options=matching, verification_options=verification)
        else:
            pairing = pycolmap.SequentialPairingOptions()
            pairing.overlap = params["re10k_overlap"]
            pycolmap.match_sequential(db, matching_options=matching, pairing_options=pairing,
                                      verification_options=verification)
        with pycolmap.Database.open(db) as d:
            images = d.read_all_images()
            keypoints = {im.image_id: d.read_keypoints(im.image_id)[:, :2].astype(np.float64) for im in images}
        # the known cameras and poses, under the database's image and camera ids
        rec = pycolmap.Reconstruction()
        for im in sorted(images, key=lambda im: im.image_id):
            if not rec.exists_camera(im.camera_id):
                K = re10k_intrinsics(norm[im.name], *size)
                rec.add_camera_with_trivial_rig(pycolmap.Camera(
                    camera_id=im.camera_id, model="PINHOLE", width=size[0], height=size[1],
                    params=[K[0, 0], K[1, 1], K[0, 2] + 0.5, K[1, 2] + 0.5]))
            P = w2c[im.name]
            rec.add_image_with_trivial_frame(
                pycolmap.Image(name=im.name, keypoints=keypoints[im.image_id], camera_id=im.camera_id,
                               image_id=im.image_id),
                pycolmap.Rigid3d(pycolmap.Rotation3d(P[:, :3]), P[:, 3]))
        options = pycolmap.IncrementalPipelineOptions()
        options.random_seed = params["seed"]
        options.triangulation.merge_max_reproj_error = params["re10k_max_reproj_error"]
        options.triangulation.complete_max_reproj_error = params["re10k_max_reproj_error"]
        options.mapper.filter_max_reproj_error = params["re10k_max_reproj_error"]
        model = pycolmap.triangulate_points(rec, db, frames_dir, sparse, options=options, refine_intrinsics=False)
    except (RuntimeError, ValueError) as e:
        raise BadInput("colmap failed", f"{txt}: pycolmap could not triangulate the clip ({e})")
    lost = sorted(set(files) - {im.name for im in images})
    for f in lost:  # COLMAP could not read it although its header looked fine
        warn(f"{os.path.join(frames_dir, f)}: COLMAP could not read the image; skipping frame")
        frames_skipped["corrupt image"] += 1
    if not params["re10k_keep_database"]:
        os.remove(db)
    if model.num_points3D() == 0:
        raise BadInput("colmap failed", f"{txt}: no point could be triangulated (too little texture or overlap)")
    return sparse, frames_dir


class RE10KClip(ColmapScene):
    """A RealEstate10K clip as a COLMAP scene (triangulated first); frames ordered by timestamp."""

    def __init__(self, spec, params, frames_skipped):
        sparse, frames_dir = build_re10k_model(spec, params, frames_skipped)
        super().__init__((spec[0], sparse, frames_dir))
        self.frame_ids = sorted(self.frame_ids, key=lambda f: int(os.path.splitext(f)[0]))


# ----------------------------------------------------------------------------------------------------------------
# The interface: the scenes of each --SOURCE flag, one scene opened

def gather_tasks(args, scenes_skipped):
    """(source, name_out, kind, spec, None) per scene; unreadable index files (a CO3D category's annotations,
    uCO3D's metadata) are warned about and counted in scenes_skipped."""
    tasks = []
    sources = [("scannet", args.scannet, find_scannet), ("co3d", args.co3d, find_co3d),
               ("uco3d", args.uco3d, find_uco3d), ("colmap", args.colmap, lambda p: find_colmap(p, args.colmap_images)),
               ("re10k", args.re10k, lambda p: find_re10k(p, args.re10k_frames))]
    for source, path, finder in sources:
        if path is None:
            continue
        if not os.path.exists(path):
            sys.exit(f"{PROG}: error: --{source} {path} does not exist")
        if source == "uco3d":
            try:
                import h5py  # noqa: F401  (optional: only uCO3D's depth_maps.h5 needs it)
            except ImportError:
                sys.exit(f"{PROG}: error: --uco3d needs the optional package h5py for depth_maps.h5 (pip install h5py)")
        before = sum(scenes_skipped.values())
        found = finder(path, scenes_skipped) if source in ("co3d", "uco3d") else finder(path)
        if not found and sum(scenes_skipped.values()) == before:
            sys.exit(f"{PROG}: error: --{source} {path}: no {source} scenes found there")
        name_out = args.colmap_source if source == "colmap" else source
        for spec in found:
            kind = spec[0] if source == "scannet" else None
            tasks.append((source, name_out, kind, spec[1] if source == "scannet" else spec, None))
    return tasks


def task_scene(task):
    """source/scene of a task, known before the scene is opened (for the shard hash)."""
    source, name_out, kind, spec = task[:4]
    if source == "scannet":
        base = os.path.basename(os.path.normpath(spec))
        return f"{name_out}/{os.path.splitext(base)[0] if kind == 'sens' else base}"
    return f"{name_out}/{spec[0] if source in ('colmap', 're10k') else spec[1]}"


def open_scene(source, kind, spec, params=None, frames_skipped=None):
    """The scene of one task (the contract at the top of this module); raises BadInput if it cannot be read."""
    if source == "re10k":
        return RE10KClip(spec, params, frames_skipped)
    if source == "scannet":
        return ScanNetSens(spec, frames_skipped) if kind == "sens" else ScanNetExported(spec)
    if source == "co3d":
        return CO3DSequence(spec)
    if source == "uco3d":
        return UCO3DSequence(spec)
    return ColmapScene(spec)


def safe(name):
    """A scene or frame name as a file name (pool paths, RE10K work folders)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
