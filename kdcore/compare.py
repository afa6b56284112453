"""``kd-train --config X --compare-sft``: a distillation run side by side with its SFT twin.

The config is trained as given into ``<run.output_dir>/kd`` and as its SFT twin into
``<run.output_dir>/sft``: the same config with ``objective.kd_weight: 0`` (so the teacher is not
run), projector ``none`` and aligner ``identity`` (nothing of the KD method left), the same
seeds, steps and data. Then the teacher and both students are evaluated on the task's test
split (``eval.test_split``, default ``test``) with the kd-eval protocol (docs/methods.md#evaluation):
sampled responses for each seed of ``eval.seeds`` (mean ± sample std of ROUGE-L), plus one
greedy pass, responses of at most ``eval.max_new_tokens`` tokens (default 256). The result is
printed as one table and written as ``<run.output_dir>/comparison.json``::

    {"teacher": {"rouge_l", "rouge_l_std", "rouge_l_greedy"},
     "sft": {"eval_ce", "rouge_l", "rouge_l_std", "rouge_l_greedy", "output_dir"},
     "kd": {...}, "protocol": {...}}

and ``comparison.md``. ``eval_ce`` is the student's CE on the eval split after the last step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from .config import load_config

RUNS = ("sft", "kd")


def twin_overrides(name: str) -> List[str]:
    """The overrides that turn the config into the run ``name`` (``kd``: as given)."""
    if name == "kd":
        return []
    return ["objective.kd_weight=0.0", "projector=none", "aligner=identity", "targets=gold"]


def train_run(config_path, overrides: List[str], name: str, out: Path, dist) -> Dict[str, float]:
    """Train one of the two runs; returns its last eval record."""
    from .trainer import Trainer

    cfg = load_config(config_path, [*overrides, *twin_overrides(name), f"run.output_dir={out / name}",
                                    "eval.test_split=null"])
    if name == "kd" and not cfg.uses_teacher:
        from .errors import ConfigError

        raise ConfigError("--compare-sft: the config is SFT already (objective.kd_weight is 0); set kd_weight > 0")
    if dist.is_main:
        print(f"--compare-sft: training the {name.upper()} student into {out / name}", flush=True)
    return Trainer(cfg, dist).train()


def protocol(cfg):
    """The kd-eval protocol settings and seeds for this config's test split."""
    from .generate import GenerationSettings

    task = cfg.task.build()
    settings = GenerationSettings(max_prompt_length=task.max_prompt_length, batch_size=cfg.eval.generate_batch_size,
                                  max_new_tokens=cfg.eval.max_new_tokens or 256)
    split = cfg.eval.test_split or "test"
    return task.examples(split), split, settings, list(cfg.eval.seeds)


def score(model, tokenizer, examples, settings, seeds, name: str, out: Path) -> Dict[str, float]:
    """ROUGE-L (sampling over ``seeds``: mean and std; and greedy) of one model."""
    from .evaluate import evaluate_model

    sampled = evaluate_model(model, tokenizer, {"test": examples}, seeds, settings, out / "predictions" / name, name)
    greedy = evaluate_model(model, tokenizer, {"test": examples}, [seeds[0]], settings.replace(do_sample=False),
                            out / "predictions" / f"{name}_greedy", name)
    return {"rouge_l": sampled["avg"]["mean"], "rouge_l_std": sampled["avg"]["std"], "rouge_l_greedy": greedy["avg"]["mean"]}


def evaluate_all(cfg, out: Path) -> Dict[str, Dict[str, float]]:
    """The teacher's and both students' scores (rank 0 only)."""
    from .evaluate import load_model_and_tokenizer
    from .models import load_model, load_tokenizer

    from .generate import default_device

    examples, split, settings, seeds = protocol(cfg)
    print(f"--compare-sft: ROUGE-L on the {split} split ({len(examples)} examples), seeds {seeds} and greedy", flush=True)
    teacher = load_model(cfg.teacher).to(default_device())
    results = {"teacher": score(teacher, load_tokenizer(cfg.teacher), examples, settings, seeds, "teacher", out)}
    del teacher
    for name in RUNS:
        model, tokenizer = load_model_and_tokenizer(out / name / "final")
        results[name] = score(model, tokenizer, examples, settings, seeds, name, out)
        del model
    results["protocol"] = {"split": split, "examples": len(examples), "seeds": seeds, "generation": settings.as_dict()}
    return results


def table(results: Dict[str, Dict]) -> str:
    """The comparison as Markdown: a row per model."""
    def cell(r, key):
        value = r.get(key)
        return "–" if value is None else f"{value:.3f}" if key == "eval_ce" else f"{value:.2f}"

    lines = ["| model | eval CE | ROUGE-L (sampling, mean ± std) | ROUGE-L (greedy) |", "|---|---:|---:|---:|"]
    for name in ("teacher", *RUNS):
        r = results[name]
        std = f" ± {r['rouge_l_std']:.2f}" if r.get("rouge_l_std") is not None else ""
        lines.append(f"| {name} | {cell(r, 'eval_ce')} | {r['rouge_l']:.2f}{std} | {cell(r, 'rouge_l_greedy')} |")
    return "\n".join(lines) + "\n"


def compare_sft(config_path, overrides: List[str], dist) -> Dict[str, Dict]:
    """Train both runs, evaluate the three models and write the comparison (see the module docstring)."""
    cfg = load_config(config_path, overrides)
    if cfg.teacher is None:
        from .errors import ConfigError

        raise ConfigError("--compare-sft: the config has no teacher section")
    out = Path(cfg.run.output_dir)
    evals = {name: train_run(config_path, overrides, name, out, dist) for name in RUNS}
    if not dist.is_main:
        return {}
    results = evaluate_all(cfg, out)
    for name in RUNS:
        results[name] = {"eval_ce": evals[name].get("ce"), **results[name], "output_dir": str(out / name)}
    (out / "comparison.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "comparison.md").write_text(table(results))
    print(table(results), end="")
    print(f"--compare-sft: wrote {out / 'comparison.json'} and {out / 'comparison.md'}")
    return results
