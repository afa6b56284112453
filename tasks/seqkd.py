"""Task ``seqkd``: sequence-level KD (Kim & Rush 2016; docs/methods.md#seqkd) — the training
responses of another task replaced by the teacher's own generations, for plain CE training
(``objective.kd_weight: 0``).

The teacher generates once, with the evaluation sampler (seed ``sample_seed``), and the responses are
cached as JSONL under ``cache_dir`` keyed by the teacher, the source data and the settings.
Generation runs in blocks of ``block_size`` prompts, block ``b`` seeded with ``sample_seed + b``, each
block appended as soon as it is done: an interrupted run resumes at the next block and
produces exactly what an uninterrupted one would. ``valid``/``test`` pass through unchanged.
Under torchrun, rank 0 generates while the other ranks wait.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Dict, List, Optional

from kdcore import Task, hookimpl
from kdcore.components import spec
from kdcore.errors import ConfigError, DataError
from kdcore.schema import INT64_MAX, Range, check_section
from kdcore.task import Example


class SeqKDTask(Task):
    name = "seqkd"

    def __init__(self, source: Dict[str, Any], teacher: Dict[str, Any], cache_dir: str = "runs/seqkd-cache",
                 sample_seed: Annotated[int, Range(ge=0, le=INT64_MAX)] = 1, max_new_tokens: Annotated[int, Range(ge=1)] = 256,
                 temperature: Annotated[float, Range(gt=0)] = 1.0, top_k: Annotated[int, Range(ge=0)] = 0,
                 top_p: Annotated[float, Range(gt=0, le=1)] = 1.0, no_repeat_ngram_size: Annotated[int, Range(ge=0)] = 6,
                 batch_size: Annotated[int, Range(ge=1)] = 8, block_size: Annotated[int, Range(ge=1)] = 64):
        from kdcore.models import ModelConfig

        self.source = spec("task", source, where="task.source").build()
        if isinstance(self.source, SeqKDTask):
            raise ConfigError("task.source: a seqkd task cannot wrap another seqkd task")
        self.teacher = check_section(ModelConfig, teacher, "task.teacher")
        self.cache_dir, self.seed, self.block_size = Path(cache_dir), sample_seed, block_size
        self.max_length, self.max_prompt_length = self.source.max_length, self.source.max_prompt_length
        self.generation = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                               max_new_tokens=max_new_tokens, no_repeat_ngram_size=no_repeat_ngram_size,
                               max_prompt_length=self.max_prompt_length, batch_size=batch_size)
        self._train: Optional[List[Example]] = None

    def splits(self):
        return self.source.splits()

    def check(self) -> None:
        self.source.check()
        from kdcore.errors import ModelUnavailable
        from kdcore.models import load_model_config

        try:
            load_model_config(self.teacher)
        except ModelUnavailable:  # a hub teacher that is not cached offline: nothing to inspect yet
            pass

    def cache_file(self, prompts: List[str]) -> Path:
        key = json.dumps({"teacher": vars(self.teacher), "generation": self.generation, "seed": self.seed,
                          "block": self.block_size, "prompts": prompts}, sort_keys=True, default=str)
        return self.cache_dir / f"seqkd-{hashlib.sha1(key.encode()).hexdigest()[:16]}.jsonl"

    def examples(self, split: str) -> List[Example]:
        if split != "train":
            return self.source.examples(split)
        if self._train is None:
            self._train = self._teacher_responses(self.source.examples("train"))
        return self._train

    def num_examples(self, split: str) -> int:
        """One teacher response per source example: counted without generating them."""
        return self.source.num_examples(split)

    def _teacher_responses(self, source: List[Example]) -> List[Example]:
        import torch.distributed as dist

        prompts = [e.prompt for e in source]
        path = self.cache_file(prompts)
        main = not dist.is_initialized() or dist.get_rank() == 0
        if main:
            self._generate(prompts, path)
        if dist.is_initialized():
            dist.barrier()
        responses = read_cache(path)
        if len(responses) != len(source):
            raise DataError(f"{path}: holds {len(responses)} responses for {len(source)} prompts; delete it to regenerate")
        return [Example(prompt=e.prompt, response=r, references=[r]) for e, r in zip(source, responses)]

    def _generate(self, prompts: List[str], path: Path) -> None:
        done = len(read_cache(path)) if path.is_file() else 0
        if done >= len(prompts):
            return
        if done % self.block_size:
            raise DataError(f"{path}: {done} lines is not a whole number of blocks of {self.block_size}; delete it")
        from kdcore.generate import GenerationSettings, default_device, generate
        from kdcore.models import freeze, load_model, load_tokenizer

        tokenizer = load_tokenizer(self.teacher)
        model = load_model(self.teacher).to(default_device())
        freeze(model)
        settings = GenerationSettings(**self.generation)
        path.parent.mkdir(parents=True, exist_ok=True)
        blocks = range(done // self.block_size, -(-len(prompts) // self.block_size))
        for b in blocks:
            chunk = prompts[b * self.block_size:(b + 1) * self.block_size]
            outputs = generate(model, tokenizer, chunk, settings, seed=self.seed + b,
                               desc=f"seqkd block {b + 1}/{blocks.stop}")
            with path.open("a", encoding="utf-8") as fh:  # one block per append: whole blocks survive a crash
                fh.write("".join(json.dumps({"prompt": p, "output": o}) + "\n" for p, o in zip(chunk, outputs)))
                fh.flush()


def read_cache(path: Path) -> List[str]:
    responses = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            try:
                responses.append(json.loads(line)["output"])
            except (json.JSONDecodeError, KeyError):
                raise DataError(f"{path}:{lineno}: truncated or malformed cache line; delete the file to regenerate") from None
    return responses


@hookimpl
def kdcore_register_tasks(register):
    register(SeqKDTask)
