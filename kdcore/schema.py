"""Constructor signatures as config schemas.

A component's ``__init__`` signature *is* its schema: every keyword parameter is a config
field, its annotation the accepted type and its default the default value. Parameters whose
names are in :data:`CONTEXT_NAMES` are not config fields: the engine fills them from what it
knows (model sizes, tokenizers, ...). Config sections use dataclasses the same way.

Numeric fields carry their domain in the annotation: ``Annotated[float, Range(gt=0)]`` (a
learning rate), ``Optional[Annotated[int, Range(ge=1)]]`` (a chunk size or null),
``List[Annotated[float, Range(ge=0, lt=1)]]`` (Adam betas). Every float must be finite and every
int must fit in 64 bits, with or without a range; a value outside is a :class:`ConfigError`
naming the key and the range.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

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
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class RangeError(ConfigError):
    """A value of the right type outside its field's range (reported even inside a union)."""


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric config field: ``Annotated[float, Range(gt=0)]``.

    ``ge``/``gt`` are the lower bound (inclusive/exclusive), ``le``/``lt`` the upper one; any may
    be omitted. ``Range(ge=0, lt=1)`` is [0, 1).
    """

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None

    def contains(self, value) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        low = (f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}") if (
            self.ge is not None or self.gt is not None) else None
        high = (f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})") if (
            self.le is not None or self.lt is not None) else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f">= {_num(self.ge)}" if self.ge is not None else f"> {_num(self.gt)}"
        if high:
            return f"<= {_num(self.le)}" if self.le is not None else f"< {_num(self.lt)}"
        return "any number"

    def check(self, value, where: str):
        if not self.contains(value):
            raise RangeError(f"{where}: must be {self.describe()}, got {_shown(value)}")
        return value


def _num(bound) -> str:
    if bound == INT64_MAX:
        return "2^63 - 1"
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


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
        hints = typing.get_type_hints(obj, include_extras=True)
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
        hints = typing.get_type_hints(init, include_extras=True)
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
    if origin is typing.Annotated:  # the range is reported when the type is right
        return type_name(typing.get_args(annotation)[0])
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
    if origin is typing.Annotated:
        value = check_value(value, args[0], where)
        for meta in annotation.__metadata__:
            if isinstance(meta, Range):
                meta.check(value, where)
        return value
    if origin is typing.Union:
        out_of_range = None
        for arg in args:
            try:
                return check_value(value, arg, where)
            except RangeError as exc:  # the right type, the wrong value: that is the message
                out_of_range = out_of_range or exc
            except ConfigError:
                continue
        if out_of_range is not None:
            raise out_of_range
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
            return _in_machine_range(convert(value), annotation, where)
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


def _to_float(value):
    """``float(value)``; an int too large for a float stays an int (rejected as not finite)."""
    try:
        return float(value)
    except OverflowError:
        return value


def _in_machine_range(value, annotation, where: str):
    """Floats must be finite (nan, inf and ints beyond 1e308 mean nothing in a config) and ints
    must fit in 64 bits (torch, numpy and the seeds need that)."""
    if annotation is float and not (isinstance(value, float) and math.isfinite(value)):
        raise RangeError(f"{where}: must be a finite number, got {_shown(value)}")
    if annotation is int and not INT64_MIN <= value <= INT64_MAX:
        raise RangeError(f"{where}: must be a 64-bit integer (within [-2^63, 2^63 - 1]), got {_shown(value)}")
    return value


def _shown(value) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's str() digit limit
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) < 60 else text[:57] + "..."


# annotation -> (accepts(value), convert(value)); bools are not ints and ints become floats.
_SCALARS = {
    bool: (lambda v: isinstance(v, bool), lambda v: v),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), lambda v: v),
    float: (_is_number, _to_float),
    str: (lambda v: isinstance(v, str), lambda v: v),
    Path: (lambda v: isinstance(v, (str, Path)), Path),
}


def _fail(value, annotation, where):
    raise ConfigError(f"{where}: expected {type_name(annotation)}, got {type(value).__name__} {_shown(value)}")


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
