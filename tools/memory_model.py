#!/usr/bin/env python
"""Per-GPU memory of model state under ``train.strategy: ddp`` and ``fsdp``, from model shapes.

    python tools/memory_model.py --teacher gpt2-xl --student gpt2 --gpus 8
    python tools/memory_model.py --teacher llama2-7b --student tinyllama-1.1b --gpus 8 --lora 256 q_proj v_proj

Shapes are the ``tools/model_shapes/`` names of tools/bench_train.py (or a config.json path);
the models are built on the meta device, so nothing is downloaded or allocated. Counted, in
bytes per GPU (activations, logits chunks and allocator slack are not: measure them with
tools/bench_train.py):

student (AdamW, fp32 master weights; ``T`` trainable of ``P`` parameters)
  ddp   4·P (weights) + 4·T (gradients) + 8·T (Adam moments) + 4·T (DDP's gradient buckets)
  fsdp  (4·P + 12·T)/W  sharded, plus the unsharded parameters in flight in the compute dtype
        ``c`` (2 bytes for bf16): the root unit (embeddings, final norm, head: all of the
        step) and two decoder layers (the one computing and the one prefetched), with their
        unsharded gradients in ``c`` bytes before the reduce-scatter (full fine-tuning; LoRA's are small)
teacher (frozen, stored in ``b`` bytes per parameter: 4 for float32, the configs' default)
  ddp   b·P_t
  fsdp  b·(P_t − E_t)/W + b·E_t (input embedding and head replicated) + 2·c·(largest layer)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30


def shape_counts(name: str, lora: Optional[int] = None, targets: Optional[List[str]] = None) -> Dict[str, float]:
    """Parameter counts of a shape: total, embeddings + head (``replicated``), the root unit's
    (everything outside decoder layers), the largest decoder layer, and the trainable count
    (all, or the LoRA adapters of rank ``lora`` on the ``targets`` linear layers)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kdcore.models import decoder_layers
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train import shape_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape_config(name))
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    emb = {id(p): p for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()}
    layers = decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    trainable = total
    if lora:
        trainable = 0
        for mod_name, module in layers.named_modules():
            if isinstance(module, torch.nn.Linear) and mod_name.rsplit(".", 1)[-1] in (targets or []):
                trainable += lora * (module.in_features + module.out_features)
    return {"total": total, "replicated": sum(p.numel() for p in emb.values()),
            "root": sum(p.numel() for i, p in unique.items() if i not in in_layers),
            "layer": max(sum(p.numel() for p in layer.parameters()) for layer in layers),
            "trainable": trainable, "layers": len(layers)}


def student_bytes(c: Dict[str, float], strategy: str, world: int, compute: int = 2) -> float:
    p, t = c["total"], c["trainable"]
    if strategy == "ddp":
        return 4 * p + 4 * t + 8 * t + 4 * t
    in_flight = c["root"] + 2 * c["layer"]
    grads = 1 if t == p else 0  # unsharded gradients of a fully trained unit (LoRA: negligible, not counted)
    return (4 * p + 12 * t) / world + compute * in_flight * (1 + grads)


def teacher_bytes(c: Dict[str, float], strategy: str, world: int, stored: int = 4, compute: int = 2) -> float:
    if strategy == "ddp":
        return stored * c["total"]
    return stored * (c["total"] - c["replicated"]) / world + stored * c["replicated"] + 2 * compute * c["layer"]


def table(teacher: str, student: str, world: int, lora=None, targets=None, stored: int = 4) -> str:
    t, s = shape_counts(teacher), shape_counts(student, lora, targets)
    rows = [f"{teacher} -> {student} on {world} GPUs (teacher stored in {stored} bytes/param, compute bf16; "
            f"teacher {t['total'] / 1e9:.3f} B params, {t['layers']} layers; student {s['total'] / 1e9:.3f} B, "
            f"{s['trainable'] / 1e6:.1f} M trainable)", "",
            "| per GPU (GiB) | ddp | fsdp |", "|---|---:|---:|"]
    sd, sf = student_bytes(s, "ddp", world), student_bytes(s, "fsdp", world)
    td, tf = teacher_bytes(t, "ddp", world, stored), teacher_bytes(t, "fsdp", world, stored)
    rows += [f"| student: weights, gradients, Adam | {sd / GIB:.2f} | {sf / GIB:.2f} |",
             f"| teacher (frozen) | {td / GIB:.2f} | {tf / GIB:.2f} |",
             f"| model state total | {(sd + td) / GIB:.2f} | {(sf + tf) / GIB:.2f} |"]
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="memory_model", description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--teacher-bytes", type=int, default=4, help="bytes per teacher parameter as stored (4: float32)")
    p.add_argument("--lora", nargs="+", metavar=("R", "TARGET"), help="LoRA rank and target module names")
    args = p.parse_args(argv)
    lora, targets = (int(args.lora[0]), args.lora[1:]) if args.lora else (None, None)
    print(table(args.teacher, args.student, args.gpus, lora, targets, args.teacher_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
