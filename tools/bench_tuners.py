#!/usr/bin/env python
"""Peak memory and step time of the student tuners full / LoRA / S2FT at comparable trainable
parameter counts, one ``tools/bench_train.py`` process per tuner (so each peak is its own).

    python tools/bench_tuners.py [CONFIG] [--steps 3] [--warmup 1] [--seq-len 256]
        [--micro-batch-size 4] [--device cpu|cuda] [-- extra bench_train.py arguments]

CONFIG defaults to configs/quickstart.yaml (its 8-layer SmolLM2 student). The tuners:
``full``; ``lora`` r=16 on q_proj/v_proj; ``s2ft`` down channels only (the GQA default) with a
ratio chosen to match LoRA's count. Prints one row per tuner (trainable params, s/step, peak
memory: CUDA max_memory_allocated, CPU peak RSS) as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TUNERS = {
    "full": "student.tuner=full",
    "lora": "student.tuner={name: lora, r: 16, alpha: 32, dropout: 0.0, target_modules: [q_proj, v_proj]}",
    "s2ft": "student.tuner={name: s2ft, down: 0.035}",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="configs/quickstart.yaml")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tuners", default="full,lora,s2ft")
    ap.add_argument("extra", nargs="*")
    args = ap.parse_args(argv)
    rows = []
    for name in args.tuners.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "row.json"
            cmd = [sys.executable, str(HERE / "bench_train.py"), args.config, TUNERS[name], "objective.kd_weight=0.5",
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--seq-len", str(args.seq_len),
                   "--prompt-len", str(args.seq_len // 2), "--micro-batch-size", str(args.micro_batch_size),
                   "--device", args.device, "--json", str(out), *args.extra]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                return proc.returncode
            row = json.loads(out.read_text())
        row["tuner"] = name
        rows.append(row)
        print(json.dumps(row), flush=True)
    keys = ["s/step", "tokens/s", "peak MiB"]
    print("| tuner | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for r in rows:
        print(f"| {r['tuner']} | {r['step_s']:.3f} | {r['tokens_per_s']:.1f} | {r['peak_mib']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
