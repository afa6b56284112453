"""Tuner ``s2ft``: structured sparse fine-tuning (Yang et al., NeurIPS 2024; seed-methods.md §2).

"Select sparsely, compute densely": per decoder layer a few attention units (heads; KV groups
under GQA/MQA) and FFN channels are selected, the coupled weights are co-permuted so the
selected units come first (the model's function is unchanged), and only the dense blocks of
the selected units train, in place, with partial back-propagation (:mod:`._s2ft_linear`):

=====  ==================================  ================================
kind   trainable block (logical (out,in))   shape
=====  ==================================  ================================
o      ``o_proj.weight[:, a : b]``          ``d × n_O·r·d_h``
down   ``down_proj.weight[:, c : e]``       ``d × n_D``
v      ``v_proj.weight[0 : n_V·d_h, :]``    ``n_V·d_h × d``
up     ``up_proj.weight[0 : n_U, :]``       ``n_U × d``
=====  ==================================  ================================

Units are ordered ``[only-V, V∩O, only-O, rest]`` (FFN: ``[only-up, up∩down, only-down,
rest]``), so ``a = |V∖O|·r·d_h``, ``b = a + |O|·r·d_h`` (§2.3).

Config (``student.tuner``): budgets ``o``, ``down``, ``v``, ``up`` (int = count of units in the
whole model, float in [0, 1] = ratio of all units; ``null`` = the default: ``o 0.052`` and
``down 0.02`` for MHA models, ``down 0.03`` only for GQA/MQA models, ``v``/``up`` 0);
``strategy`` ``random`` (default) | ``weight`` | ``activation`` | ``weight_activation``;
``order`` ``largest`` | ``smallest``; ``allocation`` ``uniform`` (default, the paper) |
``pooled`` (the released code); ``selection_seed`` (default: the run seed);
``calibration_examples`` (activation strategies; default 1 % of the train split, at least 16).

Outputs: ``final/`` is a plain transformers model (permutation undone), ``final/adapter/`` and
``best/adapter/`` the update as an adapter (original indices + dense blocks, :mod:`._s2ft_adapter`),
``<output_dir>/trainable.json`` the trainable-parameter report written at run start.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Callable, Dict, Iterable, Literal, Optional, Union

import torch

from kdcore import hookimpl
from kdcore.errors import CheckpointError, ConfigError
from kdcore.schema import Range
from kdcore.tuner import Tuner

from ._s2ft_adapter import Block, Plan, Reordering, adapter_of, plain_state_dict, restore_plain, save_adapter
from ._s2ft_layout import find_structures
from ._s2ft_linear import COLS, ROWS, attach_block
from ._s2ft_select import activation_scores, allocate, random_scores, resolve_budget, weight_scores

log = logging.getLogger(__name__)

Budget = Optional[Union[Annotated[int, Range(ge=0)], Annotated[float, Range(ge=0, le=1)]]]

# Released-script defaults (seed-methods.md §2.3): LLaMA-2-7B class (MHA) and LLaMA-3-8B (GQA).
MHA_DEFAULTS = {"o": 0.052, "down": 0.02, "v": 0, "up": 0}
GQA_DEFAULTS = {"o": 0, "down": 0.03, "v": 0, "up": 0}
KINDS = ("v", "o", "up", "down")  # draw order of the random scores (fixed: part of the seed contract)
SELECTION_FILE = "s2ft_selection.json"


def ordered(first: Iterable[int], second: Iterable[int], units: int):
    """``[only-first, both, only-second, rest]``, each ascending, and the three group sizes."""
    a, b = set(first), set(second)
    only_a, both, only_b = sorted(a - b), sorted(a & b), sorted(b - a)
    rest = [u for u in range(units) if u not in a and u not in b]
    return only_a + both + only_b + rest, len(only_a), len(both), len(only_b)


class S2FT(Tuner):
    name = "s2ft"

    def __init__(self, o: Budget = None, down: Budget = None, v: Budget = None, up: Budget = None,
                 strategy: Literal["random", "weight", "activation", "weight_activation"] = "random",
                 order: Literal["largest", "smallest"] = "largest",
                 allocation: Literal["uniform", "pooled"] = "uniform",
                 selection_seed: Optional[Annotated[int, Range(ge=0)]] = None,
                 calibration_examples: Optional[Annotated[int, Range(ge=1)]] = None, seed: int = 0):
        self.budgets = {"o": o, "down": down, "v": v, "up": up}
        self.strategy, self.order, self.allocation = strategy, order, allocation
        self.seed = seed if selection_seed is None else selection_seed
        self.calibration_examples = calibration_examples
        self.uses_calibration = strategy in ("activation", "weight_activation")
        self.plan: Optional[Plan] = None
        self.report: Dict = {}

    # -- selection ----------------------------------------------------------------------------
    def counts(self, layers) -> Dict[str, int]:
        """Units per kind (:func:`resolve_budget`); defaults by attention type."""
        attn, ffn = layers[0]
        if any(p[0].units != attn.units or p[1].units != ffn.units for p in layers):
            raise ConfigError("student.tuner 's2ft': layers of different widths are not supported")
        grouped = attn.consumer_unit != attn.trainable_producer_unit  # r = heads / kv_heads > 1
        defaults = GQA_DEFAULTS if grouped else MHA_DEFAULTS
        per = {"o": attn.units, "v": attn.units, "down": ffn.units, "up": ffn.units}
        unit = "KV groups" if grouped else "heads"
        out = {}
        for kind in KINDS:
            value = self.budgets[kind] if self.budgets[kind] is not None else defaults[kind]
            what = f"{kind} ({unit})" if kind in ("o", "v") else f"{kind} (channels)"
            out[kind] = resolve_budget(value, per[kind], len(layers), what)
        if not any(out.values()):
            raise ConfigError("student.tuner 's2ft': every budget is 0, nothing would train; set o, down, v or up")
        return out

    def scores(self, model, layers, calibration) -> Dict[str, torch.Tensor]:
        """``[L, U]`` scores per kind, higher = selected first."""
        gen = torch.Generator().manual_seed(int(self.seed))
        attn = [p[0] for p in layers]
        ffn = [p[1] for p in layers]
        if self.strategy == "random":
            return {k: random_scores(len(layers), (attn if k in ("o", "v") else ffn)[0].units, gen) for k in KINDS}
        out = {}
        if self.strategy in ("weight", "weight_activation"):
            out = {"o": weight_scores(attn, "consumer"), "v": weight_scores(attn, "producer"),
                   "down": weight_scores(ffn, "consumer"), "up": weight_scores(ffn, "producer")}
        if self.strategy in ("activation", "weight_activation"):
            if calibration is None:
                raise ConfigError(f"student.tuner 's2ft': strategy {self.strategy!r} needs calibration batches, "
                                  "and none were given to apply()")
            act = activation_scores(model, layers, calibration(self.calibration_examples))
            a = {"o": act["attention"], "v": act["attention"], "down": act["ffn"], "up": act["ffn"]}
            out = {k: out[k] * a[k] for k in KINDS} if out else a
        sign = 1.0 if self.order == "largest" else -1.0
        return {k: sign * v for k, v in out.items()}

    # -- the tuner ----------------------------------------------------------------------------
    def apply(self, model, calibration: Optional[Callable[[Optional[int]], Iterable[dict]]] = None):
        """Select, co-permute, freeze everything but the blocks. ``calibration(n)`` yields
        student batches (``input_ids``, ``attention_mask``) of ``n`` examples (``None``: the
        default share) for the activation strategies."""
        layers = find_structures(model)
        counts = self.counts(layers)
        scores = self.scores(model, layers, calibration)
        selection = {k: allocate(scores[k], counts[k], self.allocation) if counts[k] else [[] for _ in layers]
                     for k in KINDS}
        for p in model.parameters():
            p.requires_grad_(False)
        reorderings, blocks = [], []
        for li, (attn, ffn) in enumerate(layers):
            for s, (first, second) in ((attn, ("v", "o")), (ffn, ("up", "down"))):
                producer_sel, consumer_sel = selection[first][li], selection[second][li]
                if not producer_sel and not consumer_sel:
                    continue  # nothing of this structure trains: leave it as it is
                order, n_first, n_both, n_second = ordered(producer_sel, consumer_sel, s.units)
                s.permute(order)
                for proj, unit in s.producers:
                    reorderings.append(Reordering(proj.name, "weight", 0, proj.offset, proj.rows, unit, order))
                    if proj.module.bias is not None:
                        reorderings.append(Reordering(proj.name, "bias", 0, proj.offset, proj.rows, unit, order))
                width = s.consumer.weight.shape[1]
                reorderings.append(Reordering(s.consumer.name, "weight", 1, 0, width, s.consumer_unit, order))
                p = s.trainable_producer
                if producer_sel:
                    start, end = p.offset, p.offset + (n_first + n_both) * s.trainable_producer_unit
                    block = attach_block(p.module, start, end, ROWS)
                    blocks.append(Block(p.name, first, ROWS, start, end, p.offset, s.trainable_producer_unit, order,
                                        block.detach().clone()))
                if consumer_sel:
                    start = n_first * s.consumer_unit
                    end = start + (n_both + n_second) * s.consumer_unit
                    block = attach_block(s.consumer.module, start, end, COLS)
                    blocks.append(Block(s.consumer.name, second, COLS, start, end, 0, s.consumer_unit, order,
                                        block.detach().clone()))
        self.plan = model.s2ft_plan = Plan(reorderings, blocks, selection)
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if checkpointing and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
        self.report = trainable_report(model, self.plan, counts, self)
        return model

    def export(self, model):
        """In place: the plain transformers model (blocks dropped, permutation undone)."""
        plan = getattr(model, "s2ft_plan", None)
        if plan is not None:
            restore_plain(model, plan)
            del model.s2ft_plan
        return model

    def save_student(self, model, directory: Path, final: bool) -> None:
        """``final/`` and ``best/``: the plain model (original unit order) and ``adapter/``;
        the model being trained is not changed."""
        plan = getattr(model, "s2ft_plan", None)
        if plan is None:
            model.save_pretrained(directory)
            return
        save_adapter(adapter_of(model, plan), Path(directory) / "adapter")
        model.save_pretrained(directory, state_dict=plain_state_dict(model, plan))

    # -- lifecycle hooks ----------------------------------------------------------------------
    @hookimpl
    def kdcore_run_start(self, run):
        if not self.report or not run.is_main:
            return None
        (run.output_dir / "trainable.json").write_text(json.dumps(self.report, indent=2))
        print(format_report(self.report), flush=True)
        return None

    @hookimpl
    def kdcore_checkpoint_save(self, run, step, directory):
        if self.plan is not None and run.is_main:
            (Path(directory) / SELECTION_FILE).write_text(json.dumps(self.plan.selection))

    @hookimpl
    def kdcore_checkpoint_load(self, run, step, directory):
        """The checkpoint holds permuted weights: resuming is only right with the same selection."""
        path = Path(directory) / SELECTION_FILE
        if self.plan is None or not path.exists():
            return
        if json.loads(path.read_text()) != self.plan.selection:
            raise CheckpointError(f"{directory}: the checkpoint was trained with another S2FT selection "
                                  "(budgets, strategy, seed or calibration data changed); its permuted weights "
                                  "do not fit this run's")


def trainable_report(model, plan: Plan, counts: Dict[str, int], tuner: S2FT) -> Dict:
    """Trainable parameters: count, share of the model, and per kind (o, v, down, up) the
    parameters, units and modules (shared/tied weights counted once, blocks not twice)."""
    seen, total = set(), 0
    for name, p in model.named_parameters(remove_duplicate=True):
        if name.endswith("s2ft_block") or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    per = {}
    for b in plan.blocks:
        row = per.setdefault(b.kind, {"params": 0, "units": counts[b.kind], "modules": 0})
        row["params"] += b.init.numel()
        row["modules"] += 1
    trainable = sum(r["params"] for r in per.values())
    for r in per.values():
        r["share"] = r["params"] / total
    return {"tuner": "s2ft", "trainable": trainable, "total": total, "share": trainable / total,
            "per_kind": per, "strategy": tuner.strategy, "order": tuner.order, "allocation": tuner.allocation,
            "seed": int(tuner.seed),
            "units_per_layer": {k: [len(u) for u in v] for k, v in plan.selection.items() if counts[k]}}


def format_report(report: Dict) -> str:
    lines = [f"s2ft: {report['trainable']:,} trainable of {report['total']:,} parameters "
             f"({100 * report['share']:.3f} %)"]
    for kind, r in report["per_kind"].items():
        lines.append(f"  {kind:<5} {r['params']:>12,} params  {r['units']:>6} units  {r['modules']:>4} modules  "
                     f"({100 * r['share']:.3f} %)")
    return "\n".join(lines)


@hookimpl
def kdcore_register_tuners(register):
    register(S2FT)
