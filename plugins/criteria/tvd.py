"""Total variation distance (the definition of the DSKD authors' KDFlow framework).

``TVD(p_s, p_t) = ½ Σ_v |p_s,v − p_t,v|`` with ``p = softmax(z / T)`` for student and teacher,
float32 math whatever the input dtype; in [0, 1]. ``−inf`` columns have ``p = 0`` and are
handled exactly. No ``T²`` rescaling.

Gradient (analytic): with ``σ = sign(p_s − p_t)`` (``sign(0) = 0``, the subgradient autograd
takes for ``|x|``), ``∂TVD/∂p_s = σ/2``, and through the softmax Jacobian::

    ∂TVD/∂z_s,v = ½ p_s,v (σ_v − Σ_w p_s,w σ_w) / T

Shapes: ``student_logits[N, V]``, ``teacher_logits[N, V]`` -> ``[N]`` float32.
"""

from __future__ import annotations

import torch

from kdcore import hookimpl
from kdcore.criterion import TemperedDivergence, softmax_backward_


class TotalVariation(TemperedDivergence):
    """``½ Σ_v |p_s − p_t|`` per row; see the module docstring."""

    name = "tvd"

    def divergence(self, log_p_s, log_p_t):
        return 0.5 * (log_p_s.exp() - log_p_t.exp()).abs().sum(-1)

    def divergence_and_grad(self, log_p_s, log_p_t, out):
        p_s = log_p_s.exp_()
        diff = torch.sub(p_s, log_p_t.exp_(), out=out)
        values = 0.5 * torch.abs(diff, out=log_p_t).sum(-1)
        softmax_backward_(diff.sign_(), p_s).mul_(0.5)
        return values


@hookimpl
def kdcore_register_criteria(register):
    register(TotalVariation)
