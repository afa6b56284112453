"""Space projectors: turn hidden states and heads of both models into KD spaces."""

from __future__ import annotations

from typing import ClassVar, List, Optional

from torch import nn

from .kdspace import ModelSide, Space


class Projector(nn.Module):
    """Base class of projectors.

    ``spaces(student, teacher, alignment, criterion) -> list[Space]``: each :class:`Space` pairs
    student-side rows and teacher-side rows with the heads that turn them into logits; the
    engine evaluates the criterion on them chunk by chunk. Parameters train at
    ``train.projector_lr``.
    """

    name: ClassVar[str]
    # reads the teacher's hidden states, head or embeddings (not only its logits): a teacher cache
    # must hold them (kd-cache stores them when the config's projector or aligner sets this)
    uses_teacher_states: ClassVar[bool] = False

    def spaces(self, student: ModelSide, teacher: ModelSide, alignment, criterion) -> List[Space]:
        raise NotImplementedError

    def prepare(self, student_model, teacher_model) -> None:
        """Called once with the loaded models before training (not by ``--validate``); e.g. to
        initialise projection weights from the two heads."""

    def check_compatible(self, *, shared_tokenizer: bool, aligner, criterion) -> Optional[str]:
        """Return an error message when this projector cannot serve the combination, else ``None``."""
        return None
