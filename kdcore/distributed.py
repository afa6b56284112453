"""torch.distributed set-up: torchrun environment -> process group (NCCL on CUDA, gloo on CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), else run single-process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op single-process) and return it."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flags, info: DistInfo, device=None):
    """For each boolean of ``flags`` (this rank's), whether it is true on any rank: one
    all-reduce, so every rank takes the same decision (skip a step, stop, give up a write).
    Returns a list of bools as long as ``flags``."""
    flags = [bool(f) for f in flags]
    if not info.enabled:
        return flags
    t = torch.tensor([float(f) for f in flags], device=device if device is not None else info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [bool(v > 0) for v in t.tolist()]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(module: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """``module`` under DistributedDataParallel when several processes train, else itself.
    Unused parameters are searched for only when the module holds projector or aligner
    parameters (a term that does not reach them in some step)."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    extra = any(True for _ in module.projector.parameters()) or any(True for _ in module.aligner.parameters())
    return DDP(module, find_unused_parameters=extra, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def autocast_dtype(precision: str, device: torch.device):
    """``train.precision`` -> the autocast dtype: bf16 when asked, or ``auto`` on a CUDA device
    that supports it; ``None`` (fp32) otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None
