"""Metrics of a run: accumulation over micro-batches and ranks, and logging.

Every metric is a ratio ``Σ numerator / Σ denominator`` summed over the micro-batches of a
step (or the batches of an evaluation) and over all ranks, so one all-reduce gives exact
global values: a loss term is (its sum over tokens, the number of student response tokens),
an accuracy is (correct rows, rows), any other per-row quantity a plugin reports is (its sum,
its count).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from .distributed import DistInfo, all_reduce_sum

Number = Union[float, torch.Tensor]


class MetricSums:
    """Named (numerator, denominator) pairs, summed locally and reduced over ranks at once."""

    def __init__(self):
        self._num: Dict[str, Number] = {}
        self._den: Dict[str, Number] = {}
        self.term_names: set = set()  # the loss terms among the names (the objective's inputs)
        self._term_tokens: Number = 0  # tokens of every batch that added terms: the terms' shared denominator

    def add(self, name: str, numerator: Number, denominator: Number) -> None:
        if isinstance(numerator, torch.Tensor):
            numerator = numerator.detach().float()
        self._num[name] = self._num.get(name, 0) + numerator
        self._den[name] = self._den.get(name, 0) + denominator

    def add_terms(self, terms: Mapping[str, torch.Tensor], tokens: Number) -> None:
        """Loss terms (sums over tokens), normalised by the student response ``tokens``. Every
        loss term shares one denominator, the tokens of all the batches that added terms, as the
        trainer's normalisation does: a term that a micro-batch does not contribute (the gold CE
        of a pseudo-target micro-batch under Joint-Teaching) counts as 0 there, so the logged
        ``loss`` is the optimised one."""
        for name, value in terms.items():
            self.add(name, value, tokens)
        self.term_names.update(terms)
        self._term_tokens = self._term_tokens + tokens

    def add_ratios(self, ratios: Mapping[str, Tuple[Number, Number]]) -> None:
        """``{name: (numerator, denominator)}``, e.g. accuracies as (correct, rows)."""
        for name, (num, den) in ratios.items():
            self.add(name, num, den)

    def reduce(self, dist: DistInfo, device) -> Dict[str, float]:
        """Global values (one all-reduce over ranks). Under several processes the ranks first
        agree on the names (a rank with nothing to add, e.g. no eval batch, holds none), so every
        rank takes part in the same all-reduce. A metric whose denominator is 0 everywhere is 0."""
        names = self._agree_names(dist) if dist.enabled else sorted(self._num)
        if not names:
            return {}
        for name in self.term_names:
            self._den[name] = self._term_tokens
        flat = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).reshape(())
                            for name in names for v in (self._num[name], self._den[name])])
        flat = all_reduce_sum(flat.to(device), dist).cpu()
        out = {}
        for i, name in enumerate(names):
            num, den = flat[2 * i].item(), flat[2 * i + 1].item()
            out[name] = num / den if den else 0.0
        return out


    def _agree_names(self, dist: DistInfo):
        """The union of every rank's names (and loss-term names); missing ones count as 0/0."""
        import torch.distributed as tdist

        gathered = [None] * dist.world_size
        tdist.all_gather_object(gathered, (sorted(self._num), sorted(self.term_names)))
        names = sorted(set().union(*(set(g[0]) for g in gathered)))
        for g in gathered:
            self.term_names.update(g[1])
        for name in names:
            self._num.setdefault(name, 0.0)
            self._den.setdefault(name, 0.0)
        return names


class MetricLog:
    """``metrics.jsonl`` (one JSON record per line) and TensorBoard scalars ``split/name``,
    written by rank 0 only.

    ``resume_step``: the run resumes from the checkpoint of that step, so the records of later
    steps (written before the interruption, about to be replayed) are dropped from
    ``metrics.jsonl`` (and a line torn by a crash), and TensorBoard purges its events after it.
    """

    def __init__(self, out_dir: Path, enabled: bool, resume_step: Optional[int] = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            if resume_step is not None:
                truncate_records(self.path, resume_step)
            purge = resume_step + 1 if resume_step is not None else None
            self.writer = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=purge)

    def log(self, split: str, step: int, metrics: Optional[Mapping[str, float]]) -> None:
        """One record; ``metrics`` None (e.g. no test split to score) records nothing."""
        if not self.enabled or metrics is None:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"split": split, "step": step, **metrics}) + "\n")
        for name, value in metrics.items():
            self.writer.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def truncate_records(path: Path, step: int) -> None:
    """Keep the records of ``path`` (``metrics.jsonl``) whose step is at most ``step``."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line torn by a crash
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def merge(into: Dict[str, float], extra: Optional[Mapping[str, float]], where: str) -> Dict[str, float]:
    """Add hook-reported metrics to a record; a name reported twice is an error."""
    from .errors import PluginError

    for name, value in (extra or {}).items():
        if name in into:
            raise PluginError(f"{where}: metric '{name}' is reported twice (by the engine or another hook)")
        into[name] = float(value)
    return into
