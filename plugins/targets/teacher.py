"""Targets ``teacher``: train on the teacher's pseudo-targets (PTs), Calderon et al. 2023 §1.5.

Before training the teacher decodes K PTs ŷ_{i,0..K−1} for every training prompt x_i (greedy,
beam search returning the K best beams, or K independent samples: ``decoding``), once, into a
seeded, resumable block cache (:mod:`._ptcache`). At step s of epoch e = ⌊s / steps_per_epoch⌋
example i trains on

    y_i = gold response of i   with probability gold_weight (labelled inputs only, a seeded draw
                               per (run seed, step, i), the same on every rank and after resume)
    y_i = ŷ_{i, e mod K}       otherwise                      (view e mod K of §1.5 S6)

re-tokenised by both tokenizers through the task's own encoding, and the run's objective applies
unchanged to (x_i, y_i): ``(1 − α)·CE + α·KD``, α = ``objective.kd_weight``. α = 0 is SeqKD
(Kim & Rush 2016: CE on teacher outputs); α = 1 is the paper's "logits KD + PTs" (word-level KD
teacher-forced on PTs, no CE). ``unlabelled`` names a task whose ``unlabelled_split`` prompts
join the training inputs with PTs only (§1.5 S5); the batch plan then runs over labelled +
unlabelled inputs. The teacher is loaded even when α = 0 (``needs_teacher``).

Metrics (``kdcore_after_step``): ``gen/tokens``, ``gen/seconds`` (the one-time generation is
reported on the first step of the run), ``targets/gold_fraction``, ``targets/pt_index``; the run
summary gets ``gen/tokens_total``, ``gen/seconds_total``, ``gen/tokens_per_s``, also printed.
"""

from __future__ import annotations

from typing import Annotated, Any, Dict, List, Optional

from kdcore import hookimpl
from kdcore.components import spec
from kdcore.schema import INT64_MAX, Range
from kdcore.targets import Targets
from kdcore.task import Example

from ._decoding import GenerationStats, ReportsGeneration, generate_pts, parse_decoding
from ._ptcache import PTCache, prompts_hash
from ._steps import draw, epoch_of, step_indices, with_responses


class TeacherTargets(ReportsGeneration, Targets):
    """Teacher PTs, K per prompt, generated once and cached (see the module docstring)."""

    name = "teacher"
    needs_teacher = True
    new_sequences = True

    def __init__(self, num_targets: Annotated[int, Range(ge=1)] = 1, decoding: Optional[Dict[str, Any]] = None,
                 sample_seed: Annotated[int, Range(ge=0, le=INT64_MAX)] = 1, cache_dir: str = "runs/pt-cache",
                 block_size: Annotated[int, Range(ge=1)] = 64, gold_weight: Annotated[float, Range(ge=0, le=1)] = 0.0,
                 unlabelled: Optional[Dict[str, Any]] = None, unlabelled_split: str = "train", seed: int = 0):
        self.k, self.sample_seed, self.cache_dir, self.block_size = num_targets, sample_seed, cache_dir, block_size
        self.gold_weight, self.seed = gold_weight, seed
        self.decoding = parse_decoding(decoding, num_targets, f"targets '{self.name}'.decoding")
        self.unlabelled = spec("task", unlabelled, where="targets.unlabelled").build() if unlabelled else None
        self.unlabelled_split = unlabelled_split
        self.n_labelled: Optional[int] = None
        self.pts: Optional[List[List[str]]] = None
        self.cache: Optional[PTCache] = None
        self.stats = GenerationStats()
        self.last: Dict[str, float] = {}

    # -- before training: the inputs and the cache ------------------------------------------
    def train_examples(self, examples: List[Example]) -> List[Example]:
        self.n_labelled = len(examples)
        if self.unlabelled is None:
            return examples
        self.unlabelled.check()
        extra = [Example(prompt=e.prompt, response="") for e in self.unlabelled.examples(self.unlabelled_split)]
        return list(examples) + extra

    def cache_key(self, run, prompts: List[str]) -> Dict[str, Any]:
        """Everything the PTs depend on (a change names another cache file)."""
        from kdcore.teacher_cache import teacher_identity, tokenizer_fingerprint

        return {"teacher": teacher_identity(run.config.teacher), "tokenizer": tokenizer_fingerprint(run.teacher_tokenizer),
                "decoding": self.decoding.record(), "generation": self.decoding.settings(run.task).as_dict(),
                "sample_seed": self.sample_seed, "block_size": self.block_size, "prompts": prompts_hash(prompts),
                "n_prompts": len(prompts)}

    @hookimpl
    def kdcore_run_start(self, run):
        """Generate the PTs not cached yet (rank 0; the others wait), then read them all."""
        from kdcore.distributed import barrier

        prompts = [e.prompt for e in run.data.train_set.examples]
        self.cache = PTCache(self.cache_dir, self.cache_key(run, prompts), self.k, self.block_size)
        blocks = -(-len(prompts) // self.block_size)

        def block(b: int, chunk: List[str]) -> List[List[str]]:
            outputs, tokens, seconds = generate_pts(run.teacher_model, run.teacher_tokenizer, chunk, self.decoding,
                                                    run.task, seed=self.sample_seed + b,
                                                    desc=f"teacher pseudo-targets {b + 1}/{blocks}")
            self.stats.add(tokens, seconds)
            return outputs

        if run.is_main:
            with run.timer.section("generation"):
                self.cache.fill(prompts, block)
        barrier(run.dist)
        self.pts = self.cache.read(len(prompts))

    # -- every step ---------------------------------------------------------------------------
    def source_responses(self, run, indices: List[List[int]]) -> List[List[str]]:
        """The PT of every example of the step, per micro-batch: the teacher's, view e mod K."""
        view = epoch_of(run) % self.k
        self.last["targets/pt_index"] = float(view)
        return [[self.pts[i][view] for i in idx] for idx in indices]

    def is_gold(self, run, i: int) -> bool:
        labelled = self.n_labelled is None or i < self.n_labelled
        return labelled and self.gold_weight > 0 and draw(self.seed, "gold", run.step, i) < self.gold_weight

    def step_batches(self, micro_batches, run):
        indices = step_indices(run, micro_batches)
        examples = run.data.train_set.examples
        sources = self.source_responses(run, indices)
        out, gold = [], 0
        for idx, pts in zip(indices, sources):
            keep = [self.is_gold(run, i) for i in idx]
            gold += sum(keep)
            responses = [examples[i].response if g else pt for i, g, pt in zip(idx, keep, pts)]
            out.append(run.data.collate_examples(with_responses(examples, idx, responses)))
        self.last["targets/gold_fraction"] = gold / max(sum(len(idx) for idx in indices), 1)
        return out


@hookimpl
def kdcore_register_targets(register):
    register(TeacherTargets)
