"""Adaptive KL divergence (Wu et al. 2024, "Rethinking KL divergence in KD for LLMs"; DSKD §4).

With ``p = softmax(z / T)`` for student and teacher (float32 math whatever the input dtype),
per row:

1. sort ``p_t`` ascending and gather ``p_s`` in the same order;
2. ``gap_i = |p_t,i − p_s,i|``; ``C_i = Σ_{j ≤ i} p_t,j`` (cumulative teacher mass);
3. tail = ``{i : C_i ≤ α}`` (the low-probability tokens holding at most α of the teacher
   mass), head = the rest;
4. ``g_head = Σ_head gap``, ``g_tail = Σ_tail gap``, both without gradient (stop-gradient);
5. ``AKL = g_head/(g_head + g_tail) · KL(p_t || p_s) + g_tail/(g_head + g_tail) · KL(p_s || p_t)``.

``alpha`` (α, default 0.5) is the tail mass threshold, in [0, 1]. When the two distributions are
identical (``g_head + g_tail = 0``) the weights are taken as ½/½, so the value is 0, not NaN.
The KL terms follow ``fkl``/``rkl``: ``−inf`` columns in both contribute 0; a column ``−inf``
only in the teacher has its reverse-KL term dropped (DSKD convention; the true value is ``+inf``)
and counts as tail (its ``C_i`` is 0). No ``T²`` rescaling.

Gradient (analytic): the weights ``w_head = g_head/(g_head + g_tail)``, ``w_tail`` are
stop-gradient constants, so ``∂AKL/∂z_s = w_head·∂KL/∂z_s + w_tail·∂RKL/∂z_s`` with the
``fkl`` and ``rkl`` gradients (``(p_s − p_t)/T`` and ``p_s (log p_s − log p_t − RKL)/T``
without masked columns).

Shapes: ``student_logits[N, V]``, ``teacher_logits[N, V]`` -> ``[N]`` float32.
"""

from __future__ import annotations

import torch

from kdcore import hookimpl
from kdcore.criterion import TemperedDivergence, masked_sum, unit_interval
from kdcore_plugins.criteria.fkl import soft_target_grad
from kdcore_plugins.criteria.rkl import reverse_kl_grad


def head_tail_gaps(p_s: torch.Tensor, p_t: torch.Tensor, alpha: float):
    """``(g_head[N], g_tail[N])`` of AKL's steps 1–4, without gradient.

    Equivalent to gathering ``p_s`` in the teacher's ascending order, but the tail mask is
    scattered back to vocabulary order instead, which needs fewer ``[N, V]`` temporaries.
    """
    with torch.no_grad():
        p_s, p_t = p_s.detach(), p_t.detach()
        cum, order = torch.sort(p_t, dim=-1, stable=True)
        cum.cumsum_(dim=-1)  # C_i in sorted order
        tail = torch.empty(p_t.shape, dtype=torch.bool, device=p_t.device)
        tail.scatter_(-1, order, cum <= alpha)
        del cum, order
        gap = (p_t - p_s).abs_()
        g_head = gap.masked_fill(tail, 0.0).sum(-1)
        g_tail = gap.masked_fill_(~tail, 0.0).sum(-1)
    return g_head, g_tail


def gap_weights(p_s: torch.Tensor, p_t: torch.Tensor, alpha: float):
    """``(w_head[N], w_tail[N])``: the gaps normalised to sum 1, ½/½ where both are 0."""
    g_head, g_tail = head_tail_gaps(p_s, p_t, alpha)
    total = g_head + g_tail
    some = total > 0
    safe_total = torch.where(some, total, 1.0)
    return torch.where(some, g_head / safe_total, 0.5), torch.where(some, g_tail / safe_total, 0.5)


class AdaptiveKL(TemperedDivergence):
    """Gap-weighted mix of forward and reverse KL; see the module docstring."""

    name = "akl"

    def __init__(self, temperature: float = 1.0, alpha: float = 0.5):
        super().__init__(temperature)
        self.alpha = unit_interval(self.name, "alpha", alpha, closed=True)

    def divergence(self, log_p_s, log_p_t):
        p_s, p_t = log_p_s.exp(), log_p_t.exp()
        w_head, w_tail = gap_weights(p_s, p_t, self.alpha)
        return w_head * masked_sum(p_t, log_p_t - log_p_s) + w_tail * masked_sum(p_s, log_p_s - log_p_t)

    def divergence_and_grad(self, log_p_s, log_p_t, out):
        w_head, w_tail = gap_weights(log_p_s.exp(), log_p_t.exp(), self.alpha)
        rkl_grad = torch.empty_like(out)
        rkl = reverse_kl_grad(log_p_s.clone(), log_p_t.clone(), rkl_grad)
        kl = soft_target_grad(log_p_s, log_p_t, out)
        out.mul_(w_head.unsqueeze(-1)).add_(rkl_grad.mul_(w_tail.unsqueeze(-1)))
        return w_head * kl + w_tail * rkl


@hookimpl
def kdcore_register_criteria(register):
    register(AdaptiveKL)
