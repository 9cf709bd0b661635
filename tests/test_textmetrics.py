"""Reference-based metrics (companion to book ch. 7.8): normalization, LCS, ROUGE-L F1 (Lin 2004), exact match.

Every expected value is computed by hand in the comment beside it.
"""

from __future__ import annotations

import pytest

from gptlab.textmetrics import exact_match, lcs_length, normalize, rouge_l_f1

# --- normalize ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("The Cat SAT.", ["the", "cat", "sat"]),
        ("  hello,\tworld!\n\nbye  ", ["hello", "world", "bye"]),
        # Punctuation is deleted, not turned into a space: contractions and hyphenated words stay one token.
        ("Don't stop well-known", ["dont", "stop", "wellknown"]),
        # Unicode punctuation too: curly quotes, em dash, ellipsis.
        ("\u201cYes\u201d \u2014 maybe\u2026", ["yes", "maybe"]),
        ("3.14", ["314"]),
        # Symbols are not punctuation: arithmetic answers keep their operators.
        ("5 + 3 = 8.", ["5", "+", "3", "=", "8"]),
        ("", []),
        ("?!...", []),
    ],
)
def test_normalize(text: str, tokens: list[str]):
    assert normalize(text) == tokens


# --- lcs_length ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "n"),
    [
        ("the cat sat on the mat", "the cat is on the mat", 5),  # "the cat on the mat"
        ("a b c d", "d c b a", 1),
        ("a b c b d a b", "b d c a b a", 4),  # CLRS's example: "b c b a"
        ("a", "", 0),
        ("", "", 0),
        ("x y", "z w", 0),
    ],
)
def test_lcs_length(a: str, b: str, n: int):
    assert lcs_length(a.split(), b.split()) == n
    assert lcs_length(b.split(), a.split()) == n


# --- rouge_l_f1 ---------------------------------------------------------------------------------------------


def test_rouge_l_the_cat_example():
    # LCS = 5 ("the cat on the mat"); P = 5/6, R = 5/6, F1 = 5/6.
    assert rouge_l_f1("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)


def test_rouge_l_lins_paper_example():
    # Lin 2004, section 3.1: reference S1 "police killed the gunman".
    # S2 "police kill the gunman": LCS 3 ("police the gunman"), P = R = 3/4 -> 0.75.
    # S3 "the gunman kill police": LCS 2 ("the gunman"), P = R = 2/4 -> 0.5; S2 ranks above S3.
    ref = "police killed the gunman"
    assert rouge_l_f1("police kill the gunman", ref) == pytest.approx(0.75)
    assert rouge_l_f1("the gunman kill police", ref) == pytest.approx(0.5)


def test_rouge_l_unequal_lengths():
    # LCS 2; P = 2/2 = 1, R = 2/6 = 1/3; F1 = 2 * 1 * 1/3 / (1 + 1/3) = 0.5.
    assert rouge_l_f1("the cat", "the cat sat on the mat") == pytest.approx(0.5)
    # F1 is symmetric in its arguments (P and R swap).
    assert rouge_l_f1("the cat sat on the mat", "the cat") == pytest.approx(0.5)


def test_rouge_l_repeated_tokens_count_once_in_lcs():
    # LCS 1; P = 1/3, R = 1/1; F1 = 2 * (1/3) / (4/3) = 0.5.
    assert rouge_l_f1("the the the", "the") == pytest.approx(0.5)


def test_rouge_l_order_matters():
    # LCS 1; P = R = 1/4 -> 0.25, although every token is shared.
    assert rouge_l_f1("a b c d", "d c b a") == pytest.approx(0.25)


def test_rouge_l_ignores_case_and_punctuation():
    assert rouge_l_f1("The cat, sat!", "the cat sat") == 1.0


@pytest.mark.parametrize(
    ("candidate", "reference", "score"),
    [
        ("", "", 1.0),  # both empty: identical, pinned to 1.0 (same as exact_match)
        ("!!!", " ... ", 1.0),  # both normalize to no tokens
        ("", "the answer", 0.0),
        ("the answer", "", 0.0),
        ("completely different", "nothing shared", 0.0),
    ],
)
def test_rouge_l_edge_cases(candidate: str, reference: str, score: float):
    assert rouge_l_f1(candidate, reference) == score


# --- exact_match --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidate", "reference", "expected"),
    [
        ("Occasion.", "occasion", True),
        ("  The   sun rises  in the east! ", "the sun rises in the east", True),
        ("the cat", "cat the", False),
        ("the cat", "the cat sat", False),
        ("", "   ", True),
        ("", "x", False),
    ],
)
def test_exact_match(candidate: str, reference: str, expected: bool):
    assert exact_match(candidate, reference) is expected
