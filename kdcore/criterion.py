"""The criterion contract: a distance between two distributions, row by row, and its gradient.

Two ways to evaluate a criterion on ``student_logits[N, V_s]`` and ``teacher_logits[N, V_t]``:

* ``per_token(student, teacher) -> [N]``: plain differentiable PyTorch; autograd derives the
  backward pass and keeps the forward's ``[N, V]`` intermediates alive until then.
* ``value_and_grad(student, teacher) -> (values[N], grad[N, V_s])``: the values and
  ``grad[i] = ∂values[i] / ∂student[i]`` (each row's own gradient, float32), computed together
  in one pass. Built-in criteria derive the gradient analytically (the formula is in each
  one's docstring); any other criterion gets autograd on ``per_token`` (see
  :func:`gradient_path`). The teacher is a constant here.

:func:`kd_per_token` wraps ``value_and_grad`` in an autograd op whose backward is one
multiplication by the saved gradient, so the KD term never re-runs the criterion in backward.
"""

from __future__ import annotations

from typing import ClassVar, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

# Rows per block of ``TemperedDivergence.value_and_grad``: a budget of elements per block so
# that its scratch tensors stay small (they live in the CPU caches, or are cheap on a GPU)
# whatever the vocabulary; only the ``[N, V_s]`` gradient is full size.
BLOCK_ELEMENTS = {"cpu": 2**19}
BLOCK_ELEMENTS_DEFAULT = 2**24


class Criterion:
    """Base class of distance criteria.

    Contract (docs/methods.md#criterion-contract): ``per_token(student_logits[N, V_s], teacher_logits[N, V_t]) -> [N]``
    float32 divergences with the teacher as the reference distribution. Temperature and other
    knobs are constructor arguments. A criterion never masks, sums or averages: the engine does.
    ``same_vocab`` says whether ``V_s`` must equal ``V_t``; ``analytic_gradient`` whether
    :meth:`value_and_grad` is the criterion's own closed form (True) or autograd on
    ``per_token`` (False, the default, what any criterion gets without writing more code).
    """

    name: ClassVar[str]
    same_vocab: ClassVar[bool] = True
    analytic_gradient: ClassVar[bool] = False

    def per_token(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def value_and_grad(self, student_logits: torch.Tensor,
                       teacher_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(values[N], grad[N, V_s])``, both float32, ``grad[i] = ∂values[i]/∂student_logits[i]``.

        This default runs autograd on :meth:`per_token` with the student logits upcast to
        float32 (the contract makes the math float32 anyway, so the values are those of the
        input dtype) and the teacher logits detached. Rows are independent, so the gradient of
        ``values.sum()`` is each row's own gradient.
        """
        student = student_logits.detach().float().requires_grad_(True)
        with torch.enable_grad():
            values = self.per_token(student, teacher_logits.detach())
            if values.requires_grad:
                (grad,) = torch.autograd.grad(values.sum(), student, allow_unused=True)
            else:
                grad = None
        if grad is None:  # values that do not depend on the student
            grad = torch.zeros_like(student)
        return values.detach().float(), grad

    def __repr__(self) -> str:
        knobs = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({knobs})"


# -- shared validation and math --------------------------------------------------------------

def positive_temperature(criterion: str, temperature: float) -> float:
    """``temperature`` if it is > 0, else a config error naming the criterion."""
    return _checked(criterion, "temperature", temperature, temperature > 0, "> 0")


def unit_interval(criterion: str, field: str, value: float, closed: bool = False, meaning: str = "") -> float:
    """``value`` if it lies in (0, 1) (``closed``: in [0, 1]), else a config error."""
    inside = 0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0
    return _checked(criterion, field, value, inside, ("in [0, 1]" if closed else "in (0, 1)") + meaning)


def _checked(criterion: str, field: str, value: float, ok: bool, requirement: str) -> float:
    from .errors import ConfigError

    if not ok:
        raise ConfigError(f"criterion '{criterion}': {field} must be {requirement}, got {value}")
    return value


def tempered_log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / T)`` in float32 whatever the input dtype. ``-inf`` columns stay ``-inf``."""
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def tempered_log_probs_into(logits: torch.Tensor, temperature: float, out: torch.Tensor) -> torch.Tensor:
    """:func:`tempered_log_probs` written into the float32 buffer ``out`` (same values, bit for
    bit: the same float32 division and log-softmax kernel), without a temporary."""
    out.copy_(logits).div_(temperature)
    return torch.log_softmax(out, dim=-1, out=out)


def masked_sum(p: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """``Σ_v p·log_ratio`` over the last dim, dropping the columns where ``log_ratio`` is not finite.

    Those are the masked or padded vocabulary columns (``-inf`` logits): ``-inf - -inf = NaN``
    where both distributions mask a column, ``±inf`` where one does. Where the weight ``p`` is 0
    there the term is 0 anyway; where ``p > 0`` the term is dropped (the DSKD convention: terms
    where a logit is infinite are zeroed). The ratio is masked *before* the product, so that
    neither the value nor the gradient with respect to ``p`` sees a NaN.
    """
    safe = torch.where(torch.isfinite(log_ratio), log_ratio, torch.zeros((), dtype=log_ratio.dtype,
                                                                         device=log_ratio.device))
    return (p * safe).sum(-1)


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_v a·b`` per row of two ``[n, V]`` tensors (finite where the other is 0)."""
    return torch.linalg.vecdot(a, b)


def softmax_backward_(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``p ⊙ (x − Σ_v p_v x_v)`` per row, in place into ``x``: the gradient with respect to the
    logits ``a`` of a function whose gradient with respect to ``p = softmax(a)`` is ``x``.

    Evaluated as ``p ⊙ ((x − x_j) − Σ_v p_v (x_v − x_j))`` with ``j`` the most probable column
    (equal since ``Σ p = 1``): where ``p`` is peaked, ``x_j − Σ p x`` is a tiny difference of two
    nearly equal numbers, and this form computes it from the small terms themselves instead of
    losing it to float32 rounding.
    """
    x.sub_(x.gather(-1, p.argmax(-1, keepdim=True)))
    return x.sub_(row_dot(p, x).unsqueeze(-1)).mul_(p)


def finite_or_zero_(x: torch.Tensor) -> torch.Tensor:
    """``x`` with NaN and ``±inf`` replaced by 0, in place (masked columns of a log-ratio)."""
    return x.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def block_rows(vocab_size: int, device: torch.device) -> int:
    """Rows per block of :meth:`TemperedDivergence.value_and_grad` (``BLOCK_ELEMENTS`` / V, ≥ 1)."""
    budget = BLOCK_ELEMENTS.get(torch.device(device).type, BLOCK_ELEMENTS_DEFAULT)
    return max(1, budget // max(vocab_size, 1))


# -- "tempered log-softmax, then a divergence" -------------------------------------------------

class TemperedDivergence(Criterion):
    """A divergence of ``p_s = softmax(z_s / T)`` and ``p_t = softmax(z_t / T)`` (float32).

    Subclasses implement ``divergence(log_p_s[n, V_s], log_p_t[n, V_t]) -> [n]`` (differentiable
    PyTorch; ``per_token`` computes the tempered log-probabilities once and calls it) and, for an
    analytic gradient, ``divergence_and_grad(log_p_s, log_p_t, out) -> [n]``, which also writes
    ``∂values/∂(z_s / T)`` into ``out[n, V_s]`` and may overwrite both log-probability buffers
    (they are scratch it owns). ``value_and_grad`` then runs it over blocks of rows
    (:func:`block_rows`) and divides by T, so that scratch is a few blocks and only the
    gradient is ``[N, V_s]``. ``analytic_gradient`` is set for subclasses that define
    ``divergence_and_grad``. Derivatives use ``∂/∂a_j = h_j − p_s,j Σ_k h_k`` for ``a = z_s / T``,
    ``h = ∂value/∂log p_s`` (the log-softmax Jacobian), with the masks of ``divergence``.
    """

    temperature: float

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "analytic_gradient" not in cls.__dict__:
            cls.analytic_gradient = cls.divergence_and_grad is not TemperedDivergence.divergence_and_grad

    def __init__(self, temperature: float = 1.0):
        self.temperature = positive_temperature(self.name, temperature)

    def divergence(self, log_p_s: torch.Tensor, log_p_t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def divergence_and_grad(self, log_p_s: torch.Tensor, log_p_t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def per_token(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return self.divergence(tempered_log_probs(student_logits, self.temperature),
                               tempered_log_probs(teacher_logits, self.temperature))

    def value_and_grad(self, student_logits: torch.Tensor,
                       teacher_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.analytic_gradient:
            return super().value_and_grad(student_logits, teacher_logits)
        student_logits, teacher_logits = student_logits.detach(), teacher_logits.detach()
        (n, v_s), v_t, device = student_logits.shape, teacher_logits.shape[-1], student_logits.device
        values = torch.empty(n, dtype=torch.float32, device=device)
        grad = torch.empty(n, v_s, dtype=torch.float32, device=device)
        rows = min(block_rows(max(v_s, v_t), device), max(n, 1))
        scratch_s = torch.empty(rows, v_s, dtype=torch.float32, device=device)
        scratch_t = torch.empty(rows, v_t, dtype=torch.float32, device=device)
        with torch.no_grad():
            for start in range(0, n, rows):
                stop = min(start + rows, n)
                log_p_s = tempered_log_probs_into(student_logits[start:stop], self.temperature, scratch_s[: stop - start])
                log_p_t = tempered_log_probs_into(teacher_logits[start:stop], self.temperature, scratch_t[: stop - start])
                values[start:stop] = self.divergence_and_grad(log_p_s, log_p_t, grad[start:stop])
                grad[start:stop].div_(self.temperature)
        return values, grad


# -- the fused KD op -----------------------------------------------------------------------------

def gradient_path(criterion: Criterion, teacher_logits: Optional[torch.Tensor] = None) -> str:
    """``"analytic"`` if :func:`kd_per_token` uses the criterion's closed-form gradient, else
    ``"autograd"`` (no analytic gradient, or ``teacher_logits`` given and requiring grad while
    grad mode is on: the teacher's gradient is then needed too, which only autograd gives)."""
    if not getattr(criterion, "analytic_gradient", False):
        return "autograd"
    if teacher_logits is not None and teacher_logits.requires_grad and torch.is_grad_enabled():
        return "autograd"
    return "analytic"


def kd_per_token(criterion: Criterion, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``criterion.per_token(student_logits, teacher_logits)`` as a differentiable ``[N]`` float32
    tensor whose backward does not re-run the criterion.

    Analytic path (:func:`gradient_path`): the forward calls ``value_and_grad`` and saves only
    the ``[N, V_s]`` float32 gradient; the backward returns ``grad_output[:, None] · grad``,
    scaling the saved gradient in place (so its backward runs once: a second backward through a
    retained graph raises). Otherwise, and whenever no student gradient is wanted (grad mode
    off, or the student logits do not require grad), it is plain ``per_token``.
    """
    if (gradient_path(criterion, teacher_logits) == "analytic" and torch.is_grad_enabled()
            and student_logits.requires_grad):
        return _KDPerToken.apply(criterion, student_logits, teacher_logits)
    return criterion.per_token(student_logits, teacher_logits)


class _KDPerToken(torch.autograd.Function):
    """Values from ``value_and_grad``; backward = the saved gradient scaled by ``grad_output``."""

    @staticmethod
    def forward(ctx, criterion, student_logits, teacher_logits):
        values, grad = criterion.value_and_grad(student_logits, teacher_logits)
        ctx.student_dtype = student_logits.dtype
        ctx.save_for_backward(grad)  # the only tensor kept: no logits, no intermediates
        return values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        grad.mul_(grad_output.to(grad.dtype).unsqueeze(-1))
        return None, grad.to(ctx.student_dtype), None


__all__ = [
    "Criterion", "TemperedDivergence", "kd_per_token", "gradient_path", "positive_temperature",
    "unit_interval", "tempered_log_probs", "tempered_log_probs_into", "masked_sum", "row_dot",
    "softmax_backward_", "finite_or_zero_", "block_rows", "BLOCK_ELEMENTS",
]
