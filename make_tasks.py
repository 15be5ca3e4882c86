"""
make_tasks.py: turn pool pairs into matching tasks: labelled point sets X (image 1) and Y (image 2), the target
f*: X -> Y u {none}, the two prompted images and the prompt text.

Usage:
    python make_tasks.py --pool pool --out tasks --split test --max-side 640 --seed 0   # CPU demo, seconds
    python make_tasks.py --pool pool --out tasks --split train --per-pair 8 --max-side 640
    python make_tasks.py --pool pool --out bench --split test --mix paper   # ReasonMatch-Bench's 2,810-pair mix
    python make_tasks.py --pool pool --out tasks_actor --split test --actor    # HATCH ActoR prompts (action block)

Inputs: pool/pairs.jsonl + one npz per pair (kp1, kp2, match, cluster, cluster2).
Outputs (in --out): <split>.jsonl (one task per line), <split>_images/ (the prompted images), args_<split>.json,
composition_<split>.json (asked and achieved shares, also printed).
grpo.py does not read train.jsonl: it calls make_task() online with the (bin, level, spatial) the curriculum
asks for; train.jsonl is for inspection and warm-up data.

Details: docs/tasks.md, "make_tasks.py in full" (every command, the task file's fields, the composition rules,
levels and spatial modes, distractors, drawing, the prompt).
"""
import argparse
import functools
import json
import math
import os
import re
import sys
import zlib
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from reward import ACTION_STEP_DEG, action_instructions, x_labels_for, y_labels_for
from widematch import prompts

LEVELS = ("L1", "L2", "L3")
SPATIAL = ("sparse", "moderate", "dense")


class TaskUnavailable(ValueError):
    """The pair cannot supply the requested (level, spatial, n); the message is a short category for counting."""

# -----------------------------------------------------------------------------
# Pure sampling (no I/O)


def _far(p, pts, sep):
    """True when p is at least sep from every point in pts."""
    return all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 >= sep * sep for q in pts)


def _nearest(points, ref):
    """Index of the nearest ref row for each row of points."""
    if len(points) == 0:
        return np.zeros(0, np.int64)
    return ((points[:, None, :] - ref[None, :, :]) ** 2).sum(-1).argmin(1)


def _order(n_items, clusters, grouped, rng):
    """Random candidate order; grouped: cluster by cluster (random cluster order, random within a cluster)."""
    idx = rng.permutation(n_items)
    if not grouped or n_items == 0:
        return [int(i) for i in idx]
    rank = {int(c): r for r, c in enumerate(rng.permutation(np.unique(clusters)))}
    return [int(i) for i in sorted(idx, key=lambda i: rank[int(clusters[i])])]  # stable: random within


def matched_candidates(arrays, spatial):
    """Candidate correspondences for a spatial mode as (id1, id2, p1, p2, c1, c2) arrays.
    Ids: rows of kp1/kp2 for pool matches; len(kp1) + r / len(kp2) + r for row r of dense1/dense2.
    sparse uses the pool's well-spread matches only; moderate and dense add the verified dense matches, each
    given the cluster of the nearest pool match in its own image (as build_pool.py does for distractors).
    Pool matches whose partner is shared with another kp1 are ambiguous and left out."""
    kp1, kp2 = np.asarray(arrays["kp1"], float).reshape(-1, 2), np.asarray(arrays["kp2"], float).reshape(-1, 2)
    match = np.asarray(arrays["match"], np.int64)
    cl1, cl2 = np.asarray(arrays["cluster"], np.int64), np.asarray(arrays["cluster2"], np.int64)
    partners, counts = np.unique(match[match >= 0], return_counts=True)
    rows = np.flatnonzero((match >= 0) & ~np.isin(match, partners[counts > 1]))
    id1, id2 = rows, match[rows]
    p1, p2, c1, c2 = kp1[id1], kp2[id2], cl1[id1], cl2[id2]
    d1 = np.asarray(arrays.get("dense1", np.zeros((0, 2))), float).reshape(-1, 2)
    d2 = np.asarray(arrays.get("dense2", np.zeros((0, 2))), float).reshape(-1, 2)
    if spatial == "sparse" or len(d1) == 0 or len(rows) == 0:
        return id1, id2, p1, p2, c1, c2
    r = np.arange(len(d1))
    return (np.concatenate([id1, len(kp1) + r]), np.concatenate([id2, len(kp2) + r]),
            np.concatenate([p1, d1]), np.concatenate([p2, d2]),
            np.concatenate([c1, c1[_nearest(d1, p1)]]), np.concatenate([c2, c2[_nearest(d2, p2)]]))


def sample_points(arrays, level, spatial, n, rng, min_sep=0.0, per_cluster=3, dist_y=(2, None),
                  unmatched_frac=(0.25, 0.5), tries=20):
    """Draw X (n points of image 1) and Y (image 2) from one pool pair.

    arrays: the pair's npz as a dict (kp1, kp2, match, cluster, cluster2, optional dense1, dense2).
    min_sep: float or (sep1, sep2) in ORIGINAL pixels of image 1 / image 2 (at least 1 px is always kept).
    dist_y: (lo, hi) image-2 distractors for L2/L3, hi None = n. Returns a dict with x_points (n,2),
    y_points (m,2) as lists (original pixels), x_labels, y_labels, target (Y label or None per x), n, m, level,
    spatial, x_idx, y_idx (ids as in matched_candidates: kp rows, or len(kp) + dense row), x_cluster,
    y_cluster. Raises TaskUnavailable when the pair cannot supply the request."""
    if level not in LEVELS or spatial not in SPATIAL or n < 1:
        raise ValueError(f"sample_points: bad request level={level} spatial={spatial} n={n}")
    kp1, kp2 = np.asarray(arrays["kp1"], float).reshape(-1, 2), np.asarray(arrays["kp2"], float).reshape(-1, 2)
    match = np.asarray(arrays["match"], np.int64)
    cl1, cl2 = np.asarray(arrays["cluster"], np.int64), np.asarray(arrays["cluster2"], np.int64)
    if not (len(kp1) == len(match) == len(cl1) and len(kp2) == len(cl2) and match.max(initial=-1) < len(kp2)):
        raise ValueError("sample_points: inconsistent arrays (kp1/match/cluster or kp2/cluster2 lengths)")
    sep1, sep2 = (min_sep, min_sep) if np.isscalar(min_sep) else min_sep
    sep1, sep2 = max(sep1, 1.0), max(sep2, 1.0)  # never draw the same spot twice
    cap = {"sparse": 1, "moderate": per_cluster, "dense": math.inf}[spatial]
    id1, id2, p1, p2, c1, c2 = matched_candidates(arrays, spatial)
    pool_rows = [i for i in range(len(id1)) if id1[i] < len(kp1)]  # pool matches among the candidates
    un1 = np.flatnonzero(match < 0)                                # verified: no counterpart in image 2
    un2 = np.setdiff1d(np.arange(len(kp2)), match[match >= 0])     # verified: no counterpart in image 1

    # how many of each kind (drawn once, so retries only change which points)
    n_un = 0
    if level == "L3":
        lo = max(1, math.ceil(unmatched_frac[0] * n))
        hi = min(n - 1, max(lo, math.floor(unmatched_frac[1] * n)), len(un1))
        if hi < lo:
            raise TaskUnavailable("too few verified unmatched points in image 1 (or n < 2)")
        n_un = int(rng.integers(lo, hi + 1))
    k = n - n_un
    if len(id1) < k:
        raise TaskUnavailable("too few matched points")
    d_lo = d_want = 0
    if level in ("L2", "L3"):
        d_lo = max(1, dist_y[0])
        d_hi = max(d_lo, n if dist_y[1] is None else dist_y[1])
        d_hi = min(d_hi, len(un2) + len(pool_rows))
        if d_hi < d_lo:
            raise TaskUnavailable("too few distractors in image 2")
        d_want = int(rng.integers(d_lo, d_hi + 1))

    for _ in range(tries):
        n1, n2 = Counter(), Counter()  # drawn points per cluster in image 1 / image 2
        X, Y, xs, ys = [], [], [], []  # X: (id1, y key or None, cluster); Y: (id2, cluster); xs/ys: coords
        for q in _order(len(id1), c1, spatial == "moderate", rng):
            if (n1[c1[q]] < cap and (spatial != "sparse" or n2[c2[q]] < cap)
                    and _far(p1[q], xs, sep1) and _far(p2[q], ys, sep2)):
                X.append((int(id1[q]), len(Y), int(c1[q])))
                Y.append((int(id2[q]), int(c2[q])))
                xs.append(p1[q])
                ys.append(p2[q])
                n1[c1[q]] += 1
                n2[c2[q]] += 1
                if len(X) == k:
                    break
        if len(X) < k:
            continue
        for i in rng.permutation(un1) if n_un else []:
            if n1[cl1[i]] < cap and _far(kp1[i], xs, sep1):
                X.append((int(i), None, int(cl1[i])))
                xs.append(kp1[i])
                n1[cl1[i]] += 1
                if len(X) == n:
                    break
        if len(X) < n:
            continue
        # image-2 distractors: verified ones first, then partners of unselected pool matches far from all of X
        chosen = {x[0] for x in X}
        spare = [int(id2[q]) for q in rng.permutation(pool_rows)
                 if id1[q] not in chosen and _far(p1[q], xs, sep1)]
        n_dist = 0
        for j in (list(rng.permutation(un2)) + spare) if d_want else []:
            if n2[cl2[j]] < cap and _far(kp2[j], ys, sep2):
                Y.append((int(j), int(cl2[j])))
                ys.append(kp2[j])
                n2[cl2[j]] += 1
                n_dist += 1
                if n_dist == d_want:
                    break
        if n_dist >= d_lo:
            break
    else:
        raise TaskUnavailable("min separation / cluster limits")

    # shuffle both sides so labels carry no information
    xperm, yperm = rng.permutation(len(X)), rng.permutation(len(Y))
    y_labels = y_labels_for(len(Y))
    label_of = {int(old): y_labels[new] for new, old in enumerate(yperm)}
    X = [X[p] for p in xperm]
    return dict(level=level, spatial=spatial, n=n, m=len(Y),
                x_idx=[x[0] for x in X], y_idx=[Y[p][0] for p in yperm],
                x_points=[[float(v) for v in xs[p]] for p in xperm],
                y_points=[[float(v) for v in ys[p]] for p in yperm],
                x_cluster=[x[2] for x in X], y_cluster=[Y[p][1] for p in yperm],
                x_labels=x_labels_for(n), y_labels=y_labels,
                target=[None if x[1] is None else label_of[x[1]] for x in X])

# -----------------------------------------------------------------------------
# Drawing

# both images alike (the released benchmark's look): a green ring centred on the point (hollow, so the point
# itself stays visible) and the numeric id in white on a black box beside it, joined by a thin black line
RING = (0, 255, 0)
BOX = (0, 0, 0)
TEXT = (255, 255, 255)
INK = (0, 0, 0)


@functools.lru_cache(maxsize=8)
def _font(size):
    return ImageFont.load_default(size=size)


def marker_sizes(max_side):
    """Font size and marker radius at the drawn resolution (about 18 px text and 6 px markers at 640)."""
    font_size = max(11, round(0.028 * max_side))
    return font_size, max(3, round(0.35 * font_size))


def resize(img, max_side):
    """Scale so the longer side is max_side (up or down), keeping aspect. Returns (img, (sx, sy))."""
    w, h = img.size
    s = max_side / max(w, h)
    W, H = max(1, round(w * s)), max(1, round(h * s))
    return img.convert("RGB").resize((W, H), Image.LANCZOS), (W / w, H / h)


def to_drawn(points, scale):
    """Original pixel coords -> drawn pixel coords (pixel centres at integers on both sides)."""
    sx, sy = scale
    return [((x + 0.5) * sx - 0.5, (y + 0.5) * sy - 0.5) for x, y in points]


def _overlap(a, b):
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _box_dist(box, p):
    dx = max(box[0] - p[0], 0, p[0] - box[2])
    dy = max(box[1] - p[1], 0, p[1] - box[3])
    return math.hypot(dx, dy)


def draw_markers(img, points, labels, max_side):
    """Draw markers at points (drawn coords) with labels in boxes beside them; modifies img.
    Each label goes to the first of 8 directions x 3 distances whose box stays inside the image, overlaps no
    placed box and no marker, and is nearer to its own point than to any other (else the least bad one). Draw order: leader lines, boxes, markers on top,
    so a marker is never hidden. Returns [dict(label, point, box)] with box = (x0, y0, x1, y1)."""
    font_size, r = marker_sizes(max_side)
    font = _font(font_size)
    W, H = img.size
    draw = ImageDraw.Draw(img)
    markers = [(x - r - 1, y - r - 1, x + r + 1, y + r + 1) for x, y in points]
    placed = []
    dirs = [(1, 0), (-1, 0), (0, -1), (0, 1), (1, -1), (-1, -1), (1, 1), (-1, 1)]
    for q, ((x, y), lab) in enumerate(zip(points, labels)):
        tb = draw.textbbox((0, 0), lab, font=font)
        bw, bh = tb[2] - tb[0] + 6, tb[3] - tb[1] + 4
        best = None
        for dist in (1.0, 1.8, 2.6):
            for dx, dy in dirs:
                cx = x + dx * (r + 3 + dist * bw / 2)
                cy = y + dy * (r + 3 + dist * bh / 2)
                box = (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
                if box[0] < 0 or box[1] < 0 or box[2] > W - 1 or box[3] > H - 1:
                    continue
                cost = sum(_overlap(box, o) for o in placed) + sum(_overlap(box, o) for o in markers)
                own = _box_dist(box, (x, y))  # a label nearer to another marker than to its own is ambiguous
                cost += 100.0 * sum(_box_dist(box, p) <= own + 2 for u, p in enumerate(points) if u != q)
                if best is None or cost < best[0]:
                    best = (cost, box)
                if cost == 0:
                    break
            if best is not None and best[0] == 0:
                break
        if best is None:  # image too small for any candidate: clamp the first one inside
            cx = min(max(x + r + 3 + bw / 2, bw / 2), W - 1 - bw / 2)
            cy = min(max(y, bh / 2), H - 1 - bh / 2)
            best = (None, (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2))
        placed.append(best[1])
    out = [dict(label=lab, point=(float(x), float(y)), box=tuple(float(v) for v in box))
           for (x, y), lab, box in zip(points, labels, placed)]
    for (x, y), box in zip(points, placed):
        bx = min(max(x, box[0]), box[2])
        by = min(max(y, box[1]), box[3])
        draw.line([(x, y), (bx, by)], fill=INK, width=1)
    for lab, box in zip(labels, placed):
        tb = draw.textbbox((0, 0), lab, font=font)
        draw.rectangle(box, fill=BOX)
        draw.text((box[0] + 3 - tb[0], box[1] + 2 - tb[1]), lab, font=font, fill=TEXT)
    for x, y in points:
        draw.ellipse((x - r, y - r, x + r, y + r), outline=RING, width=2)
    return out


def draw_prompts(img1, img2, x_points, y_points, x_labels, y_labels, max_side, return_geometry=False):
    """Clean PIL images + ORIGINAL-pixel points -> prompted PIL images at max_side (new images).
    With return_geometry also returns dict(scale1, scale2, labels1, labels2) (drawn coordinates)."""
    im1, s1 = resize(img1, max_side)
    im2, s2 = resize(img2, max_side)
    g1 = draw_markers(im1, to_drawn(x_points, s1), x_labels, max_side)
    g2 = draw_markers(im2, to_drawn(y_points, s2), y_labels, max_side)
    if return_geometry:
        return im1, im2, dict(scale1=s1, scale2=s2, labels1=g1, labels2=g2)
    return im1, im2

# -----------------------------------------------------------------------------
# Prompt


def build_prompt(n, m, actor=False, action_step=ACTION_STEP_DEG, template=None):
    """The user text shown with (image 1, image 2): widematch.prompts.default_prompt (thinking block, then the JSON
    answer), or template (the text of --prompt-template, used as it is). Same wording for every level, so it leaks
    nothing. actor (HATCH's ActoR): the reply must also state the camera motion from view 1 to view 2 in an
    <action> block before the answer block (grammar and reward in reward.py), angles rounded to multiples of
    action_step; its instructions come before our answer format, or after a template."""
    act = action_instructions(action_step) if actor else None
    if template is None:
        return prompts.default_prompt(think=True, n=n, m=m, before_answer=act)
    return template.rstrip() + ("\n\n" + act.strip() if actor else "")  # a template's own text is kept whole

# -----------------------------------------------------------------------------
# One task (reads the pair's images, writes nothing; grpo.py calls this online)


def pool_path(pool_dir, p):
    return p if os.path.isabs(p) else os.path.join(pool_dir, p)


def load_pairs(pool_dir, split=None):
    """pairs.jsonl -> list of pair dicts (optionally one split)."""
    path = os.path.join(pool_dir, "pairs.jsonl")
    with open(path) as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    return [p for p in pairs if split is None or p["split"] == split]


def load_arrays(pool_dir, pair):
    with np.load(pool_path(pool_dir, pair["npz"])) as z:
        return {k: z[k] for k in z.files}


def make_task(pair, arrays, level, spatial, n, rng, pool_dir, max_side=640, min_sep=20.0, task_id=None,
              actor=False, action_step=ACTION_STEP_DEG, prompt_template=None, **sample_kw):
    """One task from one pool pair -> (task dict, [prompted PIL img1, img2]). min_sep is in DRAWN pixels.
    Raises TaskUnavailable (see sample_points). task["images"] is None: the CLI fills it when it saves.
    actor / action_step: build_prompt's ActoR action block (task["actor"] records it); prompt_template: the
    question text to use instead of ours (widematch.prompts.read_template's result)."""
    sizes = [(pair["width1"], pair["height1"]), (pair["width2"], pair["height2"])]
    seps = tuple(min_sep * max(size) / max_side for size in sizes)  # drawn pixels -> original pixels
    # sample first: grpo tries pair after pair until one can supply the request, and a pair that cannot must
    # not cost two full-size image decodes
    s = sample_points(arrays, level, spatial, n, rng, min_sep=seps, **sample_kw)
    paths = [os.path.abspath(pool_path(pool_dir, pair[k])) for k in ("image1", "image2")]
    imgs = []
    for path, size in zip(paths, sizes):
        img = Image.open(path)
        img.load()
        if img.size != size:
            raise ValueError(f"make_task: {path} is {img.size}, pairs.jsonl says {size} ({pair['pair_id']})")
        imgs.append(img)
    for key, im in (("x_points", imgs[0]), ("y_points", imgs[1])):
        P = np.asarray(s[key])
        if P.min() < -0.5 or (P + 0.5 > np.asarray(im.size)).any():
            raise ValueError(f"make_task: {pair['pair_id']} has {key} outside its {im.size} image ({pair['npz']})")
    im1, im2, geom = draw_prompts(imgs[0], imgs[1], s["x_points"], s["y_points"], s["x_labels"], s["y_labels"],
                                  max_side, return_geometry=True)
    task = dict(task_id=task_id or f"{pair['pair_id']}-{level}-{spatial}-n{n}", pair_id=pair["pair_id"],
                source=pair["source"], scene=pair["scene"], scene_type=pair["scene_type"], split=pair["split"],
                bin=pair["bin"], delta_v=pair["delta_v"], level=level, spatial=spatial, n=s["n"], m=s["m"],
                images=None, originals=paths, x_points=s["x_points"], y_points=s["y_points"],
                x_labels=s["x_labels"], y_labels=s["y_labels"],
                prompt=build_prompt(s["n"], s["m"], actor=actor, action_step=action_step, template=prompt_template),
                actor=actor,
                action_step=action_step,
                target=s["target"], K1=pair["K1"], K2=pair["K2"], R=pair.get("R"), t=pair.get("t"),
                x_idx=[int(i) for i in s["x_idx"]], y_idx=[int(j) for j in s["y_idx"]],
                scale1=list(geom["scale1"]), scale2=list(geom["scale2"]), size1=list(im1.size),
                size2=list(im2.size))
    return task, [im1, im2]

# -----------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="pool pairs -> prompted matching tasks")
    ap.add_argument("--pool", default="pool", help="pool dir from build_pool.py")
    ap.add_argument("--out", default="tasks", help="output dir")
    ap.add_argument("--split", default="test", choices=["train", "test"])
    ap.add_argument("--per-pair", type=int, default=None, help="tasks drawn per pair (default: test 1, train 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-side", type=int, default=1024, help="longer side of the prompted images (the paper's 1024)")
    ap.add_argument("--levels", default="L1,L2,L3")
    ap.add_argument("--spatial", default="sparse,moderate,dense")
    ap.add_argument("--n-min", type=int, default=4, help="points in image 1, drawn uniformly in [n-min, n-max]")
    ap.add_argument("--n-max", type=int, default=12)
    ap.add_argument("--dist-y-min", type=int, default=2, help="L2/L3 distractors in image 2, at least")
    ap.add_argument("--dist-y-max", type=int, default=0, help="... at most (0 = n)")
    ap.add_argument("--unmatched-min", type=float, default=0.25, help="L3 unmatched share of X, at least")
    ap.add_argument("--unmatched-max", type=float, default=0.5, help="... at most")
    ap.add_argument("--min-sep", type=float, default=20.0, help="min distance between drawn points (drawn px)")
    ap.add_argument("--per-cluster", type=int, default=3, help="moderate mode: max points per cluster")
    ap.add_argument("--image-format", default="jpg", choices=["png", "jpg"],
                    help="jpg (q95) writes ~10x faster than png on noisy textures; labels stay sharp")
    ap.add_argument("--pairs", "--max-pairs", dest="pairs", type=int, default=0,
                    help="exactly N pairs, drawn seeded and stratified by bin within each source (0 = all pairs)")
    ap.add_argument("--source-shares", default=None,
                    help="e.g. scannet=27.7,uco3d=28.0 (weights, normalised; unlisted sources get no pairs; "
                         "default: each source's share of the split); needs --pairs")
    ap.add_argument("--level-shares", default=None,
                    help="e.g. L1=32.5,L2=36.8,L3=30.7 (weights over tasks; default: equal over --levels)")
    ap.add_argument("--mix", default=None, choices=["paper"],
                    help="paper: ReasonMatch-Bench's published mix (2810 pairs, its source and level shares); "
                         "explicit --pairs / --source-shares / --level-shares win")
    ap.add_argument("--actor", action="store_true", help="HATCH ActoR: ask for the camera motion before the answer")
    ap.add_argument("--action-step", type=float, default=ACTION_STEP_DEG, help="ActoR angle rounding (degrees)")
    ap.add_argument("--prompt-template", default=None,
                    help="ask with this question instead of ours: the released evaluate/matchbench/utils.py "
                         "(its thinking template) or a text file (see widematch/prompts.py)")
    return ap.parse_args(argv)


PAPER_MIX = dict(pairs=2810, source_shares="scannet=27.7,uco3d=28.0,dl3dv=27.0,re10k=17.2",
                 level_shares="L1=32.5,L2=36.8,L3=30.7")  # ReasonMatch-Bench as published (no CO3D)
PAPER_SCENE_TYPES = {"indoor": 55.1, "object": 28.0, "outdoor": 16.9}  # follows from its sources' scenes


def parse_shares(text, flag, allowed=None):
    """'scannet=27.7,uco3d=28' -> {"scannet": 27.7, "uco3d": 28.0} in the listed order (weights; normalised by
    the caller). Raises ValueError naming the flag and the bad item."""
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, value = (x.strip() for x in item.partition("="))
        try:
            w = float(value)
        except ValueError:
            w = float("nan")
        if not sep or not name or not w >= 0 or math.isinf(w):
            raise ValueError(f"{flag}: bad item {item!r} (want NAME=weight, weight >= 0)")
        if allowed is not None and name not in allowed:
            raise ValueError(f"{flag}: unknown name {name!r} (one of {', '.join(allowed)})")
        if name in out:
            raise ValueError(f"{flag}: {name} listed twice")
        out[name] = w
    if not out or sum(out.values()) <= 0:
        raise ValueError(f"{flag}: no positive weight in {text!r}")
    return out


def largest_remainder(weights, total):
    """{name: count} proportional to weights, summing to total (Hamilton's method: the floor of each quota, then
    one more to the largest remainders; ties: larger weight, then name). A count never exceeds its quota rounded
    up, so weights that are availabilities are never over-drawn."""
    s = math.fsum(weights.values())
    quota = {k: total * w / s for k, w in weights.items()}
    counts = {k: math.floor(q) for k, q in quota.items()}
    for k in sorted(weights, key=lambda k: (counts[k] - quota[k], -weights[k], k))[:total - sum(counts.values())]:
        counts[k] += 1
    return counts


def spread(counts):
    """A sequence holding each key counts[key] times, each key spread evenly along it (at every position the key
    furthest behind its quota goes next; ties: the listed order)."""
    total, used, seq = sum(counts.values()), dict.fromkeys(counts, 0), []
    for i in range(total):
        k = max(counts, key=lambda k: counts[k] * (i + 1) / total - used[k])  # max keeps the first of ties
        used[k] += 1
        seq.append(k)
    return seq


def compose_pairs(pairs, n_pairs, source_shares=None, seed=0, split="test"):
    """Choose exactly n_pairs pairs: per-source counts by largest remainder of source_shares ({source: weight};
    unlisted sources get none; None: each source's share of the given pairs), then per source a seeded draw
    stratified by bin (each bin's count by largest remainder of its size). -> (chosen {source: [pairs]},
    reserve {source: [the source's other pairs, bin by bin]}, asked {source: count}). Raises ValueError naming
    every source that has fewer pairs than asked."""
    by_source = {}
    for p in sorted(pairs, key=lambda p: p["pair_id"]):
        by_source.setdefault(p["source"], []).append(p)
    if source_shares is None and n_pairs > len(pairs):
        raise ValueError(f"--pairs {n_pairs}: the {split} split has only {len(pairs)} pairs")
    weights = source_shares if source_shares is not None else {s: len(g) for s, g in sorted(by_source.items())}
    asked = largest_remainder(weights, n_pairs)
    short = [f"{s}: {len(by_source.get(s, []))} available, {c} asked" for s, c in asked.items()
             if c > len(by_source.get(s, []))]
    if short:
        raise ValueError(f"--pairs {n_pairs} with these source shares asks more {split} pairs than a source has "
                         f"({'; '.join(short)})")
    chosen, reserve = {}, {}
    for s, c in asked.items():
        rng = np.random.default_rng([seed, zlib.crc32(s.encode())])
        by_bin = {}
        for p in by_source.get(s, []):
            by_bin.setdefault(int(p["bin"]), []).append(p)
        per_bin = largest_remainder({b: len(g) for b, g in sorted(by_bin.items())}, c) if by_bin else {}
        chosen[s], reserve[s] = [], []
        for b in sorted(by_bin):
            drawn = [by_bin[b][i] for i in rng.permutation(len(by_bin[b]))]
            chosen[s] += drawn[:per_bin[b]]
            reserve[s] += drawn[per_bin[b]:]
    return chosen, reserve, asked


def take_replacement(reserve, pair):
    """Pop the reserve pair of pair's source nearest in bin (the same bin first; ties: the reserve's order), or
    None when the source has none left."""
    group = reserve.get(pair["source"], [])
    if not group:
        return None
    i = min(range(len(group)), key=lambda i: abs(int(group[i]["bin"]) - int(pair["bin"])))
    return group.pop(i)


def assign_configs(pairs, per_pair, levels, spatials, seed, level_shares=None):
    """(level, spatial) per task. Tasks are grouped by source (seeded pair order within it, a pair's per_pair
    tasks together); the level counts over ALL tasks follow level_shares ({level: weight}; default equal over
    levels) by largest remainder, laid out with spread() along that order, so every source (and every pair with
    per_pair > 1) gets the levels in about the global proportions; within each (source, level) a counter walks
    the spatial modes (offset by the level), so spatial modes are balanced within each level.
    Returns [(pair, k, level, spatial)]."""
    weights = level_shares or {lv: 1.0 for lv in levels}
    slots, spatial_order = [], {}
    for source in sorted({p["source"] for p in pairs}):
        rng = np.random.default_rng([seed, zlib.crc32(source.encode())])
        spatial_order[source] = [spatials[i] for i in rng.permutation(len(spatials))]
        group = sorted((p for p in pairs if p["source"] == source), key=lambda p: p["pair_id"])
        slots += [(group[q], k) for q in rng.permutation(len(group)) for k in range(per_pair)]
    plan, walked = [], Counter()
    for (pair, k), level in zip(slots, spread(largest_remainder(weights, len(slots)))):
        sp = spatial_order[pair["source"]]
        c = walked[pair["source"], level]
        walked[pair["source"], level] += 1
        plan.append((pair, k, level, sp[(c + list(weights).index(level)) % len(sp)]))
    return plan


def draw_task(pair, k, level, spatial, args, cache):
    """Task k of a pair (seeded by the pair and k) -> (task, images); raises TaskUnavailable. cache holds the
    last pair's arrays (the plan is grouped by pair)."""
    if pair["pair_id"] not in cache:
        cache.clear()
        cache[pair["pair_id"]] = load_arrays(args.pool, pair)
    rng = np.random.default_rng([args.seed, zlib.crc32(pair["pair_id"].encode()), k])
    n = int(rng.integers(args.n_min, args.n_max + 1))
    return make_task(pair, cache[pair["pair_id"]], level, spatial, n, rng, args.pool, args.max_side,
                     min_sep=args.min_sep, task_id=f"{pair['pair_id']}-{k}", per_cluster=args.per_cluster,
                     dist_y=(args.dist_y_min, args.dist_y_max or None),
                     unmatched_frac=(args.unmatched_min, args.unmatched_max), actor=args.actor,
                     action_step=args.action_step, prompt_template=args.prompt_text)


def write_tasks(plan, args, out_images, reserve=None):
    """Draw and write the plan's tasks. A pair that cannot supply its task is skipped (counted), or, with a
    reserve ({source: [pairs]}, from compose_pairs), replaced by the reserve pair of its source nearest in bin,
    so the file holds exactly the planned number. -> (tasks, skipped Counter, number of replacements)."""
    tasks, skipped, replaced, cache = [], Counter(), 0, {}
    for pair, k, level, spatial in tqdm(plan, desc=f"make_tasks {args.split}"):
        made = None
        while made is None:
            try:
                made = draw_task(pair, k, level, spatial, args, cache)
            except TaskUnavailable as e:
                skipped[f"{level}/{spatial}: {e}"] += 1
                if reserve is None:
                    break
                failed, pair = pair, take_replacement(reserve, pair)
                if pair is None:
                    sys.exit(f"make_tasks.py: error: no {args.split} pair of source {failed['source']} left to "
                             f"replace {failed['pair_id']}, which cannot supply {level}/{spatial} ({e}); ask fewer "
                             f"--pairs of it or relax --n-min/--min-sep")
                replaced += 1
        if made is None:
            continue
        task, imgs = made
        task["images"] = []
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", task["task_id"])  # pair ids contain "/"
        for v, img in zip((1, 2), imgs):
            rel = os.path.join(os.path.basename(out_images), f"{safe}_{v}.{args.image_format}")
            img.save(os.path.join(args.out, rel), **({"compress_level": 1} if args.image_format == "png" else
                                                     {"quality": 95}))  # fast PNG; JPEG sharp enough for labels
            task["images"].append(rel)
        tasks.append(task)
    return tasks, skipped, replaced


def report(tasks, skipped):
    for key in ("level", "spatial", "source", "scene_type", "bin"):
        c = Counter(t[key] for t in tasks)
        print(f"  by {key:10s} " + "  ".join(f"{k}: {v}" for k, v in sorted(c.items())))
    for reason, v in sorted(skipped.items()):
        print(f"  skipped {v:5d}  {reason}")


def percent(weights):
    s = math.fsum(weights.values())
    return {k: round(100 * w / s, 2) for k, w in weights.items()}


def composition(tasks, split_pairs, source_shares, level_shares, args, replaced):
    """What was asked and what the file holds, in percent (pure): sources (asked: --source-shares, or each
    source's share of the split), levels (asked: --level-shares, or equal), scene types (achieved; with --mix
    paper also the paper's), per-source bins (counts)."""
    n = len(tasks)
    achieved = lambda key: {k: round(100 * v / n, 2) for k, v in sorted(Counter(t[key] for t in tasks).items())}
    counts = lambda key: dict(sorted(Counter(t[key] for t in tasks).items()))
    split_share = Counter(p["source"] for p in split_pairs)
    comp = dict(split=args.split, pairs_asked=args.pairs or len(split_pairs), per_pair=args.per_pair, tasks=n,
                pairs=len({t["pair_id"] for t in tasks}), replaced=replaced, seed=args.seed, mix=args.mix,
                source=dict(asked=percent(source_shares or dict(sorted(split_share.items()))),
                            achieved=achieved("source"), counts=counts("source")),
                level=dict(asked=percent(level_shares), achieved=achieved("level"), counts=counts("level")),
                scene_type=dict(achieved=achieved("scene_type"), counts=counts("scene_type")),
                bins={s: dict(sorted(Counter(int(t["bin"]) for t in tasks if t["source"] == s).items()))
                      for s in sorted({t["source"] for t in tasks})})
    if args.mix == "paper":
        comp["scene_type"]["paper"] = PAPER_SCENE_TYPES
    return comp


def print_composition(comp):
    print(f"  composition ({comp['split']}): {comp['tasks']} tasks from {comp['pairs']} pairs "
          f"({comp['replaced']} replaced), shares in percent:")
    for key in ("source", "level", "scene_type"):
        c = comp[key]
        asked = c.get("asked", c.get("paper", {}))
        names = list(dict.fromkeys([*asked, *c["achieved"]]))
        print(f"    {key:10s} " + "  ".join(f"{k} {asked.get(k, 0) if asked else '-'} -> {c['achieved'].get(k, 0)}"
                                           for k in names) + ("  (asked -> achieved)" if asked else ""))


def main(argv=None):
    args = parse_args(argv)
    try:
        args.prompt_text = None if args.prompt_template is None else prompts.read_template(args.prompt_template)
    except prompts.TemplateError as e:
        sys.exit(f"make_tasks.py: error: --prompt-template {e}")
    shard = os.path.join(args.pool, "shard.json")
    if os.path.isfile(shard) and not os.path.isfile(os.path.join(args.pool, "pairs.jsonl")):
        with open(shard) as f:
            i, n = json.load(f)["shard"]
        sys.exit(f"make_tasks.py: error: --pool {args.pool} is shard {i}/{n} of a sharded build (no bins, no split "
                 f"yet): join all {n} shards first with build_pool.py --merge SHARD_DIR... --out POOL")
    if args.per_pair is None:
        args.per_pair = 1 if args.split == "test" else 3  # the paper's benchmark counts pairs
    if args.mix == "paper":
        args.pairs = args.pairs or PAPER_MIX["pairs"]
        args.source_shares = args.source_shares or PAPER_MIX["source_shares"]
        args.level_shares = args.level_shares or PAPER_MIX["level_shares"]
    if not os.path.isfile(os.path.join(args.pool, "pairs.jsonl")):
        sys.exit(f"make_tasks.py: error: --pool {args.pool} has no pairs.jsonl")
    levels, spatials = args.levels.split(","), args.spatial.split(",")
    bad = [x for x in levels if x not in LEVELS] + [x for x in spatials if x not in SPATIAL]
    if bad or not 1 <= args.n_min <= args.n_max or args.per_pair < 1 or args.pairs < 0:
        sys.exit(f"make_tasks.py: error: bad --levels/--spatial/--n-min/--n-max/--per-pair/--pairs "
                 f"({bad or (args.n_min, args.n_max, args.per_pair, args.pairs)})")
    try:
        source_shares = parse_shares(args.source_shares, "--source-shares") if args.source_shares else None
        level_shares = (parse_shares(args.level_shares, "--level-shares", LEVELS) if args.level_shares
                        else {lv: 1.0 for lv in levels})
    except ValueError as e:
        sys.exit(f"make_tasks.py: error: {e}")
    if source_shares and not args.pairs:
        sys.exit("make_tasks.py: error: --source-shares needs --pairs N")
    split_pairs = load_pairs(args.pool, args.split)
    pairs, reserve = split_pairs, None
    if args.pairs:
        try:
            chosen, reserve, _ = compose_pairs(split_pairs, args.pairs, source_shares, args.seed, args.split)
        except ValueError as e:
            sys.exit(f"make_tasks.py: error: {e}")
        pairs = [p for group in chosen.values() for p in group]
    out_images = os.path.join(args.out, f"{args.split}_images")
    os.makedirs(out_images, exist_ok=True)
    plan = assign_configs(pairs, args.per_pair, levels, spatials, args.seed, level_shares)
    tasks, skipped, replaced = write_tasks(plan, args, out_images, reserve)
    with open(os.path.join(args.out, f"{args.split}.jsonl"), "w") as f:
        for t in tasks:
            f.write(json.dumps(t) + "\n")
    with open(os.path.join(args.out, f"args_{args.split}.json"), "w") as f:
        json.dump(dict({k: v for k, v in vars(args).items() if k != "prompt_text"},
                       prompt=prompts.describe(args.prompt_template)), f, indent=2)
    if not tasks:
        sys.exit(f"make_tasks.py: error: no task could be made from the {args.split} split of {args.pool}")
    comp = composition(tasks, split_pairs, source_shares, level_shares, args, replaced)
    with open(os.path.join(args.out, f"composition_{args.split}.json"), "w") as f:
        json.dump(comp, f, indent=2)
    report(tasks, skipped)
    print_composition(comp)
    print(f"make_tasks.py: {args.split}: {len(tasks)} tasks from {comp['pairs']} pairs "
          f"({f'{replaced} replaced' if reserve is not None else f'{sum(skipped.values())} skipped'}) -> "
          f"{os.path.join(args.out, args.split + '.jsonl')}")


if __name__ == "__main__":
    main()
