"""``kd-eval``: generate on instruction test sets and score ROUGE-L (the DSKD protocol).

    kd-eval --model DIR [--model DIR ...] [--tokenizer DIR] (--test NAME=PATH ... | --test-dir DIR)
            [--seeds 10 20 30 40 50] [--greedy] [--max-new-tokens N] [--batch-size N]
            [--max-examples N] [--out DIR]
    kd-eval --score FILE.jsonl [FILE.jsonl ...]

Errors caused by input (missing files or model directories, malformed lines) are printed as
one message and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

from .console import command
from .errors import KdcoreError


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kd-eval", description="Generate responses on instruction test sets and score ROUGE-L "
        "(mean ± std over seeds, as DSKD reports it), or score an existing predictions file.")
    p.add_argument("--model", action="append", default=[], metavar="DIR",
                   help="model directory, hub id or package:NAME[/SUB]; repeat for one table row per model")
    p.add_argument("--tokenizer", metavar="DIR", help="load the tokenizer from here (default: each model's path)")
    p.add_argument("--gguf-file", metavar="FILE", help="a GGUF file inside --model (dequantised once and cached)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="weights dtype (default float32; CUDA runs under bf16 autocast anyway)")
    p.add_argument("--test", action="append", default=[], metavar="NAME=PATH",
                   help="a test set: NAME=PATH to a JSONL file, NAME=hf:DATASET[:SPLIT] (online), a bare PATH "
                        "(named after the file), or 'kdcore' for this repository's test split; repeatable")
    p.add_argument("--test-dir", metavar="DIR",
                   help="DSKD data layout: dolly/, self-inst/, vicuna/, sinst/11_/, uinst/11_/ valid.jsonl "
                        "(those present; UnNI capped at 10,000)")
    p.add_argument("--seeds", type=int, nargs="+", default=[10, 20, 30, 40, 50], help="sampling seeds (10 20 30 40 50)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--max-new-tokens", type=_positive, default=256, help="response length limit (256)")
    p.add_argument("--max-prompt-length", type=_positive, default=256, help="prompt tokens kept, from the start (256)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=6, help="block repeated n-grams of this size (6; 0 = off)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (1.0)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1.0 = off)")
    p.add_argument("--batch-size", type=_positive, default=8, help="prompts per generate call (8)")
    p.add_argument("--max-examples", type=_positive, help="use only the first N examples of each test set")
    p.add_argument("--out", default="runs/eval", metavar="DIR", help="output directory (runs/eval)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--score", nargs="+", metavar="FILE",
                   help="score existing predictions JSONL files (fields prediction, references) and exit")
    return p


def parse_test(spec: str, max_examples: Optional[int]):
    """``NAME=PATH`` | ``NAME=hf:DATASET[:SPLIT]`` | ``kdcore`` | ``PATH`` -> (name, examples)."""
    from .evaluate import BUILTIN_TEST_SETS, load_test_set

    if spec in BUILTIN_TEST_SETS:
        return spec, load_test_set(spec, max_examples)
    name, sep, source = spec.partition("=")
    if not sep or not name or os.sep in name:
        source, name = spec, Path(spec).stem
    if not source:
        raise KdcoreError(f"--test {spec!r}: expected NAME=PATH")
    return name, load_test_set(source, max_examples)


def collect_tests(args) -> Dict[str, list]:
    from .evaluate import load_dskd_test_dir

    sets: Dict[str, list] = {}
    if args.test_dir:
        sets.update(load_dskd_test_dir(args.test_dir, args.max_examples))
    for spec in args.test:
        name, examples = parse_test(spec, args.max_examples)
        if name in sets:
            raise KdcoreError(f"--test: the test set name '{name}' is given twice")
        sets[name] = examples
    if not sets:
        raise KdcoreError("give test sets with --test NAME=PATH (or --test kdcore) or --test-dir DIR")
    return sets


def settings_from(args):
    from .generate import GenerationSettings

    try:
        return GenerationSettings(do_sample=not args.greedy, top_k=args.top_k, top_p=args.top_p,
                                  temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                  no_repeat_ngram_size=args.no_repeat_ngram_size,
                                  max_prompt_length=args.max_prompt_length, batch_size=args.batch_size)
    except ValueError as exc:
        raise KdcoreError(str(exc)) from None


def score(paths: List[str]) -> int:
    from .evaluate import score_file

    for path in paths:
        result = score_file(path)
        print(f"{path}: ROUGE-L {result['rougeL']:.2f} ({result['n']} examples)")
    return 0


def run(args) -> int:
    if args.score:
        return score(args.score)
    if not args.model:
        raise KdcoreError("--model DIR is required (or --score FILE)")
    from .evaluate import evaluate_model, load_model_and_tokenizer, results_table, safe_label, write_results

    settings = settings_from(args)
    tests = collect_tests(args)
    out = Path(args.out)
    sizes = ", ".join(f"{k} ({len(v)})" for k, v in tests.items())
    print(f"kd-eval: {len(args.model)} model(s) x test sets {sizes} x seeds {args.seeds}", file=sys.stderr)
    rows, labels = [], set()
    for model_path in args.model:
        model_cfg = {"dtype": args.dtype, "gguf_file": args.gguf_file}
        model, tokenizer = load_model_and_tokenizer(model_path, args.tokenizer, **model_cfg)
        if len(args.model) == 1:
            pred_dir = out / "predictions"
        else:
            label = safe_label(model_path)
            while label in labels:
                label += "_"
            labels.add(label)
            pred_dir = out / label / "predictions"
        rows.append(evaluate_model(model, tokenizer, tests, args.seeds, settings, pred_dir, model_path,
                                   progress=not args.no_progress))
        del model
        write_results(rows, out, settings, args.seeds)  # after each model, so a crash keeps finished rows
    print(results_table(rows), end="")
    print(f"kd-eval: wrote {out / 'results.md'}, {out / 'results.json'} and predictions", file=sys.stderr)
    return 0


main = command("kd-eval", parser, run)


if __name__ == "__main__":
    sys.exit(main())
