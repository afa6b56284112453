"""Student tuners: which student parameters train (full fine-tuning, LoRA, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar


class Tuner:
    """Base class of tuners. ``apply(model) -> model`` wraps or freezes the student before
    training; ``export(model) -> model`` returns the plain transformers model to save as
    ``final/`` (e.g. LoRA merged into the base weights).

    A tuner whose ``uses_calibration`` is true (class or instance attribute) is applied as
    ``apply(model, calibration=fn)``: ``fn(n)`` yields collated student batches
    (``input_ids``, ``attention_mask``, ``labels``, CPU tensors of ``[B, L]``) of ``n`` train
    examples (``None``: 1 % of the train split, at least 16), for selections that look at
    activations (S2FT). Other tuners are called as ``apply(model)``."""

    name: ClassVar[str]
    uses_calibration: ClassVar[bool] = False

    def apply(self, model, calibration=None):
        return model

    def export(self, model):
        return model

    def save_extra(self, model, directory) -> None:
        """Write tuner-specific files next to the final model (e.g. the LoRA adapter)."""

    def save_student(self, model, directory: Path, final: bool) -> None:
        """Write the student into ``directory``: ``final`` saves the exported plain model
        (``final/``); otherwise (``best/`` during training) the model as it trains. Tuners whose
        export would change the model being trained (merging LoRA) override this."""
        self.save_extra(model, directory)
        (self.export(model) if final else model).save_pretrained(directory)
