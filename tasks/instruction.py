"""Task ``instruction``: instruction following in the Dolly / MiniLLM format.

Records and the prompt template are those of :mod:`kdcore.instruct_format` (the Alpaca
template of DSKD / MiniLLM). Local files are read directly so that a malformed line is reported
with its file and line number; ``dataset:`` loads a hub dataset through ``datasets`` when online.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Dict, List, Optional

from kdcore import Task, hookimpl
from kdcore.errors import ConfigError, DataError
from kdcore.schema import Range
from kdcore.instruct_format import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, format_prompt, read_jsonl, record_to_example
from kdcore.task import Example

# The record format lives in the engine (kd-eval reads it too); re-exported for plugin authors.
__all__ = ["InstructionTask", "PROMPT_NO_INPUT", "PROMPT_WITH_INPUT", "format_prompt", "read_jsonl", "record_to_example"]


class InstructionTask(Task):
    """Instruction following. Give ``data_dir`` (holding ``train.jsonl``, ``valid.jsonl``,
    ``test.jsonl``), explicit ``files`` per split, or a hub ``dataset`` name (online only)."""

    name = "instruction"

    def __init__(self, data_dir: Optional[str] = None, files: Optional[Dict[str, str]] = None,
                 dataset: Optional[str] = None, dataset_splits: Optional[Dict[str, str]] = None,
                 max_length: Annotated[int, Range(ge=2)] = 512, max_prompt_length: Annotated[int, Range(ge=1)] = 256,
                 max_examples: Optional[Annotated[int, Range(ge=1)]] = None):
        if sum(x is not None for x in (data_dir, files, dataset)) != 1:
            raise ConfigError("task 'instruction': give exactly one of data_dir, files or dataset")
        if max_prompt_length >= max_length:
            raise ConfigError(f"task 'instruction': max_prompt_length ({max_prompt_length}) must be smaller than "
                              f"max_length ({max_length})")
        self.data_dir, self.files, self.dataset = data_dir, files, dataset
        self.dataset_splits = dataset_splits or {}
        self.max_length, self.max_prompt_length, self.max_examples = max_length, max_prompt_length, max_examples
        self._cache: Dict[str, List[Example]] = {}

    def _path(self, split: str) -> Path:
        if self.files is not None:
            if split not in self.files:
                raise DataError(f"task 'instruction': no file for split '{split}' (files has {sorted(self.files)})")
            return Path(self.files[split])
        return Path(self.data_dir) / f"{split}.jsonl"

    def splits(self):
        if self.files is not None:
            return tuple(self.files)
        return ("train", "valid", "test")

    def check(self) -> None:
        if self.dataset is None:
            for split in self.splits():
                if split == "test" and self.files is None and not self._path(split).exists():
                    continue  # a test split is optional in a data_dir
                if not self._path(split).is_file():
                    raise DataError(f"data file not found: {self._path(split)}")

    def examples(self, split: str) -> List[Example]:
        if split not in self._cache:
            if self.dataset is not None:
                self._cache[split] = self._from_hub(split)
            else:
                self._cache[split] = read_jsonl(self._path(split), self.max_examples)
        return self._cache[split]

    def _from_hub(self, split: str) -> List[Example]:
        import datasets

        hub_split = self.dataset_splits.get(split, split)
        try:
            ds = datasets.load_dataset(self.dataset, split=hub_split)
        except Exception as exc:
            raise DataError(f"cannot load dataset '{self.dataset}' split '{hub_split}': {str(exc).splitlines()[0]}") from None
        out = []
        for i, record in enumerate(ds):
            out.append(record_to_example(dict(record), f"{self.dataset}[{hub_split}][{i}]"))
            if self.max_examples is not None and len(out) >= self.max_examples:
                break
        return out


@hookimpl
def kdcore_register_tasks(register):
    register(InstructionTask)
