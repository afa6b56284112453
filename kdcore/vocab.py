"""Vocabulary utilities shared by cross-tokenizer components (MinED, pseudo-inverse init).

Tokenizers mark a word boundary differently: ``Ġ`` (byte-level BPE: GPT-2, Qwen2, Llama-3,
SmolLM2) or ``▁`` (SentencePiece: Llama-2, Mistral, Gemma). Strings are compared after mapping
one marker onto the other.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import torch

MARKERS = ("Ġ", "▁")


def token_strings(tokenizer) -> List[str]:
    """The token string of every id ``0 .. len(tokenizer) - 1`` (``""`` for holes)."""
    vocab = tokenizer.get_vocab()
    out = [""] * max(len(tokenizer), max(vocab.values(), default=-1) + 1)
    for token, idx in vocab.items():
        out[idx] = token
    return out


def boundary_marker(strings: List[str]) -> str:
    """The word-boundary marker a vocabulary uses most (``Ġ`` or ``▁``)."""
    counts = {m: sum(s.startswith(m) for s in strings) for m in MARKERS}
    return max(counts, key=counts.get)


def vocab_key(*tokenizers) -> str:
    """A stable hash of one or more vocabularies, for on-disk caches."""
    h = hashlib.sha1()
    for tok in tokenizers:
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    return h.hexdigest()[:16]


def exact_overlap(student_tokenizer, teacher_tokenizer) -> Tuple[torch.Tensor, torch.Tensor]:
    """Id pairs ``(student_ids, teacher_ids)`` whose token strings match after marker mapping."""
    s_str, t_str = token_strings(student_tokenizer), token_strings(teacher_tokenizer)
    s_marker, t_marker = boundary_marker(s_str), boundary_marker(t_str)
    s_index = {s: i for i, s in enumerate(s_str) if s}
    pairs = [(s_index[t.replace(t_marker, s_marker)], j) for j, t in enumerate(t_str)
             if t and t.replace(t_marker, s_marker) in s_index]
    if not pairs:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    s_ids, t_ids = zip(*pairs)
    return torch.tensor(s_ids), torch.tensor(t_ids)


def min_edit_distance_map(source_tokenizer, target_tokenizer, cache_dir: Path | None = None,
                          block: int = 512) -> List[int]:
    """For every source token id, the target id with the same string after marker mapping, else
    the target token at minimum Levenshtein distance — FuseLLM's vocabulary mapping. Computed once
    per tokenizer pair and cached as JSON.

    Ties are broken towards the lowest target id, in both cases: when two target ids share a
    string (holes of ``token_strings`` aside, only added tokens can), the first one is the exact
    match; among targets at the same minimum distance, the first one (``argmin``) wins. FuseLLM's
    own script may break distance ties differently; :func:`load_vocab_map` reads a map computed
    elsewhere (DSKD's ``tea2stu_id_mapping.json``) to reproduce it exactly.
    """
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"mined-{vocab_key(source_tokenizer)}-to-{vocab_key(target_tokenizer)}.json"
        if cache_file.is_file():
            return json.loads(cache_file.read_text())
    src, tgt = token_strings(source_tokenizer), token_strings(target_tokenizer)
    src_marker, tgt_marker = boundary_marker(src), boundary_marker(tgt)
    tgt_index: Dict[str, int] = {}
    for i, s in enumerate(tgt):
        if s:
            tgt_index.setdefault(s, i)
    mapping = [-1] * len(src)
    missing = []
    for i, s in enumerate(src):
        j = tgt_index.get(s.replace(src_marker, tgt_marker))
        if j is not None:
            mapping[i] = j
        else:
            missing.append(i)
    choices = [s if s else "\0" for s in tgt]
    for start in range(0, len(missing), block):
        ids = missing[start:start + block]
        queries = [src[i].replace(src_marker, tgt_marker) for i in ids]
        dist = process.cdist(queries, choices, scorer=Levenshtein.distance, workers=-1)
        for i, j in zip(ids, dist.argmin(axis=1).tolist()):  # argmin: first minimum
            mapping[i] = int(j)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(mapping, fh)
        os.replace(tmp, cache_file)
    return mapping


def load_vocab_map(path, source_size: int, target_size: int) -> List[int]:
    """A precomputed source -> target id map: a JSON list (index = source id) or object
    (``{"source_id": target_id}``, DSKD's ``tea2stu_id_mapping.json``), ids in
    ``[0, source_size)`` and ``[0, target_size)``. Source ids it leaves out map to -1 (unmapped:
    they give no logit). Bad content is a :class:`~kdcore.errors.DataError` naming the file."""
    from .errors import DataError

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DataError(f"vocabulary map file not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DataError(f"{path}: not a readable JSON vocabulary map ({type(exc).__name__})") from None
    if isinstance(data, list):
        data = dict(enumerate(data))
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object {{source_id: target_id}} or a list, got {type(data).__name__}")
    mapping = [-1] * source_size
    for key, value in data.items():
        try:
            src = int(key)
        except (TypeError, ValueError):
            raise DataError(f"{path}: key {key!r} is not a token id") from None
        if not 0 <= src < source_size:
            raise DataError(f"{path}: source id {src} is outside the teacher vocabulary [0, {source_size})")
        if type(value) is not int or not 0 <= value < target_size:
            raise DataError(f"{path}: source id {src} maps to {value!r}, not a student id in [0, {target_size})")
        mapping[src] = value
    return mapping


def pinv_projection(src_head: torch.Tensor, dst_head: torch.Tensor) -> torch.Tensor:
    """``P = pinv(dst_head) @ src_head`` so that ``dst_head @ (P h) ≈ src_head @ h``.

    src_head[K, D_src], dst_head[K, D_dst] are the two heads restricted to the same K tokens;
    the result [D_dst, D_src] is the weight of a Linear(D_src -> D_dst) that preserves logits
    (DSKDv2's initialisation).
    """
    return torch.linalg.pinv(dst_head.double()) @ src_head.double()
