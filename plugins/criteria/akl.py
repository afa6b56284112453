"""Adaptive KL divergence (Wu et al. 2024; reference/dskd.md §4).

With ``p = softmax(z / T)`` for student and teacher (float32 math whatever the input dtype),
per row:

1. sort ``p_t`` ascending and gather ``p_s`` in the same order;
2. ``gap_i = |p_t,i − p_s,i|``; ``C_i = Σ_{j ≤ i} p_t,j`` (cumulative teacher mass);
3. tail = ``{i : C_i ≤ α}`` (the low-probability tokens holding at most α of the teacher
   mass), head = the rest;
4. ``g_head = Σ_head gap``, ``g_tail = Σ_tail gap``, both without gradient (stop-gradient);
5. ``AKL = g_head/(g_head + g_tail) · KL(p_t || p_s) + g_tail/(g_head + g_tail) · KL(p_s || p_t)``.

``alpha`` (α, default 0.5) is the tail mass threshold, in [0, 1]. When the two distributions are
identical (``g_head + g_tail = 0``) the weights are taken as ½/½, so the value is 0, not NaN.
The KL terms follow ``fkl``/``rkl``: ``−inf`` columns in both contribute 0; a column ``−inf``
only in the teacher has its reverse-KL term dropped (DSKD convention; the true value is ``+inf``)
and counts as tail (its ``C_i`` is 0). No ``T²`` rescaling.

Shapes: ``student_logits[N, V]``, ``teacher_logits[N, V]`` -> ``[N]`` float32.
"""

from __future__ import annotations

import torch

from kdcore import Criterion, hookimpl
from kdcore.criterion import positive_temperature, tempered_log_probs
from kdcore.errors import ConfigError


def head_tail_gaps(p_s: torch.Tensor, p_t: torch.Tensor, alpha: float):
    """``(g_head[N], g_tail[N])`` of AKL's steps 1–4, without gradient.

    Equivalent to gathering ``p_s`` in the teacher's ascending order, but the tail mask is
    scattered back to vocabulary order instead, which needs fewer ``[N, V]`` temporaries.
    """
    with torch.no_grad():
        p_s, p_t = p_s.detach(), p_t.detach()
        cum, order = torch.sort(p_t, dim=-1, stable=True)
        cum.cumsum_(dim=-1)  # C_i in sorted order
        tail = torch.empty(p_t.shape, dtype=torch.bool, device=p_t.device)
        tail.scatter_(-1, order, cum <= alpha)
        del cum, order
        gap = (p_t - p_s).abs_()
        g_head = gap.masked_fill(tail, 0.0).sum(-1)
        g_tail = gap.masked_fill_(~tail, 0.0).sum(-1)
    return g_head, g_tail


class AdaptiveKL(Criterion):
    """Gap-weighted mix of forward and reverse KL; see the module docstring."""

    name = "akl"
    same_vocab = True

    def __init__(self, temperature: float = 1.0, alpha: float = 0.5):
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"criterion 'akl': alpha must be in [0, 1], got {alpha}")
        self.temperature = positive_temperature(self.name, temperature)
        self.alpha = alpha

    def per_token(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_p_s = tempered_log_probs(student_logits, self.temperature)
        log_p_t = tempered_log_probs(teacher_logits, self.temperature)
        p_s, p_t = log_p_s.exp(), log_p_t.exp()
        g_head, g_tail = head_tail_gaps(p_s, p_t, self.alpha)
        fin_s, fin_t = torch.isfinite(log_p_s), torch.isfinite(log_p_t)
        kl = (p_t * torch.where(fin_t, log_p_t - log_p_s, 0.0)).sum(-1)
        rkl = (p_s * torch.where(fin_s & fin_t, log_p_s - log_p_t, 0.0)).sum(-1)
        total = g_head + g_tail
        some = total > 0
        safe_total = torch.where(some, total, 1.0)
        w_head = torch.where(some, g_head / safe_total, 0.5)
        w_tail = torch.where(some, g_tail / safe_total, 0.5)
        return w_head * kl + w_tail * rkl


@hookimpl
def kdcore_register_criteria(register):
    register(AdaptiveKL)
