"""Step-time pieces shared by the pseudo-target plugins: which examples a step's micro-batches
hold, seeded per-step draws, re-encoding responses, and generation from the current student.

The examples of a step are ``run.data.plan().micro_batches(step)``: the batch plan is a pure
function of the step (:class:`kdcore.data.GlobalBatchPlan`), so these are exactly the indices
the loader collated. Responses are swapped at the :class:`kdcore.task.Example` level and the
micro-batch is encoded again by :meth:`kdcore.data.RunData.collate_examples`, i.e. by the task's
own sequence construction with the student AND the teacher tokenizer (and the aligner's pair
features), so every aligner (identity, cma, mined, uld) sees PTs exactly as it sees gold.
"""

from __future__ import annotations

import hashlib
import random
from fractions import Fraction
from typing import Any, Dict, List, Sequence

import torch

from kdcore.errors import ConfigError
from kdcore.task import Example


def step_indices(run, micro_batches: Sequence[Dict[str, Any]]) -> List[List[int]]:
    """Example indices of this rank's micro-batches at ``run.step`` (checked against the batches)."""
    indices = run.data.plan().micro_batches(run.step)
    if len(indices) != len(micro_batches) or any(len(idx) != int(mb["student"]["input_ids"].shape[0])
                                                for idx, mb in zip(indices, micro_batches)):
        raise RuntimeError("targets: the micro-batches of this step do not match the run's batch plan")
    return indices


def epoch_of(run) -> int:
    return run.step // max(run.data.plan().steps_per_epoch, 1)


def draw(*parts: Any) -> float:
    """A uniform [0, 1) draw that depends only on ``parts`` (the run seed, step, index, ...):
    the same on every rank and after a resume, and independent of the torch/python RNG state."""
    return random.Random(":".join(str(p) for p in parts)).random()


def int_seed(*parts: Any) -> int:
    """A 63-bit generation seed derived from ``parts``."""
    return int.from_bytes(hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()[:8], "big") >> 1


def on_every(step: int, weight: float) -> bool:
    """Deterministic alternation (Joint-Teaching, §1.5): True on the steps where ``⌊(s+1)·w⌋``
    exceeds ``⌊s·w⌋``, i.e. on a fraction ``w`` of the steps, evenly spread (w = 0.5: every second
    step, s = 1, 3, 5, ...; w = 1: every step; w = 0: never). Exact rational arithmetic, so no
    float rounding moves a step."""
    w = Fraction(weight).limit_denominator(10**6)
    return ((step + 1) * w).__floor__() > (step * w).__floor__()


def with_responses(examples: Sequence[Example], indices: Sequence[int], responses: Sequence[str]) -> List[Example]:
    """The step's examples with their responses replaced (references kept for scoring)."""
    return [Example(prompt=examples[i].prompt, response=r, references=list(examples[i].references))
            for i, r in zip(indices, responses)]


def check_strategy(run, name: str) -> None:
    """Student generation at step time runs each rank's own prompts through ``generate``; an
    FSDP-sharded student would need every rank in each of its forwards."""
    if run.config.train.strategy == "fsdp":
        raise ConfigError(f"targets '{name}': generating from the student during training needs train.strategy: ddp "
                          "(an fsdp-sharded student cannot generate rank by rank)")


def student_pts(run, prompts: Sequence[str], decoding, seed: int, stats) -> List[str]:
    """One response per prompt from the *current* student weights (eval mode, no grad; training
    mode restored after), seeded with ``seed``. The global torch RNG is forked, so generating
    does not shift the random stream training uses (dropout, ...)."""
    from ._decoding import generate_pts

    device = run.device
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), run.timer.section("generation"):
        outputs, tokens, seconds = generate_pts(run.student_model, run.student_tokenizer, prompts, decoding, run.task,
                                                seed=seed, desc="student pseudo-targets", progress=False)
    stats.add(tokens, seconds)
    return [o[0] for o in outputs]
