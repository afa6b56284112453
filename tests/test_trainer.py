"""The trainer end to end on tiny models: outputs, SFT, normalisation, DDP, resume, errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kdcore.cli import main
from kdcore.config import load_config
from kdcore.distributed import DistInfo
from kdcore.errors import ConfigError
from kdcore.trainer import Trainer

HERE = Path(__file__).parent


def trainer_for(path, *overrides):
    return Trainer(load_config(path, list(overrides)), DistInfo())


def state(trainer):
    return {n: p.detach().clone() for n, p in trainer.module.named_parameters()}


def assert_close_dicts(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m: f"{k}: {m}", **tol)


def test_run_writes_every_output(make_config, tmp_path):
    path = make_config({"train": {"max_steps": 3, "save_every": 2, "keep_last": 1, "eval_at_start": True}})
    assert main(["--config", str(path)]) == 0
    out = tmp_path / "run"
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["criterion"] == {"name": "fkl", "temperature": 2.0}
    manifest = json.loads((out / "plugins.json").read_text())
    assert manifest["used"]["criterion"]["provider"] == "kdcore"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for key in ("ce", "kd_student", "loss", "lr", "grad_norm", "tokens_per_s"):
        assert all(key in r for r in train), key
    r = train[0]
    assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["kd_student"])
    evals = [r for r in records if r["split"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 3
    # checkpoints: keep_last=1 keeps step 3, and the best-by-eval one
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "step_000003" in ckpts and all(not c.startswith(".tmp") for c in ckpts)
    # TensorBoard scalars for every loss term
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/ce", "train/kd_student", "train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
            "eval/ce", "eval/kd_student"} <= tags
    # final/ is a plain transformers model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    AutoTokenizer.from_pretrained(out / "final")
    trained = torch.load(out / "checkpoints" / "step_000003" / "model.pt", weights_only=True)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, trained["student.model.layers.0.mlp.up_proj.weight"])


def test_sft_runs_without_a_teacher(make_config, tmp_path):
    path = make_config({"teacher": None, "objective": {"kd_weight": 0.0}})
    assert main(["--config", str(path)]) == 0
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["loss"] == pytest.approx(rec["ce"]) and "kd_student" not in rec


def test_loss_is_normalised_by_global_tokens(make_config):
    """grad_accum=2 x micro 2 gives the gradients of one micro-batch of 4 (token mean)."""
    path = make_config()
    big = trainer_for(path, "train.micro_batch_size=4", "train.grad_accum=1")
    small = trainer_for(path, "train.micro_batch_size=2", "train.grad_accum=2")
    m_big = big.accumulate(big.data.micro_batches(0))
    m_small = small.accumulate(small.data.micro_batches(0))
    assert m_big["ce"] == pytest.approx(m_small["ce"], rel=1e-5)
    assert m_big["kd_student"] == pytest.approx(m_small["kd_student"], rel=1e-4)
    grads = lambda t: {n: p.grad for n, p in t.module.named_parameters() if p.grad is not None}
    assert_close_dicts(grads(big), grads(small), rtol=1e-4, atol=1e-6)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ddp_matches_single_process(make_config, tmp_path):
    path = make_config()
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, str(HERE / "ddp_worker.py"), str(path), str(tmp_path / "ddp.pt"),
                                       "train.micro_batch_size=2", "train.grad_accum=1"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    single = trainer_for(path, "train.micro_batch_size=2", "train.grad_accum=2")
    single.accumulate(single.data.micro_batches(0))
    grads = {n: p.grad.detach().clone() for n, p in single.module.named_parameters() if p.grad is not None}
    single.optimizer_step()
    assert_close_dicts(grads, ddp["grads"], rtol=1e-4, atol=1e-6)
    assert_close_dicts(state(single), ddp["params"], rtol=1e-4, atol=1e-5)


def test_resume_reproduces_an_uninterrupted_run(make_config, tmp_path, monkeypatch):
    extra = ["train.max_steps=4", "train.save_every=2", "train.keep_last=3", "train.micro_batch_size=2"]
    full = trainer_for(make_config(name="a.yaml"), *extra, f"run.output_dir={tmp_path / 'full'}")
    full.train()
    want = state(full)

    path = make_config(name="b.yaml")
    interrupted = trainer_for(path, *extra, f"run.output_dir={tmp_path / 'cut'}")
    original_save = Trainer.save_checkpoint

    def save_then_crash(self, *args, **kwargs):
        original_save(self, *args, **kwargs)
        if self.step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    monkeypatch.setattr(Trainer, "save_checkpoint", original_save)
    assert interrupted.step == 2

    with pytest.raises(ConfigError, match="already holds checkpoints; set train.resume=true"):
        trainer_for(path, *extra, f"run.output_dir={tmp_path / 'cut'}")
    resumed = trainer_for(path, *extra, f"run.output_dir={tmp_path / 'cut'}", "train.resume=true")
    resumed.train()
    assert resumed.step == 4
    assert_close_dicts(want, state(resumed), rtol=0, atol=0)
    lrs = lambda d: [json.loads(l)["lr"] for l in (d / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert lrs(tmp_path / "full") == lrs(tmp_path / "cut")


def test_corrupt_checkpoint_is_one_clear_error_and_kept(make_config, tmp_path, capsys):
    path = make_config({"train": {"max_steps": 1}})
    assert main(["--config", str(path)]) == 0
    model_file = tmp_path / "run" / "checkpoints" / "step_000001" / "model.pt"
    model_file.write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert main(["--config", str(path), "train.resume=true", "train.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and "corrupt" in err and "Traceback" not in err
    assert model_file.read_bytes() == b"not a checkpoint"


def test_padded_vocabulary_mismatch_trains(make_config, tiny_dir, capsys):
    """A teacher head with 64 extra padding columns (GPT-2 layout) against a 512-column student."""
    path = make_config({"teacher": {"path": str(tiny_dir / "teacher_wide")}})
    trainer = trainer_for(path)
    batch = trainer.data.micro_batches(0)
    metrics = trainer.accumulate(batch)
    assert torch.isfinite(torch.tensor(metrics["kd_student"])) and metrics["kd_student"] > 0


def test_third_party_criterion_trains(make_config, tmp_path, monkeypatch):
    from kdcore.registry import reset_registry

    monkeypatch.syspath_prepend(str(HERE / "fixtures" / "kdcore-hellinger"))
    reset_registry()
    try:
        path = make_config({"criterion": {"name": "hellinger", "temperature": 1.0}})
        assert main(["--config", str(path)]) == 0
        manifest = json.loads((tmp_path / "run" / "plugins.json").read_text())
        assert manifest["used"]["criterion"] == {"name": "hellinger", "provider": "kdcore-hellinger",
                                                 "version": "0.1.0", "module": "kdcore_hellinger"}
        rec = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert len([r for r in rec if r["split"] == "train"]) == 2
    finally:
        sys.modules.pop("kdcore_hellinger", None)
        reset_registry()


def test_identity_refuses_different_tokenizers(make_config, tmp_path):
    from kdcore.tiny import tiny_causal_lm, train_byte_bpe

    other_tok = train_byte_bpe(["completely different text " * 50, "another corpus entirely"], tmp_path / "tok2", 300)
    tiny_causal_lm(other_tok, tmp_path / "other_teacher", hidden=32, layers=1)
    path = make_config({"teacher": {"path": str(tmp_path / "other_teacher")}})
    with pytest.raises(ConfigError, match="aligner 'identity' needs .* share one tokenizer.*'cma'.*'mined'.*'uld'"):
        from kdcore.assemble import validate_models

        validate_models(load_config(path))


def test_lora_student_trains_only_adapters_and_exports_merged(make_config, tmp_path, tiny_dir):
    path = make_config({"student": {"path": str(tiny_dir / "student"), "gradient_checkpointing": True,
                                    "tuner": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}})
    trainer = trainer_for(path)
    trainable = [n for n, p in trainer.module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    from transformers import AutoModelForCausalLM

    final = tmp_path / "run" / "final"
    merged = AutoModelForCausalLM.from_pretrained(final)
    assert (final / "adapter" / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "student")
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(merged.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def test_teacher_adapter_is_merged(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kdcore.models import ModelConfig, load_model

    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "teacher")
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = load_model(ModelConfig(path=str(tiny_dir / "teacher"), adapter=str(tmp_path / "adapter")))
    ids = torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, rtol=1e-5, atol=1e-5)


def test_dev_rouge_l_selects_the_best_checkpoint(make_config, tmp_path):
    path = make_config({"train": {"max_steps": 2, "save_every": 1, "keep_last": 1, "eval_every": 1},
                        "eval": {"max_examples": 4, "generate": True, "seeds": [1, 2], "max_new_tokens": 4,
                                 "select_by": "rouge_l"}})
    trainer = trainer_for(path)
    rng_before = torch.get_rng_state()
    value = trainer.dev_rouge_l()
    assert torch.equal(torch.get_rng_state(), rng_before)  # evaluation leaves the training RNG alone
    assert 0.0 <= value <= 100.0
    trainer.train()
    out = tmp_path / "run"
    evals = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    assert all("rouge_l" in r for r in evals)
    best = json.loads((sorted((out / "checkpoints").iterdir())[-1] / "state.json").read_text())["best"]
    scores = {r["step"]: r["rouge_l"] for r in evals if r["step"] > 0}
    assert best["metric"] == "rouge_l" and best["value"] == max(scores.values())
    assert best["step"] == max(scores, key=lambda s: (scores[s], -s))
    assert (out / "best" / "config.json").is_file()


def test_select_by_rouge_needs_generation(make_config):
    with pytest.raises(ConfigError, match="eval.select_by: 'rouge_l' needs eval.generate: true"):
        load_config(make_config({"eval": {"select_by": "rouge_l"}}))


def test_test_split_rouge_before_after_and_teacher(make_config, tmp_path, capsys):
    path = make_config({"eval": {"max_examples": 4, "test_split": "test", "greedy": True, "max_new_tokens": 3},
                        "task": {"max_examples": 8}})
    assert main(["--config", str(path)]) == 0
    results = json.loads((tmp_path / "run" / "test_rouge.json").read_text())
    assert set(results) == {"split", "student_before", "student_after", "teacher"}
    assert all(0.0 <= results[k] <= 100.0 for k in ("student_before", "student_after", "teacher"))
    assert "ROUGE-L on the test split: student before" in capsys.readouterr().out
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if r["split"] == "test"][-1]["student_after"] == results["student_after"]
