#!/usr/bin/env python
"""Ablation grids: expand a grid file into kd-train runs, validate them all, then run them.

    python tools/grid.py GRID.yaml --dry-run                 # validate, print the table of runs
    python tools/grid.py GRID.yaml --local                   # run them one after another
    python tools/grid.py GRID.yaml --parallel N              # N at a time (one GPU each, or N CPU processes)
    python tools/grid.py GRID.yaml --emit-commands [--nproc-per-node K]   # one torchrun line per run
        [--nnodes N --rdzv-endpoint HOST:PORT]                             # ... on N nodes (run each line on every node)
    python tools/grid.py GRID.yaml --report [--metric eval_ce]           # CSV, Markdown, PNG, TB hparams
    ... [--set key.sub=value ...] [--output-root DIR]

The grid file format and run states are :mod:`kdcore.grid`, launching :mod:`kdcore.grid_launch`,
the report :mod:`kdcore.grid_report`; this file is the command line over them. Exit status: 0
when every run succeeded, 1 when some failed, 2 for bad input, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys

from kdcore.console import command
from kdcore.grid import GridError, expand, load_grid, validate_runs
from kdcore.grid_launch import emit_commands, run_all
from kdcore.grid_report import DEFAULT_EVAL_RESULTS, report, runs_table


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
    p.add_argument("--nnodes", type=int, default=1, help="nodes per run in --emit-commands (default 1; > 1 needs "
                   "--rdzv-endpoint)")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="c10d rendezvous of multi-node --emit-commands")
    p.add_argument("--metric", default="eval_ce", help="the metric of report.png (default eval_ce; e.g. eval_loss, rouge_l)")
    p.add_argument("--eval-results", default=DEFAULT_EVAL_RESULTS, help=f"kd-eval results file inside each run directory (default {DEFAULT_EVAL_RESULTS})")
    return p


def run_cli(args) -> int:
    launching = args.dry_run or args.local or args.parallel is not None or args.emit_commands
    if not (launching or args.report):
        raise GridError("choose what to do: --dry-run, --local, --parallel N, --emit-commands or --report")
    if args.parallel is not None and args.parallel < 1:
        raise GridError("--parallel N: N must be >= 1")
    if args.nproc_per_node < 1:
        raise GridError("--nproc-per-node: must be >= 1")
    if args.nnodes < 1:
        raise GridError("--nnodes: must be >= 1")
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise GridError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the node every process meets at)")
    grid = load_grid(args.grid, output_root=args.output_root)
    runs = expand(grid, args.extra)
    status = 0
    if launching:
        validate_runs(grid, runs)
        print(f"{grid.path}: {len(runs)} runs validated (base {grid.base}, output root {grid.output_root})",
              file=sys.stderr if args.emit_commands else sys.stdout, flush=True)
    if args.dry_run:
        print(runs_table(grid, runs))
    elif args.emit_commands:
        status = emit_commands(grid, runs, args.nproc_per_node, args.nnodes, args.rdzv_endpoint)
    elif args.local or args.parallel is not None:
        status = run_all(grid, runs, parallel=args.parallel or 0)
    if args.report:
        report_status = report(grid, runs, args.metric, args.eval_results)
        status = status or report_status
    return status


main = command("grid", parser, run_cli)


if __name__ == "__main__":
    sys.exit(main())
