"""The experiment config: YAML -> validated sections and component specs.

One file per experiment (DESIGN.md "Config"). Every section is validated against a dataclass
and every component against its constructor; errors name the key and suggest close matches.
Dotted ``key.sub=value`` overrides (values parsed as YAML) go through :func:`apply_overrides`,
shared by ``kd-train`` and ``tools/grid.py``.
"""

from __future__ import annotations

import copy
import re
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

import yaml

from .components import ComponentSpec, spec
from .errors import ConfigError, suggest
from .models import ModelConfig
from .registry import load_plugins
from .schema import check_section

SCHEMA_VERSION = 1


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 insists on ``1.0e-3``)."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml(text: str):
    return yaml.load(text, Loader=YamlLoader)


@dataclass
class RunConfig:
    """``run:`` where outputs go and the base seed (each rank uses ``seed + rank``)."""

    output_dir: str = "runs/default"
    seed: int = 10


@dataclass
class ObjectiveConfig:
    """``objective:`` ``loss = (1 - kd_weight)·CE + kd_weight·(Σ KD terms + auxiliary terms)``.

    kd_weight = 0 is plain SFT (no teacher forward). chunk_size: rows of ``[chunk, V]`` logits
    the KD loss materialises at once (null: a budget of 2**26 logits, e.g. 441 rows at
    V = 151,936, 1,335 at V = 50,257).
    """

    kd_weight: float = 0.5
    chunk_size: Optional[int] = None


@dataclass
class TrainConfig:
    """``train:`` optimisation, schedule and cadence. Steps are optimizer steps; ``max_steps``
    (if set) wins over ``epochs``. ``eval_every: 0`` evaluates once per epoch; ``save_every: 0``
    saves at every evaluation; both also happen at the last step."""

    epochs: float = 1.0
    max_steps: Optional[int] = None
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 5e-4
    projector_lr: float = 1e-3
    weight_decay: float = 0.01
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr: float = 1e-7
    clip_grad: float = 1.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    log_every: int = 1
    eval_every: int = 0
    eval_at_start: bool = True
    save_every: int = 0
    keep_last: int = 2
    resume: bool = False
    num_workers: int = 0
    threads: Optional[int] = None


@dataclass
class EvalConfig:
    """``eval:`` periodic evaluation on the task's ``split``: the loss terms, and with
    ``generate: true`` the dev ROUGE-L of sampled responses (DSKD: sampling at T=1, top-k 0,
    top-p 1, no n-gram block, averaged over ``seeds``; ``greedy`` decodes greedily instead).
    ``select_by`` picks the best checkpoint. ``test_split``: also report the ROUGE-L of the
    student before and after training, and of the teacher, on that split (``test_rouge.json``)."""

    split: str = "valid"
    batch_size: int = 8
    max_examples: Optional[int] = None
    generate: bool = False
    seeds: List[int] = field(default_factory=lambda: [10, 20, 30])
    max_new_tokens: Optional[int] = None
    generate_batch_size: int = 16
    greedy: bool = False
    select_by: Literal["ce", "rouge_l"] = "ce"
    test_split: Optional[str] = None


SECTIONS = {"run": RunConfig, "objective": ObjectiveConfig, "train": TrainConfig, "eval": EvalConfig}
MODEL_SECTIONS = ("teacher", "student")
COMPONENTS = {"task": "task", "criterion": "criterion", "projector": "projector", "aligner": "aligner"}
COMPONENT_DEFAULTS = {"criterion": "fkl", "projector": "none", "aligner": "identity"}
TOP_LEVEL = ["schema_version", "plugins", *SECTIONS, *MODEL_SECTIONS, *COMPONENTS]


@dataclass
class Config:
    """A fully validated experiment. ``resolved`` is the YAML-able dict with defaults filled."""

    run: RunConfig
    objective: ObjectiveConfig
    train: TrainConfig
    eval: EvalConfig
    student: ModelConfig
    teacher: Optional[ModelConfig]
    task: ComponentSpec
    criterion: ComponentSpec
    projector: ComponentSpec
    aligner: ComponentSpec
    tuner: ComponentSpec
    plugins: List[str]
    resolved: Dict[str, Any]
    source: Optional[str] = None

    @property
    def uses_teacher(self) -> bool:
        return self.objective.kd_weight > 0


def read_yaml(path, what: str = "config", top_level: str = "of sections", error=ConfigError) -> Dict[str, Any]:
    """A YAML file whose top level is a mapping; ``error`` (a ConfigError) names the problem."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} file not found: {p}")
    try:
        data = load_yaml(p.read_text())
    except yaml.YAMLError as exc:
        raise error(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{p}: the top level must be a mapping {top_level}")
    return data


def parse_override(text: str):
    """``"a.b=value"`` -> (["a", "b"], parsed YAML value)."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': expected key.sub=value")
    try:
        parsed = load_yaml(value) if value != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML: {exc}") from None
    return key.split("."), parsed


def apply_overrides(raw: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """Return a copy of ``raw`` with dotted overrides applied.

    Setting a field of a component given by its bare name (``criterion: fkl`` then
    ``criterion.temperature=2``) expands it to ``{name: fkl, temperature: 2}``.
    """
    out = copy.deepcopy(raw)
    for text in overrides or []:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if isinstance(child, str) and ".".join(path[: i + 1]) in COMPONENTS:
                child = {"name": child}
            elif child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{'.'.join(path[: i + 1])}' is a {type(child).__name__}, not a section")
            node[part] = child
            node = child
        node[path[-1]] = value
    return out


def load_config(path, overrides: Optional[List[str]] = None) -> Config:
    raw = apply_overrides(read_yaml(path), overrides or [])
    return validate(raw, source=str(path))


def validate(raw: Dict[str, Any], source: Optional[str] = None) -> Config:
    """Check every section and component of a raw config dict; load no weights."""
    raw = copy.deepcopy(raw)
    for key in raw:
        if key not in TOP_LEVEL:
            raise ConfigError(f"unknown top-level key '{key}'.{suggest(key, TOP_LEVEL)} Sections: {', '.join(TOP_LEVEL)}")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ConfigError(f"schema_version: expected {SCHEMA_VERSION}, got {version!r} (add 'schema_version: 1' at the top)")
    plugins = raw.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError("plugins: expected a list of module names")
    load_plugins(plugins)

    sections = {}
    for name, cls in SECTIONS.items():
        node = raw.get(name) or {}
        if not isinstance(node, dict):
            raise ConfigError(f"{name}: expected a mapping, got {type(node).__name__}")
        sections[name] = check_section(cls, node, name)

    models = {}
    for name in MODEL_SECTIONS:
        node = raw.get(name)
        if node is None:
            models[name] = None
            continue
        if isinstance(node, str):
            node = {"path": node}
        if not isinstance(node, dict):
            raise ConfigError(f"{name}: expected a mapping with 'path' (or a path string)")
        models[name] = check_section(ModelConfig, node, name)
    if models["student"] is None:
        raise ConfigError("student: missing section (a model path is required)")
    if models["teacher"] is not None and models["teacher"].tuner is not None:
        raise ConfigError("teacher.tuner: the teacher is frozen; only the student takes a tuner")
    tuner = spec("tuner", models["student"].tuner or "full", where="student.tuner")
    if sections["objective"].kd_weight > 0 and models["teacher"] is None:
        raise ConfigError("teacher: missing section; it is required when objective.kd_weight > 0 (use kd_weight: 0 for SFT)")
    if not 0 <= sections["objective"].kd_weight <= 1:
        raise ConfigError(f"objective.kd_weight: must be in [0, 1], got {sections['objective'].kd_weight}")
    _check_train(sections["train"])
    if sections["eval"].select_by == "rouge_l" and not sections["eval"].generate:
        raise ConfigError("eval.select_by: 'rouge_l' needs eval.generate: true")
    if sections["eval"].generate and not sections["eval"].seeds:
        raise ConfigError("eval.seeds: give at least one seed for dev generation")

    if raw.get("task") is None:
        raise ConfigError("task: missing section (e.g. {name: instruction, data_dir: ...})")
    comps = {name: spec(kind, raw.get(name) or COMPONENT_DEFAULTS[name], where=name) for name, kind in COMPONENTS.items()}

    resolved: Dict[str, Any] = {"schema_version": SCHEMA_VERSION, "plugins": plugins}
    for name in SECTIONS:
        resolved[name] = dataclasses.asdict(sections[name])
    for name in MODEL_SECTIONS:
        resolved[name] = dataclasses.asdict(models[name]) if models[name] else None
    resolved["student"]["tuner"] = tuner.config_node()
    for name, c in comps.items():
        resolved[name] = c.config_node()
    return Config(**sections, **models, **comps, tuner=tuner, plugins=plugins, resolved=resolved, source=source)


def _check_train(t: TrainConfig) -> None:
    for key in ("micro_batch_size", "grad_accum"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}: must be >= 1")
    for key in ("log_every", "eval_every", "save_every", "warmup_steps", "num_workers"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}: must be >= 0")
    if t.keep_last < 1:
        raise ConfigError("train.keep_last: must be >= 1")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError("train.max_steps: must be >= 1")
    if t.epochs <= 0:
        raise ConfigError("train.epochs: must be > 0")
    if len(t.adam_betas) != 2:
        raise ConfigError("train.adam_betas: expected two numbers")


def dump(resolved: Dict[str, Any]) -> str:
    return yaml.safe_dump(resolved, sort_keys=False)
