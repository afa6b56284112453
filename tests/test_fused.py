"""The fused space evaluation (gradients in the forward pass) against the checkpointed autograd path."""

from __future__ import annotations

import functools

import pytest
import torch

import kdcore
from kdcore.distill import objective, term_weight
from kdcore.kdspace import Accuracy, CrossEntropy, FirstColumns, Head, Rows, Space, evaluate_space

CRITERIA = ["fkl", "rkl", "jsd", "skl", "srkl", "tvd", "akl", "ce", "uld"]


def inputs(seed=0, n=37, d=8, D=12, V=61, V_t=None, bias=False, softcap=None, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, d, generator=g, dtype=torch.float64).float().requires_grad_(True)
    w_s = torch.randn(V, d, generator=g).requires_grad_(True)
    b_s = torch.randn(V, generator=g).requires_grad_(True) if bias else None
    proj = torch.nn.Linear(D, d)
    h_t = torch.randn(n, D, generator=g)
    w_t = torch.randn(V_t or V, D, generator=g)
    labels = torch.randint(0, V, (n,), generator=g)
    return dict(h_s=h_s, w_s=w_s, b_s=b_s, proj=proj, h_t=h_t, w_t=w_t, labels=labels, softcap=softcap, scale=scale)


def student_space(x, criterion, gate=False):
    """DSKD's student space: student rows + trainable head; projected teacher rows through the
    detached student head, with the objective's CE, t2s_ce and an (optionally gating) accuracy."""
    head = Head(x["w_s"], x["b_s"], scale=x["scale"], softcap=x["softcap"])
    return Space("student", Rows(x["h_s"], head), Rows(x["proj"](x["h_t"]), head.detached()),
                 criterion, labels=x["labels"],
                 terms=[CrossEntropy("ce", "student"), CrossEntropy("t2s_ce", "teacher"), Accuracy("t2s_acc", "teacher", gate)])


def vanilla_space(x, criterion):
    return Space("student", Rows(x["h_s"], Head(x["w_s"], x["b_s"])), Rows(x["h_t"], Head(x["w_t"], detach=True)), criterion,
                 labels=x["labels"], terms=[CrossEntropy("ce", "student")])


def params(x):
    return [p for p in (x["h_s"], x["w_s"], x["b_s"], x["proj"].weight, x["proj"].bias) if p is not None]


def grads_of(build, x, fused: bool, weighted: bool, chunk: int):
    losses, counts = evaluate_space(build(), chunk_size=chunk, fused=fused,
                                    weights=functools.partial(term_weight, kd_weight=0.3) if weighted else None)
    loss = objective(losses, 0.3, zero=torch.zeros(()))
    grads = torch.autograd.grad(loss, params(x), allow_unused=True)
    return {k: v.detach() for k, v in losses.items()}, counts, grads


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("weighted", [True, False])
def test_fused_student_space_equals_autograd(criterion, weighted):
    crit = kdcore.build("criterion", {"name": criterion, "temperature": 2.0} if criterion != "uld" else "uld")
    x = inputs(bias=True)
    build = lambda: student_space(x, crit, gate=True)
    want_losses, want_counts, want = grads_of(build, x, fused=False, weighted=False, chunk=10)
    got_losses, got_counts, got = grads_of(build, x, fused=True, weighted=weighted, chunk=10)
    for k in want_losses:
        torch.testing.assert_close(got_losses[k], want_losses[k], rtol=1e-5, atol=1e-6)
    assert torch.equal(got_counts["t2s_acc"][0], want_counts["t2s_acc"][0])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("softcap,scale", [(None, 1.0), (3.0, 1.0), (None, 0.5), (5.0, 2.0)])
def test_fused_follows_softcap_and_logit_scale(softcap, scale):
    crit = kdcore.build("criterion", {"name": "fkl", "temperature": 1.0})
    x = inputs(softcap=softcap, scale=scale)
    build = lambda: student_space(x, crit)
    _, _, want = grads_of(build, x, fused=False, weighted=False, chunk=7)
    _, _, got = grads_of(build, x, fused=True, weighted=True, chunk=7)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_fused_padded_columns_and_a_wider_teacher():
    crit = FirstColumns(kdcore.build("criterion", {"name": "rkl", "temperature": 2.0}), 61)
    x = inputs(V=61, V_t=70)
    build = lambda: vanilla_space(x, crit)
    want_losses, _, want = grads_of(build, x, fused=False, weighted=False, chunk=9)
    got_losses, _, got = grads_of(build, x, fused=True, weighted=True, chunk=9)
    torch.testing.assert_close(got_losses["kd_student"], want_losses["kd_student"], rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_per_term_gradients_when_no_weights_are_given():
    crit = kdcore.build("criterion", {"name": "jsd", "temperature": 2.0})
    x = inputs()
    losses, _ = evaluate_space(student_space(x, crit), chunk_size=8)
    ref, _ = evaluate_space(student_space(x, crit), chunk_size=8, fused=False)
    for name in ("kd_student", "ce", "t2s_ce"):
        got = torch.autograd.grad(losses[name], params(x), allow_unused=True, retain_graph=True)
        want = torch.autograd.grad(ref[name], params(x), allow_unused=True, retain_graph=True)
        for g, w, p in zip(got, want, params(x)):  # a term that does not reach p: None or zeros
            g = torch.zeros_like(p) if g is None else g
            w = torch.zeros_like(p) if w is None else w
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_weighted_terms_refuse_another_combination():
    crit = kdcore.build("criterion", "fkl")
    x = inputs()
    losses, _ = evaluate_space(vanilla_space(x, crit), chunk_size=8, weights=functools.partial(term_weight, kd_weight=0.5))
    with pytest.raises(RuntimeError, match="differentiated through another combination"):
        losses["kd_student"].backward()


def test_the_teacher_head_runs_once(monkeypatch):
    crit = kdcore.build("criterion", "fkl")
    x = inputs(n=40)
    calls = {"teacher": 0}
    original = Head.__call__

    def counting(self, hidden):
        if self.weight is x["w_t"]:
            calls["teacher"] += 1
        return original(self, hidden)

    monkeypatch.setattr(Head, "__call__", counting)
    for fused, expected in ((True, 4), (False, 8)):  # 4 chunks; the checkpointed path recomputes in backward
        calls["teacher"] = 0
        losses, _ = evaluate_space(vanilla_space(x, crit), chunk_size=10, fused=fused,
                                   weights=functools.partial(term_weight, kd_weight=0.5))
        objective(losses, 0.5, zero=torch.zeros(())).backward()
        assert calls["teacher"] == expected, (fused, calls)
