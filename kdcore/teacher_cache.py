"""Cached teachers: run the teacher once (``kd-cache``), distil from its stored top-k many times.

What is stored, per teacher response token (labels != -100 of the teacher's own encoding):

    ids[k]        int32     the teacher's top-k token ids, most probable first
    logp[k]       dtype     ℓ_v = log softmax(z)_v at T = 1 for those ids (float16 by default)
    lse[n_T]      float32   λ_T = logsumexp_v(ℓ_v / T) over the whole vocabulary, per cached T
    tail[n_T]     float32   τ_T = log Σ_{v ∉ top-k} softmax(z / T)_v (the rest of the mass; −inf when k = V)

so that at any cached temperature ``log p_T,v = ℓ_v / T − λ_T`` for the top-k ids and the rest
of the distribution is one bucket of log-mass ``τ_T`` (it stays normalised). The top-k set is
the same at every temperature (softmax is monotone). Files: ``manifest.json`` (teacher identity,
tokenizer fingerprint, per-split data hashes, k, temperatures, dtype), ``tokenizer/`` and
``teacher_config/`` (so a run needs neither the teacher weights nor its directory), and
``<split>-<i>.safetensors`` shards of ``shard_size`` examples, each also holding
``keys[n, 16]`` (a 128-bit hash of the example's teacher ``input_ids + labels``) and
``offsets[n + 1]`` (its rows). A run finds a sequence's rows by that content hash, so the
batch order, ``max_examples`` and the number of ranks do not matter, and a sequence the cache
does not hold is a mismatch detected before training.

Sparse KD on the cache (:class:`CachedTopK`), for a criterion ``D`` of the tempered-divergence
family (``divergence(log_p_s, log_p_t)`` on log-probabilities): both distributions are reduced
to the same ``k + 1`` buckets, the teacher's top-k ids (singletons) and "everything else",

    b_s = [log p_s,T(ids), log Σ_{v ∉ ids} p_s,T,v]      b_t = [log p_t,T(ids), τ_T]     (renormalised)
    KD = D(b_s, b_t)

and the student gradient flows through ``log_softmax(z_s / T)`` over the whole student
vocabulary. With k = V the tail bucket is empty on both sides (−inf, dropped by the criteria's
masks) and ``KD`` equals the online value exactly (tests/test_cache.py proves values and
gradients). For k < V it is the divergence of the two coarse-grained distributions (for the
f-divergences a lower bound of the full one, by the data-processing inequality). The ``uld``
criterion compares sorted probabilities instead: ``Σ_{i<k} |sort↓(p_s)_i − p_t,(i)| +
|rest_s − exp(τ_T)|``, exact at k = V_t.

Aligners: ``identity`` (rows are the response positions), ``uld`` (positional pairing), ``mined``
(teacher ids mapped to the student ids through the aligner's vocabulary map, ids without a
student image dropped and the bucket distribution renormalised, the tail assumed mapped;
unaligned positions get the one-hot gold target, as online).

Hidden states (DSKD projectors ``student_space``/``teacher_space``/``dual`` and the ``cma``
aligner, the components with ``uses_teacher_states``): kd-cache then also stores, per response
token, ``hidden[D]`` (the teacher's last hidden state, bfloat16 by default or float32), and once
per cache ``teacher_tables.safetensors`` with the input embeddings ``embed_tokens.weight[V_t, D]``
and the head ``lm_head.weight[V_t, D]`` (omitted when tied to the embeddings) and bias, in the
teacher's dtype. A run rebuilds the
teacher's :class:`~kdcore.kdspace.ModelSide` from them (hidden ``[B, L_t, D]`` with zeros outside
the response, which no space reads: identity takes response rows, CMA's attention gives them
weight exp(−1e5) = 0 and its ``norm: response`` std covers response rows only) and runs the
projector's own spaces, with :class:`CachedTeacher` (head + embeddings) standing in for the
teacher model in ``prepare``. fp32 storage reproduces the online terms and gradients.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .criterion import Criterion, TemperedDivergence
from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMAT, VERSION = "kdcore-teacher-cache", 1
MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# ModelConfig fields that name the teacher's weights (not how it is run)
IDENTITY_FIELDS = ("path", "gguf_file", "revision", "dtype", "keep_layers", "adapter")
SUPPORTED_ALIGNERS = ("identity", "mined", "uld")
SHARD_CACHE = 16  # shards kept in memory at once by a reader (least recently used evicted)
TABLES = "teacher_tables.safetensors"  # the teacher head and input embeddings (caches with hidden states)
STATE_ALIGNERS = ("identity", "cma")  # the aligners served with cached hidden states


# -- fingerprints ------------------------------------------------------------------------------

def sequence_key(input_ids: Sequence[int], labels: Sequence[int]) -> bytes:
    """128-bit content hash of one teacher-side encoded example (``input_ids + labels``)."""
    data = np.asarray(list(input_ids) + list(labels), dtype=np.int64).tobytes()
    return hashlib.blake2b(data, digest_size=16).digest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id), the eos and pad ids and the tokenizer class."""
    payload = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()),
                          tokenizer.eos_token_id, tokenizer.pad_token_id])
    return hashlib.sha256(payload.encode()).hexdigest()


def teacher_identity(model_cfg) -> Dict[str, Any]:
    return {f: getattr(model_cfg, f) for f in IDENTITY_FIELDS}


def encode_split(task, split: str, tokenizer) -> List[Dict[str, List[int]]]:
    """The teacher-side encodings of a split's examples (kdcore.data's sequence construction)."""
    from .data import encode_example

    return [encode_example(tokenizer, ex, task.max_length, task.max_prompt_length) for ex in task.examples(split)]


def data_hash(keys: Sequence[bytes]) -> str:
    h = hashlib.sha256()
    for key in keys:
        h.update(key)
    return h.hexdigest()


def read_manifest(directory) -> Dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ConfigError(f"teacher.cache: {directory} holds no {MANIFEST} (build it with: kd-cache --config ...)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"teacher.cache: {path} cannot be read: {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ConfigError(f"teacher.cache: {path} is not a {FORMAT} v{VERSION} manifest")
    return manifest


def model_section(name: str, node: Dict[str, Any]) -> Dict[str, Any]:
    """The ``teacher:`` node with a cache: without ``path``, the teacher identity and tokenizer
    come from the cache's manifest (the teacher need not be on this machine)."""
    if name != "teacher":
        raise ConfigError(f"{name}.cache: only the teacher can be cached (teacher: {{cache: DIR}})")
    node = dict(node)
    if node.get("cache") is None:
        raise ConfigError("teacher.cache_k: needs teacher.cache (a kd-cache directory)")
    if node.get("path") is None:
        manifest = read_manifest(node["cache"])
        for key, value in manifest["teacher"].items():
            node.setdefault(key, value)
        node.setdefault("tokenizer", str(Path(node["cache"]) / "tokenizer"))
    return node


# -- building a cache (kd-cache) ----------------------------------------------------------------

@dataclasses.dataclass
class CacheSettings:
    k: int = 64
    temperatures: Tuple[float, ...] = (1.0,)
    dtype: str = "float16"
    shard_size: int = 256
    splits: Tuple[str, ...] = ("train",)
    batch_size: int = 8
    hidden: Optional[bool] = None  # store hidden states + tables; None: when the config's projector/aligner needs them
    hidden_dtype: str = "bfloat16"


def uses_teacher_states(cfg) -> bool:
    """Whether the config's projector or aligner reads the teacher's hidden states, head or
    embeddings (their ``uses_teacher_states``), i.e. needs a cache built with them."""
    specs = [cfg.components.get(kind) for kind in ("projector", "aligner")]
    return any(getattr(spec.entry.cls, "uses_teacher_states", False) for spec in specs if spec is not None)


def stores_hidden(cfg, settings: CacheSettings) -> bool:
    return uses_teacher_states(cfg) if settings.hidden is None else bool(settings.hidden)


def default_temperatures(cfg) -> Tuple[float, ...]:
    """The temperature of the config's criterion (1.0 when it has none)."""
    criterion = cfg.criterion.build() if cfg.criterion is not None else None
    return (float(getattr(criterion, "temperature", 1.0)),)


def _shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.safetensors"


def _settings_record(cfg, tokenizer, settings: CacheSettings, split_keys: Dict[str, List[bytes]]) -> Dict[str, Any]:
    return {
        "format": FORMAT, "version": VERSION,
        "teacher": teacher_identity(cfg.teacher),
        "tokenizer": {"class": type(tokenizer).__name__, "size": len(tokenizer),
                      "fingerprint": tokenizer_fingerprint(tokenizer)},
        "task": cfg.resolved.get("task"),
        "splits": {s: {"examples": len(keys), "data_hash": data_hash(keys),
                       "shards": -(-len(keys) // settings.shard_size)} for s, keys in split_keys.items()},
        "k": settings.k, "temperatures": [float(t) for t in settings.temperatures], "dtype": settings.dtype,
        "shard_size": settings.shard_size, "precision": cfg.train.precision,
        "hidden": {"dtype": settings.hidden_dtype, "rows": "response", "tables": TABLES}
        if stores_hidden(cfg, settings) else None,
    }


SETTINGS_KEYS = ("teacher", "tokenizer", "splits", "k", "temperatures", "dtype", "shard_size", "precision", "hidden")


def _plan(record: Mapping[str, Any]) -> Dict[str, Any]:
    """The settings that define a build (the counts a finished build adds are left out)."""
    out = {key: record.get(key) for key in SETTINGS_KEYS}
    if out["hidden"]:  # the sizes a finished build adds are not settings
        out["hidden"] = {f: out["hidden"].get(f) for f in ("dtype", "rows", "tables")}
    out["splits"] = {s: {f: v.get(f) for f in ("examples", "data_hash", "shards")}
                     for s, v in (record.get("splits") or {}).items()}
    return out


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    old, new = _plan(old), _plan(new)
    return [f"{key}: cache has {json.dumps(old[key])}, now {json.dumps(new[key])}"
            for key in SETTINGS_KEYS if old[key] != new[key]]


def teacher_top_k(model, side: Dict[str, torch.Tensor], k: int, temperatures: Sequence[float], chunk_rows: int,
                  autocast=None, hidden_dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """The cached quantities (module docstring) of every response row of a collated batch,
    rows in row-major order: ``ids[R, k]``, ``logp[R, k]`` (float32), ``lse[R, n_T]``, ``tail[R, n_T]``,
    and with ``hidden_dtype`` the last hidden states ``hidden[R, D]`` in that dtype."""
    from .distill import last_hidden
    from .kdspace import Head

    device = next(model.parameters()).device
    side = {name: t.to(device) for name, t in side.items()}
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        hidden = last_hidden(model, side)[side["labels"].ne(-100)]
        head = Head.of(model)
        parts: Dict[str, List[torch.Tensor]] = {"ids": [], "logp": [], "lse": [], "tail": []}
        if hidden_dtype is not None:
            parts["hidden"] = [hidden.to(hidden_dtype).cpu()]
        for start in range(0, hidden.shape[0], chunk_rows):
            logp1 = torch.log_softmax(head(hidden[start:start + chunk_rows]).float(), dim=-1)
            values, ids = logp1.topk(min(k, logp1.shape[-1]), dim=-1)
            lse, tail = [], []
            for t in temperatures:
                scaled = logp1 / t
                lse_t = torch.logsumexp(scaled, dim=-1)
                rest = (scaled - lse_t[:, None]).scatter_(1, ids, float("-inf"))
                lse.append(lse_t)
                tail.append(torch.logsumexp(rest, dim=-1))
            parts["ids"].append(ids.int().cpu())
            parts["logp"].append(values.cpu())
            parts["lse"].append(torch.stack(lse, -1).cpu())
            parts["tail"].append(torch.stack(tail, -1).cpu())
    return {name: torch.cat(ts) if ts else torch.empty(0) for name, ts in parts.items()}


def build_cache(cfg, out, settings: CacheSettings, dist=None, overwrite: bool = False, stop_after: Optional[int] = None) -> Path:
    """Run the teacher of ``cfg`` over ``settings.splits`` and write the cache to ``out``.

    Resumable: a shard is written to a temporary file and renamed, so an existing shard file is
    complete and is skipped when the build runs again with the same settings (other settings
    are refused unless ``overwrite``). Under torchrun rank ``r`` computes the shards ``i`` with
    ``i % world_size == r``; rank 0 writes the manifest. ``stop_after``: compute at most that
    many shards, then stop with the cache incomplete (tests of resumption).
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .assemble import build_kinds
    from .data import collate_side, pad_id
    from .distributed import DistInfo, autocast_dtype, barrier
    from .kdspace import auto_chunk_rows
    from .models import freeze, load_model, load_tokenizer

    dist = dist or DistInfo()
    if cfg.objective.kd_weight <= 0:  # (a teacher loaded only to generate pseudo-targets is no KD teacher)
        raise ConfigError("kd-cache: the config uses no teacher (objective.kd_weight is 0)")
    if settings.dtype not in DTYPES:
        raise ConfigError(f"kd-cache: dtype must be one of {', '.join(DTYPES)}, got {settings.dtype!r}")
    if settings.hidden_dtype not in ("bfloat16", "float32"):
        raise ConfigError("kd-cache: the hidden-state dtype must be bfloat16 or float32, "
                          f"got {settings.hidden_dtype!r}")
    if settings.k < 1 or settings.shard_size < 1 or settings.batch_size < 1 or not settings.temperatures \
            or any(t <= 0 for t in settings.temperatures):
        raise ConfigError("kd-cache: k, shard size and batch size must be >= 1 and temperatures > 0")
    out = Path(out)
    task = build_kinds(cfg.components, {"seed": cfg.run.seed}, only=("task",))["task"]
    task.check()
    teacher_cfg = dataclasses.replace(cfg.teacher, cache=None, cache_k=None)
    tokenizer = load_tokenizer(teacher_cfg)
    encoded = {s: encode_split(task, s, tokenizer) for s in settings.splits}
    keys = {s: [sequence_key(e["input_ids"], e["labels"]) for e in encs] for s, encs in encoded.items()}
    record = _settings_record(cfg, tokenizer, settings, keys)
    path = out / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        diffs = _differences(old, record)
        if diffs and not overwrite:
            raise ConfigError(f"kd-cache: {out} holds a cache built with other settings ({'; '.join(diffs)}); "
                              "pass --overwrite to rebuild it or choose another --out")
        if diffs and dist.is_main:
            shutil.rmtree(out)
    barrier(dist)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(out / "tokenizer")
        path.write_text(json.dumps({**record, "complete": False}, indent=2))
    barrier(dist)
    jobs = [(s, i) for s in settings.splits for i in range(record["splits"][s]["shards"])]
    mine = [job for n, job in enumerate(jobs) if n % dist.world_size == dist.rank]
    todo = [job for job in mine if not (out / _shard_name(*job)).is_file()]
    if stop_after is not None:
        todo = todo[:stop_after]
    tables_missing = dist.is_main and record["hidden"] and not (out / TABLES).is_file()
    if todo or tables_missing:
        model = load_model(teacher_cfg).to(dist.device)
        freeze(model)
        if dist.is_main:
            model.config.save_pretrained(out / "teacher_config")
            if record["hidden"]:
                _save_tables(model, out / TABLES)
        hidden_dtype = DTYPES[settings.hidden_dtype] if record["hidden"] else None
        amp, pad = autocast_dtype(cfg.train.precision, dist.device), pad_id(tokenizer)
        vocab = model.get_output_embeddings().weight.shape[0]
        chunk = auto_chunk_rows(vocab)
        total = sum(len(encoded[s][i * settings.shard_size:(i + 1) * settings.shard_size]) for s, i in todo)
        with tqdm(total=total, desc=f"kd-cache rank {dist.rank}" if dist.enabled else "kd-cache", unit="seq",
                  disable=not dist.is_main, dynamic_ncols=True) as bar:
            for split, index in todo:
                lo, hi = index * settings.shard_size, (index + 1) * settings.shard_size
                encs, shard_keys = encoded[split][lo:hi], keys[split][lo:hi]
                parts = []
                for b in range(0, len(encs), settings.batch_size):
                    batch = encs[b:b + settings.batch_size]
                    parts.append(teacher_top_k(model, collate_side(batch, pad), settings.k, settings.temperatures,
                                               chunk, amp, hidden_dtype))
                    bar.update(len(batch))
                rows = [sum(1 for y in e["labels"] if y != -100) for e in encs]
                tensors = {name: torch.cat([p[name] for p in parts]).contiguous() for name in parts[0]}
                tensors["logp"] = tensors["logp"].to(DTYPES[settings.dtype])
                if vocab <= 2**16:  # ids as the bits of a uint16 (read back by :func:`_ids`): 2 bytes instead of 4
                    tensors["ids"] = tensors["ids"].to(torch.int16)
                tensors["keys"] = torch.tensor(np.frombuffer(b"".join(shard_keys), dtype=np.uint8).reshape(-1, 16))
                tensors["offsets"] = torch.tensor(np.concatenate([[0], np.cumsum(rows)]), dtype=torch.int64)
                if int(tensors["offsets"][-1]) != tensors["ids"].shape[0]:
                    raise DataError(f"kd-cache: shard {split}/{index}: {tensors['ids'].shape[0]} rows for "
                                    f"{int(tensors['offsets'][-1])} response tokens")
                target = out / _shard_name(split, index)
                tmp = target.with_name(f".tmp-{dist.rank}-{target.name}")
                save_file(tensors, str(tmp), metadata={"split": split, "first_example": str(lo)})
                os.replace(tmp, target)
    barrier(dist)
    missing = [_shard_name(*job) for job in jobs if not (out / _shard_name(*job)).is_file()]
    if dist.is_main and not missing:
        _finish_manifest(out, record)
    barrier(dist)
    return out


def _save_tables(model, target: Path) -> None:
    """The teacher's output head (weight, bias) and input embedding table, once per cache, in
    the dtype the teacher runs in (the online teacher's own tensors, so heads match bit for bit)."""
    from safetensors.torch import save_file

    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tensors = {"embed_tokens.weight": embed.weight}
    if head.weight.data_ptr() != embed.weight.data_ptr():  # a tied head is stored once (the reader reuses it)
        tensors["lm_head.weight"] = head.weight
    if getattr(head, "bias", None) is not None:
        tensors["lm_head.bias"] = head.bias
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    tmp = target.with_name(f".tmp-{target.name}")
    save_file(tensors, str(tmp))
    os.replace(tmp, target)


def _finish_manifest(out: Path, record: Dict[str, Any]) -> None:
    """Token counts and sizes per split, ``complete: true``."""
    from safetensors import safe_open

    if record["hidden"]:
        if not (out / TABLES).is_file():
            raise DataError(f"kd-cache: {out / TABLES} is missing (rank 0 writes it when it loads the teacher); "
                            "run kd-cache again")
        with safe_open(str(out / _shard_name(next(iter(record["splits"])), 0)), framework="pt") as f:
            size = f.get_slice("hidden").get_shape()[1]
        with safe_open(str(out / TABLES), framework="pt") as f:
            shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
        record["hidden"].update(size=size, bytes_per_token=size * DTYPES[record["hidden"]["dtype"]].itemsize,
                                table_shapes=shapes, table_bytes=(out / TABLES).stat().st_size)

    for split, info in record["splits"].items():
        tokens = size = 0
        for i in range(info["shards"]):
            shard = out / _shard_name(split, i)
            size += shard.stat().st_size
            with safe_open(str(shard), framework="pt") as f:
                tokens += f.get_slice("ids").get_shape()[0]
        info.update(tokens=tokens, bytes=size, bytes_per_token=round(size / max(tokens, 1), 2))
        with safe_open(str(out / _shard_name(split, 0)), framework="pt") as f:
            stored_k = f.get_slice("ids").get_shape()[1]  # min(k, V)
    (out / MANIFEST).write_text(json.dumps({**record, "stored_k": stored_k, "complete": True}, indent=2))


# -- reading a cache ---------------------------------------------------------------------------

def _ids(stored: torch.Tensor) -> torch.Tensor:
    """Stored ids as int64 (int16 storage holds the bits of a uint16)."""
    return stored.long() & 0xFFFF if stored.dtype == torch.int16 else stored.long()


class PackedHead:
    """The teacher "head" of a cached space: the identity on packed rows (no parameters, no FLOPs)."""

    weight = bias = None
    scale, softcap, detach, hidden_size = 1.0, None, True, 0

    def __init__(self, width: int):
        self.vocab_size = width

    def detached(self) -> "PackedHead":
        return self

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def _masked_logsumexp(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``log Σ_{keep} exp(x)`` per row, −inf (with a zero, not NaN, gradient) where nothing is kept."""
    any_kept = keep.any(-1)
    safe = torch.where(keep, x, torch.full((), float("-inf"), dtype=x.dtype, device=x.device))
    safe = torch.where(any_kept[:, None], safe, torch.zeros((), dtype=x.dtype, device=x.device))
    return torch.where(any_kept, torch.logsumexp(safe, -1), torch.full((), float("-inf"), dtype=x.dtype, device=x.device))


def unpack(packed: torch.Tensor):
    """``packed[n, 2k + 1]`` -> (ids[n, k] long, log p_t[n, k], tail[n]) float32; −inf log p marks a dropped slot."""
    k = (packed.shape[-1] - 1) // 2
    return packed[:, :k].long(), packed[:, k:2 * k].float(), packed[:, 2 * k].float()


class CachedTopK(Criterion):
    """A tempered-divergence criterion evaluated against cached top-k teacher rows (module docstring).

    ``per_token(student_logits[n, V_s], packed[n, 2k + 1]) -> [n]``; ``packed`` holds the teacher's
    ids (as floats, exact below 2²⁴), log-probabilities at the criterion's temperature and the
    tail log-mass. The gradient is autograd's (the default ``value_and_grad``).
    """

    name = "cached_top_k"
    same_vocab = True

    def __init__(self, criterion, temperature: float):
        self.criterion, self.temperature = criterion, temperature
        self.sorted = getattr(criterion, "name", None) == "uld"

    def per_token(self, student_logits: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        ids, log_t, tail_t = unpack(packed)
        log_s = torch.log_softmax(student_logits.float() / self.temperature, dim=-1)
        valid = torch.isfinite(log_t)
        if not self.sorted:  # ids index the student vocabulary (ULD compares sorted values: ids unused)
            valid &= ids < log_s.shape[-1]
        neg_inf = torch.full((), float("-inf"), device=log_s.device)
        log_t = torch.where(valid, log_t, neg_inf)
        norm = torch.logsumexp(torch.cat([log_t, tail_t[:, None]], -1), -1, keepdim=True)
        log_t, tail_t = log_t - norm, tail_t - norm[:, 0]  # the (k + 1)-bucket distribution sums to 1
        if self.sorted:
            return self._sorted_l1(log_s, log_t, tail_t)
        safe_ids = torch.where(valid, ids, torch.zeros_like(ids))
        top_s = torch.where(valid, log_s.gather(1, safe_ids), neg_inf)
        covered = torch.zeros_like(log_s, dtype=torch.int32).scatter_add_(1, safe_ids, valid.int()) > 0
        tail_s = _masked_logsumexp(log_s, ~covered)
        return self.criterion.divergence(torch.cat([top_s, tail_s[:, None]], -1),
                                         torch.cat([log_t, tail_t[:, None]], -1))

    @staticmethod
    def _sorted_l1(log_s, log_t, tail_t):
        """ULD on buckets: ``Σ_{i<k} |sort↓(p_s)_i − sort↓(p_t)_i| + |rest_s − rest_t|``."""
        k = log_t.shape[-1]
        top = log_s.topk(min(k, log_s.shape[-1]), dim=-1)
        s = torch.nn.functional.pad(top.values.exp(), (0, k - top.values.shape[-1]))
        keep = torch.ones_like(log_s, dtype=torch.bool).scatter_(1, top.indices, False)
        rest_s = _masked_logsumexp(log_s, keep).exp()
        t = log_t.exp().sort(-1, descending=True).values
        return (s - t).abs().sum(-1) + (rest_s - tail_t.exp()).abs()


def charges_unmapped_mass(criterion) -> bool:
    """Whether ``criterion.divergence`` values a teacher token of online MinED's finite fill logit
    (−1e5, softmax probability 0 in float32) differently from a −inf one, which the cache's
    buckets produce for student tokens without a teacher image. Probe: a uniform student over 4
    tokens against a teacher with half of its mass on each of the first two (the last two at the
    fill, or −inf); reverse-KL terms give ~1e5/T vs a finite value, forward terms the same."""
    from kdcore_plugins.aligners.mined import FILL

    t = float(getattr(criterion, "temperature", 1.0))
    log_s = torch.full((1, 4), -float(np.log(4.0)))
    half = -float(np.log(2.0))
    dropped = torch.tensor([[half, half, float("-inf"), float("-inf")]])
    filled = torch.log_softmax(torch.tensor([[0.0, 0.0, FILL, FILL]]) / t, -1)
    with torch.no_grad():
        a, b = criterion.divergence(log_s, dropped), criterion.divergence(log_s, filled)
    return not torch.allclose(a, b, rtol=1e-4, atol=1e-4)


class TeacherCache:
    """A cache directory opened for reading: the manifest, the content-hash index, shard rows."""

    def __init__(self, directory):
        self.root = Path(directory)
        self.manifest = read_manifest(self.root)
        if not self.manifest.get("complete"):
            raise ConfigError(f"teacher.cache: {self.root} is incomplete (an interrupted kd-cache); run the same "
                              "kd-cache command again to finish it")
        self.k_stored = int(self.manifest.get("stored_k", self.manifest["k"]))
        self.temperatures = [float(t) for t in self.manifest["temperatures"]]
        self.k = self.k_stored
        self.temperature_index = 0
        self._index: Optional[Dict[bytes, Tuple[str, int]]] = None
        self._shards: "OrderedDict[str, Dict[str, torch.Tensor]]" = OrderedDict()
        self.t2s: Optional[torch.Tensor] = None  # MinED: teacher id -> student id (or -1)
        self.hidden = self.manifest.get("hidden")  # what kd-cache stored besides the top-k (None: nothing)
        self.uses_states = False  # set by check(): the projector/aligner reads hidden states (DSKD, CMA)
        self._stand_in: Optional[CachedTeacher] = None

    # -- index and rows
    @property
    def index(self) -> Dict[bytes, Tuple[str, int]]:
        if self._index is None:
            from safetensors import safe_open

            index: Dict[bytes, Tuple[str, int]] = {}
            for split, info in self.manifest["splits"].items():
                for i in range(info["shards"]):
                    name = _shard_name(split, i)
                    if not (self.root / name).is_file():
                        raise ConfigError(f"teacher.cache: shard {name} is missing from {self.root}")
                    with safe_open(str(self.root / name), framework="pt") as f:
                        for row, key in enumerate(f.get_tensor("keys").numpy()):
                            index.setdefault(key.tobytes(), (name, row))
            self._index = index
        return self._index

    def _shard(self, name: str) -> Dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        if name in self._shards:
            self._shards.move_to_end(name)
        else:
            self._shards[name] = load_file(str(self.root / name))
            if len(self._shards) > SHARD_CACHE:
                self._shards.popitem(last=False)
        return self._shards[name]

    def _locate(self, key: bytes) -> Tuple[Dict[str, torch.Tensor], int, int]:
        """The shard holding a sequence and its row range ``[lo, hi)`` there."""
        found = self.index.get(key)
        if found is None:
            raise DataError("teacher.cache: a batch sequence is not in the cache (the data changed after the check)")
        shard = self._shard(found[0])
        return shard, int(shard["offsets"][found[1]]), int(shard["offsets"][found[1] + 1])

    def rows(self, key: bytes, temperature_index: int, k: int) -> torch.Tensor:
        """One sequence's packed teacher rows ``[n_response, 2k + 1]`` at a cached temperature."""
        return self._packed(*self._locate(key), temperature_index, k)

    def _packed(self, shard, lo: int, hi: int, temperature_index: int, k: int) -> torch.Tensor:
        t = self.temperatures[temperature_index]
        logp = shard["logp"][lo:hi].float() / t - shard["lse"][lo:hi, temperature_index, None]
        tail = shard["tail"][lo:hi, temperature_index]
        if k < logp.shape[1]:
            tail = torch.logsumexp(torch.cat([tail[:, None], logp[:, k:]], -1), -1)
        return torch.cat([_ids(shard["ids"][lo:hi, :k]).float(), logp[:, :k], tail[:, None]], -1)

    # -- checks against a config
    def check(self, cfg, task, teacher_tokenizer, criterion, projector, aligner, student_tokenizer=None) -> None:
        """One :class:`ConfigError` naming everything in which the cache and the config differ."""
        m, problems = self.manifest, []
        given = teacher_identity(cfg.teacher)
        for field in IDENTITY_FIELDS:
            if m["teacher"].get(field) != given[field]:
                problems.append(f"teacher.{field}: cache {m['teacher'].get(field)!r}, config {given[field]!r}")
        if tokenizer_fingerprint(teacher_tokenizer) != m["tokenizer"]["fingerprint"]:
            problems.append(f"teacher tokenizer: the config's ({type(teacher_tokenizer).__name__}, "
                            f"{len(teacher_tokenizer)} tokens) is not the cache's ({m['tokenizer']['class']}, "
                            f"{m['tokenizer']['size']} tokens)")
        self.uses_states = bool(projector.uses_teacher_states or aligner.uses_teacher_states)
        problems += (self._check_states(projector, aligner) if self.uses_states
                     else self._check_top_k(cfg, criterion, projector, aligner))
        if m.get("precision") != cfg.train.precision:
            problems.append(f"train.precision: the cache was computed under {m.get('precision')!r}, config {cfg.train.precision!r}")
        splits = {"train": "train", cfg.eval.split: "eval.split"}
        for split, where in splits.items():
            if split not in m["splits"]:
                problems.append(f"{where} '{split}': not in the cache (it has {', '.join(m['splits'])}; kd-cache --splits ...)")
                continue
            examples = encode_split(task, split, teacher_tokenizer)
            if where == "eval.split" and cfg.eval.max_examples:
                examples = examples[:cfg.eval.max_examples]
            missing = sum(1 for e in examples if sequence_key(e["input_ids"], e["labels"]) not in self.index)
            if missing:
                changed = [key for key in set(m.get("task") or {}) | set(cfg.resolved.get("task") or {})
                           if (m.get("task") or {}).get(key) != (cfg.resolved.get("task") or {}).get(key)]
                hint = f" (task settings that differ: {', '.join(sorted(changed))})" if changed else ""
                problems.append(f"{split} data: {missing} of {len(examples)} teacher sequences are not in the cache{hint}")
        if problems:
            raise ConfigError(f"teacher.cache {self.root} does not match this config: " + "; ".join(problems))
        if aligner.name == "mined":
            t2s = torch.full((len(aligner.t2s_map),), -1, dtype=torch.long)
            t2s[aligner.t_ids.cpu()] = aligner.s_ids.cpu()  # representatives only (max_align_num = 1)
            self.t2s = t2s

    def _check_top_k(self, cfg, criterion, projector, aligner) -> List[str]:
        """A projector-``none`` run reads the top-k rows: k, temperature, criterion family, aligner."""
        problems = []
        k = cfg.teacher.cache_k or self.k_stored
        if k > self.k_stored:
            problems.append(f"teacher.cache_k: {k} is more than the cache's k = {self.k_stored} (rebuild with kd-cache --k {k})")
        self.k = min(k, self.k_stored)
        temperature = float(getattr(criterion, "temperature", 1.0))
        matches = [i for i, t in enumerate(self.temperatures) if abs(t - temperature) <= 1e-9 * max(1.0, t)]
        if not matches:
            problems.append(f"criterion temperature {temperature} is not cached (the cache has "
                            f"{', '.join(map(str, self.temperatures))}; kd-cache --temperatures ...)")
        else:
            self.temperature_index = matches[0]
        if not (isinstance(criterion, TemperedDivergence)
                and type(criterion).divergence is not TemperedDivergence.divergence):
            problems.append(f"criterion '{getattr(criterion, 'name', criterion)}': a cached teacher needs a criterion of the "
                            "tempered-divergence family (one with divergence(log_p_s, log_p_t))")
        elif aligner.name == "mined" and charges_unmapped_mass(criterion):
            problems.append(f"criterion '{criterion.name}' with aligner 'mined': online MinED gives student tokens "
                            "without a teacher image (and every non-gold token at unaligned positions) a finite "
                            "teacher logit of −1e5, which this criterion charges at ~1e5/T per unit of student mass "
                            "there (reverse-KL terms); the cache drops those columns, so the cached loss would be "
                            "another objective. Use a criterion that ignores zero-probability teacher tokens (fkl, "
                            "jsd, skl, srkl, tvd, ce) or the online teacher")
        if projector.name != "none" or aligner.name not in SUPPORTED_ALIGNERS:
            problems.append(f"projector '{projector.name}' with aligner '{aligner.name}': a top-k teacher cache serves "
                            f"projector 'none' with aligner {', '.join(map(repr, SUPPORTED_ALIGNERS))} (and, with "
                            "hidden states, projectors and aligners that set uses_teacher_states)")
        return problems

    def _check_states(self, projector, aligner) -> List[str]:
        """A projector/aligner that reads the teacher's states (DSKD, CMA) needs a cache holding them."""
        what = f"projector '{projector.name}' with aligner '{aligner.name}'"
        if not self.hidden:
            return [f"{what} reads the teacher's hidden states, head and embeddings, and this cache holds only top-k "
                    "log-probabilities (rebuild it with this config, or kd-cache --hidden)"]
        problems = []
        if aligner.name not in STATE_ALIGNERS:
            problems.append(f"{what}: a cache with hidden states serves aligner {', '.join(map(repr, STATE_ALIGNERS))}")
        if getattr(aligner, "norm", "response") != "response":
            # std over padded batch tensors: the prompt and padding rows, which the cache does not hold
            problems.append(f"aligner.norm '{aligner.norm}': a cache holds the teacher's response rows only, "
                            "use norm: response (or the online teacher)")
        return problems

    @property
    def stand_in(self) -> "CachedTeacher":
        """The teacher's head and input embeddings from the cache's tables (loaded on first use)."""
        if self._stand_in is None:
            from safetensors.torch import load_file

            path = self.root / (self.hidden or {}).get("tables", TABLES)
            if not path.is_file():
                raise ConfigError(f"teacher.cache: {path} is missing (an interrupted kd-cache); run kd-cache again")
            self._stand_in = CachedTeacher(_stored_config(self.root), load_file(str(path)))
        return self._stand_in

    def teacher_side(self, teacher_batch: Dict[str, torch.Tensor]):
        """The teacher's :class:`~kdcore.kdspace.ModelSide` of a batch from the cache: hidden states
        ``[B, L_t, D]`` at the response positions (zeros elsewhere, which no space reads with
        aligners identity/cma), the stored head (detached, as online) and input embeddings."""
        from .kdspace import Head, ModelSide

        model = self.stand_in
        weight = model.lm_head.weight
        hidden = self._scatter(teacher_batch, int(self.hidden["size"]), weight.dtype,
                               lambda shard, lo, hi: shard["hidden"][lo:hi])
        return ModelSide(hidden=hidden.to(weight.device), head=Head.of(model).detached(),
                         input_ids=teacher_batch["input_ids"], labels=teacher_batch["labels"],
                         attention_mask=teacher_batch["attention_mask"], embeddings=model.get_input_embeddings())

    # -- spaces for a batch
    def packed_positions(self, teacher_batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, L_t, 2k + 1]`` packed teacher rows at the teacher's response positions (zeros elsewhere)."""
        return self._scatter(teacher_batch, 2 * self.k + 1, torch.float32,
                             lambda shard, lo, hi: self._packed(shard, lo, hi, self.temperature_index, self.k)
                             ).to(teacher_batch["input_ids"].device)

    def _scatter(self, teacher_batch, width: int, dtype, read) -> torch.Tensor:
        """``[B, L_t, width]`` on the CPU: ``read(shard, lo, hi)`` of each sequence at its response positions."""
        ids, labels, att = (teacher_batch[n].cpu() for n in ("input_ids", "labels", "attention_mask"))
        out = torch.zeros(*ids.shape, width, dtype=dtype)
        for b in range(ids.shape[0]):
            n = int(att[b].sum())
            rows = read(*self._locate(sequence_key(ids[b, :n].tolist(), labels[b, :n].tolist())))
            positions = labels[b].ne(-100).nonzero()[:, 0]
            if len(positions) != rows.shape[0]:
                raise DataError(f"teacher.cache: {rows.shape[0]} cached rows for {len(positions)} response tokens")
            out[b, positions] = rows.to(dtype)
        return out

    def spaces(self, student, batch, aligner, criterion, projector):
        """The KD spaces of one micro-batch against the cached teacher: the projector's own spaces on
        the cached states when it (or the aligner) reads them, else one top-k space (projector ``none``)."""
        from .aligner import gather_rows
        from .kdspace import CrossEntropy, ModelSide, Rows, Space

        tb = batch["teacher"]
        if self.uses_states:
            teacher = self.teacher_side(tb)
            return projector.spaces(student, teacher, aligner.align(student, teacher, batch.get("align")), criterion)
        teacher = ModelSide(hidden=None, head=None, input_ids=tb["input_ids"], labels=tb["labels"],
                            attention_mask=tb["attention_mask"])
        alignment = aligner.align(student, teacher, batch.get("align"))
        packed = self.packed_positions(tb)
        rows = alignment.student_mask
        labels = student.labels[rows]
        if aligner.name == "mined":
            packed = gather_rows(packed, alignment.teacher_pos)[rows]
            packed = self._map_vocabulary(packed, alignment.row_info[rows].bool(), labels)
        else:
            packed = alignment.teacher_to_student(packed)[rows]
        return [Space(name="student", student=Rows(student.hidden[rows], student.head),
                      teacher=Rows(packed, PackedHead(packed.shape[-1])),
                      criterion=CachedTopK(criterion, self.temperatures[self.temperature_index]), labels=labels,
                      terms=[CrossEntropy("ce", "student")] if alignment.covers_student_response else [])]

    def _map_vocabulary(self, packed: torch.Tensor, aligned: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """MinED: teacher ids -> student ids (ids without a student image dropped: log p = −inf);
        unaligned rows become the one-hot gold target (as the online aligner's +100 logit)."""
        ids, log_t, tail = unpack(packed)
        if self.t2s.device != packed.device:  # moved once, not copied on every micro-batch
            self.t2s = self.t2s.to(packed.device)
        t2s = self.t2s
        mapped = torch.where(ids < len(t2s), t2s[ids.clamp(0, len(t2s) - 1)], torch.full_like(ids, -1))
        log_t = torch.where(mapped >= 0, log_t, torch.full((), float("-inf"), device=packed.device))
        gold_ids = torch.zeros_like(ids)
        gold_ids[:, 0] = labels
        gold_log = torch.full_like(log_t, float("-inf"))
        gold_log[:, 0] = 0.0
        ids = torch.where(aligned[:, None], mapped.clamp(min=0), gold_ids)
        log_t = torch.where(aligned[:, None], log_t, gold_log)
        tail = torch.where(aligned, tail, torch.full_like(tail, float("-inf")))
        return torch.cat([ids.float(), log_t, tail[:, None]], -1)


class CachedTeacher(torch.nn.Module):
    """A stand-in for the teacher built from a cache's tables: its output head and input embeddings
    (no decoder layers), with its HF config, so ``Head.of``, ``get_input_embeddings()`` and the
    projectors' and aligners' ``prepare`` (e.g. DSKD's pinv init from the teacher head) see the
    teacher's own tensors. Frozen."""

    def __init__(self, config, tables: Mapping[str, torch.Tensor]):
        super().__init__()
        self.config = config
        weight, bias = tables.get("lm_head.weight", tables["embed_tokens.weight"]), tables.get("lm_head.bias")
        self.lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        self.lm_head.weight = torch.nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            self.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)
        self.embed_tokens = torch.nn.Embedding.from_pretrained(tables["embed_tokens.weight"], freeze=True)

    def get_output_embeddings(self):
        return self.lm_head

    def get_input_embeddings(self):
        return self.embed_tokens


def open_checked(cfg, parts_by_kind: Mapping[str, Any], teacher_tokenizer) -> TeacherCache:
    """The run's cache, checked against the config (one ConfigError naming every difference)."""
    cache = TeacherCache(cfg.teacher.cache)
    cache.check(cfg, parts_by_kind["task"], teacher_tokenizer, parts_by_kind["criterion"],
                parts_by_kind["projector"], parts_by_kind["aligner"])
    return cache


def cached_model_config(model_cfg):
    """The teacher's HF config as the cache stored it (no teacher directory needed)."""
    return _stored_config(model_cfg.cache)


def _stored_config(directory):
    from transformers import AutoConfig

    read_manifest(directory)
    path = Path(directory) / "teacher_config"
    if not path.is_dir():
        raise ConfigError(f"teacher.cache: {path} is missing (an interrupted kd-cache); run kd-cache again")
    return AutoConfig.from_pretrained(str(path))
