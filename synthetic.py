"""synthetic.py: procedural demo data in the REAL dataset layouts (ScanNet, COLMAP, CO3D v2, RealEstate10K).

Renders small analytic scenes (rooms, boxes, spheres, cylinders, a ground plane) by ray casting in pure numpy,
with exact depth and exact cameras, and writes them the way the real datasets ship, so build_pool.py runs on the
demo data with the same readers it uses on the real data. No GPU path. World frame: metres, z up.

Commands
    python synthetic.py --out demo_data            # CPU demo: 2 scenes x 24 frames per layout, ~20 s, ~30 MB
    python synthetic.py --out /tmp/d --frames 3 --image-scale 0.5      # tiny data for fast tests
    python synthetic.py --out demo_re10k --layouts re10k --frames 10    # RealEstate10K clips only (~2 s)
    python synthetic.py --out /tmp/k --layouts scannet,co3d --sensor kinect --pose-jitter 0   # sensor-like depth

Reads nothing. Writes under --out: scannet/ (SensReader export), scannet_sens/ (raw .sens), colmap/, co3d/,
opt-in re10k/ and dl3dv/, each in its dataset's real layout; synthetic_meta.json (every scene and frame with
its exact K and pose, for tests); args.json.
Python API for tests: make_scene, raycast, render, load_meta, find_frame.

Details (every layout field by field, camera conventions, --sensor kinect, the API, departures from real data):
docs/synthetic.md.
"""
import argparse
import collections
import gzip
import json
import math
import os
import shutil
import struct
import sys
import zlib

import cv2
import numpy as np
from tqdm import tqdm

EPS = 1e-6
LIGHT = np.array([0.35, 0.5, 0.79]) / np.linalg.norm([0.35, 0.5, 0.79])

# -----------------------------------------------------------------------------
# scene: analytic primitives with per-face procedural textures


def _texture(rng, h, w):
    """Rich, non-repeating colour texture (h,w,3) float32 in 0..255: multi-scale value noise + random
    rectangles, discs and lines (blob-like structure gives SIFT corners) + optional stripes."""
    img = np.empty((h, w, 3), np.float32)
    img[:] = rng.uniform(50, 200, 3)
    for cell, amp in ((96, 45.0), (32, 35.0), (10, 25.0), (3, 12.0)):
        gh, gw = h // cell + 2, w // cell + 2
        g = rng.normal(0, 1, (gh, gw, 3)).astype(np.float32)
        img += amp * cv2.resize(g, (gw * cell, gh * cell), interpolation=cv2.INTER_CUBIC)[:h, :w]
    for _ in range(h * w // 1200 + 4):
        col = tuple(float(c) for c in rng.uniform(0, 255, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        s = int(rng.integers(3, 30))
        shape = rng.integers(0, 4)
        if shape == 0:
            cv2.rectangle(img, (x, y), (x + s, y + int(rng.integers(3, 30))), col, -1)
        elif shape == 1:
            cv2.circle(img, (x, y), s // 2 + 1, col, -1)
        elif shape == 2:
            cv2.line(img, (x, y), (x + int(rng.integers(-40, 40)), y + int(rng.integers(-40, 40))), col, 2)
        else:
            cv2.ellipse(img, (x, y), (s, s // 2 + 1), float(rng.uniform(0, 180)), 0, 360, col, -1)
    if rng.random() < 0.3:  # coloured stripes, modulated by the noise so they never repeat exactly
        period = rng.uniform(8, 40)
        stripes = (np.sin(np.arange(w, dtype=np.float32) * (2 * np.pi / period)) > 0)[None, :, None]
        img = np.where(stripes, img * 0.6 + 0.4 * rng.uniform(0, 255, 3).astype(np.float32), img)
    return np.clip(img, 0, 255)


class Scene:
    """Primitives (dicts) + textures. Every primitive has 'type' and 'tex' (texture id per face).
    Textures are made on first use from their own seed, so geometry-only use (raycast) stays cheap."""

    def __init__(self, seed, kind):
        self.seed, self.kind = seed, kind
        self.prims, self._tex_specs, self._tex_cache = [], [], {}
        self.sky = False
        self.bounds = None  # (2,3) lo, hi of the walkable region, set by make_scene
        self.rng = np.random.default_rng(seed)
        self._detail = None

    def _tex(self, extent_u, extent_v, density=100.0):
        density = min(density, 1024.0 / max(extent_u, extent_v))
        h, w = max(int(extent_v * density) + 2, 4), max(int(extent_u * density) + 2, 4)
        self._tex_specs.append((h, w, density))
        return len(self._tex_specs) - 1

    def texture(self, i):
        """(img float32 (h,w,3) in 0..255, texels per metre) of texture i."""
        if i not in self._tex_cache:
            h, w, density = self._tex_specs[i]
            self._tex_cache[i] = (_texture(np.random.default_rng([self.seed, i]), h, w), density)
        return self._tex_cache[i]

    @property
    def detail(self):  # fine detail layer, tiled (see _shade)
        if self._detail is None:
            g = np.random.default_rng([self.seed, 10**6]).normal(0, 1, (258, 258, 3)).astype(np.float32)
            g = cv2.GaussianBlur(g, (0, 0), 0.8)[1:-1, 1:-1]  # film-grain-like, no shapes: tiling stays invisible
            self._detail = 20.0 * g / g.std()
        return self._detail

    def add_box(self, lo, hi, inside=False, obj=False):
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        ext = hi - lo
        tex = []
        for axis in range(3):
            eu, ev = _face_extents(axis, ext)
            tex += [self._tex(eu, ev), self._tex(eu, ev)]
        self.prims.append(dict(type="room" if inside else "box", lo=lo, hi=hi, tex=tex, obj=obj))

    def add_sphere(self, c, r, obj=False):
        self.prims.append(dict(type="sphere", c=np.asarray(c, float), r=float(r), obj=obj,
                               tex=[self._tex(2 * np.pi * r, np.pi * r)]))

    def add_cylinder(self, c, r, z0, z1, obj=False):
        self.prims.append(dict(type="cylinder", c=np.asarray(c, float), r=float(r), z0=float(z0),
                               z1=float(z1), obj=obj,
                               tex=[self._tex(2 * np.pi * r, z1 - z0), self._tex(2 * r, 2 * r),
                                    self._tex(2 * r, 2 * r)]))

    def add_ground(self, c, half):
        self.prims.append(dict(type="ground", c=np.asarray(c, float), half=float(half), obj=False,
                               tex=[self._tex(2 * half, 2 * half)]))

    def bounding_sphere(self, p):
        if p["type"] == "box":
            return (p["lo"] + p["hi"]) / 2, np.linalg.norm(p["hi"] - p["lo"]) / 2
        if p["type"] == "sphere":
            return p["c"], p["r"]
        if p["type"] == "cylinder":
            h = (p["z1"] - p["z0"]) / 2
            return np.array([p["c"][0], p["c"][1], p["z0"] + h]), math.hypot(p["r"], h)
        return None, None  # room / ground: always tested

    def inside_any(self, x, margin):
        """True if point x is inside (or within margin of) any solid primitive (keeps cameras out of objects)."""
        for p in self.prims:
            if p["type"] == "box" and np.all(x > p["lo"] - margin) and np.all(x < p["hi"] + margin):
                return True
            if p["type"] == "sphere" and np.linalg.norm(x - p["c"]) < p["r"] + margin:
                return True
            if p["type"] == "cylinder" and (np.linalg.norm(x[:2] - p["c"][:2]) < p["r"] + margin
                                            and p["z0"] - margin < x[2] < p["z1"] + margin):
                return True
        return False


def _face_extents(axis, ext):
    # vertical faces: u along the other horizontal axis, v along z; horizontal faces: u = x, v = y
    if axis == 0:
        return ext[1], ext[2]
    if axis == 1:
        return ext[0], ext[2]
    return ext[0], ext[1]


def _random_objects(scene, rng, n, x_range, y_range, z_base, size_range, keep_clear=None):
    """Drop n random boxes / spheres / cylinders on the plane z = z_base inside the given ranges."""
    placed = []
    for _ in range(n * 20):
        if len(placed) == n:
            break
        s = rng.uniform(*size_range)
        x, y = rng.uniform(*x_range), rng.uniform(*y_range)
        if any(math.hypot(x - px, y - py) < (s + ps) * 0.75 for px, py, ps in placed):
            continue
        if keep_clear is not None and math.hypot(x - keep_clear[0], y - keep_clear[1]) < keep_clear[2] + s:
            continue
        placed.append((x, y, s))
        kind = rng.integers(0, 4)
        if kind <= 1:
            h = s * rng.uniform(0.6, 2.0)
            sx, sy = s * rng.uniform(0.5, 1.0), s * rng.uniform(0.5, 1.0)
            scene.add_box([x - sx / 2, y - sy / 2, z_base], [x + sx / 2, y + sy / 2, z_base + h], obj=True)
        elif kind == 2:
            r = s / 2
            scene.add_sphere([x, y, z_base + r], r, obj=True)
        else:
            r = s * rng.uniform(0.25, 0.45)
            scene.add_cylinder([x, y, 0.0], r, z_base, z_base + s * rng.uniform(0.8, 2.0), obj=True)


def make_scene(seed, kind):
    """Deterministic scene from (seed, kind). World axes: z up, metres.
    indoor: a room (5-7 m x 4-6 m x 2.6-3 m) with 5-8 objects on the floor.
    object: a large room, a table at the origin with 2-4 objects on it (foreground, for CO3D masks).
    outdoor: a ground plane, sky (no hit), a plaza of building-like boxes, poles and spheres."""
    scene = Scene(seed, kind)
    rng = scene.rng
    if kind == "indoor":
        W, D, H = rng.uniform(5, 7), rng.uniform(4, 6), rng.uniform(2.6, 3.0)
        scene.bounds = np.array([[0, 0, 0], [W, D, H]])
        scene.add_box([0, 0, 0], [W, D, H], inside=True)
        _random_objects(scene, rng, int(rng.integers(5, 9)), (0.5, W - 0.5), (0.5, D - 0.5), 0.0, (0.35, 1.0),
                        keep_clear=(W / 2, D / 2, 0.9))
    elif kind == "object":
        scene.bounds = np.array([[-5, -5, 0], [5, 5, 3.5]])
        scene.add_box([-5, -5, -0.8], [5, 5, 3.5], inside=True)
        th = 0.0  # table top at z = 0 so the orbit target is the origin-ish
        scene.add_box([-0.6, -0.45, -0.8], [0.6, 0.45, th], obj=False)
        _random_objects(scene, rng, int(rng.integers(2, 4)), (-0.35, 0.35), (-0.25, 0.25), th, (0.22, 0.45))
        _random_objects(scene, rng, 4, (-4, 4), (-4, 4), -0.8, (0.4, 1.0), keep_clear=(0, 0, 3.0))
        for p in scene.prims[2:]:
            p["obj"] = p["obj"] and (np.all(np.abs(scene.bounding_sphere(p)[0][:2]) < 1.0))
    elif kind == "outdoor":
        scene.sky = True
        scene.bounds = np.array([[-30, -30, 0], [30, 30, 12]])
        scene.add_ground([0, 0, 0], 30.0)
        _random_objects(scene, rng, int(rng.integers(5, 8)), (-5, 5), (-5, 5), 0.0, (1.2, 3.5))
        for _ in range(8):  # a ring of far buildings as background
            a, d = rng.uniform(0, 2 * np.pi), rng.uniform(16, 24)
            x, y, s = d * math.cos(a), d * math.sin(a), rng.uniform(3, 6)
            scene.add_box([x - s / 2, y - s / 2, 0], [x + s / 2, y + s / 2, rng.uniform(4, 11)])
    else:
        raise ValueError(f"make_scene: unknown kind {kind!r} (indoor | object | outdoor)")
    return scene


# -----------------------------------------------------------------------------
# ray casting (all rays at once; one pass per primitive, nearest hit wins)


def _intersect(p, o, d):
    """Hit parameter t (N,) along d (inf = miss) and face id (N,) for primitive p."""
    n = d.shape[0]
    face = np.zeros(n, np.int8)
    with np.errstate(divide="ignore", invalid="ignore"):
        if p["type"] == "room":  # seen from inside: the nearest exit plane per axis
            o3 = np.broadcast_to(o, d.shape)
            t = np.full(n, np.inf)
            for axis in range(3):
                da = d[:, axis]
                ta = (np.where(da > 0, p["hi"][axis], p["lo"][axis]) - o3[:, axis]) / da
                ta[~(ta > EPS)] = np.inf
                closer = ta < t
                t[closer] = ta[closer]
                face[closer] = 2 * axis + (da[closer] > 0)
            return t, face
        if p["type"] == "box":  # slab test, seen from outside
            o3 = np.broadcast_to(o, d.shape)
            tnear, tfar = np.full(n, -np.inf), np.full(n, np.inf)
            for axis in range(3):
                da = d[:, axis]
                t1 = (p["lo"][axis] - o3[:, axis]) / da
                t2 = (p["hi"][axis] - o3[:, axis]) / da
                tn, tf = np.minimum(t1, t2), np.maximum(t1, t2)
                later = tn > tnear
                tnear[later] = tn[later]
                face[later] = 2 * axis + (da[later] < 0)
                np.minimum(tfar, tf, out=tfar)
            return np.where((tnear <= tfar) & (tnear > EPS), tnear, np.inf), face
        if p["type"] == "sphere":
            oc = np.broadcast_to(o - p["c"], d.shape)
            a = np.einsum("ij,ij->i", d, d)
            b = (oc * d).sum(1)
            c = (oc * oc).sum(1) - p["r"] ** 2
            t = (-b - np.sqrt(b * b - a * c)) / a
            return np.where(t > EPS, t, np.inf), face
        if p["type"] == "cylinder":
            ox, oy = o[..., 0] - p["c"][0], o[..., 1] - p["c"][1]
            dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
            oz = o[..., 2]
            a = dx * dx + dy * dy
            b = ox * dx + oy * dy
            c = ox * ox + oy * oy - p["r"] ** 2
            ts = (-b - np.sqrt(b * b - a * c)) / a
            zs = oz + ts * dz
            ts = np.where((ts > EPS) & (zs >= p["z0"]) & (zs <= p["z1"]), ts, np.inf)
            t = ts
            for fid, zc in ((1, p["z1"]), (2, p["z0"])):
                tc = (zc - oz) / dz
                xc, yc = ox + tc * dx, oy + tc * dy
                tc = np.where((tc > EPS) & (xc * xc + yc * yc <= p["r"] ** 2), tc, np.inf)
                face = np.where(tc < t, fid, face).astype(np.int8)
                t = np.minimum(t, tc)
            return t, face
        if p["type"] == "ground":
            t = (p["c"][2] - o[..., 2]) / d[:, 2]
            x, y = o[..., 0] + t * d[:, 0], o[..., 1] + t * d[:, 1]
            ok = (t > EPS) & (np.abs(x - p["c"][0]) <= p["half"]) & (np.abs(y - p["c"][1]) <= p["half"])
            return np.where(ok, t, np.inf), face
    raise ValueError(f"unknown primitive {p['type']}")


def _trace(scene, o, d):
    """Nearest hit over all primitives: t (N,), primitive index (N,) (-1 = miss), face (N,)."""
    n = d.shape[0]
    best = np.full(n, np.inf)
    pid = np.full(n, -1, np.int32)
    face = np.zeros(n, np.int8)
    for i, p in enumerate(scene.prims):
        t, f = _intersect(p, o, d)
        closer = t < best
        best = np.where(closer, t, best)
        pid[closer] = i
        face[closer] = f[closer]
    return best, pid, face


def raycast(scene, origins, dirs):
    """t (N,) such that origins + t * dirs is the first surface hit; t is in units of each dir's length
    (dirs need not be unit); inf where the ray hits nothing."""
    o = np.asarray(origins, np.float64).reshape(-1, 3)
    d = np.asarray(dirs, np.float64).reshape(-1, 3)
    return _trace(scene, o, d)[0]


def _pixel_rays(K, cam_to_world, xs, ys):
    """World-frame ray directions through OpenCV pixels (x, y) (centres at integers), camera z = 1."""
    Kinv = np.linalg.inv(K)
    pix = np.stack([xs, ys, np.ones_like(xs)], -1).astype(np.float64)
    return pix @ (cam_to_world[:3, :3] @ Kinv).T


def _trace_image(scene, K, cam_to_world, w, h):
    """Ray cast every pixel, testing each bounded primitive only inside its projected screen box."""
    K, c2w = np.asarray(K, np.float64), np.asarray(cam_to_world, np.float64)
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    d = _pixel_rays(K, c2w, xs, ys)  # (h,w,3)
    o = c2w[:3, 3]
    best = np.full((h, w), np.inf)
    pid = np.full((h, w), -1, np.int32)
    face = np.zeros((h, w), np.int8)
    w2c = np.linalg.inv(c2w)
    for i, p in enumerate(scene.prims):
        y0, y1, x0, x1 = 0, h, 0, w
        c, r = scene.bounding_sphere(p)
        if c is not None:
            pc = w2c[:3, :3] @ c + w2c[:3, 3]
            if pc[2] < -r:
                continue  # behind the camera
            if pc[2] > r * 1.05:  # screen box of the sphere (conservative: pad by the radius at near depth)
                zn = pc[2] - r
                u = K[0, 0] * pc[0] / pc[2] + K[0, 2]
                v = K[1, 1] * pc[1] / pc[2] + K[1, 2]
                ru = K[0, 0] * r / zn + K[0, 0] * abs(pc[0]) * (1 / zn - 1 / pc[2]) + 2
                rv = K[1, 1] * r / zn + K[1, 1] * abs(pc[1]) * (1 / zn - 1 / pc[2]) + 2
                x0, x1 = max(int(u - ru), 0), min(int(u + ru) + 2, w)
                y0, y1 = max(int(v - rv), 0), min(int(v + rv) + 2, h)
                if x0 >= x1 or y0 >= y1:
                    continue
        win = d[y0:y1, x0:x1].reshape(-1, 3)
        t, f = _intersect(p, o, win)
        t, f = t.reshape(y1 - y0, x1 - x0), f.reshape(y1 - y0, x1 - x0)
        closer = t < best[y0:y1, x0:x1]
        best[y0:y1, x0:x1][closer] = t[closer]
        pid[y0:y1, x0:x1][closer] = i
        face[y0:y1, x0:x1][closer] = f[closer]
    return best, pid, face, d, o


def _sample(tex, density, u, v):
    """Bilinear texture lookup at surface coordinates (metres), clamped at the texture border."""
    n = len(u)
    cols = 1024  # cv2.remap wants maps below 32767 per side: fold the N lookups into rows of 1024
    rows = -(-n // cols)
    mx = np.zeros(rows * cols, np.float32)
    my = np.zeros(rows * cols, np.float32)
    mx[:n], my[:n] = u * density, v * density
    out = cv2.remap(tex, mx.reshape(rows, cols), my.reshape(rows, cols), cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(-1, 3)[:n]


def _shade(scene, p, face, x):
    """Colour (N,3) float of points x (N,3) on primitive p with face ids face (N,)."""
    out = np.zeros((len(x), 3))
    normal = np.zeros((len(x), 3))
    du, dv = np.zeros(len(x)), np.zeros(len(x))
    if p["type"] in ("box", "room"):
        for f in np.unique(face):
            m = face == f
            axis = f // 2
            ua, va = {0: (1, 2), 1: (0, 2), 2: (0, 1)}[axis]
            u, v = x[m, ua] - p["lo"][ua], x[m, va] - p["lo"][va]
            tex, dens = scene.texture(p["tex"][f])
            out[m] = _sample(tex, dens, u, v)
            sign = (-1.0 if f % 2 == 0 else 1.0) * (-1.0 if p["type"] == "room" else 1.0)
            normal[m, axis] = sign
            du[m], dv[m] = u, v
    elif p["type"] == "sphere":
        q = (x - p["c"]) / p["r"]
        u = (np.arctan2(q[:, 1], q[:, 0]) + np.pi) * p["r"]
        v = np.arccos(np.clip(q[:, 2], -1, 1)) * p["r"]
        tex, dens = scene.texture(p["tex"][0])
        out[:] = _sample(tex, dens, u, v)
        normal, du, dv = q, u, v
    elif p["type"] == "cylinder":
        qx, qy = x[:, 0] - p["c"][0], x[:, 1] - p["c"][1]
        for f in np.unique(face):
            m = face == f
            if f == 0:
                u = (np.arctan2(qy[m], qx[m]) + np.pi) * p["r"]
                v = x[m, 2] - p["z0"]
                normal[m] = np.stack([qx[m], qy[m], np.zeros(m.sum())], 1) / p["r"]
            else:
                u, v = qx[m] + p["r"], qy[m] + p["r"]
                normal[m, 2] = 1.0 if f == 1 else -1.0
            tex, dens = scene.texture(p["tex"][f])
            out[m] = _sample(tex, dens, u, v)
            du[m], dv[m] = u, v
    else:  # ground
        u, v = x[:, 0] - p["c"][0] + p["half"], x[:, 1] - p["c"][1] + p["half"]
        tex, dens = scene.texture(p["tex"][0])
        out[:] = _sample(tex, dens, u, v)
        normal[:, 2] = 1.0
        du, dv = u, v
    # fine grain tiled at 4 mm (shifted per primitive) so close-ups keep texture; the coarse layer keeps
    # every surface globally unique
    shift = 0.37 * p["tex"][0]
    out += _sample(scene.detail, 250.0, np.mod(du + shift, 1.02), np.mod(dv + 0.61 * shift, 1.02))
    # view-independent Lambertian light: the same surface point has the same colour in every view
    return out * (0.6 + 0.4 * np.abs(normal @ LIGHT))[:, None]


def render(scene, K, cam_to_world, w, h, gain=1.0, return_ids=False):
    """rgb uint8 (h,w,3) and z-depth float32 (h,w) in metres (inf where nothing is hit) of the scene seen
    by an OpenCV pinhole camera K (3x3, pixel centres at integers) with pose cam_to_world (4x4).
    return_ids=True also returns the primitive index per pixel (int32, -1 = sky)."""
    t, pid, face, d, o = _trace_image(scene, K, cam_to_world, w, h)
    tf, pf, ff, df = t.ravel(), pid.ravel(), face.ravel(), d.reshape(-1, 3)
    rgb = np.zeros((h * w, 3), np.float32)
    order = np.argsort(pf, kind="stable")  # group pixels by primitive: one sort instead of a mask each
    ids, starts = np.unique(pf[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    for i, s0, s1 in zip(ids, starts, ends):
        idx = order[s0:s1]
        if i < 0:
            if scene.sky:  # vertical gradient by ray elevation
                dn = df[idx]
                el = np.clip(dn[:, 2] / np.linalg.norm(dn, axis=1), 0, 1)[:, None]
                rgb[idx] = np.array([235.0, 215.0, 190.0]) * (1 - el) + np.array([110.0, 160.0, 225.0]) * el
            continue
        x = o + tf[idx, None] * df[idx]
        rgb[idx] = _shade(scene, scene.prims[i], ff[idx], x)
    rgb = rgb.reshape(h, w, 3)
    rgb = np.clip(rgb * gain, 0, 255).astype(np.uint8)
    depth = t.astype(np.float32)  # t is along rays with camera-z = 1, i.e. z-depth
    return (rgb, depth, pid) if return_ids else (rgb, depth)


def render_depth(scene, K, cam_to_world, w, h):
    """z-depth float32 (h,w) only (inf where nothing is hit)."""
    return _trace_image(scene, K, cam_to_world, w, h)[0].astype(np.float32)


def foreground_mask(scene, pid):
    """bool (h,w): pixel sees a foreground object (CO3D's masks); pid from render(..., return_ids=True)."""
    fg = np.array([p["obj"] for p in scene.prims] + [False])
    return fg[pid]  # pid = -1 picks the trailing False


# -----------------------------------------------------------------------------
# trajectories: wide viewpoint changes, so frame pairs span overlap ~0.9 down to 0


def look_at(eye, target, up=(0.0, 0.0, 1.0)):
    """cam_to_world 4x4, OpenCV camera axes (x right, y down, z forward)."""
    eye, target = np.asarray(eye, float), np.asarray(target, float)
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    T = np.eye(4)
    T[:3, :3] = np.stack([x, y, z], 1)
    T[:3, 3] = eye
    return T


def make_trajectory(scene, n, seed):
    """n camera-to-world poses. indoor: walk across the room while the heading sweeps 200-250 degrees;
    object: orbit 270-320 degrees around the table; outdoor: 180-220 degree arc around the plaza."""
    rng = np.random.default_rng(seed + 1)
    for _ in range(200):
        s = np.linspace(0, 1, n)
        if scene.kind == "indoor":
            (W, D, H) = scene.bounds[1]
            a, b = np.array([rng.uniform(1.2, 1.8), rng.uniform(1.0, D - 1.0)]), \
                np.array([W - rng.uniform(1.2, 1.8), rng.uniform(1.0, D - 1.0)])
            xy = a[None] + s[:, None] * (b - a)[None] + 0.3 * np.sin(np.pi * s)[:, None] * np.array([0, 1])
            yaw = rng.uniform(0, 2 * np.pi) + s * np.deg2rad(rng.uniform(200, 250)) * rng.choice([-1, 1])
            z = rng.uniform(1.3, 1.6) + 0.05 * np.sin(7 * s)
            pitch = np.deg2rad(rng.uniform(-22, -12))
            eyes = np.column_stack([xy, z * np.ones(n)])
            fwd = np.column_stack([np.cos(yaw) * np.cos(pitch), np.sin(yaw) * np.cos(pitch),
                                   np.full(n, np.sin(pitch))])
            targets = eyes + fwd
        elif scene.kind == "object":
            az = rng.uniform(0, 2 * np.pi) + s * np.deg2rad(rng.uniform(270, 320))
            el = np.deg2rad(rng.uniform(20, 35) + 10 * np.sin(2 * np.pi * s))
            rad = rng.uniform(1.4, 1.8) + 0.15 * np.cos(3 * np.pi * s)
            eyes = np.column_stack([rad * np.cos(az) * np.cos(el), rad * np.sin(az) * np.cos(el),
                                    rad * np.sin(el)])
            targets = np.tile([0.0, 0.0, 0.12], (n, 1)) + rng.normal(0, 0.03, (n, 3))
        else:
            az = rng.uniform(0, 2 * np.pi) + s * np.deg2rad(rng.uniform(180, 220)) * rng.choice([-1, 1])
            rad = rng.uniform(9, 12)
            eyes = np.column_stack([rad * np.cos(az), rad * np.sin(az), np.full(n, rng.uniform(1.5, 2.0))])
            side = rng.uniform(-0.5, 0.5)  # look slightly off the plaza centre: not a pure orbit
            targets = np.column_stack([side * eyes[:, 1] / rad * 4, -side * eyes[:, 0] / rad * 4,
                                       np.full(n, 1.2)])
        if not any(scene.inside_any(e, 0.35) for e in eyes):
            return [look_at(e, t) for e, t in zip(eyes, targets)]
    raise RuntimeError(f"make_trajectory: no collision-free path for scene seed {scene.seed}")


def _f32_pose(T):
    # the .sens stores float32 poses; render with exactly those so every file agrees bit for bit
    return np.asarray(T, np.float32).astype(np.float64)


def _even(x):
    return 2 * max(int(round(x / 2)), 8)


def _intrinsics(w, h, hfov_deg, rng):
    f = (w / 2) / math.tan(math.radians(hfov_deg) / 2)
    return np.array([[f, 0, (w - 1) / 2 + rng.uniform(-3, 3)], [0, f, (h - 1) / 2 + rng.uniform(-3, 3)],
                     [0, 0, 1.0]])


# -----------------------------------------------------------------------------
# sensor model (--sensor kinect): what a structured-light RGB-D camera does to the exact depth and poses

KINECT_FB = 43.5  # px * m: focal length (580 px) x projector baseline (7.5 cm) of a Kinect v1 / Structure sensor
# the depth map is misregistered against the colour image by this much: px (x, y) at 640 px on the long side of
# the depth map, so the same angle at every --image-scale (1 px at 640 = 0.5 px of ScanNet's 320 x 240 depth)
KINECT_SHIFT = (1.0, 0.5)


def kinect_depth(depth, rgb, rng):
    """Sensor-like depth (float32 metres, 0 = hole) from exact z-depth (inf = nothing hit), at depth resolution.
    Axial noise grows with depth (Nguyen et al. 2012: sigma = 1.2 mm + 1.9 mm * (z - 0.4 m)^2), disparity is
    quantised to 1/8 px (Kinect v1: steps of z^2 / (8 * 43.5) m, 2.6 cm at 3 m), holes at depth edges (the
    projector's shadow, 1 px either side of a > 5% step) and on dark surfaces (gray < 45: 80% dropped), and the
    whole map is shifted by KINECT_SHIFT against the colour image (imperfect depth-to-colour registration).
    rgb: the colour image at the depth resolution."""
    z = np.where(np.isfinite(depth), depth, 0).astype(np.float64)
    valid = z > 0
    kernel = np.ones((3, 3), np.uint8)
    hi = cv2.dilate(np.where(valid, z, 1e3).astype(np.float32), kernel)
    lo = cv2.erode(np.where(valid, z, 0).astype(np.float32), kernel)
    edge = cv2.dilate(((hi > lo * 1.05) & valid).astype(np.uint8), kernel) > 0
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    dark = (gray < 45) & (rng.random(z.shape) < 0.8)
    sigma = 0.0012 + 0.0019 * (z - 0.4) ** 2
    zn = np.maximum(z + rng.normal(0.0, 1.0, z.shape) * sigma, 0.05)
    disp = np.round(KINECT_FB / zn * 8.0) / 8.0
    zq = np.where(disp > 0, KINECT_FB / np.maximum(disp, 1e-9), 0.0)
    out = np.where(valid & ~edge & ~dark, zq, 0.0).astype(np.float32)
    # written(x, y) = sensed(x - dx, y - dy), bilinear; a pixel that would mix in a hole becomes a hole
    s = max(z.shape) / 640.0
    h, w = z.shape
    mx, my = np.meshgrid(np.arange(w, dtype=np.float32) - KINECT_SHIFT[0] * s,
                         np.arange(h, dtype=np.float32) - KINECT_SHIFT[1] * s)
    shifted = cv2.remap(out, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    full = cv2.remap((out > 0).astype(np.float32), mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                     borderValue=0)
    return np.where(full > 0.999, shifted, 0).astype(np.float32)


def jitter_pose(T, jitter, rng):
    """T (cam_to_world) with a pose error of about jitter cm and jitter / 2 degrees: rotation about a random axis
    by an angle ~ N(0, (0.5 deg * jitter)^2), translation ~ N(0, (1 cm * jitter)^2 / 3) per axis."""
    if jitter <= 0:
        return np.array(T, np.float64)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    dR, _ = cv2.Rodrigues(axis * np.deg2rad(0.5 * jitter) * rng.normal())
    J = np.array(T, np.float64).copy()
    J[:3, :3] = dR @ J[:3, :3]
    J[:3, 3] += rng.normal(0.0, 0.01 * jitter / math.sqrt(3), 3)
    return J


def _save_exact_depth(out, rel, depth):
    """Exact z-depth (float32 metres, inf = nothing hit) next to a sensor-like depth map, for tests."""
    path = os.path.join(out, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, depth.astype(np.float32))


# -----------------------------------------------------------------------------
# writers: ScanNet (SensReader export + raw .sens), COLMAP (pycolmap), CO3D v2


def _jpeg(rgb, quality=92):
    ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok, "cv2.imencode failed"
    return buf.tobytes()


def _write_jpeg(path, rgb):
    """Every layout's colour frames: the same JPEG bytes _jpeg gives (ScanNet's .sens embeds those)."""
    with open(path, "wb") as f:
        f.write(_jpeg(rgb))


def _depth_mm(depth):
    mm = np.round(np.nan_to_num(depth, posinf=0.0) * 1000.0)
    mm[(mm <= 0) | (mm > 65535)] = 0
    return mm.astype(np.uint16)


def _save_mat(path, M):
    np.savetxt(path, np.asarray(M), fmt="%f")  # SensReader writes "%f" rows


def write_sens(path, frames, K_color, K_depth, wc, hc, wd, hd, sensor_name=b"StructureSensor"):
    """Raw ScanNet .sens (version 4). frames: list of (cam_to_world 4x4, jpeg bytes, depth uint16 (hd,wd))."""
    def mat(M):
        return struct.pack("<16f", *np.asarray(M, np.float32).reshape(-1))
    K4c, K4d = np.eye(4), np.eye(4)
    K4c[:3, :3], K4d[:3, :3] = K_color, K_depth
    with open(path, "wb") as f:
        f.write(struct.pack("<I", 4))
        f.write(struct.pack("<Q", len(sensor_name)) + sensor_name)
        f.write(mat(K4c) + mat(np.eye(4)) + mat(K4d) + mat(np.eye(4)))
        f.write(struct.pack("<ii", 2, 1))  # colour jpeg, depth zlib_ushort
        f.write(struct.pack("<IIII", wc, hc, wd, hd))
        f.write(struct.pack("<f", 1000.0))
        f.write(struct.pack("<Q", len(frames)))
        for i, (c2w, jpg, depth) in enumerate(frames):
            zd = zlib.compress(np.ascontiguousarray(depth, np.uint16).tobytes())
            ts = i * 33333  # microseconds, ~30 fps
            f.write(mat(c2w) + struct.pack("<QQQQ", ts, ts, len(jpg), len(zd)))
            f.write(jpg)
            f.write(zd)
        f.write(struct.pack("<Q", 0))  # no IMU frames


def write_scannet(out, name, seed, n_frames, pbar, scale=1.0, sensor="exact", jitter=0.0):
    scene = make_scene(seed, "indoor")
    rng = np.random.default_rng(seed + 3)
    srng = np.random.default_rng([seed, 77])  # the sensor's own stream: exact output stays byte-identical
    wc, hc = _even(640 * scale), _even(480 * scale)
    wd, hd = wc // 2, hc // 2
    Kc = _intrinsics(wc, hc, 58.0, rng)
    # depth camera shares the pose; its own (half-resolution) intrinsics, pixel-centre-correct scaling
    Kd = Kc.copy()
    Kd[:2, :2] *= 0.5
    Kd[:2, 2] = (Kc[:2, 2] + 0.5) * 0.5 - 0.5
    root = os.path.join(out, "scannet", name)
    for sub in ("color", "depth", "pose", "intrinsic"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    K4c, K4d = np.eye(4), np.eye(4)
    K4c[:3, :3], K4d[:3, :3] = Kc, Kd
    _save_mat(os.path.join(root, "intrinsic", "intrinsic_color.txt"), K4c)
    _save_mat(os.path.join(root, "intrinsic", "intrinsic_depth.txt"), K4d)
    _save_mat(os.path.join(root, "intrinsic", "extrinsic_color.txt"), np.eye(4))
    _save_mat(os.path.join(root, "intrinsic", "extrinsic_depth.txt"), np.eye(4))
    frames, meta_frames = [], []
    for i, T in enumerate(make_trajectory(scene, n_frames, seed)):
        T = _f32_pose(T)
        Tw = _f32_pose(jitter_pose(T, jitter, srng))  # the pose the files say (== T without --pose-jitter)
        rgb, _ = render(scene, Kc, T, wc, hc, gain=rng.uniform(0.93, 1.07))
        exact = render_depth(scene, Kd, T, wd, hd)
        extra = {}
        if sensor == "kinect":
            small = cv2.resize(rgb, (wd, hd), interpolation=cv2.INTER_AREA)
            depth = _depth_mm(kinect_depth(exact, small, srng))
            extra["depth_exact"] = f"exact/scannet/{name}/{i}.npy"
            _save_exact_depth(out, extra["depth_exact"], exact)
        else:
            depth = _depth_mm(exact)
        jpg = _jpeg(rgb)
        with open(os.path.join(root, "color", f"{i}.jpg"), "wb") as f:
            f.write(jpg)
        cv2.imwrite(os.path.join(root, "depth", f"{i}.png"), depth)
        _save_mat(os.path.join(root, "pose", f"{i}.txt"), Tw)
        frames.append((Tw, jpg, depth))
        meta_frames.append(dict(image=f"scannet/{name}/color/{i}.jpg", depth=f"scannet/{name}/depth/{i}.png",
                                K=Kc.tolist(), K_depth=Kd.tolist(), cam_to_world=T.tolist(),
                                cam_to_world_written=Tw.tolist(), width=wc, height=hc, depth_width=wd,
                                depth_height=hd, **extra))
        pbar.update(1)
    sens_dir = os.path.join(out, "scannet_sens", name)
    os.makedirs(sens_dir, exist_ok=True)
    write_sens(os.path.join(sens_dir, f"{name}.sens"), frames, Kc, Kd, wc, hc, wd, hd)
    return dict(layout="scannet", path=f"scannet/{name}", sens=f"scannet_sens/{name}/{name}.sens", name=name,
                seed=seed, kind="indoor", sensor=sensor, pose_jitter=jitter, frames=meta_frames)


def write_colmap(out, name, seed, n_frames, pbar, scale=1.0, kind="outdoor", landmarks_per_frame=300, layout="colmap"):
    """layout colmap: <scene>/images/%06d.jpg + <scene>/sparse/0. layout dl3dv (as DL3DV-10K ships it):
    <scene>/images_4/frame_%05d.png only, the model in <scene>/colmap/sparse/0 at the full resolution (4x the
    images; pixel-centre-correct: x_full = (x_4 + 0.5) * 4 - 0.5 in OpenCV pixels)."""
    import pycolmap  # only this writer needs it
    scene = make_scene(seed, kind)
    rng = np.random.default_rng(seed + 5)
    w, h = _even(480 * scale), _even(360 * scale)
    K = _intrinsics(w, h, 65.0, rng)
    K[1, 1] = K[0, 0]  # SIMPLE_RADIAL has one focal length
    root = os.path.join(out, layout, name)
    f = 4 if layout == "dl3dv" else 1  # the model's resolution over the images'
    img_dir, sparse = ("images_4", os.path.join("colmap", "sparse", "0")) if f == 4 else ("images", os.path.join("sparse", "0"))
    os.makedirs(os.path.join(root, img_dir), exist_ok=True)
    os.makedirs(os.path.join(root, sparse), exist_ok=True)
    poses, pts, cols, meta_frames = [], [], [], []
    for i, T in enumerate(make_trajectory(scene, n_frames, seed)):
        rgb, depth = render(scene, K, T, w, h, gain=rng.uniform(0.93, 1.07))
        fname = f"frame_{i + 1:05d}.png" if f == 4 else f"{i:06d}.jpg"
        if f == 4:
            cv2.imwrite(os.path.join(root, img_dir, fname), rgb[..., ::-1])
        else:
            _write_jpeg(os.path.join(root, img_dir, fname), rgb)
        # landmarks: back-project random pixels with a surface hit (exactly on the surfaces)
        ys, xs = np.nonzero(np.isfinite(depth))
        k = rng.choice(len(xs), min(landmarks_per_frame, len(xs)), replace=False)
        x, y = xs[k].astype(np.float64) + rng.uniform(-0.5, 0.5, len(k)), ys[k] + rng.uniform(-0.5, 0.5, len(k))
        ray = _pixel_rays(K, T, x, y)
        t = raycast(scene, np.broadcast_to(T[:3, 3], ray.shape), ray)
        good = np.isfinite(t)
        pts.append(T[:3, 3] + t[good, None] * ray[good])
        cols.append(rgb[ys[k][good], xs[k][good]])
        poses.append(T)
        meta_frames.append(dict(image=f"{layout}/{name}/{img_dir}/{fname}", K=K.tolist(), cam_to_world=T.tolist(),
                                width=w, height=h))
        pbar.update(1)
    X, C = np.concatenate(pts), np.concatenate(cols)
    # visibility of every landmark in every camera: inside the image and first hit along the ray
    obs = []  # per image: list of (xy colmap, landmark index)
    vis_count = np.zeros(len(X), int)
    proj = []
    for T in poses:
        w2c = np.linalg.inv(T)
        Xc = X @ w2c[:3, :3].T + w2c[:3, 3]
        z = Xc[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = (Xc[:, :2] / z[:, None]) * [K[0, 0], K[1, 1]] + K[:2, 2]
        inside = (z > 0.05) & (uv[:, 0] > -0.5) & (uv[:, 0] < w - 0.5) & (uv[:, 1] > -0.5) & (uv[:, 1] < h - 0.5)
        idx = np.nonzero(inside)[0]
        t = raycast(scene, np.broadcast_to(T[:3, 3], (len(idx), 3)), X[idx] - T[:3, 3])
        visible = idx[np.abs(t - 1.0) < 1e-6]  # the landmark itself is the first hit (t = 1)
        vis_count[visible] += 1
        proj.append((visible, uv[visible]))
    keep = vis_count >= 2  # COLMAP only triangulates points seen at least twice
    rec = pycolmap.Reconstruction()
    # COLMAP pixels (centre of the first pixel at 0.5) at the model's resolution: x_colmap = (x_opencv + 0.5) * f
    cam = pycolmap.Camera(camera_id=1, model="SIMPLE_RADIAL", width=w * f, height=h * f,
                          params=[K[0, 0] * f, (K[0, 2] + 0.5) * f, (K[1, 2] + 0.5) * f, 0.0])
    rec.add_camera_with_trivial_rig(cam)
    tracks = collections.defaultdict(list)  # landmark -> its observations (image id, point2D index), in image order
    for i, (T, (visible, uv)) in enumerate(zip(poses, proj)):
        sel = keep[visible]
        visible, uv = visible[sel], uv[sel]
        # untriangulated features too (as in real models): random pixels with no 3D point
        extra = rng.uniform([0, 0], [w - 1, h - 1], (len(visible) // 4, 2))
        xy = (np.concatenate([uv, extra]) + 0.5) * f  # COLMAP pixel convention, at the model's resolution
        points2D = pycolmap.Point2DList([pycolmap.Point2D(p) for p in xy])
        image = pycolmap.Image(name=os.path.basename(meta_frames[i]["image"]), points2D=points2D, camera_id=1,
                               image_id=i + 1)
        w2c = np.linalg.inv(T)
        rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d(pycolmap.Rotation3d(w2c[:3, :3]), w2c[:3, 3]))
        for n, j in enumerate(visible):
            tracks[int(j)].append(pycolmap.TrackElement(i + 1, n))
    for j in np.nonzero(keep)[0]:
        rec.add_point3D(X[j], pycolmap.Track(tracks[int(j)]), C[j].astype(np.uint8))
    rec.write(os.path.join(root, sparse))
    return dict(layout=layout, path=f"{layout}/{name}", name=name, seed=seed, kind=kind, frames=meta_frames,
                num_points3D=int(keep.sum()))


def re10k_line(timestamp, K, cam_to_world, w, h):
    """One RealEstate10K camera line: timestamp_us fx fy cx cy k1 k2 and the 3x4 row-major world-to-camera
    [R|t] (OpenCV axes); intrinsics divided by the image width (fx, cx) and height (fy, cy), the principal point
    measured from the image's top-left corner (OpenCV's + 0.5), as RealEstate10K's files are."""
    w2c = np.linalg.inv(cam_to_world)[:3]
    vals = [K[0, 0] / w, K[1, 1] / h, (K[0, 2] + 0.5) / w, (K[1, 2] + 0.5) / h, 0.0, 0.0] + w2c.ravel().tolist()
    return " ".join([str(int(timestamp))] + [repr(float(v)) for v in vals])


def write_re10k(out, name, seed, n_frames, pbar, scale=1.0, kind="indoor"):
    """One RealEstate10K clip: re10k/<clip>.txt (URL line, then one camera line per frame) and the frames as a
    user extracts them from the video, re10k/<clip>/<timestamp_us>.jpg (16:9)."""
    scene = make_scene(seed, kind)
    rng = np.random.default_rng(seed + 13)
    w, h = _even(480 * scale), _even(270 * scale)
    K = _intrinsics(w, h, 62.0, rng)
    root = os.path.join(out, "re10k")
    os.makedirs(os.path.join(root, name), exist_ok=True)
    t0 = int(rng.integers(10 ** 6, 10 ** 8))
    lines, meta_frames = [f"https://www.youtube.com/watch?v=synth{seed:06d}"], []
    for i, T in enumerate(make_trajectory(scene, n_frames, seed)):
        ts = t0 + i * 133467  # every 4th frame of a 29.97 fps video, in microseconds
        rgb, _ = render(scene, K, T, w, h, gain=rng.uniform(0.93, 1.07))
        _write_jpeg(os.path.join(root, name, f"{ts}.jpg"), rgb)
        lines.append(re10k_line(ts, K, T, w, h))
        meta_frames.append(dict(image=f"re10k/{name}/{ts}.jpg", timestamp=ts, K=K.tolist(),
                                cam_to_world=T.tolist(), width=w, height=h))
        pbar.update(1)
    with open(os.path.join(root, f"{name}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return dict(layout="re10k", path=f"re10k/{name}", txt=f"re10k/{name}.txt", name=name, seed=seed, kind=kind,
                frames=meta_frames)


def opencv_to_co3d(K, cam_to_world, w, h):
    """PyTorch3D / CO3D v2 viewpoint dict from an OpenCV camera (see the module docstring)."""
    w2c = np.linalg.inv(cam_to_world)
    R = w2c[:3, :3].T.copy()
    R[:, :2] *= -1
    T = w2c[:3, 3].copy()
    T[:2] *= -1
    s = min(w, h) / 2.0
    return dict(R=R.tolist(), T=T.tolist(), focal_length=[K[0, 0] / s, K[1, 1] / s],
                principal_point=[-(K[0, 2] - w / 2.0) / s, -(K[1, 2] - h / 2.0) / s],
                intrinsics_format="ndc_isotropic")


def write_co3d(out, category, seq, seed, n_frames, pbar, scale=1.0, sensor="exact", jitter=0.0):
    """One CO3D sequence; returns (meta entry, frame annotations, sequence annotation)."""
    scene = make_scene(seed, "object")
    rng = np.random.default_rng(seed + 9)
    srng = np.random.default_rng([seed, 77])  # the sensor's own stream: exact output stays byte-identical
    w, h = _even(360 * scale), _even(480 * scale)  # portrait, like most CO3D phone videos
    K = _intrinsics(w, h, 50.0, rng)
    root = os.path.join(out, "co3d", category, seq)
    for sub in ("images", "depths", "depth_masks", "masks"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    scale = float(rng.uniform(0.5, 2.0))  # CO3D depth maps are stored up to a per-frame scale
    annos, meta_frames = [], []
    for i, T in enumerate(make_trajectory(scene, n_frames, seed)):
        rgb, depth, pid = render(scene, K, T, w, h, gain=rng.uniform(0.93, 1.07), return_ids=True)
        Tw = jitter_pose(T, jitter, srng)  # the pose the annotation says (== T without --pose-jitter)
        fg = foreground_mask(scene, pid)
        stem = f"frame{i + 1:06d}"
        rel = f"{category}/{seq}"
        _write_jpeg(os.path.join(root, "images", f"{stem}.jpg"), rgb)
        extra = {}
        if sensor == "kinect":
            extra["depth_exact"] = f"exact/co3d/{rel}/{stem}.npy"
            _save_exact_depth(out, extra["depth_exact"], depth)
            depth = kinect_depth(depth, rgb, srng)
            depth[depth <= 0] = np.inf  # holes: invalid below, like sky
        valid = np.isfinite(depth)
        d16 = np.where(valid, depth / scale, 0).astype(np.float16)
        cv2.imwrite(os.path.join(root, "depths", f"{stem}.jpg.geometric.png"), d16.view(np.uint16))
        cv2.imwrite(os.path.join(root, "depth_masks", f"{stem}.png"), (valid * 255).astype(np.uint8))
        cv2.imwrite(os.path.join(root, "masks", f"{stem}.png"), (fg * 255).astype(np.uint8))
        annos.append(dict(
            sequence_name=seq, frame_number=i, frame_timestamp=i / 30.0,
            image=dict(path=f"{rel}/images/{stem}.jpg", size=[h, w]),
            depth=dict(path=f"{rel}/depths/{stem}.jpg.geometric.png", scale_adjustment=scale,
                       mask_path=f"{rel}/depth_masks/{stem}.png"),
            mask=dict(path=f"{rel}/masks/{stem}.png", mass=float(fg.sum())),
            viewpoint=opencv_to_co3d(K, Tw, w, h),
            meta=dict(frame_type="test_known" if i % 10 == 0 else "train_known", frame_splits=[],
                      synthetic=True)))
        meta_frames.append(dict(image=f"co3d/{rel}/images/{stem}.jpg",
                                depth=f"co3d/{rel}/depths/{stem}.jpg.geometric.png", K=K.tolist(),
                                cam_to_world=T.tolist(), cam_to_world_written=Tw.tolist(), width=w, height=h,
                                **extra))
        pbar.update(1)
    seq_anno = dict(sequence_name=seq, category=category, video=dict(path=f"{category}/{seq}/video.mp4",
                    length=n_frames), point_cloud=None, viewpoint_quality_score=1.0)
    entry = dict(layout="co3d", path=f"co3d/{category}/{seq}", name=seq, seed=seed, kind="object",
                 sensor=sensor, pose_jitter=jitter, frames=meta_frames)
    return entry, annos, seq_anno


def _write_jgz(path, obj):
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:  # mtime=0: reproducible
        f.write(json.dumps(obj).encode("utf-8"))


# -----------------------------------------------------------------------------
# meta: map written files back to the renderer


def load_meta(out_dir):
    path = os.path.join(out_dir, "synthetic_meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"synthetic.load_meta: {path} does not exist (run synthetic.py --out {out_dir})")
    with open(path) as f:
        meta = json.load(f)
    meta["out_dir"] = os.path.abspath(out_dir)
    return meta


def find_frame(meta, image_path):
    """(scene entry, frame entry) whose image is image_path (absolute, or relative to the meta's out_dir)."""
    target = os.path.realpath(os.path.join(meta["out_dir"], image_path))
    for sc in meta["scenes"]:
        for fr in sc["frames"]:
            if os.path.realpath(os.path.join(meta["out_dir"], fr["image"])) == target:
                return sc, fr
    raise KeyError(f"synthetic.find_frame: {image_path} is not in {meta['out_dir']}/synthetic_meta.json")


def _remove_previous(out):
    """Delete the scenes an earlier run wrote here (listed in its synthetic_meta.json), so a re-run with fewer
    frames or scenes leaves no stale files for build_pool.py to pick up. Nothing else is touched."""
    if not os.path.isfile(os.path.join(out, "synthetic_meta.json")):
        return
    for sc in load_meta(out)["scenes"]:
        for rel in (sc["path"], os.path.dirname(sc.get("sens", ""))):
            if rel and os.path.isdir(os.path.join(out, rel)):
                shutil.rmtree(os.path.join(out, rel))
        if sc.get("txt") and os.path.isfile(os.path.join(out, sc["txt"])):
            os.remove(os.path.join(out, sc["txt"]))
        if sc["layout"] == "co3d":
            for name in ("frame_annotations.jgz", "sequence_annotations.jgz"):
                path = os.path.join(out, os.path.dirname(sc["path"]), name)
                if os.path.isfile(path):
                    os.remove(path)
    if os.path.isdir(os.path.join(out, "exact")):  # exact depths of a --sensor kinect run
        shutil.rmtree(os.path.join(out, "exact"))
    os.remove(os.path.join(out, "synthetic_meta.json"))


# -----------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="demo_data", help="output root")
    ap.add_argument("--scenes", type=int, default=2, help="scenes per layout (>= 2 gives a train/test split)")
    ap.add_argument("--frames", type=int, default=24, help="frames per scene")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layouts", default="scannet,colmap,co3d",
                    help="comma list of scannet,colmap,co3d,re10k,dl3dv (re10k, dl3dv are opt-in)")
    ap.add_argument("--co3d-category", default="synthobject")
    ap.add_argument("--image-scale", type=float, default=1.0, help="scale all image sizes (e.g. 0.25 for fast tests)")
    ap.add_argument("--sensor", default="exact", choices=["exact", "kinect"],
                    help="ScanNet and CO3D depth: exact, or like a structured-light sensor (noise, quantisation, "
                         "holes, misregistration; see kinect_depth)")
    ap.add_argument("--pose-jitter", type=float, default=None,
                    help="written poses off by about this many cm and half as many degrees (ScanNet, CO3D; "
                         "default 1 with --sensor kinect, else 0)")
    args = ap.parse_args(argv)
    if args.pose_jitter is None:
        args.pose_jitter = 1.0 if args.sensor == "kinect" else 0.0
    layouts = [s for s in args.layouts.split(",") if s]
    bad = [s for s in layouts if s not in ("scannet", "colmap", "co3d", "re10k", "dl3dv")]
    if bad:
        sys.exit(f"synthetic.py: error: unknown layout(s) {bad} in --layouts (scannet, colmap, co3d, re10k, dl3dv)")
    if args.frames < 2 or args.scenes < 1:
        sys.exit("synthetic.py: error: need --frames >= 2 and --scenes >= 1")
    os.makedirs(args.out, exist_ok=True)
    _remove_previous(args.out)
    with open(os.path.join(args.out, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)

    entries = []
    pbar = tqdm(total=len(layouts) * args.scenes * args.frames, desc="render", unit="frame")
    for li, layout in enumerate(layouts):
        seeds = [args.seed * 1000 + li * 100 + k for k in range(args.scenes)]
        if layout == "scannet":
            entries += [write_scannet(args.out, f"scene{k:04d}_00", s, args.frames, pbar, args.image_scale,
                                      args.sensor, args.pose_jitter) for k, s in enumerate(seeds)]
        elif layout == "colmap":
            entries += [write_colmap(args.out, f"plaza{k:02d}", s, args.frames, pbar, args.image_scale)
                        for k, s in enumerate(seeds)]
        elif layout == "dl3dv":  # DL3DV-10K scene ids are 64-hex-digit hashes
            entries += [write_colmap(args.out, f"{(s + 7) * 0x9E3779B97F4A7C15 % 2 ** 64:016x}" * 4, s, args.frames,
                                     pbar, args.image_scale, layout="dl3dv") for s in seeds]
        elif layout == "re10k":  # clip ids look like RealEstate10K's 16-hex-digit ones
            entries += [write_re10k(args.out, f"{(s + 1) * 0x9E3779B97F4A7C15 % 2 ** 64:016x}", s, args.frames,
                                    pbar, args.image_scale) for s in seeds]
        else:
            cat = args.co3d_category
            annos, seqs = [], []
            for k, s in enumerate(seeds):
                seq = f"{100 + k}_{s:05d}_{7 * s + 11:05d}"  # CO3D-like sequence name
                entry, a, sq = write_co3d(args.out, cat, seq, s, args.frames, pbar, args.image_scale,
                                          args.sensor, args.pose_jitter)
                entries.append(entry)
                annos += a
                seqs.append(sq)
            _write_jgz(os.path.join(args.out, "co3d", cat, "frame_annotations.jgz"), annos)
            _write_jgz(os.path.join(args.out, "co3d", cat, "sequence_annotations.jgz"), seqs)
    pbar.close()
    with open(os.path.join(args.out, "synthetic_meta.json"), "w") as f:
        json.dump(dict(version=1, scenes=entries), f)
    n_frames = sum(len(e["frames"]) for e in entries)
    print(f"synthetic.py: wrote {len(entries)} scenes ({', '.join(layouts)}), {n_frames} frames to {args.out}")


if __name__ == "__main__":
    main()
