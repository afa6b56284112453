"""``kd-cache``: run a config's teacher once and store its top-k outputs (kdcore.teacher_cache).

    kd-cache --config FILE [--out DIR] [--k 64] [--temperatures 2.0 ...] [--dtype float16]
             [--splits train valid] [--shard-size 256] [--batch-size N] [--[no-]hidden] [--hidden-dtype bfloat16]
             [--overwrite] [key.sub=value ...]
    torchrun --nproc_per_node N -m kdcore.cache_cli --config FILE ...   (each rank writes its shards)

Then train with ``teacher: {cache: DIR}`` (or the override ``teacher.cache=DIR``). Running the same
command again resumes an interrupted build (finished shards are kept).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .console import command


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kd-cache", description="Store a config's teacher top-k log-probabilities once.")
    p.add_argument("--config", required=True, help="experiment YAML file (its teacher, task and criterion)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, values parsed as YAML")
    p.add_argument("--out", help="cache directory (default: the config's teacher.cache, else runs/cache/<config stem>)")
    p.add_argument("--k", type=int, default=64, help="top-k entries per token (default 64)")
    p.add_argument("--temperatures", type=float, nargs="+",
                   help="temperatures to store (default: the criterion's temperature)")
    p.add_argument("--dtype", default="float16", help="dtype of the stored log-probabilities: float16 (default), "
                                                      "bfloat16 or float32")
    p.add_argument("--splits", nargs="+", help="splits to cache (default: train and the config's eval.split)")
    p.add_argument("--shard-size", type=int, default=256, help="examples per shard file (default 256)")
    p.add_argument("--batch-size", type=int, help="sequences per teacher forward (default: eval.batch_size)")
    p.add_argument("--hidden", action=argparse.BooleanOptionalAction, default=None,
                   help="also store the teacher's last hidden states per response token and its head and embedding "
                        "tables once (default: when the config's projector or aligner needs them: DSKD, CMA)")
    p.add_argument("--hidden-dtype", default="bfloat16", help="dtype of the stored hidden states: bfloat16 "
                                                             "(default) or float32")
    p.add_argument("--overwrite", action="store_true", help="rebuild a cache that holds other settings")
    return p


def run(args) -> int:
    from .config import load_config
    from .distributed import init_distributed, shutdown
    from .teacher_cache import CacheSettings, build_cache, default_temperatures

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or cfg.teacher.cache or Path("runs/cache") / Path(args.config).stem) if cfg.teacher else None
    splits = tuple(dict.fromkeys(args.splits or ["train", cfg.eval.split]))
    settings = CacheSettings(k=args.k, temperatures=tuple(args.temperatures or default_temperatures(cfg)),
                             dtype=args.dtype, shard_size=args.shard_size, splits=splits,
                             batch_size=args.batch_size or cfg.eval.batch_size, hidden=args.hidden,
                             hidden_dtype=args.hidden_dtype)
    info = init_distributed()
    try:
        build_cache(cfg, out, settings, info, overwrite=args.overwrite)
    finally:
        shutdown()
    if info.is_main:
        import json

        manifest = json.loads((out / "manifest.json").read_text())
        sizes = ", ".join(f"{s}: {v['examples']} sequences, {v['tokens']} tokens, {v['bytes_per_token']} bytes/token"
                          for s, v in manifest["splits"].items())
        hidden = manifest.get("hidden")
        states = (f"; hidden states {hidden['dtype']} ({hidden['bytes_per_token']} of the bytes/token) and head + "
                  f"embedding tables ({hidden['table_bytes']} bytes once)") if hidden else ""
        print(f"teacher cache written to {out} (k={settings.k}, T={list(settings.temperatures)}, {settings.dtype}; "
              f"{sizes}{states}); train with teacher.cache={out}")
    return 0


main = command("kd-cache", parser, run)


if __name__ == "__main__":
    sys.exit(main())
