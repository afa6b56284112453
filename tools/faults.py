#!/usr/bin/env python
"""Fault injection on the tiny pair: issue #15's hostile-user probes, re-run, as one table.

    python tools/faults.py [--work DIR] [--only PROBE ...] [--seed N] [--scale X]

Builds the tiny pair (seconds), then runs each probe against ``kd-train`` (in this process when
the probe needs to patch something, as a subprocess when it kills or signals) and prints a
Markdown table: probe | trials | result. ``--scale`` multiplies the trial counts (1 takes about
5 minutes on a 2-core CPU). Nothing is mocked but what the probe names: a full disk is
``torch.save`` raising ENOSPC, a read-only file system is ``os.open`` raising EROFS (this runs
as root, which ignores permission bits), everything else is real input, real kills and real
signals. Probes:

kill9            kill -9 at a random moment, then train.resume=true: final weights vs an uninterrupted run
kill9_checkpoint kill -9 in the middle of a checkpoint write (held there by a test plugin), then resume
fuzz_validate    mutated configs (kdcore.fuzz) through --validate: clean errors, tracebacks, accepted
fuzz_run         accepted mutated configs, then 2 real steps
hostile_yaml     non-UTF-8 bytes, a 5,000-digit integer, deep nesting, bad plugin modules, keys twice
bad_data         damaged data files (--validate, then 2 steps when accepted)
nonfinite        a NaN / inf loss or a NaN gradient at step 5 of 30, and train.lr=1e4
corrupt_resume   damaged newest checkpoint (flipped bytes, bad state.json, missing files), then resume
crafted_pickle   a rng_rank0.pt whose unpickling runs code (checksums forged to match), then resume
ddp_eval         torchrun-style 2 gloo ranks, fewer eval examples than ranks
ddp_equal        2 gloo ranks vs one process accumulating the same global batch
changed_config   resume with a changed lr and max_steps: refused, then allowed
best             best/ against every eval of a run
disk             read-only output dir, full disk during a checkpoint (then resume after "freeing space")
sigterm          SIGTERM after step 1, then resume
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "kdcore-instruct"
FIXTURE_PLUGINS = REPO / "tests" / "fixtures" / "local_plugins"

import torch  # noqa: E402
import yaml  # noqa: E402


class Lab:
    """The tiny pair, a base config, and ways to run kd-train on it."""

    def __init__(self, work: Path, seed: int):
        from kdcore.tiny import make_tiny_pair

        self.work, self.rng = work, random.Random(seed)
        self.pair = make_tiny_pair(work / "pair", DATA)
        self.count = 0
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FIXTURE_PLUGINS), os.environ.get("PYTHONPATH", "")]),
                    "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "KDCORE_CACHE": str(work / "cache")}
        os.environ["KDCORE_CACHE"] = str(work / "cache")
        sys.path.insert(0, str(FIXTURE_PLUGINS))

    def config(self, out: str = None, **sections) -> Path:
        """A config file: the base (8 steps of 2 examples, identity + fkl) updated by sections."""
        self.count += 1
        cfg = {"schema_version": 1, "run": {"output_dir": str(self.work / (out or f"run{self.count}")), "seed": 3},
               "teacher": {"path": str(self.pair["teacher"])}, "student": {"path": str(self.pair["student_same"])},
               "task": {"name": "instruction", "data_dir": str(DATA), "max_length": 96, "max_prompt_length": 64,
                        "max_examples": 32},
               "criterion": {"name": "fkl", "temperature": 2.0}, "objective": {"kd_weight": 0.5},
               "train": {"max_steps": 8, "micro_batch_size": 2, "lr": 1e-3, "eval_at_start": False, "threads": 1},
               "eval": {"max_examples": 8}}
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict) and value.get("name", cfg[key].get("name")) == cfg[key].get("name"):
                cfg[key].update(value)
            else:
                cfg[key] = value
        path = self.work / f"config{self.count}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    @staticmethod
    def out(config: Path) -> Path:
        return Path(yaml.safe_load(config.read_text())["run"]["output_dir"])

    def main(self, *args) -> Tuple[str, str]:
        """kd-train in this process: ('ok' | 'error' | 'traceback', the error line or exception)."""
        from kdcore.cli import main

        err, out = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                code = main([str(a) for a in args])
        except BaseException as exc:  # escaping main: what a user would see as a traceback
            return "traceback", f"{type(exc).__name__}: {str(exc)[:200]}"
        lines = [line for line in err.getvalue().splitlines() if line.startswith("kd-train: error:")]
        if code == 0:
            return "ok", out.getvalue()
        if code == 2 and len(lines) == 1 and "Traceback" not in err.getvalue():
            return "error", lines[0]
        return "traceback", err.getvalue()[-300:]

    def spawn(self, *args, **env) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "kdcore.cli", *map(str, args)], env={**self.env, **env},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, *args, timeout=300, **env) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kdcore.cli", *map(str, args)], env={**self.env, **env},
                              capture_output=True, text=True, timeout=timeout)


def model_state(ckpt_dir: Path) -> Dict[str, torch.Tensor]:
    return torch.load(ckpt_dir / "model.pt", weights_only=True)


def identical(a: Dict, b: Dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def final_checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:06d}"


def wait_for(path: Path, proc: subprocess.Popen, limit: float = 120) -> bool:
    deadline = time.monotonic() + limit
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return path.exists()


# ------------------------------------------------------------------------------ probes

def _first_step(out: Path, proc: subprocess.Popen) -> float:
    """Wait until the run in ``out`` has logged its first train step; returns when that was."""
    log = out / "metrics.jsonl"
    while proc.poll() is None and not (log.is_file() and '"train"' in log.read_text()):
        time.sleep(0.01)
    return time.monotonic()


def probe_kill9(lab: Lab, trials: int) -> Tuple[int, str]:
    from kdcore.checkpoint import run_checkpoints

    train = {"max_steps": 16, "save_every": 3, "keep_last": 2}
    ref = lab.config("kill-ref", train=train)
    proc = lab.spawn("--config", ref)
    first = _first_step(lab.out(ref), proc)
    proc.communicate()
    span = time.monotonic() - first  # training (and the final export) after the first step
    want = model_state(final_checkpoint(lab.out(ref), 16))
    same, landed = 0, []
    for t in range(trials):
        cfg = lab.config(f"kill-{t}", train=train)
        proc = lab.spawn("--config", cfg)
        _first_step(lab.out(cfg), proc)
        time.sleep(lab.rng.uniform(0.0, 0.7) * span)
        proc.kill()
        proc.wait()
        done = run_checkpoints(lab.out(cfg))
        landed.append(int(done[-1].name[5:]) if done else 0)
        resumed = lab.run("--config", cfg, "train.resume=true")
        same += resumed.returncode == 0 and identical(want, model_state(final_checkpoint(lab.out(cfg), 16)))
    return trials, (f"{same}/{trials} final weights bit-identical to an uninterrupted run (newest complete checkpoint "
                    f"at each kill: step {', '.join(map(str, landed))} of 16)")


def probe_kill9_checkpoint(lab: Lab, trials: int) -> Tuple[int, str]:
    from kdcore.checkpoint import read_state, run_checkpoints, verify

    train = {"max_steps": 6, "save_every": 1, "keep_last": 1}
    plugins = ["kdcore_pause"]
    ref = lab.config("ckpt-ref", train=train, plugins=plugins)
    assert lab.run("--config", ref).returncode == 0
    want = model_state(final_checkpoint(lab.out(ref), 6))
    same = clean = stale = 0
    for t in range(trials):
        cfg = lab.config(f"ckpt-kill-{t}", train=train, plugins=plugins)
        marker = lab.work / f"ckpt-marker-{t}"
        marker.mkdir()
        step = 2 + t % 4
        proc = lab.spawn("--config", cfg, KDCORE_TEST_SLOW_CHECKPOINT_DIR=str(marker),
                         KDCORE_TEST_SLOW_CHECKPOINT_STEP=str(step))
        wait_for(marker / "writing", proc)
        proc.kill()
        proc.wait()
        root = lab.out(cfg) / "checkpoints"
        stale += any(p.name.startswith(".tmp-") for p in root.iterdir())
        done = run_checkpoints(lab.out(cfg))
        clean += all(verify(d, read_state(d)) is None for d in done) and bool(done) and done[-1].name == f"step_{step - 1:06d}"
        resumed = lab.run("--config", cfg, "train.resume=true")
        leftovers = [p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
        same += resumed.returncode == 0 and not leftovers and identical(want, model_state(final_checkpoint(lab.out(cfg), 6)))
    return trials, (f"{clean}/{trials} killed mid-write left only complete, verified checkpoints (the newest the step "
                    f"before); {stale}/{trials} left a .tmp-step_* behind, removed on resume; {same}/{trials} resumed "
                    "to weights identical to an uninterrupted run")


def _fuzz(lab: Lab, count: int, seed: int):
    from kdcore.config import validate
    from kdcore.fuzz import SYNTAX_ERROR_MODULE, SYNTAX_ERROR_SOURCE, leaf_paths, mutations
    from kdcore.registry import reset_registry

    mods = lab.work / "fuzz-modules"
    mods.mkdir(exist_ok=True)
    (mods / f"{SYNTAX_ERROR_MODULE}.py").write_text(SYNTAX_ERROR_SOURCE)
    sys.path.insert(0, str(mods))
    base = yaml.safe_load(lab.config("fuzz").read_text())
    paths = leaf_paths(validate(base).resolved)
    results = []
    for i, m in enumerate(mutations(base, count, seed=seed, paths=paths)):
        path = lab.work / "fuzz.yaml"
        path.write_bytes(m.text)
        kind, detail = lab.main("--config", path, "--validate")
        results.append((m, kind, detail))
        if b"plugins" in m.text:
            reset_registry()
    return results


def probe_fuzz_validate(lab: Lab, trials: int) -> Tuple[int, str]:
    results = _fuzz(lab, trials, seed=lab.rng.randrange(10**6))
    lab.fuzzed = results
    counts = {k: sum(r[1] == k for r in results) for k in ("error", "traceback", "ok")}
    worst = [f"{m.name}: {d}" for m, k, d in results if k == "traceback"][:3]
    return trials, (f"{counts['error']} clean errors, {counts['traceback']} tracebacks, {counts['ok']} accepted"
                    + (f" — {'; '.join(worst)}" if worst else ""))


def probe_fuzz_run(lab: Lab, trials: int) -> Tuple[int, str]:
    accepted = [m for m, k, _ in getattr(lab, "fuzzed", None) or _fuzz(lab, 200, 1) if k == "ok"][:trials]
    outcome = {"ok": 0, "error": 0, "traceback": 0}
    bad = []
    for i, m in enumerate(accepted):
        path = lab.work / f"accepted{i}.yaml"
        path.write_bytes(m.text)
        kind, detail = lab.main("--config", path, f"run.output_dir={lab.work / f'accepted-run{i}'}", "train.max_steps=2",
                                "train.resume=false")
        outcome[kind] += 1
        if kind == "traceback":
            bad.append(f"{m.name}: {detail}")
    return len(accepted), (f"{outcome['ok']} trained, {outcome['error']} clean errors at run time, "
                           f"{outcome['traceback']} tracebacks" + (f" — {'; '.join(bad[:3])}" if bad else ""))


def probe_hostile_yaml(lab: Lab, trials: int) -> Tuple[int, str]:
    text = lab.config("yaml").read_bytes()
    mods = lab.work / "fuzz-modules"
    mods.mkdir(exist_ok=True)
    from kdcore.fuzz import SYNTAX_ERROR_MODULE, SYNTAX_ERROR_SOURCE

    (mods / f"{SYNTAX_ERROR_MODULE}.py").write_text(SYNTAX_ERROR_SOURCE)
    sys.path.insert(0, str(mods))
    cases = {
        "0xff first": b"\xff" + text, "latin-1 comment": text.replace(b"lr: 0.001", b"lr: 0.001 # caf\xe9"),
        "UTF-16": text.decode().encode("utf-16"), "lone continuation byte": text.replace(b"train:", b"train\x80:"),
        "5,000-digit integer": text.replace(b"lr: 0.001", b"lr: " + b"9" * 5000),
        "nesting 10,000 deep": text + b"x: " + b"[" * 10000 + b"]" * 10000 + b"\n",
        "nesting 100 deep": text + b"x: " + b"[" * 100 + b"]" * 100 + b"\n",
        "plugin with a syntax error": text + f"plugins: [{SYNTAX_ERROR_MODULE}]\n".encode(),
        "empty plugin name": text + b"plugins: ['']\n",
        "lr twice": text.replace(b"lr: 0.001", b"lr: 0.001\n  lr: 0.5"),
        "two train sections": text + b"train:\n  lr: 0.5\n",
    }
    kinds = {}
    for name, data in cases.items():
        path = lab.work / "hostile.yaml"
        path.write_bytes(data)
        kinds[name] = lab.main("--config", path, "--validate")[0]
    errors = sum(k == "error" for k in kinds.values())
    others = [f"{n}: {k}" for n, k in kinds.items() if k != "error"]
    return len(cases), f"{errors}/{len(cases)} clean errors" + (f" ({'; '.join(others)})" if others else "")


def probe_bad_data(lab: Lab, trials: int) -> Tuple[int, str]:
    lines = (DATA / "train.jsonl").read_bytes().splitlines(keepends=True)
    good = b"".join(lines)
    record = b'{"instruction": "x", "output": "y"}\n'
    variants = {
        "1 example (< one global batch of 2)": lines[0], "one global batch exactly": b"".join(lines[:2]),
        "UTF-8 BOM": b"\xef\xbb\xbf" + good, "CRLF line ends": good.replace(b"\n", b"\r\n"),
        "blank lines": good.replace(b"\n", b"\n\n"), "non-UTF-8 byte": lines[0] + b'{"instruction": "\xff", "output": "y"}\n',
        "invalid JSON": lines[0] + b"{oops\n", "a JSON list": lines[0] + b"[1, 2]\n", "no output": lines[0] + b'{"instruction": "x"}\n',
        "output not a string": lines[0] + b'{"instruction": "x", "output": 5}\n',
        "empty references": lines[0] + b'{"instruction": "x", "output": []}\n',
        "input not a string": lines[0] + b'{"instruction": "x", "input": 3, "output": "y"}\n',
        "JSON nested 100,000 deep": lines[0] + b"[" * 100000 + b"]" * 100000 + b"\n",
        "5,000-digit number": lines[0] + b'{"instruction": "x", "output": "y", "n": 1' + b"0" * 5000 + b"}\n",
        "empty file": b"", "only whitespace": b"\n \n", "truncated last line": good[:-40],
        "empty response": record.replace(b'"y"', b'""') * 40, "huge line": lines[0] + record.replace(b'"y"', b'"' + b"w " * 200000 + b'"'),
        "NUL bytes": lines[0] + b'{"instruction": "x\\u0000", "output": "y\x00"}\n',
    }
    outcome = {"ok": 0, "error": 0, "traceback": 0}
    notes = []
    for i, (name, data) in enumerate(variants.items()):
        d = lab.work / f"data{i}"
        d.mkdir()
        (d / "train.jsonl").write_bytes(data)
        shutil.copy(DATA / "valid.jsonl", d / "valid.jsonl")
        cfg = lab.config(f"data-run{i}", task={"data_dir": str(d), "max_examples": None},  # read every line
                         train={"max_steps": 2, "micro_batch_size": 2})
        kind, detail = lab.main("--config", cfg, "--validate")
        if kind == "ok":
            kind, detail = lab.main("--config", cfg)
            if kind == "ok":
                notes.append(name)
        outcome[kind] += 1
    return len(variants), (f"{outcome['error']} clean errors (file:line), {outcome['traceback']} tracebacks, "
                           f"{outcome['ok']} accepted and trained ({', '.join(notes)})")


def probe_nonfinite(lab: Lab, trials: int) -> Tuple[int, str]:
    from kdcore.checkpoint import all_finite

    variants = {p: {"plugins": ["kdcore_nan_criterion"], "criterion": {"name": "nan_fkl", "temperature": 2.0,
                                                                          "poison_steps": [5], "poison": p}}
                for p in ("loss_nan", "loss_inf", "grad_nan")}
    variants["train.lr=1e4"] = {"train": {"lr": 0.1}}
    results = []
    for name, extra in variants.items():
        train = {"max_steps": 30, "micro_batch_size": 1, **extra.pop("train", {})}
        cfg = lab.config(f"nonfinite-{name}", train=train, **extra)
        kind, detail = lab.main("--config", cfg)
        out = lab.out(cfg)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").is_file() else []
        skipped = [r["step"] for r in records if r.get("split") == "train" and r.get("skipped")]
        finite = True
        for export in ("final", "best"):
            if (out / export / "config.json").is_file():
                from transformers import AutoModelForCausalLM

                finite &= all_finite(AutoModelForCausalLM.from_pretrained(out / export))
        results.append(f"{name}: {'exit 0' if kind == 'ok' else kind}, skipped steps {skipped or 'none'}, "
                       f"final/ and best/ {'finite' if finite else 'NOT FINITE'}")
    return len(variants), "; ".join(results)


def _corruptions(ckpt: Path) -> Dict[str, Callable[[], None]]:
    def flip(name, at):
        def do():
            data = bytearray((ckpt / name).read_bytes())
            data[at % len(data)] ^= 0x10
            (ckpt / name).write_bytes(bytes(data))
        return do

    def state(text):
        return lambda: (ckpt / "state.json").write_text(text)

    def edit_state(**changes):
        def do():
            s = json.loads((ckpt / "state.json").read_text())
            s.update(changes)
            (ckpt / "state.json").write_text(json.dumps(s))
        return do

    cases = {f"flip {n} @{at}": flip(n, at) for n in ("model.pt", "optimizer.pt") for at in (100, -200, -4000, 2000)}
    cases.update({
        "flip scheduler.pt": flip("scheduler.pt", -50), "flip rng_rank0.pt": flip("rng_rank0.pt", -50),
        "truncate model.pt": lambda: (ckpt / "model.pt").write_bytes((ckpt / "model.pt").read_bytes()[:1000]),
        "empty optimizer.pt": lambda: (ckpt / "optimizer.pt").write_bytes(b""),
        "delete model.pt": lambda: (ckpt / "model.pt").unlink(), "delete rng_rank0.pt": lambda: (ckpt / "rng_rank0.pt").unlink(),
        "state.json not JSON": state("{oops"), "state.json a list": state("[1]"), "state.json no step": edit_state(step=None),
        "step as string": edit_state(step="8"), "step 3": edit_state(step=3), "step -4": edit_state(step=-4),
        "world_size 0": edit_state(world_size=0), "files forged empty": edit_state(files={}),
        "state.json not UTF-8": lambda: (ckpt / "state.json").write_bytes(b"\xff\xfe{}"),
        "model.pt a directory": lambda: ((ckpt / "model.pt").unlink(), (ckpt / "model.pt").mkdir()),
    })
    return cases


def probe_corrupt_resume(lab: Lab, trials: int) -> Tuple[int, str]:
    train = {"max_steps": 4, "save_every": 2, "keep_last": 3}
    ref = lab.config("corrupt-ref", train=train)
    assert lab.main("--config", ref)[0] == "ok"
    names = list(_corruptions(final_checkpoint(lab.out(ref), 4)))
    outcome = {"ok": 0, "error": 0, "traceback": 0}
    fallback = 0
    silent = []
    for i, name in enumerate(names):
        out = lab.work / f"corrupt-{i}"
        shutil.copytree(lab.out(ref), out)
        _corruptions(final_checkpoint(out, 4))[name]()
        kind, detail = lab.main("--config", ref, f"run.output_dir={out}", "train.resume=true", "train.max_steps=6",
                                "train.resume_allow_changes=true")
        outcome[kind] += 1
        if kind == "ok":
            silent.append(name)
        again = lab.main("--config", ref, f"run.output_dir={out}", "train.resume=true", "train.max_steps=6",
                         "train.resume_allow_changes=true", "train.resume_fallback=true")
        fallback += again[0] == "ok"
    return len(names), (f"{outcome['error']} clean errors naming the file, {outcome['traceback']} tracebacks, "
                        f"{outcome['ok']} loaded silently{(' (' + ', '.join(silent) + ')') if silent else ''}; with "
                        f"train.resume_fallback=true {fallback}/{len(names)} resumed from the previous checkpoint")


def probe_crafted_pickle(lab: Lab, trials: int) -> Tuple[int, str]:
    from kdcore.checkpoint import file_digests

    cfg = lab.config("pickle", train={"max_steps": 2, "save_every": 1})
    assert lab.main("--config", cfg)[0] == "ok"
    ckpt = final_checkpoint(lab.out(cfg), 2)
    marker = lab.work / "pwned"
    payload = b"\x80\x04cbuiltins\nexec\n(Vopen(%r, 'w').write('ran')\ntR." % str(marker).encode()
    (ckpt / "rng_rank0.pt").write_bytes(payload)
    state = json.loads((ckpt / "state.json").read_text())
    state["files"] = file_digests(ckpt)
    (ckpt / "state.json").write_text(json.dumps(state))
    kind, detail = lab.main("--config", cfg, "train.resume=true")
    ran = marker.exists()
    return 1, f"code {'RAN' if ran else 'did not run'}; resume: {kind} ({detail.replace('kd-train: error: ', '')[:110]}...)"


def _two_ranks(lab: Lab, cfg: Path, *overrides, timeout=300) -> List[int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [lab.spawn("--config", cfg, *overrides, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for r in range(2)]
    codes = []
    for p in procs:
        try:
            p.communicate(timeout=timeout)
            codes.append(p.returncode)
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(None)
    return codes


def probe_ddp_eval(lab: Lab, trials: int) -> Tuple[int, str]:
    finished = 0
    for t in range(trials):
        cfg = lab.config(f"ddp-eval-{t}", train={"max_steps": 3, "micro_batch_size": 1, "eval_every": 1, "eval_at_start": True},
                         eval={"max_examples": 1 + t % 2, "batch_size": 1 + t % 2})
        finished += _two_ranks(lab, cfg, timeout=240) == [0, 0]
    return trials, f"{finished}/{trials} finished (no hang; every rank joins every collective, empty shard included)"


def probe_ddp_equal(lab: Lab, trials: int) -> Tuple[int, str]:
    cfg = lab.config("ddp-2", train={"max_steps": 3, "micro_batch_size": 2, "save_every": 3})
    codes = _two_ranks(lab, cfg)
    single = lab.config("ddp-1", train={"max_steps": 3, "micro_batch_size": 2, "grad_accum": 2, "save_every": 3})
    assert lab.run("--config", single).returncode == 0
    a, b = model_state(final_checkpoint(lab.out(cfg), 3)), model_state(final_checkpoint(lab.out(single), 3))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    return 1, f"exit {codes}; max |2 ranks − 1 process with grad_accum 2| over the weights after 3 steps: {diff:.2e}"


def probe_changed_config(lab: Lab, trials: int) -> Tuple[int, str]:
    cfg = lab.config("changed", train={"max_steps": 3, "save_every": 1})
    assert lab.main("--config", cfg)[0] == "ok"
    refused, detail = lab.main("--config", cfg, "train.resume=true", "train.lr=0.002", "train.max_steps=5",
                               "train.micro_batch_size=4")
    allowed, _ = lab.main("--config", cfg, "train.resume=true", "train.lr=0.002", "train.max_steps=5",
                          "train.micro_batch_size=4", "train.resume_allow_changes=true")
    steps = [json.loads(line)["step"] for line in (lab.out(cfg) / "metrics.jsonl").read_text().splitlines()
             if '"train"' in line]
    listed = detail.count("->")
    return 1, (f"without train.resume_allow_changes: {refused}, {listed} changes listed; with it: {allowed}; "
               f"metrics.jsonl train steps {steps} (no duplicates: {len(steps) == len(set(steps))})")


def probe_best(lab: Lab, trials: int) -> Tuple[int, str]:
    every = 5  # a noisy eval (one example, batch 1) that is best between save steps
    cfg = lab.config("best", train={"max_steps": 12, "eval_every": 1, "save_every": every, "lr": 0.01, "micro_batch_size": 1},
                     eval={"max_examples": 1})
    assert lab.main("--config", cfg)[0] == "ok"
    out = lab.out(cfg)
    evals = {json.loads(l)["step"]: json.loads(l)["ce"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in l}
    best = json.loads((final_checkpoint(out, 12) / "state.json").read_text())["best"]
    want = min(evals, key=lambda s: (evals[s], s))
    on_save = min((s for s in evals if s % every == 0 or s == 12), key=lambda s: (evals[s], s))
    return 1, (f"best/ is step {best['step']} (ce {best['value']:.4f}); the best of all {len(evals)} evals is step {want}; "
               f"the best on a save step would be {on_save}")


def probe_disk(lab: Lab, trials: int) -> Tuple[int, str]:
    import kdcore.checkpoint as ckpt_mod

    notes = []
    cfg = lab.config("readonly")
    real_open = os.open

    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    ckpt_mod.os.open = read_only
    try:
        kind, detail = lab.main("--config", cfg)
    finally:
        ckpt_mod.os.open = real_open
    notes.append(f"read-only dir: {kind} before training")
    blocker = lab.work / "a-file"
    blocker.write_text("x")
    kind, _ = lab.main("--config", cfg, f"run.output_dir={blocker}", "--validate")
    notes.append(f"output_dir a file: {kind} at --validate")
    ref = lab.config("disk-ref", train={"max_steps": 4, "save_every": 1})
    assert lab.main("--config", ref)[0] == "ok"
    want = model_state(final_checkpoint(lab.out(ref), 4))
    for name, failure in (("ENOSPC", OSError(errno.ENOSPC, "No space left on device")),
                          ("torch 'unexpected pos'", RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"))):
        cfg = lab.config(f"full-{len(notes)}", train={"max_steps": 4, "save_every": 1})
        real_save = torch.save

        def save(obj, f, *a, **k):
            if ".tmp-step_000003" in str(f):
                raise failure
            return real_save(obj, f, *a, **k)

        torch.save = save
        try:
            kind, detail = lab.main("--config", cfg)
        finally:
            torch.save = real_save
        kept = (final_checkpoint(lab.out(cfg), 2) / "state.json").is_file()
        again, _ = lab.main("--config", cfg, "train.resume=true")
        same = identical(want, model_state(final_checkpoint(lab.out(cfg), 4)))
        notes.append(f"full disk ({name}): {kind}, previous checkpoint {'kept' if kept else 'LOST'}, resume {again}, "
                     f"{'bit-identical' if same else 'DIFFERENT'}")
    return 4, "; ".join(notes)


def probe_sigterm(lab: Lab, trials: int) -> Tuple[int, str]:
    train = {"max_steps": 4, "save_every": 2}
    ref = lab.config("sig-ref", train=train, plugins=["kdcore_pause"])
    assert lab.run("--config", ref).returncode == 0
    want = model_state(final_checkpoint(lab.out(ref), 4))
    ok = 0
    for t in range(trials):
        sig = (signal.SIGTERM, signal.SIGINT)[t % 2]
        cfg = lab.config(f"sig-{t}", train=train, plugins=["kdcore_pause"])
        pause = lab.work / f"pause-{t}"
        pause.mkdir()
        proc = lab.spawn("--config", cfg, KDCORE_TEST_PAUSE_DIR=str(pause))
        wait_for(pause / "stepped", proc)
        proc.send_signal(sig)
        (pause / "signalled").write_text("1")
        out, _ = proc.communicate(timeout=120)
        resumed = lab.run("--config", cfg, "train.resume=true")
        ok += (proc.returncode == 0 and "Resume with:" in out and resumed.returncode == 0
               and identical(want, model_state(final_checkpoint(lab.out(cfg), 4))))
    return trials, f"{ok}/{trials} (SIGTERM and SIGINT) exited 0 with a checkpoint and the resume command; resumed bit-identical"


PROBES: List[Tuple[str, str, Callable[[Lab, int], Tuple[int, str]], int]] = [
    ("kill9", "kill -9 at a random moment, then `train.resume=true`", probe_kill9, 4),
    ("kill9_checkpoint", "kill -9 while a checkpoint is being written", probe_kill9_checkpoint, 4),
    ("fuzz_validate", "mutated configs, `--validate`", probe_fuzz_validate, 265),
    ("fuzz_run", "accepted configs, then 2 real steps", probe_fuzz_run, 12),
    ("hostile_yaml", "hostile YAML (not UTF-8, huge literal, deep, plugins, keys twice), `--validate`", probe_hostile_yaml, 1),
    ("bad_data", "bad data", probe_bad_data, 1),
    ("nonfinite", "a NaN/inf loss or NaN gradient at step 5, 30 steps; `train.lr=1e4`", probe_nonfinite, 1),
    ("corrupt_resume", "corrupted newest checkpoint, then resume", probe_corrupt_resume, 1),
    ("crafted_pickle", "a crafted `rng_rank0.pt` (checksums forged)", probe_crafted_pickle, 1),
    ("ddp_eval", "2 gloo ranks, fewer eval examples than ranks, micro batch 1", probe_ddp_eval, 2),
    ("ddp_equal", "2 gloo ranks vs 1 process accumulating", probe_ddp_equal, 1),
    ("changed_config", "resume with a changed config (lr, batch, steps)", probe_changed_config, 1),
    ("best", "best checkpoint", probe_best, 1),
    ("disk", "read-only output dir, output dir a file, full disk", probe_disk, 1),
    ("sigterm", "SIGTERM / SIGINT after step 1, then resume", probe_sigterm, 2),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", help="keep the runs in a new time-stamped directory under WORK (default: a temporary "
                                  "directory, removed afterwards)")
    p.add_argument("--only", nargs="*", choices=[name for name, *_ in PROBES], help="run only these probes")
    p.add_argument("--seed", type=int, default=15, help="seed of kill times and mutations")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the trial counts of repeated probes")
    args = p.parse_args(argv)
    from kdcore.console import setup_logging

    setup_logging()
    import logging

    logging.getLogger("kdcore").setLevel(logging.ERROR)
    work = Path(args.work) / time.strftime("%Y%m%d-%H%M%S") if args.work else Path(tempfile.mkdtemp(prefix="kdcore-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    lab = Lab(work, args.seed)
    rows = ["| probe | trials | result |", "|---|---:|---|"]
    print(f"tiny pair built in {time.monotonic() - start:.0f} s under {work}", file=sys.stderr)
    try:
        for name, title, fn, trials in PROBES:
            if args.only and name not in args.only:
                continue
            t0 = time.monotonic()
            n = max(1, round(trials * args.scale)) if trials > 1 else 1
            try:
                count, result = fn(lab, n)
            except Exception as exc:  # a probe that breaks is a result too
                count, result = n, f"PROBE FAILED: {type(exc).__name__}: {exc}"
            rows.append(f"| {title} | {count} | {result} |")
            print(f"{name}: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(rows))
    print(f"\n{time.monotonic() - start:.0f} s in all", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
