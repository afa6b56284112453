"""The objective: one forward pass of student (and frozen teacher) -> summed loss terms.

    loss = (1 − α)·CE + α·(Σ_spaces KD + Σ auxiliary terms)        α = objective.kd_weight

Every term is a *sum* over response tokens; the trainer divides by the token count of the
whole global batch. The student, the projector and the aligner are one ``nn.Module`` (the
unit DDP wraps and checkpoints save); the teacher is held outside it (frozen, never wrapped).
"""

from __future__ import annotations

from typing import Dict, Mapping, NamedTuple, Tuple, TypeVar

import torch
from torch import nn

from .kdspace import Head, ModelSide, cross_entropy_sum, evaluate_space

CE = "ce"
LOSS = "loss"
T = TypeVar("T")


def objective(terms: Mapping[str, T], kd_weight: float, zero=0.0) -> T:
    """``(1 − α)·terms[CE] + α·Σ_{k ≠ CE} terms[k]``: the one place the loss is combined, for the
    summed terms of a micro-batch (tensors, ``zero`` a zero tensor) and for the logged means."""
    kd_total = sum((v for k, v in terms.items() if k != CE), zero)
    return (1.0 - kd_weight) * terms[CE] + kd_weight * kd_total


def with_loss(metrics: Dict[str, float], term_names, kd_weight: float) -> Dict[str, float]:
    """Reduced metrics plus ``loss``, the objective of the means of the loss terms."""
    if CE in metrics:
        metrics[LOSS] = objective({k: v for k, v in metrics.items() if k in term_names}, kd_weight)
    return metrics


class StepOutput(NamedTuple):
    """One micro-batch: the weighted loss sum (with its graph), every term's sum (detached), and
    ratio metrics ``{name: (numerator, denominator)}`` (accuracies as (correct, rows))."""

    loss: torch.Tensor
    terms: Dict[str, torch.Tensor]
    counts: Dict[str, Tuple[torch.Tensor, int]]


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

    @classmethod
    def for_run(cls, parts, objective_cfg, device) -> "DistillModule":
        """The module of a run's components on ``device``; the teacher moves there too and the
        projector and aligner see both loaded models once (``prepare``)."""
        if parts.teacher_model is not None:
            parts.teacher_model.to(device)
            parts.projector.prepare(parts.student_model, parts.teacher_model)
            parts.aligner.prepare(parts.student_model, parts.teacher_model)
        return cls(parts.student_model, parts.projector, parts.aligner, parts.criterion, objective_cfg.kd_weight,
                   objective_cfg.chunk_size, parts.teacher_model).to(device)

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

    def forward(self, batch) -> StepOutput:
        terms, counts = self.terms(batch)
        loss = objective(terms, self.kd_weight, zero=torch.zeros((), device=terms[CE].device))
        return StepOutput(loss, {k: v.detach() for k, v in terms.items()}, counts)
