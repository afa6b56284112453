"""``kd-train --compare-sft``: the config and its SFT twin, and the comparison of teacher, SFT and KD."""

from __future__ import annotations

import json

import yaml

from kdcore.cli import main


def test_compare_sft_trains_both_and_writes_the_comparison(make_config, tmp_path, capsys):
    path = make_config({"projector": "dual", "eval": {"max_examples": 4, "seeds": [1, 2, 3], "max_new_tokens": 3},
                        "task": {"max_examples": 6}})
    assert main(["--config", str(path), "--compare-sft"]) == 0
    out = tmp_path / "run"
    result = json.loads((out / "comparison.json").read_text())
    assert set(result) == {"teacher", "sft", "kd", "protocol"}
    for name in ("sft", "kd"):
        r = result[name]
        assert r["eval_ce"] > 0 and 0 <= r["rouge_l"] <= 100 and r["rouge_l_std"] >= 0 and 0 <= r["rouge_l_greedy"] <= 100
        evals = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
        assert r["eval_ce"] == evals[-1]["ce"]
        assert (out / name / "final" / "config.json").is_file()
    assert set(result["teacher"]) == {"rouge_l", "rouge_l_std", "rouge_l_greedy"}
    assert result["protocol"]["seeds"] == [1, 2, 3] and result["protocol"]["examples"] == 6
    sft = yaml.safe_load((out / "sft" / "config.yaml").read_text())
    kd = yaml.safe_load((out / "kd" / "config.yaml").read_text())
    assert sft["objective"]["kd_weight"] == 0.0 and sft["projector"] == {"name": "none"}
    assert kd["projector"]["name"] == "dual" and kd["objective"]["kd_weight"] == 0.5
    assert {k: v for k, v in sft["train"].items()} == kd["train"] and sft["run"]["seed"] == kd["run"]["seed"]
    printed = capsys.readouterr().out
    assert "| teacher |" in printed and "| sft |" in printed and "| kd |" in printed
    assert (out / "comparison.md").read_text().count("|") > 10


def test_compare_sft_refuses_an_sft_config(make_config, capsys):
    path = make_config({"objective": {"kd_weight": 0.0}})
    assert main(["--config", str(path), "--compare-sft"]) == 2
    assert "the config is SFT already" in capsys.readouterr().err
