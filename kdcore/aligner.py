"""Token aligners: which teacher positions (or vocabulary entries) match which student ones."""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import nn


class Alignment:
    """Maps per-position tensors between the teacher's and the student's token sequences.

    ``teacher_to_student(x[B, m, ...]) -> [B, n, ...]`` and the reverse. ``student_mask[B, n]``
    marks student positions that have a teacher partner (and carry a KD term).
    """

    student_mask: torch.Tensor
    teacher_mask: torch.Tensor

    def teacher_to_student(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def student_to_teacher(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Aligner(nn.Module):
    """Base class of aligners. Trainable aligners (CMA) hold parameters: they are trained with
    the projector learning rate and checkpointed with the student.

    ``requires_same_tokenizer``: the aligner is only valid when both models tokenize
    identically; the engine checks this at ``--validate`` time.
    """

    name: ClassVar[str]
    requires_same_tokenizer: ClassVar[bool] = False

    def align(self, batch: dict) -> Alignment:
        """Alignment for one collated batch (``batch['student']``, ``batch['teacher']``)."""
        raise NotImplementedError

    def check_compatible(self, student_tokenizer, teacher_tokenizer) -> Optional[str]:
        """Return an error message when this aligner cannot serve the pair, else ``None``."""
        return None
