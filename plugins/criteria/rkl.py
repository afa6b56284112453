"""Reverse KL divergence, the student distribution weighting the log-ratio (DSKD §4 "RKL").

``RKL(p_s || p_t) = Σ_v p_s,v (log p_s,v − log p_t,v)`` with ``p = softmax(z / T)`` for both
student and teacher, computed in float32 whatever the input dtype. No ``T²`` rescaling.

Masked vocabulary (``−inf`` logits): a column that is ``−inf`` in both contributes exactly 0.
A column that is ``−inf`` only in the teacher (``p_t = 0 < p_s``) would make the true value
``+inf``; as in the DSKD reference implementation its term is dropped instead, so values and
gradients stay finite (the student's mass there is still part of its normalisation).

Gradient (analytic, :func:`reverse_kl_grad`). With ``r = log p_s − log p_t`` and ``k_v = 1`` on
the kept (finite-``r``) columns, ``h = ∂RKL/∂log p_s = k·p_s (r + 1)``, so::

    ∂RKL/∂z_s,v = p_s,v (u_v − Σ_w p_s,w u_w) / T,   u = k (r + 1)
                = p_s (log p_s − log p_t − RKL) / T   without masked columns

Shapes: ``student_logits[N, V]``, ``teacher_logits[N, V]`` -> ``[N]`` float32.
"""

from __future__ import annotations

import torch

from kdcore import hookimpl
from kdcore.criterion import TemperedDivergence, finite_or_zero_, masked_sum, row_dot, softmax_backward_


def reverse_kl_grad(log_p_s: torch.Tensor, log_p_t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Values ``Σ_kept p_s·r`` and their gradient with respect to ``z_s / T`` (into ``out``; see
    the module docstring). Overwrites the two log-probability buffers. ``[n, V]`` -> ``[n]``."""
    kept = torch.isfinite(torch.sub(log_p_s, log_p_t, out=out))
    finite_or_zero_(out)
    p_s = log_p_s.exp_()
    values = row_dot(p_s, out)
    softmax_backward_(out.add_(kept), p_s)  # u = (r + 1) on kept columns, 0 elsewhere
    return values


class ReverseKL(TemperedDivergence):
    """``Σ_v p_s (log p_s − log p_t)`` per row; see the module docstring."""

    name = "rkl"

    def divergence_and_grad(self, log_p_s, log_p_t, out):
        return reverse_kl_grad(log_p_s, log_p_t, out)

    def divergence(self, log_p_s, log_p_t):
        return masked_sum(log_p_s.exp(), log_p_s - log_p_t)


@hookimpl
def kdcore_register_criteria(register):
    register(ReverseKL)
