"""Projector ``dual``: Dual-Space KD (DSKD, reference/dskd.md §6–7), both spaces at once.

    loss = (1 − α)·CE + α·(t2s_ce + kd_student + kd_teacher)

with the terms of ``student_space`` and ``teacher_space``. With aligner ``identity`` this is
DSKD for one vocabulary; with aligner ``cma`` it is DSKD-CMA for different tokenizers.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from torch import nn

from kdcore import Projector, hookimpl

from kdcore_plugins.projectors.student_space import pinv_init, student_space
from kdcore_plugins.projectors.teacher_space import build_teacher_criterion, teacher_space


class Dual(Projector):
    name = "dual"

    def __init__(self, student_hidden_size: int, teacher_hidden_size: int, criterion=None,
                 teacher_criterion: Optional[Union[str, Dict[str, Any]]] = None,
                 init: Literal["default", "pinv"] = "default", student_tokenizer=None, teacher_tokenizer=None):
        super().__init__()
        self.t2s = nn.Linear(teacher_hidden_size, student_hidden_size)
        self.s2t = nn.Linear(student_hidden_size, teacher_hidden_size)
        self.teacher_criterion = build_teacher_criterion(teacher_criterion, criterion)
        self.init, self._tokenizers = init, (student_tokenizer, teacher_tokenizer)

    def prepare(self, student_model, teacher_model) -> None:
        if self.init == "pinv":
            s_tok, t_tok = self._tokenizers
            pinv_init(self.t2s, teacher_model, student_model, t_tok, s_tok)
            pinv_init(self.s2t, student_model, teacher_model, s_tok, t_tok)

    def spaces(self, student, teacher, alignment, criterion) -> List:
        return [student_space(self.t2s, student, teacher, alignment, criterion),
                teacher_space(self.s2t, student, teacher, alignment, self.teacher_criterion or criterion)]


@hookimpl
def kdcore_register_projectors(register):
    register(Dual)
