"""S2FT selection: budgets -> unit counts, unit scores, allocation over layers (seed-methods.md
§2.3, §2.4, §2.9).

Budgets: an int is a count of units in the whole model, a float in ``[0, 1]`` a ratio of all
units (``n = ⌊ratio · L · units_per_layer⌋``, as the released scripts). Units: attention = KV
groups (one head each for MHA), FFN = channels.

Scores ``s[ℓ, u]`` (higher = picked first with ``order: largest``; negated for ``smallest``):

* ``random``: i.i.d. uniform from a seeded generator (S2FT-R; the order is irrelevant).
* ``weight``: ``‖W_unit‖_F`` of the trained side: o/down columns of the unit, v/up rows (S2FT-W).
* ``activation``: ``‖A_unit‖_2`` over the calibration tokens (padding excluded) of the coupled
  activation, the input of o_proj / down_proj restricted to the unit (S2FT-A).
* ``weight_activation``: their product (S2FT-S).

Allocation: ``uniform`` (the paper): every layer gets ``⌊n / L⌋`` units, its best by score, and
the ``n mod L`` remaining units go to the best-scoring units left over, pooled across layers;
``pooled`` (the released code): the ``n`` best-scoring (layer, unit) pairs of the whole model.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch

from kdcore.errors import ConfigError


def resolve_budget(value: Optional[Union[int, float]], per_layer: int, layers: int, what: str) -> int:
    """Number of units a budget asks for; a :class:`ConfigError` when it cannot be met."""
    total = per_layer * layers
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"student.tuner.{what}: expected a count (int) or a ratio (float), got {value!r}")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"student.tuner.{what}: a ratio must lie in [0, 1], got {value}")
        return int(value * total)
    if value < 0:
        raise ConfigError(f"student.tuner.{what}: a count must be >= 0, got {value}")
    if value > total:
        raise ConfigError(f"student.tuner.{what}: {value} units asked but the model has {total} "
                          f"({layers} layers × {per_layer}); use a count <= {total} or a ratio")
    return value


def allocate(scores: torch.Tensor, n: int, allocation: str) -> List[List[int]]:
    """Selected unit indices per layer (ascending) from ``scores`` ``[L, U]`` (higher first)."""
    layers, units = scores.shape
    chosen = torch.zeros(layers, units, dtype=torch.bool)
    if n:
        if allocation == "uniform":
            base = n // layers
            if base:
                top = scores.topk(base, dim=1).indices
                chosen.scatter_(1, top, True)
            rest = n - base * layers
        else:
            rest = n
        if rest:
            left = scores.masked_fill(chosen, float("-inf")).reshape(-1)
            chosen.view(-1)[left.topk(rest).indices] = True
    return [torch.nonzero(row).flatten().tolist() for row in chosen]


def random_scores(layers: int, units: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(layers, units, generator=generator, dtype=torch.float64)


def weight_scores(structures, side: str) -> torch.Tensor:
    """``[L, U]`` Frobenius norms of each unit's trained weights: consumer columns (``side``
    ``consumer``: o, down) or trainable-producer rows (``producer``: v, up)."""
    rows = []
    for s in structures:
        if side == "consumer":
            w = s.consumer.weight.detach().double()
            per = w.pow(2).sum(0).reshape(s.units, s.consumer_unit).sum(1)
        else:
            p = s.trainable_producer
            w = p.weight.detach()[p.offset: p.offset + p.rows].double()
            per = w.pow(2).sum(1).reshape(s.units, s.trainable_producer_unit).sum(1)
        rows.append(per.sqrt())
    return torch.stack(rows)


@torch.no_grad()
def activation_scores(model, layers, batches) -> dict:
    """``{"attention": [L, U], "ffn": [L, U]}``: ``‖A_unit‖_2`` of the consumers' inputs over the
    non-padding tokens of ``batches`` (forward passes only)."""
    sums = {kind: [torch.zeros(pair[j].units, dtype=torch.float64) for pair in layers]
            for j, kind in enumerate(("attention", "ffn"))}
    mask = {}
    handles = []
    for li, pair in enumerate(layers):
        for j, kind in enumerate(("attention", "ffn")):
            s = pair[j]

            def hook(module, args, s=s, acc=sums[kind][li]):
                x = args[0].detach().double()
                keep = mask["m"].reshape(-1).bool() if mask.get("m") is not None else None
                x = x.reshape(-1, x.shape[-1])
                if keep is not None and keep.numel() == x.shape[0]:
                    x = x[keep.to(x.device)]
                acc += x.pow(2).sum(0).reshape(s.units, s.consumer_unit).sum(1).cpu()

            handles.append(s.consumer.module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seen = 0
    try:
        for batch in batches:
            mask["m"] = batch.get("attention_mask")
            model(input_ids=batch["input_ids"].to(device),
                  attention_mask=batch["attention_mask"].to(device) if "attention_mask" in batch else None)
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not seen:
        raise ConfigError("student.tuner: the activation strategy needs calibration data, but no batch came")
    return {kind: torch.stack(rows).sqrt() for kind, rows in sums.items()}
