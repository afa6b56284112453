"""Reverse KL divergence, the student distribution weighting the log-ratio (reference/dskd.md §4).

``RKL(p_s || p_t) = Σ_v p_s,v (log p_s,v − log p_t,v)`` with ``p = softmax(z / T)`` for both
student and teacher, computed in float32 whatever the input dtype. No ``T²`` rescaling.

Shapes: ``student_logits[N, V]``, ``teacher_logits[N, V]`` -> ``[N]`` float32.

Masked vocabulary (``−inf`` logits): a column that is ``−inf`` in both contributes exactly 0.
A column that is ``−inf`` only in the teacher (``p_t = 0 < p_s``) would make the true value
``+inf``; as in the DSKD reference implementation its term is dropped instead, so values and
gradients stay finite (the student's mass there is still part of its normalisation).
"""

from __future__ import annotations

import torch

from kdcore import Criterion, hookimpl
from kdcore.criterion import positive_temperature, tempered_log_probs


class ReverseKL(Criterion):
    """``Σ_v p_s (log p_s − log p_t)`` per row; see the module docstring."""

    name = "rkl"
    same_vocab = True

    def __init__(self, temperature: float = 1.0):
        self.temperature = positive_temperature("rkl", temperature)

    def per_token(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_p_s = tempered_log_probs(student_logits, self.temperature)
        log_p_t = tempered_log_probs(teacher_logits, self.temperature)
        keep = torch.isfinite(log_p_s) & torch.isfinite(log_p_t)
        # Sanitise the log-ratio *before* multiplying so that no 0·NaN reaches backward.
        log_ratio = torch.where(keep, log_p_s - log_p_t, 0.0)
        return (log_p_s.exp() * log_ratio).sum(-1)


@hookimpl
def kdcore_register_criteria(register):
    register(ReverseKL)
