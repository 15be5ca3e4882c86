"""grpo.py's test hooks (the hidden --debug-* and --stop-after-step flags), kept out of the training loop: the
tests use them to compare 1 process with torchrun, to kill a run mid-way and resume it, and to check what a
resumed run restored. docs/grpo.md says what each flag does."""
import os
import sys

import torch

from widematch.checkpoint import rng_state


def step_range(start, args):
    """The steps start+1 .. --steps. --stop-after-step N (tests): a hard exit (os._exit: no clean-up, no
    destructors) once step N is done and saved, to test --resume."""
    for step in range(start + 1, args.steps + 1):
        yield step
        if args.stop_after_step is not None and step >= args.stop_after_step:
            sys.stdout.flush()
            os._exit(17)


def debug_dump(path, model, ref_model, opt, task_rng, greedy_rows, rank):
    """--debug-dump: after loading / resuming, rank 0 saves its RNG state, the greedy eval rows of the policy and
    the reference (greedy_rows(model): grpo.py's evaluate_match through transformers; None for no model) and the
    full model and optimizer state."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    rng = rng_state(task_rng)  # before anything else runs
    rows = [None if m is None else greedy_rows(m) for m in (model, ref_model)]
    out = dict(rng=rng, policy=rows[0], ref=rows[1], model=get_model_state_dict(model, options=opts),
               optim=get_optimizer_state_dict(model, opt, options=opts))
    if rank == 0:
        torch.save(out, path)


def dump_grads(model, path, rank):
    """--debug-grad-dump: every parameter's full gradient (gathered from the FSDP2 shards) saved by rank 0."""
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()
        grads[name] = None if g is None else g.detach().cpu().clone()
    if rank == 0:
        torch.save(grads, path)
