"""Training targets: which response sequences a step trains on (gold, or pseudo-targets).

A :class:`Targets` component sits between the data loader and the forward/backward pass of
every optimizer step. ``gold`` (the default) passes the loader's micro-batches through
unchanged, so a run without a ``targets:`` key is exactly the engine's gold-target training.
Pseudo-target plugins (Calderon et al. 2023, §1.5 of the seed-methods spec) replace the
response part of each micro-batch by a generated sequence ŷ for the same prompt x.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, List


class Targets:
    """Base class of target providers.

    ``step_batches(micro_batches, run) -> micro_batches``: called once per optimizer step,
    before any forward pass, with this rank's micro-batches of the global batch (collated
    dicts with ``student`` / ``teacher`` encodings) and the run's
    :class:`kdcore.hooks.RunContext`. It returns the micro-batches to train on; it must keep
    their layout (the keys the collator produced) so every aligner, projector and criterion
    works unchanged. ``run.data.plan().micro_batches(run.step)`` are the example indices of
    the given micro-batches and ``run.data.collate_examples(examples)`` encodes examples exactly
    as the loader does (both tokenizers, the aligner's pair features). A returned micro-batch
    may carry a ``"terms": {"ce": bool, "kd": bool}`` part to contribute only some loss terms
    (:mod:`kdcore.distill`), and there may be more micro-batches than were given. Like every
    component, a targets plugin reports step metrics (e.g. generation seconds) through the
    lifecycle hooks: a ``@kdcore.hookimpl`` method ``kdcore_after_step(self, run, step, metrics)`` returning ``{name: float}``.
    """

    name: ClassVar[str]
    # Whether the run needs the teacher's weights even when objective.kd_weight is 0 (a plugin
    # that generates with the teacher): the engine then loads it (kdcore.config.Config.uses_teacher).
    needs_teacher: ClassVar[bool] = False
    # Whether step_batches trains on sequences that are not the dataset's (generated ones): a
    # stored teacher (teacher.cache: outputs for the dataset's sequences) cannot serve them.
    new_sequences: ClassVar[bool] = False

    def train_examples(self, examples: List[Any]) -> List[Any]:
        """The training examples the run's batch plan is drawn from, given the task's ``train``
        split (called once, before the plan is made): a plugin may add prompt-only inputs
        whose responses it supplies itself at step time. Default: the split unchanged."""
        return examples

    def step_batches(self, micro_batches: List[Dict[str, Any]], run) -> List[Dict[str, Any]]:
        return micro_batches
