"""Generalised Jensen–Shannon divergence (GKD, Agarwal et al. 2024, eq. 1; DSKD §4 "JS" without its epsilons).

With ``p = softmax(z / T)`` for student and teacher (float32 math whatever the input dtype)::

    m      = β·p_t + (1 − β)·p_s
    JSD_β  = β·KL(p_t || m) + (1 − β)·KL(p_s || m)
           = β·Σ_v p_t (log p_t − log m) + (1 − β)·Σ_v p_s (log p_s − log m)

``beta`` (β, default 0.5) is the weight of the **teacher** distribution, both in the mixture
and in the outer sum; β = 0.5 is the symmetric Jensen–Shannon divergence (bounded by log 2).
β must lie strictly inside (0, 1); at the endpoints JSD_β is identically 0.

``log m`` is computed in log space (``logaddexp``, see :func:`log_mixture`), so the value is the
true divergence up to float32 rounding (no ``+1e-9`` smoothing as in the DSKD code; identical
inputs give 0 within ≲ 3e-7). ``−inf`` columns (masked vocabulary, in both or only in the
teacher) are handled exactly and give finite gradients.

Gradient (analytic). ``∂JSD/∂p_s,v = (1 − β)(log p_s,v − log m_v)``: the two ``p/m`` terms of
the derivative add up to ``(β p_t + (1 − β) p_s)/m = 1`` and cancel the ``+1`` of ``p log p``.
With ``ρ = log p_s − log m`` (0 where ``p_s = 0``), through the softmax Jacobian::

    ∂JSD/∂z_s,v = (1 − β) p_s,v (ρ_v − Σ_w p_s,w ρ_w) / T,    Σ_w p_s,w ρ_w = KL(p_s || m)

Shapes: ``student_logits[N, V]``, ``teacher_logits[N, V]`` -> ``[N]`` float32.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

from kdcore import hookimpl
from kdcore.criterion import (TemperedDivergence, finite_or_zero_, masked_sum, row_dot, softmax_backward_,
                              unit_interval)


def log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight: float) -> torch.Tensor:
    """``log(w·p + (1 − w)·q)`` from ``log p`` and ``log q``, elementwise, for ``0 < w < 1``.

    ``torch.logaddexp(log p + log w, log q + log(1 − w))``: no overflow or underflow, accurate to
    float32 rounding of the log-probabilities, exact for one-sided ``−inf``. Columns where both are
    ``−inf`` give ``−inf`` and zero gradients (logaddexp's own backward would give NaN there, so
    they are evaluated at 0 and masked back).
    """
    if not 0.0 < weight < 1.0:
        raise ValueError(f"log_mixture weight must be in (0, 1), got {weight}")
    a = log_p + math.log(weight)
    b = log_q + math.log1p(-weight)
    dead = torch.isneginf(a) & torch.isneginf(b)
    # a, b are fresh temporaries and logaddexp saves its inputs, not its result, so the
    # in-place fills are autograd-safe and cost no memory (nor a host sync on a GPU).
    out = torch.logaddexp(a.masked_fill_(dead, 0.0), b.masked_fill_(dead, 0.0))
    return out.masked_fill_(dead, -math.inf)


def log_ratios_to_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight: float,
                          out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(log p − log m, log q − log m)`` for ``m = w·p + (1 − w)·q``, without autograd; the
    second is written into ``out``, the first is a new tensor. ``log m`` is :func:`log_mixture`'s
    (its forward needs no masking: ``logaddexp(−inf, −inf) = −inf``), so columns ``−inf`` in both
    give NaN, in one ``−inf`` or a finite value: callers drop or zero them."""
    ratio_p = torch.add(log_p, math.log(weight))
    log_m = torch.logaddexp(ratio_p, torch.add(log_q, math.log1p(-weight), out=out), out=out)
    return torch.sub(log_p, log_m, out=ratio_p), torch.sub(log_q, log_m, out=out)


class JensenShannon(TemperedDivergence):
    """``β·KL(p_t || m) + (1 − β)·KL(p_s || m)``, ``m = β·p_t + (1 − β)·p_s``; see the module docstring."""

    name = "jsd"

    def __init__(self, temperature: float = 1.0, beta: float = 0.5):
        super().__init__(temperature)
        self.beta = unit_interval(self.name, "beta", beta, meaning=" (the teacher's weight)")

    def divergence(self, log_p_s, log_p_t):
        log_m = log_mixture(log_p_t, log_p_s, self.beta)
        return (self.beta * masked_sum(log_p_t.exp(), log_p_t - log_m)
                + (1.0 - self.beta) * masked_sum(log_p_s.exp(), log_p_s - log_m))

    def divergence_and_grad(self, log_p_s, log_p_t, out):
        teacher_ratio, rho = log_ratios_to_mixture(log_p_t, log_p_s, self.beta, out)
        kl_teacher = row_dot(log_p_t.exp_(), finite_or_zero_(teacher_ratio))
        p_s = log_p_s.exp_()
        kl_student = row_dot(p_s, finite_or_zero_(rho))
        softmax_backward_(rho, p_s).mul_(1.0 - self.beta)
        return self.beta * kl_teacher + (1.0 - self.beta) * kl_student


@hookimpl
def kdcore_register_criteria(register):
    register(JensenShannon)
