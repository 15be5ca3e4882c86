"""grpo.py's run dir: step_%06d/ checkpoints written atomically (step_%06d.tmp/ renamed once meta.json is in),
optionally in the background (--async-save), resumed on any world size; a full disk stops every rank with one
line and keeps the last complete step; one live run per --out (a flock on <out>/.lock).
  save_checkpoint(...) / finish_save(pending, ...): write (and complete) a step; latest_checkpoint(run_dir);
  resume(ckpt, ...) -> the step done; catch_enospc / disk_full_check: the full-disk protocol of every write."""
import contextlib
import copy
import errno
import fcntl
import json
import os
import random
import re
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist

from widematch.dist import all_sum, print0
from widematch.model_io import copy_processor_files


def latest_checkpoint(run_dir, with_weights=False):
    """Newest complete <run_dir>/step_%06d/ (one with meta.json, which is written last), or None. with_weights: the
    newest that also holds the save_pretrained export (config.json; see --export-every), for evaluate.py."""
    if not os.path.isdir(run_dir):
        return None
    steps = [d for d in os.listdir(run_dir) if re.fullmatch(r"step_\d{6}", d)
             and os.path.isfile(os.path.join(run_dir, d, "meta.json"))
             and (not with_weights or os.path.isfile(os.path.join(run_dir, d, "config.json")))]
    return os.path.join(run_dir, max(steps)) if steps else None


def rng_state(task_rng):
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                task=task_rng.bit_generator.state)


def set_rng_state(s, task_rng):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None:
        torch.cuda.set_rng_state_all(s["cuda"])
    task_rng.bit_generator.state = s["task"]


def save_checkpoint(step, model, opt, sched, cur, task_rng, tokenizer, image_processor, args, rank, world, pending):
    """step_%06d.tmp/ -> step_%06d/. Each rank writes its own shard of the weights and the optimizer state
    (torch.distributed.checkpoint, dcp/) and its RNG state; rank 0 the scheduler, curriculum, the base model's
    processor files (copy_processor_files; our tokenizer / image processor saved only where the base lacks them)
    and (--export-every) a bf16 save_pretrained export; meta.json last, then the rename. With
    --async-save the shards are written in the background and pending (a dict) holds the unfinished save, which
    finish_save completes (the main loop calls it one step later). A full disk on any rank: the .tmp dir is
    removed and every rank stops with one line (disk_full_check); the previous step_*/ is untouched."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    finish_save(pending, args, rank, world)
    final = os.path.join(args.out, f"step_{step:06d}")
    tmp = final + ".tmp"
    need = checkpoint_bytes(model, args, step)
    full = []  # this rank's ENOSPC, if any
    with catch_enospc(full):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
    disk_full_check(full, tmp, need, rank, world, tmp)  # also the barrier before the other ranks write into tmp
    export = args.export_every == 0 or step % args.export_every == 0 or step == args.steps
    with catch_enospc(full):
        if export:
            export_weights(model, tmp, rank)  # its gathers run before rank 0 writes: no rank waits on a failure
        torch.save(rng_state(task_rng), os.path.join(tmp, f"rng_{rank}.pt"))
        if rank == 0:  # after export_weights: the base's generation_config.json replaces the one it wrote
            copied = copy_processor_files(args.model, tmp)
            if not {"tokenizer.json", "tokenizer_config.json"} & set(copied):  # a base without them: save ours
                tokenizer.save_pretrained(tmp)
            if "preprocessor_config.json" not in copied:
                image_processor.save_pretrained(tmp)
            torch.save(sched.state_dict(), os.path.join(tmp, "scheduler.pt"))
            with open(os.path.join(tmp, "curriculum.json"), "w") as f:
                json.dump(cur.state_dict(), f)
    disk_full_check(full, tmp, need, rank, world, tmp)
    msd, osd = get_state_dict(model, opt)  # this rank's shards (DTensors) when sharded, no gather
    state = dict(model=msd, optim=osd)
    pending.update(step=step, tmp=tmp, final=final, need=need)
    if args.async_save:  # staged to CPU here, written by a thread; its own process group for its collectives
        if world > 1 and "group" not in pending:
            pending["group"] = dist.new_group(backend="gloo")
        pending["future"] = dcp.async_save(state, checkpoint_id=os.path.join(tmp, "dcp"),
                                           process_group=pending.get("group"))
    else:
        with catch_enospc(full):  # dcp reports a failed write to every rank (CheckpointException)
            dcp.save(state, checkpoint_id=os.path.join(tmp, "dcp"))
        disk_full_check(full, os.path.join(tmp, "dcp"), need, rank, world, tmp, pending)
        finish_save(pending, args, rank, world)


def finish_save(pending, args, rank, world):
    """Completes the save in pending (if any): waits for its shards on every rank, then rank 0 writes meta.json
    (its presence marks a complete checkpoint), renames step_%06d.tmp/ and prunes to --keep-last."""
    if "tmp" not in pending:
        return
    full = []
    if "future" in pending:
        with catch_enospc(full):
            pending.pop("future").result()
    disk_full_check(full, os.path.join(pending["tmp"], "dcp"), pending["need"], rank, world, pending["tmp"], pending)
    step, tmp, final = pending.pop("step"), pending.pop("tmp"), pending.pop("final")
    need = pending.pop("need")
    with catch_enospc(full):
        if rank == 0:
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(dict(step=step, world_size=world, args=vars(args)), f, indent=2)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            done = sorted(d for d in os.listdir(args.out) if re.fullmatch(r"step_\d{6}", d))
            for d in done[:-args.keep_last] if args.keep_last > 0 else []:
                shutil.rmtree(os.path.join(args.out, d))
    disk_full_check(full, os.path.join(tmp, "meta.json"), need, rank, world, tmp)  # and the closing barrier


def checkpoint_bytes(model, args, step):
    """Estimated bytes of one checkpoint (all ranks): fp32 weights + AdamW's two fp32 moments, + the bf16 export."""
    n = sum(p.numel() for p in model.parameters())  # global sizes, also of FSDP2's DTensor shards
    export = args.export_every == 0 or step % args.export_every == 0 or step == args.steps
    return n * (4 + 8 + (2 if export else 0))


def is_enospc(e):
    """e (or what it wraps: its cause, dcp's per-rank failures, safetensors' Rust IoError) is a full disk."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if type(x).__name__ == "SafetensorError" and ("StorageFull" in str(x) or "code: 28" in str(x)):
            return True
        todo += [x.__cause__, x.__context__] + [f[0] for f in getattr(x, "failures", {}).values()]
    return False


@contextlib.contextmanager
def catch_enospc(found):
    """Runs the block; a full-disk error is appended to found (for disk_full_check), any other error raised."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
    try:
        yield
    except (Exception, CheckpointException) as e:
        if not is_enospc(e):
            raise
        found.append(e)


def disk_full_check(found, path, need, rank, world, tmp=None, pending=None):
    """Every rank calls it after a write phase (a collective: it is also a barrier). When any rank ran out of
    space: rank 0 removes the half-written tmp dir, and every rank stops with one line naming the path and the
    space needed."""
    if all_sum(len(found), world) == 0:
        return
    if pending is not None:
        pending.clear()
    if tmp and rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    where = next((getattr(e, "filename", None) for e in found if getattr(e, "filename", None)), None) or path
    if not found:
        where = f"{path} (on another rank)"
    probe = os.path.dirname(path) if not os.path.isdir(path) else path
    while probe and not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe or ".").free
    if world > 1:
        dist.destroy_process_group()
    sys.exit(f"grpo.py: error: no space left on device writing {where}: needs about {need / 2 ** 20:,.1f} MiB, "
             f"{free / 2 ** 20:,.1f} MiB free there; the last complete step_*/ is kept: free space, then rerun "
             f"with --resume")


def lock_run_dir(out, rank, world):
    """rank 0 holds an exclusive flock on <out>/.lock (the file says its pid) for the whole run -> the open file
    (None on ranks > 0). A second run on the same --out while one is live stops with one line, on every rank.
    The kernel drops the lock when the process dies, so a crashed run leaves no stale lock."""
    busy = [None]
    f = None
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        f = open(os.path.join(out, ".lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
        except BlockingIOError:
            f.seek(0)
            busy = [f.read().strip() or "?"]
            f.close()
    if world > 1:
        dist.broadcast_object_list(busy, src=0)
    if busy[0] is not None:
        sys.exit(f"grpo.py: error: --out {out} is in use by a live run (pid {busy[0]}, see {out}/.lock); wait for "
                 f"it to end or pick another --out")
    return f


def export_weights(model, out_dir, rank):
    """A plain bf16 save_pretrained copy of the weights in out_dir (config.json + model.safetensors) for
    evaluate.py / transformers. One tensor at a time is gathered (a collective: every rank calls this); only
    rank 0 keeps them, so its host RAM peak is the bf16 model (16 GiB at 8B), not the fp32 one."""
    full = {}
    for name, t in model.state_dict().items():
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        if rank == 0:
            full[name] = t.detach().to("cpu", torch.bfloat16 if t.is_floating_point() else t.dtype).contiguous()
    if rank == 0:
        model.save_pretrained(out_dir, state_dict=full)
        config = copy.deepcopy(model.config)  # save_pretrained wrote the model's fp32 dtype: say what the file holds
        for c in [config] + [getattr(config, k) for k in config.sub_configs]:
            c.dtype = "bfloat16"
        config.save_pretrained(out_dir)


def load_training_state(ckpt, model, opt, sched, cur, task_rng, args, rank, world):
    """Restores weights + optimizer state (each rank reads its shards; a checkpoint of another world size is
    resharded by torch.distributed.checkpoint), scheduler, curriculum and RNG -> the step done. Another world size
    uses rank 0's RNG (ranks > 0 reseeded), so that run is not byte-identical to an uninterrupted one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    with open(os.path.join(ckpt, "meta.json")) as f:
        meta = json.load(f)
    if not os.path.isdir(os.path.join(ckpt, "dcp")):
        sys.exit(f"grpo.py: error: {ckpt} has no dcp/ (weights + optimizer shards): written by an older grpo.py; "
                 f"start a new run from its weights with --model {ckpt}")
    msd, osd = get_state_dict(model, opt)
    state = dict(model=msd, optim=osd)
    dcp.load(state, checkpoint_id=os.path.join(ckpt, "dcp"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sched.load_state_dict(torch.load(os.path.join(ckpt, "scheduler.pt"), weights_only=False))
    with open(os.path.join(ckpt, "curriculum.json")) as f:
        for note in cur.load_state_dict(json.load(f)):  # an older checkpoint's curriculum state is migrated
            print0(f"grpo.py: {ckpt}/curriculum.json: {note}")
    saved_world = meta.get("world_size", 1)
    same = saved_world == world
    set_rng_state(torch.load(os.path.join(ckpt, f"rng_{rank if same else 0}.pt"), weights_only=False), task_rng)
    if not same:
        if rank > 0:  # rank 0's python / numpy / torch state on every rank would sample the same completions
            s = args.seed + 1000 * meta["step"] + rank
            random.seed(s)
            np.random.seed(s)
            torch.manual_seed(s)
        print0(f"grpo.py: resuming a {saved_world}-process checkpoint on {world} process(es): weights and optimizer "
               f"resharded, rank 0's RNG state used; the run is NOT byte-identical to an uninterrupted one")
    return meta["step"]


def resume(ckpt, args, model, opt, sched, cur, task_rng, rank, world):
    """Restores optimizer, scheduler, curriculum and RNG state from ckpt (None: a fresh run) -> the step done."""
    if ckpt is not None:
        start = load_training_state(ckpt, model, opt, sched, cur, task_rng, args, rank, world)
        print0(f"resumed from {ckpt} (step {start})")
        return start
    if args.resume:
        print0(f"--resume: no complete checkpoint in {args.out}, starting fresh")
    return 0


def truncate_jsonl(path, last_step):
    """Drop lines of steps after the checkpoint we resume from (they will be redone)."""
    if not os.path.isfile(path):
        return
    def step_of(line):  # a line cut by a full disk or a crash is dropped
        try:
            return json.loads(line)["step"]
        except json.JSONDecodeError:
            return None
    with open(path) as f:
        keep = [line for line in f if line.strip() and (step_of(line) or last_step + 1) <= last_step]
    with open(path, "w") as f:
        f.writelines(keep)
