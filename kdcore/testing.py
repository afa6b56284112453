"""Contract suite for criteria, for kdcore's own tests and for third-party plugin authors.

Run every check on a registered criterion (name, class or instance)::

    from kdcore.testing import check_criterion
    check_criterion("hellinger", temperature=2.0)       # raises AssertionError listing failures

or one pytest test per check::

    import pytest
    from kdcore.testing import CHECKS, run_check

    @pytest.mark.parametrize("check", CHECKS)
    def test_hellinger_contract(check):
        run_check("hellinger", check, temperature=2.0)

What a criterion must satisfy (docs/methods.md#criterion-contract), one check each:

``shape_dtype``
    ``per_token(student[N, V], teacher[N, V])`` returns a ``[N]`` float32 tensor for float32,
    bfloat16 and float16 inputs.
``identical``
    ``per_token(z, z) == 0`` within ``ZERO_ATOL`` (1e-6), and the student gradient there is 0
    within ``STATIONARY_ATOL`` (1e-5): the minimum of a divergence is stationary. A criterion
    that is *not* zero on identical inputs declares the class attribute
    ``zero_on_identical = False`` (e.g. soft cross-entropy, which equals the teacher entropy);
    for it only finiteness and non-negativity are checked here.
``non_negative``
    every value ``>= -NONNEG_ATOL`` (1e-6, float32 rounding) on random, peaked and
    near-uniform pairs.
``student_gradients`` / ``teacher_gradients``
    ``per_token(...).sum()`` backpropagates finite gradients of the input's shape and dtype into
    the student logits, and into the teacher logits when they require grad (the engine detaches
    the teacher by default, but a space may turn that off).
``rows``
    a row's value depends only on that row: appending padding rows (zeros, random rows, large
    logits) or changing, permuting other rows leaves each real row's value unchanged
    (``ROW_RTOL``/``ROW_ATOL`` 1e-6/1e-7, only reduction-order noise is allowed).
``batch_split``
    ``cat(per_token(x[:k]), per_token(x[k:])) == per_token(x)`` (same tolerance), as the
    engine's chunked evaluation relies on it.
``low_precision``
    (a) bf16 inputs give the same values as their exact float32 upcast, within
    ``UPCAST_RTOL``/``UPCAST_ATOL`` (1e-5 / 1e-6): the math is float32 whatever the input dtype;
    (b) bf16-rounded inputs agree with the original float32 inputs within
    ``BF16_RTOL``/``BF16_ATOL`` (3e-2 relative + 2e-3 absolute). This bounds the effect of
    rounding the *logits* to bf16 (relative step 2⁻⁸; a logit of 20 moves by up to 0.06), not
    float error in the criterion. Measured on the built-in criteria at T ∈ {0.5, 1, 2, 4},
    V ∈ {64, 1000, 50000} on the distributions below: the largest relative change was 2.2 %
    (rkl, peaked rows, T = 2), near-uniform rows changed by ≤ 1.2e-6 absolute, and the worst
    case used 70 % of this tolerance.
``neg_inf_columns``
    ``−inf`` logits (masked or padded vocabulary) give finite values and finite gradients when
    the column is ``−inf`` in both student and teacher, and when it is ``−inf`` only in the
    teacher; a column ``−inf`` in both is the same as no column (values equal to those of the
    logits with the column removed, ``ROW_RTOL``/``INF_ATOL``).

``value_and_grad``
    ``value_and_grad(student, teacher)`` returns ``([N] float32, [N, V_s] float32)``: the values
    equal ``per_token``'s (``VG_VALUE_RTOL``/``VG_VALUE_ATOL``) and the gradient equals autograd's
    gradient of ``per_token(...).sum()`` with respect to the student logits
    (``VG_GRAD_RTOL`` relative plus ``VG_GRAD_ATOL_EPS · eps₃₂ · (1 + |value|) / T`` absolute
    per row, ``T`` the criterion's ``temperature`` or 1: float32 rounding of a backward pass that
    subtracts quantities of the size of the value), on the three distributions, on float32,
    float64 (the reference gradient then in float64) and bfloat16 inputs (the reference on their
    exact float32 upcast), with ``−inf`` columns in both and in the teacher only (exactly 0 where
    both are ``−inf``), for 0 rows, and row blocks: splitting the rows changes nothing. It checks
    whichever gradient the criterion has (:func:`kdcore.criterion.gradient_path`: ``analytic``
    for its own closed form, ``autograd`` for the default), and names it in failures.
``kd_per_token``
    :func:`kdcore.criterion.kd_per_token` gives ``per_token``'s values, and its backward with
    random per-row weights ``w`` gives ``w[:, None] · grad`` in the student's dtype (float32 and
    bfloat16 inputs); with grad mode off it is ``per_token``; a teacher that requires grad
    still receives its gradient.

:func:`check_criterion` returns a :class:`ContractReport`: the names of the checks that ran, and
its ``gradient_path``.

Test distributions (:func:`make_logits`, :func:`make_pair`, :func:`distribution_pairs`; fixed
seeds, student and teacher drawn independently): ``random`` (standard normal logits × 2),
``peaked`` (standard normal with one random logit +20 per row), ``near_uniform`` (standard
normal × 1e-3).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .criterion import gradient_path

DISTRIBUTIONS: Tuple[str, ...] = ("random", "peaked", "near_uniform")

ZERO_ATOL = 1e-6
STATIONARY_ATOL = 1e-5
NONNEG_ATOL = 1e-6
ROW_RTOL, ROW_ATOL = 1e-6, 1e-7
INF_ATOL = 1e-6
UPCAST_RTOL, UPCAST_ATOL = 1e-5, 1e-6
BF16_RTOL, BF16_ATOL = 3e-2, 2e-3
VG_VALUE_RTOL, VG_VALUE_ATOL = 1e-5, 1e-6
VG_GRAD_RTOL, VG_GRAD_ATOL_EPS = 1e-4, 64


# -- test distributions ------------------------------------------------------------------

def make_logits(kind: str, n: int = 8, v: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Logits ``[n, v]`` of a test distribution, reproducible from ``seed``.

    ``random``: N(0, 1) × 2; ``peaked``: N(0, 1) plus 20 at one random column per row (a
    near-one-hot distribution); ``near_uniform``: N(0, 1) × 1e-3.
    """
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, v, generator=gen, dtype=torch.float64)
    if kind == "random":
        logits = base * 2.0
    elif kind == "peaked":
        peak = torch.randint(0, v, (n,), generator=gen)
        logits = base.clone()
        logits[torch.arange(n), peak] += 20.0
    elif kind == "near_uniform":
        logits = base * 1e-3
    else:
        raise ValueError(f"unknown distribution kind {kind!r}; expected one of {', '.join(DISTRIBUTIONS)}")
    return logits.to(dtype=dtype, device=device)


def make_pair(kind: str, n: int = 8, v: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32,
              device: Union[str, torch.device] = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(student_logits, teacher_logits)`` of the same kind, drawn independently (seeds differ)."""
    return (make_logits(kind, n, v, 2 * seed + 1, dtype, device),
            make_logits(kind, n, v, 2 * seed + 2, dtype, device))


def distribution_pairs(n: int = 8, v: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32,
                       device: Union[str, torch.device] = "cpu") -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """``{kind: (student_logits, teacher_logits)}`` for every kind in :data:`DISTRIBUTIONS`."""
    return {kind: make_pair(kind, n, v, seed + i, dtype, device) for i, kind in enumerate(DISTRIBUTIONS)}



# -- resolving the criterion -------------------------------------------------------------

def resolve_criterion(name_or_class, **kwargs):
    """An instance from a registered name (built and validated by :func:`kdcore.build`), a
    criterion class (called with ``kwargs``) or an instance (``kwargs`` must be empty)."""
    if isinstance(name_or_class, str):
        from . import build

        return build("criterion", {"name": name_or_class, **kwargs})
    if isinstance(name_or_class, type):
        return name_or_class(**kwargs)
    if kwargs:
        raise TypeError("keyword arguments are only accepted with a criterion name or class")
    return name_or_class


def zero_on_identical(criterion) -> bool:
    """Whether ``per_token(z, z)`` must be 0 (class attribute ``zero_on_identical``, default True)."""
    cls = criterion if isinstance(criterion, type) else type(criterion)
    return bool(getattr(cls, "zero_on_identical", True))


# -- helpers -----------------------------------------------------------------------------

def _label(criterion) -> str:
    return getattr(criterion, "name", type(criterion).__name__)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str) -> None:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    bad = ~((actual - expected).abs() <= atol + rtol * expected.abs())
    bad |= torch.isnan(actual) != torch.isnan(expected)
    if bad.any():
        i = int(bad.nonzero()[0][0])
        worst = (actual - expected).abs().nan_to_num(math.inf).max().item()
        atol_text = f"{float(torch.as_tensor(atol).max()):.3g}" + ("" if isinstance(atol, (int, float)) else " (max)")
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} values differ beyond rtol={rtol:g} atol={atol_text}; "
            f"e.g. row {i}: {actual.flatten()[i].item():.10g} vs {expected.flatten()[i].item():.10g} "
            f"(max abs diff {worst:.3g})"
        )


def _values(criterion, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return criterion.per_token(student, teacher)


def _grads(criterion, student: torch.Tensor, teacher: torch.Tensor, teacher_grad: bool = False):
    s = student.detach().clone().requires_grad_(True)
    t = teacher.detach().clone().requires_grad_(teacher_grad)
    out = criterion.per_token(s, t)
    out.sum().backward()
    return out.detach(), s.grad, t.grad


def _assert_finite(x: Optional[torch.Tensor], what: str) -> None:
    if x is None:
        raise AssertionError(f"{what}: no gradient reached the input")
    if not torch.isfinite(x).all():
        nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        raise AssertionError(f"{what}: {nan} NaN and {inf} inf of {x.numel()}")


def _with_neg_inf(n: int, v: int, seed: int, device):
    """``(student, teacher_both, teacher, both[v], teacher_only[v])``: random logits where the
    ``both`` columns are −inf in the student and in both teachers, and the ``teacher_only``
    columns are also −inf in ``teacher`` (not in ``teacher_both``)."""
    s, t = make_pair("random", n, v, seed, device=device)
    perm = torch.randperm(v, generator=torch.Generator().manual_seed(seed + 99))
    both = torch.zeros(v, dtype=torch.bool)
    both[perm[: max(1, v // 8)]] = True
    t_only = torch.zeros(v, dtype=torch.bool)
    t_only[perm[max(1, v // 8): max(2, v // 4)]] = True
    both, t_only = both.to(device), t_only.to(device)
    return (s.masked_fill(both, -math.inf), t.masked_fill(both, -math.inf),
            t.masked_fill(both | t_only, -math.inf), both, t_only)


# -- the checks --------------------------------------------------------------------------

def check_shape_dtype(criterion, n: int = 8, v: int = 64, seed: int = 0, device="cpu") -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        s, t = make_pair("random", n, v, seed, dtype=dtype, device=device)
        out = criterion.per_token(s, t)
        if not isinstance(out, torch.Tensor):
            raise AssertionError(f"{dtype} inputs: per_token returned {type(out).__name__}, not a tensor")
        if tuple(out.shape) != (n,):
            raise AssertionError(f"{dtype} inputs [{n}, {v}]: output shape {tuple(out.shape)}, expected ({n},)")
        if out.dtype != torch.float32:
            raise AssertionError(f"{dtype} inputs: output dtype {out.dtype}, expected torch.float32")
        if out.device.type != torch.device(device).type:
            raise AssertionError(f"output on {out.device}, inputs on {device}")
    empty = criterion.per_token(torch.zeros(0, v, device=device), torch.zeros(0, v, device=device))
    if tuple(empty.shape) != (0,):
        raise AssertionError(f"0 rows: output shape {tuple(empty.shape)}, expected (0,)")


def check_identical(criterion, n: int = 8, v: int = 64, seed: int = 0, device="cpu") -> None:
    for kind, (_, t) in distribution_pairs(n, v, seed, device=device).items():
        vals, s_grad, _ = _grads(criterion, t, t)
        _assert_finite(vals, f"{kind}: per_token(z, z)")
        if zero_on_identical(criterion):
            if vals.abs().max() > ZERO_ATOL:
                raise AssertionError(
                    f"{kind}: per_token(z, z) should be 0, got max |value| {vals.abs().max().item():.3g} "
                    "(declare zero_on_identical = False if the criterion is not a divergence)")
            _assert_finite(s_grad, f"{kind}: student gradient at identical inputs")
            if s_grad.abs().max() > STATIONARY_ATOL:
                raise AssertionError(
                    f"{kind}: the student gradient at identical inputs should be 0 (the minimum), "
                    f"got max |grad| {s_grad.abs().max().item():.3g}")
        elif (vals < -NONNEG_ATOL).any():
            raise AssertionError(f"{kind}: per_token(z, z) is negative: {vals.min().item():.3g}")


def check_non_negative(criterion, n: int = 8, v: int = 64, seed: int = 0, device="cpu") -> None:
    for kind, (s, t) in distribution_pairs(n, v, seed, device=device).items():
        vals = _values(criterion, s, t)
        _assert_finite(vals, f"{kind}: values")
        if (vals < -NONNEG_ATOL).any():
            raise AssertionError(f"{kind}: negative value {vals.min().item():.6g}")


def check_student_gradients(criterion, n: int = 8, v: int = 64, seed: int = 0, device="cpu") -> None:
    for kind, (s, t) in distribution_pairs(n, v, seed, device=device).items():
        _, g, _ = _grads(criterion, s, t)
        _assert_finite(g, f"{kind}: student gradient")
        if g.shape != s.shape or g.dtype != s.dtype:
            raise AssertionError(f"{kind}: student gradient {tuple(g.shape)} {g.dtype} for input {tuple(s.shape)} {s.dtype}")
        if g.abs().max() == 0:
            raise AssertionError(f"{kind}: the student gradient is identically zero for different distributions")


def check_teacher_gradients(criterion, n: int = 8, v: int = 64, seed: int = 0, device="cpu") -> None:
    for kind, (s, t) in distribution_pairs(n, v, seed, device=device).items():
        _, _, g = _grads(criterion, s, t, teacher_grad=True)
        _assert_finite(g, f"{kind}: teacher gradient")
    s, t_both, t, _, _ = _with_neg_inf(n, v, seed, device)
    for what, teacher in (("in both", t_both), ("in the teacher only", t)):
        _, _, g = _grads(criterion, s, teacher, teacher_grad=True)
        _assert_finite(g, f"columns −inf {what}: teacher gradient")


def check_rows(criterion, n: int = 8, v: int = 64, seed: int = 0, device="cpu") -> None:
    for kind, (s, t) in distribution_pairs(n, v, seed, device=device).items():
        ref = _values(criterion, s, t)
        pads = {
            "zero padding rows": (torch.zeros(3, v, device=device), torch.zeros(3, v, device=device)),
            "random padding rows": make_pair("random", 5, v, seed + 7, device=device),
            "large-logit padding rows": tuple(x * 50 for x in make_pair("peaked", 2, v, seed + 8, device=device)),
        }
        for what, (ps, pt) in pads.items():
            out = _values(criterion, torch.cat([s, ps]), torch.cat([t, pt]))
            _close(out[:n], ref, ROW_RTOL, ROW_ATOL, f"{kind}: real rows after appending {what}")
            out = _values(criterion, torch.cat([ps, s]), torch.cat([pt, t]))
            _close(out[ps.shape[0]:], ref, ROW_RTOL, ROW_ATOL, f"{kind}: real rows after prepending {what}")
        # Changing every other row must not change row 0.
        s2, t2 = s.clone(), t.clone()
        if n > 1:
            s2[1:], t2[1:] = make_pair("random", n - 1, v, seed + 9, device=device)
        _close(_values(criterion, s2, t2)[:1], ref[:1], ROW_RTOL, ROW_ATOL, f"{kind}: row 0 after changing the other rows")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
        _close(_values(criterion, s[perm], t[perm]), ref[perm], ROW_RTOL, ROW_ATOL, f"{kind}: permuted rows")


def check_batch_split(criterion, n: int = 8, v: int = 64, seed: int = 0, device="cpu") -> None:
    for kind, (s, t) in distribution_pairs(n, v, seed, device=device).items():
        ref = _values(criterion, s, t)
        for k in sorted({1, n // 2, n - 1}):
            if not 0 < k < n:
                continue
            out = torch.cat([_values(criterion, s[:k], t[:k]), _values(criterion, s[k:], t[k:])])
            _close(out, ref, ROW_RTOL, ROW_ATOL, f"{kind}: split at row {k} and concatenated")


def check_low_precision(criterion, n: int = 8, v: int = 64, seed: int = 0, device="cpu") -> None:
    for kind, (s, t) in distribution_pairs(n, v, seed, device=device).items():
        s16, t16 = s.bfloat16(), t.bfloat16()
        v16 = _values(criterion, s16, t16)
        _assert_finite(v16, f"{kind}: bf16 values")
        _close(v16, _values(criterion, s16.float(), t16.float()), UPCAST_RTOL, UPCAST_ATOL,
               f"{kind}: bf16 inputs vs their float32 upcast (the math must be float32)")
        _close(v16, _values(criterion, s, t), BF16_RTOL, BF16_ATOL, f"{kind}: bf16-rounded vs float32 inputs")
        _, g16, _ = _grads(criterion, s16, t16)
        _assert_finite(g16, f"{kind}: bf16 student gradient")
        if g16.dtype != torch.bfloat16:
            raise AssertionError(f"{kind}: bf16 student gradient has dtype {g16.dtype}")


def check_neg_inf_columns(criterion, n: int = 8, v: int = 64, seed: int = 0, device="cpu") -> None:
    s, t_both, t, both, _ = _with_neg_inf(n, v, seed, device)
    vals, g, _ = _grads(criterion, s, t_both)
    _assert_finite(vals, "columns −inf in both: values")
    _assert_finite(g, "columns −inf in both: student gradient")
    if (g[:, both] != 0).any():
        raise AssertionError("columns −inf in both: the student gradient of a masked column should be 0")
    keep = ~both
    _close(vals, _values(criterion, s[:, keep], t_both[:, keep]), ROW_RTOL, INF_ATOL,
           "columns −inf in both vs the same logits without those columns")
    # -inf in both, plus columns -inf only in the teacher
    vals, g, _ = _grads(criterion, s, t)
    _assert_finite(vals, "columns −inf in the teacher only: values")
    _assert_finite(g, "columns −inf in the teacher only: student gradient")
    if zero_on_identical(criterion):
        vals, g, _ = _grads(criterion, t, t)
        _assert_finite(vals, "identical inputs with −inf columns: values")
        _assert_finite(g, "identical inputs with −inf columns: student gradient")
        if vals.abs().max() > ZERO_ATOL:
            raise AssertionError(f"identical inputs with −inf columns: expected 0, got {vals.abs().max().item():.3g}")


def _gradient_tolerance(criterion, values: torch.Tensor) -> torch.Tensor:
    """Per-row absolute gradient tolerance ``[N, 1]`` of the value_and_grad check."""
    temperature = float(getattr(criterion, "temperature", 1.0) or 1.0)
    eps = torch.finfo(torch.float32).eps
    return (VG_GRAD_ATOL_EPS * eps * (1 + values.detach().double().abs().cpu()) / temperature)[:, None]


def _value_and_grad_matches(criterion, student: torch.Tensor, teacher: torch.Tensor, what: str):
    """``value_and_grad`` against ``per_token`` and its autograd gradient; returns ``(values, grad)``."""
    values, grad = criterion.value_and_grad(student, teacher)
    n, v = student.shape
    for name, x, shape in (("values", values, (n,)), ("gradient", grad, (n, v))):
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape or x.dtype != torch.float32:
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise AssertionError(f"{what}: value_and_grad {name} are {got}, expected {shape} torch.float32")
    leaf = student if student.dtype in (torch.float32, torch.float64) else student.float()
    ref_values, ref_grad, _ = _grads(criterion, leaf, teacher)
    _assert_finite(grad, f"{what}: value_and_grad gradient")
    _close(values, ref_values, VG_VALUE_RTOL, VG_VALUE_ATOL, f"{what}: value_and_grad values vs per_token")
    _close(grad, ref_grad, VG_GRAD_RTOL, _gradient_tolerance(criterion, ref_values),
           f"{what}: value_and_grad gradient vs autograd of per_token")
    return values, grad


def check_value_and_grad(criterion, n: int = 8, v: int = 64, seed: int = 0, device="cpu") -> None:
    pairs = dict(distribution_pairs(n, v, seed, device=device))
    s, t = pairs["random"]
    pairs.update({"float64 inputs": (s.double(), t.double()), "bfloat16 inputs": (s.bfloat16(), t.bfloat16())})
    s, t_both, t, both, _ = _with_neg_inf(n, v, seed, device)
    pairs["columns −inf in the teacher only"] = (s, t)
    for what, (student, teacher) in pairs.items():
        _value_and_grad_matches(criterion, student, teacher, what)
    _, grad = _value_and_grad_matches(criterion, s, t_both, "columns −inf in both")
    if (grad[:, both] != 0).any():
        raise AssertionError("columns −inf in both: value_and_grad gives a masked column a nonzero gradient")
    empty_v, empty_g = criterion.value_and_grad(torch.zeros(0, v, device=device), torch.zeros(0, v, device=device))
    if tuple(empty_v.shape) != (0,) or tuple(empty_g.shape) != (0, v):
        raise AssertionError(f"0 rows: value_and_grad shapes {tuple(empty_v.shape)}, {tuple(empty_g.shape)}")
    s, t = pairs["random"]
    values, grad = criterion.value_and_grad(s, t)
    k = max(1, n // 3)
    parts = [criterion.value_and_grad(s[a:b], t[a:b]) for a, b in ((0, k), (k, n))]
    _close(torch.cat([p[0] for p in parts]), values, ROW_RTOL, ROW_ATOL, f"value_and_grad values of rows split at {k}")
    _close(torch.cat([p[1] for p in parts]), grad, ROW_RTOL, ROW_ATOL, f"value_and_grad gradient of rows split at {k}")


def check_kd_per_token(criterion, n: int = 8, v: int = 64, seed: int = 0, device="cpu") -> None:
    from .criterion import kd_per_token

    weights = torch.rand(n, generator=torch.Generator().manual_seed(seed + 5), dtype=torch.float64).to(device) + 0.5
    for dtype in (torch.float32, torch.bfloat16):
        s, t = make_pair("random", n, v, seed, dtype=dtype, device=device)
        leaf = s.clone().requires_grad_(True)
        out = kd_per_token(criterion, leaf, t)
        ref_values, ref_grad, _ = _grads(criterion, s.float(), t)
        _close(out, ref_values, VG_VALUE_RTOL, VG_VALUE_ATOL, f"{dtype} inputs: kd_per_token values vs per_token")
        (out * weights.to(out.dtype)).sum().backward()
        if leaf.grad is None or leaf.grad.dtype != dtype:
            raise AssertionError(f"{dtype} inputs: kd_per_token gave the student gradient "
                                 f"{None if leaf.grad is None else leaf.grad.dtype}, expected {dtype}")
        tol = _gradient_tolerance(criterion, ref_values) * weights.cpu()[:, None]
        if dtype == torch.bfloat16:  # the gradient itself is rounded to bfloat16
            tol = tol + 2 ** -8 * (weights.cpu()[:, None] * ref_grad.detach().double().cpu()).abs()
        _close(leaf.grad, weights[:, None] * ref_grad.double(), VG_GRAD_RTOL, tol,
               f"{dtype} inputs: kd_per_token backward vs weights · autograd gradient of per_token")
    s, t = make_pair("random", n, v, seed, device=device)
    with torch.no_grad():
        _close(kd_per_token(criterion, s, t), _values(criterion, s, t), 0.0, 0.0, "kd_per_token under no_grad")
    teacher = t.clone().requires_grad_(True)
    kd_per_token(criterion, s.clone().requires_grad_(True), teacher).sum().backward()
    _assert_finite(teacher.grad, "kd_per_token with a teacher that requires grad: teacher gradient")


CHECK_FUNCTIONS: Dict[str, Callable] = {
    "shape_dtype": check_shape_dtype,
    "identical": check_identical,
    "non_negative": check_non_negative,
    "student_gradients": check_student_gradients,
    "teacher_gradients": check_teacher_gradients,
    "rows": check_rows,
    "batch_split": check_batch_split,
    "low_precision": check_low_precision,
    "neg_inf_columns": check_neg_inf_columns,
    "value_and_grad": check_value_and_grad,
    "kd_per_token": check_kd_per_token,
}
CHECKS: Tuple[str, ...] = tuple(CHECK_FUNCTIONS)
GRADIENT_CHECKS = frozenset({"value_and_grad", "kd_per_token"})


def run_check(name_or_class, check: str, *, n: int = 8, v: int = 64, seed: int = 0, device="cpu", **kwargs) -> None:
    """Run one named check (see :data:`CHECKS`); raises ``AssertionError`` naming the criterion."""
    if check not in CHECK_FUNCTIONS:
        raise ValueError(f"unknown check {check!r}; expected one of {', '.join(CHECKS)}")
    criterion = resolve_criterion(name_or_class, **kwargs)
    try:
        CHECK_FUNCTIONS[check](criterion, n=n, v=v, seed=seed, device=device)
    except AssertionError as exc:
        path = f" ({gradient_path(criterion)} gradient)" if check in GRADIENT_CHECKS else ""
        raise AssertionError(f"criterion {_label(criterion)!r} fails {check!r}{path}: {exc}") from None


class ContractReport(list):
    """What :func:`check_criterion` ran: a list of check names, plus ``gradient_path``,
    ``"analytic"`` or ``"autograd"`` (:func:`kdcore.criterion.gradient_path`): the gradient
    that the ``value_and_grad`` and ``kd_per_token`` checks verified."""

    def __init__(self, checks: Iterable[str], gradient_path: str):
        super().__init__(checks)
        self.gradient_path = gradient_path

    def __repr__(self) -> str:
        return f"ContractReport({list(self)!r}, gradient_path={self.gradient_path!r})"


def check_criterion(name_or_class, *, checks: Optional[Iterable[str]] = None, n: int = 8, v: int = 64,
                    seed: int = 0, device="cpu", **kwargs) -> ContractReport:
    """Run the contract checks (all by default) on a criterion given by registered name, class
    or instance; ``kwargs`` are its constructor arguments. Returns a :class:`ContractReport` (the
    names of the checks run and the criterion's gradient path); raises ``AssertionError``
    listing every failing check."""
    criterion = resolve_criterion(name_or_class, **kwargs)
    selected: Sequence[str] = tuple(checks) if checks is not None else CHECKS
    failures = []
    for check in selected:
        try:
            run_check(criterion, check, n=n, v=v, seed=seed, device=device)
        except AssertionError as exc:
            failures.append(str(exc))
    if failures:
        raise AssertionError(f"{len(failures)} contract check(s) failed:\n" + "\n".join(failures))
    return ContractReport(selected, gradient_path(criterion))
