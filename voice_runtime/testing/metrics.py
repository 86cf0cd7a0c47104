"""Measures for tests of spoken conversations: word errors and word accuracy."""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["word_accuracy", "word_errors", "words"]


def words(text: str) -> list[str]:
    """Lower-case words of ``text``, punctuation dropped."""
    return re.findall(r"[a-z0-9']+", text.lower())


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """Word-level edit distance between the texts, and the reference's word count."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, hyp_word in enumerate(hyp, 1):
            current = min(row[j] + 1, row[j - 1] + 1, previous + (ref_word != hyp_word))
            previous, row[j] = row[j], current
    return row[len(hyp)], len(ref)


def word_accuracy(pairs: Iterable[tuple[str, str]]) -> float:
    """1 - word error rate over (reference, hypothesis) pairs."""
    errors = total = 0
    for reference, hypothesis in pairs:
        e, n = word_errors(reference, hypothesis)
        errors += e
        total += n
    return 1.0 - errors / total if total else 1.0
