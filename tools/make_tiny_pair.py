#!/usr/bin/env python
"""Build a tiny teacher/student pair with two different tokenizers, offline, in seconds.

    python tools/make_tiny_pair.py OUT_DIR [--data data/kdcore-instruct]

OUT_DIR/teacher       GPT-2 layout, byte-level BPE (1,024 tokens, trained on the committed text)
OUT_DIR/student       Llama layout, SentencePiece BPE (800 tokens)
OUT_DIR/student_same  Llama layout with the teacher's tokenizer (for same-tokenizer methods)

The configs under configs/tiny/ read the pair from runs/tiny-pair (the default OUT_DIR there).
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", nargs="?", default=str(REPO / "runs" / "tiny-pair"))
    p.add_argument("--data", default=str(REPO / "data" / "kdcore-instruct"), help="directory of JSONL text to train tokenizers on")
    args = p.parse_args(argv)
    from kdcore.tiny import make_tiny_pair

    start = time.perf_counter()
    paths = make_tiny_pair(args.out_dir, args.data)
    for name, path in paths.items():
        print(f"{name:13s} {path}")
    print(f"built in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
