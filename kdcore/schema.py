"""Constructor signatures as config schemas.

A component's ``__init__`` signature *is* its schema: every keyword parameter is a config
field, its annotation the accepted type and its default the default value. Parameters whose
names are in :data:`CONTEXT_NAMES` are not config fields: the engine fills them from what it
knows (model sizes, tokenizers, ...). Config sections use dataclasses the same way.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping

from .errors import ConfigError, suggest

# Names the engine passes to any component parameter that asks for them.
CONTEXT_NAMES = frozenset(
    {
        "student_tokenizer",
        "teacher_tokenizer",
        "student_hidden_size",
        "teacher_hidden_size",
        "student_vocab_size",
        "teacher_vocab_size",
        "student_model_config",
        "teacher_model_config",
        "criterion",
        "seed",
    }
)

_MISSING = object()


def context_names() -> frozenset:
    """:data:`CONTEXT_NAMES` plus every plugin kind's name: a component may ask for the
    component of an earlier kind (a projector's ``criterion``) by naming the kind."""
    from .kinds import kind_names

    return CONTEXT_NAMES | frozenset(kind_names())


@dataclass(frozen=True)
class Field:
    name: str
    annotation: Any
    default: Any = _MISSING

    @property
    def required(self) -> bool:
        return self.default is _MISSING


def fields_of(obj) -> Dict[str, Field]:
    """Fields of a dataclass, or keyword parameters of a class's ``__init__``."""
    if dataclasses.is_dataclass(obj):
        hints = typing.get_type_hints(obj)
        out = {}
        for f in dataclasses.fields(obj):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            else:
                default = _MISSING
            out[f.name] = Field(f.name, hints.get(f.name, Any), default)
        return out
    init = obj.__init__
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # unresolvable annotations: accept any value
        hints = {}
    out = {}
    for p in list(inspect.signature(init).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = _MISSING if p.default is inspect.Parameter.empty else p.default
        out[p.name] = Field(p.name, hints.get(p.name, Any), default)
    return out


def type_name(annotation) -> str:
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        return " or ".join(type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def check_value(value, annotation, where: str):
    """Return ``value`` converted to ``annotation`` (int -> float, str -> Path) or raise.

    Strict on purpose: YAML ``"1e-3"`` (a string) is not a float and ``1`` is not a bool.
    """
    if annotation is Any or annotation is inspect.Parameter.empty:
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:
        for arg in args:
            try:
                return check_value(value, arg, where)
            except ConfigError:
                continue
        _fail(value, annotation, where)
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(f"{where}: {value!r} is not allowed; expected {type_name(annotation)}.{suggest(value, [str(a) for a in args])}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            _fail(value, annotation, where)
        item = args[0] if args else Any
        return [check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            _fail(value, annotation, where)
        return dict(value)
    if annotation is type(None):
        if value is None:
            return None
        _fail(value, annotation, where)
    if annotation in _SCALARS:
        accepts, convert = _SCALARS[annotation]
        if accepts(value):
            return convert(value)
        _fail(value, annotation, where)
    if annotation in (list, dict):
        if isinstance(value, annotation):
            return value
        _fail(value, annotation, where)
    if isinstance(annotation, type) and not isinstance(value, annotation):
        _fail(value, annotation, where)
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# annotation -> (accepts(value), convert(value)); bools are not ints and ints become floats.
_SCALARS = {
    bool: (lambda v: isinstance(v, bool), lambda v: v),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), lambda v: v),
    float: (_is_number, float),
    str: (lambda v: isinstance(v, str), lambda v: v),
    Path: (lambda v: isinstance(v, (str, Path)), Path),
}


def _fail(value, annotation, where):
    shown = repr(value) if len(repr(value)) < 60 else repr(value)[:57] + "..."
    raise ConfigError(f"{where}: expected {type_name(annotation)}, got {type(value).__name__} {shown}")


def check_mapping(fields: Dict[str, Field], values: Mapping, where: str, context: Mapping | None = None,
                  what: str = "", engine_keys=None) -> Dict[str, Any]:
    """Validate ``values`` against ``fields``; fill defaults and context. Returns kwargs.

    Context parameters missing from ``context`` are left out (the caller cannot construct
    the component yet, but every config value has been checked).
    """
    context = context or {}
    engine_keys = context_names() if engine_keys is None else engine_keys
    config_fields = [n for n in fields if n not in engine_keys]
    accepted = ", ".join(config_fields) or "none"
    out: Dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"{where}: unknown key '{key}'{(' for ' + what) if what else ''}.{suggest(key, config_fields)} "
                f"Accepted keys: {accepted}"
            )
        if key in engine_keys:
            raise ConfigError(f"{where}.{key}: set by the engine from the models, not by the config")
        out[key] = check_value(value, fields[key].annotation, f"{where}.{key}")
    for name, field in fields.items():
        if name in out:
            continue
        if name in engine_keys:
            if name in context:
                out[name] = context[name]
            elif not field.required:
                out[name] = field.default
            continue
        if field.required:
            raise ConfigError(f"{where}: missing required key '{name}'{(' for ' + what) if what else ''}. Accepted keys: {accepted}")
        out[name] = field.default
    return out


def check_section(cls, values: Mapping, where: str):
    """Validate a config section (a dataclass) and return the instance."""
    return cls(**check_mapping(fields_of(cls), values, where, engine_keys=frozenset()))


def missing_context(fields: Dict[str, Field], kwargs: Mapping) -> list:
    """Context parameters a constructor needs that ``kwargs`` does not have yet."""
    names = context_names()
    return [n for n, f in fields.items() if n in names and f.required and n not in kwargs]
