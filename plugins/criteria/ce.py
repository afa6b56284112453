"""Soft cross-entropy of the student against the teacher distribution.

``CE(p_t, p_s) = −Σ_v p_t,v log p_s,v = H(p_t) + KL(p_t || p_s)`` with ``p = softmax(z / T)``
for student and teacher, float32 math whatever the input dtype. It has the same student
gradient as forward KL but is **not** zero for identical inputs: it then equals the teacher
entropy ``H(p_t)``, which is why the class declares ``zero_on_identical = False`` (read by
:func:`kdcore.testing.check_criterion`). Non-negative. Columns where the teacher is ``−inf``
contribute 0 with finite gradients. No ``T²`` rescaling.

Shapes: ``student_logits[N, V]``, ``teacher_logits[N, V]`` -> ``[N]`` float32.
"""

from __future__ import annotations

import torch

from kdcore import Criterion, hookimpl
from kdcore.criterion import positive_temperature, tempered_log_probs


class SoftCrossEntropy(Criterion):
    """``−Σ_v p_t log p_s`` per row; see the module docstring."""

    name = "ce"
    same_vocab = True
    zero_on_identical = False  # CE(p, p) = H(p)

    def __init__(self, temperature: float = 1.0):
        self.temperature = positive_temperature("ce", temperature)

    def per_token(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_p_s = tempered_log_probs(student_logits, self.temperature)
        log_p_t = tempered_log_probs(teacher_logits, self.temperature)
        keep = torch.isfinite(log_p_t)
        return -(log_p_t.exp() * torch.where(keep, log_p_s, 0.0)).sum(-1)


@hookimpl
def kdcore_register_criteria(register):
    register(SoftCrossEntropy)
