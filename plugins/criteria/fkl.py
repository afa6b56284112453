"""Forward KL divergence, the teacher as reference (DSKD, Zhang et al. 2024, §4 "KL").

``KL(p_t || p_s) = Σ_v p_t,v (log p_t,v − log p_s,v)`` with ``p = softmax(z / T)``; fp32 math.
Columns whose log-ratio is not finite are dropped (:func:`kdcore.criterion.masked_sum`): a
column ``−inf`` in the teacher has ``p_t = 0`` and contributes exactly 0; one ``−inf`` only in
the student is zeroed (DSKD convention; the true value is ``+inf``). No ``T²`` rescaling.

Gradient (analytic, :func:`soft_target_grad`), with ``k_v = 1`` on kept columns::

    ∂KL/∂z_s,v = (p_s,v · Σ_u k_u p_t,u − k_v p_t,v) / T   =  (p_s − p_t) / T   without masked columns

(``h = ∂KL/∂log p_s = −k·p_t``, through the log-softmax Jacobian ``h − p_s Σ h``.)

Shapes: ``student_logits[N, V]``, ``teacher_logits[N, V]`` -> ``[N]`` float32.
"""

from __future__ import annotations

import torch

from kdcore import hookimpl
from kdcore.criterion import TemperedDivergence, finite_or_zero_, masked_sum, row_dot


def soft_target_grad(log_p_s: torch.Tensor, log_p_t: torch.Tensor, out: torch.Tensor,
                     log_ratio: bool = True) -> torch.Tensor:
    """Values ``Σ_v p_t·c_v`` with ``c = log p_t − log p_s`` (``log_ratio``, forward KL) or
    ``c = −log p_s`` (soft cross-entropy), non-finite ``c`` dropped, and their gradient
    ``p_s·Σ q − q`` with respect to ``z_s / T`` written into ``out``, where ``q = p_t`` on the
    kept columns and 0 elsewhere. Both criteria have ``∂value/∂log p_s = −q``. Overwrites the
    two log-probability buffers. Shapes ``[n, V]`` -> ``[n]``.
    """
    if log_ratio:
        torch.sub(log_p_t, log_p_s, out=out)
    else:
        torch.neg(log_p_s, out=out)
    dropped = ~torch.isfinite(out)
    q = log_p_t.exp_().masked_fill_(dropped, 0.0)
    values = row_dot(q, finite_or_zero_(out))
    p_s = log_p_s.exp_()
    torch.mul(p_s, q.sum(-1, keepdim=True), out=out).sub_(q)
    return values


class ForwardKL(TemperedDivergence):
    """``Σ_v p_t (log p_t − log p_s)`` per row; gradient ``(p_s − p_t)/T``; see the module docstring."""

    name = "fkl"

    def divergence(self, log_p_s, log_p_t):
        return masked_sum(log_p_t.exp(), log_p_t - log_p_s)

    def divergence_and_grad(self, log_p_s, log_p_t, out):
        return soft_target_grad(log_p_s, log_p_t, out)


@hookimpl
def kdcore_register_criteria(register):
    register(ForwardKL)
