"""Generalised Jensen–Shannon divergence (reference/dskd.md §4, without its epsilons).

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

Shapes: ``student_logits[N, V]``, ``teacher_logits[N, V]`` -> ``[N]`` float32.
"""

from __future__ import annotations

import math

import torch

from kdcore import Criterion, hookimpl
from kdcore.criterion import positive_temperature, tempered_log_probs
from kdcore.errors import ConfigError


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


def weighted_log_ratio_sum(log_p: torch.Tensor, log_m: torch.Tensor) -> torch.Tensor:
    """``Σ_v p (log p − log m)`` with columns where ``p = 0`` (``log p = −inf``) contributing 0."""
    keep = torch.isfinite(log_p)
    return (log_p.exp() * torch.where(keep, log_p - log_m, 0.0)).sum(-1)


class JensenShannon(Criterion):
    """``β·KL(p_t || m) + (1 − β)·KL(p_s || m)``, ``m = β·p_t + (1 − β)·p_s``; see the module docstring."""

    name = "jsd"
    same_vocab = True

    def __init__(self, temperature: float = 1.0, beta: float = 0.5):
        if not 0.0 < beta < 1.0:
            raise ConfigError(f"criterion 'jsd': beta must be in (0, 1) (the teacher's weight), got {beta}")
        self.temperature = positive_temperature(self.name, temperature)
        self.beta = beta

    def per_token(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_p_s = tempered_log_probs(student_logits, self.temperature)
        log_p_t = tempered_log_probs(teacher_logits, self.temperature)
        log_m = log_mixture(log_p_t, log_p_s, self.beta)
        return (self.beta * weighted_log_ratio_sum(log_p_t, log_m)
                + (1.0 - self.beta) * weighted_log_ratio_sum(log_p_s, log_m))


@hookimpl
def kdcore_register_criteria(register):
    register(JensenShannon)
