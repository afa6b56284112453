"""Generalised Jensen–Shannon divergence (reference/dskd.md §4, without its epsilons).

With ``p = softmax(z / T)`` for student and teacher (float32 math whatever the input dtype)::

    m      = β·p_t + (1 − β)·p_s
    JSD_β  = β·KL(p_t || m) + (1 − β)·KL(p_s || m)
           = β·Σ_v p_t (log p_t − log m) + (1 − β)·Σ_v p_s (log p_s − log m)

``beta`` (β, default 0.5) is the weight of the **teacher** distribution, both in the mixture
and in the outer sum; β = 0.5 is the symmetric Jensen–Shannon divergence (bounded by log 2).
β must lie strictly inside (0, 1); at the endpoints JSD_β is identically 0.

``log m`` is computed in log space (see :func:`log_mixture`), so the value is the true
divergence up to float32 rounding (no ``+1e-9`` smoothing as in the DSKD code) and is exactly 0
for identical inputs. ``−inf`` columns (masked vocabulary, in both or only in the teacher)
contribute exactly 0 and give finite gradients.

Shapes: ``student_logits[N, V]``, ``teacher_logits[N, V]`` -> ``[N]`` float32.
"""

from __future__ import annotations

import math

import torch

from kdcore import Criterion, hookimpl
from kdcore.criterion import tempered_log_probs
from kdcore.errors import ConfigError


def log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight: float) -> torch.Tensor:
    """``log(w·p + (1 − w)·q)`` from ``log p`` and ``log q``, elementwise, for ``0 < w < 1``.

    Written as ``hi + log1p(w_lo · expm1(lo − hi))`` where ``hi``/``lo`` are the larger/smaller
    of the two log-probabilities and ``w_lo`` the weight of the smaller: never overflows, is
    exact (``= log p``) when ``p == q``, and accurate when ``p ≈ q``. A column where both are
    ``−inf`` gives ``−inf`` with zero (not NaN) gradients; one-sided ``−inf`` is handled exactly.
    The selection uses ``torch.where`` (not ``maximum``), so the gradient at ties is ``w``/``1−w``.
    """
    if not 0.0 < weight < 1.0:
        raise ValueError(f"log_mixture weight must be in (0, 1), got {weight}")
    p_is_hi = log_p >= log_q
    hi = torch.where(p_is_hi, log_p, log_q)
    lo = torch.where(p_is_hi, log_q, log_p)
    w_lo = torch.where(p_is_hi, 1.0 - weight, weight)
    dead = torch.isneginf(hi)  # both -inf: lo - hi would be NaN
    hi_safe = torch.where(dead, 0.0, hi)
    lo_safe = torch.where(dead, 0.0, lo)
    mixed = hi_safe + torch.log1p(w_lo * torch.expm1(lo_safe - hi_safe))
    return torch.where(dead, -math.inf, mixed)


def weighted_log_ratio_sum(log_p: torch.Tensor, log_m: torch.Tensor) -> torch.Tensor:
    """``Σ_v p (log p − log m)`` with columns where ``p = 0`` (``log p = −inf``) contributing 0."""
    keep = torch.isfinite(log_p)
    return (log_p.exp() * torch.where(keep, log_p - log_m, 0.0)).sum(-1)


class JensenShannon(Criterion):
    """``β·KL(p_t || m) + (1 − β)·KL(p_s || m)``, ``m = β·p_t + (1 − β)·p_s``; see the module docstring."""

    name = "jsd"
    same_vocab = True

    def __init__(self, temperature: float = 1.0, beta: float = 0.5):
        if not temperature > 0:
            raise ConfigError(f"criterion 'jsd': temperature must be > 0, got {temperature}")
        if not 0.0 < beta < 1.0:
            raise ConfigError(f"criterion 'jsd': beta must be in (0, 1) (the teacher's weight), got {beta}")
        self.temperature = temperature
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
