"""Stage ``tokenize``: chunked, multiprocess tokenization equals tiktoken on the whole text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gptlab.data import TokenStream
from gptlab.tokenizer import encode
from stages.tokenize import TokenizeParams, read_chunks, tokenize_corpus


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
