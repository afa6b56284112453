"""Batched response generation for any HF causal LM, with the DSKD evaluation protocol.

Defaults (docs/methods.md#generation): sampling with ``top_k=0, top_p=1.0, temperature=1.0``,
``no_repeat_ngram_size=6``, no repetition penalty, ``max_new_tokens=256``, prompts cut to their
first ``max_prompt_length=256`` tokens and left-padded, no BOS (prompts are encoded with
``add_special_tokens=False`` exactly as in training), eos as both the stop and the pad token of
``generate``. Greedy decoding and any other setting are selectable through
:class:`GenerationSettings`.

Seeding: :func:`generate` calls ``torch.manual_seed(seed)`` once before the whole set, so one
seed reproduces the same outputs for the same prompts, model, batch size and device. Prompts are
batched longest first (less padding); outputs come back in the input order.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from .data import pad_id
from . import data
from .rouge import postprocess


@dataclass
class GenerationSettings:
    """How responses are generated; the defaults are DSKD's final-evaluation protocol."""

    do_sample: bool = True
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    max_new_tokens: int = 256
    no_repeat_ngram_size: int = 6
    max_prompt_length: int = 256
    batch_size: int = 8

    def __post_init__(self):
        for name in ("max_new_tokens", "max_prompt_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"GenerationSettings.{name} must be at least 1, got {getattr(self, name)}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"GenerationSettings.temperature must be positive when sampling, got {self.temperature}")

    @classmethod
    def greedy(cls, **overrides) -> "GenerationSettings":
        return cls(do_sample=False, **overrides)

    @classmethod
    def dev(cls, max_length: int = 512, max_prompt_length: int = 256, **overrides) -> "GenerationSettings":
        """DSKD's in-training dev evaluation: the same sampler without the n-gram block, responses
        limited to the training length."""
        values = dict(no_repeat_ngram_size=0, max_prompt_length=max_prompt_length,
                      max_new_tokens=max(max_length - max_prompt_length, 1))
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes) -> "GenerationSettings":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def encode_prompt(tokenizer, prompt: str, max_prompt_length: int) -> List[int]:
    """Prompt ids as in training (kdcore.data.encode_example): no special tokens, the first
    ``max_prompt_length`` tokens kept."""
    ids = data.encode_prompt(tokenizer, prompt, max_prompt_length)
    return ids or [tokenizer.eos_token_id]  # an empty prompt still needs one position to attend to


def left_pad(rows: Sequence[List[int]], pad: int):
    """``input_ids`` and ``attention_mask`` [B, L] with every row right-aligned."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, length - len(r):] = 1
    return ids, mask


def hf_generation_config(settings: GenerationSettings, eos_id: int, num_beams: int = 1, num_return_sequences: int = 1):
    """The ``transformers.GenerationConfig`` of ``settings`` (eos is the stop and the pad id).
    ``num_beams > 1`` is beam search (deterministic; ``settings.do_sample`` must be False), returning
    the ``num_return_sequences`` best beams; with sampling, that many independent samples."""
    from transformers import GenerationConfig

    if num_beams > 1 and settings.do_sample:
        raise ValueError("beam search (num_beams > 1) does not sample; use GenerationSettings.greedy(...)")
    common = dict(max_new_tokens=settings.max_new_tokens, no_repeat_ngram_size=settings.no_repeat_ngram_size,
                  repetition_penalty=1.0, eos_token_id=eos_id, pad_token_id=eos_id, use_cache=True, num_beams=num_beams,
                  num_return_sequences=num_return_sequences)
    if num_beams > 1:
        return GenerationConfig(do_sample=False, early_stopping=True, **common)
    if settings.do_sample:
        return GenerationConfig(do_sample=True, top_k=settings.top_k, top_p=settings.top_p,
                                temperature=settings.temperature, **common)
    return GenerationConfig(do_sample=False, **common)


def unwrap(model):
    """The bare model inside a DDP/FSDP-style wrapper."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    return model


@contextlib.contextmanager
def _protocol_mode(model) -> Iterator[None]:
    """Eval mode and a neutral ``model.generation_config`` while generating, restored afterwards.

    ``generate`` fills every setting we leave unset from the model's own generation config
    (e.g. a shipped ``repetition_penalty`` or ``min_p``); a blank one keeps the protocol exact.
    """
    from transformers import GenerationConfig

    was_training = model.training
    saved = getattr(model, "generation_config", None)
    model.eval()
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved
        model.train(was_training)


def _autocast(device: torch.device):
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def generate(model, tokenizer, prompts: Sequence[str], settings: Optional[GenerationSettings] = None,
             seed: int = 10, progress: bool = True, desc: str = "generate") -> List[str]:
    """Post-processed responses to ``prompts`` (new tokens only, special tokens skipped).

    Runs on the model's device, under bf16 autocast on CUDA. ``torch.manual_seed(seed)`` is
    called first, so a fixed seed reproduces the outputs.
    """
    outputs, _ = generate_sequences(model, tokenizer, prompts, settings, seed=seed, progress=progress, desc=desc)
    return [o[0] for o in outputs]


def new_token_count(tokens: Sequence[int], eos_id: int) -> int:
    """Tokens a model generated in one row of ``generate``'s new tokens: up to and including the
    first eos (eos is also the pad id, so what follows it is padding)."""
    try:
        return tokens.index(eos_id) + 1
    except ValueError:
        return len(tokens)


def generate_sequences(model, tokenizer, prompts: Sequence[str], settings: Optional[GenerationSettings] = None,
                       seed: int = 10, num_return_sequences: int = 1, num_beams: int = 1, progress: bool = True,
                       desc: str = "generate") -> Tuple[List[List[str]], int]:
    """``num_return_sequences`` post-processed responses per prompt (``[len(prompts)][K]``) and the
    number of tokens generated in all (:func:`new_token_count` summed, for tokens/s).

    Prompts are encoded as in training, left-padded and batched longest first; generation uses
    the KV cache and stops at eos. ``num_beams > 1`` is beam search (the K best beams) and needs
    ``settings.do_sample`` False. ``torch.manual_seed(seed)`` is called first.
    """
    from tqdm.auto import tqdm

    settings = settings or GenerationSettings()
    model = unwrap(model)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos token; generation cannot stop")
    device = next(model.parameters()).device
    k = num_return_sequences
    gen_config = hf_generation_config(settings, tokenizer.eos_token_id, num_beams, k)
    encoded = [encode_prompt(tokenizer, p, settings.max_prompt_length) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs: List[Optional[List[str]]] = [None] * len(encoded)
    pad, generated = pad_id(tokenizer), 0

    torch.manual_seed(seed)
    with _protocol_mode(model), torch.no_grad(), _autocast(device), \
            tqdm(total=len(encoded), desc=desc, unit="ex", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            ids, mask = left_pad([encoded[i] for i in batch], pad)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_config)
            new_tokens = out[:, ids.shape[1]:].tolist()  # [len(batch) * K, new], the K rows of a prompt adjacent
            for j, i in enumerate(batch):
                rows = new_tokens[j * k:(j + 1) * k]
                generated += sum(new_token_count(r, tokenizer.eos_token_id) for r in rows)
                outputs[i] = [postprocess(tokenizer.decode(r, skip_special_tokens=True)) for r in rows]
            bar.update(len(batch))
    return outputs, generated  # type: ignore[return-value]
