"""Throughput telemetry of a run: tokens/s, model FLOPs utilisation (MFU) and the time split.

**Model FLOPs** (what MFU counts: useful work, not recomputation) of one micro-batch, from an
analytic count (docs/benchmarks.md, "Training throughput"):

* a decoder backbone over ``T`` tokens of a sequence: ``2·P·T + 2·L·d·T²`` for the forward
  pass (``P`` the backbone's matmul weights, embeddings excluded; ``L`` layers of width ``d``;
  causal attention scores and values), three times that for forward + backward (the student);
* every head product the loss evaluates (:func:`kdcore.kdspace.space_flops`): ``2·N·h·V`` for
  ``N`` rows of width ``h`` against ``V`` columns forward, the same again for the gradient of
  the rows and of a trainable head weight. Heads run on response rows only (no full-sequence
  logits), which the count reflects.

**Peak FLOP/s**: ``train.peak_flops`` when set; else a table of dense BF16 (autocast) and TF32
(fp32) peaks of known GPUs, looked up by ``torch.cuda.get_device_name()``; on CPU a measured
fp32 matmul peak (the best of a few 2048×2048 products with the run's threads, once per
process).

**Time split**: wall seconds per section of a step (``data``, ``teacher_forward``,
``student_forward``, ``kd_loss``, ``backward``, ``optimizer``), of evaluations (``eval``) and of
generation hooks (``generation``); on CUDA each section boundary synchronises the device so the
time lands in the right section.
"""

from __future__ import annotations

import contextlib
import time
from typing import Dict, Iterator, Optional

import torch

SECTIONS = ("data", "teacher_forward", "student_forward", "kd_loss", "backward", "optimizer", "eval", "generation")

# Dense peak FLOP/s by GPU name fragment: (bf16/fp16 tensor cores, tf32), from the vendors' data sheets.
GPU_PEAKS = {
    "H200": (989e12, 494e12), "H100 PCIe": (756e12, 378e12), "H100": (989e12, 494e12), "GH200": (989e12, 494e12),
    "A100": (312e12, 156e12), "A10G": (125e12, 62.5e12), "A10": (125e12, 62.5e12), "L40S": (362e12, 183e12),
    "L4": (121e12, 60e12), "RTX 4090": (165e12, 82.6e12), "RTX 3090": (71e12, 35.6e12), "V100": (125e12, 15.7e12),
    "T4": (65e12, 8.1e12),
}


class Timer:
    """Accumulates wall seconds per named section until :meth:`take`."""

    def __init__(self, device: Optional[torch.device] = None):
        self.sync = device is not None and device.type == "cuda"
        self.device = device
        self.totals: Dict[str, float] = {}
        self.run_totals: Dict[str, float] = {}

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize(self.device)
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds
        self.run_totals[name] = self.run_totals.get(name, 0.0) + seconds

    def take(self) -> Dict[str, float]:
        """The sections' seconds since the last call, as ``time/<section>`` metrics."""
        out = {f"time/{k}": v for k, v in self.totals.items()}
        self.totals = {}
        return out


class NullTimer(Timer):
    """A timer that measures nothing (components used outside a run)."""

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        yield


def backbone_shape(model):
    """``(P, L, d)``: matmul weights of the backbone (2-D parameters outside the input embedding
    and the output head), layers and width of an HF causal LM (through a PEFT wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    skip = {id(m.weight) for m in base.modules() if isinstance(m, torch.nn.Embedding)}  # token, position
    head = base.get_output_embeddings()
    if head is not None:
        skip.add(id(head.weight))
    params = sum(p.numel() for p in base.base_model.parameters() if p.dim() == 2 and id(p) not in skip)
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0))
    width = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0))
    return params, layers, width


def backbone_flops(shape, attention_mask: torch.Tensor, training: bool) -> float:
    """Model FLOPs of a backbone over a right-padded batch ``attention_mask[B, T]``."""
    params, layers, width = shape
    lengths = attention_mask.sum(-1).double()
    forward = 2.0 * params * float(lengths.sum()) + 2.0 * layers * width * float((lengths ** 2).sum())
    return 3.0 * forward if training else forward


_CPU_PEAK: Dict[int, float] = {}


def measured_cpu_peak(size: int = 2048, repeats: int = 3) -> float:
    """Best fp32 matmul FLOP/s of this process's threads (measured once per thread count)."""
    threads = torch.get_num_threads()
    if threads not in _CPU_PEAK:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        _CPU_PEAK[threads] = 2.0 * size ** 3 / best
    return _CPU_PEAK[threads]


def peak_flops(device: torch.device, autocast_dtype, configured: Optional[float] = None) -> Optional[float]:
    """Peak FLOP/s for MFU (see the module docstring); ``None`` for an unknown GPU."""
    if configured:
        return float(configured)
    if device.type == "cpu":
        return measured_cpu_peak()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, (half, tf32) in GPU_PEAKS.items():
            if fragment in name:
                return half if autocast_dtype is not None else tf32
    return None


def summary_table(run_totals: Dict[str, float], steps: int, tokens: float, flops: float, peak: Optional[float]) -> str:
    """The end-of-run summary: throughput, MFU and the time split (seconds and share)."""
    total = sum(v for k, v in run_totals.items() if k in SECTIONS)
    train = sum(run_totals.get(k, 0.0) for k in SECTIONS if k not in ("eval", "generation"))
    lines = [f"throughput: {tokens / max(train, 1e-9):,.0f} response tokens/s over {steps} steps "
             f"(training time {train:.1f} s of {total:.1f} s); "
             f"{flops / max(train, 1e-9) / 1e12:.3f} TFLOP/s"
             + (f", MFU {100 * flops / max(train, 1e-9) / peak:.1f} % of {peak / 1e12:.1f} TFLOP/s" if peak else "")]
    lines.append("| time | s | share |\n|---|---:|---:|")
    for name in SECTIONS:
        if name in run_totals:
            lines.append(f"| {name} | {run_totals[name]:.1f} | {100 * run_totals[name] / max(total, 1e-9):.1f} % |")
    return "\n".join(lines)


class Throughput:
    """A run's throughput: per-step metrics and the end-of-run summary.

    Per step: ``tokens_per_s`` (student response tokens of the global batch), ``all_tokens_per_s``
    (every student token, prompts included), ``tflops`` and ``mfu`` (this rank's model FLOPs),
    and the step's ``time/<section>`` seconds.
    """

    def __init__(self, device, autocast_dtype, configured_peak: Optional[float] = None):
        self.timer = Timer(device)
        self.device, self.autocast_dtype, self.configured = device, autocast_dtype, configured_peak
        self.peak: Optional[float] = None
        self.flops = self.tokens = 0.0
        self.steps = 0

    def start(self) -> None:
        self.peak = peak_flops(self.device, self.autocast_dtype, self.configured)

    def step_metrics(self, metrics: Dict[str, float], flops: float, seconds: float) -> Dict[str, float]:
        seconds = max(seconds, 1e-9)
        metrics["tokens_per_s"] = metrics["tokens"] / seconds
        metrics["all_tokens_per_s"] = metrics["all_tokens"] / seconds
        metrics["tflops"] = flops / seconds / 1e12
        if self.peak:
            metrics["mfu"] = flops / seconds / self.peak
        self.flops, self.tokens, self.steps = self.flops + flops, self.tokens + metrics["tokens"], self.steps + 1
        metrics.update(self.timer.take())
        return metrics

    def summary(self, print_table: bool) -> Dict[str, float]:
        """The ``summary`` record (and, with ``print_table``, :func:`summary_table` on stdout)."""
        totals = self.timer.run_totals
        out = {f"time/{k}": v for k, v in totals.items()}
        if not self.steps:
            return out
        if print_table:
            print(summary_table(totals, self.steps, self.tokens, self.flops, self.peak), flush=True)
        train_s = max(sum(v for k, v in totals.items() if k not in ("eval", "generation")), 1e-9)
        out.update(tokens_per_s=self.tokens / train_s, tflops=self.flops / train_s / 1e12)
        if self.peak:
            out["mfu"] = self.flops / train_s / self.peak
        return out
