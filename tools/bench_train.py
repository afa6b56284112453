#!/usr/bin/env python
"""Time training steps of any kd-train config: tokens/s, MFU, peak memory and the time split.

    python tools/bench_train.py CONFIG [key=value ...] [--steps 5] [--warmup 1] [--seq-len 512]
        [--prompt-len 256] [--micro-batch-size 4] [--device cpu|cuda]
        [--random-weights [--teacher-shape NAME|config.json] [--student-shape NAME|config.json]]

The config's components (criterion, projector, aligner, tuner, objective, train: lr, precision,
chunk size, ...) run through kdcore's own Trainer step (``Trainer.accumulate`` and
``Trainer.optimizer_step``, the telemetry of :mod:`kdcore.telemetry`) on synthetic batches of a
fixed shape: ``--micro-batch-size`` sequences of ``--seq-len`` random token ids per side, the
last ``seq_len − prompt_len`` positions being the response. Fixed shapes make the numbers
comparable across configs and machines.

``--random-weights`` builds both models from their configs with random weights instead of
loading them, so large pairs can be timed without downloading anything: ``--teacher-shape`` /
``--student-shape`` name a shape under ``tools/model_shapes/`` (gpt2, gpt2-medium, gpt2-xl, qwen1.5-1.8b,
llama2-7b, tinyllama-1.1b, smollm2-135m) or a ``config.json``; without them the config's own
model configs are read (local or cached). Random weights have no tokenizers, so components that
need them (aligner ``mined``, ``init: pinv``) need the real models.

Memory: the peak over the timed steps: CUDA ``max_memory_allocated``; CPU the process's peak
resident set (``VmHWM`` after resetting it through ``/proc/self/clear_refs``); ``state MiB`` is
the bytes this rank holds in parameters (student, projector, aligner, teacher), gradients and
optimizer state, counted from the tensors (a sharded tensor counts its local shard).

Under torchrun (``torchrun --nproc_per_node 2 tools/bench_train.py CONFIG train.strategy=fsdp
...``) every rank runs the steps (the same synthetic batches) and rank 0 prints the per-rank
peaks and states: the memory of ``train.strategy: ddp`` against ``fsdp``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = Path(__file__).resolve().parent / "model_shapes"


def shape_config(name: str):
    """A transformers config from a shape name under tools/model_shapes/ or a config.json path."""
    from transformers import AutoConfig, CONFIG_MAPPING

    path = Path(name) if name.endswith(".json") else SHAPES / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SHAPES.glob("*.json")))
        raise SystemExit(f"bench_train: unknown shape '{name}' (known: {known}, or a config.json path)")
    values = json.loads(path.read_text())
    if "model_type" not in values:
        return AutoConfig.from_pretrained(path.parent)
    return CONFIG_MAPPING[values.pop("model_type")](**values)


def random_model(hf_config, dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)


class _Tokenizer:
    """What the engine asks of a tokenizer when models have random weights: pad and eos ids."""

    def __init__(self, vocab_size: int):
        self.pad_token_id = self.eos_token_id = vocab_size - 1


class _SyntheticTask:
    """A stand-in task: the bench feeds synthetic batches, so the task only needs its limits."""

    def __init__(self, max_length: int, max_prompt_length: int):
        from kdcore.task import Example

        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self._examples = [Example("x", "y")] * 4096

    def examples(self, split):
        return self._examples

    def check(self):
        pass


def random_components(cfg, args, device):
    """Components of ``cfg`` around randomly initialised models of the given shapes."""
    from kdcore.assemble import Components, build_kinds, side_context
    from kdcore.models import freeze, load_model_config

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    s_cfg = shape_config(args.student_shape) if args.student_shape else load_model_config(cfg.student)
    t_cfg = shape_config(args.teacher_shape) if args.teacher_shape else load_model_config(cfg.teacher)
    student, teacher = random_model(s_cfg, torch.float32), random_model(t_cfg, dtype)
    freeze(teacher)
    s_tok, t_tok = _Tokenizer(student.config.get_text_config().vocab_size), _Tokenizer(teacher.config.get_text_config().vocab_size)
    context = {"seed": cfg.run.seed, "task": _SyntheticTask(args.seq_len, args.prompt_len)}
    context.update(side_context("student", s_tok, student), **side_context("teacher", t_tok, teacher))
    try:
        built = build_kinds(cfg.components, context)
    except TypeError as exc:
        raise SystemExit(f"bench_train: a component needs real tokenizers ({exc}); run without --random-weights")
    if built["aligner"].requires_same_tokenizer and s_tok.pad_token_id != t_tok.pad_token_id:
        raise SystemExit(f"bench_train: aligner '{built['aligner'].name}' needs one vocabulary; the shapes differ")
    shared = built["aligner"].requires_same_tokenizer
    return Components(built, s_tok, None if shared else t_tok, built["tuner"].apply(student), teacher, shared)


def synthetic_batch(batch: int, seq_len: int, prompt_len: int, vocab: int, generator) -> dict:
    ids = torch.randint(0, vocab - 1, (batch, seq_len), generator=generator)
    labels = torch.randint(0, vocab - 1, (batch, seq_len), generator=generator)
    labels[:, : prompt_len - 1] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def micro_batches(trainer, args, generator) -> list:
    """One step's synthetic micro-batches (both sides; aligner features like the data loader's)."""
    from kdcore.aligner import Aligner
    from kdcore.data import pad_lists

    p, out = trainer.parts, []
    vocab = lambda model: model.get_output_embeddings().weight.shape[0]
    for _ in range(trainer.cfg.train.grad_accum):
        student = synthetic_batch(args.micro_batch_size, args.seq_len, args.prompt_len, vocab(p.student_model), generator)
        teacher = student if p.shared_tokenizer else synthetic_batch(
            args.micro_batch_size, args.seq_len, args.prompt_len, vocab(p.teacher_model), generator)
        batch = {"student": student, "teacher": teacher}
        if trainer.cfg.uses_teacher and type(p.aligner).pair_features is not Aligner.pair_features:
            rows = lambda side, i: {k: v[i].tolist() for k, v in side.items()}
            feats = [p.aligner.pair_features(rows(student, i), rows(teacher, i)) for i in range(args.micro_batch_size)]
            batch["align"] = {k: pad_lists([f[k] for f in feats]) for k in feats[0]}
        out.append(batch)
    return out


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_train", description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--random-weights", action="store_true", help="random models from their configs (no weights)")
    p.add_argument("--teacher-shape")
    p.add_argument("--student-shape")
    p.add_argument("--json", help="also write the result row as JSON to this file")
    return p


def run(args) -> dict:
    from kdcore.assemble import build_components
    from kdcore.config import load_config
    from kdcore.distributed import DistInfo, init_distributed
    from kdcore.trainer import Trainer

    device = torch.device(args.device)
    info = init_distributed() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else DistInfo(device=device)
    out = tempfile.mkdtemp(prefix="bench_train-")
    overrides = [*args.overrides, f"run.output_dir={out}", "train.max_steps=1000000",
                 f"train.micro_batch_size={args.micro_batch_size}"]
    cfg = load_config(args.config, overrides)
    parts = random_components(cfg, args, device) if args.random_weights else build_components(cfg)
    trainer = Trainer(cfg, info, components=parts)
    load_peak = peak_mib(device)  # building both whole models, and sharding them
    trainer.throughput.start()
    generator = torch.Generator().manual_seed(0)
    seconds, records = [], []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            trainer.timer.take()
            trainer.timer.run_totals.clear()
            reset_peak(device)
        tick = time.perf_counter()
        with trainer.timer.section("data"):
            batches = micro_batches(trainer, args, generator)
        metrics = trainer.accumulate(batches)
        with trainer.timer.section("optimizer"):
            trainer.optimizer_step()
        elapsed = time.perf_counter() - tick
        record = trainer.throughput.step_metrics(metrics, trainer.flops, elapsed)
        if step >= args.warmup:
            seconds.append(elapsed)
            records.append(record)
    row = summarise(args, cfg, trainer, seconds, records, peak_mib(device))
    row.update(strategy=cfg.train.strategy, world_size=info.world_size, load_peak_mib=load_peak,
               state_mib=state_bytes(trainer) / 2**20)
    if info.enabled:
        import torch.distributed as dist

        rows = [None] * info.world_size
        dist.all_gather_object(rows, {k: row[k] for k in ("peak_mib", "load_peak_mib", "state_mib")})
        row.update({f"{k}_per_rank": [r[k] for r in rows] for k in rows[0]}, peak_mib=max(r["peak_mib"] for r in rows))
    return row


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def state_bytes(trainer) -> int:
    """This rank's parameters (student side and teacher), gradients and optimizer state."""
    tensors = [*trainer.module.parameters(), *[p.grad for p in trainer.module.parameters() if p.grad is not None]]
    if trainer.parts.teacher_model is not None:
        tensors += list(trainer.parts.teacher_model.parameters())
    tensors += [v for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    seen, total = set(), 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.data_ptr() not in seen:  # tied weights once
            seen.add(local.data_ptr())
            total += local_bytes(t)
    return total


def summarise(args, cfg, trainer, seconds, records, peak) -> dict:
    median = statistics.median(seconds)
    row = {
        "config": args.config, "device": args.device, "teacher": args.teacher_shape or cfg.teacher.path if cfg.teacher else None,
        "student": args.student_shape or cfg.student.path, "projector": cfg.projector.name, "aligner": cfg.aligner.name,
        "criterion": cfg.criterion.name, "tokens_per_step": records[0]["all_tokens"], "step_s": median,
        "tokens_per_s": records[0]["all_tokens"] / median,
        "response_tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
        "tflops": statistics.median(r["tflops"] for r in records), "mfu": statistics.median(r.get("mfu", 0.0) for r in records),
        "peak_mib": peak, "peak_flops": trainer.throughput.peak,
        "time": {k: v / len(records) for k, v in trainer.timer.run_totals.items()},
    }
    return row


def table(row: dict) -> str:
    split = " ".join(f"{k} {v:.3f}" for k, v in row["time"].items())
    return "\n".join([
        "| config | device | teacher -> student | tokens/step | step s | tokens/s | TFLOP/s | MFU | peak MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
        f"| {row['config']} ({row['aligner']}+{row['projector']}+{row['criterion']}) | {row['device']} | {row['teacher']} -> "
        f"{row['student']} | {row['tokens_per_step']:.0f} | {row['step_s']:.3f} | {row['tokens_per_s']:,.0f} | "
        f"{row['tflops']:.3f} | {100 * row['mfu']:.1f} % | {row['peak_mib']:,.0f} |",
        "", f"time split per step (s): {split}; peak {row['peak_flops'] / 1e12 if row['peak_flops'] else float('nan'):.2f} TFLOP/s",
    ])


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kdcore.console import run_command

    args = parser().parse_intermixed_args(argv)

    def body() -> int:
        row = run(args)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
        print(table(row))
        if "peak_mib_per_rank" in row:
            print(f"strategy {row['strategy']} on {row['world_size']} processes: per rank peak MiB "
                  f"{', '.join(f'{v:,.0f}' for v in row['peak_mib_per_rank'])}; load peak MiB "
                  f"{', '.join(f'{v:,.0f}' for v in row['load_peak_mib_per_rank'])}; parameters + gradients + "
                  f"optimizer state MiB {', '.join(f'{v:,.0f}' for v in row['state_mib_per_rank'])}")
        if args.json:
            Path(args.json).write_text(json.dumps(row, indent=2))
        return 0

    try:
        return run_command("bench_train", body)
    finally:
        from kdcore.distributed import shutdown

        shutdown()



if __name__ == "__main__":
    sys.exit(main())
