"""Reference-based text metrics that need no judge model: ROUGE-L F1 and exact match.

Book ch. 7.8 ("Evaluating the finetuned LLM") scores responses with an LLM judge (see :mod:`stages.judge`);
these metrics are the cheap, deterministic companion that compares a response with the test set's reference
``output`` directly. ROUGE-L is from Lin (2004), "ROUGE: A Package for Automatic Evaluation of Summaries",
section 3.1: the longest common subsequence (LCS) of the two token sequences gives
``R = LCS / len(reference)``, ``P = LCS / len(candidate)`` and ``F = (1 + b^2) R P / (R + b^2 P)``; we use
``b = 1`` (the harmonic mean), the usual choice for single-reference sentence-level scoring.

Pure functions, no I/O.
"""

from __future__ import annotations

import unicodedata

__all__ = ["exact_match", "lcs_length", "normalize", "rouge_l_f1"]


def _is_punctuation(ch: str) -> bool:
    # Unicode category P* (Pc Pd Ps Pe Pi Pf Po): ASCII punctuation plus curly quotes, dashes, "…" and so on.
    # Symbols (S*: "+", "=", "$", "%") are kept: in arithmetic answers they carry meaning.
    return unicodedata.category(ch).startswith("P")


def normalize(text: str) -> list[str]:
    """Tokens for comparison: lowercase, delete punctuation, split on whitespace.

    Exactly: ``str.lower()``; every character whose Unicode category is punctuation (``P*``) is deleted, not
    replaced by a space (so ``"don't"`` -> ``"dont"``, ``"well-known"`` -> ``"wellknown"``, ``"3.14"`` ->
    ``"314"``, as in the SQuAD answer normalization); then ``str.split()`` (any run of Unicode whitespace).
    Symbols such as ``+ = $ %`` are kept. Articles are not removed. ``normalize("")`` is ``[]``.
    """
    lowered = text.lower()
    stripped = "".join(ch for ch in lowered if not _is_punctuation(ch))
    return stripped.split()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    # Classic DP over prefixes, keeping only the previous row: responses are short, so this is plenty.
    prev = [0] * (len(b) + 1)
    for token in a:
        cur = [0] * (len(b) + 1)
        for j, other in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if token == other else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l_f1(candidate: str, reference: str) -> float:
    """Sentence-level ROUGE-L F1 (Lin 2004, beta = 1) over :func:`normalize` tokens.

    ``2 * P * R / (P + R)`` with ``P = LCS / len(candidate)``, ``R = LCS / len(reference)``; 0.0 when the LCS
    is empty. Edge cases: if both texts normalize to no tokens the score is **1.0** (they are identical, the
    same answer :func:`exact_match` gives); if exactly one is empty it is 0.0.
    """
    cand, ref = normalize(candidate), normalize(reference)
    if not cand and not ref:
        return 1.0
    lcs = lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision = lcs / len(cand)
    recall = lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(candidate: str, reference: str) -> bool:
    """True when both texts have the same :func:`normalize` tokens (so two empty texts match)."""
    return normalize(candidate) == normalize(reference)
