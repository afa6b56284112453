"""Skew reverse KL divergence (DistiLLM's SRKL, Ko et al. 2024; DSKD §4).

With ``p = softmax(z / T)`` for student and teacher (float32 math whatever the input dtype)::

    SRKL_λ = KL(p_s || (1 − λ)·p_t + λ·p_s) = Σ_v p_s (log p_s − log((1 − λ)·p_t + λ·p_s))

``skew`` (λ, default 0.1) must lie strictly inside (0, 1) (λ = 0 is plain reverse KL: use
``rkl``). The mixture is evaluated in log space (``logaddexp``), so the value is the true
divergence up to float32 rounding (identical inputs give 0 within ≲ 3e-7). Because the mixture
contains ``λ·p_s``, columns that are ``−inf`` only in the teacher keep a finite, true value
(unlike ``rkl``); columns ``−inf`` in both contribute 0. Gradients stay finite. No ``T²``
rescaling.

Gradient (analytic). With ``m = (1 − λ) p_t + λ p_s``, ``ρ = log p_s − log m`` and the
student's share of the mixture ``w = λ p_s / m = exp(log λ + ρ)``,
``h = ∂SRKL/∂log p_s = p_s (ρ + 1 − w)``, so::

    ∂SRKL/∂z_s,v = (h_v − p_s,v Σ_u h_u) / T = p_s,v (x_v − Σ_u p_s,u x_u) / T,   x = ρ + 1 − w

(``h = 0`` where ``p_s = 0``.)

Shapes: ``student_logits[N, V]``, ``teacher_logits[N, V]`` -> ``[N]`` float32.
"""

from __future__ import annotations

import math

import torch

from kdcore import hookimpl
from kdcore.criterion import finite_or_zero_, row_dot, softmax_backward_
from kdcore_plugins.criteria.jsd import log_ratios_to_mixture
from kdcore_plugins.criteria.skl import SkewedDivergence


class SkewReverseKL(SkewedDivergence):
    """``Σ_v p_s (log p_s − log((1 − λ) p_t + λ p_s))``; see the module docstring."""

    name = "srkl"
    skew_teacher = False

    def divergence_and_grad(self, log_p_s, log_p_t, out):
        # the same mixture as (1 − λ)·p_t + λ·p_s, so that ρ lands in ``out``
        scratch, rho = log_ratios_to_mixture(log_p_t, log_p_s, 1.0 - self.skew, out)
        p_s = log_p_s.exp_()
        values = row_dot(p_s, finite_or_zero_(rho))
        share = torch.add(rho, math.log(self.skew), out=scratch).exp_()
        softmax_backward_(rho.add_(1.0).sub_(share), p_s)
        return values


@hookimpl
def kdcore_register_criteria(register):
    register(SkewReverseKL)
