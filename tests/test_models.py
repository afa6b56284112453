"""Model loading helpers: layer pruning, heads equal to the model's logits, path resolution."""

from __future__ import annotations

import pytest
import torch

from kdcore.errors import ModelError
from kdcore.kdspace import Head
from kdcore.models import ModelConfig, keep_layers, load_model, resolve_path
from kdcore.distill import last_hidden


def test_keep_layers_cuts_a_student_from_a_deeper_model(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdcore.tiny import tiny_causal_lm

    tok = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")
    deep = tiny_causal_lm(tok, tmp_path / "deep", hidden=32, layers=4, seed=5)
    student = load_model(ModelConfig(path=str(tmp_path / "deep"), keep_layers=[0, 3]))
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert torch.equal(student.model.layers[1].self_attn.q_proj.weight, deep.model.layers[3].self_attn.q_proj.weight)
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    student.save_pretrained(tmp_path / "cut")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "cut")
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(again(ids).logits, student(ids).logits)
    assert again.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 7)  # the KV cache uses layer_idx
    with pytest.raises(ModelError, match="keep_layers must be distinct indices in \\[0, 4\\)"):
        keep_layers(deep, [0, 4])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_softcap"])
def test_head_reproduces_the_model_logits(tiny_dir, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdcore.tiny import tiny_causal_lm

    tok = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")
    if arch == "gemma3_softcap":
        from transformers import Gemma3TextConfig

        cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=5.0,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
    else:
        model = tiny_causal_lm(tok, arch=arch, hidden=32, layers=2, tie=(arch == "llama"))
    model.eval()
    batch = {"input_ids": torch.tensor([[3, 9, 27, 81, 100]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with torch.no_grad():
        want = model(**batch).logits
        got = Head.of(model)(last_hidden(model, batch))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_package_paths(tmp_path):
    assert resolve_path("package:kdcore_tasks").endswith("tasks")
    with pytest.raises(ModelError, match="Python package 'no_such_pkg_xyz' is not installed"):
        resolve_path("package:no_such_pkg_xyz")
    with pytest.raises(ModelError, match="GGUF file not found"):
        load_model(ModelConfig(path=str(tmp_path), gguf_file="missing.gguf"))
