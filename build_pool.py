"""
build_pool.py: turn RGB-D videos and SfM reconstructions into a verified correspondence pool.

For every sampled frame pair of every scene we compute thousands of geometrically verified dense matches,
the overlap score omega (delta_v = 1 - omega, the paper's viewpoint-change measure), a few (10..50)
well-spread matches with spatial cluster ids, and spread-out distractor points on both sides that are verified
to have NO visible counterpart in the other image. Pairs are binned 1..S by delta_v within each source.

Usage (CPU demo, the acceptance command):
    python synthetic.py --out demo_data
    python build_pool.py --scannet demo_data/scannet --colmap demo_data/colmap --co3d demo_data/co3d --out pool
Real data (one machine, scenes in parallel over CPU cores; no GPU is used):
    python build_pool.py --scannet /data/scannet/scans --out pool --frame-stride 10 \
        --max-pairs-per-scene 200 --workers 16
    python build_pool.py --scannet /data/scannet_sens --out pool     # raw .sens files, no export step
    python build_pool.py --co3d /data/co3d --uco3d /data/uco3d --out pool
    python build_pool.py --colmap /data/DL3DV-10K/960P --colmap-images images_4 --colmap-source dl3dv --out pool
Sharded (a cluster, one job per shard; README.md has a SLURM array script):
    python build_pool.py --scannet /data/scannet_sens --out shards/07 --shard 7/64 --workers 32
    python build_pool.py --merge shards/* --out pool      # bins and split over the whole corpus
A shard folder has shard_pairs.jsonl + shard.json (no pairs.jsonl: make_tasks.py refuses it); --merge checks
that it has every shard 0..N-1 of one build made with the same settings, copies pairs/, images/ and colmap_re10k/,
sums the counts, then bins and splits exactly as an unsharded build does (same pairs.jsonl, same npz files: the
per-scene random streams are seeded by source/scene, not by the shard).
    python build_pool.py --re10k /data/re10k --frame-stride 10 --out pool        # triangulates each clip first
CPU demo for RealEstate10K (opt-in synthetic layout, its own folder: a re-run of synthetic.py replaces what
it wrote before; ~10 s for 2 clips x 10 frames):
    python synthetic.py --out demo_re10k --layouts re10k --frames 10
    python build_pool.py --re10k demo_re10k/re10k --out pool_re10k
Every --SOURCE flag takes a dataset root holding many scenes or a single scene.

Inputs, per source
- ScanNet (--scannet): SensReader exports <scene>/color/N.jpg, depth/N.png (uint16 mm, 0 invalid),
  pose/N.txt (4x4 camera-to-world; rows with -inf/NaN = lost tracking -> frame skipped),
  intrinsic/intrinsic_color.txt + intrinsic_depth.txt; or raw <scene>.sens files parsed directly (frames are
  indexed once, then only the needed ones are read; their colour JPEG bytes are copied unchanged into
  pool/images/). Both give the same pool for the same scene.
- CO3D v2 (--co3d): <category>/frame_annotations.jgz, PyTorch3D NDC-isotropic cameras converted to OpenCV
  pixels the way pytorch3d.utils.opencv_from_cameras_projection does, depth PNG = float16 bits * scale_adjustment,
  depth_masks/*.png (>0 valid). One scene = one sequence.
- uCO3D (--uco3d): metadata.sqlite (table frame_annots, struct-packed float32 blobs), per-sequence
  rgb_video.mp4 (frames read with OpenCV at frame_timestamp and undistorted with the stored COLMAP
  distortion as the uCO3D loader does) and depth_maps.h5 (needs the optional package h5py). Frames used are
  written to pool/images/ as JPEG. Not tested end to end (no synthetic writer); the pure conversions are.
- COLMAP (--colmap, name the corpus with --colmap-source dl3dv|re10k|...): <scene>/images/ and
  <scene>/sparse/0/ (or sparse/, colmap/sparse/0) with cameras/images/points3D .bin or .txt, read with pycolmap.
  --colmap-images images_N reads the images from <scene>/images_N/, downscaled N times from the model's
  resolution, as DL3DV-10K ships them (images_4 beside a full-resolution colmap/sparse/0): intrinsics and 2D
  observations are scaled pixel-centre-correct, x = (x_full + 0.5) / N - 0.5 in OpenCV pixels. Each axis of an
  image may be floor(full / N) (ffmpeg, PIL) or round(full / N) (ImageMagick): 587 px / 4 -> 146 or 147; the
  first image of each camera says which (a header read), and each axis is then scaled by the exact ratio of the
  sizes, N_x = full_w / w, N_y = full_h / h. An image whose size is neither stops the scene with one warning
  naming the image, both sizes and N.
- RealEstate10K (--re10k ROOT): camera files ROOT/<split>/<clip>.txt or ROOT/<clip>.txt (or one .txt): a URL
  line, then per frame `timestamp_us fx fy cx cy k1 k2` + a 3x4 row-major world-to-camera [R|t] (OpenCV axes),
  intrinsics divided by the image width (fx, cx) and height (fy, cy), the image's top-left CORNER at (0, 0) (as
  pixelSplat's and real_estate_10k_tools' loaders read them): the OpenCV principal point is cx * W - 0.5.
  Frames as users extract them from the videos, named by timestamp: FRAMES/<split>/<clip>/<timestamp_us>.png|jpg
  or FRAMES/<clip>/<timestamp_us>.png|jpg, FRAMES = --re10k-frames or ROOT. RE10K ships poses but no 3D points,
  so each clip is first triangulated with pycolmap from its known cameras (every --frame-stride-th frame):
  extract_features (one PINHOLE camera with the known intrinsics), match_exhaustive (<= --re10k-exhaustive-max
  frames) or match_sequential, then triangulate_points on a Reconstruction holding the known poses (poses and
  intrinsics fixed, no pose estimation; observations > --re10k-max-reproj-error px from their point dropped).
  The model is written to <out>/colmap_re10k/<clip>/sparse/ (kept for inspection; database.db is deleted
  unless --re10k-keep-database) and read back as a COLMAP scene (SfM rule below). Frames with a missing or
  unreadable image or a non-finite camera are skipped with a warning and counted; a clip with no frame folder
  or no triangulated point is skipped. scene_type is --re10k-scene-type (indoor: RE10K is mostly interiors).

Verification rules
- RGB-D: valid depth pixels of I1 (every --depth-step-th pixel of the depth map) are back-projected with
  the DEPTH intrinsics, moved into camera 2 and projected with camera 2's colour and depth intrinsics. A sample
  with a depth edge (a step > --occlusion-margin) or a hole within --edge-window depth px in I1 is neither a
  match nor a distractor (its depth may belong to the other side of the edge on a misregistered sensor). A point
  is a match when all 4 depth pixels around its projection agree within --depth-rel-tol (relative); with
  --photo-check the colours agree (each image blurred (box 5), normalised per channel (zero mean, unit std: this
  cancels global gain/offset lighting changes between wide-baseline views), largest per-channel difference below
  --photo-tol, loose on purpose); it survives the two-way check: warped back into I1 with I2's own depth
  (bilinear) it lands within --cycle-px of its start, and carried on with I1's depth into I2 again it lands within
  --cycle-px of its match (the residual seen in each image's own pixels); and it is well conditioned: one pixel
  of I1 spans at most --max-stretch pixels of I2 (where a surface is seen grazing in I1 and head-on in I2, a
  sub-pixel depth error moves the match by that factor and no round trip can see it: it is consistent both ways).
  Pixel tolerances are given at 640 px on the long side and scaled with each image (3 px -> 6.1 px at 1296x968):
  depth noise and pose error are angles, so their pixel size grows with the resolution, and tasks are drawn at
  640 px where 3 px is half a marker and far below make_tasks' 20 px --min-sep. omega = matches / valid depth
  samples of I1. A point is a verified distractor when it lands behind camera 2, outside image 2 by more than
  --border-px for its depth and for its depth +- --depth-rel-tol, or behind a clearly closer surface: every depth
  pixel of I2 within --edge-window of its projection is closer by more than --occlusion-margin (0.2: LoFTR's
  relative gap; at 0.1 half of the 10-16.7% band was sensor noise on real ScanNet frames). Anything between (no
  depth in I2, colour disagreement, a gap between --depth-rel-tol and --occlusion-margin, the border band) is
  neither. summary.json "verification" counts what each rule decided. Without --cycle-px, --edge-window,
  --border-px, --max-stretch in its params match_rgbd applies the one-way rule bench.py's loop restates.
- SfM: a match is a landmark observed in both images; omega = shared landmarks / landmarks observed in I1
  (asymmetric, as in the paper). Distractors: observations of I1 whose landmark is not observed in I2 and
  projects outside image 2 or behind camera 2 (and vice versa). COLMAP's 2D points put pixel centres at +0.5;
  we subtract 0.5 (OpenCV convention: pixel centres at integer coordinates).
- Sparse set: N_p is drawn per pair uniformly in --num-points-range (default 10 50, the paper's range; seeded per
  scene; --num-clusters K is the old fixed N_p = K); k-means (k-means++ init) on the matches' pixels in I1 with
  k = min(N_p, matches); per cluster the match nearest its centre is kept (fewer than N_p only when the verified
  overlap cannot supply them; a pair with fewer than 10 is dropped). Distractors: farthest-point sampling
  (up to --max-distractors per side) among candidates at least --min-sep px from every kept match point.
  cluster2 of a kept match is the cluster of its image-1 point; a distractor takes the cluster of the nearest
  kept match point in its own image.

Outputs (pool/): pairs.jsonl (one pair per line; fields in README.md, "Pool"), pairs/<source>/<scene>/<f1>_<f2>.npz
(kp1, kp2, match, cluster, cluster2, dense1, dense2), images/ (only for .sens / video inputs),
colmap_re10k/<clip>/sparse/ (RealEstate10K models), args.json, summary.json (counts per source and bin, pairs
and frames skipped by reason, scenes skipped by reason, what each verification rule decided).
Bad input never stops a corpus build: a truncated .sens keeps its complete frames (one warning naming the file
and the frame where it ends); an unreadable scene (COLMAP model without or with a corrupt images.bin, a CO3D
category's corrupt frame_annotations.jgz or a sequence with malformed entries, a corrupt uCO3D metadata.sqlite, a
.sens cut inside its header) is skipped with one warning naming the file and counted. Split by scene: hash of the scene
name < --test-fraction -> test; a source with >= 2 scenes and no test scene sends its smallest-hash scene to
test; --test-scenes FILE (one scene name a line) overrides (RE10K's own train/test folders are not used);
--test-sources a,b keeps every other source train-only (the paper's benchmark has no CO3D: --test-sources
scannet,uco3d,dl3dv,re10k). scene_type: indoor for ScanNet, object for CO3D / uCO3D, --colmap-scene-type and
--re10k-scene-type for SfM scenes; --scene-types FILE ("scene TYPE" or "source/scene TYPE" a line, like
--test-scenes) overrides any listed scene (DL3DV and RE10K mix indoor and outdoor scenes).

Departures from the paper: delta_v bins are per-source deciles by default (the paper does not say how bins are
cut); the photometric check is a loose normalised-colour test (the paper does not specify it); sparse spread
uses k-means centres; R, t are in metres for RGB-D and in model units for SfM (RE10K: its own arbitrary scale).
RealEstate10K matches are SIFT tracks triangulated from poses that ORB-SLAM estimated, so they are as good as
those poses (the paper does not say how it made RE10K correspondences).
"""

import argparse
import bisect
import collections
import gzip
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import shutil
import sqlite3
import struct
import sys
import time
import zlib

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

PROG = "build_pool.py"
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
# Geometry: verification rules

BORDER = 2.0  # px: the one-way rule's fixed border band (bench.py's loop and match_rgbd without border_px)
REF_SIDE = 640  # px: tasks are drawn at 640 px on the long side; pixel tolerances scale from there


def scaled_px(value, frame):
    """A tolerance given in pixels at REF_SIDE on the long side, in this frame's own pixels."""
    return value * max(frame["width"], frame["height"]) / REF_SIDE


def in_image(p, w, h, border):
    """Pixel centres at integer coordinates: the image spans [-0.5, w - 0.5] x [-0.5, h - 0.5]."""
    lo = -0.5 - border
    return (p[:, 0] >= lo) & (p[:, 0] <= w - 0.5 + border) & (p[:, 1] >= lo) & (p[:, 1] <= h - 0.5 + border)


def relative_pose_rgbd(frame1, frame2):
    """x2 = R x1 + t from camera-to-world poses (OpenCV axes)."""
    T = np.linalg.inv(frame2["cam_to_world"]) @ frame1["cam_to_world"]
    return T[:3, :3], T[:3, 3]


def normalised_colour(frame):
    """Blurred, per-channel standardised colour (cached on the frame) for the loose photometric check."""
    if frame.get("_norm") is None:
        img = cv2.blur(frame["rgb"], (5, 5)).astype(np.float32)
        mean = img.reshape(-1, 3).mean(0)
        std = img.reshape(-1, 3).std(0) + 1e-3
        frame["_norm"] = (img - mean) / std
    return frame["_norm"]


def depth_window(frame, r):
    """(min, max) of the valid depth over the (2r+1)^2 window around every depth pixel; min is 0 and max inf
    where any pixel of the window is invalid. Cached on the frame."""
    key = f"_win{r}"
    if frame.get(key) is None:
        D = frame["depth"]
        valid = (D > 0) & np.isfinite(D)
        if frame["depth_mask"] is not None:
            valid &= frame["depth_mask"]
        kernel = np.ones((2 * r + 1, 2 * r + 1), np.uint8)
        lo = cv2.erode(np.where(valid, D, 0).astype(np.float32), kernel, borderType=cv2.BORDER_REPLICATE)
        hi = cv2.dilate(np.where(valid, D, np.inf).astype(np.float32), kernel, borderType=cv2.BORDER_REPLICATE)
        frame[key] = (lo, hi)
    return frame[key]


def depth_corners(frame, q):
    """The 4 depth pixels around depth-map coordinates q (N, 2) (pixel centres at integers; q clipped into the
    map), in the order (x0, y0), (x1, y0), (x0, y1), (x1, y1) -> (nb (N, 4) float64 depths, valid (N, 4): positive,
    finite and inside the depth mask, corners (y0, x0, y1, x1), fractional position (fx, fy))."""
    D = frame["depth"]
    hd, wd = D.shape
    qx, qy = np.clip(q[:, 0], 0, wd - 1), np.clip(q[:, 1], 0, hd - 1)
    x0, y0 = np.floor(qx).astype(np.int64), np.floor(qy).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, wd - 1), np.minimum(y0 + 1, hd - 1)
    nb = np.stack([D[y0, x0], D[y0, x1], D[y1, x0], D[y1, x1]], 1).astype(np.float64)
    valid = (nb > 0) & np.isfinite(nb)
    if frame["depth_mask"] is not None:
        M = frame["depth_mask"]
        valid &= np.stack([M[y0, x0], M[y0, x1], M[y1, x0], M[y1, x1]], 1)
    return nb, valid, (y0, x0, y1, x1), (qx - x0, qy - y0)


def bilinear_weights(fx, fy):
    """(N, 4) weights of depth_corners' 4 pixels at fractional position (fx, fy)."""
    return np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], 1)


def bilinear_depth(frame, q):
    """Depth at depth-map coordinates q (N, 2), bilinear over the 4 pixels around; 0 where any is invalid."""
    hd, wd = frame["depth"].shape
    ok = (q[:, 0] >= 0) & (q[:, 0] <= wd - 1) & (q[:, 1] >= 0) & (q[:, 1] <= hd - 1)
    nb, valid, _, (fx, fy) = depth_corners(frame, q)
    good = valid.all(1) & ok
    return np.where(good, (np.where(good[:, None], nb, 0) * bilinear_weights(fx, fy)).sum(1), 0.0)


def match_rgbd(frame1, frame2, params):
    """Verify depth samples of frame1 against frame2. Returns omega, the dense matches (colour pixels in both
    images), frame1's verified distractor candidates (no visible counterpart in frame2) and counts per rule.
    params without cycle_px / edge_window / border_px give the one-way rule (what bench.py's loop restates)."""
    step, tol, margin = params["depth_step"], params["depth_rel_tol"], params["occlusion_margin"]
    win = params.get("edge_window", 0)
    d1 = frame1["depth"][::step, ::step]
    valid = (d1 > 0) & np.isfinite(d1)
    if frame1["depth_mask"] is not None:
        valid &= frame1["depth_mask"][::step, ::step]
    v, u = np.nonzero(valid)
    z1 = d1[v, u].astype(np.float64)
    u, v = u * step, v * step  # depth-map pixel coordinates
    n_valid = len(z1)
    if win:  # depth edges of I1 (or holes next to the sample): neither match nor distractor
        lo1, hi1 = depth_window(frame1, win)
        smooth = (lo1[v, u] > 0) & (hi1[v, u] <= lo1[v, u] * (1.0 + margin))
    else:
        smooth = np.ones(n_valid, bool)
    Kd1inv = np.linalg.inv(frame1["Kd"])
    X1 = (np.stack([u, v, np.ones_like(u)], 1) @ Kd1inv.T) * z1[:, None]
    p1 = X1 @ frame1["K"].T
    p1 = p1[:, :2] / p1[:, 2:]
    R, t = relative_pose_rgbd(frame1, frame2)
    X2 = X1 @ R.T + t
    z2 = X2[:, 2]
    front = z2 > 1e-6
    zs = np.where(front, z2, 1.0)
    p2 = (X2 @ frame2["K"].T)[:, :2] / zs[:, None]
    q2 = (X2 @ frame2["Kd"].T)[:, :2] / zs[:, None]
    W2, H2 = frame2["width"], frame2["height"]
    border = scaled_px(params["border_px"], frame2) if params.get("border_px") is not None else BORDER
    inside = front & in_image(p2, W2, H2, 0.0)
    outside = front & ~in_image(p2, W2, H2, border)  # clearly outside: depth noise cannot bring it back in
    if params.get("border_px") is not None:  # ... nor a depth error of --depth-rel-tol either way (a wide
        # baseline moves the projection a lot)
        i = np.nonzero(outside)[0]
        for f in (1.0 - tol, 1.0 + tol):
            Xf = X1[i] * f @ R.T + t
            pf = (Xf @ frame2["K"].T)[:, :2] / np.where(Xf[:, 2:] > 1e-6, Xf[:, 2:], 1.0)
            outside[i[(Xf[:, 2] > 1e-6) & in_image(pf, W2, H2, border)]] = False
    # the 4 depth pixels around the projection in I2 (pixel centres at integer coordinates)
    nb, valid_nb, (y0, x0, y1, x1), (fx2, fy2) = depth_corners(frame2, np.where(inside[:, None], q2, 0.0))
    all_valid = valid_nb.all(1)
    zz = z2[:, None]
    agree = inside & all_valid & (np.abs(nb - zz) <= tol * zz).all(1)
    if win:  # occluded: the whole window around the projection is valid and closer by the margin
        hi2 = depth_window(frame2, win)[1]
        far = np.stack([hi2[y0, x0], hi2[y0, x1], hi2[y1, x0], hi2[y1, x1]], 1).max(1)
        occluded = inside & all_valid & (far < z2 * (1.0 - margin))
    else:
        occluded = inside & all_valid & (nb < zz * (1.0 - margin)).all(1)
    counts = dict(valid=n_valid, edge=int((~smooth).sum()))
    agree &= smooth
    if params["photo_check"] and agree.any():
        n1, n2 = normalised_colour(frame1), normalised_colour(frame2)
        i = np.nonzero(agree)[0]
        a = n1[np.clip(np.rint(p1[i, 1]).astype(int), 0, frame1["height"] - 1),
               np.clip(np.rint(p1[i, 0]).astype(int), 0, frame1["width"] - 1)]
        b = n2[np.clip(np.rint(p2[i, 1]).astype(int), 0, H2 - 1), np.clip(np.rint(p2[i, 0]).astype(int), 0, W2 - 1)]
        bad = i[np.abs(a - b).max(1) > params["photo_tol"]]
        agree[bad] = False
        counts["photo"] = len(bad)
    if params.get("cycle_px") is not None and params["cycle_px"] > 0 and agree.any():
        # two-way check: back-project the I2 pixel with I2's own depth (bilinear over the 4 agreeing pixels)
        # and move it back into I1; it must land within cycle_px of where the sample started
        i = np.nonzero(agree)[0]
        d2 = (nb[i] * bilinear_weights(fx2[i], fy2[i])).sum(1)
        Xb = (np.stack([q2[i, 0], q2[i, 1], np.ones(len(i))], 1) @ np.linalg.inv(frame2["Kd"]).T) * d2[:, None]
        Xb1 = (Xb - t) @ R  # R^T (x - t) for row vectors
        pb = Xb1 @ frame1["K"].T
        err1 = np.linalg.norm(pb[:, :2] / pb[:, 2:] - p1[i], axis=1)
        # and on from there with I1's depth into I2 again: the same residual measured in I2's pixels, where a
        # grazing view of I1 seen head-on in I2 magnifies it (a 0.5 px slip in I1 can be 3 px in I2)
        qb = Xb1 @ frame1["Kd"].T
        qb = qb[:, :2] / np.maximum(qb[:, 2:], 1e-9)
        d1b = bilinear_depth(frame1, qb)
        Xf = (np.c_[qb, np.ones(len(i))] @ Kd1inv.T) * d1b[:, None]
        pf = (Xf @ R.T + t) @ frame2["K"].T
        err2 = np.linalg.norm(pf[:, :2] / np.maximum(pf[:, 2:], 1e-9) - p2[i], axis=1)
        err2[~(d1b > 0)] = np.inf  # no depth at the back-warped point: cannot confirm
        bad = i[(err1 > scaled_px(params["cycle_px"], frame1)) | (err2 > scaled_px(params["cycle_px"], frame2))]
        agree[bad] = False
        counts["cycle"] = len(bad)
    if params.get("max_stretch") and agree.any():
        # conditioning: where one pixel of I1 covers many of I2 (a surface seen grazing in I1, head-on in I2), a
        # sub-pixel slip of I1's depth (misregistration, noise) moves the match by that factor in I2, and a round
        # trip cannot see it (it is consistent both ways). Stretch = largest |dp2| / |dp1| to a grid neighbour.
        gh, gw = d1.shape
        P1 = np.full((gh + 2, gw + 2, 2), np.nan)
        P2 = np.full((gh + 2, gw + 2, 2), np.nan)
        gy, gx = v // step + 1, u // step + 1
        P1[gy, gx] = p1
        P2[gy, gx] = np.where(front[:, None], p2, np.nan)
        i = np.nonzero(agree)[0]
        gy, gx = gy[i], gx[i]
        stretch = np.zeros(len(i))
        for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
            d2n = np.linalg.norm(P2[gy + dy, gx + dx] - p2[i], axis=1)
            d1n = np.linalg.norm(P1[gy + dy, gx + dx] - p1[i], axis=1)
            stretch = np.fmax(stretch, d2n / np.maximum(d1n, 1e-9))
        bad = i[stretch > params["max_stretch"]]
        agree[bad] = False
        counts["stretch"] = len(bad)
    distractor = (~front | outside | occluded) & smooth
    band = inside & all_valid & smooth & ~agree & ~occluded & (np.abs(nb - zz) > tol * zz).any(1)
    counts.update(match=int(agree.sum()), behind=int((~front & smooth).sum()), outside=int((outside & smooth).sum()),
                  occluded=int((occluded & smooth).sum()), neither_gap=int(band.sum()),
                  neither_border=int((front & ~inside & ~outside & smooth).sum()),
                  no_depth2=int((inside & ~all_valid & smooth).sum()))
    return dict(omega=float(agree.sum() / max(n_valid, 1)), n_valid=n_valid,
                p1=p1[agree].astype(np.float32), p2=p2[agree].astype(np.float32),
                dist=p1[distractor].astype(np.float32), R=R, t=t, counts=counts)


def match_sfm(frame1, frame2, params):
    """SfM rule: a match is a landmark observed in both images; omega = shared / observed in I1."""
    shared, i1, i2 = np.intersect1d(frame1["pid"], frame2["pid"], assume_unique=True, return_indices=True)
    R = frame2["R"] @ frame1["R"].T
    t = frame2["t"] - R @ frame1["t"]
    only1 = np.ones(len(frame1["pid"]), bool)
    only1[i1] = False
    X2 = frame1["X"][only1] @ frame2["R"].T + frame2["t"]
    front = X2[:, 2] > 1e-9
    p = (X2 @ frame2["K"].T)[:, :2] / np.where(front, X2[:, 2], 1.0)[:, None]
    border = scaled_px(params["border_px"], frame2) if params.get("border_px") is not None else BORDER
    outside = front & ~in_image(p, frame2["width"], frame2["height"], border)
    distractor = ~front | outside
    return dict(omega=float(len(shared) / max(len(frame1["pid"]), 1)), n_valid=len(frame1["pid"]),
                p1=frame1["xy"][i1].astype(np.float32), p2=frame2["xy"][i2].astype(np.float32),
                dist=frame1["xy"][only1][distractor].astype(np.float32), R=R, t=t,
                counts=dict(valid=len(frame1["pid"]), match=len(shared), behind=int((~front).sum()),
                            outside=int(outside.sum()), occluded=0))


# ----------------------------------------------------------------------------------------------------------------
# Sparse, well-spread selection

def kmeans(x, k, rng, iters=8):
    """Plain k-means with k-means++ init (vectorised; deterministic given rng)."""
    centres = [x[rng.integers(len(x))]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        c = x[rng.choice(len(x), p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(len(x))]
        centres.append(c)
        d2 = np.minimum(d2, ((x - c) ** 2).sum(1))
    C = np.array(centres)
    for _ in range(iters):
        lab = nearest(x, C)
        n = np.bincount(lab, minlength=k)
        sums = np.stack([np.bincount(lab, x[:, 0], k), np.bincount(lab, x[:, 1], k)], 1)
        C = np.where(n[:, None] > 0, sums / np.maximum(n, 1)[:, None], C)
    return C


def nearest(x, C):
    """Index of the nearest row of C for every row of x (2D points)."""
    d = (x[:, None, 0] - C[None, :, 0]) ** 2 + (x[:, None, 1] - C[None, :, 1]) ** 2
    return d.argmin(1)


def farthest_points(x, k, rng):
    if len(x) <= k:
        return np.arange(len(x))
    picked = [int(rng.integers(len(x)))]
    d = ((x - x[picked[0]]) ** 2).sum(1)
    for _ in range(1, k):
        picked.append(int(d.argmax()))
        d = np.minimum(d, ((x - x[picked[-1]]) ** 2).sum(1))
    return np.array(picked)


def away_from(cands, points, min_sep):
    if len(cands) == 0 or len(points) == 0:
        return cands
    c = cands.astype(np.float64)
    d2 = (c[:, None, 0] - points[None, :, 0]) ** 2 + (c[:, None, 1] - points[None, :, 1]) ** 2
    return cands[d2.min(1) >= min_sep ** 2]


def spread_distractors(cands, kept, params, rng):
    """Up to --max-distractors candidates, spread out and at least --min-sep px from every kept match point.
    A random cap on the candidates first keeps the cost flat (they number in the thousands)."""
    if len(cands) > 3000:
        cands = cands[np.sort(rng.choice(len(cands), 3000, replace=False))]
    cands = away_from(cands, kept.astype(np.float64), params["min_sep"])
    return cands[farthest_points(cands.astype(np.float64), params["max_distractors"], rng)] if len(cands) else cands


def nearest_label(x, points, labels):
    if len(x) == 0:
        return np.zeros(0, np.int32)
    return labels[nearest(x.astype(np.float64), points.astype(np.float64))].astype(np.int32)


def enough_matches(n_matches, params):
    """The pair-acceptance rule: at least --min-matches verified matches and room for 10 clusters (the paper's
    smallest N_p)."""
    return n_matches >= params["min_matches"] and n_matches >= 10


def draw_num_points(params, rng):
    """N_p of one pair: uniform in --num-points-range (seeded per scene, so shards draw what one run draws)."""
    lo, hi = params["num_points_range"]
    return int(rng.integers(lo, hi + 1))


def select_points(res12, res21, params, rng):
    """From dense matches and distractor candidates to the stored arrays (None if too few matches). N_p matches
    (drawn in --num-points-range; fewer only when the verified overlap cannot supply them, never under 10)."""
    p1, p2 = res12["p1"], res12["p2"]
    m = len(p1)
    if not enough_matches(m, params):
        return None
    k = min(draw_num_points(params, rng), m)
    sub = rng.choice(m, min(m, 1500), replace=False)  # k-means on a capped sample keeps the cost flat
    x = p1[sub].astype(np.float64)
    C = kmeans(x, k, rng)
    lab = nearest(x, C)
    keep = []
    for j in range(k):
        members = np.nonzero(lab == j)[0]
        if len(members):
            keep.append(sub[members[((x[members] - C[j]) ** 2).sum(1).argmin()]])
    if len(keep) < 10:
        return None
    keep = np.array(keep)
    kp1m, kp2m = p1[keep], p2[keep]
    cl = np.arange(len(keep), dtype=np.int32)
    d1 = spread_distractors(res12["dist"], kp1m, params, rng)
    d2 = spread_distractors(res21["dist"], kp2m, params, rng)
    dense = rng.choice(m, min(m, params["max_dense"]), replace=False)
    dense.sort()
    n = len(keep)
    return dict(
        kp1=np.concatenate([kp1m, d1.reshape(-1, 2)]).astype(np.float32),
        kp2=np.concatenate([kp2m, d2.reshape(-1, 2)]).astype(np.float32),
        match=np.concatenate([np.arange(n), -np.ones(len(d1))]).astype(np.int32),
        cluster=np.concatenate([cl, nearest_label(d1, kp1m, cl)]).astype(np.int32),
        cluster2=np.concatenate([cl, nearest_label(d2, kp2m, cl)]).astype(np.int32),
        dense1=p1[dense].astype(np.float32), dense2=p2[dense].astype(np.float32))


# ----------------------------------------------------------------------------------------------------------------
# One scene: sample pairs, verify, write npz files (runs in a worker process)

def open_scene(source, kind, spec, params=None, frames_skipped=None):
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
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def scene_seed(seed, source, scene):
    return int(hashlib.sha1(f"{seed}/{source}/{scene}".encode()).hexdigest()[:8], 16)


def sample_pairs(n, max_pairs, rng):
    """All pairs i<j over the (stride-subsampled) trajectory, or a random subset of them."""
    pairs = list(itertools.combinations(range(n), 2))
    if max_pairs and len(pairs) > max_pairs:
        pick = rng.choice(len(pairs), max_pairs, replace=False)
        pairs = [pairs[i] for i in sorted(pick)]
    return pairs


def process_scene(task):
    source, name_out, kind, spec, args = task
    stats = dict(pairs_skipped=collections.Counter(), frames_skipped=collections.Counter(), pairs_tried=0,
                 points=collections.Counter())
    try:
        scene = open_scene(source, kind, spec, args, stats["frames_skipped"])
    except BadInput as e:
        warn(f"{e}; skipping scene")
        stats["scenes_skipped"] = collections.Counter({e.reason: 1})
        return [], stats
    rng = np.random.default_rng(scene_seed(args["seed"], name_out, scene.name))
    ids = scene.frame_ids[::1 if source == "re10k" else args["frame_stride"]]  # re10k: strided before COLMAP
    pairs = sample_pairs(len(ids), args["max_pairs_per_scene"], rng)
    cache, bad = collections.OrderedDict(), {}
    out_dir = os.path.join(args["out"], "pairs", name_out, safe(scene.name))
    img_dir = os.path.join(args["out"], "images", name_out, safe(scene.name))

    def get(fid):
        if fid in bad:
            return None
        if fid not in cache:
            try:
                cache[fid] = scene.load(fid)
            except BadInput as e:
                warn(f"{e}; skipping frame")
                stats["frames_skipped"][e.reason] += 1
                bad[fid] = e.reason
                return None
            if len(cache) > args["cache_frames"]:
                cache.popitem(last=False)
        cache.move_to_end(fid)
        return cache[fid]

    def image_path(f):
        if f.get("jpeg") is None:
            return f["image"]
        rel = os.path.join("images", name_out, safe(scene.name), f"{safe(f['id'])}.jpg")
        path = os.path.join(args["out"], rel)
        if not os.path.exists(path):
            os.makedirs(img_dir, exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(f["jpeg"])
        return rel

    match = match_rgbd if source in RGBD else match_sfm
    scene_type = SCENE_TYPE[source] if source in RGBD else args[f"{source}_scene_type"]
    records = []
    for i, j in pairs:
        stats["pairs_tried"] += 1
        f1, f2 = get(ids[i]), get(ids[j])
        if f1 is None or f2 is None:
            stats["pairs_skipped"]["bad frame"] += 1
            continue
        res12, res21 = match(f1, f2, args), match(f2, f1, args)
        stats["points"].update(res12["counts"])
        stats["points"].update(res21["counts"])
        arrays = select_points(res12, res21, args, rng)
        if arrays is None:
            stats["pairs_skipped"]["too few matches"] += 1
            continue
        fname = f"{safe(f1['id'])}_{safe(f2['id'])}.npz"
        os.makedirs(out_dir, exist_ok=True)
        np.savez(os.path.join(out_dir, fname), **arrays)
        n_m = int((arrays["match"] >= 0).sum())
        records.append(dict(
            pair_id=f"{name_out}/{scene.name}/{f1['id']}-{f2['id']}", source=name_out, scene=scene.name,
            scene_type=scene_type,
            split=None, frame1=f1["id"], frame2=f2["id"],
            image1=image_path(f1), image2=image_path(f2),
            width1=int(f1["width"]), height1=int(f1["height"]), width2=int(f2["width"]), height2=int(f2["height"]),
            K1=np.asarray(f1["K"]).tolist(), K2=np.asarray(f2["K"]).tolist(),
            overlap=res12["omega"], delta_v=1.0 - res12["omega"], bin=None,
            npz=os.path.join("pairs", name_out, safe(scene.name), fname),
            R=res12["R"].tolist(), t=np.asarray(res12["t"]).tolist(),
            n_matches=n_m, n_dist1=int(len(arrays["kp1"]) - n_m), n_dist2=int(len(arrays["kp2"]) - n_m),
            n_dense_verified=len(res12["p1"])))
    return records, stats


# ----------------------------------------------------------------------------------------------------------------
# Pool-level: bins, split, outputs

def assign_bins(records, num_bins, edges_mode):
    """Bins 1..S within each source, by delta_v deciles (default) or uniform edges over [0, 1]."""
    edges_by_source = {}
    for src in sorted({r["source"] for r in records}):
        rs = [r for r in records if r["source"] == src]
        dv = np.array([r["delta_v"] for r in rs])
        if edges_mode == "deciles":
            edges = np.quantile(dv, np.linspace(0, 1, num_bins + 1))
        else:
            edges = np.linspace(0, 1, num_bins + 1)
        inner = edges[1:-1].tolist()
        for r in rs:
            r["bin"] = int(min(max(bisect.bisect_right(inner, r["delta_v"]) + 1, 1), num_bins))
        edges_by_source[src] = edges.tolist()
    return edges_by_source


def scene_hash(scene):
    return int(hashlib.sha1(scene.encode()).hexdigest()[:8], 16) / 2 ** 32


def assign_split(records, test_fraction, test_scenes=None, test_sources=None):
    """split = test / train per scene (see the usage card); sources not in test_sources (None: all) are train only."""
    by_source = collections.defaultdict(set)
    for r in records:
        by_source[r["source"]].add(r["scene"])
    test = set()
    for src, scenes in by_source.items():
        if test_sources is not None and src not in test_sources:
            continue
        if test_scenes is not None:
            test |= {(src, s) for s in scenes if s in test_scenes or f"{src}/{s}" in test_scenes}
            continue
        t = {s for s in scenes if scene_hash(s) < test_fraction}
        if not t and len(scenes) >= 2:
            t = {min(scenes, key=scene_hash)}  # so the demo always has a test split
        test |= {(src, s) for s in t}
    for r in records:
        r["split"] = "test" if (r["source"], r["scene"]) in test else "train"


def read_scene_types(path):
    """--scene-types FILE: one "scene type" or "source/scene type" a line -> {name: type}; bad lines exit."""
    if not os.path.isfile(path):
        sys.exit(f"{PROG}: error: --scene-types {path} does not exist")
    table = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or parts[1] not in SCENE_TYPES:
                sys.exit(f"{PROG}: error: --scene-types {path} line {lineno}: want 'source/scene TYPE' with TYPE "
                         f"one of {', '.join(SCENE_TYPES)}, got {line.strip()!r}")
            table[parts[0]] = parts[1]
    return table


def apply_scene_types(records, table):
    """Set scene_type from the --scene-types table ("source/scene" beats "scene"); -> entries that matched no
    scene of the pool."""
    used = set()
    for r in records:
        for key in (f"{r['source']}/{r['scene']}", r["scene"]):
            if key in table:
                r["scene_type"] = table[key]
                used.add(key)
                break
    return sorted(set(table) - used)


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


def main(argv=None):
    p = argparse.ArgumentParser(description="Build the verified wide-baseline correspondence pool.")
    p.add_argument("--scannet", help="ScanNet root or scene: exported folders and/or raw .sens files")
    p.add_argument("--co3d", help="CO3D v2 root, category folder or sequence folder")
    p.add_argument("--uco3d", help="uCO3D root (with metadata.sqlite) or a sequence folder under it")
    p.add_argument("--colmap", help="folder of COLMAP scenes (<scene>/images, <scene>/sparse/0) or one scene")
    p.add_argument("--colmap-source", default="colmap", help="source name written for --colmap scenes (dl3dv, ...)")
    p.add_argument("--colmap-scene-type", default="outdoor", choices=["indoor", "object", "outdoor"])
    p.add_argument("--colmap-images", help="image folder name inside each COLMAP scene (default images or "
                   "dense/images); images_N: downscaled N times from the model's resolution (DL3DV: images_4)")
    p.add_argument("--re10k", help="RealEstate10K root (<split>/<clip>.txt or <clip>.txt + frame folders) or one txt")
    p.add_argument("--re10k-frames", help="folder holding the <clip>/<timestamp_us>.png|jpg frame folders "
                   "(default: next to the txt files)")
    p.add_argument("--re10k-scene-type", default="indoor", choices=["indoor", "object", "outdoor"])
    p.add_argument("--re10k-exhaustive-max", type=int, default=40,
                   help="clips with at most this many (strided) frames: exhaustive matching, else sequential")
    p.add_argument("--re10k-overlap", type=int, default=10, help="sequential matching: neighbours per frame")
    p.add_argument("--re10k-max-reproj-error", type=float, default=1.0,
                   help="px: COLMAP drops observations farther than this from their triangulated point")
    p.add_argument("--re10k-keep-database", action="store_true",
                   help="keep <out>/colmap_re10k/<clip>/database.db (features and matches; large)")
    p.add_argument("--out", default="pool", help="output pool folder")
    p.add_argument("--frame-stride", type=int, default=1, help="use every n-th frame of a trajectory")
    p.add_argument("--max-pairs-per-scene", type=int, default=60, help="random subset of all pairs (0 = all)")
    p.add_argument("--workers", type=int, default=2, help="scenes processed in parallel")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-bins", type=int, default=10, help="S: delta_v bins per source")
    p.add_argument("--bin-edges", default="deciles", choices=["deciles", "uniform"])
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--test-scenes", help="file with one test scene name (or source/scene) per line")
    p.add_argument("--test-sources", help="comma-separated sources allowed in the test split (default: all); the "
                   "paper's benchmark: scannet,uco3d,dl3dv,re10k (CO3D is train only)")
    p.add_argument("--scene-types", help="file with one 'scene TYPE' or 'source/scene TYPE' per line (TYPE: indoor, "
                   "object, outdoor); overrides --colmap-scene-type / --re10k-scene-type for the scenes it lists")
    p.add_argument("--depth-step", type=int, default=2, help="sample every n-th depth pixel of I1 (both axes)")
    p.add_argument("--depth-rel-tol", type=float, default=0.03, help="match: |d2 - z| <= tol * z")
    p.add_argument("--occlusion-margin", type=float, default=0.2,
                   help="occluded: the depth of I2 around the projection < (1 - margin) * z (LoFTR's 0.2 gap); "
                        "also the relative depth step that marks a depth edge of I1")
    p.add_argument("--cycle-px", type=float, default=3.0,
                   help="two-way check: a match warped into I2 and back with I2's depth must land within this many "
                        "px of its start, px at 640 on the long side (scaled: 6.1 px at 1296x968); 0 = one-way")
    p.add_argument("--border-px", type=float, default=3.0,
                   help="an 'outside' distractor projects at least this far outside the other image (px at 640 on "
                        "the long side, scaled like --cycle-px)")
    p.add_argument("--max-stretch", type=float, default=2.5,
                   help="drop a match where one pixel of I1 spans more than this many pixels of I2 (grazing in I1, "
                        "head-on in I2: a sub-pixel depth error of I1 is magnified there); 0 = off")
    p.add_argument("--edge-window", type=int, default=2,
                   help="depth px: samples of I1 with a depth edge or hole this close are neither match nor "
                        "distractor, and an occluder must cover this window around the projection (0 = off)")
    p.add_argument("--photo-check", action=argparse.BooleanOptionalAction, default=True,
                   help="also require colours to agree after per-image normalisation")
    p.add_argument("--photo-tol", type=float, default=1.0, help="max per-channel difference in image stds")
    p.add_argument("--min-matches", type=int, default=30, help="min dense verified matches to keep a pair")
    p.add_argument("--num-points-range", type=int, nargs=2, default=[10, 50], metavar=("MIN", "MAX"),
                   help="N_p: matches kept per pair, drawn uniformly per pair (seeded); fewer only when the pair "
                        "has fewer verified matches (never under 10)")
    p.add_argument("--num-clusters", type=int, default=None, help="the old flag: N_p fixed (MIN = MAX = this)")
    p.add_argument("--max-distractors", type=int, default=30, help="per side")
    p.add_argument("--min-sep", type=float, default=6.0, help="px between a distractor and any kept match point")
    p.add_argument("--max-dense", type=int, default=1000, help="cap on stored dense matches")
    p.add_argument("--cache-frames", type=int, default=48, help="decoded frames kept in memory per worker")
    p.add_argument("--shard", help="i/N: build only the scenes whose stable hash of source/scene falls in shard i "
                   "(no bins, no split: join the shards with --merge)")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="shard folders (all N of one --shard build) to join into "
                   "--out: copies their files, computes bins and split over the whole corpus")
    args = p.parse_args(argv)
    if args.merge:
        if any([args.scannet, args.co3d, args.uco3d, args.colmap, args.re10k]) or args.shard:
            sys.exit(f"{PROG}: error: --merge takes shard folders only (no --SOURCE flags, no --shard)")
    elif not any([args.scannet, args.co3d, args.uco3d, args.colmap, args.re10k]):
        sys.exit(f"{PROG}: error: give at least one of --scannet --co3d --uco3d --colmap --re10k (or --merge)")
    if args.re10k_frames is not None and not os.path.isdir(args.re10k_frames):
        sys.exit(f"{PROG}: error: --re10k-frames {args.re10k_frames} does not exist")
    shard = parse_shard(args.shard) if args.shard else None
    if args.num_clusters is not None:  # the old flag: exactly that many matches per pair
        args.num_points_range = [args.num_clusters, args.num_clusters]
    lo, hi = args.num_points_range
    if not 10 <= lo <= hi <= 50:
        sys.exit(f"{PROG}: error: --num-points-range {lo} {hi}: need 10 <= MIN <= MAX <= 50 (the paper's N_p)")

    scene_types = read_scene_types(args.scene_types) if args.scene_types else None  # a bad file fails before the build

    t0 = time.time()
    if args.merge:
        records, stats = merge_shards(args.merge, args.out)
    else:
        scenes_skipped = collections.Counter()
        tasks = gather_tasks(args, scenes_skipped)
        if shard is not None:
            tasks = [t for t in tasks if in_shard(t, *shard)]
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        shared = dict(vars(args), out=args.out)
        tasks = [t[:4] + (shared,) for t in tasks]
        records, stats = run_scenes(tasks, args.workers)
        stats["scenes_skipped"].update(scenes_skipped)
        if shard is not None:  # bins and split need the whole corpus: --merge computes them
            write_shard(args, shard, records, stats, time.time() - t0)
            return
    if not records:
        sys.exit(f"{PROG}: error: no pair passed verification ({dict(stats['pairs_skipped'])})")
    edges = assign_bins(records, args.num_bins, args.bin_edges)
    test_scenes = None
    if args.test_scenes:
        if not os.path.isfile(args.test_scenes):
            sys.exit(f"{PROG}: error: --test-scenes {args.test_scenes} does not exist")
        with open(args.test_scenes) as f:
            test_scenes = {line.strip() for line in f if line.strip()}
    assign_split(records, args.test_fraction, test_scenes,
                 set(args.test_sources.split(",")) if args.test_sources else None)
    if scene_types:
        unused = apply_scene_types(records, scene_types)
        if unused:
            print(f"{PROG}: warning: --scene-types entries that name no scene of the pool: {', '.join(unused)}")
    records.sort(key=lambda r: r["pair_id"])
    with open(os.path.join(args.out, "pairs.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    # merged: the shards' own build time (summed over shards, so pairs/s is per build process, not the merge's)
    write_summary(args, records, stats, edges, stats.get("shard_seconds", time.time() - t0))


# ----------------------------------------------------------------------------------------------------------------
# Sharded building: --shard i/N builds the scenes whose stable hash falls in shard i; --merge joins the shards

def parse_shard(text):
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        sys.exit(f"{PROG}: error: --shard {text}: expected i/N, e.g. 3/16")
    if not 0 <= i < n:
        sys.exit(f"{PROG}: error: --shard {text}: need 0 <= i < N")
    return i, n


def task_scene(task):
    """source/scene of a task, known before the scene is opened (for the shard hash)."""
    source, name_out, kind, spec = task[:4]
    if source == "scannet":
        base = os.path.basename(os.path.normpath(spec))
        return f"{name_out}/{os.path.splitext(base)[0] if kind == 'sens' else base}"
    return f"{name_out}/{spec[0] if source in ('colmap', 're10k') else spec[1]}"


def in_shard(task, i, n):
    """Stable across machines and runs (sha1, not Python's salted hash): a scene always lands in one shard."""
    return int(hashlib.sha1(task_scene(task).encode()).hexdigest()[:12], 16) % n == i


SHARD_IGNORED_ARGS = ("shard", "out", "workers", "merge")  # may differ between shards; the rest must agree


def write_shard(args, shard, records, stats, seconds):
    """One shard's output: npz files, images as usual; the records without bins or split in shard_pairs.jsonl
    and the counts in shard.json. No pairs.jsonl: make_tasks.py refuses the folder until it is merged."""
    records.sort(key=lambda r: r["pair_id"])
    with open(os.path.join(args.out, "shard_pairs.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(args.out, "shard.json"), "w") as f:
        json.dump(dict(shard=list(shard), pairs=len(records), seconds=round(seconds, 2),
                       stats={k: (dict(v) if isinstance(v, collections.Counter) else v) for k, v in stats.items()},
                       args={k: v for k, v in vars(args).items() if k not in SHARD_IGNORED_ARGS}), f, indent=2)
    print(f"build_pool: shard {shard[0]}/{shard[1]}: {len(records)} pairs -> {args.out} in {seconds:.1f}s; "
          f"merge all shards with: build_pool.py --merge SHARD_DIR... --out POOL")


def merge_shards(dirs, out):
    """Records and summed counts of every shard of one sharded build; copies their pool files into out."""
    infos = []
    for d in dirs:
        path = os.path.join(d, "shard.json")
        if not os.path.isfile(path):
            sys.exit(f"{PROG}: error: --merge {d}: no shard.json (not a folder written by build_pool.py --shard)")
        with open(path) as f:
            infos.append(json.load(f))
        if os.path.abspath(d) == os.path.abspath(out):
            sys.exit(f"{PROG}: error: --out {out} is one of the shards: merge into a new folder")
    n = infos[0]["shard"][1]
    got = sorted(info["shard"][0] for info in infos)
    if any(info["shard"][1] != n for info in infos) or got != list(range(n)):
        sys.exit(f"{PROG}: error: --merge needs each shard 0..{n - 1} of one N exactly once, got "
                 f"{sorted('%d/%d' % tuple(info['shard']) for info in infos)}")
    for d, info in zip(dirs, infos):
        if info["args"] != infos[0]["args"]:
            diff = sorted(k for k in info["args"] if info["args"][k] != infos[0]["args"].get(k))
            sys.exit(f"{PROG}: error: --merge {d} was built with other settings than {dirs[0]} ({', '.join(diff)})")
    os.makedirs(out, exist_ok=True)
    records, stats = [], dict(pairs_skipped=collections.Counter(), frames_skipped=collections.Counter(),
                              pairs_tried=0, scenes_skipped=collections.Counter(), points=collections.Counter())
    for d, info in zip(dirs, infos):
        for sub in ("pairs", "images", "colmap_re10k"):  # npz files, .sens / video frames, RE10K models
            if os.path.isdir(os.path.join(d, sub)):
                shutil.copytree(os.path.join(d, sub), os.path.join(out, sub), dirs_exist_ok=True)
        with open(os.path.join(d, "shard_pairs.jsonl")) as f:
            records += [json.loads(line) for line in f]
        st = info["stats"]
        for k in ("pairs_skipped", "frames_skipped", "scenes_skipped", "points"):
            stats[k].update(st.get(k, {}))
        stats["pairs_tried"] += st["pairs_tried"]
        stats["shard_seconds"] = stats.get("shard_seconds", 0.0) + info["seconds"]
    with open(os.path.join(out, "args.json"), "w") as f:
        json.dump(dict(infos[0]["args"], merged_from=[os.path.abspath(d) for d in dirs]), f, indent=2)
    return records, stats


def run_scenes(tasks, workers):
    records, stats = [], dict(pairs_skipped=collections.Counter(), frames_skipped=collections.Counter(),
                              pairs_tried=0, scenes_skipped=collections.Counter(), points=collections.Counter())
    if workers > 1 and len(tasks) > 1:
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ctx.Pool(min(workers, len(tasks))) as pool:
            results = list(tqdm(pool.imap_unordered(process_scene, tasks), total=len(tasks), desc="scenes"))
            pool.close()  # let workers exit on their own: terminate() would trip pycolmap's signal handler
            pool.join()
    else:
        results = [process_scene(t) for t in tqdm(tasks, desc="scenes")]
    for recs, st in results:
        records += recs
        stats["pairs_skipped"].update(st["pairs_skipped"])
        stats["frames_skipped"].update(st["frames_skipped"])
        stats["pairs_tried"] += st["pairs_tried"]
        stats["scenes_skipped"].update(st.get("scenes_skipped", {}))
        stats["points"].update(st["points"])
    return records, stats


def verification_summary(points):
    """What each verification rule decided, summed over both directions of every pair tried (depth samples for
    RGB-D, landmark observations for SfM)."""
    names = dict(valid="samples tried", match="kept as matches", edge="depth edge or hole in I1: neither",
                 photo="removed by the colour check", cycle="removed by the two-way check (--cycle-px)",
                 stretch="removed as ill-conditioned (--max-stretch)",
                 neither_gap="depth gap between --depth-rel-tol and --occlusion-margin: neither",
                 neither_border="within --border-px of the other image's border: neither",
                 no_depth2="no depth in I2 at the projection: neither", behind="distractor: behind camera 2",
                 outside="distractor: outside image 2", occluded="distractor: occluded by --occlusion-margin")
    return {k: dict(count=int(points.get(k, 0)), rule=names[k]) for k in names}


def write_summary(args, records, stats, edges, seconds):
    per_source = {}
    for src in sorted(edges):
        rs = [r for r in records if r["source"] == src]
        dv = [r["delta_v"] for r in rs]
        per_source[src] = dict(
            pairs=len(rs), scenes=len({r["scene"] for r in rs}),
            test_pairs=sum(r["split"] == "test" for r in rs),
            per_bin={b: sum(r["bin"] == b for r in rs) for b in range(1, args.num_bins + 1)},
            delta_v_min=min(dv), delta_v_max=max(dv), bin_edges=edges[src])
    summary = dict(pairs=len(records), pairs_tried=stats["pairs_tried"], seconds=round(seconds, 2),
                   pairs_per_second=round(stats["pairs_tried"] / max(seconds, 1e-9), 2),
                   pairs_skipped=dict(stats["pairs_skipped"]), frames_skipped=dict(stats["frames_skipped"]),
                   scenes_skipped=sum(stats["scenes_skipped"].values()),
                   scenes_skipped_by_reason=dict(stats["scenes_skipped"]),
                   verification=verification_summary(stats["points"]), sources=per_source)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for src, s in per_source.items():
        bins = " ".join(str(s["per_bin"][b]) for b in range(1, args.num_bins + 1))
        print(f"  {src:8s} {s['pairs']:5d} pairs ({s['test_pairs']} test) from {s['scenes']} scenes, "
              f"delta_v {s['delta_v_min']:.2f}..{s['delta_v_max']:.2f}, per bin: {bins}")
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(stats["pairs_skipped"].items())) or "none"
    frames = ", ".join(f"{k}: {v}" for k, v in sorted(stats["frames_skipped"].items())) or "none"
    print(f"build_pool: {len(records)} pairs -> {args.out}/pairs.jsonl in {seconds:.1f}s "
          f"({summary['pairs_per_second']} pairs/s verified); pairs skipped: {skipped}; frames skipped: {frames}")


if __name__ == "__main__":
    main()
