"""
build_pool.py: turn RGB-D videos and SfM reconstructions into a verified correspondence pool.

Every sampled frame pair of every scene gets thousands of geometrically verified dense matches, the overlap omega
(delta_v = 1 - omega, the paper's viewpoint change), 10..50 well-spread matches with cluster ids, and distractor
points on both sides verified to have NO visible counterpart in the other image. Pairs are binned 1..S by delta_v
within each source and split by scene. In pipeline order below: match_rgbd / match_sfm (verification),
select_points (the sparse set), process_scene (one scene), assign_bins and assign_split (the pool), main.

    python synthetic.py --out demo_data                                  # the CPU demo's scenes
    python build_pool.py --scannet demo_data/scannet --colmap demo_data/colmap --co3d demo_data/co3d --out pool
    python build_pool.py --scannet /data/scannet/scans --out pool --frame-stride 10 --max-pairs-per-scene 200 \
        --workers 16                                                     # real data: scenes over CPU cores
    python build_pool.py --scannet /data/scannet_sens --out shards/07 --shard 7/64   # a cluster: one job a shard,
    python build_pool.py --merge shards/* --out pool                     # then bins and split over the corpus

Inputs: --scannet (exported folders or raw .sens), --co3d, --uco3d, --colmap (DL3DV: --colmap-images images_4),
--re10k (triangulated with pycolmap from its known poses first); each takes a dataset root or a single scene.
Outputs (pool/): pairs.jsonl (one pair a line), pairs/<source>/<scene>/<f1>_<f2>.npz (kp1, kp2, match, cluster,
cluster2, dense1, dense2), images/ (.sens and video frames), colmap_re10k/ (RE10K models), args.json, summary.json.
The readers are in widematch/datasets.py; the worker pool, the files and sharding in widematch/pool_io.py.
Every source's layout, each rule, the formats, bad input, the split, sharding, the departures from the paper and
the measurements: docs/build_pool.md.
"""
import argparse
import bisect
import collections
import hashlib
import itertools
import json
import os
import sys
import time

import cv2
import numpy as np

from widematch.datasets import PROG, RGBD, SCENE_TYPE, BadInput, gather_tasks, open_scene, safe, warn
from widematch.datasets import (  # noqa: F401  (re-exported: tests and bench.py use these as build_pool.X)
    ScanNetExported, ScanNetSens, depth_intrinsics_from_colour, find_co3d, find_scannet, ndc_to_opencv,
    re10k_intrinsics, read_re10k, read_video_frame, rgbd_frame, unpack_floats, world_to_cam_to_world)
from widematch.pool_io import (in_shard, merge_shards, parse_shard, read_scene_types, read_test_scenes, run_scenes,
                               write_pairs, write_shard, write_summary)


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
    """(source, name_out, kind, spec, params) -> (records, stats) of one scene. Module-level: run_scenes' worker
    processes receive it pickled by name."""
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
# The pool: bins, split, scene types

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
    """split = test / train per scene (docs/build_pool.md, "Split and scene types"); sources not in test_sources
    (None: all) are train only."""
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


# ----------------------------------------------------------------------------------------------------------------
# The command

def parse_args(argv=None):
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
    return args, shard


def main(argv=None):
    args, shard = parse_args(argv)
    scene_types = read_scene_types(args.scene_types) if args.scene_types else None  # a bad file fails before the build
    t0 = time.time()
    if args.merge:  # the shards of one build: their records and counts, their files copied into --out
        records, stats = merge_shards(args.merge, args.out)
    else:
        scenes_skipped = collections.Counter()
        tasks = gather_tasks(args, scenes_skipped)  # one per scene of every --SOURCE flag
        if shard is not None:
            tasks = [t for t in tasks if in_shard(t, *shard)]
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        shared = dict(vars(args), out=args.out)
        records, stats = run_scenes(process_scene, [t[:4] + (shared,) for t in tasks], args.workers)
        stats["scenes_skipped"].update(scenes_skipped)
        if shard is not None:  # bins and split need the whole corpus: --merge computes them
            write_shard(args, shard, records, stats, time.time() - t0)
            return
    if not records:
        sys.exit(f"{PROG}: error: no pair passed verification ({dict(stats['pairs_skipped'])})")
    edges = assign_bins(records, args.num_bins, args.bin_edges)
    assign_split(records, args.test_fraction, read_test_scenes(args.test_scenes) if args.test_scenes else None,
                 set(args.test_sources.split(",")) if args.test_sources else None)
    if scene_types:
        unused = apply_scene_types(records, scene_types)
        if unused:
            print(f"{PROG}: warning: --scene-types entries that name no scene of the pool: {', '.join(unused)}")
    write_pairs(os.path.join(args.out, "pairs.jsonl"), records)
    # merged: the shards' own build time (summed over shards, so pairs/s is per build process, not the merge's)
    write_summary(args, records, stats, edges, stats.get("shard_seconds", time.time() - t0))


if __name__ == "__main__":
    main()
