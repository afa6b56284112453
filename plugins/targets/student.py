"""Targets ``student``: on-policy pseudo-targets from the *current* student (GKD-style; the
student-PT arm of Joint-Teaching, seed-methods §1.5 step 2).

At every optimizer step s, each micro-batch j is, with probability λ = ``probability`` (a seeded
draw per (run seed, ``sample_seed``, s, j, rank), reproducible after a resume), replaced by one
response per prompt sampled from the student's weights *as they are at that step* (eval mode, no
grad, training mode restored; ``decoding`` as for ``teacher``, default T = 1, top-p 0.95, the
response length of the task). The other micro-batches keep their gold responses. The responses
are re-tokenised by both tokenizers through the task's encoding and the run's objective
``(1 − α)·CE + α·KD`` applies: with α > 0 the teacher's per-token distribution is distilled on the
student's own prefixes (exposure-bias correction); with α = 0 it is self-training on CE.

Metrics: ``gen/tokens``, ``gen/seconds`` per step, ``targets/student_fraction`` (share of this
step's micro-batches that were generated); run summary: generated tokens/s.
"""

from __future__ import annotations

from typing import Annotated, Any, Dict, List, Optional

from kdcore import hookimpl
from kdcore.schema import INT64_MAX, Range
from kdcore.targets import Targets

from ._decoding import GenerationStats, ReportsGeneration, parse_decoding
from ._steps import check_strategy, draw, int_seed, step_indices, student_pts, with_responses


class StudentTargets(ReportsGeneration, Targets):
    """On-policy student PTs with probability λ per micro-batch (see the module docstring)."""

    name = "student"
    new_sequences = True

    def __init__(self, probability: Annotated[float, Range(ge=0, le=1)] = 0.5, decoding: Optional[Dict[str, Any]] = None,
                 sample_seed: Annotated[int, Range(ge=0, le=INT64_MAX)] = 1, seed: int = 0):
        self.probability, self.sample_seed, self.seed = probability, sample_seed, seed
        self.decoding = parse_decoding(decoding, 1, f"targets '{self.name}'.decoding")
        self.stats = GenerationStats()
        self.last: Dict[str, float] = {}
        self.last_pts: List[Optional[List[str]]] = []  # the step's generated responses per micro-batch (None: gold)

    @hookimpl
    def kdcore_run_start(self, run):
        check_strategy(run, self.name)

    def step_batches(self, micro_batches, run):
        indices = step_indices(run, micro_batches)
        examples = run.data.train_set.examples
        rank = run.dist.rank
        out, self.last_pts = [], []
        for j, (mb, idx) in enumerate(zip(micro_batches, indices)):
            if draw(self.seed, self.sample_seed, "student", run.step, j, rank) >= self.probability:
                out.append(mb)
                self.last_pts.append(None)
                continue
            pts = student_pts(run, [examples[i].prompt for i in idx], self.decoding,
                              int_seed(self.sample_seed, run.step, j, rank), self.stats)
            out.append(run.data.collate_examples(with_responses(examples, idx, pts)))
            self.last_pts.append(pts)
        self.last["targets/student_fraction"] = sum(p is not None for p in self.last_pts) / max(len(out), 1)
        return out


@hookimpl
def kdcore_register_targets(register):
    register(StudentTargets)
