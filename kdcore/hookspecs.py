"""Hook specifications: the registration hooks every plugin module may implement.

Each hook is called exactly once per plugin module, when the engine first needs a registry,
with a ``register`` callable. ``register(cls)`` takes a class whose class attribute ``name``
is a snake_case string unique within its kind.
"""

from __future__ import annotations

import pluggy

PROJECT = "kdcore"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kdcore_register_criteria(register):
    """Register distance criteria (subclasses of :class:`kdcore.Criterion`).

    Called once at registry build time. ``register(cls)`` for each criterion class; the class
    must define ``name`` and ``per_token(student_logits[N, V_s], teacher_logits[N, V_t]) -> [N]``.
    """


@hookspec
def kdcore_register_projectors(register):
    """Register space projectors (subclasses of :class:`kdcore.Projector`).

    Called once at registry build time. A projector turns hidden states and heads of both
    models into the KD spaces (``none``, ``student_space``, ``teacher_space``, ``dual``).
    """


@hookspec
def kdcore_register_aligners(register):
    """Register token aligners (subclasses of :class:`kdcore.Aligner`).

    Called once at registry build time. An aligner maps teacher positions to student
    positions and back (``identity`` for a shared tokenizer; cross-tokenizer ones otherwise).
    """


@hookspec
def kdcore_register_tasks(register):
    """Register tasks (subclasses of :class:`kdcore.Task`).

    Called once at registry build time. A task yields examples (prompt, response) per split.
    """


@hookspec
def kdcore_register_tuners(register):
    """Register student tuners (subclasses of :class:`kdcore.tuner.Tuner`).

    Called once at registry build time. A tuner decides which student parameters train
    (``full``, ``lora``, ...).
    """
