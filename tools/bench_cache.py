#!/usr/bin/env python
"""Measure cached teachers: cache size per token for several k, and a training run with the cached
teacher against the same run with the online teacher.

    python tools/bench_cache.py CONFIG [--ks 8 64 256] [--train-k 64] [--out runs/bench-cache]
        [key.sub=value ...]          # overrides for every run (e.g. train.max_steps=20)

For each k: ``kd-cache --config CONFIG --k K`` (wall time, bytes/token from the manifest). Then
``kd-train`` twice with the same overrides, online and with ``teacher.cache=<k = --train-k cache>``,
each under ``/usr/bin/time -v`` (peak resident set of the process, model loading included); from
``metrics.jsonl``: the median step time (``tokens / tokens_per_s`` of every step but the first),
and the last evaluation's CE and KD term. Prints a Markdown table (and writes bench.json).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path


def timed(cmd, log: Path):
    """Run ``cmd`` under /usr/bin/time -v; (wall seconds, peak RSS MiB)."""
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    text = log.read_text()
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 1024
    return wall, rss


def run_metrics(out: Path):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["tokens"] / r["tokens_per_s"] for r in records if r["split"] == "train" and r["step"] > 1]
    last_eval = [r for r in records if r["split"] == "eval"][-1]
    teacher = [r.get("time/teacher_forward", 0.0) for r in records if r["split"] == "train" and r["step"] > 1]
    return {"step_s": statistics.median(steps), "teacher_forward_s": statistics.median(teacher),
            "eval_ce": last_eval["ce"], "eval_kd": last_eval.get("kd_student"), "steps": last_eval["step"]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--ks", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--train-k", type=int, default=64)
    p.add_argument("--out", default="runs/bench-cache")
    args = p.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    result = {"caches": {}, "runs": {}}
    for k in args.ks:
        cache = root / f"cache-k{k}"
        wall, rss = timed(["kd-cache", "--config", args.config, "--out", str(cache), "--k", str(k), *args.overrides],
                          root / f"cache-k{k}.log")
        manifest = json.loads((cache / "manifest.json").read_text())
        train = manifest["splits"]["train"]
        result["caches"][k] = {"build_s": wall, "rss_mib": rss, "bytes_per_token": train["bytes_per_token"],
                               "tokens": train["tokens"], "bytes": train["bytes"]}
    cached = root / f"cache-k{args.train_k}"
    for name, extra in (("online", []), (f"cached k={args.train_k}", [f"teacher.cache={cached}"])):
        out = root / ("run-online" if name == "online" else f"run-cached-k{args.train_k}")
        wall, rss = timed(["kd-train", "--config", args.config, *args.overrides, *extra, f"run.output_dir={out}"],
                          root / f"{out.name}.log")
        result["runs"][name] = {"wall_s": wall, "rss_mib": rss, **run_metrics(out)}
    (root / "bench.json").write_text(json.dumps(result, indent=2))
    print("| k | bytes/token | train tokens | cache size (train) | build time |\n|---|---|---|---|---|")
    for k, c in result["caches"].items():
        print(f"| {k} | {c['bytes_per_token']:.1f} | {c['tokens']} | {c['bytes'] / 2**20:.2f} MiB | {c['build_s']:.0f} s |")
    print("\n| teacher | median step | of which teacher forward | peak RSS | wall (whole run) | eval CE | eval KD |\n"
          "|---|---|---|---|---|---|---|")
    for name, r in result["runs"].items():
        kd = f"{r['eval_kd']:.4f}" if r["eval_kd"] is not None else "-"
        print(f"| {name} | {r['step_s']:.2f} s | {r['teacher_forward_s']:.2f} s | {r['rss_mib']:.0f} MiB | "
              f"{r['wall_s']:.0f} s | {r['eval_ce']:.4f} | {kd} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
