"""How pseudo-targets (PTs) are decoded: the ``decoding:`` mapping of the targets plugins, and
generation that reports its own time and token count.

``decoding`` keys (any omitted key takes its default):

* ``strategy``: ``sample`` (default), ``greedy`` or ``beam``;
* sampling only: ``temperature`` (1.0), ``top_k`` (0 = off), ``top_p`` (0.95: the sampling
  preset of Calderon et al. 2023, §1.5 of the seed-methods spec);
* beam only: ``num_beams`` (default K, the number of PTs per prompt, as the paper's preset; at
  least K; 1 beam is greedy search);
* every strategy: ``max_new_tokens`` (default ``task.max_length − task.max_prompt_length``, the
  longest response the task trains on), ``no_repeat_ngram_size`` (0), ``batch_size`` (8 prompts).

K sequences per prompt: ``sample`` draws K independent samples, ``beam`` returns the K best
beams, ``greedy`` has one sequence (K must be 1). A sampling option under ``beam`` or
``greedy``, ``num_beams`` outside ``beam``, or an unknown key is one :class:`ConfigError`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import torch

from kdcore import hookimpl
from kdcore.errors import ConfigError
from kdcore.schema import Range, check_section

SAMPLING_KEYS = ("temperature", "top_k", "top_p")


@dataclass
class DecodingNode:
    """The ``decoding:`` mapping as written (``None`` = not given), validated key by key."""

    strategy: Literal["sample", "greedy", "beam"] = "sample"
    temperature: Optional[Annotated[float, Range(gt=0)]] = None
    top_k: Optional[Annotated[int, Range(ge=0)]] = None
    top_p: Optional[Annotated[float, Range(gt=0, le=1)]] = None
    num_beams: Optional[Annotated[int, Range(ge=1)]] = None
    max_new_tokens: Optional[Annotated[int, Range(ge=1)]] = None
    no_repeat_ngram_size: Annotated[int, Range(ge=0)] = 0
    batch_size: Annotated[int, Range(ge=1)] = 8


@dataclass(frozen=True)
class Decoding:
    """A resolved decoding: what :func:`generate_pts` runs and what a PT cache is keyed by."""

    strategy: str
    k: int
    temperature: float
    top_k: int
    top_p: float
    num_beams: int
    max_new_tokens: Optional[int]
    no_repeat_ngram_size: int
    batch_size: int

    def record(self) -> Dict[str, Any]:
        return asdict(self)

    def settings(self, task):
        """The :class:`kdcore.generate.GenerationSettings` for ``task``'s prompt and response limits."""
        from kdcore.generate import GenerationSettings

        new = self.max_new_tokens or max(task.max_length - task.max_prompt_length, 1)
        return GenerationSettings(do_sample=self.strategy == "sample", top_k=self.top_k, top_p=self.top_p,
                                  temperature=self.temperature, max_new_tokens=new,
                                  no_repeat_ngram_size=self.no_repeat_ngram_size,
                                  max_prompt_length=task.max_prompt_length, batch_size=self.batch_size)


def parse_decoding(node: Optional[Mapping[str, Any]], k: int, where: str) -> Decoding:
    """Validate a ``decoding:`` mapping for ``k`` PTs per prompt (see the module docstring)."""
    if node is not None and not isinstance(node, Mapping):
        raise ConfigError(f"{where}: expected a mapping of decoding options, got {type(node).__name__}")
    raw = DecodingNode() if node is None else check_section(DecodingNode, dict(node), where)
    given = [key for key in SAMPLING_KEYS if getattr(raw, key) is not None]
    if raw.strategy != "sample" and given:
        raise ConfigError(f"{where}: {', '.join(given)} {'is a sampling option' if len(given) == 1 else 'are sampling options'}; "
                          f"strategy '{raw.strategy}' does not sample (use strategy: sample, or remove {', '.join(given)})")
    if raw.strategy != "beam" and raw.num_beams is not None:
        raise ConfigError(f"{where}: num_beams needs strategy: beam (strategy is '{raw.strategy}')")
    if raw.strategy == "greedy" and k > 1:
        raise ConfigError(f"{where}: greedy decoding gives one sequence per prompt, but {k} pseudo-targets per prompt "
                          "are asked for; use strategy: sample or beam, or num_targets: 1")
    beams = raw.num_beams if raw.num_beams is not None else (k if raw.strategy == "beam" else 1)
    if raw.strategy == "beam" and beams < k:
        raise ConfigError(f"{where}: num_beams ({beams}) must be at least num_targets ({k}): "
                          "beam search returns its best num_targets beams")
    return Decoding(strategy=raw.strategy, k=k, temperature=1.0 if raw.temperature is None else raw.temperature,
                    top_k=0 if raw.top_k is None else raw.top_k, top_p=0.95 if raw.top_p is None else raw.top_p,
                    num_beams=beams, max_new_tokens=raw.max_new_tokens, no_repeat_ngram_size=raw.no_repeat_ngram_size,
                    batch_size=raw.batch_size)


def _sync(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def generate_pts(model, tokenizer, prompts: Sequence[str], decoding: Decoding, task, seed: int,
                 desc: str = "pseudo-targets", progress: bool = True) -> Tuple[List[List[str]], int, float]:
    """``decoding.k`` responses per prompt from ``model`` (``[len(prompts)][K]``), the number of
    generated tokens and the wall seconds it took. Batched, KV-cached, left-padded, stopped at eos
    (:func:`kdcore.generate.generate_sequences`); ``torch.manual_seed(seed)`` first."""
    from kdcore.generate import generate_sequences, unwrap

    device = next(unwrap(model).parameters()).device
    _sync(device)
    start = time.perf_counter()
    outputs, tokens = generate_sequences(model, tokenizer, prompts, decoding.settings(task), seed=seed,
                                         num_return_sequences=decoding.k, num_beams=decoding.num_beams,
                                         progress=progress, desc=desc)
    _sync(device)
    return outputs, tokens, time.perf_counter() - start


class GenerationStats:
    """Generated tokens and seconds: per step (``gen/tokens``, ``gen/seconds``, reset when
    reported) and over the run (``gen/tokens_total``, ``gen/seconds_total``, ``gen/tokens_per_s``)."""

    def __init__(self):
        self.step_tokens = self.step_seconds = 0.0
        self.tokens = self.seconds = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.step_tokens += tokens
        self.step_seconds += seconds
        self.tokens += tokens
        self.seconds += seconds

    def take_step(self) -> Dict[str, float]:
        out = {"gen/tokens": float(self.step_tokens), "gen/seconds": float(self.step_seconds)}
        self.step_tokens = self.step_seconds = 0.0
        return out

    def summary(self) -> Dict[str, float]:
        return {"gen/tokens_total": float(self.tokens), "gen/seconds_total": float(self.seconds),
                "gen/tokens_per_s": float(self.tokens / self.seconds) if self.seconds > 0 else 0.0}

    def line(self, what: str) -> str:
        s = self.summary()
        return (f"generation ({what}): {s['gen/tokens_total']:,.0f} tokens in {s['gen/seconds_total']:.1f} s "
                f"({s['gen/tokens_per_s']:,.0f} generated tokens/s)")


class ReportsGeneration:
    """Mixin of the PT plugins: ``self.stats`` (:class:`GenerationStats`) and ``self.last`` (the
    step's own metrics) reach the ``train`` record after every step; the run totals reach the
    ``summary`` record, and the generated tokens/s line is printed at the end of the run."""

    stats: GenerationStats
    last: Dict[str, float]

    @hookimpl
    def kdcore_after_step(self, run, step, metrics):
        return {**self.stats.take_step(), **self.last}

    @hookimpl
    def kdcore_run_end(self, run, metrics):
        if run.is_main:
            print(self.stats.line(f"targets {self.name}"), flush=True)
        return self.stats.summary()
