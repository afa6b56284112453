"""Tabulating a grid: the table of runs, and each run's final metrics as CSV, Markdown, a bar
chart and TensorBoard hparams.

A run's metrics are the terms of the last ``eval`` record of ``<out>/metrics.jsonl`` (as
``eval_<term>``, with its ``step``) and the ROUGE-L of kd-eval's ``<out>/eval/results.json``
(``rouge_l`` and ``rouge_l_<set>``). :func:`report` writes ``<output_root>/report.csv``,
``report.md``, ``report.png`` (a bar per run of one metric) and ``tb_hparams/``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .grid import NAME_CHARS, Grid, Run, plain, run_state

DEFAULT_EVAL_RESULTS = "eval/results.json"
ROUGE_KEYS = ("rougel", "rougelf", "rougelf1", "rougelfmeasure")


# --------------------------------------------------------------------------------------------
# Text tables
# --------------------------------------------------------------------------------------------
def cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "-"
    return plain(value)


def text_table(header: List[str], rows: List[List[Any]]) -> str:
    cells = [header] + [[cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def runs_table(grid: Grid, runs: List[Run]) -> str:
    """Index, name, axis values and state of each run (``--dry-run``)."""
    keys = list(grid.axes)
    rows = [[r.index, r.name, *(plain(r.values[k]) for k in keys), run_state(r)] for r in runs]
    return text_table(["#", "run", *keys, "state"], rows)


# --------------------------------------------------------------------------------------------
# A run's metrics
# --------------------------------------------------------------------------------------------
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
    models = data.get("models")
    rows = [r for r in models if isinstance(r, dict)] if isinstance(models, list) else []
    if rows:
        data = next((r for r in rows if model_dir is not None and _same_path(r.get("model"), model_dir)), rows[0])
        sets = data.get("sets")
        for name, entry in (sets.items() if isinstance(sets, dict) else ()):
            value = _number(entry.get("mean")) if isinstance(entry, dict) else _number(entry)
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


def _last_eval(path: Path) -> Optional[Dict[str, Any]]:
    last = None
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if isinstance(rec, dict) and rec.get("split") == "eval":
                last = rec
    return last


def run_metrics(run: Run, eval_results: str = DEFAULT_EVAL_RESULTS) -> Dict[str, Any]:
    """The last ``eval`` record of metrics.jsonl (``step``, ``eval_<term>``) and kd-eval's ROUGE-L."""
    out: Dict[str, Any] = {}
    last = _last_eval(run.output_dir / "metrics.jsonl")
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


def metric_name(metric: str) -> str:
    """A ``--metric`` as its column: ``ce`` and ``eval/ce`` -> ``eval_ce``, ``rougeL`` -> ``rouge_l``."""
    if metric.startswith(("eval_", "rouge_l")) or metric == "step":
        return metric
    if _norm(metric) in ROUGE_KEYS:
        return "rouge_l"
    return f"eval_{metric.removeprefix('eval/')}"


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
@dataclass
class Report:
    header: List[str]                               # run, axes..., status, step, metrics...
    table: List[List[Any]]                          # a row per run, cells as in header
    metric_cols: List[str]
    rows: List[Tuple[Run, str, Dict[str, Any]]]     # (run, status, run_metrics)


def collect(grid: Grid, runs: List[Run], eval_results: str = DEFAULT_EVAL_RESULTS) -> Report:
    """Every run's status (finished, incomplete, missing) and metrics; metric columns ordered
    ``eval_*`` (sorted), ``rouge_l``, ``rouge_l_<set>`` (sorted)."""
    rows, found = [], []
    for run in runs:
        m = run_metrics(run, eval_results)
        state = run_state(run)
        status = {"finished": "finished", "resume": "incomplete"}.get(state, "incomplete" if run.output_dir.exists() else "missing")
        rows.append((run, status, m))
        found += [k for k in m if k != "step" and k not in found]
    metric_cols = (sorted(c for c in found if c.startswith("eval_")) + [c for c in found if c == "rouge_l"]
                   + sorted(c for c in found if c.startswith("rouge_l_")))
    keys = list(grid.axes)
    header = ["run", *keys, "status", "step", *metric_cols]
    table = [[run.name, *(plain(run.values[k]) for k in keys), status, m.get("step"), *(m.get(c) for c in metric_cols)]
             for run, status, m in rows]
    return Report(header, table, metric_cols, rows)


def write_csv(rep: Report, path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(rep.header)
        for row in rep.table:
            w.writerow(["" if c is None else (plain(c) if isinstance(c, (list, dict)) else c) for c in row])


def write_markdown(rep: Report, title: str, path: Path) -> None:
    md = io.StringIO()
    md.write(f"# Grid report: {title}\n\n")
    md.write("| " + " | ".join(rep.header) + " |\n")
    md.write("|" + "|".join("---:" if h in rep.metric_cols or h == "step" else "---" for h in rep.header) + "|\n")
    for row in rep.table:
        md.write("| " + " | ".join(cell(c).replace("|", "\\|") for c in row) + " |\n")
    path.write_text(md.getvalue())


def bar_chart(bars: List[Tuple[str, float]], metric: str, title: str, path: Path) -> None:
    """A PNG with one annotated bar per (run name, value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(bars) + 1.5), 4.0))
    values = [b[1] for b in bars]
    ax.bar(range(len(bars)), values, color="tab:blue")
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels([b[0] for b in bars], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"{title}: {metric}")
    for i, v in enumerate(values):
        ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_hparams(rep: Report, logdir: Path) -> None:
    """One hparams entry per run with metrics, for TensorBoard's HPARAMS tab."""
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(logdir, ignore_errors=True)  # rewritten from scratch: no duplicate entries
    writer = SummaryWriter(str(logdir))
    try:
        for run, _, m in rep.rows:
            metrics = {f"hparam/{k}": v for k, v in m.items() if k != "step" and v is not None}
            if metrics:
                hp = {k: v if isinstance(v, (int, float, str, bool)) else plain(v) for k, v in run.values.items()}
                writer.add_hparams(hp, metrics, run_name=run.name)
    finally:
        writer.close()


def report(grid: Grid, runs: List[Run], metric: str = "eval_ce", eval_results: str = DEFAULT_EVAL_RESULTS) -> int:
    """Write the report files under the grid's output root and print the table; returns 0."""
    rep = collect(grid, runs, eval_results)
    root = grid.output_root
    root.mkdir(parents=True, exist_ok=True)
    write_csv(rep, root / "report.csv")
    write_markdown(rep, str(grid.path), root / "report.md")
    chosen = metric_name(metric)
    bars = [(run.name, m[chosen]) for run, _, m in rep.rows if chosen in m]
    if bars:
        bar_chart(bars, chosen, grid.path.stem, root / "report.png")
    else:
        print(f"warning: no run has the metric '{chosen}' (available: {', '.join(rep.metric_cols) or 'none'}); "
              "report.png not drawn", file=sys.stderr)
    write_hparams(rep, root / "tb_hparams")
    print(text_table(rep.header, rep.table))
    print(f"\nwrote {root / 'report.csv'}, {root / 'report.md'}"
          + (f", {root / 'report.png'}" if bars else "") + f", {root / 'tb_hparams'}/")
    return 0
