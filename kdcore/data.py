"""Tokenization, collation and the deterministic batch order.

Sequence construction (docs/methods.md#sequence-construction), independently for each tokenizer:
``prompt_ids = encode(prompt)[:max_prompt_length]``, ``response_ids = encode(response) + [eos]``,
``seq = (prompt_ids + response_ids)[:max_length]``, ``input_ids = seq[:-1]``,
``labels = seq[1:]`` with ``labels[:len(prompt_ids) - 1] = -100``. No BOS is added. Batches are
right-padded with the pad id (eos when the tokenizer has none) to the longest sequence of the
micro-batch, not to a fixed length.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .distributed import DistInfo, all_reduce_sum
from .errors import DataError
from .task import Example

IGNORE = -100


def pad_id(tokenizer) -> int:
    """The id used for right padding: the tokenizer's pad token, else its eos."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token")
    return pid


def encode_prompt(tokenizer, prompt: str, max_prompt_length: int) -> List[int]:
    """Prompt ids: no special tokens (no BOS), the first ``max_prompt_length`` tokens kept."""
    return tokenizer.encode(prompt, add_special_tokens=False)[:max_prompt_length]


def encode_example(tokenizer, example: Example, max_length: int, max_prompt_length: int) -> Dict[str, List[int]]:
    """``input_ids``/``labels`` lists for one example (see the module docstring)."""
    prompt = encode_prompt(tokenizer, example.prompt, max_prompt_length)
    response = tokenizer.encode(example.response, add_special_tokens=False) + [tokenizer.eos_token_id]
    seq = (prompt + response)[:max_length]
    labels = list(seq[1:])
    n_prompt_labels = min(len(prompt) - 1, len(labels))
    labels[:n_prompt_labels] = [IGNORE] * n_prompt_labels
    return {"input_ids": seq[:-1], "labels": labels}


def collate_side(encoded: Sequence[Dict[str, List[int]]], pad: int) -> Dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples: input_ids, attention_mask, labels, all [B, L]."""
    length = max(len(e["input_ids"]) for e in encoded)
    ids = torch.full((len(encoded), length), pad, dtype=torch.long)
    att = torch.zeros((len(encoded), length), dtype=torch.long)
    lab = torch.full((len(encoded), length), IGNORE, dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        att[i, :n] = 1
        lab[i, :n] = torch.tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


class PairDataset(torch.utils.data.Dataset):
    """Examples encoded with the student tokenizer and, if different, the teacher tokenizer.

    Encoding happens in ``__getitem__`` so that it runs in data-loader workers.
    """

    def __init__(self, examples: Sequence[Example], student_tokenizer, teacher_tokenizer=None,
                 max_length: int = 512, max_prompt_length: int = 256, pair_features=None):
        self.examples = list(examples)
        self.pair_features = pair_features  # aligner hook run here, i.e. in data-loader workers
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.max_length, self.max_prompt_length = max_length, max_prompt_length

    def __len__(self) -> int:
        return len(self.examples)

    def with_examples(self, examples: Sequence[Example]) -> "PairDataset":
        """The same encoding (tokenizers, limits, aligner features) of other examples: how
        generated responses are re-tokenised by both models' tokenizers."""
        return PairDataset(examples, self.student_tokenizer, self.teacher_tokenizer, self.max_length,
                           self.max_prompt_length, self.pair_features)

    def __getitem__(self, i: int):
        ex = self.examples[i]
        item = {"student": encode_example(self.student_tokenizer, ex, self.max_length, self.max_prompt_length)}
        if self.teacher_tokenizer is not None:
            item["teacher"] = encode_example(self.teacher_tokenizer, ex, self.max_length, self.max_prompt_length)
        if self.pair_features is not None:
            item["align"] = self.pair_features(item["student"], item.get("teacher", item["student"]))
        return item


@dataclass
class Collator:
    """Batches :class:`PairDataset` items into ``{"student": {...}, "teacher": {...}}``.

    When the teacher shares the student's tokenizer the teacher entry is the same tensors.
    """

    student_pad: int
    teacher_pad: Optional[int] = None

    def __call__(self, items):
        batch = {"student": collate_side([it["student"] for it in items], self.student_pad)}
        if "teacher" in items[0]:
            batch["teacher"] = collate_side([it["teacher"] for it in items], self.teacher_pad)
        else:
            batch["teacher"] = batch["student"]
        if items[0].get("align"):
            batch["align"] = {key: pad_lists([it["align"][key] for it in items]) for key in items[0]["align"]}
        return batch


def pad_lists(rows: Sequence[List[int]], value: int = -1) -> torch.Tensor:
    """Right-pad integer lists into a ``[B, L]`` long tensor."""
    length = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class GlobalBatchPlan(torch.utils.data.Sampler):
    """Deterministic order of micro-batches for one rank.

    Each epoch shuffles all indices with ``seed + epoch`` and cuts them into global batches of
    ``micro_batch_size x grad_accum x world_size`` examples (an incomplete last one is dropped).
    Global batch ``g`` gives rank ``r`` its micro-batches ``j = 0..grad_accum-1`` from slots
    ``(j * world_size + r)``. The set of examples in a global batch does not depend on how it
    is split over ranks and accumulation steps, so gradients match across layouts, and the
    order is a pure function of the step, so resuming at step ``s`` replays exactly.
    """

    def __init__(self, num_examples: int, micro_batch_size: int, grad_accum: int, world_size: int = 1,
                 rank: int = 0, seed: int = 0, shuffle: bool = True, start_step: int = 0, max_steps: Optional[int] = None):
        self.n, self.micro, self.accum, self.world, self.rank = num_examples, micro_batch_size, grad_accum, world_size, rank
        self.seed, self.shuffle, self.start_step, self.max_steps = seed, shuffle, start_step, max_steps
        self.global_size = micro_batch_size * grad_accum * world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_size

    def epoch_order(self, epoch: int) -> List[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def micro_batches(self, step: int) -> List[List[int]]:
        """The ``grad_accum`` micro-batches (example indices) of this rank at global ``step``."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        chunk = order[within * self.global_size:(within + 1) * self.global_size]
        out = []
        for j in range(self.accum):
            slot = j * self.world + self.rank
            out.append(chunk[slot * self.micro:(slot + 1) * self.micro])
        return out

    def __iter__(self) -> Iterator[List[int]]:
        step = self.start_step
        while self.max_steps is None or step < self.max_steps:
            yield from self.micro_batches(step)
            step += 1

    def __len__(self) -> int:
        if self.max_steps is None:
            return 0
        return max(self.max_steps - self.start_step, 0) * self.accum


def eval_batches(num_examples: int, batch_size: int, world_size: int = 1, rank: int = 0) -> List[List[int]]:
    """Contiguous evaluation batches, strided over ranks (every example evaluated once)."""
    batches = [list(range(i, min(i + batch_size, num_examples))) for i in range(0, num_examples, batch_size)]
    return batches[rank::world_size]


def steps_for(num_examples: int, global_batch: int, epochs: float) -> int:
    return int(math.floor(num_examples / global_batch * epochs))


def plan_steps(num_examples: int, global_batch: int, max_steps: Optional[int], epochs: float) -> int:
    """The optimizer steps of a run: ``max_steps``, else ``floor(examples / global batch × epochs)``.
    Fewer training examples than one global batch, or an ``epochs`` that makes no step, is a
    :class:`DataError` (checked by ``--validate`` too, before any weight is loaded)."""
    from .errors import DataError

    if num_examples < global_batch:
        raise DataError(f"the train split has {num_examples} examples, fewer than one global batch of {global_batch} "
                        "(micro_batch_size x grad_accum x processes); lower train.micro_batch_size or grad_accum")
    total = max_steps or steps_for(num_examples, global_batch, epochs)
    if total < 1:
        raise DataError(f"train.epochs={epochs} of {num_examples} examples in global batches of {global_batch} "
                        "makes no optimizer step; raise train.epochs or set train.max_steps")
    return total


class RunData:
    """The encoded train and eval sets of a run and the order in which this rank sees them.

    ``train_set``/``eval_set`` are :class:`PairDataset` s (teacher side encoded only when the
    tokenizers differ; the aligner's ``pair_features`` run in the data-loader workers);
    ``global_batch = micro_batch_size × grad_accum × world_size``.
    """

    def __init__(self, task, parts, train_cfg, eval_cfg, uses_teacher: bool, dist, seed: int):
        self.seed = seed
        teacher_tok = None if parts.shared_tokenizer else parts.teacher_tokenizer
        features = parts.aligner.pair_features if uses_teacher else None

        def encoded(examples) -> PairDataset:
            return PairDataset(examples, parts.student_tokenizer, teacher_tok, task.max_length,
                               task.max_prompt_length, features)

        targets = getattr(parts, "targets", None)  # a targets plugin may add prompt-only inputs
        train = task.examples("train")
        self.train_set = encoded(targets.train_examples(train) if targets is not None else train)
        eval_examples = task.examples(eval_cfg.split)
        self.eval_set = encoded(eval_examples[: eval_cfg.max_examples] if eval_cfg.max_examples else eval_examples)
        self.collate = Collator(pad_id(parts.student_tokenizer), pad_id(teacher_tok) if teacher_tok else None)
        self.train_cfg, self.eval_batch_size, self.dist = train_cfg, eval_cfg.batch_size, dist
        self.global_batch = train_cfg.micro_batch_size * train_cfg.grad_accum * dist.world_size

    def total_steps(self, max_steps: Optional[int], epochs: float) -> int:
        """``max_steps``, else ``floor(train examples / global batch × epochs)`` (:func:`plan_steps`)."""
        return plan_steps(len(self.train_set), self.global_batch, max_steps, epochs)

    def plan(self, start_step: int = 0, max_steps: Optional[int] = None) -> GlobalBatchPlan:
        t = self.train_cfg
        return GlobalBatchPlan(len(self.train_set), t.micro_batch_size, t.grad_accum, self.dist.world_size,
                               self.dist.rank, seed=self.seed, start_step=start_step, max_steps=max_steps)

    def steps(self, start_step: int, max_steps: int) -> Iterator[List[Dict]]:
        """This rank's collated micro-batches, one list of ``grad_accum`` per optimizer step."""
        loader = torch.utils.data.DataLoader(self.train_set, batch_sampler=self.plan(start_step, max_steps),
                                             collate_fn=self.collate, num_workers=self.train_cfg.num_workers,
                                             persistent_workers=False)
        micro: List[Dict] = []
        for batch in loader:
            micro.append(batch)
            if len(micro) == self.train_cfg.grad_accum:
                yield micro
                micro = []

    def collate_examples(self, examples: Sequence[Example]) -> Dict:
        """One micro-batch of ``examples`` encoded and collated exactly as the train set's."""
        encoded = self.train_set.with_examples(examples)
        return self.collate([encoded[i] for i in range(len(encoded))])

    def micro_batches(self, step: int) -> List[Dict]:
        """This rank's collated micro-batches of global ``step`` (what :meth:`steps` yields)."""
        return [self.collate([self.train_set[i] for i in idx]) for idx in self.plan().micro_batches(step)]

    def eval_batches(self) -> Iterator[Dict]:
        """This rank's collated evaluation batches (every example on exactly one rank)."""
        for idx in eval_batches(len(self.eval_set), self.eval_batch_size, self.dist.world_size, self.dist.rank):
            yield self.collate([self.eval_set[i] for i in idx])

    def eval_padding(self) -> List[Dict]:
        """Batches this rank runs and discards so that every rank runs as many evaluation forwards
        as the rank with the most batches (a sharded forward is a collective: a rank that stopped
        early would leave the others waiting). The first eval batch stands in."""
        n = len(self.eval_set)
        most = len(eval_batches(n, self.eval_batch_size, self.dist.world_size, 0))
        mine = len(eval_batches(n, self.eval_batch_size, self.dist.world_size, self.dist.rank))
        first = eval_batches(n, self.eval_batch_size)[:1]
        return [self.collate([self.eval_set[i] for i in first[0]]) for _ in range(most - mine)] if first else []


def calibration_batches(task, tokenizer, n: Optional[int], batch_size: int, seed: int) -> Iterator[Dict]:
    """Student batches (:func:`collate_side`) of ``n`` train examples drawn with ``seed``
    (``None``: 1 % of the split, at least 16, at most all), ``batch_size`` per batch: the
    calibration data of tuners that select on activations (the same on every rank)."""
    examples = task.examples("train")
    if n is None:
        n = max(math.ceil(0.01 * len(examples)), 16)
    n = min(n, len(examples))
    picked = sorted(random.Random(seed).sample(range(len(examples)), n))
    pad = pad_id(tokenizer)
    for i in range(0, n, batch_size):
        encoded = [encode_example(tokenizer, examples[j], task.max_length, task.max_prompt_length)
                   for j in picked[i: i + batch_size]]
        yield collate_side(encoded, pad)


def response_tokens(batch) -> int:
    """Student response tokens of a collated batch: the normaliser of every loss term."""
    return int(batch["student"]["labels"].ne(IGNORE).sum())


def global_tokens(micro_batches, dist: DistInfo, device) -> Tuple[List[int], float, float]:
    """``(counts, n_global, n_all)`` of one global batch: this rank's student response tokens
    per micro-batch, and the response tokens ``N_global`` (the loss normaliser) and all
    attended student tokens (for throughput) summed over every micro-batch of every rank (one
    all-reduce). A global batch without response tokens is a :class:`DataError`."""
    counts = [response_tokens(mb) for mb in micro_batches]
    everything = float(sum(int(mb["student"]["attention_mask"].sum()) for mb in micro_batches))
    n_global, n_all = all_reduce_sum(torch.tensor([float(sum(counts)), everything]).to(device), dist).tolist()
    if n_global == 0:
        raise DataError("a global batch has no response tokens (every response was truncated away); "
                        "raise task.max_length or lower task.max_prompt_length")
    return counts, n_global, n_all
