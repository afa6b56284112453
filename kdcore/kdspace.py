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
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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
class Space:
    """One KD term over ``N`` rows. ``name`` makes the logged key ``kd_<name>``.

    student_hidden[N, h1] -> student_head -> student-side logits (these get the gradient)
    teacher_hidden[N, h2] -> teacher_head -> teacher-side logits (the reference distribution,
    detached for the KD term unless ``detach_teacher`` is off)
    Optional extras computed in the same pass (sharing the chunk's logits):
    ``student_ce``: CE of the student-side logits on ``labels`` (the objective's CE term);
    ``teacher_ce``: name of a CE term of the teacher-side logits on ``labels`` (trains a projector);
    ``teacher_acc`` / ``student_acc``: names of accuracies of argmax logits against ``labels``;
    ``mask_kd_by_teacher_accuracy``: KD only where argmax(teacher-side) == label (DSKD-CMA);
    ``kd_columns``: compare only the first k vocabulary columns (padded-vocabulary mismatch).
    """

    name: str
    student_hidden: torch.Tensor
    student_head: Head
    teacher_hidden: torch.Tensor
    teacher_head: Head
    criterion: object
    labels: Optional[torch.Tensor] = None
    student_ce: bool = False
    teacher_ce: Optional[str] = None
    teacher_acc: Optional[str] = None
    student_acc: Optional[str] = None
    mask_kd_by_teacher_accuracy: bool = False
    detach_teacher: bool = True
    kd_columns: Optional[int] = None
    teacher_logit_map: Optional[object] = None  # (logits[N, V_t], labels[N], row_info[N]) -> [N, V_s]
    row_info: Optional[torch.Tensor] = None  # [N], passed to teacher_logit_map

    @property
    def num_rows(self) -> int:
        return self.student_hidden.shape[0]


CHUNK_ELEMENTS = 2**26  # logits elements per chunk by default: 256 MiB per fp32 [chunk, V] tensor


def auto_chunk_rows(vocab_size: int) -> int:
    """Default rows per chunk: a fixed budget of ``CHUNK_ELEMENTS`` logits, within [64, 4096]
    (441 rows at V = 151,936; 1,335 at V = 50,257; 256 at V = 262,144)."""
    return max(64, min(4096, CHUNK_ELEMENTS // max(vocab_size, 1)))


def _space_chunk(space: Space, hs: torch.Tensor, ht: torch.Tensor, labels: Optional[torch.Tensor],
                 row_info: Optional[torch.Tensor]):
    """Sums over one chunk of rows: (kd, student_ce, teacher_ce, student_correct, teacher_correct)."""
    zero = hs.new_zeros((), dtype=torch.float32)
    s_logits = space.student_head(hs)
    t_logits = space.teacher_head(ht)
    if space.teacher_logit_map is not None:
        t_logits = space.teacher_logit_map(t_logits, labels, row_info)
    k = space.kd_columns
    t_ref = t_logits.detach() if space.detach_teacher else t_logits
    per_token = space.criterion.per_token(s_logits[:, :k] if k else s_logits, t_ref[:, :k] if k else t_ref)
    t_correct = s_correct = zero
    if labels is not None and (space.mask_kd_by_teacher_accuracy or space.teacher_acc):
        t_hit = t_logits.detach().argmax(-1).eq(labels)
        t_correct = t_hit.sum().float()
        if space.mask_kd_by_teacher_accuracy:
            per_token = per_token * t_hit.to(per_token.dtype)
    if labels is not None and space.student_acc:
        s_correct = s_logits.detach().argmax(-1).eq(labels).sum().float()
    kd = per_token.float().sum()
    s_ce = F.cross_entropy(s_logits.float(), labels, reduction="sum") if space.student_ce else zero
    t_ce = F.cross_entropy(t_logits.float(), labels, reduction="sum") if space.teacher_ce else zero
    return kd, s_ce, t_ce, s_correct, t_correct


def chunked(fn, tensors, chunk_size: int):
    """Apply ``fn(*row_chunks) -> tuple of scalars`` to row chunks of ``tensors`` and sum.

    When a chunk needs a graph, it runs under non-reentrant checkpointing: only its inputs are
    kept and its intermediates (the ``[chunk, V]`` logits) are recomputed in backward.
    """
    n = tensors[0].shape[0]
    total = None
    for start in range(0, max(n, 1), chunk_size):
        parts = [t[start:start + chunk_size] if t is not None else None for t in tensors]
        if torch.is_grad_enabled():
            out = checkpoint(fn, *parts, use_reentrant=False)
        else:
            out = fn(*parts)
        total = out if total is None else tuple(a + b for a, b in zip(total, out))
    return total


def evaluate_space(space: Space, chunk_size: Optional[int] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, Tuple[torch.Tensor, int]]]:
    """Losses (sums over rows) and accuracy counts of one space, ``chunk_size`` rows at a time
    (default :func:`auto_chunk_rows` of the wider vocabulary).

    Returns ``losses`` with keys ``kd_<name>`` and, when requested, ``ce`` and the
    ``teacher_ce`` name; ``counts`` maps accuracy names to ``(correct, rows)``.
    """
    if space.teacher_hidden.shape[0] != space.num_rows:
        raise ValueError(f"space {space.name}: {space.num_rows} student rows vs {space.teacher_hidden.shape[0]} teacher rows")
    needs_labels = (space.student_ce or space.teacher_ce or space.teacher_acc or space.student_acc
                    or space.mask_kd_by_teacher_accuracy or space.teacher_logit_map is not None)
    if needs_labels and space.labels is None:
        raise ValueError(f"space {space.name}: labels are required for CE/accuracy terms")
    chunk_size = chunk_size or auto_chunk_rows(max(space.student_head.vocab_size, space.teacher_head.vocab_size))
    kd, s_ce, t_ce, s_ok, t_ok = chunked(
        lambda hs, ht, y, info: _space_chunk(space, hs, ht, y, info),
        [space.student_hidden, space.teacher_hidden, space.labels if needs_labels else None, space.row_info],
        chunk_size,
    )
    losses = {f"kd_{space.name}": kd}
    if space.student_ce:
        losses["ce"] = s_ce
    if space.teacher_ce:
        losses[space.teacher_ce] = t_ce
    counts = {}
    if space.teacher_acc:
        counts[space.teacher_acc] = (t_ok.detach(), space.num_rows)
    if space.student_acc:
        counts[space.student_acc] = (s_ok.detach(), space.num_rows)
    return losses, counts


def cross_entropy_sum(hidden: torch.Tensor, head: Head, labels: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
    """``Σ_rows -log softmax(head(hidden))[label]``, chunked like the KD terms. hidden[N, h], labels[N]."""
    chunk_size = chunk_size or auto_chunk_rows(head.vocab_size)
    (total,) = chunked(lambda h, y: (F.cross_entropy(head(h).float(), y, reduction="sum"),), [hidden, labels], chunk_size)
    return total
