"""The optimizer and the learning-rate schedule of a run.

AdamW over every parameter that requires a gradient (the tuner decides which do): student
weights at ``train.lr`` with weight decay except on biases and norm weights (1-d tensors),
projector and aligner parameters at ``train.projector_lr``. The schedule is a linear warmup
followed by cosine or linear decay to ``min_lr``, or constant.
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float):
    """Multiplier of a group's base lr at ``step``: linear warmup, then cosine/linear decay to
    ``min_ratio`` (``min_lr / base_lr``) at ``total``, or constant."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
        return min_ratio + (1 - min_ratio) * decay

    return factor


def param_groups(module: torch.nn.Module, lr: float, projector_lr: float, weight_decay: float) -> List[Dict]:
    """Student parameters at ``lr`` (no decay on biases and norm weights, i.e. 1-d tensors),
    projector and aligner parameters at ``projector_lr``."""
    decay, no_decay, extra = [], [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(("projector.", "aligner.")):
            extra.append(p)
        elif p.dim() < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    if extra:
        groups.append({"params": extra, "lr": projector_lr, "weight_decay": weight_decay})
    return [g for g in groups if g["params"]]


def build_optimizer(module: torch.nn.Module, train, total_steps: int) -> Tuple[torch.optim.Optimizer, object]:
    """``(AdamW, LambdaLR)`` for the ``train:`` section ``train`` over ``total_steps`` steps."""
    optimizer = torch.optim.AdamW(param_groups(module, train.lr, train.projector_lr, train.weight_decay),
                                  betas=tuple(train.adam_betas))
    lambdas = [lr_lambda(train.schedule, train.warmup_steps, total_steps, min(train.min_lr / g["lr"], 1.0))
               for g in optimizer.param_groups]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def total_grad_norm(params) -> torch.Tensor:
    """``‖g‖₂`` over the gradients of ``params``, the same value on every rank. Sharded (DTensor)
    gradients give ``sqrt(Σ_ranks Σ_shards ‖g_shard‖²)`` (one all-reduce) as a replicated
    DTensor; returned as a plain 0-d tensor either way."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def clip_grads(params, clip: float, norm: torch.Tensor) -> None:
    """Scale the gradients by ``min(1, clip / (norm + 1e-6))`` (``clip`` 0 = off): one factor for
    all of them, so sharded and replicated gradients are clipped alike."""
    if clip <= 0:
        return
    factor = float(torch.clamp(clip / (norm + 1e-6), max=1.0))
    if factor < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(factor)


def optimizer_step(params, optimizer, scheduler, clip: float, skip=None) -> float:
    """Clip the global gradient norm (``clip`` 0 = off), step, advance the schedule, zero the
    gradients; returns the norm before clipping. ``skip(norm) -> bool`` may veto the update
    (a non-finite step): then neither the weights, the optimizer state nor the schedule move."""
    params = list(params)
    norm = total_grad_norm(params)
    if torch.isfinite(norm):
        clip_grads(params, clip, norm)
    if skip is None or not skip(float(norm)):
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


HYPERPARAMETERS = ("lr", "initial_lr", "weight_decay", "betas")


def hyperparameters(optimizer, scheduler) -> Dict:
    """The configured hyperparameters of every group and the schedule's base rates (what a
    freshly built optimizer holds, before a checkpoint overwrites them)."""
    return {"groups": [{k: g[k] for k in HYPERPARAMETERS if k in g} for g in optimizer.param_groups],
            "base_lrs": list(scheduler.base_lrs)}


def set_hyperparameters(optimizer, scheduler, fresh: Dict) -> None:
    """After restoring a checkpoint with a changed config: the new hyperparameters and base
    rates apply, at the restored position of the (new) schedule."""
    scheduler.base_lrs = list(fresh["base_lrs"])
    for group, values, base, factor in zip(optimizer.param_groups, fresh["groups"], scheduler.base_lrs,
                                           scheduler.lr_lambdas):
        group.update({k: v for k, v in values.items() if k != "lr"})
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
