"""KD spaces and their memory-bounded evaluation.

A *space* is where one KD term is measured: ``N`` student-side hidden rows go through a head
to student-side logits ``[N, V]``, ``N`` teacher-side rows through a (possibly different) head
to teacher-side logits ``[N, V']``, and the criterion compares them row by row. Projectors
build spaces; :func:`evaluate_space` computes them in chunks of rows so that at most
``chunk_size x V`` logits exist at once. Each chunk runs under activation checkpointing: its
logits are recomputed in backward instead of being stored, so the extra memory of the KD loss
is O(chunk_size x V) rather than several O(N x V) tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Literal, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import fused as fused_path
from .errors import ModelError


class Head:
    """An output head as a function of hidden rows: ``logits[N, V] = cap(scale · (h W^T + b))``.

    Built from ``model.get_output_embeddings()`` (any HF causal LM), plus the logit transforms
    some families apply after the projection (Gemma's ``final_logit_softcapping``, Cohere's
    ``logit_scale``, Granite's ``logits_scaling``), so that ``Head.of(model)(h)`` equals the
    model's own logits. ``detach=True`` stops gradients into the weights (a frozen head).
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, scale: float = 1.0,
                 softcap: Optional[float] = None, detach: bool = False):
        self.weight, self.bias, self.scale, self.softcap, self.detach = weight, bias, scale, softcap, detach

    @classmethod
    def of(cls, model) -> "Head":
        module = model.get_output_embeddings()
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2:
            raise ModelError(f"{type(model).__name__}: get_output_embeddings() is not a linear head ({type(module).__name__})")
        cfg = getattr(model, "config", None)
        cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
        scale = float(getattr(cfg, "logit_scale", None) or 1.0)
        if getattr(cfg, "logits_scaling", None):
            scale /= float(cfg.logits_scaling)
        softcap = getattr(cfg, "final_logit_softcapping", None)
        return cls(weight, getattr(module, "bias", None), scale, softcap)

    def detached(self) -> "Head":
        return Head(self.weight, self.bias, self.scale, self.softcap, detach=True)

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if self.detach:
            w = w.detach()
            b = b.detach() if b is not None else None
        logits = F.linear(hidden.to(w.dtype), w, b)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


@dataclass
class ModelSide:
    """One model's view of a batch. ``hidden[B, L, h]`` is the last hidden state (after the final
    norm); ``labels[B, L]`` holds -100 outside the response; ``mask = labels != -100``."""

    hidden: torch.Tensor
    head: Head
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    embeddings: Optional[torch.nn.Module] = None

    @property
    def mask(self) -> torch.Tensor:
        return self.labels.ne(-100)


@dataclass
class Rows:
    """One side of a space: ``hidden[N, h]`` rows through ``head`` to logits ``[N, V]``.

    ``map_logits(logits[n, V], rows: slice) -> [n, V']`` optionally turns a chunk's logits (rows
    ``rows`` of the ``N``) into another vocabulary (MinED's teacher -> student vocabulary map).
    """

    hidden: torch.Tensor
    head: Head
    map_logits: Optional[Callable[[torch.Tensor, slice], torch.Tensor]] = None

    def logits(self, hidden: torch.Tensor, rows: slice) -> torch.Tensor:
        out = self.head(hidden)
        return self.map_logits(out, rows) if self.map_logits is not None else out


@dataclass(frozen=True)
class CrossEntropy:
    """Auxiliary term ``name = Σ_rows CE(side logits, labels)`` (a loss term). ``side`` is
    ``"student"`` (the objective's CE when the rows are the whole response) or ``"teacher"``
    (DSKD's ``t2s_ce``, which trains a projection through the teacher-side rows)."""

    name: str
    side: Literal["student", "teacher"]


@dataclass(frozen=True)
class Accuracy:
    """Auxiliary metric ``name = mean_rows(argmax side logits == labels)``. ``gate``: the KD term
    counts only on rows where it holds (DSKD-CMA's ``mask_kd_by_teacher_accuracy``)."""

    name: str
    side: Literal["student", "teacher"]
    gate: bool = False


@dataclass
class Space:
    """One KD term ``kd_<name> = Σ_rows criterion(student logits, teacher logits)`` over ``N``
    rows, plus auxiliary terms computed on the same chunk's logits.

    ``student`` rows get the gradient of the KD term; ``teacher`` rows are its reference
    distribution (detached for the KD term; auxiliary CE terms on the teacher side do reach
    them). ``labels[N]`` are the gold ids of the rows, needed by the auxiliary terms.
    """

    name: str
    student: Rows
    teacher: Rows
    criterion: object
    labels: Optional[torch.Tensor] = None
    terms: Sequence[Union[CrossEntropy, Accuracy]] = ()

    @property
    def num_rows(self) -> int:
        return self.student.hidden.shape[0]


class FirstColumns:
    """A criterion applied to the first ``k`` vocabulary columns of both sides: two heads that
    differ only by padding columns (e.g. 151,936 vs 152,064) compare the shared tokenizer's."""

    def __init__(self, criterion, k: int):
        self.criterion, self.k = criterion, k
        self.same_vocab = getattr(criterion, "same_vocab", True)

    def per_token(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return self.criterion.per_token(student_logits[:, :self.k], teacher_logits[:, :self.k])

    def value_and_grad(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor):
        values, grad = self.criterion.value_and_grad(student_logits[:, :self.k], teacher_logits[:, :self.k])
        full = grad.new_zeros(student_logits.shape)
        full[:, :self.k] = grad
        return values, full


CHUNK_ELEMENTS = 2**26  # logits elements per chunk by default: 256 MiB per fp32 [chunk, V] tensor


def auto_chunk_rows(vocab_size: int) -> int:
    """Default rows per chunk: a fixed budget of ``CHUNK_ELEMENTS`` logits, within [64, 4096]
    (441 rows at V = 151,936; 1,335 at V = 50,257; 256 at V = 262,144)."""
    return max(64, min(4096, CHUNK_ELEMENTS // max(vocab_size, 1)))


def _space_chunk(space: Space, hs: torch.Tensor, ht: torch.Tensor, labels: Optional[torch.Tensor], rows: slice):
    """Sums over one chunk of rows: ``(kd, *auxiliary terms in space.terms order)``."""
    logits = {"student": space.student.logits(hs, rows), "teacher": space.teacher.logits(ht, rows)}
    per_token = space.criterion.per_token(logits["student"], logits["teacher"].detach())
    aux = []
    for term in space.terms:
        side = logits[term.side]
        if isinstance(term, Accuracy):
            hit = side.detach().argmax(-1).eq(labels)
            if term.gate:
                per_token = per_token * hit.to(per_token.dtype)
            aux.append(hit.sum().float())
        else:
            aux.append(F.cross_entropy(side.float(), labels, reduction="sum"))
    return (per_token.float().sum(), *aux)


def chunked(fn, tensors, chunk_size: int):
    """Apply ``fn(*row_chunks, rows) -> tuple of scalars`` to row chunks of ``tensors`` (``rows``
    the chunk's slice) and sum.

    When a chunk needs a graph, it runs under non-reentrant checkpointing: only its inputs are
    kept and its intermediates (the ``[chunk, V]`` logits) are recomputed in backward.
    """
    n = tensors[0].shape[0]
    total = None
    for start in range(0, max(n, 1), chunk_size):
        rows = slice(start, start + chunk_size)
        parts = [t[rows] if t is not None else None for t in tensors]
        if torch.is_grad_enabled():
            out = checkpoint(fn, *parts, rows, use_reentrant=False)
        else:
            out = fn(*parts, rows)
        total = out if total is None else tuple(a + b for a, b in zip(total, out))
    return total


def evaluate_space(space: Space, chunk_size: Optional[int] = None, weights: Optional[Callable[[str], float]] = None,
                   fused: bool = True) -> Tuple[Dict[str, torch.Tensor], Dict[str, Tuple[torch.Tensor, int]]]:
    """Losses (sums over rows) and accuracy counts of one space, ``chunk_size`` rows at a time
    (default :func:`auto_chunk_rows` of the wider vocabulary).

    Returns ``losses`` with keys ``kd_<name>`` and the auxiliary CE names; ``counts`` maps
    accuracy names to ``(correct, rows)``. With gradients enabled the losses come from
    :mod:`kdcore.fused` (gradients computed in the forward pass; ``weights``: the objective's
    weight of a term name, for one combined gradient); ``fused=False``, or a side that needs a gradient
    through a logits map, takes the checkpointed autograd path (each chunk's logits recomputed
    in backward).
    """
    if space.teacher.hidden.shape[0] != space.num_rows:
        raise ValueError(f"space {space.name}: {space.num_rows} student rows vs {space.teacher.hidden.shape[0]} teacher rows")
    if space.terms and space.labels is None:
        raise ValueError(f"space {space.name}: labels are required for CE/accuracy terms")
    chunk_size = chunk_size or auto_chunk_rows(max(space.student.head.vocab_size, space.teacher.head.vocab_size))
    if fused and torch.is_grad_enabled() and fused_path.supports(space):
        return fused_path.evaluate_fused(space, chunk_size, weights)
    kd, *aux = chunked(lambda hs, ht, y, rows: _space_chunk(space, hs, ht, y, rows),
                       [space.student.hidden, space.teacher.hidden, space.labels], chunk_size)
    losses = {f"kd_{space.name}": kd}
    counts = {}
    for term, value in zip(space.terms, aux):
        if isinstance(term, Accuracy):
            counts[term.name] = (value.detach(), space.num_rows)
        else:
            losses[term.name] = value
    return losses, counts


def _head_flops(rows: int, head: Head, input_grad: bool, training: bool) -> float:
    """``2·rows·h·V`` forward, plus as much for the rows' gradient and for a trainable head's."""
    product = 2.0 * rows * head.hidden_size * head.vocab_size
    weight_grad = not head.detach and head.weight.requires_grad
    return product * (1 + (training and input_grad) + (training and weight_grad))


def space_flops(space: Space, training: bool) -> float:
    """Model FLOPs of a space's head products (the criterion's own elementwise work excluded)."""
    teacher_grad = any(isinstance(t, CrossEntropy) and t.side == "teacher" for t in space.terms)
    return (_head_flops(space.num_rows, space.student.head, space.student.hidden.requires_grad, training)
            + _head_flops(space.num_rows, space.teacher.head, teacher_grad and space.teacher.hidden.requires_grad,
                          training))


def cross_entropy_flops(rows: int, head: Head, training: bool) -> float:
    return _head_flops(rows, head, True, training)


def cross_entropy_sum(hidden: torch.Tensor, head: Head, labels: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
    """``Σ_rows -log softmax(head(hidden))[label]``, chunked like the KD terms. hidden[N, h], labels[N]."""
    chunk_size = chunk_size or auto_chunk_rows(head.vocab_size)
    (total,) = chunked(lambda h, y, rows: (F.cross_entropy(head(h).float(), y, reduction="sum"),), [hidden, labels],
                       chunk_size)
    return total
