"""Tuner ``lora``: low-rank adapters through peft (the DSKD TinyLLaMA recipe uses r=256,
alpha=8, dropout=0.1 on peft's default target modules, i.e. q_proj and v_proj for Llama).

Only the adapter weights train; ``final/`` holds the adapter merged into the base weights (a
plain transformers model) and ``final/adapter/`` the adapter alone.
"""

from __future__ import annotations

from typing import List, Optional

from kdcore import hookimpl
from kdcore.errors import ConfigError
from kdcore.tuner import Tuner


class LoRA(Tuner):
    name = "lora"

    def __init__(self, r: int = 16, alpha: int = 64, dropout: float = 0.1, target_modules: Optional[List[str]] = None,
                 bias: str = "none"):
        if r < 1:
            raise ConfigError("student.tuner.r: must be >= 1")
        self.r, self.alpha, self.dropout, self.target_modules, self.bias = r, alpha, dropout, target_modules, bias

    def apply(self, model):
        from peft import LoraConfig, TaskType, get_peft_model

        cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                         target_modules=self.target_modules, bias=self.bias)
        try:
            wrapped = get_peft_model(model, cfg)
        except ValueError as exc:  # e.g. target modules that the architecture does not have
            raise ConfigError(f"student.tuner 'lora': {exc}") from None
        if getattr(model, "is_activation_checkpointing", getattr(model, "is_gradient_checkpointing", False)):
            wrapped.enable_input_require_grads()  # checkpointing needs an input that requires grad
        return wrapped

    def export(self, model):
        return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model

    def save_extra(self, model, directory) -> None:
        if hasattr(model, "peft_config"):
            model.save_pretrained(str(directory / "adapter"))

    def save_student(self, model, directory, final: bool) -> None:
        """``final/``: the merged model plus ``adapter/``; ``best/`` during training: the adapter
        only (merging would change the model being trained)."""
        self.save_extra(model, directory)
        if final or not hasattr(model, "peft_config"):
            (self.export(model) if final else model).save_pretrained(directory)


@hookimpl
def kdcore_register_tuners(register):
    register(LoRA)
