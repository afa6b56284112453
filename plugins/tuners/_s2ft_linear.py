"""Partial back-propagation through one trainable dense block of a frozen weight
(seed-methods.md §2.6).

The block is trained *in place*: the parameter ``s2ft_block`` is a view of the frozen weight
(same storage), so the optimizer's in-place update of the block is the update of ``W``'s block,
the forward is one dense ``y = x Wᵀ + b`` and nothing is copied. Shapes, logical ``(out, in)``
convention (GPT-2's Conv1D through its transposed view):

* column block ``W[:, s:e]`` (o_proj, down_proj: the inputs of the selected units):
  forward saves only ``x[..., s:e]`` (``(e−s)/in`` of the activation);
  ``∂L/∂x = g W`` (``g = ∂L/∂y`` of shape ``[N, out]``), ``∂L/∂B = gᵀ x[..., s:e]`` ``(out, e−s)``.
* row block ``W[s:e, :]`` (v_proj, up_proj: the outputs of the selected units): forward
  saves ``x``; ``∂L/∂B = g[..., s:e]ᵀ x`` ``(e−s, in)``.

The frozen weight never receives a gradient (no full-size buffer); the block's gradient lands
in ``s2ft_block.grad`` through autograd, so gradient accumulation, clipping, DDP's all-reduce and
AdamW (moments of the block's shape only) work unchanged. ``_apply`` (``.to(device)``,
``.half()``) converts weight and block separately; the subclass re-establishes the alias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._s2ft_layout import is_conv1d, logical_weight

COLS, ROWS = 1, 0


class BlockLinear(torch.autograd.Function):
    """``y = x Wᵀ + b`` whose only trainable part is ``block`` (aliasing ``W[:, s:e]`` for
    ``axis = COLS`` or ``W[s:e, :]`` for ``axis = ROWS``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, block, start: int, end: int, axis: int):
        y = F.linear(x, weight, bias)  # autocast, when active, chooses y's dtype
        ctx.dtype, ctx.x_dtype, ctx.span, ctx.axis = y.dtype, x.dtype, (start, end), axis
        if axis == COLS:
            # a copy, so the full input is not kept alive through the view
            saved = x[..., start:end].to(y.dtype).contiguous() if block.requires_grad else None
        else:
            saved = x.to(y.dtype) if block.requires_grad else None
        ctx.save_for_backward(weight, saved)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        weight, saved = ctx.saved_tensors
        start, end = ctx.span
        g = grad_y.to(ctx.dtype)
        grad_x = grad_block = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight.to(ctx.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            g2 = g.reshape(-1, g.shape[-1])
            s2 = saved.reshape(-1, saved.shape[-1])
            grad_block = g2.t() @ s2 if ctx.axis == COLS else g2[:, start:end].t() @ s2
        return grad_x, None, None, grad_block, None, None, None


class S2FTBlockMixin:
    """Forward through :class:`BlockLinear`; keeps ``s2ft_block`` aliased to the weight."""

    def block_view(self) -> torch.Tensor:
        start, end, axis = self.s2ft_span
        w = logical_weight(self)
        return w[:, start:end] if axis == COLS else w[start:end]

    def forward(self, x):
        start, end, axis = self.s2ft_span
        return BlockLinear.apply(x, logical_weight(self), self.bias, self.s2ft_block, start, end, axis)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        view = self.block_view()
        block = self.s2ft_block
        if block.data_ptr() != view.data_ptr() or block.shape != view.shape or block.stride() != view.stride():
            with torch.no_grad():
                view.copy_(block)  # the block is the trained truth
            block.data = view
        return out


_CLASSES = {}


def block_class(base: type) -> type:
    """The subclass of ``base`` (nn.Linear, Conv1D, ...) with the S2FT forward."""
    if base not in _CLASSES:
        _CLASSES[base] = type(f"S2FT{base.__name__}", (S2FTBlockMixin, base), {"_s2ft_base": base})
    return _CLASSES[base]


def attach_block(module: nn.Module, start: int, end: int, axis: int) -> nn.Parameter:
    """Make ``module`` train ``W[:, start:end]`` (``COLS``) or ``W[start:end, :]`` (``ROWS``) in
    place: swaps its class for the S2FT subclass (state-dict keys stay; ``s2ft_block`` is
    added) and returns the block parameter."""
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        raise TypeError(f"s2ft: {type(module).__name__} is neither nn.Linear nor Conv1D")
    if isinstance(module, S2FTBlockMixin):
        raise ValueError("s2ft: module already has a trainable block")
    w = logical_weight(module)
    view = w[:, start:end] if axis == COLS else w[start:end]
    module.weight.requires_grad_(False)
    module.__class__ = block_class(type(module))
    module.s2ft_span = (start, end, axis)
    module.s2ft_block = nn.Parameter(view.detach(), requires_grad=True)
    return module.s2ft_block


def detach_block(module: nn.Module) -> None:
    """Undo :func:`attach_block` (the trained values stay in the weight)."""
    if isinstance(module, S2FTBlockMixin):
        del module.s2ft_block
        del module.s2ft_span
        module.__class__ = module._s2ft_base
