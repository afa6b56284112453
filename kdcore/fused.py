"""A space's loss with its gradient computed in the forward pass, chunk by chunk.

For each chunk of ``n`` rows (no autograd graph is recorded):

    z_s = head_s(h_s)  [n, V_s]      z_t = head_t(h_t)  [n, V_t]        (each head runs once)
    values, g_kd = criterion.value_and_grad(z_s, z_t)   g_kd[i] = ∂values[i]/∂z_s[i]
    CE terms:  Σ CE(z, y),  ∂/∂z = softmax(z) − onehot(y)
    gates:     values and g_kd multiplied by the row's accuracy hit

and the gradients with respect to the logits are carried through the heads at once:

    ∂/∂h = g̃ W        ∂/∂W = g̃ᵀ h        ∂/∂b = Σ_rows g̃        g̃ = scale · g · (1 − (z/c)²)

(``c`` a final-logit softcap, ``scale`` a logit scale, see :class:`kdcore.kdspace.Head`). Only
those ``[n, h]`` / ``[V, h]`` gradients are kept; the ``[n, V]`` logits are freed with the chunk,
and backward is a multiplication of the saved gradients by the incoming ones: nothing is
recomputed, the frozen teacher head runs once.

Two modes. With ``weights`` (``weight(term name) -> float``, the objective's) one combined gradient per
input is kept; the backward then requires the incoming gradients to be proportional to those
weights (which they are when the terms are combined by :func:`kdcore.distill.objective`) and
raises otherwise. Without ``weights`` each term keeps its own gradients, so any combination of
the terms (or one of them alone) can be differentiated.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

SIDES = ("student", "teacher")


def _needs_grad(rows) -> Dict[str, bool]:
    head = rows.head
    return {"hidden": rows.hidden.requires_grad,
            "weight": not head.detach and head.weight.requires_grad,
            "bias": not head.detach and head.bias is not None and head.bias.requires_grad}


def supports(space) -> bool:
    """Whether the fused path can serve ``space``: a side that needs a gradient has no logits map."""
    return not any(getattr(space, side).map_logits is not None and any(_needs_grad(getattr(space, side)).values())
                   for side in SIDES)


def _linear_grad(head, logits: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """∂/∂(h Wᵀ + b) from ∂/∂logits through the head's softcap and scale."""
    if head.softcap:
        g = g * (1.0 - (logits.float() / head.softcap) ** 2)
    if head.scale != 1.0:
        g = g * head.scale
    return g


def _ce_and_grad(logits: torch.Tensor, labels: torch.Tensor):
    """``(Σ CE(z, y), softmax(z) − onehot(y))`` in float32."""
    z = logits.float()
    value = F.cross_entropy(z, labels, reduction="sum")
    grad = torch.softmax(z, dim=-1)
    grad[torch.arange(len(labels), device=labels.device), labels] -= 1.0
    return value, grad


class _Accumulator:
    """Gradients of the space's inputs for one "key" (a term, or the combination): the rows'
    gradients per chunk (concatenated at the end) and the heads' summed over chunks."""

    def __init__(self, space):
        self.space, self.rows = space, {side: [] for side in SIDES}
        self.weight = {side: None for side in SIDES}
        self.bias = {side: None for side in SIDES}

    def add(self, side: str, hidden: torch.Tensor, logits: torch.Tensor, g: Optional[torch.Tensor]) -> None:
        rows = getattr(self.space, side)
        need = _needs_grad(rows)
        if g is None or not any(need.values()):
            if need["hidden"]:
                self.rows[side].append(hidden.new_zeros(hidden.shape))
            return
        head = rows.head
        g_lin = _linear_grad(head, logits, g)
        dtype = logits.dtype  # the forward's compute dtype (bf16 under autocast)
        if need["hidden"]:
            self.rows[side].append((g_lin.to(dtype) @ head.weight.to(dtype)).to(hidden.dtype))
        if need["weight"]:
            gw = (g_lin.to(dtype).T @ hidden.to(dtype)).float()
            self.weight[side] = gw if self.weight[side] is None else self.weight[side] + gw
        if need["bias"]:
            gb = g_lin.float().sum(0)
            self.bias[side] = gb if self.bias[side] is None else self.bias[side] + gb

    def grads(self) -> List[Optional[torch.Tensor]]:
        """In input order: h_s, h_t, W_s, b_s, W_t, b_t (``None`` where no gradient)."""
        out = [torch.cat(self.rows[side]) if self.rows[side] else None for side in SIDES]
        for side in SIDES:
            head = getattr(self.space, side).head
            out.append(self.weight[side].to(head.weight.dtype) if self.weight[side] is not None else None)
            out.append(self.bias[side].to(head.bias.dtype) if self.bias[side] is not None else None)
        return out


def _chunk_terms(space, hs, ht, labels, rows):
    """Values and logit gradients of one chunk: ``values {name: scalar}``, ``grads {name: {side:
    g}}``, ``hits {name: correct}``, and the chunk's logits per side."""
    logits = {"student": space.student.logits(hs, rows), "teacher": space.teacher.logits(ht, rows)}
    per_row, g_kd = space.criterion.value_and_grad(logits["student"], logits["teacher"])
    values, grads, hits = {}, {}, {}
    for term in space.terms:
        side = logits[term.side]
        if hasattr(term, "gate"):  # an Accuracy
            hit = side.argmax(-1).eq(labels)
            hits[term.name] = hit.sum().float()
            if term.gate:
                per_row = per_row * hit.to(per_row.dtype)
                g_kd = _scaled(g_kd, hit.to(g_kd.dtype)[:, None])
        else:
            values[term.name], g = _ce_and_grad(side, labels)
            grads[term.name] = {term.side: g}
    kd_name = f"kd_{space.name}"
    values[kd_name] = per_row.float().sum()
    grads[kd_name] = {"student": g_kd}
    return values, grads, hits, logits


Weights = Optional[Callable[[str], float]]


def run_space(space, chunk_size: int, weights: Weights):
    """Every chunk under no_grad: ``(values {term: sum}, hits {acc: correct}, accumulators)``;
    ``accumulators`` maps ``"*"`` (combined by ``weights``) or each term to its gradients."""
    n = space.num_rows
    values: Dict[str, torch.Tensor] = {}
    hits: Dict[str, torch.Tensor] = {}
    accs: Dict[str, _Accumulator] = {}
    with torch.no_grad():
        for start in range(0, max(n, 1), chunk_size):
            rows = slice(start, start + chunk_size)
            hs, ht = space.student.hidden[rows], space.teacher.hidden[rows]
            labels = space.labels[rows] if space.labels is not None else None
            v, g, h, logits = _chunk_terms(space, hs, ht, labels, rows)
            for name, value in v.items():
                values[name] = values[name] + value if name in values else value
            for name, value in h.items():
                hits[name] = hits[name] + value if name in hits else value
            keyed = _combine(g, weights) if weights is not None else g
            for key, by_side in keyed.items():
                acc = accs.setdefault(key, _Accumulator(space))
                for side in SIDES:
                    acc.add(side, hs if side == "student" else ht, logits[side], by_side.get(side))
            del logits, g, keyed
    return values, hits, accs


def _combine(grads: Dict[str, Dict[str, torch.Tensor]], weights: Callable[[str], float]) -> Dict[str, Dict[str, torch.Tensor]]:
    """``{"*": {side: Σ_terms weight · g}}``, in the terms' own ``[n, V]`` buffers (they belong to
    this chunk): the same float operations as ``w·g`` and ``+``, without a new buffer per term."""
    out: Dict[str, torch.Tensor] = {}
    for name, by_side in grads.items():
        w = weights(name)
        if w == 0.0:
            continue
        for side, g in by_side.items():
            out[side] = out[side].add_(_scaled(g, w)) if side in out else _scaled(g, w)
    return {"*": out}


def _scaled(g: torch.Tensor, factor) -> torch.Tensor:
    """``factor · g``, in place where ``g`` owns its elements (a chunk's fresh gradient; an
    autograd gradient can be an expanded view, which gets a new tensor)."""
    return g.mul_(factor) if g.is_contiguous() else g * factor


class FusedSpace(torch.autograd.Function):
    """Outputs the stacked term values ``[k]`` of a space (order ``names``); backward multiplies
    the gradients saved by :func:`run_space` by the incoming ones."""

    @staticmethod
    def forward(ctx, holder, h_s, h_t, w_s, b_s, w_t, b_t):
        values, names, grads, weights = holder
        ctx.names, ctx.weights = names, weights
        ctx.keys = list(grads)
        flat = [g for key in ctx.keys for g in grads[key].grads()]
        ctx.present = [g is not None for g in flat]
        ctx.save_for_backward(*[g for g in flat if g is not None])
        return torch.stack([values[name].float() for name in names])

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        flat = [next(saved) if present else None for present in ctx.present]
        per_key = {key: flat[6 * i: 6 * i + 6] for i, key in enumerate(ctx.keys)}
        if ctx.weights is not None:
            scale = _common_scale(grad_out, ctx.names, ctx.weights)
            factors = {"*": scale}
        else:
            factors = {key: grad_out[ctx.names.index(key)] for key in ctx.keys}
        out: List[Optional[torch.Tensor]] = [None] * 6
        for key, grads in per_key.items():
            for i, g in enumerate(grads):
                if g is not None:
                    contribution = g * factors[key].to(g.dtype)
                    out[i] = contribution if out[i] is None else out[i] + contribution
        return (None, *out)


def _common_scale(grad_out: torch.Tensor, names: Sequence[str], weights: Callable[[str], float]) -> torch.Tensor:
    """The ``s`` with ``grad_out[k] = s · weights[k]`` for every term (the objective's backward)."""
    w = torch.tensor([weights(n) for n in names], dtype=grad_out.dtype, device=grad_out.device)
    ref = int(torch.argmax(w.abs()))
    scale = grad_out[ref] / w[ref]
    if not torch.allclose(grad_out, scale * w, rtol=1e-5, atol=1e-12):
        raise RuntimeError("a space evaluated for the objective's weights was differentiated through another "
                           "combination of its terms; evaluate it without weights (per-term gradients) for that")
    return scale


def evaluate_fused(space, chunk_size: int, weights: Weights = None):
    """``(losses {name: differentiable sum}, counts {accuracy: (correct, rows)})`` of ``space``."""
    values, hits, accs = run_space(space, chunk_size, weights)
    names = [f"kd_{space.name}"] + [t.name for t in space.terms if not hasattr(t, "gate")]
    inputs = [space.student.hidden, space.teacher.hidden]
    for head in (space.student.head, space.teacher.head):
        inputs += [head.weight if not head.detach else None, head.bias if not head.detach else None]
    stacked = FusedSpace.apply((values, names, accs, weights), *inputs)
    losses = {name: stacked[i] for i, name in enumerate(names)}
    counts = {t.name: (hits[t.name].detach(), space.num_rows) for t in space.terms if hasattr(t, "gate")}
    return losses, counts
