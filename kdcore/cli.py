"""``kd-train``: train from a YAML config, validate it, print it, or list plugins.

    kd-train --config FILE [key.sub=value ...] [--validate | --print-config | --compare-sft]
    kd-train --list-plugins
    torchrun --nproc_per_node N -m kdcore.cli --config FILE ...

Errors caused by input (config, data, model paths, incompatible components, checkpoints) are
printed as one message and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from .console import command
from .errors import KdcoreError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kd-train", description="Distil a causal LM as one YAML config describes.")
    p.add_argument("--config", help="experiment YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, values parsed as YAML")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--validate", action="store_true", help="check the config, data and models without loading weights")
    mode.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    mode.add_argument("--list-plugins", action="store_true", help="list registered plugins with their providers")
    mode.add_argument("--compare-sft", action="store_true",
                      help="train the config and its SFT twin (kd_weight 0, same seeds, steps, data) and compare "
                           "eval CE and test-split ROUGE-L of teacher, SFT and KD students (comparison.json)")
    return p


def list_plugins() -> str:
    from .registry import get_registry

    reg = get_registry()
    rows = [("KIND", "NAME", "PROVIDER", "VERSION", "MODULE")]
    for kind in reg.kinds():
        for e in reg.entries(kind):
            rows.append((kind, e.name, e.provider, e.version or "-", e.module))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def preempted_message(args, trainer) -> str:
    """How a run stopped by SIGTERM/SIGINT continues."""
    import shlex

    again = ["kd-train", "--config", args.config, *[o for o in args.overrides if not o.startswith("train.resume=")],
             "train.resume=true"]
    return (f"stopped at step {trainer.step} of {trainer.total_steps} ({trainer.guard.signal_name or 'signal'} "
            f"received); checkpoint saved in {trainer.checkpoints.root}. Resume with: {shlex.join(again)}")


def run(args) -> int:
    from .config import dump, load_config

    if args.list_plugins:
        print(list_plugins())
        return 0
    if not args.config:
        raise KdcoreError("--config FILE is required (or use --list-plugins)")
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump(cfg.resolved), end="")
        return 0
    if args.validate:
        from .assemble import validate_models

        for note in validate_models(cfg):
            print(f"  {note}")
        print(f"{args.config}: OK")
        return 0

    from .distributed import init_distributed, shutdown
    from .trainer import Trainer

    info = init_distributed()
    if args.compare_sft:
        from .compare import compare_sft

        try:
            compare_sft(args.config, args.overrides, info)
        finally:
            shutdown()
        return 0
    try:
        trainer = Trainer(cfg, info)
        metrics = trainer.train()
        if trainer.preempted:
            if info.is_main:
                print(preempted_message(args, trainer))
            return 0
        if info.is_main:
            summary = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k in ("ce", "loss"))
            print(f"done: {trainer.step} steps; final eval {summary}; student saved to {trainer.out / 'final'}")
            rouge = trainer.out / "test_rouge.json"
            if rouge.is_file():
                r = json.loads(rouge.read_text())
                parts = [f"{k.replace('_', ' ')} {r[k]:.2f}" for k in ("student_before", "student_after", "teacher") if k in r]
                print(f"ROUGE-L on the {r['split']} split: " + ", ".join(parts))
    finally:
        shutdown()
    return 0


main = command("kd-train", parser, run)


if __name__ == "__main__":
    sys.exit(main())
