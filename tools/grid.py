#!/usr/bin/env python
"""Ablation grids: expand a grid file into kd-train runs, validate them all, then run them.

    python tools/grid.py GRID.yaml --dry-run                 # validate, print the table of runs
    python tools/grid.py GRID.yaml --local                   # run them one after another
    python tools/grid.py GRID.yaml --parallel N              # N at a time (one GPU each, or N CPU processes)
    python tools/grid.py GRID.yaml --emit-commands [--nproc-per-node K]   # one torchrun line per run
    python tools/grid.py GRID.yaml --report [--metric eval_ce]           # CSV, Markdown, PNG, TB hparams
    ... [--set key.sub=value ...] [--output-root DIR]

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

Overrides are applied in this order by ``kdcore.config.apply_overrides`` (the function kd-train
uses): the grid's ``overrides``, the ``--set`` ones, the axis values, ``run.output_dir`` (always
``<output_root>/<run name>``), and ``train.resume=true`` for a run that is resumed.

Every run is validated like ``kd-train --validate`` before anything starts; an invalid run fails
the whole grid (exit status 2) and names the run. A run is finished when ``<out>/final/config.json``
exists (it is skipped) and interrupted when ``<out>/checkpoints/step_*`` exists (it is resumed).
Each launched run gets ``<out>/config.yaml`` (its resolved config), ``<out>/grid.log`` (its output)
and one line in ``<output_root>/manifest.jsonl``. Exit status: 0 when every run succeeded, 1 when
some failed, 2 for bad input, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import hashlib
import io
import itertools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from kdcore.config import apply_overrides, dump, load_yaml, parse_override, read_yaml, validate
from kdcore.console import run_command
from kdcore.errors import ConfigError, KdcoreError, suggest

GRID_KEYS = ["base", "axes", "zip", "exclude", "name", "output_root", "overrides"]
RESERVED_AXES = ("run.output_dir",)
FINAL_MARKER = Path("final") / "config.json"
CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step_\d+$")
DEFAULT_EVAL_RESULTS = "eval/results.json"
NAME_CHARS = re.compile(r"[^A-Za-z0-9._+=,-]")


class GridError(ConfigError):
    """A grid file, or one of the runs it expands to, is invalid."""


# --------------------------------------------------------------------------------------------
# The grid file
# --------------------------------------------------------------------------------------------
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


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
        raise GridError(f"{where}: '{key}' is not a dotted config key like criterion.name")
    return key


def load_grid(path, output_root=None, check_base: bool = True) -> Grid:
    """Read and check a grid file (its structure and the base path; runs are not validated).
    ``check_base=False`` accepts a base config that does not exist (expansion only)."""
    p = Path(path)
    data = read_yaml(p, what="grid", top_level="with 'base' and 'axes'", error=GridError)
    for key in data:
        if key not in GRID_KEYS:
            raise GridError(f"{p}: unknown key '{key}'.{suggest(key, GRID_KEYS)} Accepted keys: {', '.join(GRID_KEYS)}")

    base = data.get("base")
    if not isinstance(base, str) or not base:
        raise GridError(f"{p}: 'base' must be the path of a kd-train config (relative to the grid file)")
    base_path = Path(base) if Path(base).is_absolute() else Path(os.path.normpath(p.parent / base))
    if check_base and not base_path.is_file():
        raise GridError(f"{p}: base config not found: {base_path}")

    axes = data.get("axes")
    if not isinstance(axes, dict) or not axes:
        raise GridError(f"{p}: 'axes' must be a non-empty mapping of dotted key -> list of values")
    for key, values in axes.items():
        _check_key(key, f"{p}: axes")
        if key in RESERVED_AXES:
            raise GridError(f"{p}: axes: '{key}' is set by the grid (<output_root>/<run name>); use output_root")
        if not isinstance(values, list) or not values:
            raise GridError(f"{p}: axes.{key}: expected a non-empty list of values")

    zips = data.get("zip") or []
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

    exclude = data.get("exclude") or []
    if not isinstance(exclude, list):
        raise GridError(f"{p}: 'exclude' must be a list of mappings {{dotted key: value}}")
    for i, rule in enumerate(exclude):
        if not isinstance(rule, dict) or not rule:
            raise GridError(f"{p}: exclude item {i + 1}: expected a non-empty mapping {{dotted key: value}}")
        for key, value in rule.items():
            if key not in axes:
                raise GridError(f"{p}: exclude item {i + 1}: '{key}' is not an axis.{suggest(key, axes)}")
            if not any(_same(value, v) for v in axes[key]):
                raise GridError(f"{p}: exclude item {i + 1}: {key}={value!r} is not one of the axis values {axes[key]!r}")

    name = data.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise GridError(f"{p}: 'name' must be a format string such as '{{name}}-T{{temperature}}'")

    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise GridError(f"{p}: 'overrides' must be a list of 'key.sub=value' strings")
    for o in overrides:
        parse_override(o)

    root = output_root if output_root is not None else data.get("output_root")
    if root is None:
        root = Path("runs") / "grids" / p.stem
    elif not isinstance(root, (str, Path)) or not str(root):
        raise GridError(f"{p}: 'output_root' must be a directory path")
    return Grid(path=p, base=base_path, axes=dict(axes), zip_groups=[list(g) for g in zips], exclude=list(exclude),
                name=name, output_root=Path(root), overrides=list(overrides))


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                              and not isinstance(a, bool) and not isinstance(b, bool) and a == b)


def axis_labels(keys: Sequence[str]) -> Dict[str, str]:
    """Short label (the last dotted component) per axis, or the full key with '_' when ambiguous."""
    lasts = [k.split(".")[-1] for k in keys]
    return {k: (last if lasts.count(last) == 1 else k.replace(".", "_")) for k, last in zip(keys, lasts)}


# --------------------------------------------------------------------------------------------
# Expansion
# --------------------------------------------------------------------------------------------
def format_value(value: Any) -> str:
    """A value as YAML text that ``kdcore.config.parse_override`` reads back as the same value."""
    candidates = []
    if isinstance(value, str):
        candidates.append(value)
    candidates.append(json.dumps(value))
    candidates.append(yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip().removesuffix("...").strip())
    for text in candidates:
        try:
            if text and "\n" not in text and load_yaml(text) == value and type(load_yaml(text)) is type(value):
                return text
        except (yaml.YAMLError, ValueError):
            continue
    raise GridError(f"value {value!r} cannot be written as a one-line override")


def render_name(template: Optional[str], values: Dict[str, Any]) -> str:
    keys = list(values)
    labels = axis_labels(keys)
    if template is None:
        text = "_".join(f"{labels[k]}-{_plain(values[k])}" for k in keys)
    else:
        fields: Dict[str, Any] = {}
        ambiguous = set()
        for k in keys:
            last = k.split(".")[-1]
            if labels[k] == last:
                fields[last] = values[k]
            else:
                ambiguous.add(last)
            fields[k.replace(".", "_")] = values[k]

        class Fields(dict):
            def __missing__(self, key):
                if key in ambiguous:
                    full = [k.replace(".", "_") for k in keys if k.split(".")[-1] == key]
                    raise GridError(f"name template {template!r}: field {{{key}}} is ambiguous; use one of "
                                    + ", ".join(f"{{{f}}}" for f in full))
                raise GridError(f"name template {template!r}: unknown field {{{key}}}.{suggest(key, list(fields))} "
                                f"Fields: {', '.join(fields)}")

        try:
            text = template.format_map(Fields(fields))
        except GridError:
            raise
        except (ValueError, IndexError, KeyError, AttributeError, TypeError) as exc:
            raise GridError(f"name template {template!r}: {exc}") from None
    text = NAME_CHARS.sub("_", text)
    if text in ("", ".", ".."):
        raise GridError(f"name template {template!r} gives the run name {text!r}, which is not a directory name")
    return text


def _plain(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def expand(grid: Grid, extra_overrides: Sequence[str] = ()) -> List[Run]:
    """The runs of a grid, deterministically: axes in file order (a zip group counts as one axis
    at the place of its first key), cartesian product, excluded runs dropped. No validation."""
    for o in extra_overrides:
        parse_override(o)
    keys = list(grid.axes)
    group_of = {k: tuple(g) for g in grid.zip_groups for k in g}
    factors: List[tuple] = []
    for k in keys:
        g = group_of.get(k, (k,))
        if g not in factors:
            factors.append(g)
    choices = [[dict(zip(g, vals)) for vals in zip(*(grid.axes[k] for k in g))] for g in factors]
    runs: List[Run] = []
    for combo in itertools.product(*choices):
        merged: Dict[str, Any] = {}
        for part in combo:
            merged.update(part)
        values = {k: merged[k] for k in keys}
        if any(all(_same(values[k], v) for k, v in rule.items()) for rule in grid.exclude):
            continue
        name = render_name(grid.name, values)
        out = grid.output_root / name
        overrides = [*grid.overrides, *extra_overrides, *(f"{k}={format_value(v)}" for k, v in values.items()),
                     f"run.output_dir={format_value(str(out))}"]
        runs.append(Run(index=len(runs), name=name, values=values, overrides=overrides, output_dir=out))
    if not runs:
        raise GridError(f"{grid.path}: every run is excluded; the grid is empty")
    by_name: Dict[str, List[Run]] = {}
    for r in runs:
        by_name.setdefault(r.name, []).append(r)
    for name, same in by_name.items():
        if len(same) > 1:
            shown = " and ".join(json.dumps(r.values, default=str) for r in same[:3])
            raise GridError(f"{grid.path}: the name template {grid.name!r} gives {len(same)} runs the name '{name}' "
                            f"({shown}); add the axes that differ to 'name'")
    return runs


def validate_runs(grid: Grid, runs: List[Run], check_models: bool = True) -> None:
    """``kd-train --validate`` for every run (no weights); the first invalid run raises, named."""
    from kdcore.config import read_yaml

    raw = read_yaml(grid.base)
    for run in runs:
        try:
            cfg = validate(apply_overrides(raw, run.overrides), source=str(grid.base))
            if check_models:
                from kdcore.assemble import validate_models

                validate_models(cfg)
        except KdcoreError as exc:
            raise GridError(f"run '{run.name}' is invalid: {exc}") from None
        run.resolved = cfg.resolved


# --------------------------------------------------------------------------------------------
# Run state, commands, manifest
# --------------------------------------------------------------------------------------------
def run_state(run: Run) -> str:
    """``finished`` (final/config.json), ``resume`` (a step_* checkpoint) or ``new``."""
    out = run.output_dir
    if (out / FINAL_MARKER).is_file():
        return "finished"
    ckpts = out / CHECKPOINTS
    if ckpts.is_dir() and any(p.is_dir() and STEP_DIR.match(p.name) for p in ckpts.iterdir()):
        return "resume"
    return "new"


def launch_overrides(run: Run, state: str) -> List[str]:
    return run.overrides + (["train.resume=true"] if state == "resume" else [])


def launch_resolved(run: Run, state: str) -> Dict[str, Any]:
    resolved = json.loads(json.dumps(run.resolved))
    if state == "resume":
        resolved.setdefault("train", {})["resume"] = True
    return resolved


def config_sha256(resolved: Dict[str, Any]) -> str:
    return hashlib.sha256(dump(resolved).encode()).hexdigest()


def train_command(grid: Grid, run: Run, state: str) -> List[str]:
    return [sys.executable, "-m", "kdcore.cli", "--config", str(grid.base), *launch_overrides(run, state)]


def torchrun_command(grid: Grid, run: Run, state: str, nproc: int) -> List[str]:
    return ["torchrun", "--nproc_per_node", str(nproc), "-m", "kdcore.cli", "--config", str(grid.base),
            *launch_overrides(run, state)]


def prepare(grid: Grid, run: Run, state: str, action: str) -> None:
    """Write ``<out>/config.yaml`` and append the run's line to ``<output_root>/manifest.jsonl``."""
    resolved = launch_resolved(run, state)
    run.output_dir.mkdir(parents=True, exist_ok=True)
    text = dump(resolved)
    (run.output_dir / "config.yaml").write_text(text)
    record = {"id": run.id, "index": run.index, "name": run.name, "action": action, "grid": str(grid.path),
              "base": str(grid.base), "values": run.values, "overrides": launch_overrides(run, state),
              "output_dir": str(run.output_dir), "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
              "time": _dt.datetime.now().isoformat(timespec="seconds")}
    grid.output_root.mkdir(parents=True, exist_ok=True)
    with open(grid.output_root / "manifest.jsonl", "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")


def changed_since(run: Run) -> bool:
    """Whether a finished run's config.yaml differs from what the grid would run now."""
    path = run.output_dir / "config.yaml"
    if not path.is_file() or run.resolved is None:
        return False
    try:
        old = load_yaml(path.read_text())
    except yaml.YAMLError:
        return True
    new = launch_resolved(run, "new")
    for cfg in (old, new):
        if isinstance(cfg, dict) and isinstance(cfg.get("train"), dict):
            cfg["train"]["resume"] = False
    return old != new


# --------------------------------------------------------------------------------------------
# Table output
# --------------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "-"
    return _plain(value)


def text_table(header: List[str], rows: List[List[Any]]) -> str:
    cells = [header] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def runs_table(grid: Grid, runs: List[Run]) -> str:
    keys = list(grid.axes)
    rows = [[r.index, r.name, *(_plain(r.values[k]) for k in keys), run_state(r)] for r in runs]
    return text_table(["#", "run", *keys, "state"], rows)


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
def _popen(argv, **kwargs):  # one place to start a run (tests replace it)
    return subprocess.Popen(argv, **kwargs)


def _gpus() -> List[str]:
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken driver is "no CUDA" for scheduling purposes
        count = 0
    if not count:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        return ids[:count]
    return [str(i) for i in range(count)]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").replace("\r", "\n")
    except OSError:
        return ""
    kept = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join("    " + ln for ln in kept[-lines:])


def run_all(grid: Grid, runs: List[Run], parallel: int = 0) -> int:
    """Launch the unfinished runs (``parallel`` = 0: one after another, streaming their output;
    N: N at a time, output in each run's grid.log). Returns the exit status."""
    plan = []
    for run in runs:
        state = run_state(run)
        if state == "finished":
            note = " (its config.yaml differs from the grid's now; delete the directory to rerun)" if changed_since(run) else ""
            print(f"skip {run.name}: finished{note}", flush=True)
        else:
            plan.append((run, state))
    if not plan:
        print(f"all {len(runs)} runs are finished; nothing to launch", flush=True)
        return 0

    slots = max(parallel, 1)
    gpus = _gpus() if parallel else []
    if parallel and gpus and slots > len(gpus):
        print(f"warning: --parallel {slots} with {len(gpus)} visible GPU(s): GPUs are shared round-robin", flush=True)
    env_base = dict(os.environ)
    if parallel and not gpus and "OMP_NUM_THREADS" not in env_base:
        env_base["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // slots))

    failed: List[str] = []
    done = 0
    pending = list(plan)
    active: Dict[int, tuple] = {}
    total = len(plan)
    try:
        while pending or active:
            while pending and len(active) < slots:
                slot = next(i for i in range(slots) if i not in active)
                run, state = pending.pop(0)
                prepare(grid, run, state, "resume" if state == "resume" else "launch")
                env = dict(env_base)
                where = ""
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
                    where = f" on GPU {env['CUDA_VISIBLE_DEVICES']}"
                verb = "resume" if state == "resume" else "start"
                print(f"[{done + len(active) + 1}/{total}] {verb} {run.name}{where}", flush=True)
                log = open(run.output_dir / "grid.log", "ab")
                argv = train_command(grid, run, state)
                if parallel:
                    proc = _popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
                else:
                    proc = _popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
                active[slot] = (run, proc, log, time.perf_counter())
            if not parallel:
                (run, proc, log, _), = active.values()
                if proc.stdout is not None:
                    while True:
                        chunk = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(65536)
                        if not chunk:
                            break
                        log.write(chunk)
                        sys.stdout.write(chunk.decode(errors="replace"))
                        sys.stdout.flush()
                proc.wait()
            finished_slots = [s for s, (_, proc, _, _) in active.items() if proc.poll() is not None]
            if not finished_slots:
                time.sleep(0.2)
                continue
            for s in finished_slots:
                run, proc, log, start = active.pop(s)
                log.close()
                done += 1
                secs = time.perf_counter() - start
                if proc.returncode == 0:
                    print(f"[{done}/{total}] ok {run.name} ({secs:.1f} s)", flush=True)
                else:
                    failed.append(run.name)
                    print(f"[{done}/{total}] FAILED {run.name} (exit status {proc.returncode}, {secs:.1f} s); "
                          f"log: {run.output_dir / 'grid.log'}", flush=True)
                    if parallel:
                        print(_tail(run.output_dir / "grid.log"), flush=True)
    except KeyboardInterrupt:
        for run, proc, log, _ in active.values():
            if proc.poll() is None:
                proc.terminate()
        for run, proc, log, _ in active.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        print("grid: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    skipped = len(runs) - total
    print(f"grid: {total - len(failed)} of {total} launched runs succeeded"
          + (f", {skipped} already finished" if skipped else "")
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def emit_commands(grid: Grid, runs: List[Run], nproc: int) -> int:
    """Print one torchrun command per unfinished run (stdout); notes go to stderr."""
    for run in runs:
        state = run_state(run)
        if state == "finished":
            print(f"# skip {run.name}: finished", file=sys.stderr)
            continue
        prepare(grid, run, state, "emit")
        print(shlex.join(torchrun_command(grid, run, state, nproc)), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
ROUGE_KEYS = ("rougel", "rougelf", "rougelf1", "rougelfmeasure")


def _norm(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(key).lower())


def _number(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def rouge_from_results(data: Any, model_dir: Optional[Path] = None) -> Dict[str, float]:
    """ROUGE-L from a kd-eval ``results.json``, read defensively.

    kd-eval writes ``{"models": [{"model", "sets": {set: {"mean", ...}}, "avg": {"mean", ...}}]}``:
    ``rouge_l`` is the row's ``avg.mean`` and ``rouge_l_<set>`` each set's mean (the row whose
    ``model`` is ``model_dir``, else the first). Also accepted: ``average`` (or ``avg``) as a number
    or a mapping with ``mean``/``rouge_l``/``rougeL``, or such a key at the top level.
    """
    out: Dict[str, float] = {}
    if not isinstance(data, dict):
        return out
    rows = data.get("models")
    if isinstance(rows, list) and rows:
        rows = [r for r in rows if isinstance(r, dict)]
        row = next((r for r in rows if model_dir is not None and _same_path(r.get("model"), model_dir)), rows[0] if rows else None)
        if row is not None:
            data = row
            sets = row.get("sets")
            if isinstance(sets, dict):
                for name, cell in sets.items():
                    value = _number(cell.get("mean")) if isinstance(cell, dict) else _number(cell)
                    if value is not None:
                        out[f"rouge_l_{NAME_CHARS.sub('_', str(name))}"] = value
    average = _average(data)
    if average is not None:
        out["rouge_l"] = average
    return out


def _average(data: Dict[str, Any]) -> Optional[float]:
    for key, value in data.items():
        if _norm(key) in ("average", "avg"):
            if _number(value) is not None:
                return _number(value)
            if isinstance(value, dict):
                for k, v in value.items():
                    if _norm(k) in ("mean", *ROUGE_KEYS) and _number(v) is not None:
                        return _number(v)
    for key, value in data.items():
        if _norm(key) in ROUGE_KEYS and _number(value) is not None:
            return _number(value)
    return None


def _same_path(a: Any, b: Path) -> bool:
    if not isinstance(a, str):
        return False
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def run_metrics(run: Run, eval_results: str = DEFAULT_EVAL_RESULTS) -> Dict[str, Any]:
    """The last ``eval`` record of metrics.jsonl (``eval_<term>``) and kd-eval's ROUGE-L."""
    out: Dict[str, Any] = {}
    path = run.output_dir / "metrics.jsonl"
    last = None
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if isinstance(rec, dict) and rec.get("split") == "eval":
                last = rec
    if last is not None:
        out["step"] = last.get("step")
        for k, v in last.items():
            if k not in ("split", "step", "tokens") and _number(v) is not None:
                out[f"eval_{k}"] = float(v)
    res = run.output_dir / eval_results
    if res.is_file():
        try:
            out.update(rouge_from_results(json.loads(res.read_text()), run.output_dir / "final"))
        except (ValueError, OSError):
            pass  # a results file being written, or not kd-eval's: no ROUGE-L columns
    return out


def _metric_name(metric: str) -> str:
    if metric.startswith(("eval_", "rouge_l")) or metric == "step":
        return metric
    if _norm(metric) in ROUGE_KEYS:
        return "rouge_l"
    return f"eval_{metric.removeprefix('eval/')}"


def report(grid: Grid, runs: List[Run], metric: str = "eval_ce", eval_results: str = DEFAULT_EVAL_RESULTS) -> int:
    keys = list(grid.axes)
    rows = []
    metric_cols: List[str] = []
    for run in runs:
        m = run_metrics(run, eval_results)
        state = run_state(run)
        status = {"finished": "finished", "resume": "incomplete"}.get(state, "incomplete" if run.output_dir.exists() else "missing")
        rows.append((run, status, m))
        for k in m:
            if k != "step" and k not in metric_cols:
                metric_cols.append(k)
    metric_cols = (sorted(c for c in metric_cols if c.startswith("eval_")) + [c for c in metric_cols if c == "rouge_l"]
                   + sorted(c for c in metric_cols if c.startswith("rouge_l_")))
    header = ["run", *keys, "status", "step", *metric_cols]
    table = [[run.name, *(_plain(run.values[k]) for k in keys), status, m.get("step"), *(m.get(c) for c in metric_cols)]
             for run, status, m in rows]

    root = grid.output_root
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "report.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for row in table:
            w.writerow(["" if c is None else (_plain(c) if isinstance(c, (list, dict)) else c) for c in row])
    md = io.StringIO()
    md.write(f"# Grid report: {grid.path}\n\n")
    md.write("| " + " | ".join(header) + " |\n")
    md.write("|" + "|".join("---:" if h in metric_cols or h == "step" else "---" for h in header) + "|\n")
    for row in table:
        md.write("| " + " | ".join(_cell(c).replace("|", "\\|") for c in row) + " |\n")
    (root / "report.md").write_text(md.getvalue())

    chosen = _metric_name(metric)
    bars = [(run.name, m[chosen]) for run, _, m in rows if chosen in m]
    if bars:
        _bar_chart(bars, chosen, grid, root / "report.png")
    else:
        print(f"warning: no run has the metric '{chosen}' (available: {', '.join(metric_cols) or 'none'}); "
              "report.png not drawn", file=sys.stderr)
    _hparams(grid, rows)

    print(text_table(header, table))
    print(f"\nwrote {root / 'report.csv'}, {root / 'report.md'}"
          + (f", {root / 'report.png'}" if bars else "") + f", {root / 'tb_hparams'}/")
    return 0


def _bar_chart(bars, metric: str, grid: Grid, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(bars) + 1.5), 4.0))
    names = [b[0] for b in bars]
    values = [b[1] for b in bars]
    ax.bar(range(len(bars)), values, color="tab:blue")
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"{grid.path.stem}: {metric}")
    for i, v in enumerate(values):
        ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _hparams(grid: Grid, rows) -> None:
    """One hparams entry per run with metrics, for TensorBoard's HPARAMS tab."""
    from torch.utils.tensorboard import SummaryWriter

    logdir = grid.output_root / "tb_hparams"
    shutil.rmtree(logdir, ignore_errors=True)  # rewritten from scratch: no duplicate entries
    writer = SummaryWriter(str(logdir))
    try:
        for run, _, m in rows:
            metrics = {f"hparam/{k}": v for k, v in m.items() if k != "step" and v is not None}
            if not metrics:
                continue
            hp = {}
            for k, v in run.values.items():
                hp[k] = v if isinstance(v, (int, float, str, bool)) else _plain(v)
            writer.add_hparams(hp, metrics, run_name=run.name)
    finally:
        writer.close()


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grid.py", description="Expand, validate and run an ablation grid of kd-train runs.")
    p.add_argument("grid", help="grid YAML file")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="validate every run, print the table of runs, launch nothing")
    mode.add_argument("--local", action="store_true", help="run them one after another on this machine")
    mode.add_argument("--parallel", type=int, metavar="N", help="run N at a time (one GPU each via CUDA_VISIBLE_DEVICES; N CPU processes without CUDA)")
    mode.add_argument("--emit-commands", action="store_true", help="print one torchrun command per unfinished run")
    p.add_argument("--report", action="store_true", help="collect final metrics into report.csv/.md/.png and TensorBoard hparams (after running, when combined with --local/--parallel)")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="key.sub=value",
                   help="an override applied to every run (repeatable), after the grid's own overrides")
    p.add_argument("--output-root", help="directory of the runs (default: the grid's output_root or runs/grids/<grid stem>)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes per run in --emit-commands (default 1)")
    p.add_argument("--metric", default="eval_ce", help="the metric of report.png (default eval_ce; e.g. eval_loss, rouge_l)")
    p.add_argument("--eval-results", default=DEFAULT_EVAL_RESULTS, help=f"kd-eval results file inside each run directory (default {DEFAULT_EVAL_RESULTS})")
    return p


def run_cli(args) -> int:
    if not (args.dry_run or args.local or args.parallel is not None or args.emit_commands or args.report):
        raise GridError("choose what to do: --dry-run, --local, --parallel N, --emit-commands or --report")
    if args.parallel is not None and args.parallel < 1:
        raise GridError("--parallel N: N must be >= 1")
    if args.nproc_per_node < 1:
        raise GridError("--nproc-per-node: must be >= 1")
    grid = load_grid(args.grid, output_root=args.output_root)
    runs = expand(grid, args.extra)
    launching = args.dry_run or args.local or args.parallel is not None or args.emit_commands
    if launching:
        validate_runs(grid, runs)
        print(f"{grid.path}: {len(runs)} runs validated (base {grid.base}, output root {grid.output_root})",
              file=sys.stderr if args.emit_commands else sys.stdout, flush=True)
    status = 0
    if args.dry_run:
        print(runs_table(grid, runs))
    elif args.emit_commands:
        status = emit_commands(grid, runs, args.nproc_per_node)
    elif args.local or args.parallel is not None:
        status = run_all(grid, runs, parallel=args.parallel or 0)
    if args.report:
        report_status = report(grid, runs, args.metric, args.eval_results)
        status = status or report_status
    return status


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    return run_command("grid", lambda: run_cli(args))


if __name__ == "__main__":
    sys.exit(main())
