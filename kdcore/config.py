"""The experiment config: YAML -> validated sections and component specs.

One file per experiment (README.md, "Config reference"). Every section is validated against a dataclass
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
from typing import Annotated, Any, Dict, List, Literal, Optional

import yaml

from .components import spec
from .errors import ConfigError, suggest
from .models import ModelConfig
from .kinds import by_config_key, kinds
from .registry import load_plugins
from .schema import INT64_MAX, Range, check_section
from .sharding import check_strategy

SCHEMA_VERSION = 1


MAX_DEPTH = 64  # nesting a config may use; deeper YAML is refused before anything recurses over it


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 insists on ``1.0e-3``) and
    refuses a key given twice in one mapping (the last one would silently win)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: the base class reports it
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found key {key!r} twice (first {_line(first)}, again {_line(key_node)})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _line(node) -> str:
    return f"on line {node.start_mark.line + 1}"


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


class YamlProblem(ValueError):
    """Text that is not a config YAML document for a reason PyYAML does not report itself."""


def load_yaml(text: str):
    """Parse YAML text. Raises ``yaml.YAMLError`` (bad syntax, a duplicate key) or
    :class:`YamlProblem` (nested deeper than :data:`MAX_DEPTH`, an absurd literal such as an
    integer of thousands of digits)."""
    try:
        data = yaml.load(text, Loader=YamlLoader)
    except RecursionError:
        raise YamlProblem(f"nested too deeply (more than {MAX_DEPTH} levels)") from None
    except ValueError as exc:  # int() of a literal beyond Python's digit limit, and the like
        raise YamlProblem(f"a literal cannot be read: {str(exc).splitlines()[0]}") from None
    if _depth(data) > MAX_DEPTH:
        raise YamlProblem(f"nested too deeply (more than {MAX_DEPTH} levels)")
    return data


def _depth(data) -> int:
    """Nesting depth of lists and mappings, computed without recursion (aliases counted once)."""
    deepest, stack, seen = 0, [(data, 0)], set()
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)) or id(node) in seen:
            continue
        seen.add(id(node))
        deepest = max(deepest, depth + 1)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


@dataclass
class RunConfig:
    """``run:`` where outputs go and the base seed (each rank uses ``seed + rank``)."""

    output_dir: str = "runs/default"
    seed: Annotated[int, Range(ge=0, le=INT64_MAX)] = 10


@dataclass
class ObjectiveConfig:
    """``objective:`` ``loss = (1 - kd_weight)·CE + kd_weight·(Σ KD terms + auxiliary terms)``.

    kd_weight = 0 is plain SFT (no teacher forward). chunk_size: rows of ``[chunk, V]`` logits
    the KD loss materialises at once (null: a budget of 2**26 logits, e.g. 441 rows at
    V = 151,936, 1,335 at V = 50,257). fused: each chunk's gradients are computed in the forward
    pass (kdcore.fused; nothing is recomputed); false: autograd with each chunk recomputed in
    backward (the reference path).
    """

    kd_weight: Annotated[float, Range(ge=0, le=1)] = 0.5
    chunk_size: Optional[Annotated[int, Range(ge=1)]] = None
    fused: bool = True


@dataclass
class TrainConfig:
    """``train:`` optimisation, schedule and cadence. Steps are optimizer steps; ``max_steps``
    (if set) wins over ``epochs``. ``eval_every: 0`` evaluates once per epoch; ``save_every: 0``
    saves at every evaluation; both also happen at the last step. ``peak_flops``: the device's
    peak FLOP/s for MFU (null: a table of known GPUs, or a measured matmul peak on CPU).

    resume: continue from the newest complete checkpoint; a config that differs from the
    checkpoint's is refused unless ``resume_allow_changes`` (then the new values apply from the
    resumed step on); ``resume_fallback``: when the newest checkpoint fails its checksums, resume
    from the newest one that passes. A step whose loss or gradient norm is not finite is
    skipped (no weight, optimizer or schedule update; its batch is consumed);
    ``max_consecutive_skips`` such steps in a row stop the run.

    strategy: ``ddp`` (every rank a full replica) or ``fsdp`` (FSDP2: student and teacher
    sharded over the ranks, distributed checkpoints that resume on any world size;
    :mod:`kdcore.sharding`)."""

    epochs: Annotated[float, Range(gt=0)] = 1.0
    max_steps: Optional[Annotated[int, Range(ge=1)]] = None
    micro_batch_size: Annotated[int, Range(ge=1)] = 4
    grad_accum: Annotated[int, Range(ge=1)] = 1
    lr: Annotated[float, Range(gt=0)] = 5e-4
    projector_lr: Annotated[float, Range(gt=0)] = 1e-3
    weight_decay: Annotated[float, Range(ge=0)] = 0.01
    adam_betas: List[Annotated[float, Range(ge=0, lt=1)]] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: Annotated[int, Range(ge=0)] = 0
    min_lr: Annotated[float, Range(ge=0)] = 1e-7
    clip_grad: Annotated[float, Range(ge=0)] = 1.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    log_every: Annotated[int, Range(ge=0)] = 1
    eval_every: Annotated[int, Range(ge=0)] = 0
    eval_at_start: bool = True
    save_every: Annotated[int, Range(ge=0)] = 0
    keep_last: Annotated[int, Range(ge=1)] = 2
    resume: bool = False
    resume_allow_changes: bool = False
    resume_fallback: bool = False
    max_consecutive_skips: Annotated[int, Range(ge=1)] = 5
    num_workers: Annotated[int, Range(ge=0)] = 0
    threads: Optional[Annotated[int, Range(ge=1)]] = None
    peak_flops: Optional[Annotated[float, Range(gt=0)]] = None
    strategy: Literal["ddp", "fsdp"] = "ddp"


@dataclass
class EvalConfig:
    """``eval:`` periodic evaluation on the task's ``split``: the loss terms, and with
    ``generate: true`` the dev ROUGE-L of sampled responses (DSKD: sampling at T=1, top-k 0,
    top-p 1, no n-gram block, averaged over ``seeds``; ``greedy`` decodes greedily instead).
    ``select_by`` picks the best checkpoint. ``test_split``: also report the ROUGE-L of the
    student before and after training, and of the teacher, on that split (``test_rouge.json``)."""

    split: str = "valid"
    batch_size: Annotated[int, Range(ge=1)] = 8
    max_examples: Optional[Annotated[int, Range(ge=1)]] = None
    generate: bool = False
    seeds: List[Annotated[int, Range(ge=0, le=INT64_MAX)]] = field(default_factory=lambda: [10, 20, 30])
    max_new_tokens: Optional[Annotated[int, Range(ge=1)]] = None
    generate_batch_size: Annotated[int, Range(ge=1)] = 16
    greedy: bool = False
    select_by: Literal["ce", "rouge_l"] = "ce"
    test_split: Optional[str] = None


SECTIONS = {"run": RunConfig, "objective": ObjectiveConfig, "train": TrainConfig, "eval": EvalConfig}
MODEL_SECTIONS = ("teacher", "student")


def top_level_keys() -> List[str]:
    """Keys a config may have at the top: sections, model sections and top-level kind keys."""
    kind_keys = [k.config_key for k in kinds() if k.config_key and "." not in k.config_key]
    return ["schema_version", "plugins", *SECTIONS, *MODEL_SECTIONS, *kind_keys]


@dataclass
class Config:
    """A fully validated experiment. ``resolved`` is the YAML-able dict with defaults filled.

    ``components`` maps each plugin kind (:mod:`kdcore.kinds`) to its validated
    :class:`ComponentSpec` (a list for ``many`` kinds, ``None`` when not configured); they are
    also attributes: ``cfg.criterion``, ``cfg.task``, ``cfg.tuner``, ...
    """

    run: RunConfig
    objective: ObjectiveConfig
    train: TrainConfig
    eval: EvalConfig
    student: ModelConfig
    teacher: Optional[ModelConfig]
    components: Dict[str, Any]
    plugins: List[str]
    resolved: Dict[str, Any]
    source: Optional[str] = None

    def __getattr__(self, name: str):
        components = self.__dict__.get("components") or {}
        if name in components:
            return components[name]
        raise AttributeError(f"Config has no attribute or component kind {name!r}")

    @property
    def uses_teacher(self) -> bool:
        """Whether the run loads the teacher: for KD (``kd_weight > 0``) or because the targets
        plugin generates with it (``Targets.needs_teacher``, e.g. SeqKD with ``kd_weight: 0``)."""
        return self.objective.kd_weight > 0 or _targets_need_teacher(self.components.get("targets"))


def _targets_need_teacher(targets_spec) -> bool:
    return targets_spec is not None and bool(getattr(targets_spec.entry.cls, "needs_teacher", False))


def read_yaml(path, what: str = "config", top_level: str = "of sections", error=ConfigError) -> Dict[str, Any]:
    """A YAML file whose top level is a mapping; ``error`` (a ConfigError) names the problem."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} file not found: {p}")
    try:
        data = load_yaml(p.read_bytes().decode("utf-8-sig"))
    except OSError as exc:
        raise error(f"{p}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{p}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    except yaml.YAMLError as exc:
        raise error(f"{p}: not valid YAML: {_one_line(exc)}") from None
    except YamlProblem as exc:
        raise error(f"{p}: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{p}: the top level must be a mapping {top_level}")
    return data


def _one_line(exc: Exception) -> str:
    """A YAML error on one line (PyYAML spreads context, problem and marks over several)."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip())


def parse_override(text: str):
    """``"a.b=value"`` -> (["a", "b"], parsed YAML value)."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': expected key.sub=value")
    try:
        parsed = load_yaml(value) if value != "" else ""
    except (yaml.YAMLError, YamlProblem) as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML: {_one_line(exc)}") from None
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
            if isinstance(child, str) and ".".join(path[: i + 1]) in by_config_key():
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
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ConfigError(f"schema_version: expected {SCHEMA_VERSION}, got {version!r} (add 'schema_version: 1' at the top)")
    plugins = raw.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError("plugins: expected a list of module names")
    load_plugins(plugins)  # first: a plugin may add a kind, and with it a config key
    allowed = top_level_keys()
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"unknown top-level key '{key}'.{suggest(key, allowed)} Sections: {', '.join(allowed)}")
    nodes = _pop_component_nodes(raw)
    sections = {name: _section(raw, name, cls) for name, cls in SECTIONS.items()}
    models = {name: _model_section(raw, name) for name in MODEL_SECTIONS}
    if models["student"] is None:
        raise ConfigError("student: missing section (a model path is required)")
    if sections["objective"].kd_weight > 0 and models["teacher"] is None:
        raise ConfigError("teacher: missing section; it is required when objective.kd_weight > 0 (use kd_weight: 0 for SFT)")
    _check_train(sections["train"])
    if sections["eval"].select_by == "rouge_l" and not sections["eval"].generate:
        raise ConfigError("eval.select_by: 'rouge_l' needs eval.generate: true")
    if sections["eval"].generate and not sections["eval"].seeds:
        raise ConfigError("eval.seeds: give at least one seed for dev generation")
    check_strategy(sections["train"], sections["eval"])
    components = {k.name: _component(k, nodes.get(k.config_key)) for k in kinds() if k.config_key}
    targets = components.get("targets")
    if _targets_need_teacher(targets) and models["teacher"] is None:
        raise ConfigError(f"teacher: missing section; targets '{targets.name}' generates with the teacher")
    if targets is not None and getattr(targets.entry.cls, "new_sequences", False) and models["teacher"] is not None \
            and models["teacher"].cache is not None:
        raise ConfigError(f"teacher.cache: targets '{targets.name}' trains on generated sequences, which a stored teacher "
                          "(outputs for the dataset's responses) cannot serve; remove teacher.cache or use targets: gold")

    resolved: Dict[str, Any] = {"schema_version": SCHEMA_VERSION, "plugins": plugins}
    for name in SECTIONS:
        resolved[name] = dataclasses.asdict(sections[name])
    for name in MODEL_SECTIONS:
        resolved[name] = dataclasses.asdict(models[name]) if models[name] else None
    for k in kinds():
        if k.config_key and components[k.name] is not None:
            node = [c.config_node() for c in components[k.name]] if k.many else components[k.name].config_node()
            _put(resolved, k.config_key, node)
    return Config(**sections, **models, components=components, plugins=plugins, resolved=resolved, source=source)


def _pop_component_nodes(raw: Dict[str, Any]) -> Dict[str, Any]:
    """Take every kind's component node(s) out of ``raw`` (top-level keys and keys inside
    sections), so that sections are validated without them. A kind key inside the wrong
    section (``teacher.tuner``) is an error naming the right place."""
    nodes = {}
    by_key = {k.key: k for k in kinds() if k.section}
    for k in kinds():
        if not k.config_key:
            continue
        if k.section is None:
            nodes[k.config_key] = raw.pop(k.config_key, None)
        elif isinstance(raw.get(k.section), dict):
            nodes[k.config_key] = raw[k.section].pop(k.key, None)
    for section in [*SECTIONS, *MODEL_SECTIONS]:
        node = raw.get(section)
        if isinstance(node, dict):
            for key in node:
                if key in by_key:
                    kind = by_key[key]
                    raise ConfigError(f"{section}.{key}: not accepted here; {kind.name} components go in "
                                      f"'{kind.config_key}'")
    return nodes


def _section(raw: Dict[str, Any], name: str, cls):
    node = raw.get(name) or {}
    if not isinstance(node, dict):
        raise ConfigError(f"{name}: expected a mapping, got {type(node).__name__}")
    return check_section(cls, node, name)


def _model_section(raw: Dict[str, Any], name: str) -> Optional[ModelConfig]:
    node = raw.get(name)
    if node is None:
        return None
    if isinstance(node, str):
        node = {"path": node}
    if not isinstance(node, dict):
        raise ConfigError(f"{name}: expected a mapping with 'path' (or a path string)")
    if node.get("cache") is not None or node.get("cache_k") is not None:
        from .teacher_cache import model_section

        node = model_section(name, node)  # teacher: {cache: DIR}: the path and tokenizer from the cache
    return check_section(ModelConfig, node, name)


def _component(kind, node):
    """The validated spec(s) of one kind's config node (its default when absent)."""
    where = kind.config_key
    if node is None:
        node = kind.default
    if node is None:
        if kind.required:
            raise ConfigError(f"{where}: missing section (a {kind.name} component, e.g. {{name: ...}})")
        return [] if kind.many else None
    if not kind.many:
        return spec(kind.name, node, where=where)
    if not isinstance(node, list):
        raise ConfigError(f"{where}: expected a list of {kind.name} components")
    return [spec(kind.name, item, where=f"{where}[{i}]") for i, item in enumerate(node)]


def _put(tree: Dict[str, Any], dotted: str, value) -> None:
    section, _, key = dotted.rpartition(".")
    node = tree
    if section:
        node = tree.setdefault(section, {}) or {}
        tree[section] = node
    node[key] = value


def _check_train(t: TrainConfig) -> None:
    """What the per-field ranges cannot say."""
    if len(t.adam_betas) != 2:
        raise ConfigError(f"train.adam_betas: expected two numbers, got {len(t.adam_betas)}")


def dump(resolved: Dict[str, Any]) -> str:
    return yaml.safe_dump(resolved, sort_keys=False)
