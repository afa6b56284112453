"""The table of plugin kinds and the lifecycle hooks.

A test-only kind (``monitor``, tests/fixtures/local_plugins/kdcore_monitor_kind.py) is added
without touching the engine: config validation, ``--list-plugins``, plugins.json, assembly and
the lifecycle hooks all pick it up from the kinds table. Every built-in module registers
something, and the lifecycle hooks are called when and with what the hookspecs say.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
from pathlib import Path

import pytest

import kdcore
from kdcore.cli import main
from kdcore.config import load_config
from kdcore.errors import ConfigError
from kdcore.kinds import kind_names, remove_kind
from kdcore.registry import get_registry, reset_registry

REPO = Path(__file__).resolve().parents[1]
LOCAL = Path(__file__).parent / "fixtures" / "local_plugins"


@pytest.fixture
def local_plugins(monkeypatch):
    monkeypatch.syspath_prepend(str(LOCAL))
    yield
    for name in ("kdcore_monitor_kind", "kdcore_lifecycle_recorder"):
        sys.modules.pop(name, None)
    if "monitor" in kind_names():
        remove_kind("monitor")
    reset_registry()


def test_a_new_kind_is_validated_listed_built_and_hooked(make_config, tmp_path, local_plugins, capsys):
    path = make_config({"plugins": ["kdcore_monitor_kind"], "monitor": {"name": "step_counter", "scale": 2.0},
                        "train": {"max_steps": 3, "eval_every": 2}})
    cfg = load_config(path)
    assert "monitor" in kind_names() and cfg.monitor.name == "step_counter"
    assert cfg.resolved["monitor"] == {"name": "step_counter", "scale": 2.0}  # seed is engine context
    with pytest.raises(ConfigError, match=r"monitor: unknown key 'scal' for monitor 'step_counter'\. Did you mean 'scale'"):
        load_config(path, ["monitor.scal=1"])
    with pytest.raises(ConfigError, match="unknown monitor 'counter'"):
        load_config(path, ["monitor=counter"])

    assert main(["--config", str(path)]) == 0
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["monitor_steps"] for r in train] == [2.0, 4.0, 6.0]
    assert [r["monitor_evals"] for r in records if r["split"] == "eval"] == [1.0, 2.0]  # steps 2 and 3
    manifest = json.loads((out / "plugins.json").read_text())
    assert manifest["used"]["monitor"]["name"] == "step_counter"
    assert {"kind": "monitor", "name": "step_counter", "provider": "local", "version": "",
            "module": "kdcore_monitor_kind"} in manifest["available"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert {"train/monitor_steps", "eval/monitor_evals"} <= set(acc.Tags()["scalars"])

    capsys.readouterr()
    assert main(["--config", str(path), "--list-plugins"]) == 0
    assert any(line.split()[:2] == ["monitor", "step_counter"] for line in capsys.readouterr().out.splitlines())


def test_a_kind_is_optional_unless_configured(make_config, local_plugins):
    cfg = load_config(make_config({"plugins": ["kdcore_monitor_kind"]}))
    assert cfg.monitor is None and "monitor" not in cfg.resolved


def test_kind_key_in_the_wrong_section_names_the_right_place(make_config):
    with pytest.raises(ConfigError, match=r"teacher\.tuner: not accepted here; tuner components go in 'student\.tuner'"):
        load_config(make_config({"teacher": {"tuner": "lora"}}))


def test_lifecycle_hooks_are_called_in_order_with_their_arguments(make_config, tmp_path, local_plugins):
    extra = ["train.max_steps=2", "train.save_every=1", "train.eval_every=2", "train.keep_last=3"]
    path = make_config({"plugins": ["kdcore_lifecycle_recorder"]})
    assert main(["--config", str(path), *extra]) == 0
    calls = importlib.import_module("kdcore_lifecycle_recorder").CALLS
    names = [c[0] for c in calls]
    assert names == ["run_start", "before_step", "after_step", "checkpoint_save", "before_step", "after_step",
                     "after_eval", "checkpoint_save", "run_end"], names  # eval_at_start is off in these configs
    assert calls[0] == ("run_start", 0)
    assert [c[1] for c in calls if c[0] == "before_step"] == [0, 1]
    assert [c[1] for c in calls if c[0] == "after_step"] == [1, 2]
    assert all(c[2] for c in calls if c[0] == "checkpoint_save")  # written into the temporary directory
    out = tmp_path / "run"
    assert (out / "checkpoints" / "step_000002" / "recorder.txt").read_text() == "step 2\n"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["recorder_step"] for r in records if r["split"] == "train"] == [1.0, 2.0]
    assert [r["recorder_calls"] for r in records if r["split"] == "summary"] == [9.0]

    calls.clear()
    assert main(["--config", str(path), *extra, "train.max_steps=3", "train.resume=true",
                 "train.resume_allow_changes=true"]) == 0  # a longer run: a change of the config
    assert calls[0] == ("checkpoint_load", 2, "step 2\n") and calls[1] == ("run_start", 2)
    assert [c[1] for c in calls if c[0] == "before_step"] == [2]


def test_a_metric_reported_twice_is_an_error(make_config, local_plugins):
    from kdcore.errors import PluginError
    from kdcore.metrics import merge

    with pytest.raises(PluginError, match="metric 'loss' is reported twice"):
        merge({"loss": 1.0}, {"loss": 2.0}, "kdcore_after_step")


def _modules(package_dir: Path, import_name: str):
    for info in pkgutil.walk_packages([str(package_dir)], prefix=import_name + "."):
        if not info.ispkg and not any(part.startswith("_") for part in info.name.split(".")):
            yield info.name


@pytest.mark.parametrize("package_dir,import_name", [(REPO / "plugins", "kdcore_plugins"), (REPO / "tasks", "kdcore_tasks")])
def test_every_builtin_module_registers_something(package_dir, import_name):
    registered = {}
    for kind in get_registry().kinds():
        for entry in get_registry().entries(kind):
            registered.setdefault(entry.module, []).append((kind, entry.name))
    modules = list(_modules(package_dir, import_name))
    assert modules
    silent = [m for m in modules if m not in registered]
    assert not silent, f"modules that register no component (helpers must start with '_'): {silent}"


def test_every_builtin_package_is_packaged():
    """setup.cfg lists every package under plugins/ and tasks/ (regular installs need it)."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    for root, name in ((REPO / "plugins", "kdcore_plugins"), (REPO / "tasks", "kdcore_tasks")):
        packages = {name} | {name + "." + str(p.parent.relative_to(root)).replace("/", ".")
                             for p in root.rglob("__init__.py") if p.parent != root}
        assert packages <= listed, packages - listed


def test_names_and_build_cover_every_kind():
    for kind in kind_names():
        assert isinstance(kdcore.names(kind), list)
    assert kdcore.build("criterion", {"name": "fkl", "temperature": 2.0}).temperature == 2.0
