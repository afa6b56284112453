"""Resumable checkpoints, written atomically.

``checkpoints/step_000040/`` holds ``model.pt`` (student + projector + aligner state),
``optimizer.pt``, ``scheduler.pt``, ``rng_rank{r}.pt`` and ``state.json`` (step, metrics).
Everything is written into a hidden temporary directory that is renamed into place as the last
act, so a crash never leaves a directory that :func:`latest` would pick up half-written.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .errors import CheckpointError

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{6,})$")
STATE_FILE = "state.json"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def list_checkpoints(root: Path) -> List[Path]:
    """Complete checkpoints (those with ``state.json``), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest(root: Path) -> Optional[Path]:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


RUN_CHECKPOINTS = "checkpoints"  # a run keeps its checkpoints in <run.output_dir>/checkpoints


def run_checkpoints(output_dir: Path) -> List[Path]:
    """Complete checkpoints of the run that writes to ``output_dir``, oldest first."""
    return list_checkpoints(Path(output_dir) / RUN_CHECKPOINTS)


def rng_state() -> Dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(root: Path, step: int, module, optimizer, scheduler, state: Dict, rank: int, world_size: int, barrier,
         extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Write checkpoint ``step``. Rank 0 writes model/optimizer/scheduler/state, every rank its RNG.

    ``barrier`` synchronises ranks between writing into the temporary directory and the rename;
    ``extra(directory)`` runs on every rank after the engine's files are written and before the
    rename (plugins' files, through the ``kdcore_checkpoint_save`` hook).
    """
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save(module.state_dict(), tmp / "model.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    barrier()
    if extra is not None:
        extra(tmp)
        barrier()
    if rank == 0:
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "world_size": world_size}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    barrier()
    return final


def load(path: Path, module, optimizer, scheduler, rank: int, map_location) -> Dict:
    """Restore a checkpoint into the given objects; returns its ``state.json`` dict."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        module.load_state_dict(torch.load(path / "model.pt", map_location=map_location, weights_only=True))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng_file = path / f"rng_rank{rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {path} is incomplete: {exc.filename} is missing") from None
    except Exception as exc:  # unpickling, shape mismatch, truncated zip: all mean "cannot resume from this"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or does not match this config: {first}") from None
    return state


def prune(root: Path, keep_last: int, protect: Optional[int] = None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, never the step ``protect`` (the best)."""
    ckpts = list_checkpoints(root)
    for path in ckpts[:-keep_last] if keep_last > 0 else ckpts:
        if protect is not None and path == step_dir(root, protect):
            continue
        shutil.rmtree(path, ignore_errors=True)


class Checkpoints:
    """A run's ``checkpoints/`` plus its ``best/`` and ``final/`` student exports.

    ``best`` is ``{"step", "metric", "value"}`` of the best evaluation seen so far by
    ``select_by`` (``ce``: lowest; ``rouge_l``: highest; ties keep the earlier step).
    """

    def __init__(self, out: Path, dist, keep_last: int, select_by: str):
        self.out, self.root, self.dist = Path(out), Path(out) / RUN_CHECKPOINTS, dist
        self.keep_last, self.select_by = keep_last, select_by
        self.best: Optional[Dict] = None

    def refuse_existing(self, resume: bool) -> None:
        from .errors import ConfigError

        if not resume and list_checkpoints(self.root):
            raise ConfigError(f"run.output_dir {self.out} already holds checkpoints; set train.resume=true to "
                              "continue that run, or choose another run.output_dir")

    def observe(self, step: int, eval_metrics: Optional[Dict[str, float]]) -> bool:
        """Update ``best`` with an evaluation; returns whether ``step`` is now the best."""
        key = self.select_by
        if eval_metrics is None or key not in eval_metrics:
            return False
        value = eval_metrics[key]
        old = self.best["value"] if self.best is not None else None
        if old is None or (value > old if key == "rouge_l" else value < old):
            self.best = {"step": step, "metric": key, "value": value}
            return True
        return False

    def save(self, step: int, module, optimizer, scheduler, state: Dict, extra=None) -> Path:
        """Checkpoint ``step`` (``best`` is part of its state), then prune old ones."""
        from .distributed import barrier

        path = save(self.root, step, module, optimizer, scheduler, {"best": self.best, **state}, self.dist.rank,
                    self.dist.world_size, lambda: barrier(self.dist), extra)
        if self.dist.is_main:
            prune(self.root, self.keep_last, self.best["step"] if self.best else None)
        barrier(self.dist)
        return path

    def restore(self, module, optimizer, scheduler, device) -> Optional[tuple]:
        """``(path, state)`` of the newest checkpoint restored into the objects, or ``None``
        (with a warning: ``train.resume`` on an empty directory starts from scratch)."""
        path = latest(self.root)
        if path is None:
            log.warning("train.resume=true but %s holds no checkpoint: starting from scratch", self.root)
            return None
        state = load(path, module, optimizer, scheduler, self.dist.rank, device)
        self.best = state.get("best")
        if state.get("world_size", 1) != self.dist.world_size:
            log.warning("resuming a %s-process run with %s processes", state.get("world_size"), self.dist.world_size)
        if self.dist.is_main:
            print(f"resumed from {path} at step {state['step']}", flush=True)
        return path, state

    def export(self, name: str, tuner, model, tokenizer, final: bool) -> Path:
        """The student as ``out/name`` (``final``: the tuner's plain export, loadable by plain
        transformers), written to a temporary directory and renamed into place."""
        from .distributed import barrier

        target = self.out / name
        if self.dist.is_main:
            tmp = self.out / f".tmp-{name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            tuner.save_student(model, tmp, final=final)
            tokenizer.save_pretrained(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        barrier(self.dist)
        return target
