"""The table of plugin kinds: the one place that says which kinds of components exist.

Every other part of the engine is built from :data:`KINDS`: the registry's per-kind tables
(:mod:`kdcore.registry`), config validation and the resolved config (:mod:`kdcore.config`),
assembly (:mod:`kdcore.assemble`), ``kd-train --list-plugins`` and ``plugins.json``. Adding a
kind costs its base class, one :class:`Kind` row (here, or :func:`add_kind` at run time) and
its registration hookspec (:mod:`kdcore.hookspecs`, or any module passed to ``add_kind``).

A kind's components are found in the config at ``config_key`` (a top-level section such as
``criterion``, or a dotted path into a section such as ``student.tuner``); ``default`` is used
when the key is absent; ``many`` kinds hold a list of components. Built components of every
kind take part in the run's lifecycle hooks (:mod:`kdcore.hooks`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional


@dataclass(frozen=True)
class Kind:
    """One plugin kind.

    name: the kind's name (``kdcore.names(name)``, ``kdcore.build(name, node)``, the KIND
      column of ``--list-plugins``).
    base: the base class every registered class must subclass, as ``"module:Class"``
      (imported on first use, so this table imports nothing) or the class itself.
    hook: the registration hookspec, called once per plugin module with ``register``.
    config_key: where a config names this kind's component(s): ``"criterion"`` (a top-level
      key) or ``"section.key"`` (a key inside a section, e.g. ``"student.tuner"``); ``None``
      when configs never name it.
    default: the component node used when the key is absent (``None``: none, or required).
    required: the config must give it (``task``).
    many: the key holds a list of component nodes (``eval.probes``).
    """

    name: str
    base: Any
    hook: str
    config_key: Optional[str] = None
    default: Any = None
    required: bool = False
    many: bool = False

    def base_class(self) -> type:
        if isinstance(self.base, type):
            return self.base
        module, _, attr = self.base.partition(":")
        return getattr(importlib.import_module(module), attr)

    @property
    def section(self) -> Optional[str]:
        """The section a dotted ``config_key`` lives in (``student`` for ``student.tuner``)."""
        return self.config_key.partition(".")[0] if self.config_key and "." in self.config_key else None

    @property
    def key(self) -> Optional[str]:
        """The key inside its section, or the top-level key."""
        return self.config_key.rpartition(".")[2] if self.config_key else None


# In build order: a kind's components may ask for earlier kinds' components by name (a
# projector's ``criterion`` parameter).
KINDS: List[Kind] = [
    Kind("task", "kdcore.task:Task", "kdcore_register_tasks", "task", required=True),
    Kind("tuner", "kdcore.tuner:Tuner", "kdcore_register_tuners", "student.tuner", default="full"),
    Kind("criterion", "kdcore.criterion:Criterion", "kdcore_register_criteria", "criterion", default="fkl"),
    Kind("projector", "kdcore.projector:Projector", "kdcore_register_projectors", "projector", default="none"),
    Kind("aligner", "kdcore.aligner:Aligner", "kdcore_register_aligners", "aligner", default="identity"),
    Kind("probe", "kdcore.probe:Probe", "kdcore_register_probes", "eval.probes", many=True),
    Kind("targets", "kdcore.targets:Targets", "kdcore_register_targets", "targets", default="gold"),
]

_HOOKSPECS: Dict[str, Any] = {}  # kind name -> hookspec module of kinds added at run time


def kinds() -> List[Kind]:
    return list(KINDS)


def kind_names() -> List[str]:
    return [k.name for k in KINDS]


def get_kind(name: str) -> Kind:
    for kind in KINDS:
        if kind.name == name:
            return kind
    from .errors import PluginError, suggest

    names = kind_names()
    raise PluginError(f"unknown plugin kind '{name}'.{suggest(name, names)} Kinds: {', '.join(names)}")


def by_config_key() -> Dict[str, Kind]:
    return {k.config_key: k for k in KINDS if k.config_key}


def add_kind(kind: Kind, hookspecs=None) -> None:
    """Add a kind at run time (a plugin package defining its own kind, or a test).

    ``hookspecs``: a module or class holding the kind's registration hookspec. A registry that
    exists already learns the hookspec and rebuilds its tables on next use (a plugin module may
    call this while it is being imported from a config's ``plugins:`` list).
    """
    from .errors import PluginError
    from .registry import refresh_kinds

    if any(k.name == kind.name for k in KINDS):
        raise PluginError(f"plugin kind '{kind.name}' already exists")
    if kind.config_key and kind.config_key in by_config_key():
        raise PluginError(f"config key '{kind.config_key}' already belongs to kind '{by_config_key()[kind.config_key].name}'")
    KINDS.append(kind)
    if hookspecs is not None:
        _HOOKSPECS[kind.name] = hookspecs
    refresh_kinds(hookspecs)


def remove_kind(name: str) -> None:
    """Undo :func:`add_kind` (tests); the registry is rebuilt from scratch on next use."""
    from .registry import reset_registry

    KINDS[:] = [k for k in KINDS if k.name != name]
    _HOOKSPECS.pop(name, None)
    reset_registry()


def extra_hookspecs() -> List[Any]:
    return list(_HOOKSPECS.values())
