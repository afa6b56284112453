"""Config validation, overrides and the CLI's error messages."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from kdcore.config import apply_overrides, load_config, load_yaml, validate
from kdcore.errors import ConfigError


def base(tiny_dir=None):
    return {
        "schema_version": 1,
        "student": {"path": "some/student"},
        "teacher": {"path": "some/teacher"},
        "task": {"name": "instruction", "data_dir": "data/kdcore-instruct"},
    }


def test_defaults_are_filled_and_types_converted():
    cfg = validate({**base(), "train": {"lr": 1, "max_steps": 3}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.criterion.name == "fkl" and cfg.projector.name == "none" and cfg.aligner.name == "identity"
    assert cfg.resolved["train"]["micro_batch_size"] == 4
    assert cfg.resolved["criterion"] == {"name": "fkl", "temperature": 1.0}


def test_scientific_notation_without_dot_is_a_float():
    assert load_yaml("lr: 1e-3")["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"trian": {}}, r"unknown top-level key 'trian'\. Did you mean 'train'"),
        ({"train": {"learning_rate": 1e-3}}, r"train: unknown key 'learning_rate'.*Accepted keys: .*\blr\b"),
        ({"train": {"lr": "fast"}}, r"train\.lr: expected float, got str 'fast'"),
        ({"train": {"max_steps": 2.5}}, r"train\.max_steps: expected int or null, got float"),
        ({"train": {"schedule": "cosin"}}, r"train\.schedule: 'cosin' is not allowed.*Did you mean 'cosine'"),
        ({"criterion": {"name": "fkl", "temprature": 2}}, r"criterion: unknown key 'temprature'.*Did you mean 'temperature'"),
        ({"criterion": {"name": "fkl", "temperature": "hot"}}, r"criterion\.temperature: expected float, got str"),
        ({"criterion": "kl"}, r"unknown criterion 'kl'"),
        ({"projector": {"temperature": 1}}, r"projector: a component mapping needs a 'name' key"),
        ({"objective": {"kd_weight": 1.5}}, r"kd_weight: must be in \[0, 1\]"),
        ({"teacher": None}, r"teacher: missing section; it is required when objective.kd_weight > 0"),
        ({"schema_version": 2}, r"schema_version: expected 1, got 2"),
        ({"student": {"path": "x", "dtype": "fp8"}}, r"student\.dtype: 'fp8' is not allowed"),
        ({"plugins": "my_module"}, r"plugins: expected a list of module names"),
        ({"criterion": {"name": "fkl", "temperature": True}}, r"criterion\.temperature: expected float, got bool"),
    ],
)
def test_bad_configs_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        validate({**base(), **raw})


def test_sft_needs_no_teacher():
    cfg = validate({**base(), "teacher": None, "objective": {"kd_weight": 0.0}})
    assert cfg.teacher is None and not cfg.uses_teacher


def test_overrides():
    raw = {**base(), "criterion": "fkl", "train": {"lr": 1e-3}}
    out = apply_overrides(raw, ["train.lr=5e-4", "criterion.temperature=2", "run.output_dir=x/y", "train.adam_betas=[0.9, 0.95]"])
    assert out["train"]["lr"] == pytest.approx(5e-4)
    assert out["criterion"] == {"name": "fkl", "temperature": 2}
    assert out["run"] == {"output_dir": "x/y"}
    assert out["train"]["adam_betas"] == [0.9, 0.95]
    assert raw["train"]["lr"] == 1e-3  # the input is not modified
    assert apply_overrides(raw, ["criterion=rkl"])["criterion"] == "rkl"
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        apply_overrides(raw, ["train.lr"])
    with pytest.raises(ConfigError, match="'train.lr' is a float, not a section"):
        apply_overrides(raw, ["train.lr.x=1"])


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def run_cli(capsys):
    """``kd-train`` in-process (the subprocess test below covers the real exit status)."""
    from kdcore.cli import main

    def run(*args):
        code = main(list(args))
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return run


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown key 'lrr'"),
        ("train.lr=abc", "train.lr: expected float"),
        ("criterion=no_such", "unknown criterion 'no_such'"),
        ("teacher.path=/does/not/exist", "model directory not found: /does/not/exist"),
        ("task.data_dir=/does/not/exist", "data file not found: /does/not/exist/train.jsonl"),
    ],
)
def test_cli_bad_input_is_one_message_without_traceback(run_cli, make_config, override, message):
    result = run_cli("--config", str(make_config()), override, "--validate")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr


def test_cli_process_exit_status_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kdcore.cli", "--config", str(tmp_path / "nope.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"kd-train: error: config file not found: {tmp_path / 'nope.yaml'}"


def test_cli_validate_and_print_config(run_cli, make_config):
    path = make_config()
    ok = run_cli("--config", str(path), "--validate")
    assert ok.returncode == 0, ok.stderr
    assert "same tokenizer" in ok.stdout and ok.stdout.strip().endswith("OK")
    printed = run_cli("--config", str(path), "train.lr=0.01", "--print-config")
    assert printed.returncode == 0
    resolved = yaml.safe_load(printed.stdout)
    assert resolved["train"]["lr"] == 0.01 and resolved["criterion"] == {"name": "fkl", "temperature": 2.0}


def test_cli_list_plugins(run_cli):
    result = run_cli("--list-plugins")
    assert result.returncode == 0
    rows = [line.split() for line in result.stdout.splitlines()]
    assert ["criterion", "fkl", "kdcore"] in [r[:3] for r in rows]
    assert ["task", "instruction", "kdcore"] in [r[:3] for r in rows]
