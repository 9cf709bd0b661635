"""Judge replies to scores, and scores to summaries (book ch. 7.8): the pure half of :mod:`stages.judge`.

:func:`parse_score` turns a judge's reply into an int in 0..100 or None (it never guesses);
:func:`summarize_scores`, :func:`summarize_repeats` and :func:`compare_pairwise` (e.g. SFT vs DPO on the same
records) turn score lists into the evaluate stage's metrics.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = ["compare_pairwise", "parse_score", "summarize_repeats", "summarize_scores"]

# --- parsing ------------------------------------------------------------------------------------------------

# A number not glued to a word or a decimal point on its left ("gpt2", "v1.5" do not yield 2 / 5); a leading
# minus is kept so "-5" is rejected as out of range rather than read as 5.
_NUMBER = r"-?\d+(?:\.\d+)?"
_NUMBER_RE = re.compile(rf"(?<![\w.])({_NUMBER})(?![\w])")
# "85/100", "85 / 100", "85 out of 100": the denominator is the scale, not a second score.
_FRACTION_RE = re.compile(rf"(?<![\w.])({_NUMBER})\s*(?:/|out\s+of)\s*({_NUMBER})(?![\w])", re.IGNORECASE)
# "Score: 85", "**Score:** 85", '"score": 85', "a score of 85", "score is 85", "Rating = 85".
_LABEL_RE = re.compile(
    rf"\b(?:score|rating)\b[\"'*_`]*\s*(?:[:=]|is|of)?\s*[\"'*_`]*\s*({_NUMBER})(?![\w])", re.IGNORECASE
)
# A first line that is only a number ("85", "**85**", "85/100."): the prompt asks for the number only, so what
# follows is commentary, and numbers in it must not make the reply ambiguous.
_BARE_RE = re.compile(rf"[*_`\"'\s]*({_NUMBER})(?:\s*(?:/|out\s+of)\s*100)?[*_`\"'.\s]*", re.IGNORECASE)
_NOT_JSON = object()


def _as_score(value: Decimal) -> int | None:
    # Reject (never clamp) what is outside the scale or not an integer: a judge that says 150 or 85.5 did not
    # follow the instructions, and clamping would invent a score it never gave.
    if value != value.to_integral_value() or not 0 <= value <= 100:
        return None
    return int(value)


def _from_text(text: str) -> int | None:
    bare = _BARE_RE.fullmatch(text.strip().splitlines()[0])
    if bare:
        return _as_score(Decimal(bare.group(1)))
    fractions = list(_FRACTION_RE.finditer(text))
    if any(Decimal(m.group(2)) != 100 for m in fractions):
        return None  # "8/10" is another scale; rescaling would be a guess
    # Replace each "N/100" by its numerator so the 100 is not counted as a second number.
    text = _FRACTION_RE.sub(lambda m: f" {m.group(1)} ", text)
    labeled = {Decimal(v) for v in _LABEL_RE.findall(text)}
    # An explicit "score: N" wins over other numbers in an explanation ("... 45 km is 45000 m. Score: 95").
    values = labeled or {Decimal(v) for v in _NUMBER_RE.findall(text)}
    if len(values) != 1:
        return None  # no number, or several different ones ("70 or 80"): ambiguous, so no score
    return _as_score(values.pop())


def _from_json(text: str) -> object:
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return _NOT_JSON
    if isinstance(data, dict):
        if "score" not in data:
            return None
        data = data["score"]
    if isinstance(data, bool):
        return None  # JSON true is an int to Python, not a score
    if isinstance(data, int):
        return _as_score(Decimal(data))
    if isinstance(data, float):
        return _as_score(Decimal(repr(data))) if math.isfinite(data) else None
    if isinstance(data, str):
        return _from_text(data.strip()) if data.strip() else None
    return None


def parse_score(reply: str) -> int | None:
    """The judge's score in 0..100, or None when the reply does not state exactly one.

    Rules, in order:

    1. Surrounding whitespace is ignored; an empty reply is None.
    2. If the whole reply is JSON: an object's ``"score"`` (an int, an integral float such as ``85.0``, or a
       string parsed by rules 3-5, so ``{"score": "85"}`` works); a bare number or string likewise. An object
       without ``"score"``, a list, a bool or null is None.
    3. Otherwise, if the first line is only a number (``85``, ``**85**``, ``85/100``), that is the score and the
       rest is commentary (``"85\\n\\nIt misses 2 points."`` gives 85).
    4. Otherwise the text is scanned for numbers. ``N/100`` and ``N out of 100`` count as ``N``; a fraction with
       any other denominator (``8/10``) is None: another scale, not rescaled. If the reply labels a score
       (``Score: 85``, ``**Score:** 85``, ``a score of 85``, ``"score": 85``) only the labelled numbers count,
       else every number does. Exactly one distinct value must remain (``"85 ... 85"`` is fine); zero or
       several (``"70 or 80"``) is ambiguous and gives None. Markdown around the number (``**85**``) is fine.
    5. The value must be an integer in 0..100: ``150``, ``-5`` and ``85.5`` give None (rejected, not clamped).

    Words are not numbers: ``"eighty"`` is None, as is ``"I cannot score this"``.
    """
    if not isinstance(reply, str):
        return None
    text = reply.strip()
    if not text:
        return None
    try:
        from_json = _from_json(text)
        if from_json is not _NOT_JSON:
            return from_json  # type: ignore[return-value]
        return _from_text(text)
    except InvalidOperation:  # pragma: no cover - the regexes only pass Decimal-parsable text
        return None


# --- summaries ----------------------------------------------------------------------------------------------


def summarize_scores(scores: list[int | None]) -> dict[str, Any]:
    """``{"n", "scored", "unparsed", "mean", "median", "min", "max"}``; the statistics cover parsed scores only
    and are None when nothing was parsed. ``mean`` and ``median`` are floats, ``min``/``max`` ints."""
    parsed = [s for s in scores if s is not None]
    summary: dict[str, Any] = {"n": len(scores), "scored": len(parsed), "unparsed": len(scores) - len(parsed)}
    if parsed:
        summary |= {
            "mean": float(statistics.fmean(parsed)),
            "median": float(statistics.median(parsed)),
            "min": min(parsed),
            "max": max(parsed),
        }
    else:
        summary |= {"mean": None, "median": None, "min": None, "max": None}
    return summary


def summarize_repeats(runs: list[list[int | None]]) -> dict[str, Any]:
    """Repeatability of a judge asked the same questions ``len(runs)`` times (``runs[k][i]``: repeat ``k``'s
    score of response ``i``).

    Returns ``per_response`` — ``{"mean", "std"}`` over the parsed scores of each response (None when none
    parsed; ``std`` is the population standard deviation, 0.0 for one score) — and, for the whole set, the
    mean score of each repeat (``run_means``) with their mean and standard deviation (``mean``, ``std``): how
    far the headline number moves from one run of the judge to the next.
    """
    if not runs or len({len(r) for r in runs}) != 1:
        raise ValueError("summarize_repeats needs one or more runs over the same responses")
    per_response = []
    for scores in zip(*runs, strict=True):
        parsed = [s for s in scores if s is not None]
        per_response.append(
            {
                "mean": float(statistics.fmean(parsed)) if parsed else None,
                "std": float(statistics.pstdev(parsed)) if parsed else None,
            }
        )
    run_means = [summarize_scores(r)["mean"] for r in runs]
    known = [m for m in run_means if m is not None]
    return {
        "per_response": per_response,
        "run_means": run_means,
        "mean": float(statistics.fmean(known)) if known else None,
        "std": float(statistics.pstdev(known)) if known else None,
    }


def compare_pairwise(a: list[int | None], b: list[int | None]) -> dict[str, Any]:
    """Record-by-record comparison of two score lists over the same records (e.g. ``a`` = SFT, ``b`` = DPO).

    Only records scored in both count: ``compared``; ``skipped`` = the rest. ``wins`` = records where
    ``b > a``, ``ties``, ``losses`` (``b < a``); ``mean_difference`` = mean of ``b - a``; ``win_rate`` =
    ``wins / compared`` (ties count as non-wins). Both are None when nothing is compared. Lists of different
    lengths raise ValueError.
    """
    if len(a) != len(b):
        raise ValueError(
            f"compare_pairwise needs lists over the same records, got lengths {len(a)} and {len(b)}"
        )
    diffs = [y - x for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    wins = sum(d > 0 for d in diffs)
    compared = len(diffs)
    return {
        "wins": wins,
        "ties": sum(d == 0 for d in diffs),
        "losses": sum(d < 0 for d in diffs),
        "compared": compared,
        "skipped": len(a) - compared,
        "mean_difference": float(statistics.fmean(diffs)) if diffs else None,
        "win_rate": wins / compared if compared else None,
    }
