"""Lifecycle hooks of a training run (the hookspecs and their contract: :mod:`kdcore.hookspecs`).

A run calls its hooks through :class:`RunHooks`, which adds the run's own components (every
built component of every kind whose class implements a lifecycle hook) to the process-wide
plugin manager for the duration of the run, next to the plugin modules that implement hooks
for every run. Hooks receive a :class:`RunContext`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from .hookspecs import LIFECYCLE_HOOKS, PROJECT
from .metrics import merge
from .registry import get_registry


class RunContext:
    """What a hook may read about the run: the config, the components, both models and
    tokenizers, the device and process, the output directory and the current step.

    ``student_model`` is the trained model (the tuner's, not wrapped by DDP); ``teacher_model``
    is ``None`` for SFT. ``components`` maps each kind to its built component(s). ``data`` is the
    run's :class:`kdcore.data.RunData` (``data.plan().micro_batches(step)`` are the example indices
    of a step's micro-batches); ``timer`` the run's time split (a ``generation`` section is
    reported apart from training time).
    """

    def __init__(self, trainer):
        self._trainer = trainer

    config = property(lambda self: self._trainer.cfg)
    components = property(lambda self: self._trainer.parts.by_kind)
    student_model = property(lambda self: self._trainer.parts.student_model)
    student_tokenizer = property(lambda self: self._trainer.parts.student_tokenizer)
    teacher_model = property(lambda self: self._trainer.parts.teacher_model)
    teacher_tokenizer = property(lambda self: self._trainer.parts.teacher_tokenizer)
    device = property(lambda self: self._trainer.device)
    dist = property(lambda self: self._trainer.dist)
    is_main = property(lambda self: self._trainer.dist.is_main)
    step = property(lambda self: self._trainer.step)
    total_steps = property(lambda self: self._trainer.total_steps)
    output_dir = property(lambda self: Path(self._trainer.out))
    task = property(lambda self: self._trainer.parts.by_kind["task"])
    data = property(lambda self: self._trainer.data)  # kdcore.data.RunData: train set, batch plan, collator
    timer = property(lambda self: self._trainer.timer)  # kdcore.telemetry.Timer: the run's time split


def implements_hooks(obj: Any) -> bool:
    """Whether ``obj``'s class has a method marked ``@kdcore.hookimpl`` for a lifecycle hook."""
    cls = type(obj)
    return any(getattr(getattr(cls, name, None), f"{PROJECT}_impl", None) is not None for name in LIFECYCLE_HOOKS)


class RunHooks:
    """Calls the lifecycle hooks of the run ``run`` (passed to every hook); ``components`` are
    registered until :meth:`close`."""

    def __init__(self, run: RunContext, components: Iterable[Any] = ()):
        self.run, self.pm = run, get_registry().pm
        self._mine: List[Any] = []
        for obj in components:
            if implements_hooks(obj) and not self.pm.is_registered(obj):
                self.pm.register(obj, name=f"run:{type(obj).__name__}:{id(obj)}")
                self._mine.append(obj)

    def call(self, hook: str, **kwargs) -> Dict[str, float]:
        """Call ``hook`` on every implementation; returns the metrics they reported, merged."""
        metrics: Dict[str, float] = {}
        for result in getattr(self.pm.hook, hook)(run=self.run, **kwargs):
            if result is not None:
                merge(metrics, result, hook)
        return metrics

    def report(self, hook: str, record: Dict[str, float], **kwargs) -> Dict[str, float]:
        """Call ``hook`` with a read-only copy of ``record`` as ``metrics`` and add the metrics
        the hooks return to ``record``."""
        return merge(record, self.call(hook, metrics=dict(record), **kwargs), hook)

    def close(self) -> None:
        for obj in self._mine:
            self.pm.unregister(obj)
        self._mine.clear()

    def __enter__(self) -> "RunHooks":
        return self

    def __exit__(self, *exc: Optional[BaseException]) -> None:
        self.close()
