"""The ROUGE-L near-duplicate filter, exact and fast enough for a pool of 50k instructions.

Alpaca rejects a new instruction whose ROUGE-L F (rouge-score, no stemming) against any
instruction already in the pool reaches the threshold; its loop scores the candidate against
every pool entry (O(N) LCS tables per candidate, O(N^2) for the run). This index gives the same
decisions with far fewer LCS tables, because for token sequences a and b

    LCS(a, b) <= overlap(a, b) = sum over tokens t of min(count_a(t), count_b(t))

so F = 2 LCS / (|a| + |b|) <= 2 overlap / (|a| + |b|). An inverted index (token -> pool entries
and their counts) gives a candidate's overlap with the whole pool in one ``bincount``;
only entries whose bound reaches the threshold get the exact score, computed by rouge-score
itself on rouge-score's tokens, best bound first, stopping once no bound can beat the best
score found. The bound is compared with a margin (1e-9) below the threshold, so floating point
never prunes an entry rouge-score would score at the threshold.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rouge_score import rouge_scorer, tokenizers

MARGIN = 1e-9
_TOKENIZER = tokenizers.DefaultTokenizer(use_stemmer=False)  # Alpaca's scorer's tokens


def tokenize(text: str) -> list[str]:
    """rouge-score's own tokens (lower-cased alphanumeric runs, no stemming), as Alpaca used."""
    return _TOKENIZER.tokenize(text)


def rouge_l(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F of two token lists, by rouge-score (Alpaca's call: new instruction first).

    ``_score_lcs`` is what ``RougeScorer.score`` runs after tokenizing; called on tokens we
    already hold, it skips tokenizing the pool entry again (rouge-score is pinned in the lock).
    """
    return rouge_scorer._score_lcs(a, b).fmeasure


@dataclass(frozen=True)
class Match:
    entry: int  # the pool entry (its index in insertion order)
    score: float  # its exact ROUGE-L F


class _Growing:
    """An append-only numpy array (amortised O(1) appends, views without copies)."""

    __slots__ = ("data", "size")

    def __init__(self, dtype: type, capacity: int = 4):
        self.data = np.empty(capacity, dtype=dtype)
        self.size = 0

    def append(self, value: int) -> None:
        if self.size == len(self.data):
            self.data = np.resize(self.data, 2 * len(self.data))
        self.data[self.size] = value
        self.size += 1

    def view(self) -> np.ndarray:
        return self.data[: self.size]


class RougeIndex:
    """The pool's instructions as tokens, with an inverted index for exact ROUGE-L queries."""

    def __init__(self, threshold: float = 0.7):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"the ROUGE-L threshold must be in (0, 1], not {threshold}")
        self.threshold = threshold
        self.tokens: list[list[str]] = []
        self._vocabulary: dict[str, int] = {}
        self._entries: list[_Growing] = []  # per token id: pool entries holding it
        self._counts: list[_Growing] = []  # ... and how often each holds it
        self._lengths = _Growing(np.int32, 1024)
        self.exact_scores = 0  # LCS tables computed (what the bound saves)

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, tokens: list[str]) -> int:
        """Put an instruction's tokens into the pool; returns its entry number."""
        entry = len(self.tokens)
        self.tokens.append(tokens)
        self._lengths.append(len(tokens))
        for token, count in Counter(tokens).items():
            slot = self._vocabulary.get(token)
            if slot is None:
                slot = self._vocabulary[token] = len(self._entries)
                self._entries.append(_Growing(np.int32))
                self._counts.append(_Growing(np.int32))
            self._entries[slot].append(entry)
            self._counts[slot].append(count)
        return entry

    def best_match(self, tokens: Sequence[str]) -> Match | None:
        """The most similar pool entry when its ROUGE-L F reaches the threshold, else None."""
        size = len(self.tokens)
        if not tokens or not size:
            return None  # rouge-score scores an empty side 0
        entries, shared = [], []
        for token, count in Counter(tokens).items():
            slot = self._vocabulary.get(token)
            if slot is not None:
                entries.append(self._entries[slot].view())
                shared.append(np.minimum(self._counts[slot].view(), count))
        if not entries:
            return None
        # sum over tokens of min(count here, count there), for every pool entry at once
        overlap = np.bincount(np.concatenate(entries), np.concatenate(shared), minlength=size)
        bound = 2.0 * overlap / (len(tokens) + self._lengths.view())
        reach = np.flatnonzero(bound >= self.threshold - MARGIN)
        best: Match | None = None
        for entry in reach[np.argsort(-bound[reach], kind="stable")]:
            if best is not None and bound[entry] < best.score - MARGIN:
                break  # sorted: no later entry can score higher
            self.exact_scores += 1
            score = rouge_l(tokens, self.tokens[entry])
            if score >= self.threshold and (best is None or score > best.score or (
                    score == best.score and entry < best.entry)):
                best = Match(int(entry), score)  # ties: the earliest entry, as argmax picks
        return best


def all_pairs_best(tokens: Sequence[str], pool: Sequence[Sequence[str]], threshold: float
                   ) -> Match | None:
    """Alpaca's loop, for reference: score against every pool entry (O(len(pool)) LCS tables)."""
    if not pool:
        return None
    scores = [rouge_l(tokens, other) for other in pool]
    entry = int(np.argmax(scores))
    return Match(entry, scores[entry]) if scores[entry] >= threshold else None
