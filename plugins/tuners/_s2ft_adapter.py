"""S2FT export and serving: the plain model, the adapter, fuse/unfuse (seed-methods.md §2.7).

The update of a trained weight is non-zero only in the selected columns (or rows):
``ΔW = B Pᵀ`` (columns) or ``ΔW = P B`` (rows), ``P`` the 0/1 matrix that picks the *original*
(pre-permutation) indices and ``B`` the dense trained block minus its initial value. An
adapter stores, per module, ``index`` (long ``[s]``, original indices along the axis) and
``delta`` (``B``: ``[out, s]`` for columns, ``[s, in]`` for rows, logical ``(out, in)`` layout
for Linear and Conv1D alike):

* fuse: ``W[:, index] += delta`` (``W[index, :]`` for rows), a scatter-add, ``O(d·s)``;
* unfuse: the scatter-subtract; from the handle :func:`fuse` returns it restores the saved
  original slices instead, so ``unfuse(fuse(W)) == W`` bit for bit (the subtraction is exact
  only up to floating-point rounding of ``(W + Δ) − Δ``);
* switch: unfuse the old adapter, fuse the new one.

Files: ``adapter/adapter.safetensors`` (``{module}.index``, ``{module}.delta``) and
``adapter/adapter_config.json`` (``format``, ``version``, per block its module and axis).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from kdcore.errors import ModelError

from ._s2ft_layout import inverse, is_conv1d, logical_weight, reorder
from ._s2ft_linear import COLS, ROWS, detach_block

FORMAT, VERSION = "kdcore-s2ft-adapter", 1
AXES = {COLS: "cols", ROWS: "rows"}


@dataclass
class Reordering:
    """``new = old[order]`` over units of ``unit`` elements in ``[offset, offset + length)`` of
    ``attr`` (``weight``: logical view, along ``axis``; ``bias``: axis 0) of module ``name``."""

    name: str
    attr: str
    axis: int
    offset: int
    length: int
    unit: int
    order: List[int]


@dataclass
class Block:
    """The trainable block of module ``name``: ``[start, end)`` along ``axis`` of the permuted
    logical weight, inside the permuted range (``offset``, ``unit``, ``order``); ``kind`` is
    ``o``, ``v``, ``down`` or ``up``; ``init`` the block's values before training."""

    name: str
    kind: str
    axis: int
    start: int
    end: int
    offset: int
    unit: int
    order: List[int]
    init: torch.Tensor = field(repr=False)

    def original_index(self) -> torch.Tensor:
        """Original (pre-permutation) indices of the block's positions, in block order."""
        rel = torch.arange(self.start - self.offset, self.end - self.offset)
        order = torch.as_tensor(self.order, dtype=torch.long)
        return self.offset + order[rel // self.unit] * self.unit + rel % self.unit


@dataclass
class Plan:
    """What :class:`S2FT` did to a model: the reorderings and the trainable blocks, plus the
    selected units per layer (``selection[kind][layer]``, original unit indices)."""

    reorderings: List[Reordering]
    blocks: List[Block]
    selection: Dict[str, List[List[int]]]


def _key_view(state: Dict[str, torch.Tensor], module, r: Reordering) -> Tuple[str, bool]:
    key = f"{r.name}.{r.attr}"
    return key, r.attr == "weight" and is_conv1d(module)


def plain_state_dict(model, plan: Plan) -> Dict[str, torch.Tensor]:
    """The model's state dict in the original unit order, without the block parameters: the
    weights of a plain transformers model (the model itself is not changed)."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(".s2ft_block")}
    work: Dict[str, torch.Tensor] = {}
    for r in plan.reorderings:
        module = model.get_submodule(r.name)
        key, conv = _key_view(state, module, r)
        if key not in work:
            work[key] = state[key].detach().clone()
        t = work[key].t() if conv else work[key]
        reorder(t, r.axis if r.attr == "weight" else 0, r.offset, r.length, r.unit, inverse(r.order))
    state.update(work)
    return state


@torch.no_grad()
def restore_plain(model, plan: Plan) -> None:
    """In place: drop the blocks (their values are the weights' already) and undo the permutation."""
    for b in plan.blocks:
        detach_block(model.get_submodule(b.name))
    for r in reversed(plan.reorderings):
        module = model.get_submodule(r.name)
        t = logical_weight(module) if r.attr == "weight" else module.bias
        reorder(t, r.axis if r.attr == "weight" else 0, r.offset, r.length, r.unit, inverse(r.order))


def adapter_of(model, plan: Plan) -> Dict[str, Tuple[int, torch.Tensor, torch.Tensor]]:
    """``{module: (axis, original index, delta)}`` of the trained model."""
    out = {}
    for b in plan.blocks:
        block = model.get_submodule(b.name).s2ft_block.detach()
        out[b.name] = (b.axis, b.original_index(), (block - b.init.to(block.device)).float().cpu().contiguous())
    return out


def save_adapter(adapter: Dict[str, Tuple[int, torch.Tensor, torch.Tensor]], directory) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (_, index, delta) in adapter.items():
        tensors[f"{name}.index"] = index.contiguous()
        tensors[f"{name}.delta"] = delta.contiguous()
    save_file(tensors, str(directory / "adapter.safetensors"))
    meta = {"format": FORMAT, "version": VERSION,
            "blocks": [{"module": name, "axis": AXES[axis], "size": int(index.numel())}
                       for name, (axis, index, _) in adapter.items()]}
    (directory / "adapter_config.json").write_text(json.dumps(meta, indent=2))
    return directory


def load_adapter(directory) -> Dict[str, Tuple[int, torch.Tensor, torch.Tensor]]:
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        meta = json.loads((directory / "adapter_config.json").read_text())
        tensors = load_file(str(directory / "adapter.safetensors"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"s2ft adapter {directory}: cannot be read ({exc})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ModelError(f"s2ft adapter {directory}: not a {FORMAT} v{VERSION} adapter")
    axes = {v: k for k, v in AXES.items()}
    out = {}
    for b in meta["blocks"]:
        name = b["module"]
        if f"{name}.index" not in tensors or f"{name}.delta" not in tensors:
            raise ModelError(f"s2ft adapter {directory}: tensors of {name} are missing")
        out[name] = (axes[b["axis"]], tensors[f"{name}.index"].long(), tensors[f"{name}.delta"])
    return out


Adapter = Union[str, Path, Dict[str, Tuple[int, torch.Tensor, torch.Tensor]]]


@dataclass
class Fused:
    """What :func:`fuse` changed: the adapter and the original slices it overwrote."""

    adapter: Dict[str, Tuple[int, torch.Tensor, torch.Tensor]]
    saved: Dict[str, torch.Tensor]


def _resolve(adapter: Adapter):
    return load_adapter(adapter) if isinstance(adapter, (str, Path)) else adapter


def _target(model, name: str, axis: int, index: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ModelError(f"s2ft adapter: the model has no module {name}") from None
    w = logical_weight(module)
    other = w.shape[1 - axis]
    want = (other, index.numel()) if axis == COLS else (index.numel(), other)
    if tuple(delta.shape) != want or (index.numel() and int(index.max()) >= w.shape[axis]):
        raise ModelError(f"s2ft adapter: block of {name} ({tuple(delta.shape)}) does not fit its weight "
                         f"{tuple(w.shape)}")
    return w


@torch.no_grad()
def fuse(model, adapter: Adapter) -> Fused:
    """``W[:, index] += delta`` (rows: ``W[index, :]``) for every block; returns the handle
    that :func:`unfuse` restores exactly."""
    adapter = _resolve(adapter)
    saved = {}
    for name, (axis, index, delta) in adapter.items():
        w = _target(model, name, axis, index, delta)
        idx = index.to(w.device)
        saved[name] = w.index_select(axis, idx).clone()
        w.index_add_(axis, idx, delta.to(device=w.device, dtype=w.dtype))
    return Fused(adapter, saved)


@torch.no_grad()
def unfuse(model, fused: Union[Fused, Adapter]) -> None:
    """Take an adapter out again: from a :class:`Fused` handle, the saved slices are written
    back (exact); from an adapter, ``delta`` is subtracted (exact up to rounding)."""
    if isinstance(fused, Fused):
        for name, (axis, index, delta) in fused.adapter.items():
            w = _target(model, name, axis, index, delta)
            w.index_copy_(axis, index.to(w.device), fused.saved[name].to(w.device))
        return
    for name, (axis, index, delta) in _resolve(fused).items():
        w = _target(model, name, axis, index, delta)
        w.index_add_(axis, index.to(w.device), delta.to(device=w.device, dtype=w.dtype), alpha=-1)


def switch(model, old: Union[Fused, Adapter], new: Adapter) -> Fused:
    """Serve another task: unfuse ``old``, fuse ``new``."""
    unfuse(model, old)
    return fuse(model, new)


def selection_of(plan: Optional[Plan]) -> Dict[str, List[List[int]]]:
    return {} if plan is None else {k: [list(map(int, u)) for u in v] for k, v in plan.selection.items()}
