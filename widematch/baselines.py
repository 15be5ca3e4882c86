"""The classical and floor baselines of evaluate.py --baseline (docs/evaluate.md, "SIFT baseline rule"): each
answers a task with {point number: Y label or None}; evaluate.py formats and scores the answer like a model's.
OpenCV is imported only by the SIFT baseline.
"""

import sys
import zlib
from collections import OrderedDict

import numpy as np


def task_rng(seed, task_id):
    """A generator that depends only on the seed and the task, so order, batching and resumes do not matter."""
    return np.random.default_rng([seed, zlib.crc32(task_id.encode())])


def answer_random(task, seed):
    rng = task_rng(seed, task["task_id"])
    options = list(task["y_labels"]) + [None]
    return {i + 1: options[rng.integers(len(options))] for i in range(task["n"])}


def answer_none(task):
    return {i + 1: None for i in range(task["n"])}


def sift_at(sift, gray, points, size):
    """Unit-normalised upright SIFT descriptors at the given (x, y) points."""
    import cv2
    kps = [cv2.KeyPoint(float(x), float(y), size, 0.0) for x, y in points]
    kps_out, desc = sift.compute(gray, kps)
    assert len(kps_out) == len(kps), "SIFT dropped a labelled point"
    return desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-6)


def epipolar_distance(F, x, y):
    """Symmetric point-to-epipolar-line distance in pixels, (n, m) for x (n,2) in image 1, y (m,2) in image 2."""
    xh = np.c_[x, np.ones(len(x))]
    yh = np.c_[y, np.ones(len(y))]
    l2 = xh @ F.T  # lines in image 2, one per x
    l1 = yh @ F    # lines in image 1, one per y
    num = np.abs(l2 @ yh.T)  # (n, m): |y_j^T F x_i|
    d2 = num / np.maximum(np.hypot(l2[:, 0], l2[:, 1])[:, None], 1e-12)
    d1 = num / np.maximum(np.hypot(l1[:, 0], l1[:, 1])[None, :], 1e-12)
    return np.maximum(d1, d2)


class SiftMatcher:
    """The SIFT rule of docs/evaluate.md ("SIFT baseline rule"). Caches per run: dense features per image (LRU; the same
    frame recurs in many pairs and dense detection is most of the cost) and F per image pair (several tasks share a
    pair)."""

    def __init__(self, args, min_inliers=15, cache_images=64):
        import cv2  # OpenCV only for the SIFT baseline and --show: --answers and the API path run without it
        self.args, self.min_inliers, self.cache_images = args, min_inliers, cache_images
        self.sift = cv2.SIFT_create(nfeatures=4000)
        self.images, self.fmats = OrderedDict(), {}

    def features(self, path, task):
        """(gray image, dense keypoints, dense descriptors) of one image."""
        import cv2
        if path in self.images:
            self.images.move_to_end(path)
            return self.images[path]
        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if gray is None:
            sys.exit(f"evaluate.py: error: cannot read image {path} of task {task['task_id']}")
        self.images[path] = (gray, *self.sift.detectAndCompute(gray, None))
        if len(self.images) > self.cache_images:
            self.images.popitem(last=False)
        return self.images[path]

    def fundamental_matrix(self, f1, f2):
        """F from dense SIFT + ratio test + RANSAC, or None when too few inliers to trust it."""
        import cv2
        (_, k1, d1), (_, k2, d2) = f1, f2
        if d1 is None or d2 is None or len(k1) < 2 or len(k2) < 2:
            return None
        good = [m for m, n in cv2.BFMatcher(cv2.NORM_L2).knnMatch(d1, d2, k=2) if m.distance < 0.8 * n.distance]
        if len(good) < self.min_inliers:
            return None
        p1 = np.float32([k1[m.queryIdx].pt for m in good])
        p2 = np.float32([k2[m.trainIdx].pt for m in good])
        cv2.setRNGSeed(0)
        F, mask = cv2.findFundamentalMat(p1, p2, cv2.FM_RANSAC, 1.5, 0.999)
        if F is None or F.shape != (3, 3) or mask.sum() < self.min_inliers:
            return None
        return F

    def answer(self, task):
        """{i: Y label or None}: descriptors at the points, epipolar gate, nearest + ratio, one-to-one."""
        a = self.args
        f1, f2 = (self.features(p, task) for p in task["originals"])
        (g1, g2), pair = (f1[0], f2[0]), tuple(task["originals"])
        x, y = np.float64(task["x_points"]), np.float64(task["y_points"])
        dx = sift_at(self.sift, g1, x, a.sift_size * max(g1.shape))
        dy = sift_at(self.sift, g2, y, a.sift_size * max(g2.shape))
        dist = np.linalg.norm(dx[:, None] - dy[None], axis=2)  # (n, m)
        if pair not in self.fmats:
            self.fmats[pair] = self.fundamental_matrix(f1, f2)
        if self.fmats[pair] is not None:
            dist[epipolar_distance(self.fmats[pair], x, y) > a.sift_epi * max(g2.shape)] = np.inf
        choice = {}
        for i in range(len(x)):
            order = np.argsort(dist[i], kind="stable")
            d1 = dist[i, order[0]]
            d2 = dist[i, order[1]] if len(order) > 1 else np.inf
            if d1 < a.sift_max_dist and d1 < a.sift_ratio * d2:
                choice[i] = (order[0], d1)
        mapping = {i + 1: None for i in range(len(x))}
        claimed = set()
        for i, (j, _) in sorted(choice.items(), key=lambda kv: (kv[1][1], kv[0])):  # closest claim first
            if j not in claimed:
                claimed.add(j)
                mapping[i + 1] = task["y_labels"][j]
        return mapping
