"""Student tuners: which student parameters train (full fine-tuning, LoRA, ...)."""

from __future__ import annotations

from typing import ClassVar


class Tuner:
    """Base class of tuners. ``apply(model) -> model`` wraps or freezes the student before
    training; ``export(model) -> model`` returns the plain transformers model to save as
    ``final/`` (e.g. LoRA merged into the base weights)."""

    name: ClassVar[str]

    def apply(self, model):
        return model

    def export(self, model):
        return model

    def save_extra(self, model, directory) -> None:
        """Write tuner-specific files next to the final model (e.g. the LoRA adapter)."""
