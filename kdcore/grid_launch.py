"""Launching a grid's runs: here one after another, N at a time, or as commands for a scheduler.

Each launched run gets ``<out>/config.yaml`` (its resolved config), ``<out>/grid.log`` (its
output) and one line in ``<output_root>/manifest.jsonl``. Finished runs are skipped; a run with
a complete checkpoint is resumed with ``train.resume=true`` (the last override). Run states and
the runs themselves come from :mod:`kdcore.grid`; the runs must have been validated
(:func:`kdcore.grid.validate_runs`), which sets the resolved configs written here.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Dict, List, Optional, Tuple

from .config import dump, read_yaml
from .errors import ConfigError
from .grid import Grid, Run, run_state


def launch_overrides(run: Run, state: str) -> List[str]:
    return run.overrides + (["train.resume=true"] if state == "resume" else [])


def launch_resolved(run: Run, state: str) -> Dict[str, Any]:
    resolved = json.loads(json.dumps(run.resolved))
    if state == "resume":
        resolved.setdefault("train", {})["resume"] = True
    return resolved


def train_command(grid: Grid, run: Run, state: str) -> List[str]:
    """kd-train in this interpreter, for a run started here."""
    return [sys.executable, "-m", "kdcore.cli", "--config", str(grid.base), *launch_overrides(run, state)]


def torchrun_command(grid: Grid, run: Run, state: str, nproc: int, nnodes: int = 1,
                     rdzv_endpoint: Optional[str] = None) -> List[str]:
    """``torchrun`` for one run: ``nproc`` processes here, or on each of ``nnodes`` nodes that meet
    at ``rdzv_endpoint`` (``HOST:PORT``, c10d rendezvous; the run's id names the rendezvous, so
    the same line started on every node forms one job)."""
    nodes = [] if nnodes == 1 else ["--nnodes", str(nnodes), "--rdzv_backend", "c10d", "--rdzv_endpoint",
                                    str(rdzv_endpoint), "--rdzv_id", run.id]
    return ["torchrun", *nodes, "--nproc_per_node", str(nproc), "-m", "kdcore.cli", "--config", str(grid.base),
            *launch_overrides(run, state)]


def prepare(grid: Grid, run: Run, state: str, action: str) -> None:
    """Write ``<out>/config.yaml`` and append the run's line to ``<output_root>/manifest.jsonl``."""
    run.output_dir.mkdir(parents=True, exist_ok=True)
    text = dump(launch_resolved(run, state))
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
        old = read_yaml(path)
    except ConfigError:  # unreadable: not what the grid would write now
        return True
    new = launch_resolved(run, "new")
    for cfg in (old, new):
        if isinstance(cfg.get("train"), dict):
            cfg["train"]["resume"] = False
    return old != new


def emit_commands(grid: Grid, runs: List[Run], nproc: int, nnodes: int = 1, rdzv_endpoint: Optional[str] = None) -> int:
    """Print one torchrun command per unfinished run (stdout); notes go to stderr. Multi-node
    (``nnodes`` > 1): start each line on every node (e.g. ``srun``, tools/slurm_example.sh)."""
    if nnodes > 1 and not rdzv_endpoint:
        raise ConfigError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the node every process meets at)")
    for run in runs:
        state = run_state(run)
        if state == "finished":
            print(f"# skip {run.name}: finished", file=sys.stderr)
            continue
        prepare(grid, run, state, "emit")
        print(shlex.join(torchrun_command(grid, run, state, nproc, nnodes, rdzv_endpoint)), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# Running here
# --------------------------------------------------------------------------------------------
def _popen(argv, **kwargs):  # one place to start a run (tests replace it)
    return subprocess.Popen(argv, **kwargs)


def _gpus() -> List[str]:
    """The CUDA device ids runs may be given (CUDA_VISIBLE_DEVICES' entries when it is set)."""
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


@dataclass
class _Active:
    run: Run
    proc: subprocess.Popen
    log: IO[bytes]
    start: float


class _Launcher:
    """Up to ``slots`` kd-train processes at once. ``parallel`` = 0: one at a time with its
    output streamed here (and into grid.log); N: N at a time, output in each run's grid.log,
    one GPU per process round-robin, or N CPU processes sharing the cores."""

    def __init__(self, grid: Grid, total: int, parallel: int):
        self.grid, self.total, self.parallel = grid, total, parallel
        self.slots = max(parallel, 1)
        self.gpus = _gpus() if parallel else []
        if parallel and self.gpus and self.slots > len(self.gpus):
            print(f"warning: --parallel {self.slots} with {len(self.gpus)} visible GPU(s): GPUs are shared round-robin",
                  flush=True)
        self.env = dict(os.environ)
        if parallel and not self.gpus and "OMP_NUM_THREADS" not in self.env:
            self.env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.slots))
        self.active: Dict[int, _Active] = {}
        self.done = 0
        self.failed: List[str] = []

    def has_room(self) -> bool:
        return len(self.active) < self.slots

    def start(self, run: Run, state: str) -> None:
        slot = next(i for i in range(self.slots) if i not in self.active)
        prepare(self.grid, run, state, "resume" if state == "resume" else "launch")
        env = dict(self.env)
        where = ""
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
            where = f" on GPU {env['CUDA_VISIBLE_DEVICES']}"
        verb = "resume" if state == "resume" else "start"
        print(f"[{self.done + len(self.active) + 1}/{self.total}] {verb} {run.name}{where}", flush=True)
        log = open(run.output_dir / "grid.log", "ab")
        out = log if self.parallel else subprocess.PIPE
        proc = _popen(train_command(self.grid, run, state), stdout=out, stderr=subprocess.STDOUT,
                      stdin=subprocess.DEVNULL, env=env)
        self.active[slot] = _Active(run, proc, log, time.perf_counter())

    def stream(self) -> None:
        """Sequential mode: copy the one process's output here and into its log until it exits."""
        (job,) = self.active.values()
        if job.proc.stdout is not None:
            read = job.proc.stdout.read1 if hasattr(job.proc.stdout, "read1") else job.proc.stdout.read
            for chunk in iter(lambda: read(65536), b""):
                job.log.write(chunk)
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
        job.proc.wait()

    def reap(self) -> bool:
        """Report the processes that have exited; whether there were any."""
        ended = [s for s, job in self.active.items() if job.proc.poll() is not None]
        for slot in ended:
            job = self.active.pop(slot)
            job.log.close()
            self.done += 1
            secs = time.perf_counter() - job.start
            if job.proc.returncode == 0:
                print(f"[{self.done}/{self.total}] ok {job.run.name} ({secs:.1f} s)", flush=True)
                continue
            self.failed.append(job.run.name)
            print(f"[{self.done}/{self.total}] FAILED {job.run.name} (exit status {job.proc.returncode}, {secs:.1f} s); "
                  f"log: {job.run.output_dir / 'grid.log'}", flush=True)
            if self.parallel:
                print(_tail(job.run.output_dir / "grid.log"), flush=True)
        return bool(ended)

    def stop(self) -> None:
        """Terminate every running process (kill what has not exited 30 s later)."""
        for job in self.active.values():
            if job.proc.poll() is None:
                job.proc.terminate()
        for job in self.active.values():
            try:
                job.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                job.proc.kill()
            job.log.close()


def unfinished(runs: List[Run]) -> List[Tuple[Run, str]]:
    """The runs to launch with their states; a line per finished (skipped) run."""
    plan = []
    for run in runs:
        state = run_state(run)
        if state != "finished":
            plan.append((run, state))
            continue
        note = " (its config.yaml differs from the grid's now; delete the directory to rerun)" if changed_since(run) else ""
        print(f"skip {run.name}: finished{note}", flush=True)
    return plan


def run_all(grid: Grid, runs: List[Run], parallel: int = 0) -> int:
    """Launch the unfinished runs (``parallel`` = 0: one after another, streaming their output;
    N: N at a time). Returns the exit status: 0 all succeeded, 1 some failed, 130 interrupted."""
    pending = unfinished(runs)
    if not pending:
        print(f"all {len(runs)} runs are finished; nothing to launch", flush=True)
        return 0
    launcher = _Launcher(grid, len(pending), parallel)
    try:
        while pending or launcher.active:
            while pending and launcher.has_room():
                launcher.start(*pending.pop(0))
            if not parallel:
                launcher.stream()
            if not launcher.reap():
                time.sleep(0.2)
    except KeyboardInterrupt:
        launcher.stop()
        print("grid: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    skipped = len(runs) - launcher.total
    failed = launcher.failed
    print(f"grid: {launcher.total - len(failed)} of {launcher.total} launched runs succeeded"
          + (f", {skipped} already finished" if skipped else "")
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0
