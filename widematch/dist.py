"""Distributed setup and FSDP2 sharding for grpo.py: one process, or torchrun (gloo on CPU, nccl on GPU).
  setup_distributed() -> (rank, world, device); load_sharded(path, ...) -> (model, tokenizer, image_processor),
  only rank 0 reading the weight files; all_sum / gather_objects: the two collectives the trainer needs."""
import datetime
import os
import sys
import types

import torch
import torch.distributed as dist
from transformers import AutoModelForImageTextToText

from widematch.model_io import load_policy, load_processors


def setup_distributed(timeout_min=60, device="auto"):
    """RANK / WORLD_SIZE from torchrun (absent: 1 process). gloo on CPU, nccl on GPU. timeout_min: how long a
    collective may wait (torch's default, 10 min, is shorter than an 8B export or a long eval at 5,120 tokens).
    device (--device): auto = the GPU when torch sees one, else the CPU, except that a CUDA build of torch under
    torchrun that sees no GPU (e.g. a CUDA 13 wheel on an older driver) stops with one line instead of training
    on CPU + gloo; cpu: the CPU whatever torch sees."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device != "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        if device == "auto" and "LOCAL_RANK" in os.environ and torch.version.cuda:
            sys.exit(f"grpo.py: error: launched by torchrun but torch {torch.__version__} (built for CUDA "
                     f"{torch.version.cuda}) sees no GPU (is the driver too old for this build? see nvidia-smi); "
                     f"pass --device cpu to train on CPU with gloo")
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_min))
    return rank, world, device


def shard(model, device, methods=None):
    """FSDP2: one unit per vision block and per decoder layer, the rest in the root. bf16 compute on GPU.
    methods: name -> fn(model, ...): functions that call submodules directly (the trainer's completion log-probs
    and PaStA term), each installed as model.<name> and registered as a root forward for FSDP."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
        else MixedPrecisionPolicy()
    for block in list(model.model.visual.blocks) + list(model.model.language_model.layers):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for name, fn in (methods or {}).items():
        setattr(model, name, types.MethodType(lambda self, *a, _fn=fn, **k: _fn(self, *a, **k), model))
        register_fsdp_forward_method(model, name)
    return model


def load_sharded(path, device, dtype, rank, world, prepare, methods=None):
    """-> (model, tokenizer, image processor); prepare(model) sets modes / grad checkpointing / requires_grad before
    sharding; methods: see shard. 1 process: load_policy. world > 1: only rank 0 reads the weights
    (from_pretrained, so transformers' key conversions apply); every rank builds the model from the config on the
    meta device (no memory), shards it, allocates its shard, and rank 0's full state is broadcast into the shards.
    Peak host RAM: one full copy on rank 0, the shards elsewhere (was: the full model on every rank, and on every
    GPU before sharding)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    if world == 1:
        model, tokenizer, image_processor = load_policy(path, device, dtype)
        prepare(model)
        return model, tokenizer, image_processor
    full, buffers, meta = {}, {}, [None]
    if rank == 0:
        src, tokenizer, image_processor = load_policy(path, "cpu", dtype)
        full = src.state_dict()
        # non-persistent buffers (the rotary inv_freq) are not in the state dict: sent from rank 0 below
        buffers = {n: b for n, b in src.named_buffers() if n not in full}
        meta = [(src.config, src.generation_config, sorted(buffers))]
        del src
    dist.broadcast_object_list(meta, src=0)  # config + generation config: ranks > 0 read no weight file
    if rank != 0:
        tokenizer, image_processor = load_processors(path)
    config, generation_config, buffer_names = meta[0]
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.generation_config = generation_config
    prepare(model)
    model = shard(model, device, methods)
    model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    bufs = dict(model.named_buffers())
    for name in buffer_names:  # to_empty left them uninitialised
        if rank == 0:
            bufs[name].copy_(buffers[name])
        dist.broadcast(bufs[name], 0)
    model.tie_weights()  # a no-op unless tie_word_embeddings (to_empty may have split the tied pair)
    return model, tokenizer, image_processor


def all_sum(x, world):
    t = torch.tensor(float(x), dtype=torch.float64)
    if world > 1:
        t = t.to("cuda") if dist.get_backend() == "nccl" else t
        dist.all_reduce(t)
    return float(t)


def gather_objects(obj, world):
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def print0(*a, **k):
    """print on rank 0 only (RANK from torchrun, as in setup_distributed)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k)
