"""Throughput telemetry: the analytic FLOP count, and tokens/s, MFU and the time split in every run."""

from __future__ import annotations

import json

import pytest
import torch

import kdcore
from kdcore.cli import main
from kdcore.kdspace import Accuracy, CrossEntropy, Head, Rows, Space, space_flops
from kdcore.telemetry import SECTIONS, Timer, backbone_flops, backbone_shape, peak_flops, summary_table


def test_backbone_flops_of_a_llama_layer_count(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "teacher")
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    per_layer = (c.hidden_size * head_dim * (c.num_attention_heads + 2 * c.num_key_value_heads)  # q, k, v
                 + c.hidden_size * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)  # o, gate, up, down
    params, layers, width = backbone_shape(model)
    assert (params, layers, width) == (per_layer * c.num_hidden_layers, c.num_hidden_layers, c.hidden_size)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    forward = 2 * params * 7 + 2 * layers * width * (3 ** 2 + 4 ** 2)
    assert backbone_flops((params, layers, width), mask, training=False) == forward
    assert backbone_flops((params, layers, width), mask, training=True) == 3 * forward


def test_space_flops_count_the_head_products_and_their_gradients():
    n, d, D, V = 10, 4, 6, 50
    h_s = torch.randn(n, d, requires_grad=True)
    w_s = torch.randn(V, d, requires_grad=True)
    crit = kdcore.build("criterion", "fkl")
    vanilla = Space("student", Rows(h_s, Head(w_s)), Rows(torch.randn(n, D), Head(torch.randn(V, D), detach=True)), crit,
                    labels=torch.zeros(n, dtype=torch.long), terms=[CrossEntropy("ce", "student")])
    # student head: forward, row gradient, weight gradient; frozen teacher head: forward only
    assert space_flops(vanilla, training=True) == 2 * n * V * (3 * d + D)
    assert space_flops(vanilla, training=False) == 2 * n * V * (d + D)
    projected = torch.randn(n, d, requires_grad=True)  # DSKD's t2s rows through the detached student head
    t2s = Space("student", Rows(h_s, Head(w_s)), Rows(projected, Head(w_s, detach=True)), crit,
                labels=torch.zeros(n, dtype=torch.long), terms=[CrossEntropy("t2s_ce", "teacher"), Accuracy("a", "teacher")])
    assert space_flops(t2s, training=True) == 2 * n * V * d * (3 + 2)


def test_timer_sections_and_summary():
    timer = Timer(torch.device("cpu"))
    with timer.section("kd_loss"):
        sum(range(10000))
    timer.add("backward", 2.0)
    step = timer.take()
    assert set(step) == {"time/kd_loss", "time/backward"} and step["time/backward"] == 2.0
    assert timer.take() == {} and timer.run_totals["backward"] == 2.0
    table = summary_table({"backward": 3.0, "optimizer": 1.0}, steps=2, tokens=400, flops=8e12, peak=4e12)
    assert "100 response tokens/s" in table and "MFU 50.0 %" in table and "| backward | 3.0 | 75.0 % |" in table
    assert peak_flops(torch.device("cpu"), None, configured=5e12) == 5e12
    assert peak_flops(torch.device("cpu"), None) > 1e8  # a measured matmul peak


@pytest.mark.parametrize("projector", ["none", "dual"])
def test_every_run_logs_throughput_mfu_and_the_time_split(make_config, tmp_path, capsys, projector):
    path = make_config({"projector": projector, "train": {"max_steps": 2, "peak_flops": 1.0e12}})
    assert main(["--config", str(path)]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    for r in train:
        assert r["tokens_per_s"] > 0 and r["all_tokens_per_s"] > r["tokens_per_s"]
        assert r["mfu"] == pytest.approx(r["tflops"] * 1e12 / 1.0e12)
        parts = {k[len("time/"):] for k in r if k.startswith("time/")}
        assert {"data", "teacher_forward", "student_forward", "kd_loss", "backward", "optimizer"} <= parts <= set(SECTIONS)
    evals = [r for r in records if r["split"] == "eval"]
    assert all(set(k for k in r if k.startswith("time/")) == {"time/eval"} for r in evals)
    summary = [r for r in records if r["split"] == "summary"]
    assert len(summary) == 1 and summary[0]["mfu"] > 0 and summary[0]["time/backward"] > 0
    assert "response tokens/s over 2 steps" in capsys.readouterr().out


@pytest.mark.parametrize("config,extra", [("configs/tiny/identity-none.yaml", []),
                                          ("configs/tiny/cma-dual.yaml", ["--random-weights"])])
def test_bench_train_times_a_config(repo_like_cwd, monkeypatch, tmp_path, config, extra):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).resolve().parents[1] / "tools" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.chdir(repo_like_cwd)
    out = tmp_path / "row.json"
    assert bench.main([config, "--steps", "2", "--seq-len", "48", "--prompt-len", "16", "--micro-batch-size", "2",
                       "--json", str(out), "train.peak_flops=1e12", *extra]) == 0
    row = json.loads(out.read_text())
    assert row["tokens_per_step"] == 2 * 48 and row["step_s"] > 0 and row["peak_mib"] > 0
    assert row["mfu"] == pytest.approx(row["tflops"] * 1e12 / 1e12, rel=1e-6)
    assert {"student_forward", "teacher_forward", "kd_loss", "backward", "optimizer"} <= set(row["time"])


def test_bench_train_shapes_build_random_models():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).resolve().parents[1] / "tools" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = bench.shape_config("gpt2")
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size) == (12, 768, 50257)
    llama = bench.shape_config("tinyllama-1.1b")
    assert (llama.num_hidden_layers, llama.num_key_value_heads) == (22, 4)
    with pytest.raises(SystemExit, match="unknown shape 'gpt5'"):
        bench.shape_config("gpt5")
