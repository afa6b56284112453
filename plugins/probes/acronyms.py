"""The acronym task (García-Carrasco et al., AISTATS 2024, seed-methods §3) for any tokenizer,
its metric, and the ``acronyms`` probe (the metric on clean prompts).

Prompt template (11 tokens, fixed positions so activations can be swapped across prompts)::

    pos:  0    1     2   3   4   5   6   7   8     9   10
    tok:  BOS  The   C1  T1  C2  T2  C3  T3  " ("  A1  A2    -> predict A1@8, A2@9, A3@10

``C_i`` = the space-prefixed capital initial of word ``i`` (" K"), ``T_i`` = the rest of the
word as one token ("etchup"), ``A_i`` = the capital letter without space. Constraints, checked
with the tokenizer under study: (i) " Word" tokenizes to exactly [" W", rest]; (ii) the acronym
after " (" tokenizes letter by letter; (iii) the whole text tokenizes to the template. Words
come from ``words.txt`` (the distinct 4-12 letter lowercase words of the committed instruction
set, so nothing is downloaded) or a word file given by the config. Acronyms are sampled with
probability ∝ the product of their letters' bucket sizes, each letter filled by a uniformly
drawn word of its bucket.

Metric (§3.3): logit difference per letter ``LD_i = z[A_i] − max_{c ∈ capitals \\ {A_i}} z[c]``
read at position ``7 + i``, capitals = the single-token capital letters. Accuracy: all three
letters ranked first over the whole vocabulary (teacher forcing = greedy decoding when right).

Corruption (§3.4): a corrupted prompt is another prompt of the set (permutation π₁) whose
acronym letters at positions 9, 10 come from a second permutation π₂. Schemes for letter ``i``
(word ``i`` starts at ``j_i = 2i``): ``current_word`` replaces positions ``[j_i, j_i + 1]``,
``previous_words`` positions ``[0, j_i)``, ``previous_letters`` positions ``8 … 7 + i``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from kdcore import hookimpl
from kdcore.probe import Edit, ModelSites, Probe, ProbeError

LETTERS = [chr(ord("A") + i) for i in range(26)]
SEQ_LEN = 11
PRED_POSITIONS = (8, 9, 10)  # the positions whose next token is A1, A2, A3
WORD_START = {1: 2, 2: 4, 3: 6}
# One patching variant: (site, layer) -> bool mask row (heads for "z", positions for "resid")
Variant = Dict[tuple, torch.Tensor]
SCHEMES = ("current_word", "previous_words", "previous_letters")
WORDS_FILE = Path(__file__).with_name("words.txt")


def scheme_positions(scheme: str, letter: int) -> List[int]:
    """Token positions a corruption ``scheme`` replaces for ``letter`` ∈ {1, 2, 3}."""
    j = WORD_START[letter]
    if scheme == "current_word":
        return [j, j + 1]
    if scheme == "previous_words":
        return list(range(0, j))
    if scheme == "previous_letters":
        return list(range(8, 8 + letter))
    raise ProbeError(f"unknown corruption scheme {scheme!r}; schemes: {', '.join(SCHEMES)}")


@dataclass
class AcronymPrompts:
    """``tokens [N, 11]`` clean inputs, ``answers [N, 3]`` letter ids (A1, A2, A3),
    ``capitals [K]`` the single-token capital letter ids (``letters`` their letters),
    ``texts`` the prompts with their full acronym, ``stats`` how many candidates survived."""

    tokens: torch.Tensor
    answers: torch.Tensor
    capitals: torch.Tensor
    letters: List[str]
    texts: List[str]
    stats: Dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def corrupted(self, seed: int) -> torch.Tensor:
        """Fully corrupted prompts ``[N, 11]``: rows permuted by π₁, positions 9, 10 by π₂."""
        g = torch.Generator().manual_seed(seed)
        n = len(self)
        out = self.tokens[torch.randperm(n, generator=g)].clone()
        out[:, 9:11] = self.tokens[torch.randperm(n, generator=g), 9:11]
        return out

    def partially_corrupted(self, scheme: str, letter: int, corrupt: torch.Tensor) -> torch.Tensor:
        """The clean prompts with ``scheme``'s positions for ``letter`` taken from ``corrupt``."""
        out = self.tokens.clone()
        pos = scheme_positions(scheme, letter)
        out[:, pos] = corrupt[:, pos]
        return out


def _single(tokenizer, text: str) -> Optional[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def read_words(path: Optional[str]) -> List[str]:
    p = Path(path) if path else WORDS_FILE
    if not p.is_file():
        raise ProbeError(f"acronym word file not found: {p}")
    words = sorted({w.strip().lower() for w in p.read_text(encoding="utf-8").split() if w.strip().isalpha()})
    if not words:
        raise ProbeError(f"acronym word file {p} holds no alphabetic words")
    return words


def build_prompts(tokenizer, n: int = 32, seed: int = 0, words: Optional[str] = None) -> AcronymPrompts:
    """``n`` acronym prompts admissible for ``tokenizer`` (see the module docstring)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise ProbeError("the tokenizer has neither a BOS nor an EOS token to start the acronym prompts with")
    the, paren = _single(tokenizer, "The"), _single(tokenizer, " (")
    if the is None or paren is None:
        raise ProbeError("tokenizer admits no acronym prompts: 'The' and ' (' must each be one token")
    letter_id = {c: _single(tokenizer, c) for c in LETTERS}
    letter_id = {c: i for c, i in letter_id.items() if i is not None}
    space_id = {c: _single(tokenizer, " " + c) for c in letter_id}
    vocab = read_words(words)
    buckets: Dict[str, List[tuple]] = {}
    for w in vocab:
        word = w.capitalize()
        if space_id.get(word[0]) is None:
            continue
        ids = tokenizer.encode(" " + word, add_special_tokens=False)
        if len(ids) == 2 and ids[0] == space_id[word[0]]:
            buckets.setdefault(word[0], []).append((word, ids[1]))
    letters = sorted(buckets)
    triples = [a + b + c for a in letters for b in letters for c in letters]
    encoded = tokenizer([" (" + t for t in triples], add_special_tokens=False)["input_ids"] if triples else []
    acronyms = [t for t, ids in zip(triples, encoded) if ids == [paren] + [letter_id[c] for c in t]]
    stats = {"words": len(vocab), "words_admissible": sum(len(b) for b in buckets.values()),
             "letters_single_token": len(letter_id), "letters_with_words": len(letters),
             "acronyms_checked": len(triples), "acronyms_admissible": len(acronyms)}
    if not acronyms:
        raise ProbeError(f"tokenizer admits no acronym prompts: {stats['words_admissible']} of {len(vocab)} words "
                         f"tokenize as [' X', rest], {len(acronyms)} of {len(triples)} acronyms tokenize letter by "
                         "letter after ' ('")
    rng = random.Random(seed)
    weights = [len(buckets[a[0]]) * len(buckets[a[1]]) * len(buckets[a[2]]) for a in acronyms]
    tokens, answers, texts, rejected = [], [], [], 0
    for _ in range(50 * n):
        if len(tokens) == n:
            break
        acronym = rng.choices(acronyms, weights)[0]
        chosen = [rng.choice(buckets[c]) for c in acronym]
        text = "The " + " ".join(w for w, _ in chosen) + " (" + acronym
        expected = [the]
        for (w, rest), c in zip(chosen, acronym):
            expected += [space_id[c], rest]
        expected += [paren] + [letter_id[c] for c in acronym]
        if tokenizer.encode(text, add_special_tokens=False) != expected:  # constraint (iii) in context
            rejected += 1
            continue
        full = [bos] + expected
        tokens.append(full[:SEQ_LEN])
        answers.append(full[SEQ_LEN - 2:])
        texts.append(text)
    stats.update(prompts=len(tokens), prompts_rejected=rejected)
    if len(tokens) < 2:
        raise ProbeError(f"tokenizer admits no acronym prompts: {rejected} sampled prompts did not tokenize to the "
                         "11-token template")
    capitals = [letter_id[c] for c in LETTERS if c in letter_id]
    return AcronymPrompts(torch.tensor(tokens), torch.tensor(answers), torch.tensor(capitals),
                          [c for c in LETTERS if c in letter_id], texts, stats)


def logit_diff(logits: torch.Tensor, answers: torch.Tensor, capitals: torch.Tensor) -> torch.Tensor:
    """``LD [B, 3]`` from ``logits [B, 3, V]`` (positions 8, 9, 10), ``answers [B, 3]`` and the
    capital letter ids ``capitals [K]``: the correct letter's logit minus the largest logit of
    the other capitals."""
    caps = logits[..., capitals.to(logits.device)]  # [B, 3, K]
    correct = logits.gather(-1, answers.to(logits.device)[..., None])[..., 0]
    others = caps.masked_fill(capitals.to(logits.device)[None, None, :] == answers.to(logits.device)[..., None],
                              float("-inf"))
    return correct - others.max(-1).values


def accuracy(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """``[B]`` 1.0 where all three letters are the argmax over the whole vocabulary."""
    return (logits.argmax(-1) == answers.to(logits.device)).all(-1).float()


def stats_of(values: torch.Tensor) -> Dict[str, List[float]]:
    """Mean and std over prompts of ``values [N, 3]`` per letter."""
    return {"mean": values.mean(0).tolist(), "std": values.std(0, unbiased=False).tolist()}


class AcronymProbe(Probe):
    """Base of the acronym probes: the prompt set and the clean run.

    n_prompts: prompts built for the model's tokenizer (same seed → same words and acronyms).
    seed: prompt sampling and corruption permutations. words: a word file (one word per line)
    instead of the built-in list. batch_size: prompt rows per forward pass (variants are batched).
    """

    def __init__(self, n_prompts: int = 32, seed: int = 0, words: Optional[str] = None, batch_size: int = 256):
        if n_prompts < 2:
            raise ProbeError(f"n_prompts must be at least 2 (corruption permutes the prompts), got {n_prompts}")
        if batch_size < 1:
            raise ProbeError(f"batch_size must be at least 1, got {batch_size}")
        self.n_prompts, self.seed, self.words, self.batch_size = n_prompts, seed, words, batch_size

    def prepare(self, model, tokenizer):
        """(sites, prompts, clean logits ``[N, 3, V]``, clean LD ``[N, 3]``)."""
        prompts = build_prompts(tokenizer, self.n_prompts, self.seed, self.words)
        sites = ModelSites(model)
        logits, _ = sites.forward(prompts.tokens, last=3)
        return sites, prompts, logits, logit_diff(logits, prompts.answers, prompts.capitals)

    def run_variants(self, sites: ModelSites, prompts: AcronymPrompts, variants: Sequence[Variant],
                     values: Callable[[str, int], torch.Tensor], progress: bool = False,
                     desc: str = "") -> torch.Tensor:
        """LD ``[V, N, 3]`` of the clean prompts under each variant.

        A variant maps ``(site, layer)`` to a bool mask row: ``[H]`` heads for ``"z"``, ``[T]``
        positions for ``"resid"``; the masked entries take ``values(site, layer)``, a tensor
        ``[N, T, ...]`` (per prompt: patching) or ``[T, ...]`` (a mean: ablation). Variants run
        ``batch_size // N`` at a time as one batch of stacked copies of the prompts.
        """
        from tqdm.auto import tqdm

        n = len(prompts)
        per_pass = max(1, self.batch_size // n)
        out = []
        chunks = range(0, len(variants), per_pass)
        for start in tqdm(chunks, desc=desc, disable=not progress, leave=False):
            chunk = variants[start:start + per_pass]
            g = len(chunk)
            edits = []
            for key in sorted({k for v in chunk for k in v}):
                site, layer = key
                width = sites.n_heads if site == "z" else SEQ_LEN
                mask = torch.zeros(g, n, width, dtype=torch.bool)
                for j, variant in enumerate(chunk):
                    if key in variant:
                        mask[j] = variant[key]
                vals = values(site, layer)
                if vals.dim() == (4 if site == "z" else 3):  # per prompt: one copy per variant
                    vals = vals.repeat(g, *([1] * (vals.dim() - 1)))
                edits.append(Edit(site, layer, vals, mask.reshape(g * n, width)))
            logits, _ = sites.forward(prompts.tokens.repeat(g, 1), edits, last=3)
            out.append(logit_diff(logits, prompts.answers.repeat(g, 1), prompts.capitals).reshape(g, n, 3))
        return torch.cat(out) if out else torch.zeros(0, n, 3)

    @staticmethod
    def single_variants(site: str, n_layers: int, width: int) -> List[Variant]:
        """One variant per (layer, index), in row-major order, touching only that head
        (``site="z"``, ``width`` heads) or position (``"resid"``, ``width`` positions)."""
        variants = []
        for layer in range(n_layers):
            for index in range(width):
                row = torch.zeros(width, dtype=torch.bool)
                row[index] = True
                variants.append({(site, layer): row})
        return variants

    def mean_z(self, sites: ModelSites, corrupt: torch.Tensor) -> Dict[int, torch.Tensor]:
        """Per-layer mean head outputs over the corrupted prompts, per position: ``[T, H, d_h]``."""
        _, rec = sites.forward(corrupt, last=1, record_z=range(sites.n_layers))
        return {layer: z.mean(0) for layer, z in rec.z.items()}

    def ablation_variant(self, sites: ModelSites, kept: Sequence[tuple]) -> Variant:
        """Mean-ablate every head except ``kept`` (``(layer, head)`` pairs); MLPs untouched."""
        variant = {}
        for layer in range(sites.n_layers):
            row = torch.ones(sites.n_heads, dtype=torch.bool)
            for lk, hk in kept:
                if lk == layer:
                    row[hk] = False
            variant[("z", layer)] = row
        return variant


class Acronyms(AcronymProbe):
    """The metric alone: logit difference per letter and accuracy on clean prompts."""

    name = "acronyms"

    def run(self, model, tokenizer, progress: bool = False) -> Dict[str, Any]:
        sites, prompts, logits, ld = self.prepare(model, tokenizer)
        acc = accuracy(logits, prompts.answers)
        mean = ld.mean(0)
        return {"probe": self.name, "prompts": prompts.stats, "examples": prompts.texts[:5],
                "ld": stats_of(ld), "accuracy": float(acc.mean()),
                "summary": {"ld": float(mean.mean()), **{f"ld{i + 1}": float(v) for i, v in enumerate(mean)},
                            "accuracy": float(acc.mean())}}

    def compare(self, results: Dict[str, Dict[str, Any]], layer_maps: Dict[str, Optional[List[int]]]) -> str:
        lines = ["| model | admissible words | admissible acronyms | LD letter 1 | LD letter 2 | LD letter 3 | accuracy |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        for label, r in results.items():
            st, m, sd = r["prompts"], r["ld"]["mean"], r["ld"]["std"]
            lines.append(f"| {label} | {st['words_admissible']} of {st['words']} | {st['acronyms_admissible']} of "
                         f"{st['acronyms_checked']} | " + " | ".join(f"{a:.2f} ± {b:.2f}" for a, b in zip(m, sd))
                         + f" | {r['accuracy']:.2f} |")
        return "\n".join(lines) + "\n"


@hookimpl
def kdcore_register_probes(register):
    register(Acronyms)
