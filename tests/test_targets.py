"""The ``targets`` plugin kind: listed, defaulted to ``gold``, ``gold`` is bit-identical to
today's gold-target training, bad names are one config error, and a third-party targets plugin
is called once per optimizer step."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from kdcore.cli import main
from kdcore.config import load_config
from kdcore.errors import ConfigError
from kdcore.kinds import get_kind
from kdcore.registry import reset_registry

LOCAL = Path(__file__).parent / "fixtures" / "local_plugins"


def _train_records(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "train"]


def test_kind_row_defaults_to_gold_and_is_listed(make_config, capsys):
    kind = get_kind("targets")
    assert (kind.config_key, kind.default, kind.hook) == ("targets", "gold", "kdcore_register_targets")
    assert load_config(make_config()).resolved["targets"] == {"name": "gold"}
    assert main(["--list-plugins"]) == 0
    assert any(line.split()[:2] == ["targets", "gold"] for line in capsys.readouterr().out.splitlines())


def test_gold_is_bit_identical_to_no_targets_key(make_config, tmp_path):
    base = make_config({"train": {"max_steps": 3}, "run": {"output_dir": str(tmp_path / "a"), "seed": 3}}, name="a.yaml")
    gold = make_config({"train": {"max_steps": 3}, "run": {"output_dir": str(tmp_path / "b"), "seed": 3},
                        "targets": {"name": "gold"}}, name="b.yaml")
    assert main(["--config", str(base)]) == 0 and main(["--config", str(gold)]) == 0
    a, b = _train_records(tmp_path / "a"), _train_records(tmp_path / "b")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_unknown_targets_is_one_config_error(make_config):
    with pytest.raises(ConfigError, match="unknown targets 'teachr'"):
        load_config(make_config({"targets": {"name": "teachr"}}))


def test_third_party_targets_plugin_trains(make_config, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(LOCAL))
    try:
        path = make_config({"plugins": ["kdcore_reversed_targets"], "targets": {"name": "reversed_order"},
                            "train": {"max_steps": 2, "grad_accum": 2}})
        assert main(["--config", str(path)]) == 0
        records = _train_records(tmp_path / "run")
        assert [r["targets_micro_batches"] for r in records] == [2.0, 4.0]
        manifest = json.loads((tmp_path / "run" / "plugins.json").read_text())
        assert manifest["used"]["targets"]["name"] == "reversed_order"
    finally:
        sys.modules.pop("kdcore_reversed_targets", None)
        reset_registry()
