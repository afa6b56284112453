"""The criterion contract: a distance between two distributions, row by row."""

from __future__ import annotations

from typing import ClassVar

import torch


class Criterion:
    """Base class of distance criteria.

    Contract (docs/methods.md#criterion-contract): ``per_token(student_logits[N, V_s], teacher_logits[N, V_t]) -> [N]``
    float32 divergences with the teacher as the reference distribution. Temperature and other
    knobs are constructor arguments. A criterion never masks, sums or averages: the engine does.
    ``same_vocab`` says whether ``V_s`` must equal ``V_t``.
    """

    name: ClassVar[str]
    same_vocab: ClassVar[bool] = True

    def per_token(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        knobs = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({knobs})"


def positive_temperature(criterion: str, temperature: float) -> float:
    """``temperature`` if it is > 0, else a config error naming the criterion."""
    from .errors import ConfigError

    if not temperature > 0:
        raise ConfigError(f"criterion '{criterion}': temperature must be > 0, got {temperature}")
    return temperature


def tempered_log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / T)`` in float32 whatever the input dtype. ``-inf`` columns stay ``-inf``."""
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def xlogy_sum(p: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """``Σ_v p·log_ratio`` over the last dim, with 0·(anything) = 0.

    Columns where ``p == 0`` (masked or padded vocabulary, ``-inf`` logits) would otherwise give
    ``0 · (-inf - -inf) = NaN``. The ratio is masked *before* the product, so that neither the
    value nor the gradient with respect to ``p`` sees the NaN.
    """
    safe = torch.where(p > 0, log_ratio, torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device))
    return (p * safe).sum(-1)
