"""ULD criterion: L1 distance between sorted probability vectors (Boizard et al. 2024; DSKD §8.2).

    ULD(p_t, p_s) = Σ_k | sort↓(p_s)_k − sort↓(p_t)_k |     p = softmax(z / T)

The narrower distribution is right-padded with zeros, so V_s and V_t may differ (the closed
form of the 1-D Wasserstein distance with unit ground cost). DSKD's re-implementation uses no
temperature (T = 1, the default). Rows [N, V_s], [N, V_t] -> [N], float32.

Gradient (analytic). Sorting is a permutation ``π`` of the student's columns (descending), so
``∂ULD/∂p_s,π(k) = σ_k = sign(sort↓(p_s)_k − sort↓(p_t)_k)`` (the teacher's padding is 0 there;
``sign(0) = 0`` as autograd's ``|x|``): ``g = σ`` scattered back through ``π``, then the
softmax Jacobian::

    ∂ULD/∂z_s,v = p_s,v (g_v − Σ_w p_s,w g_w) / T
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcore import hookimpl
from kdcore.criterion import TemperedDivergence, softmax_backward_


class ULD(TemperedDivergence):
    name = "uld"
    same_vocab = False

    def divergence(self, log_p_s, log_p_t):
        p_s = log_p_s.exp().sort(-1, descending=True).values
        p_t = log_p_t.exp().sort(-1, descending=True).values
        width = max(p_s.shape[-1], p_t.shape[-1])
        return (F.pad(p_s, (0, width - p_s.shape[-1])) - F.pad(p_t, (0, width - p_t.shape[-1]))).abs().sum(-1)

    def divergence_and_grad(self, log_p_s, log_p_t, out):
        p_s = log_p_s.exp_()
        s_sorted, order = p_s.sort(-1, descending=True)
        t_sorted = log_p_t.exp_().sort(-1, descending=True).values
        k = min(s_sorted.shape[-1], t_sorted.shape[-1])
        diff = s_sorted[:, :k].sub_(t_sorted[:, :k])  # beyond k: the wider side against the padding
        values = diff.abs().sum(-1) + s_sorted[:, k:].sum(-1) + t_sorted[:, k:].sum(-1)
        softmax_backward_(out.scatter_(-1, order, s_sorted.sign_()), p_s)
        return values


@hookimpl
def kdcore_register_criteria(register):
    register(ULD)
