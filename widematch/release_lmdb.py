"""Our pool in the authors' training format: the LMDB that the release's AnnoRawDataset reads, and the JSON manifest
that its MultiRawDataset takes (my_recipe/mydatasets/anno_db.py and anno_raw.py in github aim-uofa/ReasonMatch).
The release ships no training data and no data engine; this is the bridge (export_bench.py --format
reasonmatch-lmdb calls write_lmdb).

Layout written (read back by tests/released_recipe.py with a reader of its own):
    <out>/data.mdb, lock.mdb   an LMDB environment. Keys "%08d" (0..N-1) -> a pickled dict:
        image1, image2  encoded image bytes (cv2.imdecode reads them), BOTH THE SAME SIZE (the release asserts it):
                        the pool's files byte for byte when the two sizes agree; otherwise image 2 is resized to image
                        1's size (JPEG, quality 95) and its match coordinates scaled, and the export says how many
        matches         [{x1, y1, x2, y2}] in pixels of those images, pixel centres at integers (the pool's
                        convention): the pair's well-spread verified matches, then its verified dense matches (exact
                        repeats dropped); distractors never go in
        overlap         the pool's omega
        meta            dict(source, scene, pair_id, bin, delta_v, split, size1, size2: the pool's image sizes)
        Key "__meta__" -> the pickled {"num_samples": N}.
    <out>.json   the manifest for MultiRawDataset: a list holding <out>'s absolute path (the release's trainer takes
                 DATASET_PATH=<out>.json, or <out>: it adds the .json suffix itself).
A pair without any verified match is skipped (the release asserts matches); the count is reported.
"""
import io
import json
import os
import pickle
import shutil

import numpy as np
from PIL import Image
from tqdm import tqdm

JPEG_QUALITY = 95


def pair_matches(arrays):
    """The pair's verified correspondences (N, 4) x1 y1 x2 y2: the well-spread matches (kp1[i] <-> kp2[match[i]]),
    then the dense verified matches (dense1 <-> dense2), exact repeats dropped, order kept."""
    kp1, kp2, match = arrays["kp1"], arrays["kp2"], arrays["match"]
    sel = np.flatnonzero(match >= 0)
    rows = [np.concatenate([kp1[sel], kp2[match[sel]]], 1)]
    if "dense1" in arrays and len(arrays["dense1"]):
        rows.append(np.concatenate([arrays["dense1"], arrays["dense2"]], 1))
    m = np.concatenate(rows).astype(np.float64)                                                  # (N, 4)
    _, first = np.unique(m, axis=0, return_index=True)
    return m[np.sort(first)]


def sample_of(pair, arrays, pool_dir):
    """-> (the pickled-to-be dict, resized: True when image 2 had to be brought to image 1's size) or (None, None)
    when the pair has no verified match."""
    m = pair_matches(arrays)
    if not len(m):
        return None, None
    paths = [p if os.path.isabs(p) else os.path.join(pool_dir, p) for p in (pair["image1"], pair["image2"])]
    with Image.open(paths[0]) as a, Image.open(paths[1]) as b:
        size1, size2 = a.size, b.size
        resized = size1 != size2
        if resized:  # pixel-centre-correct scaling: x' = (x + 0.5) * s - 0.5
            s = np.array([size1[0] / size2[0], size1[1] / size2[1]])
            m[:, 2:] = (m[:, 2:] + 0.5) * s - 0.5
            buf = io.BytesIO()
            b.convert("RGB").resize(size1, Image.LANCZOS).save(buf, "JPEG", quality=JPEG_QUALITY)
            image2 = buf.getvalue()
    with open(paths[0], "rb") as f:
        image1 = f.read()
    if not resized:
        with open(paths[1], "rb") as f:
            image2 = f.read()
    matches = [dict(x1=float(r[0]), y1=float(r[1]), x2=float(r[2]), y2=float(r[3])) for r in m]
    meta = dict(source=pair["source"], scene=pair["scene"], pair_id=pair["pair_id"], bin=pair["bin"],
                delta_v=float(pair["delta_v"]), split=pair["split"], size1=list(size1), size2=list(size2))
    return dict(image1=image1, image2=image2, matches=matches, overlap=float(pair["overlap"]), meta=meta), resized


def write_lmdb(pairs, pool_dir, out, load_arrays):
    """pairs (pool rows of one split) -> <out>/ (LMDB) + <out>.json. load_arrays(pair) -> the pair's npz arrays.
    An earlier export at <out> is replaced (written to <out>.tmp, then renamed). -> summary dict."""
    import lmdb
    out = os.path.normpath(out)
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, "data.mdb")):
        raise ValueError(f"{out} exists and is not an LMDB export (no data.mdb): not replacing it")
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # the map is a sparse file: room for every image twice over, at least 64 MiB
    need = sum(os.path.getsize(p if os.path.isabs(p) else os.path.join(pool_dir, p))
               for pair in pairs for p in (pair["image1"], pair["image2"]))
    env = lmdb.open(tmp, map_size=max(64 << 20, 2 * need + (len(pairs) << 20)), subdir=True, lock=True)
    n = resized = skipped = 0
    txn = env.begin(write=True)
    for pair in tqdm(pairs, desc="reasonmatch-lmdb", unit="pair", leave=False):
        sample, was_resized = sample_of(pair, load_arrays(pair), pool_dir)
        if sample is None:
            skipped += 1
            continue
        txn.put(f"{n:08d}".encode(), pickle.dumps(sample, protocol=pickle.HIGHEST_PROTOCOL))
        n += 1
        resized += was_resized
        if n % 500 == 0:  # bounded transactions
            txn.commit()
            txn = env.begin(write=True)
    txn.put(b"__meta__", pickle.dumps({"num_samples": n}))
    txn.commit()
    env.sync()
    env.close()
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    manifest = out + ".json"
    with open(manifest, "w") as f:
        json.dump([os.path.abspath(out)], f, indent=2)
    return dict(num_samples=n, resized=resized, skipped_no_match=skipped, lmdb=out, manifest=manifest)
