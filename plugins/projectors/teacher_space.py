"""Projector ``teacher_space``: DSKD's teacher-space term (docs/methods.md#dskd-teacher-space).

Student hidden states go through ``P_s2t = Linear(d -> D)``, are carried to the teacher
positions by the aligner, and through the teacher's frozen head; that distribution is
distilled toward the teacher's own:

    h_s2t = align_s2t(P_s2t(h_s))                 [M, D]   rows: aligned teacher response positions
    kd_teacher = Σ Dist_t(W_t h_s2t, W_t h_t)      trains P_s2t and the student (through h_s)
    s2t_acc    = mean(argmax W_t h_s2t == y_t)     logged

``teacher_criterion`` is the divergence of this term (default: the run's criterion; DSKD v1
always used ``fkl``, which ``teacher_criterion: fkl`` reproduces).
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from torch import nn

import kdcore
from kdcore import Projector, hookimpl
from kdcore.kdspace import Accuracy, ModelSide, Rows, Space

from kdcore_plugins.projectors.student_space import pinv_init


def teacher_space(projector: nn.Linear, student: ModelSide, teacher: ModelSide, alignment, criterion) -> Space:
    """The teacher-space :class:`Space` for a student -> teacher projection ``projector``."""
    rows = alignment.teacher_mask
    projected = alignment.student_to_teacher(projector(student.hidden))
    return Space(
        name="teacher",
        student=Rows(projected[rows], teacher.head.detached()),
        teacher=Rows(teacher.hidden[rows], teacher.head),
        criterion=criterion,
        labels=teacher.labels[rows],
        terms=[Accuracy("s2t_acc", "student")],
    )


def build_teacher_criterion(node, default):
    return default if node is None else kdcore.build("criterion", node)


class TeacherSpace(Projector):
    name = "teacher_space"
    uses_teacher_states = True

    def __init__(self, student_hidden_size: int, teacher_hidden_size: int, criterion=None,
                 teacher_criterion: Optional[Union[str, Dict[str, Any]]] = None,
                 init: Literal["default", "pinv"] = "default", student_tokenizer=None, teacher_tokenizer=None):
        super().__init__()
        self.s2t = nn.Linear(student_hidden_size, teacher_hidden_size)
        self.teacher_criterion = build_teacher_criterion(teacher_criterion, criterion)
        self.init, self._tokenizers = init, (student_tokenizer, teacher_tokenizer)

    def prepare(self, student_model, teacher_model) -> None:
        if self.init == "pinv":
            pinv_init(self.s2t, student_model, teacher_model, self._tokenizers[0], self._tokenizers[1])

    def spaces(self, student, teacher, alignment, criterion) -> List[Space]:
        return [teacher_space(self.s2t, student, teacher, alignment, self.teacher_criterion or criterion)]


@hookimpl
def kdcore_register_projectors(register):
    register(TeacherSpace)
