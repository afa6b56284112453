"""Projector ``none``: each model's own head, one KD space (``kd_student``).

Rows: the student positions the aligner pairs with a teacher position. Student side
``z_s = W_s h_s``; teacher side ``z_t = W_t h_t`` at the aligned teacher position (no grad),
mapped into the student vocabulary when the aligner maps vocabularies (MinED). The
objective's CE shares the pass when the rows are the whole student response. When the two
heads differ only by padding columns (e.g. 151,936 vs 152,064), the criterion compares the
first ``min(V_s, V_t)`` columns, which cover the whole shared tokenizer.
"""

from __future__ import annotations

from typing import List, Optional

from kdcore import Projector, hookimpl
from kdcore.kdspace import CrossEntropy, FirstColumns, ModelSide, Rows, Space


class NoProjector(Projector):
    name = "none"

    def spaces(self, student: ModelSide, teacher: ModelSide, alignment, criterion) -> List[Space]:
        rows = alignment.student_mask
        v_s, v_t = student.head.vocab_size, teacher.head.vocab_size
        mapped = alignment.teacher_logit_map is not None
        if criterion.same_vocab and not mapped and v_s != v_t:
            criterion = FirstColumns(criterion, min(v_s, v_t))
        labels = student.labels[rows]
        return [Space(
            name="student",
            student=Rows(student.hidden[rows], student.head),
            teacher=Rows(alignment.teacher_to_student(teacher.hidden)[rows], teacher.head,
                         map_logits=_vocabulary_map(alignment, rows, labels) if mapped else None),
            criterion=criterion,
            labels=labels,
            terms=[CrossEntropy("ce", "student")] if alignment.covers_student_response else [],
        )]

    def check_compatible(self, *, shared_tokenizer: bool, aligner, criterion) -> Optional[str]:
        if shared_tokenizer or aligner.maps_vocabulary or not criterion.same_vocab:
            return None
        return ("projector 'none' compares the two models' own output distributions, which needs one shared "
                "vocabulary: with different tokenizers use projector 'dual' (DSKD) with aligner 'cma', aligner "
                "'mined' (maps the teacher's vocabulary), or criterion 'uld' (compares sorted probabilities)")


def _vocabulary_map(alignment, rows, labels):
    """The alignment's teacher -> student vocabulary map as a per-chunk logits transform."""
    info = alignment.row_info[rows]
    return lambda logits, chunk: alignment.teacher_logit_map(logits, labels[chunk], info[chunk])


@hookimpl
def kdcore_register_projectors(register):
    register(NoProjector)
