"""The objective: one forward pass of student (and frozen teacher) -> summed loss terms.

    loss = (1 − α)·CE + α·(Σ_spaces KD + Σ auxiliary terms)        α = objective.kd_weight

Every term is a *sum* over response tokens; the trainer divides by the token count of the
whole global batch. A micro-batch may restrict which terms it contributes with an optional part
``batch["terms"] = {"ce": bool, "kd": bool}`` (both true when absent): Joint-Teaching's gold
micro-batches give CE only and its pseudo-target micro-batches KD only, so one step's loss is
``[(1 − α)·Σ_gold CE + α·Σ_PT KD] / N_global`` with the same α. The student, the projector and
the aligner are one ``nn.Module`` (the unit DDP wraps and checkpoints save); the teacher is held
outside it (frozen, never wrapped).
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Tuple, TypeVar

import torch
from torch import nn

from .kdspace import Head, ModelSide, cross_entropy_flops, cross_entropy_sum, evaluate_space, space_flops
from .telemetry import NullTimer, backbone_flops, backbone_shape

CE = "ce"
LOSS = "loss"
TERMS = "terms"  # optional batch part: {"ce": bool, "kd": bool}, the terms a micro-batch contributes
T = TypeVar("T")


def objective(terms: Mapping[str, T], kd_weight: float, zero=0.0) -> T:
    """``(1 − α)·terms[CE] + α·Σ_{k ≠ CE} terms[k]``: the one place the loss is combined, for the
    summed terms of a micro-batch (tensors, ``zero`` a zero tensor) and for the logged means."""
    kd_total = sum((v for k, v in terms.items() if k != CE), zero)
    return (1.0 - kd_weight) * terms.get(CE, zero) + kd_weight * kd_total


def term_weight(name: str, kd_weight: float) -> float:
    """A term's weight in :func:`objective`: ``1 − α`` for CE, ``α`` for the others."""
    return (1.0 - kd_weight) if name == CE else kd_weight


def _without_ce(name: str, kd_weight: float) -> float:
    return 0.0 if name == CE else term_weight(name, kd_weight)


def with_loss(metrics: Dict[str, float], term_names, kd_weight: float) -> Dict[str, float]:
    """Reduced metrics plus ``loss``, the objective of the means of the loss terms."""
    if CE in metrics:
        metrics[LOSS] = objective({k: v for k, v in metrics.items() if k in term_names}, kd_weight)
    return metrics


def move(batch, device):
    """Copy a collated batch (``{part: {name: tensor}}``) to ``device``, keeping shared parts shared
    (plain values, such as the flags of a ``terms`` part, pass as they are)."""
    moved = {}
    for part, tensors in batch.items():
        same = next((moved[p] for p in moved if batch[p] is tensors), None)
        moved[part] = same if same is not None else {
            k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}
    return moved


def forward_into(model, batch, tokens: int, sums, device, autocast_dtype=None) -> torch.Tensor:
    """One micro-batch through ``model`` (a DistillModule, possibly DDP-wrapped) under autocast;
    its terms (normalised by its ``tokens``) and ratios join ``sums`` (a MetricSums). Returns
    the weighted loss sum with its graph."""
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(move(batch, device))
    sums.add_terms(out.terms, tokens)
    sums.add_ratios(out.counts)
    return out.loss


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
    """Student + projector + aligner, computing the loss terms of one micro-batch.

    ``timer`` (a :class:`kdcore.telemetry.Timer`) receives the time of the student forward, the
    teacher forward and the KD loss; ``last_flops`` holds the model FLOPs of the last call
    (forward + backward when gradients are enabled), for MFU.
    """

    def __init__(self, student, projector, aligner, criterion, kd_weight: float, chunk_size=None, teacher=None):
        super().__init__()
        self.student, self.projector, self.aligner = student, projector, aligner
        self.criterion, self.kd_weight, self.chunk_size = criterion, kd_weight, chunk_size
        self._teacher = [teacher]  # a list so it is not registered as a submodule (no DDP, no checkpoint)
        self.teacher_cache = None  # a TeacherCache replaces the teacher forward (kdcore.teacher_cache)
        self.timer, self.last_flops = NullTimer(), 0.0
        self.fused = True  # gradients in the forward pass (kdcore.fused); False: checkpointed autograd
        self._shapes = {}

    @classmethod
    def for_run(cls, parts, objective_cfg, device) -> "DistillModule":
        """The module of a run's components on ``device``; the teacher moves there too and the
        projector and aligner see both loaded models once (``prepare``)."""
        teacher = parts.teacher_model
        if teacher is None and parts.teacher_cache is not None and parts.teacher_cache.uses_states:
            teacher = parts.teacher_cache.stand_in  # the cached head and embeddings (kdcore.teacher_cache)
        if teacher is not None:
            teacher.to(device)
            parts.projector.prepare(parts.student_model, teacher)
            parts.aligner.prepare(parts.student_model, teacher)
        module = cls(parts.student_model, parts.projector, parts.aligner, parts.criterion, objective_cfg.kd_weight,
                     objective_cfg.chunk_size, parts.teacher_model).to(device)
        module.fused = objective_cfg.fused
        module.teacher_cache = parts.teacher_cache
        return module

    @property
    def teacher(self):
        return self._teacher[0]

    def side(self, model, batch_side, hidden) -> ModelSide:
        return ModelSide(hidden=hidden, head=Head.of(model), input_ids=batch_side["input_ids"],
                         labels=batch_side["labels"], attention_mask=batch_side["attention_mask"],
                         embeddings=model.get_input_embeddings())

    def _shape(self, model):
        if id(model) not in self._shapes:
            self._shapes[id(model)] = backbone_shape(model)
        return self._shapes[id(model)]

    def terms(self, batch, weights: Optional[Callable[[str], float]] = None, kd: bool = True, ce: bool = True
              ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Tuple[torch.Tensor, int]]]:
        """Every loss term of a micro-batch as a sum with its graph, plus accuracy counts.

        ``weights``: the objective's term weight of a name, when the terms will only be combined by
        :func:`objective` (one combined gradient per space); without them every term can be
        differentiated on its own. ``kd=False``: no teacher forward and no KD space (CE only);
        ``ce=False``: no CE term (a CE a space computes on the way is dropped, and its weight
        must then be 0)."""
        s_batch, training = batch["student"], torch.is_grad_enabled()
        with self.timer.section("student_forward"):
            h_s = last_hidden(self.student, s_batch)
        student = self.side(self.student, s_batch, h_s)
        flops = backbone_flops(self._shape(self.student), s_batch["attention_mask"], training)
        terms: Dict[str, torch.Tensor] = {}
        counts: Dict[str, Tuple[torch.Tensor, int]] = {}
        if kd and self.kd_weight > 0 and (self.teacher is not None or self.teacher_cache is not None):
            if self.teacher_cache is None:
                with self.timer.section("teacher_forward"), torch.no_grad():
                    h_t = last_hidden(self.teacher, batch["teacher"])
                flops += backbone_flops(self._shape(self.teacher), batch["teacher"]["attention_mask"], training=False)
                teacher = self.side(self.teacher, batch["teacher"], h_t)
                teacher.head = teacher.head.detached()
            with self.timer.section("kd_loss"):
                if self.teacher_cache is not None:  # stored outputs instead of a forward (kdcore.teacher_cache)
                    spaces = self.teacher_cache.spaces(student, batch, self.aligner, self.criterion, self.projector)
                else:
                    spaces = self.projector.spaces(student, teacher, self.aligner.align(student, teacher, batch.get("align")),
                                                   self.criterion)
                for space in spaces:
                    losses, accs = evaluate_space(space, self.chunk_size, weights, self.fused)
                    flops += space_flops(space, training)
                    for key, value in losses.items():
                        terms[key] = terms[key] + value if key in terms else value
                    counts.update(accs)
        if not ce:
            terms.pop(CE, None)
        elif CE not in terms:
            rows = student.mask
            with self.timer.section("kd_loss"):
                terms[CE] = cross_entropy_sum(h_s[rows], student.head, student.labels[rows], self.chunk_size)
            flops += cross_entropy_flops(int(rows.sum()), student.head, training)
        self.last_flops = flops
        return terms, counts

    def forward(self, batch) -> StepOutput:
        use = batch.get(TERMS) or {}
        kd, ce = bool(use.get("kd", True)), bool(use.get(CE, True))
        weight = functools.partial(term_weight, kd_weight=self.kd_weight)
        if not ce:  # a CE computed inside a space (shared pass) then gets no gradient
            weight = functools.partial(_without_ce, kd_weight=self.kd_weight)
        terms, counts = self.terms(batch, weights=weight, kd=kd, ce=ce)
        device = next(iter(terms.values())).device if terms else batch["student"]["input_ids"].device
        loss = objective(terms, self.kd_weight, zero=torch.zeros((), device=device))
        return StepOutput(loss, {k: v.detach() for k, v in terms.items()}, counts)
