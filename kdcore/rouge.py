"""ROUGE-L as DSKD and MiniLLM report it (docs/methods.md#rouge-l).

The ``rouge_score`` package's ``rougeL`` with the Porter stemmer; the F-measure with the
reference as target and the prediction as prediction; the maximum over an example's
references; the corpus score is the mean over examples × 100. Predictions are post-processed
first: cut at the first literal ``<|endoftext|>`` and stripped.
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Sequence, Union

END_OF_TEXT = "<|endoftext|>"

References = Union[str, Sequence[str]]


def postprocess(text: str) -> str:
    """DSKD's clean-up of a decoded response: cut at the first ``<|endoftext|>``, strip."""
    return text.split(END_OF_TEXT, 1)[0].strip()


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _as_list(references: References) -> List[str]:
    if isinstance(references, str):
        return [references]
    refs = list(references)
    if not refs:
        raise ValueError("an example needs at least one reference")
    return refs


def rouge_l(prediction: str, references: References) -> float:
    """ROUGE-L F1 in [0, 1] of one prediction: the maximum over its references."""
    scorer = _scorer()
    return max(scorer.score(target=ref, prediction=prediction)["rougeL"].fmeasure for ref in _as_list(references))


def rouge_l_scores(predictions: Sequence[str], references: Sequence[References]) -> List[float]:
    """Per-example ROUGE-L F1 in [0, 1]."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    return [rouge_l(p, r) for p, r in zip(predictions, references)]


def corpus_rouge_l(predictions: Sequence[str], references: Sequence[References]) -> float:
    """The reported number: mean per-example ROUGE-L F1 × 100 (0 for an empty corpus)."""
    scores = rouge_l_scores(predictions, references)
    return 100.0 * sum(scores) / len(scores) if scores else 0.0
