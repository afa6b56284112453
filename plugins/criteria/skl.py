"""Skew forward KL divergence (DistiLLM's SKL, Ko et al. 2024; DSKD §4).

With ``p = softmax(z / T)`` for student and teacher (float32 math whatever the input dtype)::

    SKL_λ = KL(p_t || λ·p_t + (1 − λ)·p_s) = Σ_v p_t (log p_t − log(λ·p_t + (1 − λ)·p_s))

``skew`` (λ, default 0.1) must lie strictly inside (0, 1) (λ = 0 is plain forward KL: use
``fkl``). The mixture is evaluated in log space (``logaddexp``), so the value is the true
divergence up to float32 rounding (identical inputs give 0 within ≲ 3e-7). ``−inf`` columns
(in both, or only in the teacher) contribute 0 with finite gradients. No ``T²`` rescaling.

Gradient (analytic). With ``m = λ p_t + (1 − λ) p_s`` and the student's share of the mixture
``w = (1 − λ) p_s / m``, ``∂SKL/∂log p_s = −p_t·w``, so::

    ∂SKL/∂z_s,v = (p_s,v Σ_u c_u − c_v) / T,    c = p_t·w = exp(log p_t + log(1 − λ) + log p_s − log m)

(``c = 0`` on columns ``−inf`` in the teacher, whose terms the value drops.)

Shapes: ``student_logits[N, V]``, ``teacher_logits[N, V]`` -> ``[N]`` float32.
"""

from __future__ import annotations

import math
from typing import ClassVar

from kdcore import hookimpl
from kdcore.criterion import TemperedDivergence, finite_or_zero_, masked_sum, row_dot, unit_interval
from kdcore_plugins.criteria.jsd import log_mixture, log_ratios_to_mixture


class SkewedDivergence(TemperedDivergence):
    """Base of SKL and SRKL: ``KL(p || λ·p + (1 − λ)·q)`` with ``p`` the teacher's distribution
    (``skew_teacher``, SKL) or the student's (SRKL), ``q`` the other one; ``skew`` is λ in (0, 1)."""

    skew_teacher: ClassVar[bool]

    def __init__(self, temperature: float = 1.0, skew: float = 0.1):
        super().__init__(temperature)
        self.skew = unit_interval(self.name, "skew", skew)

    def divergence(self, log_p_s, log_p_t):
        log_p, log_q = (log_p_t, log_p_s) if self.skew_teacher else (log_p_s, log_p_t)
        return masked_sum(log_p.exp(), log_p - log_mixture(log_p, log_q, self.skew))


class SkewForwardKL(SkewedDivergence):
    """``Σ_v p_t (log p_t − log(λ p_t + (1 − λ) p_s))``; see the module docstring."""

    name = "skl"
    skew_teacher = True

    def divergence_and_grad(self, log_p_s, log_p_t, out):
        teacher_ratio, student_ratio = log_ratios_to_mixture(log_p_t, log_p_s, self.skew, out)
        share = finite_or_zero_(student_ratio.add_(log_p_t).add_(math.log1p(-self.skew)).exp_())
        values = row_dot(log_p_t.exp_(), finite_or_zero_(teacher_ratio))
        total = share.sum(-1, keepdim=True)
        share.neg_().addcmul_(log_p_s.exp_(), total)  # p_s·Σc − c
        return values


@hookimpl
def kdcore_register_criteria(register):
    register(SkewForwardKL)
