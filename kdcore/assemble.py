"""Config -> live components: tokenizers, models, and plugins built with engine context.

``--validate`` runs the same path with ``load_weights=False``: tokenizers and model configs
are read (no weights), every component is built, and every compatibility rule is checked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .config import Config
from .errors import ConfigError, ModelError, ModelUnavailable
from .kinds import kinds
from .models import freeze, load_model, load_model_config, load_tokenizer, same_tokenizer
from .registry import get_registry
from .teacher_cache import cached_model_config, open_checked

log = logging.getLogger(__name__)


@dataclass
class Components:
    """What a run is made of: the built component of every kind (``by_kind``; the kinds the
    engine itself drives are also attributes), tokenizers and models."""

    by_kind: Dict[str, Any]
    student_tokenizer: Any
    teacher_tokenizer: Any = None
    student_model: Any = None
    teacher_model: Any = None
    shared_tokenizer: bool = True
    teacher_cache: Any = None  # a kdcore.teacher_cache.TeacherCache when teacher.cache is set

    def __getattr__(self, name: str):
        by_kind = self.__dict__.get("by_kind") or {}
        if name in by_kind:
            return by_kind[name]
        raise AttributeError(f"Components has no attribute or kind {name!r}")

    def instances(self) -> List[Any]:
        """Every built component (lists of ``many`` kinds flattened): the run's hook plugins."""
        out = []
        for value in self.by_kind.values():
            out.extend(value if isinstance(value, list) else [value] if value is not None else [])
        return out


def side_context(prefix: str, tokenizer, model=None, hf_config=None) -> Dict[str, Any]:
    """Engine context for one model (``student_*`` or ``teacher_*``), from the loaded model or,
    without weights, from its HF config."""
    if model is not None:
        head = model.get_output_embeddings().weight
        hidden, vocab, hf_config = head.shape[1], head.shape[0], model.config
    else:
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0))
        vocab = int(getattr(text, "vocab_size", 0))
    return {f"{prefix}_tokenizer": tokenizer, f"{prefix}_hidden_size": hidden, f"{prefix}_vocab_size": vocab,
            f"{prefix}_model_config": hf_config}


# Built before any model is loaded: the task (its data is checked first) and the tuner (applied
# to the student as soon as it is loaded, before anything else draws random numbers).
BEFORE_MODELS = ("task", "tuner")


def build_kinds(specs: Mapping[str, Any], context: Dict[str, Any], only: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Build the component(s) of every kind in table order (:mod:`kdcore.kinds`), or of the
    kinds in ``only``; kinds already in ``context`` are reused. Each built component joins
    ``context`` under its kind's name, so later kinds may ask for it (a projector's
    ``criterion``)."""
    built: Dict[str, Any] = {}
    for kind in kinds():
        if only is not None and kind.name not in only:
            continue
        if kind.name in context:
            built[kind.name] = context[kind.name]
            continue
        node = specs.get(kind.name)
        if isinstance(node, list):
            built[kind.name] = [s.build(**context) for s in node]
        else:
            built[kind.name] = node.build(**context) if node is not None else None
        context[kind.name] = built[kind.name]
    return built


def build_plugins(cfg_criterion, cfg_projector, cfg_aligner, context: Dict[str, Any]):
    """(criterion, projector, aligner) built with engine context, as :func:`build_kinds` does."""
    built = build_kinds({"criterion": cfg_criterion, "projector": cfg_projector, "aligner": cfg_aligner},
                        dict(context))
    return built["criterion"], built["projector"], built["aligner"]


def build_components(cfg: Config, load_weights: bool = True) -> Components:
    """Everything the trainer needs. Raises :class:`KdcoreError` subclasses on bad input."""
    context: Dict[str, Any] = {"seed": cfg.run.seed}
    build_kinds(cfg.components, context, only=("task",))["task"].check()
    build_kinds(cfg.components, context, only=BEFORE_MODELS)
    student_tok = load_tokenizer(cfg.student, build_cache=load_weights)
    student_model = apply_tuner(context["tuner"], load_model(cfg.student), context["task"], student_tok,
                                cfg) if load_weights else None
    context.update(side_context("student", student_tok, student_model,
                                None if load_weights else load_model_config(cfg.student)))
    teacher_tok = teacher_model = None
    shared = True
    if cfg.uses_teacher:
        teacher_tok = load_tokenizer(cfg.teacher, build_cache=load_weights)
        shared = same_tokenizer(student_tok, teacher_tok)
        cached = cfg.teacher.cache is not None  # kdcore.teacher_cache: no teacher weights
        if load_weights and not cached:
            teacher_model = load_model(cfg.teacher)
            freeze(teacher_model)
        hf_config = None if teacher_model is not None else (
            cached_model_config(cfg.teacher) if cached else load_model_config(cfg.teacher))
        context.update(side_context("teacher", teacher_tok, teacher_model, hf_config))
    built = build_kinds(cfg.components, context)
    cache = None
    if cfg.uses_teacher and cfg.objective.kd_weight > 0:  # a teacher loaded only to generate (SeqKD) is not aligned
        check_pair(built["criterion"], built["projector"], built["aligner"], student_tok, teacher_tok, shared,
                   context["student_vocab_size"], context["teacher_vocab_size"])
        cache = open_checked(cfg, built, teacher_tok) if cfg.teacher.cache is not None else None
    return Components(built, student_tok, teacher_tok, student_model, teacher_model, shared, cache)


def apply_tuner(tuner, model, task, tokenizer, cfg: Config):
    """``tuner.apply(model)``; tuners that select on activations also get ``calibration``
    (:meth:`kdcore.tuner.Tuner.apply`): batches of a seeded sample of the train split."""
    if not getattr(tuner, "uses_calibration", False):
        return tuner.apply(model)
    from .data import calibration_batches

    def calibration(n=None):
        return calibration_batches(task, tokenizer, n, cfg.train.micro_batch_size, cfg.run.seed)

    return tuner.apply(model, calibration=calibration)


def check_pair(criterion, projector, aligner, student_tok, teacher_tok, shared: bool,
               v_s: int, v_t: int) -> None:
    """Refuse incompatible choices with a message that names what to use instead."""
    problem = aligner.check_compatible(student_tok, teacher_tok)
    if problem:
        raise ConfigError(f"aligner: {problem}")
    allowed = aligner.projectors
    if allowed is not None and projector.name not in allowed:
        raise ConfigError(f"projector: aligner '{aligner.name}' works with projector "
                          f"{' or '.join(repr(p) for p in sorted(allowed))}, not '{projector.name}'")
    problem = projector.check_compatible(shared_tokenizer=shared, aligner=aligner, criterion=criterion)
    if problem:
        raise ConfigError(f"projector: {problem}")
    if shared and v_s != v_t:
        covered = len(student_tok)
        if covered > min(v_s, v_t):
            raise ModelError(f"student head has {v_s} columns and teacher head {v_t}, but the shared tokenizer has "
                             f"{covered} tokens; the models disagree beyond vocabulary padding")


def validate_models(cfg: Config) -> List[str]:
    """``--validate``: build everything except weights. Returns human-readable notes.

    A model that is neither local nor in the HF cache while offline cannot be inspected; its
    checks are reported as skipped instead of failing, so shipped configs naming hub models
    validate on an offline machine.
    """
    from .checkpoint import check_output_dir

    notes: List[str] = []
    check_output_dir(cfg.run.output_dir, create=False)
    try:
        parts = build_components(cfg, load_weights=False)
    except ModelUnavailable as exc:
        notes.append(f"skipped model checks: {exc}")
        task = cfg.task.build()
        task.check()
        return notes + check_run_data(task, cfg)
    notes += check_run_data(parts.task, cfg)
    notes.append(f"student tokenizer: {type(parts.student_tokenizer).__name__} ({len(parts.student_tokenizer)} tokens)")
    if parts.teacher_tokenizer is not None:
        notes.append(f"teacher tokenizer: {type(parts.teacher_tokenizer).__name__} ({len(parts.teacher_tokenizer)} tokens); "
                     f"{'same' if parts.shared_tokenizer else 'different'} tokenizer")
    return notes


def check_run_data(task, cfg: Config) -> List[str]:
    """``--validate``'s data checks: every split the run reads parses (file:line errors), and the
    train split holds at least one global batch (``micro_batch_size × grad_accum × WORLD_SIZE``,
    the processes torchrun would start; 1 without it) and makes at least one step."""
    import os

    from .data import plan_steps

    t, e = cfg.train, cfg.eval
    world = max(int(os.environ.get("WORLD_SIZE", "1") or 1), 1)
    n_train = task.num_examples("train")
    global_batch = t.micro_batch_size * t.grad_accum * world
    steps = plan_steps(n_train, global_batch, t.max_steps, t.epochs)
    n_eval = task.num_examples(e.split)
    if e.max_examples:
        n_eval = min(n_eval, e.max_examples)
    notes = [f"data: {n_train} train examples, global batch {global_batch}, {steps} steps; {n_eval} {e.split} examples"]
    if e.test_split:
        notes.append(f"data: {task.num_examples(e.test_split)} {e.test_split} examples (test ROUGE-L)")
    return notes


def write_run_files(cfg: Config, out) -> None:
    """``config.yaml`` (the resolved config) and ``plugins.json`` (:func:`plugin_manifest`)."""
    import json
    from pathlib import Path

    from .config import dump

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump(cfg.resolved))
    (out / "plugins.json").write_text(json.dumps(plugin_manifest(cfg), indent=2))


def plugin_manifest(cfg: Config) -> Dict[str, Any]:
    """Which plugins were available and which this run used, with their providers."""
    reg = get_registry()
    used = {}
    for kind, value in cfg.components.items():
        specs = value if isinstance(value, list) else [value] if value is not None else []
        rows = [{"name": s.name, "provider": s.entry.provider, "version": s.entry.version, "module": s.entry.module}
                for s in specs]
        if rows:
            used[kind] = rows if isinstance(value, list) else rows[0]
    return {"used": used, "available": reg.manifest()}
