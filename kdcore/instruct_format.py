"""The instruction-record format: the Alpaca prompt template and the JSONL reader shared by
the ``instruction`` task and ``kd-eval``'s test sets.

A record holds ``instruction``, ``input`` (may be empty) and ``output`` (a string, or a list of
references as in S-NI/UnNI); raw Dolly's ``context``/``response`` names are accepted too, and a
ready ``prompt`` field is used as is (MiniLLM's processed files, ``<n>`` read as a newline).
The prompt template is the one DSKD and MiniLLM use (docs/methods.md, "Sequence construction").
Malformed input raises :class:`~kdcore.errors.DataError` naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from .errors import DataError
from .task import Example

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca-style prompt used by DSKD and MiniLLM."""
    if input_text and input_text.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def record_to_example(record: Dict, where: str) -> Example:
    """One JSON record -> :class:`Example`; raises :class:`DataError` naming ``where``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    output = record.get("output", record.get("response"))
    if isinstance(output, str):
        references = [output]
    elif isinstance(output, list) and output and all(isinstance(o, str) for o in output):
        references = list(output)
    else:
        raise DataError(f"{where}: needs an 'output' (or 'response') string or non-empty list of strings")
    if isinstance(record.get("prompt"), str):
        prompt = record["prompt"].replace("<n>", "\n")
    elif isinstance(record.get("instruction"), str):
        context = record.get("input", record.get("context", "")) or ""
        if not isinstance(context, str):
            raise DataError(f"{where}: 'input' must be a string")
        prompt = format_prompt(record["instruction"], context)
    else:
        raise DataError(f"{where}: needs an 'instruction' (or a formatted 'prompt') string")
    return Example(prompt=prompt, response=references[0], references=references)


def read_jsonl(path: Path, limit: Optional[int] = None) -> List[Example]:
    """The examples of a JSONL file (at most ``limit``). UTF-8, with or without a byte-order
    mark; a line that is not UTF-8, not JSON (or nested or sized beyond what JSON parsing
    allows) or not a record is a :class:`DataError` naming the file and line."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    examples = []
    try:
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                line = _decode_line(raw, lineno == 1, f"{path}:{lineno}")
                if not line.strip():
                    continue
                examples.append(record_to_example(_parse_line(line, f"{path}:{lineno}"), f"{path}:{lineno}"))
                if limit is not None and len(examples) >= limit:
                    break
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def _decode_line(raw: bytes, first: bool, where: str) -> str:
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})") from None


def _parse_line(line: str, where: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply") from None
    except ValueError as exc:  # an integer literal beyond Python's digit limit
        raise DataError(f"{where}: JSON value cannot be read ({str(exc).splitlines()[0]})") from None
