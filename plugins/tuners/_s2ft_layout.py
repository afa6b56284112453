"""S2FT layouts: the coupled structures of a decoder layer and their co-permutation
(seed-methods.md §2.2, §2.5).

Every projection is handled in the *logical* ``(out, in)`` convention of ``nn.Linear``
(``y = x Wᵀ + b``). GPT-2's ``Conv1D`` stores ``W_conv = Wᵀ`` of shape ``(in, out)``
(``y = x W_conv + b``); its logical view is ``W_conv.t()``, a view, so every in-place edit of
the view edits the stored weight. GPT-2's fused ``c_attn`` holds q, k and v as three row ranges
``[0, d)``, ``[d, 2d)``, ``[2d, 3d)`` of one logical ``(3d, d)`` matrix (:attr:`Proj.offset`).

Structures (found by module structure, not by model type):

* attention ``q, k, v -> per-head softmax(q kᵀ) v -> o``: unit ``u`` = one KV group, i.e. the
  ``r = heads / kv_heads`` query heads that share KV head ``u`` (``r = 1``: one head, MHA).
  Unit sizes: q rows ``r·d_h``, k and v rows ``d_h``, o columns ``r·d_h``. Permuting whole
  groups keeps RoPE, per-head norms (Gemma3's q/k norms act per ``d_h`` slice) and the
  query-to-KV mapping intact.
* FFN ``{gate, up} -> up ⊙ act(gate) -> down`` (GPT-2: ``c_fc -> gelu -> c_proj``): unit =
  one channel; producer rows and down columns of size 1.

``reorder(view, axis, offset, length, unit, order)`` rewrites ``view`` so that unit ``j`` of the
range becomes old unit ``order[j]`` (``new = old[order]``); the inverse is ``argsort(order)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from kdcore.errors import ModelError

SUPPORTED = "Llama, Qwen2, Mistral, Gemma3 (q/k/v/o_proj + gate/up/down_proj) and GPT-2 (c_attn/c_proj + c_fc/c_proj)"


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): weight ``(in, out)``, ``y = x W + b``."""
    return type(module).__name__ == "Conv1D" or any(c.__name__ == "Conv1D" for c in type(module).__mro__)


def logical_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` view of a Linear or Conv1D weight (a view: edits reach the weight)."""
    return module.weight.t() if is_conv1d(module) else module.weight


@dataclass
class Proj:
    """Rows ``[offset, offset + rows)`` of the logical weight of ``module`` (named ``name`` in
    the model): one projection (q, k, v, o, gate, up or down)."""

    name: str
    module: nn.Module
    offset: int
    rows: int

    @property
    def weight(self) -> torch.Tensor:
        return logical_weight(self.module)


@dataclass
class Structure:
    """One coupled structure of one layer: ``producers`` (rows, unit size each) feed the
    activation, ``consumer`` (columns of unit size ``consumer_unit``) reads it.

    ``kind`` is ``attention`` or ``ffn``; ``units`` the number of permutable units (KV groups
    or channels); ``value`` (attention) / ``up`` (FFN) is the producer whose rows may train.
    ``order`` is the applied permutation of units (``None`` until permuted).
    """

    kind: str
    layer: int
    units: int
    producers: List[tuple]  # (Proj, unit size in rows)
    consumer: Proj
    consumer_unit: int
    trainable_producer: Proj
    trainable_producer_unit: int
    order: Optional[List[int]] = field(default=None)

    def permute(self, order: List[int]) -> None:
        """Co-permute the producers' output rows (and biases) and the consumer's input columns."""
        if sorted(order) != list(range(self.units)):
            raise ValueError(f"not a permutation of {self.units} units: {order}")
        with torch.no_grad():
            for proj, unit in self.producers:
                reorder(proj.weight, 0, proj.offset, proj.rows, unit, order)
                if proj.module.bias is not None:
                    reorder(proj.module.bias, 0, proj.offset, proj.rows, unit, order)
            reorder(self.consumer.weight, 1, 0, self.consumer.weight.shape[1], self.consumer_unit, order)
        self.order = list(order)


def unit_index(offset: int, length: int, unit: int, order: List[int], device=None) -> torch.Tensor:
    """Element indices of ``new = old[order]`` over ``[offset, offset + length)`` with units of
    ``unit`` elements: position ``offset + j·unit + w`` takes ``offset + order[j]·unit + w``."""
    units = torch.as_tensor(order, dtype=torch.long, device=device)
    if units.numel() * unit != length:
        raise ValueError(f"{units.numel()} units of {unit} do not cover {length} elements")
    return offset + (units[:, None] * unit + torch.arange(unit, device=device)[None, :]).reshape(-1)


def reorder(t: torch.Tensor, axis: int, offset: int, length: int, unit: int, order: List[int]) -> None:
    """In place on ``t`` (a weight view or a bias): ``t[range] = t[range][order]`` along ``axis``."""
    idx = unit_index(offset, length, unit, order, t.device)
    if axis == 0:
        t[offset: offset + length] = t.index_select(0, idx)
    else:
        t[:, offset: offset + length] = t.index_select(1, idx)


def inverse(order: List[int]) -> List[int]:
    out = [0] * len(order)
    for new, old in enumerate(order):
        out[old] = new
    return out


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _children(layer: nn.Module, names) -> Optional[tuple]:
    """``(prefix, module, [children])`` of the first submodule of ``layer`` that has every name."""
    for prefix, module in layer.named_modules():
        if all(isinstance(getattr(module, n, None), nn.Module) for n in names):
            return prefix, module, [getattr(module, n) for n in names]
    return None


def _width(module: nn.Module, axis: int) -> int:
    return int(logical_weight(module).shape[axis])


def find_structures(model) -> List[List[Structure]]:
    """``[[attention, ffn], ...]``, one pair per decoder layer, or a :class:`ModelError` naming
    the supported layouts."""
    from kdcore.models import decoder_layers

    text = _text_config(model)
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None)
    if not heads:
        raise ModelError(f"s2ft: {type(model).__name__} config has no attention head count")
    layers = decoder_layers(model)
    layer_names = {id(m): n for n, m in model.named_modules()}
    out = []
    for i, layer in enumerate(layers):
        base = layer_names[id(layer)]

        def full(prefix, child):
            return f"{base}.{prefix}.{child}" if prefix else f"{base}.{child}"

        split = _children(layer, ("q_proj", "k_proj", "v_proj", "o_proj"))
        fused = _children(layer, ("c_attn", "c_proj"))
        if split:
            prefix, _, (q, k, v, o) = split
            head_dim = _width(o, 1) // heads
            kv = _width(k, 0) // head_dim
            if heads * head_dim != _width(o, 1) or kv * head_dim != _width(k, 0) or heads % kv:
                raise ModelError(f"s2ft: layer {i}: o_proj/k_proj widths do not match {heads} heads")
            r = heads // kv
            projs = {n: Proj(full(prefix, n), m, 0, _width(m, 0)) for n, m in
                     zip(("q_proj", "k_proj", "v_proj"), (q, k, v))}
            o_proj = Proj(full(prefix, "o_proj"), o, 0, _width(o, 0))
            attn = Structure("attention", i, kv, [(projs["q_proj"], r * head_dim), (projs["k_proj"], head_dim),
                                                  (projs["v_proj"], head_dim)], o_proj, r * head_dim,
                             projs["v_proj"], head_dim)
        elif fused:
            prefix, _, (c_attn, c_proj) = fused
            d = _width(c_proj, 1)
            head_dim = d // heads
            if head_dim * heads != d or _width(c_attn, 0) != 3 * d:
                raise ModelError(f"s2ft: layer {i}: c_attn is not a fused q/k/v of {heads} heads")
            name = full(prefix, "c_attn")
            q, k, v = (Proj(name, c_attn, j * d, d) for j in range(3))
            attn = Structure("attention", i, heads, [(q, head_dim), (k, head_dim), (v, head_dim)],
                             Proj(full(prefix, "c_proj"), c_proj, 0, _width(c_proj, 0)), head_dim, v, head_dim)
        else:
            raise ModelError(f"s2ft: layer {i} of {type(model).__name__} has no supported attention; supported: {SUPPORTED}")

        gated = _children(layer, ("gate_proj", "up_proj", "down_proj"))
        plain = _children(layer, ("c_fc", "c_proj"))
        if gated:
            prefix, _, (gate, up, down) = gated
            k_ch = _width(down, 1)
            up_p = Proj(full(prefix, "up_proj"), up, 0, k_ch)
            ffn = Structure("ffn", i, k_ch, [(Proj(full(prefix, "gate_proj"), gate, 0, k_ch), 1), (up_p, 1)],
                            Proj(full(prefix, "down_proj"), down, 0, _width(down, 0)), 1, up_p, 1)
        elif plain:  # GPT-2's attention has c_proj but no c_fc
            prefix, _, (c_fc, c_proj) = plain
            k_ch = _width(c_proj, 1)
            up_p = Proj(full(prefix, "c_fc"), c_fc, 0, k_ch)
            ffn = Structure("ffn", i, k_ch, [(up_p, 1)], Proj(full(prefix, "c_proj"), c_proj, 0, _width(c_proj, 0)),
                            1, up_p, 1)
        else:
            raise ModelError(f"s2ft: layer {i} of {type(model).__name__} has no supported FFN; supported: {SUPPORTED}")
        for s in (attn, ffn):
            for proj, unit in s.producers:
                if proj.rows != s.units * unit:
                    raise ModelError(f"s2ft: {proj.name}: {proj.rows} rows are not {s.units} units of {unit}")
        out.append([attn, ffn])
    return out
