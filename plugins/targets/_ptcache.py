"""The on-disk cache of teacher pseudo-targets: seeded, resumable blocks in one JSONL file.

Layout of ``<cache_dir>/pt-<hash>.jsonl``: line 1 is a header ``{"kdcore_pt_cache": 1, "key":
{...}}`` holding everything the PTs depend on (teacher identity and tokenizer, decoding, the
generation settings, seed, block size, a hash of the prompts); every further line is one prompt's
``{"i": index, "targets": [K strings]}`` in prompt order. ``<hash>`` is a hash of the key, so a
changed teacher, decoding or data config names another file and is generated afresh (the old
file is left in place); a file whose header does not match the key it is opened with (copied or
renamed by hand) is refused with a :class:`ConfigError`.

Prompts are generated in blocks of ``block_size``; block ``b`` is seeded with ``seed + b`` and
appended in one write, flushed and fsynced, as soon as it is done. An interrupted generation
(a killed process may leave a partly written last line, or a block cut short) is resumed: the
file is cut back to its last whole block and generation continues with the next one, so the
result is exactly that of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from kdcore.errors import ConfigError, DataError

FORMAT = 1


def key_hash(key: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prompts_hash(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()


def _header(key: Dict[str, Any]) -> str:
    return json.dumps({"kdcore_pt_cache": FORMAT, "key": key}, sort_keys=True, default=str) + "\n"


class PTCache:
    """The PT file of one key (see the module docstring); ``k`` targets per prompt."""

    def __init__(self, directory, key: Dict[str, Any], k: int, block_size: int):
        self.key, self.k, self.block_size = json.loads(json.dumps(key, sort_keys=True, default=str)), k, block_size
        self.path = Path(directory) / f"pt-{key_hash(self.key)}.jsonl"

    def _whole_rows(self, n_prompts: int) -> List[List[str]]:
        """The rows of the whole blocks on disk (the file is cut back to them when it holds more)."""
        if not self.path.is_file():
            return []
        with self.path.open("rb") as fh:
            raw = fh.read().decode("utf-8", errors="replace").split("\n")
        try:
            header = json.loads(raw[0])
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("kdcore_pt_cache") != FORMAT or header.get("key") != self.key:
            found = header.get("key") if isinstance(header, dict) and isinstance(header.get("key"), dict) else {}
            differ = sorted(k for k in set(found) | set(self.key) if found.get(k) != self.key.get(k))
            raise ConfigError(f"{self.path}: a pseudo-target cache written for another configuration"
                              f"{' (differs in: ' + ', '.join(differ) + ')' if differ else ''}; "
                              "delete the file or choose another targets.cache_dir")
        rows: List[List[str]] = []
        for line in raw[1:-1]:  # raw[-1] is what follows the last newline: '' or a partly written line
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            if rec.get("i") != len(rows) or len(rec.get("targets", [])) != self.k:
                break
            rows.append(list(rec["targets"]))
        whole = len(rows) if len(rows) >= n_prompts else (len(rows) // self.block_size) * self.block_size
        rows = rows[:min(whole, n_prompts)]
        if len(raw) - 2 != len(rows) or raw[-1]:  # anything beyond the whole blocks: cut it (atomically)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(_header(self.key) + "".join(self._line(i, r) for i, r in enumerate(rows)), encoding="utf-8")
            os.replace(tmp, self.path)
        return rows

    @staticmethod
    def _line(i: int, targets: List[str]) -> str:
        return json.dumps({"i": i, "targets": targets}) + "\n"

    def fill(self, prompts: Sequence[str], generate_block: Callable[[int, List[str]], List[List[str]]]) -> int:
        """Generate the blocks not on disk yet (``generate_block(b, prompts of block b)`` returns K
        targets per prompt) and append each as soon as it is done. Returns the blocks generated."""
        done = len(self._whole_rows(len(prompts)))
        if done >= len(prompts):
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if done == 0:
            self.path.write_text(_header(self.key), encoding="utf-8")
        first, stop = done // self.block_size, -(-len(prompts) // self.block_size)
        for b in range(first, stop):
            lo = b * self.block_size
            chunk = list(prompts[lo:lo + self.block_size])
            outputs = generate_block(b, chunk)
            if len(outputs) != len(chunk) or any(len(o) != self.k for o in outputs):
                raise DataError(f"{self.path}: block {b} produced {len(outputs)} rows for {len(chunk)} prompts")
            with self.path.open("a", encoding="utf-8") as fh:  # one write per block: whole blocks survive a kill
                fh.write("".join(self._line(lo + j, o) for j, o in enumerate(outputs)))
                fh.flush()
                os.fsync(fh.fileno())
        return stop - first

    def read(self, n_prompts: int) -> List[List[str]]:
        """All ``n_prompts`` rows; a cache that is not complete is a :class:`DataError`."""
        rows = self._whole_rows(n_prompts)
        if len(rows) != n_prompts:
            raise DataError(f"{self.path}: holds pseudo-targets for {len(rows)} of {n_prompts} prompts; "
                            "run again to finish generating them")
        return rows
