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
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    examples = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            examples.append(record_to_example(record, f"{path}:{lineno}"))
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples
