"""The objective: one forward pass of student (and frozen teacher) -> summed loss terms.

    loss = (1 − α)·CE + α·(Σ_spaces KD + Σ auxiliary terms)        α = objective.kd_weight

Every term is a *sum* over response tokens; the trainer divides by the token count of the
whole global batch. The student, the projector and the aligner are one ``nn.Module`` (the
unit DDP wraps and checkpoints save); the teacher is held outside it (frozen, never wrapped).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from .kdspace import Head, ModelSide, cross_entropy_sum, evaluate_space

CE = "ce"


def backbone(model):
    """The decoder stack of an HF causal LM (through a PEFT wrapper if any): returns hidden states
    without the head, so no full-sequence logits are ever materialised."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.base_model


def last_hidden(model, side: Dict[str, torch.Tensor]) -> torch.Tensor:
    out = backbone(model)(input_ids=side["input_ids"], attention_mask=side["attention_mask"], use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


class DistillModule(nn.Module):
    """Student + projector + aligner, computing the loss terms of one micro-batch."""

    def __init__(self, student, projector, aligner, criterion, kd_weight: float, chunk_size=None, teacher=None):
        super().__init__()
        self.student, self.projector, self.aligner = student, projector, aligner
        self.criterion, self.kd_weight, self.chunk_size = criterion, kd_weight, chunk_size
        self._teacher = [teacher]  # a list so it is not registered as a submodule (no DDP, no checkpoint)

    @property
    def teacher(self):
        return self._teacher[0]

    def side(self, model, batch_side, hidden) -> ModelSide:
        return ModelSide(hidden=hidden, head=Head.of(model), input_ids=batch_side["input_ids"],
                         labels=batch_side["labels"], attention_mask=batch_side["attention_mask"],
                         embeddings=model.get_input_embeddings())

    def terms(self, batch) -> Tuple[Dict[str, torch.Tensor], Dict[str, Tuple[torch.Tensor, int]]]:
        """Every loss term of a micro-batch as a sum with its graph, plus accuracy counts."""
        s_batch = batch["student"]
        h_s = last_hidden(self.student, s_batch)
        student = self.side(self.student, s_batch, h_s)
        terms: Dict[str, torch.Tensor] = {}
        counts: Dict[str, Tuple[torch.Tensor, int]] = {}
        if self.kd_weight > 0 and self.teacher is not None:
            with torch.no_grad():
                h_t = last_hidden(self.teacher, batch["teacher"])
            teacher = self.side(self.teacher, batch["teacher"], h_t)
            teacher.head = teacher.head.detached()
            alignment = self.aligner.align(student, teacher, batch.get("align"))
            for space in self.projector.spaces(student, teacher, alignment, self.criterion):
                losses, accs = evaluate_space(space, self.chunk_size)
                for key, value in losses.items():
                    terms[key] = terms[key] + value if key in terms else value
                counts.update(accs)
        if CE not in terms:
            rows = student.mask
            terms[CE] = cross_entropy_sum(h_s[rows], student.head, student.labels[rows], self.chunk_size)
        return terms, counts

    def forward(self, batch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, Tuple[torch.Tensor, int]]]:
        """Returns (weighted loss sum with grad, detached term sums, accuracy counts)."""
        terms, counts = self.terms(batch)
        kd_total = sum((v for k, v in terms.items() if k != CE), torch.zeros((), device=terms[CE].device))
        loss = (1.0 - self.kd_weight) * terms[CE] + self.kd_weight * kd_total
        return loss, {k: v.detach() for k, v in terms.items()}, counts
