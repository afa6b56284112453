"""Chunked KD spaces: values and gradients equal the unchunked computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdcore
from kdcore.kdspace import Accuracy, CrossEntropy, FirstColumns, Head, Rows, Space, cross_entropy_sum, evaluate_space


def naive(space):
    s = space.student.head(space.student.hidden)
    t = space.teacher.head(space.teacher.hidden)
    kd = space.criterion.per_token(s, t.detach()).sum()
    ce = F.cross_entropy(s.float(), space.labels, reduction="sum")
    t_ce = F.cross_entropy(t.float(), space.labels, reduction="sum")
    return kd, ce, t_ce


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
@pytest.mark.parametrize("criterion", ["fkl", "rkl", "jsd", "akl"])
def test_chunked_equals_unchunked(chunk, criterion):
    if criterion not in kdcore.names("criterion"):
        pytest.skip(f"{criterion} not registered")
    torch.manual_seed(0)
    n, d, D, V = 50, 8, 12, 97
    h_s = torch.randn(n, d, requires_grad=True)
    w_s = torch.randn(V, d, requires_grad=True)
    proj = torch.nn.Linear(D, d)  # a trainable teacher-side projection, as in DSKD's student space
    h_t = torch.randn(n, D)
    w_t = torch.randn(V, d)
    labels = torch.randint(0, V, (n,))
    crit = kdcore.build("criterion", {"name": criterion, "temperature": 2.0})

    def space():
        return Space("student", Rows(h_s, Head(w_s)), Rows(proj(h_t), Head(w_t)), crit, labels=labels,
                     terms=[CrossEntropy("ce", "student"), CrossEntropy("t2s_ce", "teacher"), Accuracy("t2s_acc", "teacher")])

    losses, counts = evaluate_space(space(), chunk_size=chunk)
    grads = torch.autograd.grad(losses["kd_student"] + losses["ce"] + losses["t2s_ce"], [h_s, w_s, proj.weight])
    kd, ce, t_ce = naive(space())
    want = torch.autograd.grad(kd + ce + t_ce, [h_s, w_s, proj.weight])
    torch.testing.assert_close(losses["kd_student"], kd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses["ce"], ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses["t2s_ce"], t_ce, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    correct = (Head(w_t)(proj(h_t)).argmax(-1) == labels).sum()
    assert counts["t2s_acc"][0] == correct and counts["t2s_acc"][1] == n


def test_accuracy_mask_and_kd_columns():
    torch.manual_seed(1)
    n, d, V = 20, 4, 30
    h_s, h_t = torch.randn(n, d), torch.randn(n, d)
    w_s, w_t = torch.randn(V, d), torch.randn(V + 6, d)  # teacher head with 6 padding columns
    labels = Head(w_t)(h_t)[:, :V].argmax(-1)
    labels[::2] = (labels[::2] + 1) % V  # half the rows: teacher wrong
    crit = kdcore.build("criterion", "fkl")
    losses, _ = evaluate_space(Space("s", Rows(h_s, Head(w_s)), Rows(h_t, Head(w_t)), FirstColumns(crit, V), labels=labels,
                                     terms=[Accuracy("acc", "teacher", gate=True)]), chunk_size=3)
    s, t = Head(w_s)(h_s), Head(w_t)(h_t)[:, :V]
    hit = (Head(w_t)(h_t).argmax(-1) == labels).float()
    torch.testing.assert_close(losses["kd_s"], (crit.per_token(s, t) * hit).sum())


def test_cross_entropy_sum_matches_torch():
    torch.manual_seed(2)
    h, w, y = torch.randn(33, 5), torch.randn(40, 5), torch.randint(0, 40, (33,))
    torch.testing.assert_close(cross_entropy_sum(h, Head(w), y, chunk_size=4), F.cross_entropy(h @ w.T, y, reduction="sum"))


def test_empty_rows_give_zero():
    crit = kdcore.build("criterion", "fkl")
    space = Space("s", Rows(torch.zeros(0, 4), Head(torch.randn(9, 4))), Rows(torch.zeros(0, 4), Head(torch.randn(9, 4))), crit)
    losses, _ = evaluate_space(space)
    assert losses["kd_s"].item() == 0.0
