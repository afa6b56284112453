"""Plugin discovery and the per-kind registries.

Plugins are modules holding ``@hookimpl`` registration hooks (see :mod:`kdcore.hookspecs`).
They reach the registry in two ways, treated identically afterwards:

* entry points of the ``kdcore`` group, from any installed distribution, unless
  ``KDCORE_DISABLE_PLUGIN_AUTOLOAD=1``. An entry point names a module, or a *package*: then the
  package and every public module inside it (not starting with ``_``, searched recursively)
  are registered, so a new module needs no reinstall (kdcore's built-ins are the two entry
  points ``kdcore_plugins`` and ``kdcore_tasks``);
* modules named by a config's top-level ``plugins:`` list (imported by name).

The kinds (and their hooks and base classes) come from :mod:`kdcore.kinds`.

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
from .kinds import extra_hookspecs, get_kind, kinds

ENTRY_POINT_GROUP = "kdcore"
AUTOLOAD_ENV = "KDCORE_DISABLE_PLUGIN_AUTOLOAD"


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
        for extra in extra_hookspecs():
            self.pm.add_hookspecs(extra)
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
                    modules = [(ep.name, plugin)] + list(_submodules(plugin, ep.name))
                except Exception as exc:  # a broken package must say which one it is
                    raise PluginError(f"entry point '{ep.name} = {ep.value}' of {dist.name} {dist.version} "
                                      f"cannot be imported: {_first_line(exc)}") from exc
                for name, module in modules:
                    if self.pm.is_registered(module):  # two entry points naming one module
                        continue
                    self.pm.register(module, name=name)
                    self._providers[name] = (dist.name, dist.version)
        self._check()
        self._tables = None

    def add_module(self, module_name: str) -> None:
        """Import ``module_name`` and register its hooks as a local plugin (config ``plugins:``)."""
        plugin_name = f"local:{module_name}"
        if self.pm.has_plugin(plugin_name):
            return
        if not module_name or not all(part.isidentifier() for part in module_name.split(".")):
            raise PluginError(f"plugins: {module_name!r} is not a module name")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # ImportError, SyntaxError, or anything the module raises
            raise PluginError(f"plugins: cannot import module '{module_name}': {type(exc).__name__}: {_first_line(exc)}") from None
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
        tables: Dict[str, Dict[str, Entry]] = {}
        for k in kinds():
            kind, base = k.name, k.base_class()
            tables[kind] = {}
            for impl in getattr(self.pm.hook, k.hook).get_hookimpls():
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
        return [k.name for k in kinds()]

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
        get_kind(kind)  # an unknown kind is a PluginError naming the kinds
        return self.tables[kind]

    def manifest(self) -> List[Dict[str, str]]:
        """Every registered component of every kind with its provider (``--list-plugins``, plugins.json)."""
        return [{"kind": e.kind, "name": e.name, "provider": e.provider, "version": e.version, "module": e.module}
                for kind in self.kinds() for e in self.entries(kind)]


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _submodules(package, prefix: str):
    """``(plugin name, module)`` for every public module inside ``package`` (none for a module)."""
    import pkgutil

    if not hasattr(package, "__path__"):
        return
    for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        yield f"{prefix}:{info.name}", importlib.import_module(info.name)


_REGISTRY: Optional[Registry] = None


def get_registry() -> Registry:
    """The process-wide registry, created (and entry points loaded) on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = Registry()
    return _REGISTRY


def refresh_kinds(hookspecs=None) -> None:
    """After :func:`kdcore.kinds.add_kind`: the live registry learns the new kind's hookspecs
    and rebuilds its tables on next use."""
    if _REGISTRY is not None:
        if hookspecs is not None:
            _REGISTRY.pm.add_hookspecs(hookspecs)
            _REGISTRY._check()
        _REGISTRY._tables = None


def reset_registry() -> None:
    """Forget all plugins; the next :func:`get_registry` rediscovers them (tests use this)."""
    global _REGISTRY
    _REGISTRY = None


def load_plugins(module_names) -> None:
    """Register the modules of a config's ``plugins:`` list."""
    for name in module_names or ():
        get_registry().add_module(name)
