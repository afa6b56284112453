"""Skew reverse KL divergence (DistiLLM's SRKL; reference/dskd.md §4).

With ``p = softmax(z / T)`` for student and teacher (float32 math whatever the input dtype)::

    SRKL_λ = KL(p_s || (1 − λ)·p_t + λ·p_s) = Σ_v p_s (log p_s − log((1 − λ)·p_t + λ·p_s))

``skew`` (λ, default 0.1) must lie strictly inside (0, 1) (λ = 0 is plain reverse KL: use
``rkl``). The mixture is evaluated in log space (``logaddexp``), so the value is the true
divergence up to float32 rounding (identical inputs give 0 within ≲ 3e-7). Because the mixture
contains ``λ·p_s``, columns that are ``−inf`` only in the teacher keep a finite, true value
(unlike ``rkl``); columns ``−inf`` in both contribute 0. Gradients stay finite. No ``T²``
rescaling.

Shapes: ``student_logits[N, V]``, ``teacher_logits[N, V]`` -> ``[N]`` float32.
"""

from __future__ import annotations

import torch

from kdcore import Criterion, hookimpl
from kdcore.criterion import positive_temperature, tempered_log_probs
from kdcore.errors import ConfigError
from kdcore_plugins.criteria.jsd import log_mixture, weighted_log_ratio_sum


class SkewReverseKL(Criterion):
    """``Σ_v p_s (log p_s − log((1 − λ) p_t + λ p_s))``; see the module docstring."""

    name = "srkl"
    same_vocab = True

    def __init__(self, temperature: float = 1.0, skew: float = 0.1):
        if not 0.0 < skew < 1.0:
            raise ConfigError(f"criterion 'srkl': skew must be in (0, 1), got {skew}")
        self.temperature = positive_temperature(self.name, temperature)
        self.skew = skew

    def per_token(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_p_s = tempered_log_probs(student_logits, self.temperature)
        log_p_t = tempered_log_probs(teacher_logits, self.temperature)
        log_m = log_mixture(log_p_s, log_p_t, self.skew)
        return weighted_log_ratio_sum(log_p_s, log_m)


@hookimpl
def kdcore_register_criteria(register):
    register(SkewReverseKL)
