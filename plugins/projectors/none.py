"""Projector ``none``: each model's own head, one KD space in the shared vocabulary.

Student space rows: response positions of the student, ``z_s = W_s h_s``; teacher rows: the
aligned teacher positions, ``z_t = W_t h_t`` (no grad). The objective's CE shares the pass.
When the two heads differ only by padding columns (e.g. 151,936 vs 152,064), the criterion
compares the first ``min(V_s, V_t)`` columns, which cover the whole shared tokenizer.
"""

from __future__ import annotations

from typing import List, Optional

from kdcore import Projector, hookimpl
from kdcore.kdspace import ModelSide, Space


class NoProjector(Projector):
    name = "none"
    same_vocab = True

    def spaces(self, student: ModelSide, teacher: ModelSide, alignment, criterion) -> List[Space]:
        rows = alignment.student_mask
        labels = student.labels[rows]
        teacher_hidden = alignment.teacher_to_student(teacher.hidden)[rows]
        v_s, v_t = student.head.vocab_size, teacher.head.vocab_size
        return [
            Space(
                name="student",
                student_hidden=student.hidden[rows],
                student_head=student.head,
                teacher_hidden=teacher_hidden,
                teacher_head=teacher.head,
                criterion=criterion,
                labels=labels,
                student_ce=True,
                kd_columns=min(v_s, v_t) if v_s != v_t else None,
            )
        ]

    def check_compatible(self, student_vocab_size: int, teacher_vocab_size: int, same_tokenizer: bool) -> Optional[str]:
        if not same_tokenizer:
            return ("projector 'none' compares the two models' own output distributions, which needs one shared "
                    "tokenizer; for different tokenizers use projector 'dual' (DSKD) with a cross-tokenizer aligner")
        return None


@hookimpl
def kdcore_register_projectors(register):
    register(NoProjector)
