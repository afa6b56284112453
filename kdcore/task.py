"""Tasks: where examples come from and how a prompt is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Sequence


@dataclass
class Example:
    """One prompt with its training response and its references (for ROUGE-L scoring).

    ``prompt`` is fully formatted (template applied); ``response`` is the training target;
    ``references`` lists every acceptable answer (``[response]`` for single-reference sets).
    """

    prompt: str
    response: str
    references: List[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.references:
            self.references = [self.response]


class Task:
    """Base class of tasks.

    A task exposes ``examples(split) -> list[Example]`` for the splits it has (``train``,
    ``valid``, ``test``) and the sequence limits the collator applies (``max_length`` tokens
    in all, of which at most ``max_prompt_length`` prompt tokens).
    """

    name: ClassVar[str]
    max_length: int = 512
    max_prompt_length: int = 256

    def splits(self) -> Sequence[str]:
        return ("train", "valid", "test")

    def examples(self, split: str) -> List[Example]:
        raise NotImplementedError

    def num_examples(self, split: str) -> int:
        """How many examples ``split`` has, for ``--validate``: reads the data (so a malformed
        file is reported) but may skip expensive work (generated responses, say)."""
        return len(self.examples(split))

    def check(self) -> None:
        """Validate without loading data that is expensive (files exist, formats parse)."""
