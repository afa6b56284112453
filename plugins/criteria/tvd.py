"""Total variation distance (reference/dskd.md §4, the KDFlow definition).

``TVD(p_s, p_t) = ½ Σ_v |p_s,v − p_t,v|`` with ``p = softmax(z / T)`` for student and teacher,
float32 math whatever the input dtype; in [0, 1]. ``−inf`` columns have ``p = 0`` and are
handled exactly. No ``T²`` rescaling.

Shapes: ``student_logits[N, V]``, ``teacher_logits[N, V]`` -> ``[N]`` float32.
"""

from __future__ import annotations

import torch

from kdcore import Criterion, hookimpl
from kdcore.criterion import positive_temperature, tempered_log_probs


class TotalVariation(Criterion):
    """``½ Σ_v |p_s − p_t|`` per row; see the module docstring."""

    name = "tvd"
    same_vocab = True

    def __init__(self, temperature: float = 1.0):
        self.temperature = positive_temperature("tvd", temperature)

    def per_token(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        p_s = tempered_log_probs(student_logits, self.temperature).exp()
        p_t = tempered_log_probs(teacher_logits, self.temperature).exp()
        return 0.5 * (p_s - p_t).abs().sum(-1)


@hookimpl
def kdcore_register_criteria(register):
    register(TotalVariation)
