"""Aligner ``identity``: student and teacher share a tokenizer, so position i matches position i.

Only the response positions (labels != -100) carry KD terms. A different tokenizer is refused
at validation, naming the cross-tokenizer aligners.
"""

from __future__ import annotations

from typing import Optional

import torch

from kdcore import Aligner, hookimpl
from kdcore.aligner import Alignment
from kdcore.models import same_tokenizer

CROSS_TOKENIZER_ALIGNERS = "'cma' (DSKD-CMA), 'mined' (minimum edit distance) or 'uld'"


class IdentityAlignment(Alignment):
    def __init__(self, student_mask: torch.Tensor, teacher_mask: torch.Tensor):
        self.student_mask, self.teacher_mask = student_mask, teacher_mask

    def teacher_to_student(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def student_to_teacher(self, x: torch.Tensor) -> torch.Tensor:
        return x


class IdentityAligner(Aligner):
    name = "identity"
    requires_same_tokenizer = True

    def align(self, student, teacher, extras=None) -> Alignment:
        if student.labels.shape != teacher.labels.shape:
            raise ValueError("aligner 'identity': student and teacher batches differ; the tokenizers are not the same")
        return IdentityAlignment(student.mask, teacher.mask)

    def check_compatible(self, student_tokenizer, teacher_tokenizer) -> Optional[str]:
        if not same_tokenizer(student_tokenizer, teacher_tokenizer):
            return ("aligner 'identity' needs the teacher and the student to share one tokenizer, and theirs differ; "
                    f"use a cross-tokenizer aligner: {CROSS_TOKENIZER_ALIGNERS}")
        return None


@hookimpl
def kdcore_register_aligners(register):
    register(IdentityAligner)
