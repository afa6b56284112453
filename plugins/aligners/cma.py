"""Aligner ``cma``: DSKD's cross-model attention (docs/methods.md#cma).

Each position is indexed by its (input token, next token) pair embedded in its own model's
embedding table (detached). A learned query projection maps student pairs into the teacher's
normalised pair space and attends over the teacher's response positions:

    I_s = [E_s(x_s); E_s(y_s)]  [B, n, 2d]      I_t = [E_t(x_t); E_t(y_t)]  [B, m, 2D]
    Q = P_query(I_s)  [B, n, 2D]                K = Norm(I_t)
    S = Q Kᵀ / √(2D) − 1e5 · (1 − M_s ⊗ M_t)    [B, n, m]  (fp32; response ↔ response only)
    A_t2s = softmax_m(S)   A_s2t = softmax_n(Sᵀ)

``teacher_to_student(x) = A_t2s x`` and ``student_to_teacher(x) = A_s2t x``, computed in fp32
(the attention weights are never rounded to the autocast dtype) and cast to ``x``'s dtype, as
the reference does; the teacher value projected into student space is
``Norm(h_t) + Norm(E_t(y_t))``. ``Norm(X) = X / std(X)``, one scalar per tensor, with the std
taken over

* ``norm: response`` (default): the response rows only, so it does not depend on how much
  prompt and padding a batch holds;
* ``norm: padded``: every element of the batch tensor, prompt and padding rows included (masked
  positions embed id 0), the formula of the DSKD code (docs/methods.md#cma). The reference pads
  every sequence to 512 tokens; kdcore pads to the longest sequence of the micro-batch, so the
  two agree exactly only on batches of equal padded length.

Student-space KD is restricted to positions where the projected teacher predicts the gold token
(``mask_kd_by_teacher_accuracy``), so the choice of ``norm`` moves ``kd_student`` through that
gate as well as through the values. Embeddings come from ``get_input_embeddings()``, so any
family works (GPT-2 teachers too).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from kdcore import Aligner, hookimpl
from kdcore.aligner import Alignment


def masked_std_normalize(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x / std(x[mask])`` with one scalar std over all elements of the masked rows."""
    return _divide_by_std(x, x[mask])


def padded_std_normalize(x: torch.Tensor) -> torch.Tensor:
    """``x / std(x)`` with one scalar std over every element of ``x`` [B, L, h] (the reference)."""
    return _divide_by_std(x, x)


def _divide_by_std(x: torch.Tensor, over: torch.Tensor) -> torch.Tensor:
    std = over.float().std() if over.numel() > 1 else x.new_tensor(1.0, dtype=torch.float32)
    return x / std.clamp_min(1e-6).to(x.dtype)


def attend(attn: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``attn @ x`` ([B, q, k] x [B, k, h] -> [B, q, h]) in fp32 even under autocast, cast to ``x``'s dtype."""
    with torch.autocast(x.device.type, enabled=False):
        return torch.bmm(attn.float(), x.float()).to(x.dtype)


def pair_embeddings(side) -> torch.Tensor:
    """``[E(x); E(y)]`` with masked positions looked up as id 0, detached: [B, L, 2h]."""
    mask = side.mask
    x = torch.where(mask, side.input_ids, torch.zeros_like(side.input_ids))
    y = torch.where(mask, side.labels, torch.zeros_like(side.labels))
    with torch.no_grad():
        return torch.cat([side.embeddings(x), side.embeddings(y)], dim=-1).detach()


class CMAAlignment(Alignment):
    covers_student_response = True

    def __init__(self, attn_t2s, attn_s2t, student_mask, teacher_mask, teacher_value, mask_kd: bool):
        self.attn_t2s, self.attn_s2t = attn_t2s, attn_s2t
        self.student_mask, self.teacher_mask = student_mask, teacher_mask
        self._teacher_value, self.mask_kd_by_teacher_accuracy = teacher_value, mask_kd

    def teacher_to_student(self, x):
        return attend(self.attn_t2s, x)

    def student_to_teacher(self, x):
        return attend(self.attn_s2t, x)

    def teacher_value(self, teacher):
        return self._teacher_value


class CrossModelAttention(Aligner):
    name = "cma"
    uses_teacher_states = True
    projectors = frozenset({"student_space", "teacher_space", "dual"})

    def __init__(self, student_hidden_size: int, teacher_hidden_size: int, mask_kd_by_teacher_accuracy: bool = True,
                 norm: Literal["response", "padded"] = "response", student_model_config=None, teacher_model_config=None):
        super().__init__()
        d_s = _embedding_size(student_model_config, student_hidden_size)
        d_t = _embedding_size(teacher_model_config, teacher_hidden_size)
        self.query = nn.Linear(2 * d_s, 2 * d_t)
        self.mask_kd_by_teacher_accuracy, self.norm = mask_kd_by_teacher_accuracy, norm

    def normalize(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``Norm(x)`` over the response rows (``norm: response``) or the whole tensor (``padded``)."""
        return masked_std_normalize(x, mask) if self.norm == "response" else padded_std_normalize(x)

    def align(self, student, teacher, extras=None) -> Alignment:
        m_s, m_t = student.mask, teacher.mask
        i_s, i_t = pair_embeddings(student), pair_embeddings(teacher)
        with torch.autocast(i_s.device.type, enabled=False):
            q = self.query(i_s.float())
            k = self.normalize(i_t.float(), m_t)
            scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(k.shape[-1])
            pair = m_s[:, :, None] & m_t[:, None, :]
            scores = scores.masked_fill(~pair, -1e5)
            attn_t2s = scores.softmax(-1)
            attn_s2t = scores.transpose(1, 2).softmax(-1)
        y_t = torch.where(m_t, teacher.labels, torch.zeros_like(teacher.labels))
        with torch.no_grad():
            next_emb = teacher.embeddings(y_t)
        value = self.normalize(teacher.hidden, m_t) + self.normalize(next_emb.to(teacher.hidden.dtype), m_t)
        return CMAAlignment(attn_t2s, attn_s2t, m_s, m_t, value, self.mask_kd_by_teacher_accuracy)


def _embedding_size(model_config, hidden_size: int) -> int:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return int(getattr(text, "embedding_size", None) or hidden_size)


@hookimpl
def kdcore_register_aligners(register):
    register(CrossModelAttention)
