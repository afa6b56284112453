"""Plugin discovery and the per-kind registries.

Plugins are modules holding ``@hookimpl`` registration hooks (see :mod:`kdcore.hookspecs`).
They reach the registry in two ways, treated identically afterwards:

* entry points of the ``kdcore`` group, from any installed distribution (the built-ins
  come from kdcore's own setup.cfg), unless ``KDCORE_DISABLE_PLUGIN_AUTOLOAD=1``;
* modules named by a config's top-level ``plugins:`` list (imported by name).

The registries are rebuilt from the hook implementations whenever the plugin set changes,
so each ``register(cls)`` call knows which plugin module (and distribution) made it.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import pluggy

from . import hookspecs
from .errors import PluginError, suggest

ENTRY_POINT_GROUP = "kdcore"
AUTOLOAD_ENV = "KDCORE_DISABLE_PLUGIN_AUTOLOAD"

# kind -> registration hook name. Later kinds (targets, tuners, probes) are added here.
KIND_HOOKS: Dict[str, str] = {
    "criterion": "kdcore_register_criteria",
    "projector": "kdcore_register_projectors",
    "aligner": "kdcore_register_aligners",
    "task": "kdcore_register_tasks",
    "tuner": "kdcore_register_tuners",
}


def _base_class(kind: str):
    from .aligner import Aligner
    from .criterion import Criterion
    from .projector import Projector
    from .task import Task
    from .tuner import Tuner

    return {"criterion": Criterion, "projector": Projector, "aligner": Aligner, "task": Task, "tuner": Tuner}[kind]


@dataclass(frozen=True)
class Entry:
    """One registered component class and where it came from."""

    kind: str
    name: str
    cls: type
    module: str  # the plugin module whose hook registered it
    provider: str  # distribution name, or "local" for config-imported modules
    version: str

    def describe(self) -> str:
        return f"{self.provider} {self.version} ({self.module})".replace(" ()", "")


class Registry:
    """A pluggy PluginManager plus the name -> class tables built from its hooks."""

    def __init__(self, autoload: Optional[bool] = None):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._providers: Dict[str, tuple] = {}  # plugin name -> (provider, version)
        self._tables: Optional[Dict[str, Dict[str, Entry]]] = None
        if autoload is None:
            autoload = os.environ.get(AUTOLOAD_ENV, "") not in ("1", "true", "yes")
        if autoload:
            self._load_entry_points()

    # -- discovery ---------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        from importlib.metadata import distributions

        seen = set()
        for dist in distributions():
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP or (dist.name, ep.name) in seen:
                    continue
                seen.add((dist.name, ep.name))  # a distribution can be listed twice on sys.path
                if self.pm.has_plugin(ep.name) or self.pm.is_blocked(ep.name):
                    continue
                try:
                    plugin = ep.load()
                except Exception as exc:  # a broken package must say which one it is
                    raise PluginError(f"entry point '{ep.name} = {ep.value}' of {dist.name} {dist.version} "
                                      f"cannot be imported: {exc}") from exc
                if self.pm.is_registered(plugin):  # two entry points naming one module
                    continue
                self.pm.register(plugin, name=ep.name)
                self._providers[ep.name] = (dist.name, dist.version)
        self._check()
        self._tables = None

    def add_module(self, module_name: str) -> None:
        """Import ``module_name`` and register its hooks as a local plugin (config ``plugins:``)."""
        plugin_name = f"local:{module_name}"
        if self.pm.has_plugin(plugin_name):
            return
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise PluginError(f"plugins: cannot import module '{module_name}': {exc}") from exc
        if self.pm.is_registered(module):  # already known through an entry point
            return
        self.pm.register(module, name=plugin_name)
        self._providers[plugin_name] = ("local", "")
        self._check()
        self._tables = None

    def _check(self) -> None:
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"invalid plugin {exc.plugin!r}: {exc}") from exc

    # -- tables ------------------------------------------------------------------------
    def _build_tables(self) -> Dict[str, Dict[str, Entry]]:
        tables: Dict[str, Dict[str, Entry]] = {kind: {} for kind in KIND_HOOKS}
        for kind, hook_name in KIND_HOOKS.items():
            base = _base_class(kind)
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                provider, version = self._providers.get(impl.plugin_name, ("local", ""))
                module = getattr(impl.plugin, "__name__", impl.plugin_name)

                def register(cls, _kind=kind, _base=base, _provider=provider, _version=version, _module=module):
                    self._register(tables, _kind, _base, cls, _module, _provider, _version)

                impl.function(register=register)
        return tables

    @staticmethod
    def _register(tables, kind, base, cls, module, provider, version) -> None:
        name = getattr(cls, "name", None)
        if not isinstance(cls, type) or not issubclass(cls, base):
            raise PluginError(f"{module}: register() for kind '{kind}' needs a subclass of {base.__name__}, got {cls!r}")
        if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
            raise PluginError(f"{module}: {cls.__name__}.name must be a snake_case string, got {name!r}")
        entry = Entry(kind, name, cls, module, provider, version)
        if name in tables[kind]:
            first = tables[kind][name]
            raise PluginError(
                f"{kind} '{name}' is registered twice: by {first.describe()} and by {entry.describe()}"
            )
        tables[kind][name] = entry

    @property
    def tables(self) -> Dict[str, Dict[str, Entry]]:
        if self._tables is None:
            self._tables = self._build_tables()
        return self._tables

    def kinds(self) -> List[str]:
        return list(KIND_HOOKS)

    def names(self, kind: str) -> List[str]:
        return sorted(self._table(kind))

    def entries(self, kind: str) -> List[Entry]:
        return [self._table(kind)[n] for n in self.names(kind)]

    def get(self, kind: str, name: str) -> Entry:
        table = self._table(kind)
        if name not in table:
            known = ", ".join(sorted(table)) or "none"
            raise PluginError(f"unknown {kind} '{name}'.{suggest(name, table)} Registered {kind} names: {known}")
        return table[name]

    def _table(self, kind: str) -> Dict[str, Entry]:
        if kind not in KIND_HOOKS:
            raise PluginError(f"unknown plugin kind '{kind}'.{suggest(kind, KIND_HOOKS)} Kinds: {', '.join(KIND_HOOKS)}")
        return self.tables[kind]


_REGISTRY: Optional[Registry] = None


def get_registry() -> Registry:
    """The process-wide registry, created (and entry points loaded) on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = Registry()
    return _REGISTRY


def reset_registry() -> None:
    """Forget all plugins; the next :func:`get_registry` rediscovers them (tests use this)."""
    global _REGISTRY
    _REGISTRY = None


def load_plugins(module_names) -> None:
    """Register the modules of a config's ``plugins:`` list."""
    for name in module_names or ():
        get_registry().add_module(name)
