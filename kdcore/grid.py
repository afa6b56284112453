"""Ablation grids: a grid file, the kd-train runs it expands to, and each run's state.

A grid file::

    base: ../gpt2/vanilla-kd-fkl.yaml     # relative to this file's directory, or absolute
    axes:                                 # dotted key -> values; the cartesian product, in file order
      criterion.name: [fkl, rkl]
      objective.kd_weight: [0.5, 0.0]
    zip: [[a.key, b.key]]                 # optional: these axes vary together (equal lengths)
    exclude:                              # optional: drop runs matching every pair of one mapping
      - {criterion.name: rkl, objective.kd_weight: 0.0}
    name: "{name}-a{kd_weight}"           # optional: run names (fields: last key component, or
                                          #   the full key with '.' -> '_', e.g. {criterion_name})
    output_root: runs/grids/my-grid       # optional (default runs/grids/<grid file stem>)
    overrides: [train.max_steps=100]      # optional: dotted overrides applied to every run

A run's overrides, applied by :func:`kdcore.config.apply_overrides` (the function kd-train uses),
are in this order: the grid's ``overrides``, the caller's extra ones, the axis values and
``run.output_dir`` (always ``<output_root>/<run name>``). A run is ``finished`` when
``<out>/final/config.json`` exists, ``resume`` when ``<out>/checkpoints`` holds a complete
checkpoint (:func:`kdcore.checkpoint.run_checkpoints`), else ``new``.

    from kdcore.grid import load_grid, expand, validate_runs
    grid = load_grid("configs/grids/tiny-ci.yaml")
    runs = expand(grid, ["train.max_steps=10"])   # [Run(name="fkl-a0.5", overrides=[...]), ...]

Launching is :mod:`kdcore.grid_launch`, tabulating results :mod:`kdcore.grid_report`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import yaml

from .checkpoint import run_checkpoints
from .config import apply_overrides, parse_override, read_yaml, validate
from .errors import ConfigError, KdcoreError, suggest

GRID_KEYS = ["base", "axes", "zip", "exclude", "name", "output_root", "overrides"]
RESERVED_AXES = ("run.output_dir",)
FINAL_MARKER = Path("final") / "config.json"
NAME_CHARS = re.compile(r"[^A-Za-z0-9._+=,-]")


class GridError(ConfigError):
    """A grid file, or one of the runs it expands to, is invalid."""


@dataclass
class Grid:
    path: Path
    base: Path
    axes: Dict[str, List[Any]]
    zip_groups: List[List[str]] = field(default_factory=list)
    exclude: List[Dict[str, Any]] = field(default_factory=list)
    name: Optional[str] = None
    output_root: Path = Path("runs/grids")
    overrides: List[str] = field(default_factory=list)

    @property
    def labels(self) -> Dict[str, str]:
        return axis_labels(list(self.axes))


@dataclass
class Run:
    index: int
    name: str
    values: Dict[str, Any]          # axis key -> value, in axis order
    overrides: List[str]            # everything but train.resume
    output_dir: Path
    resolved: Optional[Dict[str, Any]] = None

    @property
    def id(self) -> str:
        """Stable across grid edits that keep this run's axis values."""
        text = json.dumps(self.values, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# The grid file
# --------------------------------------------------------------------------------------------
def load_grid(path, output_root=None, check_base: bool = True) -> Grid:
    """Read and check a grid file (its structure and the base path; runs are not validated).
    ``check_base=False`` accepts a base config that does not exist (expansion only);
    ``output_root`` replaces the file's."""
    p = Path(path)
    data = read_yaml(p, what="grid", top_level="with 'base' and 'axes'", error=GridError)
    for key in data:
        if key not in GRID_KEYS:
            raise GridError(f"{p}: unknown key '{key}'.{suggest(key, GRID_KEYS)} Accepted keys: {', '.join(GRID_KEYS)}")
    base = _base(p, data.get("base"), check_base)
    axes = _axes(p, data.get("axes"))
    zip_groups = _zip_groups(p, data.get("zip") or [], axes)
    exclude = _exclude(p, data.get("exclude") or [], axes)
    name = data.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise GridError(f"{p}: 'name' must be a format string such as '{{name}}-T{{temperature}}'")
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise GridError(f"{p}: 'overrides' must be a list of 'key.sub=value' strings")
    for o in overrides:
        parse_override(o)
    root = _output_root(p, output_root if output_root is not None else data.get("output_root"))
    return Grid(path=p, base=base, axes=axes, zip_groups=zip_groups, exclude=exclude, name=name,
                output_root=root, overrides=list(overrides))


def _base(p: Path, base: Any, check_base: bool) -> Path:
    if not isinstance(base, str) or not base:
        raise GridError(f"{p}: 'base' must be the path of a kd-train config (relative to the grid file)")
    base_path = Path(base) if Path(base).is_absolute() else Path(os.path.normpath(p.parent / base))
    if check_base and not base_path.is_file():
        raise GridError(f"{p}: base config not found: {base_path}")
    return base_path


def _axes(p: Path, axes: Any) -> Dict[str, List[Any]]:
    if not isinstance(axes, dict) or not axes:
        raise GridError(f"{p}: 'axes' must be a non-empty mapping of dotted key -> list of values")
    for key, values in axes.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise GridError(f"{p}: axes: '{key}' is not a dotted config key like criterion.name")
        if key in RESERVED_AXES:
            raise GridError(f"{p}: axes: '{key}' is set by the grid (<output_root>/<run name>); use output_root")
        if not isinstance(values, list) or not values:
            raise GridError(f"{p}: axes.{key}: expected a non-empty list of values")
    return dict(axes)


def _zip_groups(p: Path, zips: Any, axes: Dict[str, List[Any]]) -> List[List[str]]:
    """Each group: known axes, in no other group, with value lists of one length."""
    if not isinstance(zips, list) or not all(isinstance(g, list) and g for g in zips):
        raise GridError(f"{p}: 'zip' must be a list of groups, each a list of axis keys")
    seen: Dict[str, int] = {}
    for i, group in enumerate(zips):
        for key in group:
            if key not in axes:
                raise GridError(f"{p}: zip group {i + 1}: '{key}' is not an axis.{suggest(key, axes)}")
            if key in seen:
                raise GridError(f"{p}: zip: axis '{key}' appears in more than one place (groups {seen[key] + 1} and {i + 1})")
            seen[key] = i
        lengths = {key: len(axes[key]) for key in group}
        if len(set(lengths.values())) > 1:
            raise GridError(f"{p}: zip group {i + 1}: its axes must have equal lengths, got "
                            + ", ".join(f"{k}: {n}" for k, n in lengths.items()))
    return [list(g) for g in zips]


def _exclude(p: Path, exclude: Any, axes: Dict[str, List[Any]]) -> List[Dict[str, Any]]:
    """Each rule maps axes to values on those axes (a value not on its axis is a typo)."""
    if not isinstance(exclude, list):
        raise GridError(f"{p}: 'exclude' must be a list of mappings {{dotted key: value}}")
    for i, rule in enumerate(exclude):
        if not isinstance(rule, dict) or not rule:
            raise GridError(f"{p}: exclude item {i + 1}: expected a non-empty mapping {{dotted key: value}}")
        for key, value in rule.items():
            if key not in axes:
                raise GridError(f"{p}: exclude item {i + 1}: '{key}' is not an axis.{suggest(key, axes)}")
            if not any(same_value(value, v) for v in axes[key]):
                raise GridError(f"{p}: exclude item {i + 1}: {key}={value!r} is not one of the axis values {axes[key]!r}")
    return list(exclude)


def _output_root(p: Path, root: Any) -> Path:
    if root is None:
        return Path("runs") / "grids" / p.stem
    if not isinstance(root, (str, Path)) or not str(root):
        raise GridError(f"{p}: 'output_root' must be a directory path")
    return Path(root)


def same_value(a: Any, b: Any) -> bool:
    """Equal and of one type, except that ints and floats compare by value (never bools)."""
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return type(a) is type(b) and a == b or numbers and a == b


def axis_labels(keys: Sequence[str]) -> Dict[str, str]:
    """Short label (the last dotted component) per axis, or the full key with '_' when ambiguous."""
    lasts = [k.split(".")[-1] for k in keys]
    return {k: (last if lasts.count(last) == 1 else k.replace(".", "_")) for k, last in zip(keys, lasts)}


def plain(value: Any) -> str:
    """A value as text in names and tables: strings as they are, lists/dicts as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


# --------------------------------------------------------------------------------------------
# Expansion
# --------------------------------------------------------------------------------------------
def format_value(value: Any) -> str:
    """A value as one-line YAML that ``kdcore.config.parse_override`` reads back as the same value."""
    candidates = [value] if isinstance(value, str) else []
    candidates.append(json.dumps(value))
    candidates.append(yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip().removesuffix("...").strip())
    for text in candidates:
        if not text or "\n" in text:
            continue
        try:
            _, parsed = parse_override(f"value={text}")
        except (ConfigError, ValueError):
            continue
        if parsed == value and type(parsed) is type(value):
            return text
    raise GridError(f"value {value!r} cannot be written as a one-line override")


class _NameFields(dict):
    """The fields of a name template: the last key component of each axis where it is unique,
    and every full key with '.' -> '_'. A missing field raises a GridError naming what exists."""

    def __init__(self, template: str, values: Dict[str, Any]):
        super().__init__()
        self.template = template
        self.ambiguous: Dict[str, List[str]] = {}
        labels = axis_labels(list(values))
        for key, value in values.items():
            last = key.split(".")[-1]
            if labels[key] == last:
                self[last] = value
            else:
                self.ambiguous.setdefault(last, []).append(key.replace(".", "_"))
            self[key.replace(".", "_")] = value

    def __missing__(self, key):
        if key in self.ambiguous:
            raise GridError(f"name template {self.template!r}: field {{{key}}} is ambiguous; use one of "
                            + ", ".join(f"{{{f}}}" for f in self.ambiguous[key]))
        raise GridError(f"name template {self.template!r}: unknown field {{{key}}}.{suggest(key, list(self))} "
                        f"Fields: {', '.join(self)}")


def render_name(template: Optional[str], values: Dict[str, Any]) -> str:
    """A run's directory name: the template filled from ``values`` (default: ``label-value``
    pairs joined by '_'), characters other than letters, digits and ``._+=,-`` made '_'."""
    if template is None:
        labels = axis_labels(list(values))
        text = "_".join(f"{labels[k]}-{plain(v)}" for k, v in values.items())
    else:
        try:
            text = template.format_map(_NameFields(template, values))
        except GridError:
            raise
        except (ValueError, IndexError, KeyError, AttributeError, TypeError) as exc:
            raise GridError(f"name template {template!r}: {exc}") from None
    text = NAME_CHARS.sub("_", text)
    if text in ("", ".", ".."):
        raise GridError(f"name template {template!r} gives the run name {text!r}, which is not a directory name")
    return text


def combinations(grid: Grid) -> Iterator[Dict[str, Any]]:
    """Axis values of every run before exclusion, in order: a zip group is one factor at the
    place of its first key, and the last factor varies fastest."""
    keys = list(grid.axes)
    group_of = {k: tuple(g) for g in grid.zip_groups for k in g}
    factors: List[tuple] = []
    for k in keys:
        g = group_of.get(k, (k,))
        if g not in factors:
            factors.append(g)
    choices = [[dict(zip(g, vals)) for vals in zip(*(grid.axes[k] for k in g))] for g in factors]
    for combo in itertools.product(*choices):
        merged = {k: v for part in combo for k, v in part.items()}
        yield {k: merged[k] for k in keys}


def expand(grid: Grid, extra_overrides: Sequence[str] = ()) -> List[Run]:
    """The runs of a grid, deterministically (:func:`combinations` minus the excluded ones),
    each with its name, overrides and output directory. No validation of the configs."""
    for o in extra_overrides:
        parse_override(o)
    runs: List[Run] = []
    for values in combinations(grid):
        if any(all(same_value(values[k], v) for k, v in rule.items()) for rule in grid.exclude):
            continue
        name = render_name(grid.name, values)
        out = grid.output_root / name
        overrides = [*grid.overrides, *extra_overrides, *(f"{k}={format_value(v)}" for k, v in values.items()),
                     f"run.output_dir={format_value(str(out))}"]
        runs.append(Run(index=len(runs), name=name, values=values, overrides=overrides, output_dir=out))
    if not runs:
        raise GridError(f"{grid.path}: every run is excluded; the grid is empty")
    _check_unique_names(grid, runs)
    return runs


def _check_unique_names(grid: Grid, runs: List[Run]) -> None:
    by_name: Dict[str, List[Run]] = {}
    for r in runs:
        by_name.setdefault(r.name, []).append(r)
    for name, same in by_name.items():
        if len(same) > 1:
            shown = " and ".join(json.dumps(r.values, default=str) for r in same[:3])
            raise GridError(f"{grid.path}: the name template {grid.name!r} gives {len(same)} runs the name '{name}' "
                            f"({shown}); add the axes that differ to 'name'")


# --------------------------------------------------------------------------------------------
# Validation and run state
# --------------------------------------------------------------------------------------------
def validate_runs(grid: Grid, runs: List[Run], check_models: bool = True) -> None:
    """``kd-train --validate`` for every run (no weights); the first invalid run raises, named.
    Sets each run's ``resolved`` config."""
    raw = read_yaml(grid.base)
    for run in runs:
        try:
            cfg = validate(apply_overrides(raw, run.overrides), source=str(grid.base))
            if check_models:
                from .assemble import validate_models  # loads model configs: only when asked

                validate_models(cfg)
        except KdcoreError as exc:
            raise GridError(f"run '{run.name}' is invalid: {exc}") from None
        run.resolved = cfg.resolved


def run_state(run: Run) -> str:
    """``finished`` (final/config.json), ``resume`` (a complete checkpoint, the same test as
    kd-train's refusal to overwrite one) or ``new``."""
    if (run.output_dir / FINAL_MARKER).is_file():
        return "finished"
    return "resume" if run_checkpoints(run.output_dir) else "new"
