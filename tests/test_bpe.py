"""Byte-level BPE from scratch: exact parity with tiktoken's GPT-2 encoding, plus training/persistence checks."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import regex

from gptlab.bpe import GPT2_SPLIT_PATTERN, BPETokenizer, bytes_to_unicode

EOT = "<|endoftext|>"

PARITY_TEXTS = [
    "",
    "Hello, world!",
    "Héllo wörld, ça va? naïve café Ångström",
    "日本語のテキストと中文文本，한국어도.",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "combining: e\u0301 a\u0308 n\u0303 \u0301\u0301 Z\u0351\u0359\u0350",
    "  leading spaces and trailing spaces   ",
    "tabs\tand\t\ttabs\t",
    "newlines\n\n\nparagraph\r\nwindows\rold mac\n",
    "\n\n\n",
    " ",
    "   \n  \t x",
    "nbsp\u00a0here and\u2028line sep and\u3000ideographic space",
    "don't I'll they're WE'VE she's HE'S I'm you'd 'twas ''quoted'' rock'n'roll",
    "3.14159 1,000,000 2024-11-24 0x1F 1e-9 12345678901234567890 ½ ² ٣",
    "Punctuation!!! ...? (parens) [brackets] {braces} <angle> --- ___ @#$%^&*~`|\\/",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nif __name__ == '__main__':\n\tprint(f(3))\n",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "mIxEd CaSe and ALLCAPS and camelCaseIdentifiers and snake_case_names",
    "\x00\x01\x7f control bytes \x1b[31mred\x1b[0m",
]


def _tiktoken_gpt2(shared_dir: Path):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = load_tiktoken_bpe(str(shared_dir / "tokenizers" / "r50k_base.tiktoken"))
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT: 50256},
        explicit_n_vocab=50257,
    )


@pytest.fixture(scope="module")
def enc(shared_dir: Path):
    return _tiktoken_gpt2(shared_dir)


@pytest.fixture(scope="module")
def gpt2(shared_dir: Path) -> BPETokenizer:
    tok = shared_dir / "tokenizers"
    return BPETokenizer.from_gpt2_files(tok / "encoder.json", tok / "vocab.bpe")


@pytest.fixture(scope="module")
def verdict(shared_dir: Path) -> str:
    return (shared_dir / "datasets" / "the-verdict.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def trained(verdict: str) -> BPETokenizer:
    return BPETokenizer.train(verdict, 1000, special_tokens=[EOT])


# ---------------------------------------------------------------------------------------- GPT-2 parity


def test_gpt2_files_shape(gpt2: BPETokenizer) -> None:
    assert gpt2.vocab_size == 50257
    assert len(gpt2.merges) == 50000
    assert gpt2.special_tokens == {EOT: 50256}
    # ids 0..255 of GPT-2 are the byte symbols in bytes_to_unicode order.
    assert [gpt2.vocab[c] for c in bytes_to_unicode().values()] == list(range(256))


@pytest.mark.parametrize("text", PARITY_TEXTS, ids=range(len(PARITY_TEXTS)))
def test_gpt2_parity_with_tiktoken(gpt2: BPETokenizer, enc, text: str) -> None:
    ids = gpt2.encode(text)
    assert ids == enc.encode(text)
    assert gpt2.decode(ids) == text


def test_gpt2_parity_on_the_verdict(gpt2: BPETokenizer, enc, verdict: str) -> None:
    ids = gpt2.encode(verdict)
    assert ids == enc.encode(verdict)
    assert len(ids) == 5145  # the book's ch. 2 count for this file
    assert gpt2.decode(ids) == verdict


def test_gpt2_parity_random_fuzz(gpt2: BPETokenizer, enc) -> None:
    # Random strings dense in the pattern's edge cases: whitespace runs before letters, contractions
    # in both cases, digits, non-ASCII letters, combining marks, emoji.
    palette = list("aZé \t\n\r's1,.-!日😀\u0301\u00a0") + ["'S", "'ll", "'VE", "'re", "'d", "  ", "\n\n"]
    rng = random.Random(1234)
    for _ in range(2000):
        s = "".join(rng.choice(palette) for _ in range(rng.randint(0, 20)))
        assert gpt2.encode(s) == enc.encode(s), repr(s)


def test_split_pattern_matches_tiktoken_r50k_on_tests() -> None:
    # tiktoken's r50k pattern uses possessive quantifiers, `\s++$` and a final `\s`; the plain GPT-2
    # pattern must split our texts identically (that is why plain GPT2_SPLIT_PATTERN is good enough).
    r50k_pat_str = pytest.importorskip("tiktoken_ext.openai_public").r50k_pat_str
    for text in PARITY_TEXTS:
        assert regex.findall(GPT2_SPLIT_PATTERN, text) == regex.findall(r50k_pat_str, text), repr(text)


def test_contractions_are_case_sensitive() -> None:
    assert regex.findall(GPT2_SPLIT_PATTERN, "don't DON'T") == ["don", "'t", " DON", "'", "T"]


def test_gpt2_special_tokens_match_tiktoken(gpt2: BPETokenizer, enc) -> None:
    text = f"first doc{EOT}second doc {EOT} third{EOT}{EOT}"
    ids = gpt2.encode(text, allowed_special="all")
    assert ids == enc.encode(text, allowed_special="all")
    assert ids.count(50256) == 4
    assert gpt2.encode(text, allowed_special={EOT}) == ids
    assert gpt2.decode(ids) == text
    # disallowed_special=() encodes the marker as plain text, like tiktoken.
    plain = gpt2.encode(text, disallowed_special=())
    assert plain == enc.encode(text, disallowed_special=()) == gpt2.encode_ordinary(text)
    assert 50256 not in plain


def test_special_token_raises_by_default(gpt2: BPETokenizer) -> None:
    with pytest.raises(ValueError, match=regex.escape(EOT)):
        gpt2.encode(f"some text {EOT} more")
    with pytest.raises(ValueError, match="lacks"):
        gpt2.encode("x", allowed_special={"<|unknown|>"})


def test_gpt2_decode_invalid_utf8_replaces_like_tiktoken(gpt2: BPETokenizer, enc) -> None:
    ids = enc.encode("😀 snow☃")
    for k in range(len(ids) + 1):
        assert gpt2.decode(ids[:k]) == enc.decode(ids[:k])
        assert gpt2.decode_bytes(ids[:k]) == enc.decode_bytes(ids[:k])
    with pytest.raises(ValueError, match="unknown token id"):
        gpt2.decode([50257])


# ---------------------------------------------------------------------------------------- training


def _naive_train(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Reference trainer: recount every pair after every merge; same tie-break (smallest id pair)."""
    byte_syms = list(bytes_to_unicode().values())
    tok_to_id = {t: i for i, t in enumerate(byte_syms)}
    b2u = bytes_to_unicode()
    words = Counter(tuple(b2u[b] for b in w.encode("utf-8")) for w in regex.findall(GPT2_SPLIT_PATTERN, text))
    merges = []
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:], strict=False):
                pairs[p] += f
        if not pairs:
            break
        a, b = min(pairs, key=lambda p: (-pairs[p], tok_to_id[p[0]], tok_to_id[p[1]]))
        merges.append((a, b))
        tok_to_id.setdefault(a + b, len(tok_to_id))
        new_words: Counter[tuple[str, ...]] = Counter()
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if i < len(w) - 1 and (w[i], w[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += f
        words = new_words
    return merges


def test_wikipedia_example_hand_checked() -> None:
    # en.wikipedia.org/wiki/Byte_pair_encoding: aa -> Z, then ab -> Y (ties with Za, smaller ids win),
    # then ZY -> X; "aaabdaaabac" becomes "XdXac".
    tok = BPETokenizer.train("aaabdaaabac", 256 + 3)
    assert tok.merges == [("a", "a"), ("a", "b"), ("aa", "ab")]
    ids = tok.encode("aaabdaaabac")
    assert [tok.decode([i]) for i in ids] == ["aaab", "d", "aaab", "a", "c"]
    assert tok.vocab_size == 259


def test_first_merge_is_most_frequent_pair() -> None:
    # Pre-tokens: "hug", " hug" x2, " pug", " pun", " bun", " hugs"; ("u", "g") occurs 5 times, ("h", "u") 4.
    tok = BPETokenizer.train("hug hug hug pug pun bun hugs", 257)
    assert tok.merges == [("u", "g")]
    tok = BPETokenizer.train("hug hug hug pug pun bun hugs", 258)
    assert tok.merges == [("u", "g"), ("h", "ug")]


def test_incremental_training_matches_naive_reference(verdict: str) -> None:
    text = verdict[:4000]
    tok = BPETokenizer.train(text, 256 + 150)
    assert tok.merges == _naive_train(text, 150)


def test_training_is_deterministic(verdict: str, trained: BPETokenizer) -> None:
    again = BPETokenizer.train(verdict, 1000, special_tokens=[EOT])
    assert again.merges == trained.merges
    assert again.vocab == trained.vocab
    assert trained.vocab_size == 1000
    assert trained.special_tokens == {EOT: 999}


def test_merges_compress_and_round_trip_unseen_text(verdict: str, trained: BPETokenizer) -> None:
    sample = verdict[5000:9000]
    assert len(trained.encode(sample)) < 0.5 * len(sample.encode("utf-8"))
    unseen = "Unseen: Zürich, 東京, naïve façade — 🚀 résumé\t\n  don't STOP 42.0 <tag/>"
    ids = trained.encode(unseen)
    assert trained.decode(ids) == unseen
    assert all(0 <= i < trained.vocab_size for i in ids)


def test_training_excludes_special_token_text() -> None:
    text = f"hello world{EOT}" * 50
    tok = BPETokenizer.train(text, 300, special_tokens=[EOT])
    assert not any("endoftext" in tok.decode([i]) for i in tok.vocab.values())
    ids = tok.encode(text, allowed_special="all")
    assert ids.count(tok.special_tokens[EOT]) == 50
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match="endoftext"):
        tok.encode(text)


def test_training_stops_when_no_pairs_left_and_validates_size(capsys: pytest.CaptureFixture[str]) -> None:
    tok = BPETokenizer.train("ab", 1000, verbose=True)
    assert tok.merges == [("a", "b")] and tok.vocab_size == 257
    assert "merge" in capsys.readouterr().out
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train("ab", 256, special_tokens=[EOT])


def test_training_speed(verdict: str) -> None:
    import time

    t0 = time.perf_counter()
    BPETokenizer.train(verdict, 1000)
    assert time.perf_counter() - t0 < 2.0


# ---------------------------------------------------------------------------------------- persistence


def test_save_load_round_trip(tmp_path: Path, trained: BPETokenizer, verdict: str) -> None:
    path = tmp_path / "tok.json"
    trained.save(path)
    trained.save(path)  # overwriting is fine and leaves no temp files behind
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]
    loaded = BPETokenizer.load(path)
    assert loaded.merges == trained.merges
    assert loaded.vocab == trained.vocab
    assert loaded.special_tokens == trained.special_tokens
    assert loaded.pattern == trained.pattern
    text = verdict[:3000] + f"{EOT} ünïcødé 🤖"
    assert loaded.encode(text, allowed_special="all") == trained.encode(text, allowed_special="all")


def test_save_load_gpt2_round_trip(tmp_path: Path, gpt2: BPETokenizer, enc) -> None:
    path = tmp_path / "gpt2.json"
    gpt2.save(path)
    loaded = BPETokenizer.load(path)
    text = PARITY_TEXTS[3] + PARITY_TEXTS[13]
    assert loaded.encode(text) == enc.encode(text)


def _valid_payload(tok: BPETokenizer) -> dict:
    return {
        "format": "gptlab-bpe",
        "version": 1,
        "pattern": tok.pattern,
        "special_tokens": tok.special_tokens,
        "merges": [list(m) for m in tok.merges],
        "vocab": tok.vocab,
    }


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: "not json {",
        lambda d: json.dumps([1, 2, 3]),
        lambda d: json.dumps({**d, "format": "other"}),
        lambda d: json.dumps({**d, "version": 99}),
        lambda d: json.dumps({k: v for k, v in d.items() if k != "merges"}),
        lambda d: json.dumps({**d, "merges": [["a"]]}),
        lambda d: json.dumps({**d, "merges": [["zz", "qq"]]}),
        lambda d: json.dumps({**d, "vocab": {"a": 0}}),
        lambda d: json.dumps({**d, "vocab": {**d["vocab"], "extra": 0}}),
        lambda d: json.dumps({**d, "pattern": "(unclosed"}),
    ],
    ids=[
        "not-json",
        "not-object",
        "format",
        "version",
        "missing-key",
        "bad-pair",
        "unknown-merge",
        "missing-bytes",
        "dup-id",
        "bad-pattern",
    ],
)
def test_load_malformed_raises_clear_error(tmp_path: Path, trained: BPETokenizer, mutate) -> None:
    path = tmp_path / "bad.json"
    path.write_text(mutate(_valid_payload(trained)), encoding="utf-8")
    with pytest.raises(ValueError) as exc:
        BPETokenizer.load(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "\n" not in msg
