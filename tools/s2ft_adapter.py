#!/usr/bin/env python
"""Fuse or unfuse S2FT adapters (``<run>/final/adapter``) on a base model and save the result.

    python tools/s2ft_adapter.py fuse   --base MODEL_DIR --adapter ADAPTER_DIR [--adapter ...] --out DIR
    python tools/s2ft_adapter.py unfuse --base MODEL_DIR --adapter ADAPTER_DIR [--adapter ...] --out DIR

``fuse`` scatter-adds every adapter's dense blocks into the base weights at their original
indices (several adapters: their sum, the paper's adapter fusion); ``unfuse`` scatter-subtracts
them (switching tasks = unfuse the old adapter, fuse the new one). The output is a plain
transformers model (tokenizer files of the base are copied when present).
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["fuse", "unfuse"])
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", action="append", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdcore.errors import KdcoreError
    from kdcore_plugins.tuners._s2ft_adapter import fuse, unfuse

    try:
        model = AutoModelForCausalLM.from_pretrained(args.base)
        for adapter in args.adapter:
            (fuse if args.action == "fuse" else unfuse)(model, adapter)
    except (KdcoreError, OSError) as exc:
        print(f"s2ft_adapter: {exc}", file=sys.stderr)
        return 2
    model.save_pretrained(args.out)
    try:
        AutoTokenizer.from_pretrained(args.base).save_pretrained(args.out)
    except Exception:  # a base without tokenizer files: the weights are what matters
        pass
    print(f"{args.action}d {len(args.adapter)} adapter(s) into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
