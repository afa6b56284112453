"""Instruction-following evaluation: generate on test sets with several seeds, score ROUGE-L.

The protocol of DSKD / MiniLLM (docs/methods.md#evaluation): for each test set and each seed
(10, 20, 30, 40, 50) sample responses and score ROUGE-L; report the mean and the sample
standard deviation over the seeds per set, and the average over the sets.

Building blocks, from small to large:

* :func:`load_test_set` / :func:`load_dskd_test_dir`: test examples from processed JSONL files
  (or a ``datasets`` hub name, ``hf:NAME[:SPLIT]``, online only).
* :func:`predict` and :func:`rouge_l_of`: one model on one example list, no files; the latter is
  what a trainer calls for dev ROUGE-L.
* :func:`evaluate_model`: every set × seed, predictions written as JSONL, one results row.
* :func:`write_results`: ``results.json`` and the Markdown table ``results.md``, a row per model.
* :func:`evaluate`: all of it for one model into one output directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

from .instruct_format import read_jsonl, record_to_example
from .errors import DataError, KdcoreError
from .generate import GenerationSettings, default_device, generate
from .rouge import rouge_l_scores
from .task import Example

log = logging.getLogger(__name__)

DEFAULT_SEEDS = (10, 20, 30, 40, 50)

# The five DSKD/MiniLLM test sets: name -> (file under the data directory, line cap).
DSKD_TEST_SETS: Dict[str, tuple] = {
    "dolly": ("dolly/valid.jsonl", None),
    "selfinst": ("self-inst/valid.jsonl", None),
    "vicuna": ("vicuna/valid.jsonl", None),
    "sinst": ("sinst/11_/valid.jsonl", None),
    "uinst": ("uinst/11_/valid.jsonl", 10_000),
}

# This repository's committed test split, usable as ``--test kdcore``.
BUILTIN_TEST_SETS = {"kdcore": "data/kdcore-instruct/test.jsonl"}


# ----------------------------------------------------------------------------- test sets

def builtin_path(name: str) -> Path:
    """The committed test split, found next to the package (editable install) or in the cwd."""
    rel = BUILTIN_TEST_SETS[name]
    beside_package = Path(__file__).resolve().parents[1] / rel
    return beside_package if beside_package.is_file() else Path(rel)


def load_test_set(source: Union[str, Path], limit: Optional[int] = None) -> List[Example]:
    """Examples from a JSONL file (``instruction``/``input``/``output`` or ``prompt``/``output``,
    ``output`` a string or a list of references) or from ``hf:NAME[:SPLIT]`` (default split
    ``test``). Bad input raises :class:`DataError` naming the file and line."""
    text = str(source)
    if text in BUILTIN_TEST_SETS:
        return read_jsonl(builtin_path(text), limit)
    if not text.startswith("hf:"):
        return read_jsonl(Path(text).expanduser(), limit)
    name, _, split = text[3:].partition(":")
    split = split or "test"
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown name, unknown split, ...
        offline = " (offline: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)" if (
            os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1") else ""
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot load dataset '{name}' split '{split}'{offline}: {first}") from None
    examples = []
    for i, record in enumerate(ds):
        examples.append(record_to_example(dict(record), f"{name}[{split}][{i}]"))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"dataset '{name}' split '{split}': no examples")
    return examples


def load_dskd_test_dir(root: Union[str, Path], limit: Optional[int] = None) -> Dict[str, List[Example]]:
    """The DSKD test sets present under ``root`` (``dolly/valid.jsonl``, ``self-inst/valid.jsonl``,
    ``vicuna/valid.jsonl``, ``sinst/11_/valid.jsonl``, ``uinst/11_/valid.jsonl``; UnNI capped at
    its first 10,000 lines), each further capped at ``limit`` examples."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"test directory not found: {root}")
    sets = {}
    for name, (rel, cap) in DSKD_TEST_SETS.items():
        path = root / rel
        if path.is_file():
            caps = [c for c in (cap, limit) if c is not None]
            sets[name] = read_jsonl(path, min(caps) if caps else None)
    if not sets:
        expected = ", ".join(rel for rel, _ in DSKD_TEST_SETS.values())
        raise DataError(f"{root}: none of the DSKD test files found (expected any of {expected})")
    return sets


# ----------------------------------------------------------------------------- scoring

def predict(model, tokenizer, examples: Sequence[Example], settings: GenerationSettings, seed: int,
            progress: bool = True, desc: str = "generate") -> List[str]:
    """Post-processed responses of ``model`` to the examples' prompts with one seed."""
    return generate(model, tokenizer, [e.prompt for e in examples], settings, seed, progress=progress, desc=desc)


def rouge_l_of(model, tokenizer, examples: Sequence[Example], settings: Optional[GenerationSettings] = None,
               seeds: Sequence[int] = DEFAULT_SEEDS, progress: bool = False) -> float:
    """Corpus ROUGE-L (× 100) of ``model`` on ``examples``, averaged over ``seeds``; no files.

    For dev evaluation during training, DSKD uses ``GenerationSettings.dev(max_length,
    max_prompt_length)`` and three seeds. The model's train/eval mode is restored afterwards.
    """
    settings = settings or GenerationSettings()
    refs = [e.references for e in examples]
    per_seed = []
    for seed in seeds:
        preds = predict(model, tokenizer, examples, settings, seed, progress=progress, desc=f"dev seed {seed}")
        per_seed.append(mean_percent(rouge_l_scores(preds, refs)))
    return sum(per_seed) / len(per_seed)


def mean_percent(scores: Sequence[float]) -> float:
    return 100.0 * sum(scores) / len(scores) if scores else 0.0


def mean_std(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """Mean and sample standard deviation (``None`` with fewer than two values)."""
    values = list(values)
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


# ----------------------------------------------------------------------------- files

def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def evaluate_model(model, tokenizer, test_sets: Mapping[str, Sequence[Example]], seeds: Sequence[int] = DEFAULT_SEEDS,
                   settings: Optional[GenerationSettings] = None, predictions_dir: Optional[Union[str, Path]] = None,
                   name: str = "model", progress: bool = True) -> dict:
    """Every test set × seed: generate, score, optionally write
    ``predictions_dir/{set}_seed{seed}.jsonl`` (prompt, prediction, references, rougeL × 100).

    Returns the results row: ``{"model", "sets": {set: {"n", "per_seed", "mean", "std"}},
    "avg": {"per_seed", "mean", "std"}}``, where ``avg.per_seed`` is the average over the sets
    for each seed and ``avg.mean``/``avg.std`` summarise those over the seeds.
    """
    settings = settings or GenerationSettings()
    if not seeds:
        raise KdcoreError("give at least one seed")
    if not test_sets:
        raise KdcoreError("give at least one test set")
    sets = {}
    for set_name, examples in test_sets.items():
        refs = [e.references for e in examples]
        per_seed = {}
        for seed in seeds:
            preds = predict(model, tokenizer, examples, settings, seed, progress=progress, desc=f"{set_name} seed {seed}")
            scores = rouge_l_scores(preds, refs)
            per_seed[str(seed)] = mean_percent(scores)
            log.info("%s: %s seed %d: ROUGE-L %.2f", name, set_name, seed, per_seed[str(seed)])
            if predictions_dir is not None:
                write_jsonl(Path(predictions_dir) / f"{set_name}_seed{seed}.jsonl",
                            [{"prompt": e.prompt, "prediction": p, "references": e.references, "rougeL": 100.0 * s}
                             for e, p, s in zip(examples, preds, scores)])
        sets[set_name] = {"n": len(examples), "per_seed": per_seed, **mean_std(per_seed.values())}
    avg_per_seed = {str(s): statistics.fmean(v["per_seed"][str(s)] for v in sets.values()) for s in seeds}
    return {"model": name, "sets": sets, "avg": {"per_seed": avg_per_seed, **mean_std(avg_per_seed.values())}}


def format_cell(stats: Mapping[str, Optional[float]]) -> str:
    if stats.get("std") is None:
        return f"{stats['mean']:.2f}"
    return f"{stats['mean']:.2f} ± {stats['std']:.2f}"


def results_table(rows: Sequence[dict]) -> str:
    """Markdown: a row per model, a column per test set (in first-seen order) and ``Avg``;
    cells are ``mean ± std`` of ROUGE-L over the seeds."""
    set_names: List[str] = []
    for row in rows:
        set_names += [s for s in row["sets"] if s not in set_names]
    header = ["Model", *set_names, "Avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        cells = [format_cell(row["sets"][s]) if s in row["sets"] else "–" for s in set_names]
        lines.append("| " + " | ".join([str(row["model"]).replace("|", "\\|"), *cells, format_cell(row["avg"])]) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: Sequence[dict], out_dir: Union[str, Path], settings: GenerationSettings,
                  seeds: Sequence[int]) -> None:
    """``out_dir/results.json`` (``{"protocol": {"seeds", "generation"}, "models": rows}``) and
    ``out_dir/results.md`` (the table of :func:`results_table`)."""
    out = Path(out_dir)
    payload = {"metric": "ROUGE-L F1 x 100 (rouge_score rougeL, stemmed, max over references)",
               "protocol": {"seeds": list(seeds), "generation": settings.as_dict()}, "models": list(rows)}
    _write_text(out / "results.json", json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    seeds_text = ", ".join(str(s) for s in seeds)
    mode = "sampling" if settings.do_sample else "greedy"
    note = (f"\nROUGE-L (× 100), mean ± sample std over seeds {seeds_text}; {mode}, "
            f"max_new_tokens={settings.max_new_tokens}, no_repeat_ngram_size={settings.no_repeat_ngram_size}.\n")
    _write_text(out / "results.md", results_table(rows) + note)


def load_model_and_tokenizer(model_dir: Union[str, Path], tokenizer=None, device=None, **model_config):
    """A model (moved to ``device``, default CUDA when present) and its tokenizer through
    :mod:`kdcore.models`, so hub ids, directories, ``package:`` paths and GGUF files all work."""
    from .models import ModelConfig, load_model, load_tokenizer

    tok_source = tokenizer if isinstance(tokenizer, (str, Path)) else None
    cfg = ModelConfig(path=str(model_dir), tokenizer=str(tok_source) if tok_source else None, **model_config)
    tok = tokenizer if tokenizer is not None and tok_source is None else load_tokenizer(cfg)
    model = load_model(cfg).to(device or default_device())
    return model, tok


def safe_label(name: str) -> str:
    """A file-system-safe version of a model label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def evaluate(model_dir_or_model, tokenizer=None, test_sets: Optional[Mapping[str, Sequence[Example]]] = None,
             seeds: Sequence[int] = DEFAULT_SEEDS, settings: Optional[GenerationSettings] = None,
             out_dir: Union[str, Path] = "runs/eval", name: Optional[str] = None, progress: bool = True) -> dict:
    """Evaluate one model (a loaded model, or a path/hub id loaded with its tokenizer) and write
    ``out_dir/predictions/{set}_seed{seed}.jsonl``, ``out_dir/results.json`` and
    ``out_dir/results.md``. Returns the results row."""
    settings = settings or GenerationSettings()
    if isinstance(model_dir_or_model, (str, Path)):
        name = name or str(model_dir_or_model)
        model, tokenizer = load_model_and_tokenizer(model_dir_or_model, tokenizer)
    else:
        model = model_dir_or_model
        if tokenizer is None:
            raise KdcoreError("evaluate: a loaded model needs its tokenizer")
    row = evaluate_model(model, tokenizer, test_sets or {}, seeds, settings, Path(out_dir) / "predictions",
                         name or "model", progress)
    write_results([row], out_dir, settings, seeds)
    return row


def score_file(path: Union[str, Path]) -> Dict[str, float]:
    """ROUGE-L of an existing predictions JSONL file whose lines hold ``prediction`` and
    ``references`` (a list or a string). Predictions are post-processed as in generation."""
    from .rouge import postprocess

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"predictions file not found: {path}")
    preds, refs = [], []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            pred, ref = record.get("prediction"), record.get("references")
            if not isinstance(pred, str):
                raise DataError(f"{where}: needs a 'prediction' string")
            if isinstance(ref, str):
                ref = [ref]
            if not (isinstance(ref, list) and ref and all(isinstance(r, str) for r in ref)):
                raise DataError(f"{where}: needs 'references', a string or a non-empty list of strings")
            preds.append(postprocess(pred))
            refs.append(ref)
    if not preds:
        raise DataError(f"{path}: no predictions")
    return {"rougeL": mean_percent(rouge_l_scores(preds, refs)), "n": len(preds)}


# ----------------------------------------------------------------------------- during training

class RunEvaluation:
    """The evaluations inside a training run: the loss terms on the eval split (every rank
    evaluates its shard), the dev ROUGE-L at each evaluation (``eval.generate``) and, with
    ``eval.test_split``, the student's ROUGE-L before and after training and the teacher's.

    Rank 0 generates and shares the value with the other ranks (one all-reduce), under a forked
    RNG so that evaluation never changes the training random stream. Sampling follows DSKD's
    dev sampler (no n-gram block; the test protocol blocks 6-grams), or greedy decoding with
    ``eval.greedy`` (one pass instead of one per seed).
    """

    def __init__(self, config, parts, module, data, dist, device, autocast_dtype=None, lockstep: bool = False):
        self.cfg, self.kd_weight, self.task = config.eval, config.objective.kd_weight, parts.task
        self.parts, self.module, self.data = parts, module, data
        self.dist, self.device, self.autocast_dtype = dist, device, autocast_dtype
        self.lockstep = lockstep  # every rank runs as many forwards (a sharded module's forward is collective)

    def terms(self) -> Dict[str, float]:
        """Every term's mean over the eval split (all ranks), plus the dev ROUGE-L when asked.
        The module's own timer is silenced: evaluation time is the caller's ``eval`` section."""
        import torch

        from .data import response_tokens
        from .distill import forward_into, with_loss
        from .distributed import all_reduce_sum
        from .metrics import MetricSums
        from .telemetry import NullTimer

        was_training, timer = self.module.training, self.module.timer
        self.module.eval()
        self.module.timer = NullTimer()
        sums, tokens = MetricSums(), 0
        with torch.no_grad():
            for mb in self.data.eval_batches():
                tokens += response_tokens(mb)
                forward_into(self.module, mb, response_tokens(mb), sums, self.device, self.autocast_dtype)
            for mb in self.data.eval_padding() if self.lockstep else []:  # results discarded
                forward_into(self.module, mb, response_tokens(mb), MetricSums(), self.device, self.autocast_dtype)
        n = float(all_reduce_sum(torch.tensor([float(tokens)], device=self.device), self.dist).item())
        metrics = {**with_loss(sums.reduce(self.dist, self.device), sums.term_names, self.kd_weight), "tokens": max(n, 1.0)}
        if self.cfg.generate:
            metrics["rouge_l"] = self.dev_rouge_l()
        self.module.train(was_training)
        self.module.timer = timer
        return metrics

    def dev_rouge_l(self) -> float:
        """Dev ROUGE-L of the student's responses on the eval split."""
        return self.score(self.parts.student_model, self.parts.student_tokenizer, self.data.eval_set.examples)

    def score(self, model, tokenizer, examples: Sequence[Example], ngram_block: int = 0) -> float:
        import torch

        from .distributed import all_reduce_sum

        e = self.cfg
        value = torch.zeros(1, device=self.device)
        if self.dist.is_main:
            settings = GenerationSettings.dev(self.task.max_length, self.task.max_prompt_length,
                                              batch_size=e.generate_batch_size, do_sample=not e.greedy,
                                              no_repeat_ngram_size=ngram_block)
            if e.max_new_tokens:
                settings = settings.replace(max_new_tokens=e.max_new_tokens)
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                value += rouge_l_of(model, tokenizer, examples, settings, seeds=e.seeds[:1] if e.greedy else e.seeds)
        return float(all_reduce_sum(value, self.dist).item())

    def test_split(self, stage: str, out_dir: Path) -> Optional[Dict[str, float]]:
        """Student ROUGE-L on ``eval.test_split`` at ``stage`` (``before``/``after``), plus the
        teacher's once (before); kept in ``out_dir/test_rouge.json``. Returns the record to log."""
        split = self.cfg.test_split
        if not split:
            return None
        examples, parts = self.task.examples(split), self.parts
        teacher = parts.teacher_model if stage == "before" else None
        if self.dist.is_main:
            who = "student and teacher" if teacher is not None else "student"
            log.info("ROUGE-L of the %s on the %s split (%d examples), %s training", who, split, len(examples), stage)
        path = Path(out_dir) / "test_rouge.json"
        results = json.loads(path.read_text()) if path.is_file() else {"split": split}
        results[f"student_{stage}"] = self.score(parts.student_model, parts.student_tokenizer, examples, 6)
        if teacher is not None:
            results["teacher"] = self.score(teacher, parts.teacher_tokenizer, examples, 6)
        if self.dist.is_main:
            path.write_text(json.dumps(results, indent=2))
        return {k: v for k, v in results.items() if k != "split"}
