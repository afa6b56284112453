"""Aligner ``uld``: Universal Logit Distillation's positional pairing (docs/methods.md#uld).

The k-th response position of the student is paired with the k-th response position of the
teacher, for k < min(|response_s|, |response_t|); there is no tokenization-aware alignment.
Use it with projector ``none`` and criterion ``uld`` (L1 between sorted probability vectors,
which compares distributions over different vocabularies). Vectorised on the device: no
per-token host work.
"""

from __future__ import annotations

import torch

from kdcore import Aligner, hookimpl
from kdcore.aligner import Alignment, gather_rows, response_start_and_length


class PositionalAlignment(Alignment):
    covers_student_response = False  # only the first min(|resp_s|, |resp_t|) positions

    def __init__(self, s_to_t, t_to_s):
        self.s_to_t, self.t_to_s = s_to_t, t_to_s
        self.student_mask, self.teacher_mask = s_to_t >= 0, t_to_s >= 0

    def teacher_to_student(self, x):
        return gather_rows(x, self.s_to_t)

    def student_to_teacher(self, x):
        return gather_rows(x, self.t_to_s)


def positional_index(src_mask: torch.Tensor, dst_mask: torch.Tensor) -> torch.Tensor:
    """For each src position, the dst position with the same response rank, or -1: [B, L_src]."""
    s_start, s_len = response_start_and_length(src_mask)
    d_start, d_len = response_start_and_length(dst_mask)
    k = torch.minimum(s_len, d_len)
    pos = torch.arange(src_mask.shape[1], device=src_mask.device)[None, :]
    rank = pos - s_start[:, None]
    valid = src_mask & (rank < k[:, None])
    return torch.where(valid, d_start[:, None] + rank, torch.full_like(rank, -1))


class ULDAligner(Aligner):
    name = "uld"
    projectors = frozenset({"none"})

    def align(self, student, teacher, extras=None) -> Alignment:
        return PositionalAlignment(positional_index(student.mask, teacher.mask),
                                   positional_index(teacher.mask, student.mask))


@hookimpl
def kdcore_register_aligners(register):
    register(ULDAligner)
