"""Component nodes -> validated specs -> instances (the Python API ``kdcore.build``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping

from .errors import ConfigError
from .registry import Entry, get_registry
from .schema import check_mapping, context_names, fields_of, missing_context


@dataclass
class ComponentSpec:
    """A validated component node: the registry entry and its keyword arguments."""

    kind: str
    entry: Entry
    kwargs: Dict[str, Any]
    where: str

    @property
    def name(self) -> str:
        return self.entry.name

    def config_node(self) -> Dict[str, Any]:
        """The resolved node as it would be written in YAML (defaults filled, no context)."""
        names = context_names()
        return {"name": self.name, **{k: v for k, v in self.kwargs.items() if k not in names}}

    def build(self, **context):
        fields, names = fields_of(self.entry.cls), context_names()
        kwargs = dict(self.kwargs)
        kwargs.update({k: v for k, v in context.items() if k in fields and k in names})
        missing = missing_context(fields, kwargs)
        if missing:
            raise ConfigError(f"{self.where} '{self.name}' needs engine context {', '.join(missing)} to be built")
        return self.entry.cls(**kwargs)


def normalize_node(node, where: str) -> Dict[str, Any]:
    """A bare string is shorthand for ``{name: ...}``."""
    if isinstance(node, str):
        return {"name": node}
    if isinstance(node, Mapping):
        if "name" not in node:
            raise ConfigError(f"{where}: a component mapping needs a 'name' key")
        if not isinstance(node["name"], str):
            raise ConfigError(f"{where}.name: expected str, got {type(node['name']).__name__}")
        return dict(node)
    raise ConfigError(f"{where}: expected a component name or a mapping with 'name', got {type(node).__name__}")


def spec(kind: str, node, where: str | None = None, context: Mapping | None = None) -> ComponentSpec:
    """Validate a component node against its class's constructor signature."""
    where = where or kind
    node = normalize_node(node, where)
    from .errors import PluginError

    try:
        entry = get_registry().get(kind, node["name"])
    except PluginError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    values = {k: v for k, v in node.items() if k != "name"}
    kwargs = check_mapping(fields_of(entry.cls), values, where, context, what=f"{kind} '{entry.name}'")
    return ComponentSpec(kind, entry, kwargs, where)


def build(kind: str, node, **context):
    """Build a component from a config node exactly as a config file would (``kdcore.build``)."""
    return spec(kind, node, context=context).build(**context)


def names(kind: str):
    """Registered names of a kind (``criterion``, ``projector``, ``aligner``, ``task``, ...)."""
    return get_registry().names(kind)
