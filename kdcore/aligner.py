"""Token aligners: which teacher positions (or vocabulary entries) match which student ones."""

from __future__ import annotations

from typing import Callable, ClassVar, Dict, FrozenSet, List, Optional

import torch
from torch import nn


class Alignment:
    """How one batch's teacher positions map onto the student's, and back.

    ``student_mask[B, n]``: student positions that carry a KD term (a subset of the response).
    ``teacher_mask[B, m]``: teacher positions that carry a teacher-space term.
    ``teacher_to_student(x[B, m, ...]) -> [B, n, ...]`` and ``student_to_teacher`` the reverse
    (a gather for hard alignments, an attention-weighted sum for soft ones).
    ``teacher_value(teacher)`` is what a projector maps into student space (the last hidden
    state by default). Optional logit-level hooks (MinED): ``teacher_logit_map(logits[N, V_t],
    labels[N], row_info[N]) -> [N, V_s]`` with ``row_info`` per KD row.
    """

    student_mask: torch.Tensor
    teacher_mask: torch.Tensor
    covers_student_response: bool = True  # student_mask equals the whole student response
    mask_kd_by_teacher_accuracy: bool = False
    teacher_logit_map: Optional[Callable] = None
    row_info: Optional[torch.Tensor] = None  # [B, n], read at student_mask rows

    def teacher_to_student(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def student_to_teacher(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def teacher_value(self, teacher) -> torch.Tensor:
        return teacher.hidden


class Aligner(nn.Module):
    """Base class of aligners. Trainable aligners (CMA) hold parameters: they are trained with
    the projector learning rate and checkpointed with the student.

    ``requires_same_tokenizer``: only valid when both models tokenize identically.
    ``projectors``: the projector names this aligner can serve (``None``: any).
    ``maps_vocabulary``: the alignment turns teacher logits into student-vocabulary logits.
    ``pair_features(student_enc, teacher_enc)`` may compute per-example alignment data in the
    data-loader workers (lists of ints, padded with -1 by the collator into ``batch['align']``).
    """

    name: ClassVar[str]
    requires_same_tokenizer: ClassVar[bool] = False
    projectors: ClassVar[Optional[FrozenSet[str]]] = None
    maps_vocabulary: ClassVar[bool] = False
    uses_teacher_states: ClassVar[bool] = False  # as Projector.uses_teacher_states (kdcore.teacher_cache)

    def align(self, student, teacher, extras: Optional[Dict[str, torch.Tensor]] = None) -> Alignment:
        """Alignment for one batch, from both models' :class:`~kdcore.kdspace.ModelSide`."""
        raise NotImplementedError

    def pair_features(self, student_enc: Dict[str, List[int]], teacher_enc: Dict[str, List[int]]) -> Dict[str, List[int]]:
        return {}

    def prepare(self, student_model, teacher_model) -> None:
        """Called once with the loaded models before training (not by ``--validate``)."""

    def check_compatible(self, student_tokenizer, teacher_tokenizer) -> Optional[str]:
        """Return an error message when this aligner cannot serve the pair, else ``None``."""
        return None


def response_start_and_length(mask: torch.Tensor):
    """First response index and response length per row of a ``[B, L]`` response mask
    (the collator puts each response in one contiguous run)."""
    length = mask.sum(-1)
    start = torch.where(length > 0, mask.float().argmax(-1), torch.zeros_like(length))
    return start, length


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[b, i] = x[b, index[b, i]]`` for ``x[B, m, ...]``, ``index[B, n]``; -1 gives zeros."""
    safe = index.clamp(min=0)
    expand = safe.view(*safe.shape, *([1] * (x.dim() - 2))).expand(*safe.shape, *x.shape[2:])
    out = torch.gather(x, 1, expand)
    valid = (index >= 0).view(*index.shape, *([1] * (x.dim() - 2)))
    return out * valid.to(out.dtype)
