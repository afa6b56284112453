"""Aligner ``mined``: minimum-edit-distance alignment of tokens and vocabularies
(FuseLLM's MinED as re-implemented by DSKD; docs/methods.md#mined).

Vocabulary: every teacher token maps to the student token with the same string after mapping
the word-boundary marker (``Ġ`` <-> ``▁``), else to the student token at minimum edit
distance, ties to the lowest student id; computed once per tokenizer pair and cached
(``$KDCORE_CACHE/vocab``), or read from ``vocab_map`` (a JSON file such as DSKD's
``tea2stu_id_mapping.json``, to reproduce a map computed elsewhere). Each student id keeps the
first (lowest) teacher id mapped onto it (DSKD's ``max_align_num = 1``).

Positions (per example, in the data-loader workers): the input tokens at response positions of
both sequences are aligned by dynamic time warping with cost = Levenshtein distance between
token strings (boundary markers removed). A student position is *aligned* when DTW matches it
to exactly one teacher position whose token maps to the student's token. Its teacher logits
are carried into the student vocabulary (unmapped student ids get −1e5); an unaligned position
gets a one-hot row on its gold token (+100), so KD degenerates to CE there.

Use with projector ``none`` and a same-vocabulary criterion (``fkl`` reproduces DSKD).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from kdcore import Aligner, hookimpl
from kdcore.aligner import Alignment, gather_rows
from kdcore.models import cache_root
from kdcore.vocab import boundary_marker, load_vocab_map, min_edit_distance_map, token_strings

FILL = -1e5
GOLD = 100.0


def dtw_matches(cost: np.ndarray) -> List[List[int]]:
    """DTW over a cost matrix [n_t, n_s]; for each student column, the teacher rows matched to it.

    Accumulated cost with +inf borders, each cell = cost + min(diag, up, left); the path is
    traced back from the bottom-right corner choosing argmin(diag, up, left), ties to diag.
    """
    n_t, n_s = cost.shape
    acc = np.full((n_t + 1, n_s + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, n_t + 1):
        row, prev = acc[i], acc[i - 1]
        c = cost[i - 1]
        for j in range(1, n_s + 1):
            row[j] = c[j - 1] + min(prev[j - 1], prev[j], row[j - 1])
    matches: List[List[int]] = [[] for _ in range(n_s)]
    i, j = n_t, n_s
    while i > 0 and j > 0:
        matches[j - 1].append(i - 1)
        options = (acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1])
        step = int(np.argmin(options))
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    return matches


class MinEDAlignment(Alignment):
    covers_student_response = True

    def __init__(self, student, teacher, teacher_pos, s_ids, t_ids, vocab_size):
        self.student_mask, self.teacher_mask = student.mask, teacher.mask
        self.teacher_pos = teacher_pos
        self.row_info = (teacher_pos >= 0).long()
        self.s_ids, self.t_ids, self.vocab_size = s_ids, t_ids, vocab_size

    def teacher_to_student(self, x):
        return gather_rows(x, self.teacher_pos)

    def student_to_teacher(self, x):
        raise NotImplementedError("aligner 'mined' aligns logits in student space only")

    def teacher_logit_map(self, logits, labels, aligned):
        """Teacher logits [N, V_t] -> student-vocabulary logits [N, V_s] (one-hot gold where unaligned).

        Built in place in the one [N, V_s] output (no second full-width buffer for the gold rows):
        mapped columns, then unaligned rows refilled with FILL and GOLD written at their label."""
        out = logits.new_full((logits.shape[0], self.vocab_size), FILL)
        out[:, self.s_ids] = logits[:, self.t_ids]
        unaligned, at_label = ~aligned.bool()[:, None], labels[:, None]
        kept = out.gather(1, at_label).masked_fill_(unaligned, GOLD)  # aligned rows keep their mapped logit
        return out.masked_fill_(unaligned, FILL).scatter_(1, at_label, kept)


class MinEDAligner(Aligner):
    name = "mined"
    projectors = frozenset({"none"})
    maps_vocabulary = True

    def __init__(self, student_tokenizer, teacher_tokenizer, student_vocab_size: int, vocab_map: Optional[str] = None):
        super().__init__()
        if vocab_map is not None:
            t2s = load_vocab_map(vocab_map, len(token_strings(teacher_tokenizer)), student_vocab_size)
        else:
            t2s = min_edit_distance_map(teacher_tokenizer, student_tokenizer, cache_dir=cache_root() / "vocab")
        first: Dict[int, int] = {}
        for t_id, s_id in enumerate(t2s):  # each student id keeps the first teacher id mapped to it
            first.setdefault(s_id, t_id)
        self.t2s_map = t2s
        s_ids = sorted(s for s in first if 0 <= s < student_vocab_size)
        self.register_buffer("s_ids", torch.tensor(s_ids, dtype=torch.long), persistent=False)
        self.register_buffer("t_ids", torch.tensor([first[s] for s in s_ids], dtype=torch.long), persistent=False)
        self.vocab_size = student_vocab_size
        s_str, t_str = token_strings(student_tokenizer), token_strings(teacher_tokenizer)
        s_marker, t_marker = boundary_marker(s_str), boundary_marker(t_str)
        self._s_str = [s.replace(s_marker, "") for s in s_str]
        self._t_str = [t.replace(t_marker, "") for t in t_str]

    def pair_features(self, student_enc, teacher_enc) -> Dict[str, List[int]]:
        """DTW alignment of one example: for each student input position, a teacher position or -1."""
        from rapidfuzz import process
        from rapidfuzz.distance import Levenshtein

        s_pos = [i for i, y in enumerate(student_enc["labels"]) if y != -100]
        t_pos = [i for i, y in enumerate(teacher_enc["labels"]) if y != -100]
        out = [-1] * len(student_enc["input_ids"])
        if not s_pos or not t_pos:
            return {"mined_teacher_pos": out}
        s_tok = [student_enc["input_ids"][i] for i in s_pos]
        t_tok = [teacher_enc["input_ids"][i] for i in t_pos]
        cost = process.cdist([self._t_str[t] for t in t_tok], [self._s_str[s] for s in s_tok],
                             scorer=Levenshtein.distance, dtype=np.float64)
        for j, rows in enumerate(dtw_matches(cost)):
            if len(rows) == 1 and self.t2s_map[t_tok[rows[0]]] == s_tok[j]:
                out[s_pos[j]] = t_pos[rows[0]]
        return {"mined_teacher_pos": out}

    def align(self, student, teacher, extras=None) -> Alignment:
        if not extras or "mined_teacher_pos" not in extras:
            raise ValueError("aligner 'mined' needs its per-example DTW features in batch['align']")
        return MinEDAlignment(student, teacher, extras["mined_teacher_pos"], self.s_ids, self.t_ids, self.vocab_size)


@hookimpl
def kdcore_register_aligners(register):
    register(MinEDAligner)
