"""DSKD projectors and cross-tokenizer aligners (docs/methods.md#dskd, #cma, #mined, #uld) on the tiny pair."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import kdcore
from kdcore.assemble import build_plugins, check_pair, side_context
from kdcore.components import spec
from kdcore.data import Collator, PairDataset, pad_id
from kdcore.distill import DistillModule
from kdcore.errors import ConfigError
from kdcore.kdspace import Head, ModelSide, evaluate_space
from kdcore.models import ModelConfig, freeze, load_model, load_tokenizer, same_tokenizer
from kdcore_tasks.instruction import InstructionTask

from conftest import DATA_DIR

ALIGNERS = ["identity", "cma", "mined", "uld"]
PROJECTORS = ["none", "student_space", "teacher_space", "dual"]


@pytest.fixture(scope="session")
def pair(tiny_pair):
    out = {}
    for key, path in tiny_pair.items():
        out[key] = (load_tokenizer(ModelConfig(path=str(path))), load_model(ModelConfig(path=str(path))))
    freeze(out["teacher"][1])
    return out


@pytest.fixture(scope="session")
def examples():
    return InstructionTask(data_dir=str(DATA_DIR)).examples("train")[:4]


def make_module(pair, aligner, projector, criterion, student_key="student"):
    """Build like the engine does; raises ConfigError for invalid combinations."""
    s_tok, s_model = pair[student_key]
    t_tok, t_model = pair["teacher"]
    shared = same_tokenizer(s_tok, t_tok)
    ctx = {**side_context("student", s_tok, s_model), **side_context("teacher", t_tok, t_model)}
    crit, proj, al = build_plugins(spec("criterion", criterion), spec("projector", projector), spec("aligner", aligner), ctx)
    check_pair(crit, proj, al, s_tok, t_tok, shared, ctx["student_vocab_size"], ctx["teacher_vocab_size"])
    proj.prepare(s_model, t_model)
    return DistillModule(s_model, proj, al, crit, kd_weight=0.5, chunk_size=16, teacher=t_model), shared


def batch_for(pair, module, examples, student_key="student", shared=False):
    s_tok, t_tok = pair[student_key][0], pair["teacher"][0]
    ds = PairDataset(examples, s_tok, None if shared else t_tok, 128, 96, module.aligner.pair_features)
    return Collator(pad_id(s_tok), None if shared else pad_id(t_tok))([ds[i] for i in range(len(ds))])


def expected_valid(aligner, projector, criterion, shared):
    crit_cls = kdcore.components.get_registry().get("criterion", criterion).cls
    if aligner == "identity":
        return shared
    if aligner == "cma":
        return projector != "none"
    if aligner == "mined":
        return projector == "none"
    return projector == "none" and not crit_cls.same_vocab  # uld


@pytest.mark.parametrize("aligner", ALIGNERS)
@pytest.mark.parametrize("projector", PROJECTORS)
def test_every_valid_combination_trains_and_invalid_ones_are_refused(pair, examples, aligner, projector):
    for criterion in kdcore.names("criterion"):
        for student_key in ("student", "student_same"):
            shared = student_key == "student_same"
            if aligner != "identity" and shared:
                continue  # cross-tokenizer aligners are exercised on the cross pair
            valid = expected_valid(aligner, projector, criterion, shared)
            if not valid:
                with pytest.raises(ConfigError):
                    make_module(pair, aligner, projector, criterion, student_key)
                continue
            module, shared = make_module(pair, aligner, projector, criterion, student_key)
            loss, terms, _ = module(batch_for(pair, module, examples, student_key, shared))
            loss.backward()
            grads = [p.grad for p in module.parameters() if p.requires_grad]
            assert torch.isfinite(loss), (aligner, projector, criterion)
            assert all(g is None or torch.isfinite(g).all() for g in grads)
            assert module.student.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
            module.zero_grad(set_to_none=True)


def grad_owners(module, term):
    """Which parameter groups receive a gradient from ``term``."""
    module.zero_grad(set_to_none=True)
    term.backward(retain_graph=True)
    groups = {"student": module.student, "t2s": getattr(module.projector, "t2s", None),
              "s2t": getattr(module.projector, "s2t", None), "query": getattr(module.aligner, "query", None)}
    owners = set()
    for name, part in groups.items():
        if part is not None and any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()):
            owners.add(name)
    assert all(p.grad is None for p in module.teacher.parameters())
    return owners


def test_gradient_flow_same_vocabulary_dskd(pair, examples):
    """docs/methods.md#dskd-gradients."""
    module, shared = make_module(pair, "identity", "dual", "fkl", "student_same")
    terms, _ = module.terms(batch_for(pair, module, examples, "student_same", shared))
    assert grad_owners(module, terms["t2s_ce"]) == {"t2s"}
    assert grad_owners(module, terms["kd_student"]) == {"student"}
    assert grad_owners(module, terms["kd_teacher"]) == {"s2t", "student"}
    assert grad_owners(module, terms["ce"]) == {"student"}


def test_gradient_flow_cma(pair, examples):
    """docs/methods.md#cma-gradients (kd_student only exists where the projected teacher is right, so
    the test forces the accuracy mask open)."""
    module, _ = make_module(pair, "cma", "dual", "fkl")
    module.aligner.mask_kd_by_teacher_accuracy = False
    terms, _ = module.terms(batch_for(pair, module, examples))
    assert grad_owners(module, terms["t2s_ce"]) == {"t2s", "query"}
    assert grad_owners(module, terms["kd_student"]) == {"student"}
    assert grad_owners(module, terms["kd_teacher"]) == {"s2t", "student", "query"}
    assert grad_owners(module, terms["ce"]) == {"student"}


def sides(module, batch):
    from kdcore.distill import last_hidden

    s, t = batch["student"], batch["teacher"]
    student = module.side(module.student, s, last_hidden(module.student, s))
    with torch.no_grad():
        teacher = module.side(module.teacher, t, last_hidden(module.teacher, t))
    return student, teacher


def test_cma_attention_rows_sum_to_one_over_response_positions(pair, examples):
    module, _ = make_module(pair, "cma", "dual", "fkl")
    batch = batch_for(pair, module, examples)
    student, teacher = sides(module, batch)
    al = module.aligner.align(student, teacher)
    m_s, m_t = student.mask, teacher.mask
    a = al.attn_t2s  # [B, n, m]
    on_response = (a * m_t[:, None, :]).sum(-1)
    torch.testing.assert_close(on_response[m_s], torch.ones(int(m_s.sum())))
    b = al.attn_s2t
    torch.testing.assert_close((b * m_s[:, None, :]).sum(-1)[m_t], torch.ones(int(m_t.sum())))
    assert a.shape == (len(examples), m_s.shape[1], m_t.shape[1])


def test_mined_identical_tokenizations_align_to_themselves(pair, examples):
    tok = pair["teacher"][0]
    aligner = kdcore.build("aligner", "mined", student_tokenizer=tok, teacher_tokenizer=tok, student_vocab_size=len(tok))
    assert torch.equal(aligner.s_ids, aligner.t_ids)  # the vocabulary map is the identity
    ds = PairDataset(examples, tok, tok, 128, 96, aligner.pair_features)
    for i in range(len(ds)):
        item = ds[i]
        pos = item["align"]["mined_teacher_pos"]
        response = [j for j, y in enumerate(item["student"]["labels"]) if y != -100]
        assert [pos[j] for j in response] == response
        assert all(pos[j] == -1 for j in range(len(pos)) if j not in response)


def test_mined_dtw_on_a_hand_example():
    from kdcore_plugins.aligners.mined import dtw_matches

    cost = torch.tensor([[0, 3, 3], [3, 1, 3], [3, 1, 3], [3, 3, 0]], dtype=torch.float64).numpy()
    # teacher rows 1 and 2 both map to student column 1; the ends match one to one
    assert dtw_matches(cost) == [[0], [2, 1], [3]]


def test_mined_logit_map_and_gold_fallback():
    from kdcore_plugins.aligners.mined import FILL, GOLD, MinEDAlignment

    s_ids, t_ids = torch.tensor([0, 2]), torch.tensor([1, 0])
    class Side:
        mask = torch.ones(1, 2, dtype=torch.bool)
    al = MinEDAlignment(Side, Side, torch.tensor([[0, -1]]), s_ids, t_ids, vocab_size=3)
    logits = torch.tensor([[5.0, 7.0], [1.0, 2.0]])
    out = al.teacher_logit_map(logits, torch.tensor([1, 1]), torch.tensor([1, 0]))
    assert out[0].tolist() == [7.0, FILL, 5.0]
    assert out[1].tolist() == [FILL, GOLD, FILL]


def test_uld_is_invariant_to_permuting_either_vocabulary():
    crit = kdcore.build("criterion", "uld")
    torch.manual_seed(0)
    s, t = torch.randn(6, 40), torch.randn(6, 70)
    base = crit.per_token(s, t)
    torch.testing.assert_close(crit.per_token(s[:, torch.randperm(40)], t), base)
    torch.testing.assert_close(crit.per_token(s, t[:, torch.randperm(70)]), base)
    # the narrower distribution is padded with zeros: a reference on hand
    p_s, p_t = s.softmax(-1).sort(-1, descending=True).values, t.softmax(-1).sort(-1, descending=True).values
    want = (F.pad(p_s, (0, 30)) - p_t).abs().sum(-1)
    torch.testing.assert_close(base, want)


def test_uld_pairs_positions_by_response_rank():
    from kdcore_plugins.aligners.uld import positional_index

    s = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    t = torch.tensor([[0, 0, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert positional_index(s, t).tolist() == [[-1, 2, 3, -1, -1], [-1, -1, 0, 1, 2]]


def test_dskd_terms_equal_a_hand_computation():
    """Same-vocabulary DSKD on a hand-sized example (B=1, n=3 with 2 response rows, d=2, D=3, V=4)."""
    torch.manual_seed(3)
    d, D, V = 2, 3, 4
    proj = kdcore.build("projector", {"name": "dual", "teacher_criterion": {"name": "fkl", "temperature": 2.0}}, student_hidden_size=d,
                        teacher_hidden_size=D, criterion=kdcore.build("criterion", {"name": "rkl", "temperature": 2.0}))
    crit = kdcore.build("criterion", {"name": "rkl", "temperature": 2.0})
    w_s, w_t = torch.randn(V, d, requires_grad=True), torch.randn(V, D)
    h_s, h_t = torch.randn(1, 3, d, requires_grad=True), torch.randn(1, 3, D)
    labels = torch.tensor([[-100, 2, 1]])
    ids = torch.tensor([[0, 1, 2]])
    student = ModelSide(h_s, Head(w_s), ids, labels, torch.ones_like(ids))
    teacher = ModelSide(h_t, Head(w_t).detached(), ids, labels, torch.ones_like(ids))
    from kdcore_plugins.aligners.identity import IdentityAlignment

    al = IdentityAlignment(labels.ne(-100), labels.ne(-100))
    terms = {}
    for space in proj.spaces(student, teacher, al, crit):
        losses, _ = evaluate_space(space, chunk_size=1)
        terms.update(losses)

    rows = [1, 2]
    y = torch.tensor([2, 1])
    hs, ht = h_s[0, rows], h_t[0, rows]
    z_s = hs @ w_s.T
    z_t2s = proj.t2s(ht) @ w_s.T
    z_s2t = proj.s2t(hs) @ w_t.T
    z_t = ht @ w_t.T

    def kl(p_logits, q_logits, T):  # KL(p || q)
        lp, lq = F.log_softmax(p_logits / T, -1), F.log_softmax(q_logits / T, -1)
        return (lp.exp() * (lp - lq)).sum()

    torch.testing.assert_close(terms["ce"], F.cross_entropy(z_s, y, reduction="sum"))
    torch.testing.assert_close(terms["t2s_ce"], F.cross_entropy(z_t2s, y, reduction="sum"))
    torch.testing.assert_close(terms["kd_student"], kl(z_s, z_t2s, 2.0))  # reverse KL: KL(p_s || p_t2s)
    torch.testing.assert_close(terms["kd_teacher"], kl(z_t, z_s2t, 2.0))  # forward KL in teacher space


def test_pinv_init_preserves_logits(pair):
    t_tok, t_model = pair["teacher"]
    s_tok, s_model = pair["student_same"]
    proj = kdcore.build("projector", {"name": "dual", "init": "pinv"}, student_hidden_size=32, teacher_hidden_size=64,
                        criterion=kdcore.build("criterion", "fkl"), student_tokenizer=s_tok, teacher_tokenizer=t_tok)
    proj.prepare(s_model, t_model)
    w_s, w_t = Head.of(s_model).weight.detach(), Head.of(t_model).weight.detach()
    h_t = torch.randn(5, 64)
    # least squares: W_s P is the best rank-d fit of W_t, so its residual is orthogonal to W_s's columns
    residual = (h_t @ w_t.T) - (proj.t2s(h_t) @ w_s.T)
    assert (residual @ w_s).abs().max() < 1e-3 * (h_t @ w_t.T).abs().max() * w_s.abs().sum(0).max()


def test_shipped_tiny_configs_train(repo_like_cwd, monkeypatch):
    from pathlib import Path

    from kdcore.cli import main

    monkeypatch.chdir(repo_like_cwd)
    configs = sorted(p for p in Path("configs/tiny").glob("*-*.yaml") if p.name != "grid-base.yaml")
    assert len(configs) == 9
    for path in configs:
        out = repo_like_cwd / "out" / path.stem
        assert main(["--config", str(path), f"run.output_dir={out}", "train.max_steps=2", "train.eval_at_start=false",
                     "eval.max_examples=4"]) == 0, path
        assert (out / "final" / "config.json").is_file()


def tiny_layout(arch, tokenizer, seed=0):
    """A tiny random model of a given HF family sized to ``tokenizer``."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, MistralConfig, Qwen2Config

    from kdcore.tiny import tiny_causal_lm

    specials = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    bos_token_id=tokenizer.bos_token_id)
    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if arch in ("gpt2", "llama"):
        return tiny_causal_lm(tokenizer, arch=arch, hidden=32, layers=2, seed=seed)
    cfg = {"qwen2": Qwen2Config, "mistral": MistralConfig}.get(arch)
    cfg = cfg(**dims, **specials) if cfg else Gemma3TextConfig(**dims, head_dim=8, **specials)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "mistral", "gemma3"])
def test_dskd_cma_works_for_every_family_as_teacher_and_student(pair, examples, arch):
    """DSKD-CMA with a teacher and then a student of each layout; embeddings and heads are found
    through get_input_embeddings / get_output_embeddings only."""
    t_tok, s_tok = pair["teacher"][0], pair["student"][0]
    for role in ("teacher", "student"):
        teacher = tiny_layout(arch, t_tok) if role == "teacher" else pair["teacher"][1]
        student = tiny_layout(arch, s_tok, seed=1) if role == "student" else tiny_layout("llama", s_tok, seed=1)
        freeze(teacher)
        local = {"teacher": (t_tok, teacher), "student": (s_tok, student)}
        module, _ = make_module(local, "cma", "dual", "fkl")
        module.aligner.mask_kd_by_teacher_accuracy = False
        loss, terms, _ = module(batch_for(local, module, examples))
        loss.backward()
        assert torch.isfinite(loss) and terms["kd_teacher"] > 0 and terms["kd_student"] > 0, (arch, role)
        assert module.projector.s2t.weight.grad is not None and module.aligner.query.weight.grad is not None
