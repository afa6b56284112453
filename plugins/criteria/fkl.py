"""Forward KL divergence, the teacher as reference (reference/dskd.md §4).

``KL(p_t || p_s) = Σ_v p_t,v (log p_t,v − log p_s,v)`` with ``p = softmax(z / T)``; fp32 math;
columns where ``p_t = 0`` (−inf logits) contribute exactly 0. No ``T²`` rescaling.
"""

from __future__ import annotations

import torch

from kdcore import Criterion, hookimpl
from kdcore.criterion import positive_temperature, tempered_log_probs, xlogy_sum


class ForwardKL(Criterion):
    name = "fkl"
    same_vocab = True

    def __init__(self, temperature: float = 1.0):
        self.temperature = positive_temperature(self.name, temperature)

    def per_token(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_p_s = tempered_log_probs(student_logits, self.temperature)
        log_p_t = tempered_log_probs(teacher_logits, self.temperature)
        return xlogy_sum(log_p_t.exp(), log_p_t - log_p_s)


@hookimpl
def kdcore_register_criteria(register):
    register(ForwardKL)
