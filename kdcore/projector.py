"""Space projectors: turn hidden states and heads of both models into KD spaces."""

from __future__ import annotations

from typing import ClassVar, List, Optional

from torch import nn

from .kdspace import ModelSide, Space


class Projector(nn.Module):
    """Base class of projectors.

    ``spaces(student, teacher, alignment, criterion) -> list[Space]``: each :class:`Space` pairs
    student-side rows and teacher-side rows with the heads that turn them into logits; the
    engine evaluates the criterion on them chunk by chunk. ``same_vocab``: the projector needs
    equal vocabularies (``none`` does; ``dual`` does not).
    """

    name: ClassVar[str]
    same_vocab: ClassVar[bool] = False

    def spaces(self, student: ModelSide, teacher: ModelSide, alignment, criterion) -> List[Space]:
        raise NotImplementedError

    def check_compatible(self, student_vocab_size: int, teacher_vocab_size: int, same_tokenizer: bool) -> Optional[str]:
        """Return an error message when this projector cannot serve the pair, else ``None``."""
        return None
