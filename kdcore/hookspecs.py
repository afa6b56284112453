"""Hook specifications: what a plugin may implement, when the engine calls it, with what.

Two families, both implemented with ``@kdcore.hookimpl`` (pluggy project name ``kdcore``):

**Registration hooks**, one per plugin kind (:mod:`kdcore.kinds`). Each is called exactly once
per plugin module when the engine first needs a registry, with a ``register`` callable;
``register(cls)`` takes a subclass of the kind's base class whose class attribute ``name`` is a
snake_case string unique within its kind.

**Lifecycle hooks**, called during a training run on every process (rank). Implement them in
a plugin module (called in every run) or as methods of a component class (called in the runs
that use that component: every built component of every kind is registered for its run).
``run`` is the :class:`kdcore.hooks.RunContext` of the run (config, models, tokenizers,
components, step, device, output directory); hooks may read it and must not replace its
members. Hooks that return a ``dict`` of ``{name: float}`` report metrics: they are logged to
``metrics.jsonl`` and TensorBoard with the record they belong to (the values of rank 0 are
logged; a hook that needs a value over all ranks reduces it itself). Returning ``None`` reports
nothing. A metric name that clashes with one the engine or another hook reports is an error.
"""

from __future__ import annotations

import pluggy

PROJECT = "kdcore"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------------- registration hooks

@hookspec
def kdcore_register_criteria(register):
    """Register distance criteria (subclasses of :class:`kdcore.Criterion`).

    The class defines ``name`` and ``per_token(student_logits[N, V_s], teacher_logits[N, V_t]) -> [N]``.
    """


@hookspec
def kdcore_register_projectors(register):
    """Register space projectors (subclasses of :class:`kdcore.Projector`): hidden states and
    heads of both models -> the KD spaces (``none``, ``student_space``, ``teacher_space``, ``dual``)."""


@hookspec
def kdcore_register_aligners(register):
    """Register token aligners (subclasses of :class:`kdcore.Aligner`): teacher positions <->
    student positions (``identity`` for a shared tokenizer; cross-tokenizer ones otherwise)."""


@hookspec
def kdcore_register_tasks(register):
    """Register tasks (subclasses of :class:`kdcore.Task`): examples (prompt, response) per split."""


@hookspec
def kdcore_register_tuners(register):
    """Register student tuners (subclasses of :class:`kdcore.Tuner`): which student parameters
    train (``full``, ``lora``, ...)."""


@hookspec
def kdcore_register_probes(register):
    """Register circuit probes (subclasses of :class:`kdcore.probe.Probe`): measurements of a
    model's internals (activation patching, circuit ablation, ...) that ``kd-probe`` runs on any
    model and a training run runs at each evaluation (``eval.probes``)."""


@hookspec
def kdcore_register_targets(register):
    """Register target providers (subclasses of :class:`kdcore.targets.Targets`): which
    response sequences each step trains on (``gold``; pseudo-targets from a model)."""


# ------------------------------------------------------------------------- lifecycle hooks

@hookspec
def kdcore_run_start(run):
    """Once per process, after the run is set up (components built, models on their device,
    outputs opened, a checkpoint restored when resuming) and before the first evaluation or
    step. ``run.step`` is 0, or the restored step."""


@hookspec
def kdcore_before_step(run, step, batches):
    """Before the forward passes of an optimizer step. ``step`` is the number of optimizer
    steps done so far (0 for the first); ``batches`` is this rank's list of collated
    micro-batches (``{"student": {...}, "teacher": {...}, ...}`` of tensors, on the CPU), which
    the hook may modify in place."""


@hookspec
def kdcore_after_step(run, step, metrics):
    """After an optimizer step, before it is logged. ``step`` counts the steps done (1 after
    the first); ``metrics`` is the step's record (``loss``, every term, ``lr``, ``grad_norm``,
    ...), read-only. Return ``{name: float}`` to add metrics to the ``train`` record."""


@hookspec
def kdcore_after_eval(run, step, metrics):
    """After an evaluation on the eval split, before it is logged and before checkpoint
    selection. ``metrics`` holds the eval terms (``ce``, ``loss``, ...), read-only. Return
    ``{name: float}`` to add metrics to the ``eval`` record (a probe's logit difference, ...)."""


@hookspec
def kdcore_checkpoint_save(run, step, directory):
    """While checkpoint ``step`` is written, on every rank, into ``directory`` (the temporary
    directory that is renamed into place afterwards, so whatever the hook writes there is part
    of the atomic checkpoint). Rank 0 has written the engine's files already."""


@hookspec
def kdcore_checkpoint_load(run, step, directory):
    """After the engine restored its state from checkpoint ``directory`` (of step ``step``) on
    resume, on every rank: restore what ``kdcore_checkpoint_save`` wrote."""


@hookspec
def kdcore_run_end(run, metrics):
    """Once per process after the last step, the final evaluation and the export of
    ``final/``. ``metrics`` is the last eval record. Return ``{name: float}`` to log a ``summary``
    record."""


LIFECYCLE_HOOKS = ("kdcore_run_start", "kdcore_before_step", "kdcore_after_step", "kdcore_after_eval",
                   "kdcore_checkpoint_save", "kdcore_checkpoint_load", "kdcore_run_end")
