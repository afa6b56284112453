"""Reliability and safety: bad input is one clear error, non-finite steps never reach the
weights, checkpoints are verified and cannot run code, distributed evaluation never hangs,
preemption is safe, and a full or unwritable disk is one error that keeps the last checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kdcore import checkpoint as ckpt
from kdcore.checkpoint import Checkpoints, file_digests, read_state, step_dir
from kdcore.cli import main
from kdcore.config import load_config
from kdcore.distributed import DistInfo
from kdcore.errors import CheckpointError, ConfigError, DataError, TrainingError
from kdcore.registry import reset_registry
from kdcore.trainer import Trainer

HERE = Path(__file__).parent
LOCAL = HERE / "fixtures" / "local_plugins"
REPO = HERE.parent


# ------------------------------------------------------------------------------ helpers

@pytest.fixture
def local_plugins(monkeypatch):
    monkeypatch.syspath_prepend(str(LOCAL))
    reset_registry()
    yield
    for name in ("kdcore_nan_criterion", "kdcore_pause"):
        sys.modules.pop(name, None)
    reset_registry()


@pytest.fixture
def cli(capsys):
    """``kd-train`` in-process: (status, stdout, stderr)."""

    def run(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("kd-train: error: ")]
    assert len(errors) == 1, err
    return errors[0]


def weights(path: Path):
    return torch.load(path / "model.pt", weights_only=True)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def train(config, *overrides):
    trainer = Trainer(load_config(config, list(overrides)), DistInfo())
    trainer.train()
    return trainer


def params(trainer):
    return {n: p.detach().clone() for n, p in trainer.module.named_parameters()}


# ------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("override, message", [
    ("train.lr=.nan", "train.lr: must be a finite number, got nan"),
    ("train.lr=-0.001", "train.lr: must be > 0, got -0.001"),
    ("train.lr=0", "train.lr: must be > 0, got 0.0"),
    ("train.lr=1e999", "train.lr: must be a finite number, got inf"),
    ("train.adam_betas=[1.5, 0.999]", "train.adam_betas[0]: must be in [0, 1), got 1.5"),
    ("train.adam_betas=[0.9]", "train.adam_betas: expected two numbers, got 1"),
    ("train.weight_decay=-0.1", "train.weight_decay: must be >= 0, got -0.1"),
    ("train.clip_grad=-1", "train.clip_grad: must be >= 0, got -1.0"),
    ("train.min_lr=-1e-7", "train.min_lr: must be >= 0, got -1e-07"),
    ("objective.chunk_size=-4", "objective.chunk_size: must be >= 1, got -4"),
    ("objective.kd_weight=1.5", "objective.kd_weight: must be in [0, 1], got 1.5"),
    ("task.max_prompt_length=-1", "task.max_prompt_length: must be >= 1, got -1"),
    ("task.max_examples=0", "task.max_examples: must be >= 1, got 0"),
    ("train.threads=0", "train.threads: must be >= 1, got 0"),
    ("train.micro_batch_size=0", "train.micro_batch_size: must be >= 1, got 0"),
    ("eval.batch_size=0", "eval.batch_size: must be >= 1, got 0"),
    ("run.seed=-1", "run.seed: must be in [0, 2^63 - 1], got -1"),
    ("run.seed=18446744073709551616", "run.seed: must be a 64-bit integer"),
    ("eval.seeds=[1, -2]", "eval.seeds[1]: must be in [0, 2^63 - 1], got -2"),
])
def test_ranges_name_the_key_and_the_range(make_config, override, message):
    with pytest.raises(ConfigError) as info:
        load_config(make_config(), [override])
    assert message in str(info.value)


@pytest.mark.parametrize("override, message", [
    # the seven run-time crashes of issue #15, now caught by --validate
    ("train.lr=0", "train.lr: must be > 0"),
    ("train.adam_betas=[1.5, 0.999]", "train.adam_betas[0]: must be in [0, 1)"),
    ("objective.chunk_size=-4", "objective.chunk_size: must be >= 1"),
    ("task.max_examples=0", "task.max_examples: must be >= 1"),
    ("train.micro_batch_size=40", "the train split has 32 examples, fewer than one global batch of 40"),
    ("eval.batch_size=0", "eval.batch_size: must be >= 1"),
    ("run.seed=340282366920938463463374607431768211456", "run.seed: must be a 64-bit integer"),
    ("train.epochs=0.01", "makes no optimizer step"),
    ("task.max_prompt_length=96", "max_prompt_length (96) must be smaller than max_length (96)"),
])
def test_validate_catches_what_used_to_crash_at_run_time(make_config, cli, override, message):
    code, _, err = cli("--config", make_config(), "train.max_steps=null" if "epochs" in override else "train.lr=1e-3",
                       override, "--validate")
    assert code == 2
    assert message in one_error_line(err)


def test_a_config_on_the_edge_validates_and_trains(make_config, cli):
    """Exactly one global batch of data, the smallest chunk, batch and seed: valid, and it runs."""
    path = make_config({"task": {"max_examples": 4}, "objective": {"chunk_size": 1}, "run": {"seed": 2**63 - 2},
                        "eval": {"batch_size": 1, "max_examples": 2}})
    assert cli("--config", path, "--validate")[0] == 0
    code, out, err = cli("--config", path)
    assert code == 0, err
    assert "done: 2 steps" in out


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("damage, message", [
    (lambda t: b"\xff\xfe" + t, "not UTF-8 text (byte 0xff at offset 0)"),
    (lambda t: t.replace(b"lr: 0.001", b"lr: 0.001 # caf\xe9"), "not UTF-8 text (byte 0xe9 at offset"),
    (lambda t: t + b"extra: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply (more than 64 levels)"),
    (lambda t: t + b"extra: " + b"[" * 100 + b"]" * 100 + b"\n", "nested too deeply (more than 64 levels)"),
    (lambda t: t.replace(b"lr: 0.001", b"lr: " + b"7" * 5000), "a literal cannot be read"),
    (lambda t: t.replace(b"lr: 0.001", b"lr: " + b"7" * 400), "train.lr: must be a finite number"),
    (lambda t: t.replace(b"lr: 0.001", b"lr: 0.001\n  lr: 0.002"), "found key 'lr' twice (first on line"),
    (lambda t: t + b"train:\n  lr: 0.5\n", "found key 'train' twice"),
    (lambda t: t + b"plugins: ['']\n", "plugins: '' is not a module name"),
    (lambda t: t + b"plugins: [kdcore_fuzz_syntax_error]\n",
     "plugins: cannot import module 'kdcore_fuzz_syntax_error': SyntaxError:"),
])
def test_hostile_yaml_is_one_message(make_config, cli, tmp_path, monkeypatch, damage, message):
    from kdcore.fuzz import SYNTAX_ERROR_MODULE, SYNTAX_ERROR_SOURCE

    (tmp_path / f"{SYNTAX_ERROR_MODULE}.py").write_text(SYNTAX_ERROR_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    text = make_config().read_bytes()
    assert b"lr: 0.001" in text
    code, _, err = cli("--config", write(tmp_path / "bad.yaml", damage(text)), "--validate")
    assert code == 2
    assert message in one_error_line(err)


def test_a_byte_order_mark_is_accepted_in_configs_and_data(make_config, cli, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid"):
        source = (REPO / "data" / "kdcore-instruct" / f"{split}.jsonl").read_bytes()
        (data / f"{split}.jsonl").write_bytes(b"\xef\xbb\xbf" + source)
    path = make_config({"task": {"data_dir": str(data)}})
    bom = write(tmp_path / "bom.yaml", b"\xef\xbb\xbf" + path.read_bytes())
    code, out, err = cli("--config", bom, "--validate")
    assert code == 0, err
    assert "data: 32 train examples, global batch 4, 2 steps; 8 valid examples" in out


@pytest.mark.parametrize("line, message", [
    (b'{"instruction": "x", "output": "\xff"}', "train.jsonl:3: not UTF-8 text (byte 0xff at column 33)"),
    (b"[" * 100000 + b"]" * 100000, "train.jsonl:3: JSON nested too deeply"),
    (b'{"instruction": "x", "output": 1' + b"0" * 5000 + b"}", "train.jsonl:3: JSON value cannot be read"),
    (b'{"instruction": "x"}', "train.jsonl:3: needs an 'output'"),
])
def test_bad_data_lines_are_reported_by_validate_with_file_and_line(make_config, cli, tmp_path, line, message):
    data = tmp_path / "data"
    data.mkdir()
    lines = (REPO / "data" / "kdcore-instruct" / "train.jsonl").read_bytes().splitlines(keepends=True)
    (data / "train.jsonl").write_bytes(b"".join(lines[:2]) + line + b"\n" + b"".join(lines[2:]))
    (data / "valid.jsonl").write_bytes((REPO / "data" / "kdcore-instruct" / "valid.jsonl").read_bytes())
    code, _, err = cli("--config", make_config({"task": {"data_dir": str(data)}}), "--validate")
    assert code == 2
    assert message in one_error_line(err)


def test_validate_reads_the_eval_split(make_config, cli, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_bytes((REPO / "data" / "kdcore-instruct" / "train.jsonl").read_bytes())
    (data / "valid.jsonl").write_text('{"instruction": "ok", "output": "fine"}\n{broken\n')
    code, _, err = cli("--config", make_config({"task": {"data_dir": str(data)}}), "--validate")
    assert code == 2 and "valid.jsonl:2: not valid JSON" in one_error_line(err)


# ------------------------------------------------------------------------------ non-finite steps

def nan_config(make_config, steps, poison="loss_nan", name="config.yaml", **train):
    return make_config({"plugins": ["kdcore_nan_criterion"],
                        "criterion": {"name": "nan_fkl", "temperature": 2.0, "poison_steps": steps, "poison": poison},
                        "train": {"max_steps": 5, "micro_batch_size": 2, **train}}, name=name)


def skipping_batches(monkeypatch, steps):
    """Make Trainer.train_step leave out the batches of ``steps`` (1-based): the reference run."""
    original = Trainer.train_step

    def train_step(self, micro_batches):
        if self.step + 1 in steps:
            self.step += 1
            return {"loss": 0.0, "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": 0.0, "tokens": 1.0, "all_tokens": 1.0}
        return original(self, micro_batches)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_a_non_finite_step_is_skipped_and_equals_a_run_without_that_batch(make_config, local_plugins, monkeypatch, tmp_path):
    skipping_batches(monkeypatch, {3})
    reference = params(train(nan_config(make_config, [], name="ref.yaml"), f"run.output_dir={tmp_path / 'ref'}"))
    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(LOCAL))
    for poison in ("loss_nan", "loss_inf", "grad_nan"):
        out = tmp_path / poison
        trainer = train(nan_config(make_config, [3], poison, name=f"{poison}.yaml"), f"run.output_dir={out}")
        got = params(trainer)
        assert all(torch.isfinite(v).all() for v in got.values())
        assert got.keys() == reference.keys()
        assert all(torch.equal(got[k], reference[k]) for k in got), poison
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        train_records = [r for r in records if r["split"] == "train"]
        assert [r["skipped"] for r in train_records] == [0.0, 0.0, 1.0, 0.0, 0.0]
        assert train_records[-1]["skipped_steps"] == 1.0
        assert trainer.scheduler.last_epoch == 4  # the skipped step did not advance the schedule
        final = torch.load(out / "checkpoints" / "step_000005" / "model.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in final.values())


def test_consecutive_non_finite_steps_stop_with_the_last_checkpoint_intact(make_config, local_plugins, cli, tmp_path):
    path = nan_config(make_config, [2, 3, 4, 5], save_every=1, max_consecutive_skips=3, keep_last=5)
    code, _, err = cli("--config", path)
    assert code == 2
    line = one_error_line(err)
    assert "3 steps in a row (up to step 4) had a non-finite loss or gradient; stopped" in line
    assert "the last checkpoint is" in line and "step_000004" in line
    out = tmp_path / "run"
    assert not (out / "final").exists()
    last = step_dir(out / "checkpoints", 4)
    ckpt.verify(last, read_state(last))
    first = weights(step_dir(out / "checkpoints", 1))
    assert_same_weights(first, weights(last))  # the skipped steps never touched the weights
    assert all(torch.isfinite(v).all() for v in first.values())


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)


def test_non_finite_weights_are_never_saved_or_exported(tmp_path):
    module = Tiny()
    optimizer = torch.optim.AdamW(module.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ckpts = Checkpoints(tmp_path, DistInfo(), keep_last=2, select_by="ce")
    ckpts.save(1, module, optimizer, scheduler, {})
    with torch.no_grad():
        module.lin.weight[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="not finite after step 2.*last good checkpoint is .*step_000001"):
        ckpts.save(2, module, optimizer, scheduler, {})
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_000001"]
    with pytest.raises(TrainingError, match="student is not finite"):
        ckpts.export("final", None, module, None, final=True)
    assert ckpts.export("best", None, module, None, final=False) is None
    assert not (tmp_path / "final").exists() and not (tmp_path / "best").exists()
    assert not ckpts.observe(3, {"ce": float("nan")}) and ckpts.best is None
    assert ckpts.observe(4, {"ce": 2.0}) and not ckpts.observe(5, {"ce": float("inf")})


# ------------------------------------------------------------------------------ checkpoints

@pytest.fixture
def three_checkpoints(make_config, tmp_path):
    """A 3-step run with a checkpoint after every step: (config path, checkpoints dir)."""
    path = make_config({"train": {"max_steps": 3, "save_every": 1, "keep_last": 3, "micro_batch_size": 2}})
    assert main(["--config", str(path)]) == 0
    return path, tmp_path / "run" / "checkpoints"


def flip_byte(file: Path, at: int = -100) -> None:
    data = bytearray(file.read_bytes())
    data[at] ^= 0x01
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.pt", "optimizer.pt", "scheduler.pt", "rng_rank0.pt"])
def test_a_flipped_byte_is_named_and_fallback_needs_asking(three_checkpoints, cli, name):
    path, root = three_checkpoints
    flip_byte(root / "step_000003" / name)
    code, _, err = cli("--config", path, "train.resume=true", "train.max_steps=4", "train.resume_allow_changes=true")
    assert code == 2
    line = one_error_line(err)
    assert f"step_000003: {name} is corrupt" in line and "train.resume_fallback=true" in line
    code, out, err = cli("--config", path, "train.resume=true", "train.max_steps=4", "train.resume_allow_changes=true",
                         "train.resume_fallback=true")
    assert code == 0, err
    assert f"resumed from {root / 'step_000002'} at step 2" in out


def test_a_crafted_pickle_in_a_checkpoint_never_runs(three_checkpoints, cli, tmp_path):
    path, root = three_checkpoints
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "code ran"))

    newest = root / "step_000003"
    (newest / "rng_rank0.pt").write_bytes(pickle.dumps(Payload()))
    state = json.loads((newest / "state.json").read_text())
    state["files"] = file_digests(newest)  # the attacker fixes the checksums too
    (newest / "state.json").write_text(json.dumps(state))
    code, _, err = cli("--config", path, "train.resume=true")
    assert code == 2
    assert "rng_rank0.pt: refused: it holds Python objects other than tensors" in one_error_line(err)
    assert not marker.exists()


def test_no_code_loads_pickles_with_weights_only_false():
    sources = [p for d in ("kdcore", "plugins", "tasks", "tools") for p in (REPO / d).rglob("*.py")]
    offenders = [str(p) for p in sources if "weights_only=False" in p.read_text()]
    assert sources and not offenders


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a readable JSON state file"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"world_size": 1}', "'step' must be 3 (the directory's step), got None"),
    ('{"step": "3"}', "'step' must be 3 (the directory's step), got '3'"),
    ('{"step": 2}', "'step' must be 3 (the directory's step), got 2"),
    ('{"step": -4}', "'step' must be 3 (the directory's step), got -4"),
    ('{"step": 3, "world_size": 0}', "'world_size' must be a positive integer"),
    ('{"step": 3, "best": [1]}', "'best' must be null or"),
    ('{"step": 3, "files": {"model.pt": 5}}', "'files' must map file names to SHA-256 digests"),
    ('{"step": 3, "files": {"../../x": "ab"}}', "state.json records no checksum for model.pt"),
])
def test_a_malformed_state_file_is_one_clear_error(three_checkpoints, cli, content, message):
    path, root = three_checkpoints
    (root / "step_000003" / "state.json").write_text(content)
    code, _, err = cli("--config", path, "train.resume=true")
    assert code == 2
    assert message in one_error_line(err)


def test_missing_files_and_stale_directories(three_checkpoints, cli):
    path, root = three_checkpoints
    (root / "step_000003" / "rng_rank0.pt").unlink()
    code, _, err = cli("--config", path, "train.resume=true")
    assert code == 2 and "step_000003 is incomplete: rng_rank0.pt is missing" in one_error_line(err)
    # a step path that is a file is not a checkpoint; stale .tmp-/.trash- directories are removed
    import shutil

    shutil.rmtree(root / "step_000003")
    (root / "step_000009").write_text("not a directory")
    (root / ".tmp-step_000004").mkdir()
    (root / ".trash-step_000001").mkdir()
    (root.parent / ".tmp-final").mkdir()
    code, out, err = cli("--config", path, "train.resume=true")
    assert code == 0, err
    assert f"resumed from {root / 'step_000002'} at step 2" in out
    assert not any(p.name.startswith((".tmp-", ".trash-")) for p in [*root.iterdir(), *root.parent.iterdir()])


def test_a_changed_config_on_resume_is_refused_or_explicitly_allowed(three_checkpoints, cli, caplog):
    path, root = three_checkpoints
    out = root.parent
    before = (out / "config.yaml").read_text()
    code, _, err = cli("--config", path, "train.resume=true", "train.lr=0.002", "train.max_steps=5")
    assert code == 2
    line = one_error_line(err)
    assert "train.lr: 0.001 -> 0.002" in line and "train.max_steps: 3 -> 5" in line
    assert "train.resume_allow_changes=true" in line
    assert (out / "config.yaml").read_text() == before  # not overwritten by the refused run
    code, _, err = cli("--config", path, "train.resume=true", "train.lr=0.002", "train.max_steps=5",
                       "train.resume_allow_changes=true")
    assert code == 0, err
    assert "resuming with a changed config (train.resume_allow_changes): train.lr: 0.001 -> 0.002" in caplog.text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5]  # no replayed or duplicate lines
    from kdcore.optim import lr_lambda

    cfg = load_config(path, ["train.lr=0.002", "train.max_steps=5"])
    want = 0.002 * lr_lambda("cosine", 0, 5, cfg.train.min_lr / 0.002)(3)
    assert [r["lr"] for r in records if r["split"] == "train" and r["step"] == 4] == [pytest.approx(want)]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 0.002


def test_metrics_are_truncated_to_the_checkpoint_on_resume(three_checkpoints, cli):
    import shutil

    path, root = three_checkpoints
    shutil.rmtree(root / "step_000003")  # as if killed after logging step 3, before its checkpoint
    with open(root.parent / "metrics.jsonl", "a") as fh:
        fh.write('{"split": "train", "step": 4, "lo')  # a line torn by the kill
    code, _, err = cli("--config", path, "train.resume=true")
    assert code == 0, err
    records = [json.loads(line) for line in (root.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in records if r["split"] == "eval"] == [3]


def test_best_considers_every_eval(make_config, monkeypatch, tmp_path):
    """An eval between save steps can be the best (issue #15: step 20 lost to step 15)."""
    scripted = {1: 5.0, 2: 4.0, 3: 1.0, 4: 2.0}
    snapshots = {}

    def evaluate(self):
        snapshots[self.step] = {n: p.detach().clone() for n, p in self.parts.student_model.named_parameters()}
        return {"ce": scripted[self.step], "loss": scripted[self.step]}

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    path = make_config({"train": {"max_steps": 4, "eval_every": 1, "save_every": 2, "micro_batch_size": 2}})
    train(path)
    out = tmp_path / "run"
    state = read_state(step_dir(out / "checkpoints", 4))
    assert state["best"] == {"step": 3, "metric": "ce", "value": 1.0}
    from transformers import AutoModelForCausalLM

    best = dict(AutoModelForCausalLM.from_pretrained(out / "best").named_parameters())
    assert all(torch.equal(best[n], snapshots[3][n]) for n in snapshots[3])


def test_prune_renames_before_deleting(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        step_dir(root, step).mkdir(parents=True)
        (step_dir(root, step) / "state.json").write_text(json.dumps({"step": step}))
        (step_dir(root, step) / "model.pt").write_bytes(b"x" * 10)

    def interrupted(path, ignore_errors=False):
        raise KeyboardInterrupt  # killed while deleting

    monkeypatch.setattr(ckpt.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune(root, keep_last=1)
    monkeypatch.undo()
    # the checkpoint being deleted stopped being one before any file of it was removed
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_000002", "step_000003"]
    assert (root / ".trash-step_000001" / "model.pt").is_file()
    assert ckpt.clean_stale(root) == [".trash-step_000001"]


# ------------------------------------------------------------------------------ disk

@pytest.mark.parametrize("failure, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"), "unexpected pos"),
])
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(three_checkpoints, cli, monkeypatch, failure, reason):
    path, root = three_checkpoints
    before = weights(root / "step_000003")
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if ".tmp-step_000004" in str(f) and str(f).endswith("optimizer.pt"):
            raise failure
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    code, _, err = cli("--config", path, "train.resume=true", "train.max_steps=4", "train.resume_allow_changes=true")
    assert code == 2
    line = one_error_line(err)
    assert f"cannot write checkpoint {root / 'step_000004'}: " in line and reason in line
    assert "MiB free there; earlier checkpoints are kept" in line
    assert not (root / ".tmp-step_000004").exists() and not (root / "step_000004").exists()
    newest = root / "step_000003"
    ckpt.verify(newest, read_state(newest))
    assert_same_weights(before, weights(newest))


def test_an_unusable_output_dir_is_one_error_before_training(make_config, cli, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker, blocker / "run"):
        for mode in (["--validate"], []):
            code, _, err = cli("--config", make_config(), f"run.output_dir={out}", *mode)
            assert code == 2
            assert "run.output_dir" in one_error_line(err)
            assert "is a file" in err or "not a directory" in err.lower()

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    loaded = []
    monkeypatch.setattr(ckpt.os, "open", read_only)
    monkeypatch.setattr("kdcore.trainer.build_components", lambda *a, **k: loaded.append(1))
    code, _, err = cli("--config", make_config(), f"run.output_dir={tmp_path / 'ro'}")
    assert code == 2 and not loaded  # before any model is loaded
    assert f"run.output_dir {tmp_path / 'ro'} is not writable: Read-only file system" in one_error_line(err)


# ------------------------------------------------------------------------------ processes

def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_with_plugins(**extra):
    path = os.pathsep.join([str(LOCAL), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            **extra}


def test_two_ranks_with_fewer_eval_examples_than_ranks_do_not_hang(make_config, tmp_path):
    """Rank 1 has no eval batch; a NaN on rank 1 only is skipped on both ranks."""
    path = make_config({"plugins": ["kdcore_nan_criterion"],
                        "criterion": {"name": "nan_fkl", "temperature": 2.0, "poison_steps": [1], "poison_rank": 1},
                        "train": {"max_steps": 2, "micro_batch_size": 1, "eval_at_start": True, "eval_every": 1},
                        "eval": {"max_examples": 1, "batch_size": 1}})
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "kdcore.cli", "--config", str(path)],
                              env=env_with_plugins(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 1, 2]
    assert all(r["ce"] > 0 for r in records if r["split"] == "eval")
    assert [r["skipped"] for r in records if r["split"] == "train"] == [1.0, 0.0]


@pytest.fixture
def one_thread():
    """Runs in this process and in a subprocess compute alike (train.threads=1 sets it)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_sigterm_checkpoints_at_the_step_boundary_and_resume_matches(make_config, local_plugins, one_thread, tmp_path):
    extra = {"plugins": ["kdcore_pause"], "train": {"max_steps": 4, "micro_batch_size": 2, "save_every": 2, "threads": 1}}
    reference = train(make_config(extra, name="ref.yaml"), f"run.output_dir={tmp_path / 'ref'}")
    path = make_config(extra)
    pause = tmp_path / "pause"
    pause.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "kdcore.cli", "--config", str(path)],
                            env=env_with_plugins(KDCORE_TEST_PAUSE_DIR=str(pause)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (pause / "stepped").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        (pause / "signalled").write_text("1")
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "received SIGTERM: saving a checkpoint" in out
    assert "stopped at step 1 of 4 (SIGTERM received); checkpoint saved in" in out
    assert f"Resume with: kd-train --config {path} train.resume=true" in out
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_000001"]
    assert not (tmp_path / "run" / "final").exists()
    resumed = train(path, "train.resume=true")
    assert resumed.step == 4
    assert_same_weights(params(reference), params(resumed))
