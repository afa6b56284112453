"""ULD criterion: L1 distance between sorted probability vectors (Boizard et al.; dskd.md §8.2).

    ULD(p_t, p_s) = Σ_k | sort↓(p_s)_k − sort↓(p_t)_k |     p = softmax(z / T)

The narrower distribution is right-padded with zeros, so V_s and V_t may differ (the closed
form of the 1-D Wasserstein distance with unit ground cost). DSKD's re-implementation uses no
temperature (T = 1, the default). Rows [N, V_s], [N, V_t] -> [N], float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcore import Criterion, hookimpl
from kdcore.criterion import positive_temperature


class ULD(Criterion):
    name = "uld"
    same_vocab = False

    def __init__(self, temperature: float = 1.0):
        self.temperature = positive_temperature(self.name, temperature)

    def per_token(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        p_s = torch.softmax(student_logits.float() / self.temperature, -1).sort(-1, descending=True).values
        p_t = torch.softmax(teacher_logits.float() / self.temperature, -1).sort(-1, descending=True).values
        width = max(p_s.shape[-1], p_t.shape[-1])
        p_s = F.pad(p_s, (0, width - p_s.shape[-1]))
        p_t = F.pad(p_t, (0, width - p_t.shape[-1]))
        return (p_s - p_t).abs().sum(-1)


@hookimpl
def kdcore_register_criteria(register):
    register(ULD)
