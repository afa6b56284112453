"""Reference-exact modes where kdcore departs from the DSKD code on purpose
(docs/methods.md#cma, #mined): CMA's ``Norm`` over response rows or over the padded tensor,
CMA's attention-value products in fp32 under autocast, and MinED's vocabulary map read from a
precomputed file."""

from __future__ import annotations

import json

import pytest
import torch

import kdcore
from kdcore.assemble import build_plugins, side_context
from kdcore.components import spec
from kdcore.data import Collator, PairDataset, pad_id
from kdcore.distill import DistillModule
from kdcore.errors import DataError
from kdcore.models import ModelConfig, freeze, load_model, load_tokenizer
from kdcore.vocab import min_edit_distance_map
from kdcore_plugins.aligners.cma import attend, masked_std_normalize, padded_std_normalize
from kdcore_tasks.instruction import InstructionTask

from conftest import DATA_DIR


@pytest.fixture(scope="module")
def pair(tiny_pair):
    out = {k: (load_tokenizer(ModelConfig(path=str(p))), load_model(ModelConfig(path=str(p)))) for k, p in tiny_pair.items()}
    freeze(out["teacher"][1])
    return out


def cma_module(pair, norm):
    (s_tok, s_model), (t_tok, t_model) = pair["student"], pair["teacher"]
    ctx = {**side_context("student", s_tok, s_model), **side_context("teacher", t_tok, t_model)}
    torch.manual_seed(0)
    crit, proj, al = build_plugins(spec("criterion", "fkl"), spec("projector", "dual"),
                                   spec("aligner", {"name": "cma", "norm": norm}), ctx)
    return DistillModule(s_model, proj, al, crit, kd_weight=0.5, chunk_size=16, teacher=t_model)


def batch(pair, extra_teacher_padding=0):
    (s_tok, _), (t_tok, _) = pair["student"], pair["teacher"]
    examples = InstructionTask(data_dir=str(DATA_DIR)).examples("train")[:4]
    ds = PairDataset(examples, s_tok, t_tok, 128, 96)
    b = Collator(pad_id(s_tok), pad_id(t_tok))([ds[i] for i in range(len(ds))])
    if extra_teacher_padding:
        t, n = b["teacher"], extra_teacher_padding
        b["teacher"] = {"input_ids": torch.nn.functional.pad(t["input_ids"], (0, n), value=pad_id(t_tok)),
                        "attention_mask": torch.nn.functional.pad(t["attention_mask"], (0, n), value=0),
                        "labels": torch.nn.functional.pad(t["labels"], (0, n), value=-100)}
    return b


def test_norm_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3) * 4
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(padded_std_normalize(x), x / x.std(), rtol=0, atol=0)
    torch.testing.assert_close(masked_std_normalize(x, mask), x / x[mask].std(), rtol=0, atol=0)


def sides(module, b):
    from kdcore.distill import last_hidden

    s_b, t_b = b["student"], b["teacher"]
    student = module.side(module.student, s_b, last_hidden(module.student, s_b))
    teacher = module.side(module.teacher, t_b, last_hidden(module.teacher, t_b))
    return student, teacher


@torch.no_grad()
def test_norm_modes_compute_their_formula_on_a_real_batch(pair):
    """``padded``: the std over the whole batch tensor, prompt and padding rows included (the
    reference); ``response``: over the response rows. The teacher value of each mode is its own
    formula, the two differ, and only ``response`` is blind to extra padding."""
    b = batch(pair)
    values = {}
    for norm in ("response", "padded"):
        module = cma_module(pair, norm)
        student, teacher = sides(module, b)
        value = module.aligner.align(student, teacher).teacher_value(teacher)
        y = torch.where(teacher.mask, teacher.labels, torch.zeros_like(teacher.labels))
        emb, h, m = teacher.embeddings(y), teacher.hidden, teacher.mask
        want = h / h.std() + emb / emb.std() if norm == "padded" else h / h[m].std() + emb / emb[m].std()
        torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-6)
        values[norm] = value
    assert not torch.allclose(values["response"], values["padded"], rtol=1e-2)
    response = cma_module(pair, "response")
    plain, padded_batch = response.terms(b)[0], response.terms(batch(pair, extra_teacher_padding=7))[0]
    for name in ("t2s_ce", "kd_teacher", "kd_student"):
        torch.testing.assert_close(plain[name], padded_batch[name], rtol=1e-4, atol=1e-4)


def test_attention_value_product_stays_fp32_under_autocast():
    torch.manual_seed(0)
    attn = torch.softmax(torch.randn(2, 6, 9) * 3, -1)
    x = torch.randn(2, 9, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attend(attn, x)
        low = torch.bmm(attn.to(x.dtype), x)  # what a plain bmm under autocast computes
    want = torch.bmm(attn, x.float()).bfloat16()
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)
    assert not torch.equal(low, want)
    y = torch.randn(2, 9, 16)
    assert torch.equal(attend(attn, y), torch.bmm(attn, y))  # fp32: the same op as before


def mined_context(pair):
    (s_tok, s_model), (t_tok, _) = pair["student"], pair["teacher"]
    return {"student_tokenizer": s_tok, "teacher_tokenizer": t_tok,
            "student_vocab_size": s_model.get_output_embeddings().weight.shape[0]}


def test_mined_reads_a_precomputed_vocabulary_map(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("KDCORE_CACHE", str(tmp_path / "cache"))
    ctx = mined_context(pair)
    computed = kdcore.build("aligner", "mined", **ctx)
    mapping = min_edit_distance_map(ctx["teacher_tokenizer"], ctx["student_tokenizer"])
    file = tmp_path / "tea2stu_id_mapping.json"
    file.write_text(json.dumps({str(t): s for t, s in enumerate(mapping)}))  # DSKD's format
    loaded = kdcore.build("aligner", {"name": "mined", "vocab_map": str(file)}, **ctx)
    assert loaded.t2s_map == computed.t2s_map
    assert torch.equal(loaded.s_ids, computed.s_ids) and torch.equal(loaded.t_ids, computed.t_ids)
    # a map that sends every teacher token to student id 7 keeps only the first (lowest) teacher id
    file.write_text(json.dumps([7] * len(mapping)))
    one = kdcore.build("aligner", {"name": "mined", "vocab_map": str(file)}, **ctx)
    assert one.s_ids.tolist() == [7] and one.t_ids.tolist() == [0]


@pytest.mark.parametrize("content, message", [
    ('{"0": 99999}', "source id 0 maps to 99999, not a student id"),
    ('{"999999": 1}', "source id 999999 is outside the teacher vocabulary"),
    ('{"x": 1}', "key 'x' is not a token id"),
    ('"text"', "expected a JSON object"),
    ("{oops", "not a readable JSON vocabulary map"),
])
def test_a_bad_vocabulary_map_is_a_data_error(pair, tmp_path, content, message):
    file = tmp_path / "map.json"
    file.write_text(content)
    with pytest.raises(DataError, match=message):
        kdcore.build("aligner", {"name": "mined", "vocab_map": str(file)}, **mined_context(pair))
