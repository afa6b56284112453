"""Projector ``dual``: Dual-Space KD (DSKD, docs/methods.md#dskd-dual), both spaces at once.

    loss = (1 − α)·CE + α·(t2s_ce + kd_student + kd_teacher)

with the terms of ``student_space`` and ``teacher_space``, which it is built from (their
projections are its ``t2s`` and ``s2t``). With aligner ``identity`` this is DSKD for one
vocabulary; with aligner ``cma`` it is DSKD-CMA for different tokenizers.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from kdcore import Projector, hookimpl

from kdcore_plugins.projectors.student_space import StudentSpace
from kdcore_plugins.projectors.teacher_space import TeacherSpace


class Dual(Projector):
    name = "dual"
    uses_teacher_states = True

    def __init__(self, student_hidden_size: int, teacher_hidden_size: int, criterion=None,
                 teacher_criterion: Optional[Union[str, Dict[str, Any]]] = None,
                 init: Literal["default", "pinv"] = "default", student_tokenizer=None, teacher_tokenizer=None):
        super().__init__()
        sizes = dict(student_hidden_size=student_hidden_size, teacher_hidden_size=teacher_hidden_size, init=init,
                     student_tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer)
        # A tuple, so the two are not submodules: their projections are registered here, under
        # the names a single-space projector uses (checkpoints and parameter groups stay the same).
        self._spaces = (StudentSpace(**sizes), TeacherSpace(criterion=criterion, teacher_criterion=teacher_criterion, **sizes))
        self.t2s, self.s2t = self._spaces[0].t2s, self._spaces[1].s2t

    def prepare(self, student_model, teacher_model) -> None:
        for space in self._spaces:
            space.prepare(student_model, teacher_model)

    def spaces(self, student, teacher, alignment, criterion) -> List:
        return [s for space in self._spaces for s in space.spaces(student, teacher, alignment, criterion)]


@hookimpl
def kdcore_register_projectors(register):
    register(Dual)
