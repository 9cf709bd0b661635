"""GPT-2 tokenizer: offline resolution order, sha256 verification, the clear error, parity with tiktoken."""

from __future__ import annotations

import shutil
import sys
import tarfile
from pathlib import Path

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

from gptlab import pypi
from gptlab import tokenizer as tk


@pytest.fixture
def isolated(monkeypatch, tmp_path) -> Path:
    """No env file, empty tiktoken cache and gptlab cache, no network fallback."""
    monkeypatch.delenv(tk.ENV_FILE, raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "gptlab"))
    monkeypatch.setenv("GPTLAB_OFFLINE", "1")
    return tmp_path


@pytest.fixture(scope="module")
def reference(shared_dir) -> tiktoken.Encoding:
    ranks = load_tiktoken_bpe(str(shared_dir / "tokenizers" / "r50k_base.tiktoken"))
    return tiktoken.Encoding(
        name="ref", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
    )


TEXTS = [
    "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace.",
    "Ünïcödé — naïve café, 東京, emoji 🤖👍🏽, tabs\tand   spaces\n\n\n",
    "I'll say it's 3.14159 and 1,000,000; they're WE'VE done 2024-11-24.",
]


def test_env_file_is_used_and_matches_tiktoken(isolated, monkeypatch, gpt2_tiktoken_file, reference) -> None:
    monkeypatch.setenv(tk.ENV_FILE, str(gpt2_tiktoken_file))
    enc = tk.load_encoding()
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    for text in TEXTS:
        assert tk.encode(text, enc) == reference.encode(text, allowed_special="all")
        assert tk.decode(tk.encode(text, enc), enc) == text
    assert tk.encode("Hello, world. Is this-- a test?", enc) == [
        15496,
        11,
        995,
        13,
        1148,
        428,
        438,
        257,
        1332,
        30,
    ]


def test_tiktoken_cache_then_gptlab_copy(isolated, gpt2_tiktoken_file) -> None:
    assert tk.find_bpe_file() is None
    tk.local_copy_path().parent.mkdir(parents=True)
    shutil.copy(gpt2_tiktoken_file, tk.local_copy_path())
    assert tk.find_bpe_file() == tk.local_copy_path()
    cache = tk._tiktoken_cache_path()
    cache.parent.mkdir(parents=True)
    shutil.copy(gpt2_tiktoken_file, cache)
    assert tk.find_bpe_file() == cache  # tiktoken's own cache comes first
    assert tk.load_encoding().encode("hi there") == [5303, 612]


def test_nothing_available_is_one_clear_error(isolated) -> None:
    with pytest.raises(tk.TokenizerNotFoundError) as err:
        tk.load_encoding()
    msg = str(err.value)
    assert "\n" not in msg and "gptlab fetch-tokenizer" in msg and tk.ENV_FILE in msg


def test_wrong_file_is_rejected_by_sha256(isolated, monkeypatch) -> None:
    bad = isolated / "bad.tiktoken"
    bad.write_text("aGVsbG8= 0\n")
    monkeypatch.setenv(tk.ENV_FILE, str(bad))
    with pytest.raises(tk.TokenizerNotFoundError, match="sha256"):
        tk.load_encoding()
    monkeypatch.setenv(tk.ENV_FILE, str(isolated / "missing"))
    with pytest.raises(tk.TokenizerNotFoundError, match="no such file"):
        tk.load_encoding()


def test_network_failure_offline_is_clear(isolated, monkeypatch) -> None:
    monkeypatch.delenv("GPTLAB_OFFLINE")

    def no_network(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tk.tiktoken, "get_encoding", no_network)
    with pytest.raises(tk.TokenizerNotFoundError, match="download failed .*Failed to resolve"):
        tk.load_encoding()


def test_fetch_extracts_and_verifies_from_an_sdist(isolated, gpt2_tiktoken_file, monkeypatch) -> None:
    """fetch_bpe_file's sdist handling, with `pip download` replaced by a local sdist (no network in tests)."""
    sdist_dir = isolated / "sdist"
    member_root = sdist_dir / "openai_whisper-20250625" / "whisper" / "assets"
    member_root.mkdir(parents=True)
    shutil.copy(gpt2_tiktoken_file, member_root / "gpt2.tiktoken")
    archive = isolated / "openai_whisper-20250625.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(sdist_dir / "openai_whisper-20250625", arcname="openai_whisper-20250625")

    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        shutil.copy(archive, Path(cmd[cmd.index("-d") + 1]) / archive.name)

        class Done:
            returncode = 0
            stderr = ""

        return Done()

    monkeypatch.setattr(pypi.subprocess, "run", fake_run)
    dest = tk.fetch_bpe_file()
    assert dest == tk.local_copy_path() and tk.find_bpe_file() == dest
    assert (
        calls[0][:3] == [sys.executable, "-m", "pip"]
        and "--no-binary" in calls[0]
        and tk.WHISPER_SDIST in calls[0]
    )
    assert tk.fetch_bpe_file() == dest and len(calls) == 1  # verified copy present: no second download

    # A tampered asset is refused and nothing is written.
    dest.unlink()
    (member_root / "gpt2.tiktoken").write_bytes(b"tampered")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(sdist_dir / "openai_whisper-20250625", arcname="openai_whisper-20250625")
    with pytest.raises(tk.TokenizerNotFoundError, match="sha256"):
        tk.fetch_bpe_file()
    assert not dest.exists()


def test_gpt2_vocab_and_merges_are_openais_files(shared_dir) -> None:
    """The merges derived from tiktoken's ranks equal OpenAI's published ``vocab.bpe`` line by line, the vocabulary
    its ``encoder.json``."""
    import json

    from gptlab.tokenizer import gpt2_vocab_and_merges

    vocab, merges = gpt2_vocab_and_merges()
    lines = (shared_dir / "tokenizers" / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    assert [" ".join(m) for m in merges] == [line for line in lines if line]
    assert vocab == json.loads((shared_dir / "tokenizers" / "encoder.json").read_text(encoding="utf-8"))
