"""The machinery around build_pool.py's matching: scenes over a pool of worker processes, the pool's files, the
list files a build reads, and sharded builds with their merge.

    run_scenes(process_scene, tasks, workers) -> (records, stats): process_scene(task) -> (records, stats) of one
        scene, run in `workers` processes (fork on Linux; the function is pickled by name, so it must be a module-level
        function) with a progress bar; the per-scene stats summed (new_stats() holds the keys)
    write_pairs(path, records)                    one JSON object a line, sorted by pair_id
    write_summary(args, records, stats, edges, seconds)   summary.json and the printed per-source lines
    read_scene_types(path), read_test_scenes(path)        --scene-types, --test-scenes (a bad file exits)
    parse_shard, in_shard, write_shard, merge_shards      --shard i/N and --merge (docs/build_pool.md, "Sharded")
"""
import collections
import hashlib
import json
import multiprocessing
import os
import shutil
import sys

from tqdm import tqdm

from widematch.datasets import PROG, SCENE_TYPES, task_scene


def new_stats():
    """The counts a build sums over scenes (and a merge over shards)."""
    return dict(pairs_skipped=collections.Counter(), frames_skipped=collections.Counter(), pairs_tried=0,
                scenes_skipped=collections.Counter(), points=collections.Counter())


def add_stats(total, st):
    for k in ("pairs_skipped", "frames_skipped", "scenes_skipped", "points"):
        total[k].update(st.get(k, {}))
    total["pairs_tried"] += st["pairs_tried"]


def run_scenes(process_scene, tasks, workers):
    records, stats = [], new_stats()
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
        add_stats(stats, st)
    return records, stats


def write_pairs(path, records):
    records.sort(key=lambda r: r["pair_id"])
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


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


def read_test_scenes(path):
    """--test-scenes FILE: one scene name (or source/scene) a line -> a set."""
    if not os.path.isfile(path):
        sys.exit(f"{PROG}: error: --test-scenes {path} does not exist")
    with open(path) as f:
        return {line.strip() for line in f if line.strip()}


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


def in_shard(task, i, n):
    """Stable across machines and runs (sha1, not Python's salted hash): a scene always lands in one shard."""
    return int(hashlib.sha1(task_scene(task).encode()).hexdigest()[:12], 16) % n == i


SHARD_IGNORED_ARGS = ("shard", "out", "workers", "merge")  # may differ between shards; the rest must agree


def write_shard(args, shard, records, stats, seconds):
    """One shard's output: npz files, images as usual; the records without bins or split in shard_pairs.jsonl
    and the counts in shard.json. No pairs.jsonl: make_tasks.py refuses the folder until it is merged."""
    write_pairs(os.path.join(args.out, "shard_pairs.jsonl"), records)
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
    records, stats = [], new_stats()
    for d, info in zip(dirs, infos):
        for sub in ("pairs", "images", "colmap_re10k"):  # npz files, .sens / video frames, RE10K models
            if os.path.isdir(os.path.join(d, sub)):
                shutil.copytree(os.path.join(d, sub), os.path.join(out, sub), dirs_exist_ok=True)
        with open(os.path.join(d, "shard_pairs.jsonl")) as f:
            records += [json.loads(line) for line in f]
        add_stats(stats, info["stats"])
        stats["shard_seconds"] = stats.get("shard_seconds", 0.0) + info["seconds"]
    with open(os.path.join(out, "args.json"), "w") as f:
        json.dump(dict(infos[0]["args"], merged_from=[os.path.abspath(d) for d in dirs]), f, indent=2)
    return records, stats
