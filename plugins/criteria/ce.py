"""Soft cross-entropy of the student against the teacher distribution.

``CE(p_t, p_s) = −Σ_v p_t,v log p_s,v = H(p_t) + KL(p_t || p_s)`` with ``p = softmax(z / T)``
for student and teacher, float32 math whatever the input dtype. It has the same student
gradient as forward KL but is **not** zero for identical inputs: it then equals the teacher
entropy ``H(p_t)``, which is why the class declares ``zero_on_identical = False`` (read by
:func:`kdcore.testing.check_criterion`). Non-negative. Columns where the teacher is ``−inf``
contribute 0 with finite gradients; a column ``−inf`` only in the student is dropped (as in
``fkl``). No ``T²`` rescaling.

Gradient (analytic, :func:`kdcore_plugins.criteria.fkl.soft_target_grad`), ``k`` the kept columns::

    ∂CE/∂z_s,v = (p_s,v · Σ_u k_u p_t,u − k_v p_t,v) / T   =  (p_s − p_t) / T   without masked columns

Shapes: ``student_logits[N, V]``, ``teacher_logits[N, V]`` -> ``[N]`` float32.
"""

from __future__ import annotations

from kdcore import hookimpl
from kdcore.criterion import TemperedDivergence, masked_sum
from kdcore_plugins.criteria.fkl import soft_target_grad


class SoftCrossEntropy(TemperedDivergence):
    """``−Σ_v p_t log p_s`` per row; see the module docstring."""

    name = "ce"
    zero_on_identical = False  # CE(p, p) = H(p)

    def divergence(self, log_p_s, log_p_t):
        return masked_sum(log_p_t.exp(), -log_p_s)

    def divergence_and_grad(self, log_p_s, log_p_t, out):
        return soft_target_grad(log_p_s, log_p_t, out, log_ratio=False)


@hookimpl
def kdcore_register_criteria(register):
    register(SoftCrossEntropy)
