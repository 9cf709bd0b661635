"""Stage ``tokenize``: chunked, multiprocess tokenization equals tiktoken on the whole text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gptlab.data import TokenStream
from gptlab.tokenizer import encode
from stages.tokenize import TokenizeParams, count_chars, read_chunks, tokenize_corpus


def test_chunks_reassemble_and_cut_before_line_breaks(tmp_path) -> None:
    text = "Para one.\n\nPara two has  spaces.\n  \n\nThird\r\nline ünïcode.\n" * 200
    path = tmp_path / "c.txt"
    path.write_text(text, encoding="utf-8", newline="")
    chunks = list(read_chunks(path, 1024))
    assert len(chunks) > 5 and "".join(chunks) == text
    assert all(c[-1] not in " \n" for c in chunks[:-1])


@pytest.mark.parametrize("workers", [1, 2])
def test_sharded_tokens_equal_whole_text_encoding(shared_dir: Path, tmp_path: Path, workers: int) -> None:
    corpus = shared_dir / "datasets" / "the-verdict.txt"
    params = TokenizeParams(val_fraction=0.1, shard_size=1000, workers=workers, chunk_chars=1024)
    manifest = tokenize_corpus(corpus, tmp_path / "tokens", params, progress=False)
    expected = encode(corpus.read_text(encoding="utf-8"))
    assert manifest["num_tokens"] == len(expected) == 5145  # the book's ch. 2 count
    whole = TokenStream(tmp_path / "tokens", None)
    np.testing.assert_array_equal(whole.read(0, len(whole)), expected)
    assert len(TokenStream(tmp_path / "tokens", "val")) == len(expected) - int(0.9 * len(expected))
    assert manifest["dtype"] == "uint16" and len(manifest["shards"]) == 6


def test_params_validation() -> None:
    with pytest.raises(ValueError, match="chunk_chars"):
        TokenizeParams(chunk_chars=10)


def test_split_by_chars_is_the_books_ch5_split(shared_dir: Path, tmp_path: Path) -> None:
    """text[:int(0.9 * len(text))] and the rest, each tokenized on its own (the book's ch. 5 loaders)."""
    corpus = shared_dir / "datasets" / "the-verdict.txt"
    text = corpus.read_text(encoding="utf-8")
    cut = int(0.9 * len(text))
    params = TokenizeParams(val_fraction=0.1, split_by="chars", shard_size=1000, workers=1, chunk_chars=1024)
    manifest = tokenize_corpus(corpus, tmp_path / "tokens", params, progress=False)
    train, val = TokenStream(tmp_path / "tokens", "train"), TokenStream(tmp_path / "tokens", "val")
    np.testing.assert_array_equal(train.read(0, len(train)), encode(text[:cut]))
    np.testing.assert_array_equal(val.read(0, len(val)), encode(text[cut:]))
    assert (len(train), len(val)) == (4612, 534)  # 5146: the cut splits a word into two tokens
    assert manifest["splits"] == {"train": [0, 4612], "val": [4612, 5146]}


def test_read_chunks_of_a_character_range(tmp_path) -> None:
    text = "ab\ncd ünï\nxyz\n" * 300
    path = tmp_path / "c.txt"
    path.write_text(text, encoding="utf-8", newline="")
    assert "".join(read_chunks(path, 1024, stop=1000)) == text[:1000]
    assert "".join(read_chunks(path, 1024, start=1000)) == text[1000:]
    assert count_chars(path) == len(text)


def test_split_by_is_validated() -> None:
    with pytest.raises(ValueError, match="split_by"):
        TokenizeParams(split_by="words")


@pytest.mark.parametrize("workers", [1, 2])
def test_non_utf8_corpus_names_file_and_line(tmp_path: Path, workers: int) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(("Some text.\n" * 3000).encode() + b"caf\xe9 au lait\n" + b"more\n" * 10)
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "old").write_text("kept")
    params = TokenizeParams(workers=workers, chunk_chars=1024)
    with pytest.raises(ValueError, match=r"corpus\.txt: line 3001, column 4: byte 0xe9 is not UTF-8"):
        tokenize_corpus(corpus, tmp_path / "tokens", params, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "tokens"]
    assert [p.name for p in (tmp_path / "tokens").iterdir()] == ["old"]


def test_empty_or_too_short_corpus_fails_here(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("")
    params = TokenizeParams(workers=1)
    with pytest.raises(ValueError, match=r"corpus\.txt: empty"):
        tokenize_corpus(corpus, tmp_path / "tokens", params, window=4, progress=False)
    corpus.write_text("one two three four five six seven eight nine ten eleven twelve thirteen fourteen")
    with pytest.raises(ValueError, match=r"the val split has 2 tokens, fewer than one window of "):
        tokenize_corpus(corpus, tmp_path / "tokens", params, window=4, progress=False)
    assert not (tmp_path / "tokens").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]
    manifest = tokenize_corpus(
        corpus, tmp_path / "tokens", TokenizeParams(workers=1, val_fraction=0.4), window=4
    )
    assert manifest["num_tokens"] == 14
