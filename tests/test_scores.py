"""Judge replies to scores and score summaries (:mod:`stages.scores`), hand-computed."""

from __future__ import annotations

import pytest

from stages.scores import compare_pairwise, parse_score, summarize_repeats, summarize_scores


def statistics_pstdev(values: list[float]) -> float:
    """The population standard deviation, by hand."""
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("85", 85),
        (" 85\n", 85),
        ("Score: 85", 85),
        ("85/100", 85),
        ("85 / 100", 85),
        ('{"score": 85}', 85),
        ('{"score": "85"}', 85),
        ('{"score": 85.0}', 85),
        ('{ "score" : 85 }\n', 85),
        ("**85**", 85),
        ("**Score:** 85", 85),
        ("0", 0),
        ("100", 100),
        ("I would score this response 85 out of 100.", 85),
        ("85.", 85),
        ("85\n\n85", 85),  # the same number twice is not ambiguous
        # A first line that is only the number wins over numbers in the commentary below it.
        ("85\n\nThe response is correct but misses 2 of the 3 key points.", 85),
        ("**90/100**\n\n1. Accuracy ...", 90),
        ("150\n\nIt is great.", None),
        ("I would rate this response a 90.", 90),
        ("Score: 85\n\nThe model response correctly identifies 3 of 4 errors.", 85),
        # A labelled score wins over numbers in the explanation.
        ("The response converts 45 km to 45000 m correctly. Score: 95", 95),
        ('```json\n{"score": 72}\n```', 72),
        # Rejected, not guessed.
        ("eighty", None),
        ("", None),
        ("   \n", None),
        ("I cannot score this", None),
        ("70 or 80", None),
        ("85-90", None),
        ("Score: 70. On reflection, score: 80", None),
        ("150", None),
        ('{"score": 150}', None),
        ("-5", None),
        ("85.5", None),
        ("8/10", None),  # another scale: not rescaled
        ('{"rating": 85}', None),
        ('{"score": null}', None),
        ('{"score": true}', None),
        ("[85]", None),
        ("null", None),
    ],
)
def test_parse_score(reply: str, score: int | None):
    assert parse_score(reply) == score


def test_summarize_scores():
    # Parsed: 80, 60, 100 -> mean 240/3 = 80, median 80, min 60, max 100.
    assert summarize_scores([80, None, 60, 100, None]) == {
        "n": 5,
        "scored": 3,
        "unparsed": 2,
        "mean": 80.0,
        "median": 80.0,
        "min": 60,
        "max": 100,
    }
    # Even count: median is the mean of the middle two, (20 + 30) / 2 = 25.
    summary = summarize_scores([40, 10, 30, 20])
    assert (summary["mean"], summary["median"]) == (25.0, 25.0)


@pytest.mark.parametrize("scores", [[], [None, None]])
def test_summarize_scores_with_nothing_parsed(scores: list):
    summary = summarize_scores(scores)
    assert summary == {
        "n": len(scores),
        "scored": 0,
        "unparsed": len(scores),
        "mean": None,
        "median": None,
        "min": None,
        "max": None,
    }


def test_compare_pairwise():
    a = [50, 60, None, 70, 80]
    b = [60, 60, 90, 65, None]
    # Both scored at 0, 1, 3: b - a = 10, 0, -5 -> 1 win, 1 tie, 1 loss; mean 5/3; win rate 1/3.
    result = compare_pairwise(a, b)
    assert result == {
        "wins": 1,
        "ties": 1,
        "losses": 1,
        "compared": 3,
        "skipped": 2,
        "mean_difference": pytest.approx(5 / 3),
        "win_rate": pytest.approx(1 / 3),
    }


def test_compare_pairwise_nothing_comparable_and_length_mismatch():
    result = compare_pairwise([None, 10], [20, None])
    assert result["compared"] == 0 and result["mean_difference"] is None and result["win_rate"] is None
    with pytest.raises(ValueError, match="lengths 2 and 1"):
        compare_pairwise([1, 2], [1])


def test_summarize_repeats_hand_computed():
    # Three repeats over three responses; response 2 was unparsable once.
    runs = [[80, 40, None], [90, 40, 10], [70, 40, 30]]
    out = summarize_repeats(runs)
    assert out["per_response"][0] == {"mean": 80.0, "std": pytest.approx((200 / 3) ** 0.5)}
    assert out["per_response"][1] == {"mean": 40.0, "std": 0.0}
    assert out["per_response"][2] == {"mean": 20.0, "std": 10.0}
    assert out["run_means"] == [60.0, pytest.approx(140 / 3), pytest.approx(140 / 3)]
    assert out["mean"] == pytest.approx((60 + 280 / 3) / 3)
    assert out["std"] == pytest.approx(statistics_pstdev([60, 140 / 3, 140 / 3]))
    with pytest.raises(ValueError, match="same responses"):
        summarize_repeats([[1, 2], [3]])
