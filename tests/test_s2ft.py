"""The S2FT tuner: co-permutation invariance per layout, partial back-propagation gradients,
only the selected rows/columns change, adapters fuse/unfuse, budgets, and runs on the tiny pair."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from kdcore.config import load_config
from kdcore.distributed import DistInfo
from kdcore.errors import ConfigError
from kdcore.trainer import Trainer
from kdcore_plugins.tuners._s2ft_adapter import fuse, load_adapter, unfuse
from kdcore_plugins.tuners.s2ft import S2FT


def tiny(arch: str, seed: int = 0):
    """A random 2-layer model of each supported layout, built from its config class offline."""
    import transformers as tf

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    cfg = {
        "llama": lambda: tf.LlamaConfig(num_key_value_heads=4, **common),
        "llama_gqa": lambda: tf.LlamaConfig(num_key_value_heads=2, **common),
        "qwen2": lambda: tf.Qwen2Config(num_key_value_heads=4, **common),
        "mistral": lambda: tf.MistralConfig(num_key_value_heads=2, **common),
        "gemma3": lambda: tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, sliding_window=4, **common),
        "gpt2": lambda: tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0),
    }[arch]()
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # non-zero biases so that their permutation is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


LAYOUTS = ["llama", "llama_gqa", "qwen2", "mistral", "gemma3", "gpt2"]
BUDGETS = dict(o=3, down=7, v=2, up=5)


@pytest.mark.parametrize("arch", LAYOUTS)
def test_co_permutation_keeps_logits(arch):
    model = tiny(arch)
    x = torch.randint(0, 64, (2, 11))
    ref = model(x).logits
    S2FT(**BUDGETS, seed=3).apply(model)
    assert any(r.order != sorted(r.order) for r in model.s2ft_plan.reorderings)  # something really moved
    assert (model(x).logits - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_block_gradients_equal_full_fine_tuning_restricted(arch):
    full = tiny(arch)
    tuned = copy.deepcopy(full)
    S2FT(**BUDGETS, seed=1).apply(tuned)
    # eval mode: no dropout, so both models see the same function
    x = torch.randint(0, 64, (2, 9))
    full(x, labels=x).loss.backward()
    tuned(x, labels=x).loss.backward()
    for b in tuned.s2ft_plan.blocks:
        block = tuned.get_submodule(b.name).s2ft_block
        w = full.get_submodule(b.name).weight
        g_full = w.grad.t() if type(full.get_submodule(b.name)).__name__ == "Conv1D" else w.grad
        want = g_full.index_select(b.axis, b.original_index())
        torch.testing.assert_close(block.grad, want, rtol=1e-4, atol=1e-6)
    # frozen weights get no gradient buffer
    assert all(p.grad is None for n, p in tuned.named_parameters() if not n.endswith("s2ft_block"))


def test_adam_state_only_for_blocks_and_only_selected_entries_change(tmp_path):
    base = tiny("gpt2")
    model = copy.deepcopy(base)
    tuner = S2FT(**BUDGETS, seed=2)
    tuner.apply(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        x = torch.randint(0, 64, (2, 9))
        model(x, labels=x).loss.backward()
        opt.step(), opt.zero_grad()
    assert all(s["exp_avg"].shape == p.shape for p, s in opt.state.items())
    assert sum(p.numel() for p in params) == tuner.report["trainable"]
    tuner.save_student(model, tmp_path / "final", final=True)
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    changed = {}
    for (name, a), (_, b) in zip(base.state_dict().items(), saved.state_dict().items()):
        diff = a != b
        if diff.any():
            changed[name] = diff
    blocks = {b.name: b for b in model.s2ft_plan.blocks}
    assert set(changed) == {f"{n}.weight" for n in blocks}
    for name, diff in changed.items():  # differences only inside the selected original rows/columns
        b = blocks[name[: -len(".weight")]]
        logical = diff.t() if "c_" in name else diff
        mask = torch.zeros_like(logical)
        if b.axis == 1:
            mask[:, b.original_index()] = True
        else:
            mask[b.original_index()] = True
        assert not (logical & ~mask).any()
    # the adapter fused into the base reproduces the trained model; unfuse restores the base
    plain = copy.deepcopy(base)
    handle = fuse(plain, tmp_path / "final" / "adapter")
    for (name, a), (_, b) in zip(plain.state_dict().items(), saved.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    unfuse(plain, handle)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), base.state_dict().values()))
    fuse(plain, tmp_path / "final" / "adapter")
    unfuse(plain, load_adapter(tmp_path / "final" / "adapter"))  # subtraction: exact up to rounding
    for a, b in zip(plain.state_dict().values(), base.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # export() in place gives the same plain model
    tuner.export(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))


@pytest.mark.parametrize("budgets, match", [
    (dict(o=1.5), r"tuner.o: must be in \[0, 1\], got 1.5"),
    (dict(o=9), "9 units asked but the model has 8"),
    (dict(down=-1), "tuner.down"),
    (dict(o=0, down=0), "nothing would train"),
])
def test_bad_budgets_are_one_config_error(budgets, match):
    import kdcore

    with pytest.raises(ConfigError, match=match):
        tuner = kdcore.build("tuner", {"name": "s2ft", **budgets})
        tuner.apply(tiny("llama"))


def test_defaults_gqa_down_only_and_strategies():
    mha, gqa = tiny("llama"), tiny("llama_gqa")
    S2FT(seed=0).apply(gqa)
    assert {b.kind for b in gqa.s2ft_plan.blocks} == {"down"}
    t = S2FT(o=4, down=0, strategy="weight", order="smallest", allocation="pooled")
    t.apply(mha)
    from kdcore_plugins.tuners._s2ft_select import weight_scores

    ref = tiny("llama")
    from kdcore_plugins.tuners._s2ft_layout import find_structures

    scores = weight_scores([p[0] for p in find_structures(ref)], "consumer").reshape(-1)
    want = sorted(scores.argsort()[:4].tolist())
    got = sorted(li * 4 + u for li, units in enumerate(mha.s2ft_plan.selection["o"]) for u in units)
    assert got == want
    batches = [{"input_ids": torch.randint(0, 64, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}]
    t = S2FT(down=6, strategy="activation", order="smallest")
    t.apply(tiny("llama"), calibration=lambda n: iter(batches))
    assert [len(u) for u in t.plan.selection["down"]] == [3, 3]  # uniform allocation


@pytest.mark.parametrize("config", ["identity-none", "cma-dual"])
def test_s2ft_trains_on_the_tiny_pair(config, repo_like_cwd, monkeypatch, tmp_path):
    monkeypatch.chdir(repo_like_cwd)
    cfg = load_config(f"configs/tiny/{config}.yaml", [f"run.output_dir={tmp_path / 'run'}", "train.max_steps=2",
                                                       "train.grad_accum=2", "train.micro_batch_size=2",
                                                       "student.tuner={name: s2ft, o: 0.25, down: 0.1}"])
    trainer = Trainer(cfg, DistInfo())
    before = {n: p.detach().clone() for n, p in trainer.module.student.named_parameters()}
    trainer.train()
    report = json.loads((tmp_path / "run" / "trainable.json").read_text())
    assert report["trainable"] > 0 and set(report["per_kind"]) == {"o", "down"}
    moved = [n for n, p in trainer.module.student.named_parameters() if not torch.equal(before[n], p)]
    assert moved and all(n.endswith("s2ft_block") or ".weight" in n for n in moved)
    assert (tmp_path / "run" / "final" / "adapter" / "adapter.safetensors").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")  # a plain transformers model


def test_two_process_ddp_matches_single_process_with_grad_accum(make_config, tmp_path):
    """DDP (2 gloo ranks × 1 micro-batch) and one process (2 accumulated micro-batches) give the
    same block gradients and the same weights after the step."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    path = make_config({"student": {"tuner": {"name": "s2ft", "o": 0.25, "down": 0.1, "v": 1}}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    worker = Path(__file__).resolve().parent / "ddp_worker.py"
    procs = [subprocess.Popen([sys.executable, str(worker), str(path), str(tmp_path / "ddp.pt"),
                               "train.micro_batch_size=2", "train.grad_accum=1"],
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "CUDA_VISIBLE_DEVICES": ""},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    single = Trainer(load_config(path, ["train.micro_batch_size=2", "train.grad_accum=2"]), DistInfo())
    single.accumulate(single.data.micro_batches(0))
    grads = {n: p.grad.detach().clone() for n, p in single.module.named_parameters() if p.grad is not None}
    assert grads and all(n.endswith("s2ft_block") for n in grads) and set(grads) == set(ddp["grads"])
    single.optimizer_step()
    for n, g in grads.items():
        torch.testing.assert_close(g, ddp["grads"][n], rtol=1e-4, atol=1e-6)
    for n, p in single.module.named_parameters():
        torch.testing.assert_close(p.detach(), ddp["params"][n], rtol=1e-4, atol=1e-5)


def test_adapter_tool_fuses_and_unfuses(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    base = tiny("llama")
    base.save_pretrained(tmp_path / "base")
    model = copy.deepcopy(base)
    tuner = S2FT(o=2, down=4, seed=5)
    tuner.apply(model)
    with torch.no_grad():
        for b in model.s2ft_plan.blocks:
            model.get_submodule(b.name).s2ft_block.add_(0.5)
    tuner.save_student(model, tmp_path / "final", final=True)
    tool = Path(__file__).resolve().parents[1] / "tools" / "s2ft_adapter.py"
    for action, src, out in (("fuse", "base", "fused"), ("unfuse", "fused", "back")):
        proc = subprocess.run([sys.executable, str(tool), action, "--base", str(tmp_path / src), "--adapter",
                               str(tmp_path / "final" / "adapter"), "--out", str(tmp_path / out)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict()
    fused = AutoModelForCausalLM.from_pretrained(tmp_path / "fused").state_dict()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").state_dict()
    for k, v in base.state_dict().items():
        torch.testing.assert_close(fused[k], final[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(back[k], v, rtol=0, atol=1e-6)
    proc = subprocess.run([sys.executable, str(tool), "fuse", "--base", str(tmp_path / "base"), "--adapter",
                           str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 2 and "cannot be read" in proc.stderr


def test_activation_selection_gets_calibration_from_the_engine(make_config, tmp_path):
    """The engine passes calibration batches (a seeded train sample) to tuners that use them;
    the selection is deterministic, and a checkpoint of another selection is refused on resume."""
    tuner = {"name": "s2ft", "o": 2, "down": 0.1, "strategy": "activation", "order": "smallest",
             "calibration_examples": 6}
    path = make_config({"student": {"tuner": tuner}})
    a = Trainer(load_config(path), DistInfo())
    b = Trainer(load_config(path, [f"run.output_dir={tmp_path / 'other'}"]), DistInfo())
    assert a.parts.tuner.plan.selection == b.parts.tuner.plan.selection
    assert sum(map(len, a.parts.tuner.plan.selection["down"])) == int(0.1 * 2 * 64)
    a.train()
    from kdcore.errors import CheckpointError

    c = Trainer(load_config(path, ["train.resume=true", "train.resume_allow_changes=true",
                                   "student.tuner.selection_seed=7", "student.tuner.strategy=random"]), DistInfo())
    with pytest.raises(CheckpointError, match="another S2FT selection"):
        c.train()
