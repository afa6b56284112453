"""Targets ``joint``: Joint-Teaching (Calderon et al. 2023, seed-methods §1.5 S8) — word-level KD
on pseudo-targets of both the teacher and the current student, plus CE on the gold responses.

Per optimizer step s (w = ``student_weight``):

1. the PT source: the student on the steps where ``⌊(s+1)·w⌋ > ⌊s·w⌋`` (a fraction w of the
   steps, deterministic alternation by step index: w = 0.5 every second step, w = 1 "only student",
   w = 0 "only teacher"), else the stored teacher PTs, view e mod K of epoch e (as ``teacher``);
2. student PTs: one sample per prompt from the current weights (``student_decoding``, default
   T = 1, top-p 0.95), no grad;
3. the step trains on the PT micro-batches with the KD terms only and on the loader's gold
   micro-batches (labelled inputs) with CE only, so with α = ``objective.kd_weight``

       L_JT(s) = [ (1 − α)·Σ_{gold tokens} CE + α·Σ_{PT tokens} KD(teacher ‖ student) ] / (N_gold + N_PT)

   over the whole global batch (the engine's token normalisation). α = 1 is the paper's pure
   logits KD on PTs (no gold micro-batches are run then); α must be > 0.

Unlabelled inputs (``unlabelled``) take part through their PTs only. All ``teacher`` options
(``num_targets``, ``decoding``, cache, ``sample_seed``) apply to the teacher PTs. A step runs
twice the micro-batches of a gold step when α < 1 (the gold and the PT sequences).

Metrics: ``targets/student_step`` (1 on student-PT steps), ``targets/pt_index``, ``gen/*``.
"""

from __future__ import annotations

from typing import Annotated, Any, Dict, List, Optional

from kdcore import hookimpl
from kdcore.distill import TERMS
from kdcore.errors import ConfigError
from kdcore.schema import INT64_MAX, Range

from ._decoding import parse_decoding
from ._steps import check_strategy, int_seed, on_every, step_indices, student_pts, with_responses
from .teacher import TeacherTargets

PT_TERMS = {"ce": False, "kd": True}
GOLD_TERMS = {"ce": True, "kd": False}


class JointTargets(TeacherTargets):
    """Joint-Teaching: teacher and student PTs under KD, gold under CE (see the module docstring)."""

    name = "joint"

    def __init__(self, student_weight: Annotated[float, Range(ge=0, le=1)] = 0.5,
                 student_decoding: Optional[Dict[str, Any]] = None, num_targets: Annotated[int, Range(ge=1)] = 1,
                 decoding: Optional[Dict[str, Any]] = None, sample_seed: Annotated[int, Range(ge=0, le=INT64_MAX)] = 1,
                 cache_dir: str = "runs/pt-cache", block_size: Annotated[int, Range(ge=1)] = 64,
                 unlabelled: Optional[Dict[str, Any]] = None, unlabelled_split: str = "train", seed: int = 0):
        super().__init__(num_targets=num_targets, decoding=decoding, sample_seed=sample_seed, cache_dir=cache_dir,
                         block_size=block_size, gold_weight=0.0, unlabelled=unlabelled,
                         unlabelled_split=unlabelled_split, seed=seed)
        self.student_weight = student_weight
        self.student_decoding = parse_decoding(student_decoding, 1, f"targets '{self.name}'.student_decoding")

    @hookimpl
    def kdcore_run_start(self, run):
        if run.config.objective.kd_weight <= 0:
            raise ConfigError("targets 'joint': Joint-Teaching distils on pseudo-targets, so objective.kd_weight must be "
                              "> 0 (CE on teacher PTs alone is SeqKD: targets: teacher with kd_weight: 0)")
        if self.student_weight > 0:
            check_strategy(run, self.name)
        if self.student_weight < 1:  # teacher PTs are used on some steps: generate / read them
            super().kdcore_run_start(run)

    def student_step(self, step: int) -> bool:
        return on_every(step, self.student_weight)

    def source_responses(self, run, indices: List[List[int]]) -> List[List[str]]:
        if not self.student_step(run.step):
            return super().source_responses(run, indices)
        examples = run.data.train_set.examples
        return [student_pts(run, [examples[i].prompt for i in idx], self.student_decoding,
                            int_seed(self.sample_seed, "joint", run.step, j, run.dist.rank), self.stats)
                for j, idx in enumerate(indices)]

    def step_batches(self, micro_batches, run):
        indices = step_indices(run, micro_batches)
        examples = run.data.train_set.examples
        self.last = {"targets/student_step": float(self.student_step(run.step))}
        pts = self.source_responses(run, indices)
        pt_batches = [run.data.collate_examples(with_responses(examples, idx, r)) for idx, r in zip(indices, pts)]
        if run.config.objective.kd_weight >= 1:  # CE has weight 0: the paper's pure logits KD on PTs
            return pt_batches
        labelled = self.n_labelled if self.n_labelled is not None else len(examples)
        gold = []
        for mb, idx in zip(micro_batches, indices):
            if all(i < labelled for i in idx):
                gold.append({**mb, TERMS: dict(GOLD_TERMS)})  # the loader's own tensors
            elif any(i < labelled for i in idx):
                gold.append({**run.data.collate_examples([examples[i] for i in idx if i < labelled]),
                             TERMS: dict(GOLD_TERMS)})
        return [{**b, TERMS: dict(PT_TERMS)} for b in pt_batches] + gold


@hookimpl
def kdcore_register_targets(register):
    register(JointTargets)
