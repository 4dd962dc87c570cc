# Where a run executes: one process or torchrun's ranks (NCCL on CUDA, gloo on CPU), the collectives the
# trainer needs (every rank must see the same rewards, KL and prompts), mixed precision and host syncs.
# Support code for train.py; plain `python train.py` is a world of one and every helper is then a no-op.
import contextlib
import datetime
import os

import torch
import torch.distributed as dist


def setup_distributed(device_choice):
    # torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain python = one process.
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if device_choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config device: cuda, but no CUDA device is available (use device: auto or cpu)")
    if "RANK" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world, local_rank = 0, 1, 0
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    return rank, world, device


def is_dist():
    return dist.is_available() and dist.is_initialized()


def wrap_ddp(module, device):
    # The LoRA gradients are all-reduced by DDP only if the forward runs through the wrapper (the bug that
    # kvablack/ddpo-pytorch fixed in commit 5955244, huggingface/diffusers issue #4046).
    if not is_dist():
        return module
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def gather_tensor(x):
    """Concatenate a per-rank tensor (same shape on every rank) along dim 0, rank order."""
    if not is_dist():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def gather_list(items):
    if not is_dist():
        return list(items)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def all_ranks_true(flag, device):
    # Every rank must take the same decision (e.g. skip a non-finite update), or their adapters diverge.
    if is_dist():
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0.5)
    return flag


def mean_over_ranks(t):
    if is_dist():
        dist.all_reduce(t)
        t = t / dist.get_world_size()
    return t


def max_over_ranks(t):
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier():
    if is_dist():
        dist.barrier()


def shutdown():
    if is_dist():
        dist.destroy_process_group()


def autocast(device, enabled=True, cpu=False):
    """bf16 autocast on CUDA (the UNet and LGM run in bf16; log-prob math stays fp32); on the CPU only with
    cpu=True (evaluation's --bf16: faster where the CPU has bf16 instructions, slower where it does not)."""
    if enabled and (device.type == "cuda" or (cpu and device.type == "cpu")):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def frozen_dtype(device, mixed_precision):
    """bf16 frozen weights on CUDA with mixed precision (no per-call casts of the base UNet); LoRA stays fp32."""
    return torch.bfloat16 if device.type == "cuda" and mixed_precision == "bf16" else torch.float32


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
