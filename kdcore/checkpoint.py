"""Resumable checkpoints: written atomically, verified on resume, never able to run code.

``checkpoints/step_000040/`` holds the model (student + projector + aligner) and optimizer
state, ``scheduler.pt``, ``rng_rank{r}.pt`` (each rank's RNG states, as tensors and plain
numbers), the files of ``kdcore_checkpoint_save`` hooks, and ``state.json``: the step, the world
size, the format, the best evaluation so far, the resolved config and the SHA-256 of every other
file. The model and optimizer are in one of two formats (``state.json``'s ``format``):
``torch`` (:class:`TorchFiles`: ``model.pt`` and ``optimizer.pt`` written by rank 0, for
``train.strategy: ddp``) or ``dcp`` (:class:`kdcore.sharding.DcpFiles`: a
torch.distributed.checkpoint directory every rank writes its shards to, for ``fsdp``; it
resumes on any world size).

* Everything is written into ``.tmp-step_N`` and renamed into place as the last act, so a crash
  never leaves a directory that :func:`latest` would pick up half-written. A write that fails
  (a full disk, a read-only file system) removes the temporary directory, leaves every earlier
  checkpoint as it was, and is one :class:`CheckpointError` on every rank.
* A checkpoint that is replaced or pruned is first renamed to ``.trash-step_N`` and then
  deleted, so an interrupted prune never leaves a half-deleted ``step_*``; stale ``.tmp-*`` and
  ``.trash-*`` directories are removed on resume.
* On resume, ``state.json`` is checked (its step is the directory's), every recorded checksum
  is verified (a flipped byte is an error naming the file), and every file is read with
  ``torch.load(weights_only=True)``: a crafted pickle is refused, not executed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .errors import CheckpointError, ConfigError, TrainingError

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{6,})$")
STATE_FILE = "state.json"
TMP, TRASH = ".tmp-", ".trash-"
ENGINE_FILES = ("model.pt", "optimizer.pt", "scheduler.pt")  # the torch format's; see required_files
RUN_CHECKPOINTS = "checkpoints"  # a run keeps its checkpoints in <run.output_dir>/checkpoints
# Keys of the resolved config that may differ on resume without being a change of the run.
RESUME_IGNORES = frozenset({"run.output_dir", "train.resume", "train.resume_allow_changes", "train.resume_fallback",
                            "train.num_workers", "train.threads"})


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


def run_checkpoints(output_dir: Path) -> List[Path]:
    """Complete checkpoints of the run that writes to ``output_dir``, oldest first."""
    return list_checkpoints(Path(output_dir) / RUN_CHECKPOINTS)


# ------------------------------------------------------------------------------ output directory

def check_output_dir(path, create: bool) -> Path:
    """``run.output_dir`` must be, or be able to become, a writable directory (its
    ``checkpoints`` too). ``create=False`` (``--validate``) checks without creating anything;
    ``create=True`` (before training) creates it and writes a probe file."""
    p = Path(path)
    for d in (p, p / RUN_CHECKPOINTS):
        if d.exists() and not d.is_dir():
            raise ConfigError(f"run.output_dir: {d} exists and is not a directory")
    if not create:
        ancestor = next(a for a in (p, *p.absolute().parents) if a.exists())
        if not ancestor.is_dir():
            raise ConfigError(f"run.output_dir: {ancestor} is a file, so {p} cannot be created")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ConfigError(f"run.output_dir: {ancestor} is not writable, so {p} cannot be written")
        return p
    probe = p / f"{TMP}write-probe-{os.getpid()}"
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"kdcore")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"run.output_dir {p} is not writable: {_reason(exc, p)}") from None
    return p


def _reason(exc: BaseException, directory: Path) -> str:
    """Why a write failed, with the free space left where it was written."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror + (f" ({exc.filename})" if exc.filename else "")
    else:
        text = (str(exc).splitlines() or [type(exc).__name__])[0]
    try:
        existing = next(a for a in (Path(directory), *Path(directory).absolute().parents) if a.exists())
        text += f"; {shutil.disk_usage(existing).free / 2**20:.0f} MiB free there"
    except (OSError, StopIteration):
        pass
    return text


def _on_every_rank(work: Callable[[], None], agree: Callable[[bool], bool], what: str, directory: Path,
                   cleanup: Optional[Callable[[], None]] = None) -> None:
    """Run this rank's part of a write; if it failed on any rank, undo (``cleanup``) and raise
    one :class:`CheckpointError` on every rank (no rank is left waiting for another)."""
    error = None
    try:
        work()
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        error = exc
    if agree(error is None):
        return
    if cleanup is not None:
        cleanup()
    reason = _reason(error, directory) if error is not None else "another process failed to write its part"
    raise CheckpointError(f"cannot write {what}: {reason}; earlier checkpoints are kept")


def _remove(path: Path) -> None:
    """Delete a directory by renaming it to ``.trash-*`` first (so it stops being a checkpoint at
    once), or a stray file of the same name."""
    if path.is_dir():
        trash = path.with_name(f"{TRASH}{path.name}")
        if trash.exists():
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists() or final.is_symlink():
        _remove(final)
    os.replace(tmp, final)


def clean_stale(*directories: Path) -> List[str]:
    """Remove ``.tmp-*`` and ``.trash-*`` entries (left by a crash) from ``directories``."""
    removed = []
    for d in directories:
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name.startswith((TMP, TRASH)):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p.name)
    return removed


# ------------------------------------------------------------------------------ RNG states

def rng_state() -> Dict:
    """This process's RNG states as tensors, ints and floats only (loadable with
    ``weights_only=True``): Python's ``random``, NumPy's global generator, torch (CPU, CUDA)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------ checksums, state

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(directory: Path) -> Dict[str, str]:
    """SHA-256 of every file under ``directory`` but ``state.json``, by relative POSIX path."""
    return {p.relative_to(directory).as_posix(): sha256_file(p)
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != STATE_FILE}


def read_state(path: Path) -> Dict:
    """``state.json`` of checkpoint ``path``, checked: a JSON object whose ``step`` is the
    directory's step, ``world_size`` a positive int, ``best`` null or a record, ``files`` a map
    of relative paths to SHA-256 digests."""
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{file}: not a readable JSON state file ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(state).__name__}")
    expected = int(STEP_DIR.match(path.name).group(1))
    if type(state.get("step")) is not int or state["step"] != expected:
        raise CheckpointError(f"{file}: 'step' must be {expected} (the directory's step), got {state.get('step')!r}")
    if type(state.get("world_size", 1)) is not int or state.get("world_size", 1) < 1:
        raise CheckpointError(f"{file}: 'world_size' must be a positive integer, got {state.get('world_size')!r}")
    if not isinstance(state.get("format", TorchFiles.name), str):
        raise CheckpointError(f"{file}: 'format' must be a format name, got {state.get('format')!r}")
    best = state.get("best")
    if best is not None and not (isinstance(best, dict) and type(best.get("step")) is int
                                 and isinstance(best.get("metric"), str) and isinstance(best.get("value"), (int, float))):
        raise CheckpointError(f"{file}: 'best' must be null or {{step, metric, value}}, got {best!r}")
    files = state.get("files")
    if files is not None and not (isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                                  for k, v in files.items())):
        raise CheckpointError(f"{file}: 'files' must map file names to SHA-256 digests")
    return state


def verify(path: Path, state: Dict) -> None:
    """Every file ``state.json`` records exists and has its recorded SHA-256; the engine's own
    files (of its format) are among them. A checkpoint without checksums (older kdcore) is
    loaded unverified."""
    files = state.get("files")
    if files is None:
        log.warning("checkpoint %s records no checksums (written by an older kdcore): loaded unverified", path)
        return
    for name in required_files(checkpoint_format(state.get("format", TorchFiles.name))):
        if name not in files:
            raise CheckpointError(f"checkpoint {path}: state.json records no checksum for {name}")
    root = path.resolve()
    for name, digest in files.items():
        file = (path / name).resolve()
        if root not in file.parents:
            raise CheckpointError(f"checkpoint {path}: state.json names a file outside the checkpoint: {name!r}")
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if sha256_file(file) != digest:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupt (its SHA-256 does not match the one recorded "
                                  "when it was written)")


def _jsonable(tree):
    """The resolved config as JSON stores it (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(tree, default=str))


def _flatten(tree, prefix: str = "") -> Dict[str, object]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: Dict[str, object] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(old: Dict, new: Dict) -> List[str]:
    """``key: old -> new`` for every dotted key whose value differs between two resolved
    configs (``RESUME_IGNORES`` aside: where outputs go and how fast data loads)."""
    a, b = _flatten(_jsonable(old)), _flatten(_jsonable(new))
    missing = object()
    changes = []
    for key in sorted(set(a) | set(b)):
        if key in RESUME_IGNORES or any(key.startswith(k + ".") for k in RESUME_IGNORES):
            continue
        before, after = a.get(key, missing), b.get(key, missing)
        if before != after:
            show = lambda v: "(absent)" if v is missing else json.dumps(v)
            changes.append(f"{key}: {show(before)} -> {show(after)}")
    return changes


# ------------------------------------------------------------------------------ save / load

class TorchFiles:
    """The ``torch`` format: ``model.pt`` (``module.state_dict()``) and ``optimizer.pt``,
    written by rank 0 (every rank holds the same replica)."""

    name = "torch"
    files = ("model.pt", "optimizer.pt")

    def write(self, directory: Path, module, optimizer, rank: int) -> None:
        if rank == 0:
            torch.save(module.state_dict(), directory / "model.pt")
            torch.save(optimizer.state_dict(), directory / "optimizer.pt")

    def read(self, directory: Path, module, optimizer, load: Callable) -> None:
        if _is_sharded(module):
            raise CheckpointError(f"checkpoint {directory} was written by train.strategy ddp (format 'torch'); a "
                                  "sharded (fsdp) run resumes only from fsdp checkpoints (format 'dcp')")
        module.load_state_dict(load(directory / "model.pt"))
        optimizer.load_state_dict(load(directory / "optimizer.pt"))


def _is_sharded(module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def checkpoint_format(name: str):
    """The reader/writer of a format named in ``state.json``."""
    from .sharding import DcpFiles

    formats = {TorchFiles.name: TorchFiles, DcpFiles.name: DcpFiles}
    if name not in formats:
        raise CheckpointError(f"unknown checkpoint format {name!r} (known: {', '.join(formats)})")
    return formats[name]()


def required_files(fmt) -> tuple:
    """The files every checkpoint of format ``fmt`` holds (checked by :func:`verify`)."""
    return (*fmt.files, "scheduler.pt", "rng_rank0.pt")


def save(root: Path, step: int, module, optimizer, scheduler, state: Dict, rank: int, world_size: int,
         agree: Callable[[bool], bool], extra: Optional[Callable[[Path], None]] = None, fmt=None) -> Path:
    """Write checkpoint ``step``. The format ``fmt`` (default :class:`TorchFiles`) writes model
    and optimizer; rank 0 the scheduler and state, every rank its RNG.

    ``agree(ok)`` tells every rank whether every rank's part succeeded (and synchronises them);
    ``extra(directory)`` runs on every rank after the engine's files are written and before the
    checksums and the rename (plugins' files, through the ``kdcore_checkpoint_save`` hook).
    """
    fmt = fmt or TorchFiles()
    final = step_dir(root, step)
    tmp = root / f"{TMP}{final.name}"
    what = f"checkpoint {final}"
    drop_tmp = lambda: shutil.rmtree(tmp, ignore_errors=True) if rank == 0 else None

    def make_tmp():
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def engine_files():
        torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
        fmt.write(tmp, module, optimizer, rank)
        if rank == 0:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")

    def seal():
        if rank == 0:
            record = {**state, "step": step, "world_size": world_size, "format": fmt.name,
                      "files": file_digests(tmp)}
            (tmp / STATE_FILE).write_text(json.dumps(_jsonable(record), indent=2))
            _replace_dir(tmp, final)

    _on_every_rank(make_tmp, agree, what, root)
    _on_every_rank(engine_files, agree, what, root, drop_tmp)
    if extra is not None:
        _on_every_rank(lambda: extra(tmp), agree, what, root, drop_tmp)
    _on_every_rank(seal, agree, what, root, drop_tmp)
    return final


def _load(file: Path, map_location=None):
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{file}: refused: it holds Python objects other than tensors and plain values "
                              "(kdcore never writes such files; loading one could run code)") from None


def load(path: Path, module, optimizer, scheduler, rank: int, map_location, state: Optional[Dict] = None) -> Dict:
    """Restore a checkpoint into the given objects; returns its ``state.json`` dict (read and
    checked by :func:`read_state` unless given)."""
    state = read_state(path) if state is None else state
    try:
        fmt = checkpoint_format(state.get("format", TorchFiles.name))
        fmt.read(path, module, optimizer, lambda file: _load(file, map_location))
        scheduler.load_state_dict(_load(path / "scheduler.pt"))
        rng_file = path / f"rng_rank{rank}.pt"
        if rng_file.is_file():
            set_rng_state(_load(rng_file))
        elif rank < state.get("world_size", 1):
            raise CheckpointError(f"checkpoint {path} is incomplete: {rng_file.name} is missing")
        else:
            log.warning("rank %d: %s holds no RNG state for it (written by %d processes); it keeps its seed",
                        rank, path, state.get("world_size", 1))
    except CheckpointError:
        raise
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {path} is incomplete: {exc.filename} is missing") from None
    except Exception as exc:  # truncated zip, shape mismatch, a state of the wrong structure: cannot resume from this
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or does not match this config: {first}") from None
    return state


def prune(root: Path, keep_last: int, protect: Optional[int] = None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, never the step ``protect`` (the best)."""
    ckpts = list_checkpoints(root)
    for path in ckpts[:-keep_last] if keep_last > 0 else ckpts:
        if protect is not None and path == step_dir(root, protect):
            continue
        _remove(path)


def all_finite(module) -> bool:
    """Whether every parameter of ``module`` is finite (no NaN, no ±inf); of a sharded module,
    whether this rank's shards are (callers agree over ranks)."""
    from torch.distributed.tensor import DTensor

    local = lambda p: p.to_local() if isinstance(p, DTensor) else p
    return all(bool(torch.isfinite(local(p)).all()) for p in module.parameters())


# ------------------------------------------------------------------------------ a run's checkpoints

class Checkpoints:
    """A run's ``checkpoints/`` plus its ``best/`` and ``final/`` student exports.

    ``best`` is ``{"step", "metric", "value"}`` of the best evaluation seen so far by
    ``select_by`` (``ce``: lowest; ``rouge_l``: highest; ties keep the earlier step; a
    non-finite value is never best).
    """

    def __init__(self, out: Path, dist, keep_last: int, select_by: str, fmt=None):
        self.out, self.root, self.dist = Path(out), Path(out) / RUN_CHECKPOINTS, dist
        self.keep_last, self.select_by, self.fmt = keep_last, select_by, fmt or TorchFiles()
        self.best: Optional[Dict] = None

    def agree(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (one all-reduce; synchronises the ranks)."""
        from .distributed import any_rank

        return not any_rank([not ok], self.dist)[0]

    def refuse_existing(self, resume: bool) -> None:
        if not resume and list_checkpoints(self.root):
            raise ConfigError(f"run.output_dir {self.out} already holds checkpoints; set train.resume=true to "
                              "continue that run, or choose another run.output_dir")

    def observe(self, step: int, eval_metrics: Optional[Dict[str, float]]) -> bool:
        """Update ``best`` with an evaluation; returns whether ``step`` is now the best."""
        key = self.select_by
        if eval_metrics is None or key not in eval_metrics:
            return False
        value = float(eval_metrics[key])
        if not np.isfinite(value):
            log.warning("eval %s at step %d is %s: not a candidate for best/", key, step, value)
            return False
        old = self.best["value"] if self.best is not None else None
        if old is None or (value > old if key == "rouge_l" else value < old):
            self.best = {"step": step, "metric": key, "value": value}
            return True
        return False

    def save(self, step: int, module, optimizer, scheduler, state: Dict, extra=None) -> Path:
        """Checkpoint ``step`` (``best`` is part of its state), then prune old ones. Weights that
        are not finite are never saved: that is a :class:`TrainingError`."""
        if not self.agree(all_finite(module)):
            good = latest(self.root)
            raise TrainingError(f"the weights are not finite after step {step} (is train.lr too high?); they are not "
                                f"saved; the last good checkpoint is {good or 'none'}")
        path = save(self.root, step, module, optimizer, scheduler, {"best": self.best, **state}, self.dist.rank,
                    self.dist.world_size, self.agree, extra, self.fmt)
        if self.dist.is_main:
            prune(self.root, self.keep_last, self.best["step"] if self.best else None)
        self.agree(True)
        return path

    def restore(self, module, optimizer, scheduler, device, config: Optional[Dict] = None,
                allow_changes: bool = False, fallback: bool = False) -> Optional[tuple]:
        """``(path, state)`` of the newest checkpoint that passes its checks, restored into the
        objects, or ``None`` (with a warning: ``train.resume`` on an empty directory starts from
        scratch). A checkpoint that fails its checks is an error, or with ``fallback`` skipped
        for the previous one. ``config`` (the resolved config) must equal the checkpoint's
        unless ``allow_changes``: then the new optimizer hyperparameters and schedule apply."""
        from .optim import hyperparameters, set_hyperparameters

        if self.dist.is_main:
            removed = clean_stale(self.root, self.out)
            if removed:
                log.info("removed stale %s", ", ".join(removed))
        self.agree(True)
        path, state = self._newest_valid(fallback)
        if path is None:
            log.warning("train.resume=true but %s holds no checkpoint: starting from scratch", self.root)
            return None
        changes = config_changes(state["config"], config) if config is not None and "config" in state else []
        if changes and not allow_changes:
            raise ConfigError(f"train.resume: the config differs from the one {path} was trained with: "
                              f"{'; '.join(changes)}. Set train.resume_allow_changes=true to continue with the new "
                              "values, or resume with the old ones")
        fresh = hyperparameters(optimizer, scheduler)
        load(path, module, optimizer, scheduler, self.dist.rank, device, state)
        if changes:
            set_hyperparameters(optimizer, scheduler, fresh)
            log.warning("resuming with a changed config (train.resume_allow_changes): %s", "; ".join(changes))
        self.best = state.get("best")
        if state.get("world_size", 1) != self.dist.world_size:
            log.warning("resuming a %s-process run with %s processes", state.get("world_size"), self.dist.world_size)
        if self.dist.is_main:
            print(f"resumed from {path} at step {state['step']}", flush=True)
        return path, state

    def _newest_valid(self, fallback: bool):
        candidates = list_checkpoints(self.root)[::-1]
        for i, path in enumerate(candidates):
            try:
                state = read_state(path)
                verify(path, state)
                return path, state
            except CheckpointError as exc:
                if not fallback:
                    raise CheckpointError(f"{exc} (train.resume_fallback=true resumes from the previous checkpoint "
                                          "instead)") from None
                if i == len(candidates) - 1:
                    raise CheckpointError(f"no checkpoint in {self.root} passes its checks; the oldest: {exc}") from None
                log.warning("%s; falling back to %s", exc, candidates[i + 1])
        return None, None

    def export(self, name: str, tuner, model, tokenizer, final: bool,
               gather: Optional[Callable[[], object]] = None) -> Optional[Path]:
        """The student as ``out/name`` (``final``: the tuner's plain export, loadable by plain
        transformers), written to a temporary directory and renamed into place. A non-finite
        student is never exported: ``best`` is skipped with a warning, ``final`` is an error.
        ``gather()`` (a sharded student; run on every rank) returns the whole model rank 0 saves."""
        if not self.agree(all_finite(model)):
            if final:
                raise TrainingError(f"the trained student is not finite: {self.out / name} is not written; the last "
                                    f"good checkpoint is {latest(self.root) or 'none'}")
            log.warning("the student is not finite: %s is not updated", self.out / name)
            return None
        target, tmp = self.out / name, self.out / f"{TMP}{name}"
        whole = gather() if gather is not None else model

        def write():
            if self.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                tuner.save_student(whole, tmp, final=final)
                tokenizer.save_pretrained(tmp)
                _replace_dir(tmp, target)

        cleanup = lambda: shutil.rmtree(tmp, ignore_errors=True) if self.dist.is_main else None
        _on_every_rank(write, self.agree, f"{target}", self.out, cleanup)
        return target



class RunCheckpoints:
    """What one training run saves, exports and resumes from, over its :class:`Checkpoints`.

    A checkpoint of step ``N`` holds the student side (``objects``: the distilled module, the
    optimizer, the schedule), ``total_steps``, the resolved config, the step guard's skip counts
    (:meth:`kdcore.guard.StepGuard.record`) and the files the ``kdcore_checkpoint_save`` hooks
    write into it. ``best/`` and ``final/`` are the tuner's student exports; under fsdp the
    sharded student is first gathered into a plain copy on rank 0 (``sharding.gatherer``).
    """

    def __init__(self, store: Checkpoints, config, parts, objects: tuple, guard, sharding):
        self.store, self.root, self.cfg, self.parts = store, store.root, config, parts
        self.objects, self.guard, self.sharding = objects, guard, sharding  # objects: (module, optimizer, scheduler)
        self.saved_step: Optional[int] = None  # the step this run last checkpointed or resumed from

    def save(self, step: int, total_steps: int, hooks) -> None:
        state = {"total_steps": total_steps, "config": self.cfg.resolved, **self.guard.record()}
        self.store.save(step, *self.objects, state,
                        extra=lambda d: hooks.call("kdcore_checkpoint_save", step=step, directory=d))
        self.saved_step = step

    def export(self, name: str) -> None:
        """``best/`` (an export while training) or ``final/`` (the tuner's plain export)."""
        from .models import load_model

        p = self.parts
        rebuild = lambda: p.tuner.apply(load_model(self.cfg.student))  # the unsharded student fsdp gathers into
        self.store.export(name, p.tuner, p.student_model, p.student_tokenizer, final=name == "final",
                          gather=self.sharding.gatherer(p.student_model, rebuild))

    def resume(self, device) -> Optional[tuple]:
        """``(directory, state)`` of the newest valid checkpoint, restored into the objects and the
        step guard, when ``train.resume``; else ``None``."""
        t = self.cfg.train
        restored = self.store.restore(*self.objects, device, config=self.cfg.resolved,
                                      allow_changes=t.resume_allow_changes,
                                      fallback=t.resume_fallback) if t.resume else None
        if restored is not None:
            self.saved_step = restored[1]["step"]
            self.guard.restore(restored[1])
        return restored
