"""Projector ``student_space``: DSKD's student-space term (docs/methods.md#dskd-student-space).

Teacher values (the last hidden state, or what the aligner supplies, e.g. CMA's normalised
hidden + next-token embedding) go through ``P_t2s = Linear(D -> d)``, are carried to the
student positions by the aligner, and through the *student's* head with its weight detached:

    h_t2s = align_t2s(P_t2s(v_t))                [N, d]   rows: aligned student response positions
    z_t2s = h_t2s · stopgrad(W_s)ᵀ                [N, V_s]
    t2s_ce     = Σ CE(z_t2s, y_s)                 trains P_t2s (and a trainable aligner)
    kd_student = Σ Dist(z_s, stopgrad(z_t2s))     trains the student
    t2s_acc    = mean(argmax z_t2s == y_s)        logged; with CMA it also masks kd_student

``init: pinv`` starts ``P_t2s`` at ``pinv(W_s) W_t`` over the shared token strings (DSKDv2), so
the projected teacher already reproduces the teacher's logits; the default is PyTorch's.
"""

from __future__ import annotations

from typing import List, Literal

import torch
from torch import nn

from kdcore import Projector, hookimpl
from kdcore.kdspace import Accuracy, CrossEntropy, Head, ModelSide, Rows, Space
from kdcore.vocab import exact_overlap, pinv_projection


def pinv_init(linear: nn.Linear, src_model, dst_model, src_tokenizer, dst_tokenizer) -> None:
    """Set ``linear`` (src hidden -> dst hidden) so that dst_head(linear(h)) ≈ src_head(h) on
    the tokens both vocabularies share; bias zero."""
    dst_ids, src_ids = exact_overlap(dst_tokenizer, src_tokenizer)
    if len(src_ids) == 0:
        raise ValueError("pinv init: the two vocabularies share no token strings")
    w_src = Head.of(src_model).weight.detach()[src_ids]
    w_dst = Head.of(dst_model).weight.detach()[dst_ids]
    with torch.no_grad():
        linear.weight.copy_(pinv_projection(w_src, w_dst).to(linear.weight.dtype))
        if linear.bias is not None:
            linear.bias.zero_()


def student_space(projector: nn.Linear, student: ModelSide, teacher: ModelSide, alignment, criterion) -> Space:
    """The student-space :class:`Space` for a teacher -> student projection ``projector``."""
    rows = alignment.student_mask
    projected = alignment.teacher_to_student(projector(alignment.teacher_value(teacher)))
    terms = [CrossEntropy("ce", "student")] if alignment.covers_student_response else []
    terms += [CrossEntropy("t2s_ce", "teacher"), Accuracy("t2s_acc", "teacher", gate=alignment.mask_kd_by_teacher_accuracy)]
    return Space(
        name="student",
        student=Rows(student.hidden[rows], student.head),
        teacher=Rows(projected[rows], student.head.detached()),
        criterion=criterion,
        labels=student.labels[rows],
        terms=terms,
    )


class StudentSpace(Projector):
    name = "student_space"
    uses_teacher_states = True

    def __init__(self, student_hidden_size: int, teacher_hidden_size: int, init: Literal["default", "pinv"] = "default",
                 student_tokenizer=None, teacher_tokenizer=None):
        super().__init__()
        self.t2s = nn.Linear(teacher_hidden_size, student_hidden_size)
        self.init, self._tokenizers = init, (student_tokenizer, teacher_tokenizer)

    def prepare(self, student_model, teacher_model) -> None:
        if self.init == "pinv":
            pinv_init(self.t2s, teacher_model, student_model, self._tokenizers[1], self._tokenizers[0])

    def spaces(self, student, teacher, alignment, criterion) -> List[Space]:
        return [student_space(self.t2s, student, teacher, alignment, criterion)]


@hookimpl
def kdcore_register_projectors(register):
    register(StudentSpace)
