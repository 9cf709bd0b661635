"""GPT-2's byte-level BPE through tiktoken, usable offline.

The book (ch. 2) uses ``tiktoken.get_encoding("gpt2")``, which downloads GPT-2's merges on first use. Here the
same encoding is built from a local ``r50k_base.tiktoken`` when the network is not there. Resolution order:

1. ``GPTLAB_TIKTOKEN_FILE``: a file the user points to (an explicit choice beats every cache);
2. tiktoken's own cache (``TIKTOKEN_CACHE_DIR`` / ``DATA_GYM_CACHE_DIR`` / ``$TMP/data-gym-cache``);
3. gptlab's verified copy at ``$GPTLAB_CACHE/tokenizers/r50k_base.tiktoken`` (``~/.cache/gptlab`` by default),
   which set-up (``gptlab fetch-tokenizer``) extracts from the ``openai-whisper`` sdist on PyPI;
4. tiktoken's download (skipped when ``GPTLAB_OFFLINE=1``).

Every local file is checked against the sha256 tiktoken itself pins. The from-scratch trainer lives in
:mod:`gptlab.bpe`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import tiktoken

from gptlab.errors import UserError
from gptlab.fileio import atomic_write, cache_dir
from gptlab.pypi import pip_download

ENDOFTEXT = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
# GPT-2's pre-tokenizer, as tiktoken ships it for r50k_base/gpt2 (tiktoken_ext.openai_public.r50k_pat_str).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
WHISPER_SDIST = "openai-whisper==20250625"
WHISPER_MEMBER = "whisper/assets/gpt2.tiktoken"

ENV_FILE = "GPTLAB_TIKTOKEN_FILE"
_HOW_TO = (
    "run `gptlab fetch-tokenizer` (downloads the openai-whisper sdist from PyPI and extracts GPT-2's BPE file), "
    f"or set {ENV_FILE}=/path/to/r50k_base.tiktoken (sha256 {R50K_SHA256[:12]}…)"
)


class TokenizerNotFoundError(UserError, RuntimeError):
    """No verified GPT-2 BPE file could be found or downloaded."""


def local_copy_path() -> Path:
    return cache_dir() / "tokenizers" / "r50k_base.tiktoken"


def _tiktoken_cache_path() -> Path:
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    base = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "data-gym-cache"
    return base / hashlib.sha1(R50K_URL.encode()).hexdigest()


def _read_verified(path: Path) -> bytes:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != R50K_SHA256:
        raise TokenizerNotFoundError(
            f"{path}: sha256 {digest} is not GPT-2's r50k_base.tiktoken ({R50K_SHA256}); {_HOW_TO}"
        )
    return data


def _encoding_from_bytes(data: bytes) -> tiktoken.Encoding:
    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in data.splitlines() if line)
    }
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


def find_bpe_file() -> Path | None:
    """The first verified local GPT-2 BPE file in resolution order, or None."""
    explicit = os.environ.get(ENV_FILE)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise TokenizerNotFoundError(f"{ENV_FILE}={explicit}: no such file; {_HOW_TO}")
        return path
    for path in (_tiktoken_cache_path(), local_copy_path()):
        if path.is_file():
            return path
    return None


def load_encoding(name: str = "gpt2") -> tiktoken.Encoding:
    """GPT-2's tiktoken encoding (``<|endoftext|>`` = 50256), resolved offline first (module docstring)."""
    if name not in ("gpt2", "r50k_base"):
        raise UserError(f"unknown tokenizer {name!r}; gptlab models use 'gpt2'")
    path = find_bpe_file()
    if path is not None:
        return _encoding_from_bytes(_read_verified(path))
    if os.environ.get("GPTLAB_OFFLINE") == "1":
        raise TokenizerNotFoundError(f"GPT-2 BPE file not found locally and GPTLAB_OFFLINE=1; {_HOW_TO}")
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as exc:  # requests/urllib errors vary; the message is what matters
        reason = str(exc).splitlines()[0][:160]
        raise TokenizerNotFoundError(
            f"GPT-2 BPE file not found locally and download failed ({reason}); {_HOW_TO}"
        ) from None


@functools.cache
def get_encoding(name: str = "gpt2") -> tiktoken.Encoding:
    """Process-wide cached :func:`load_encoding`."""
    return load_encoding(name)


def encode(text: str, enc: tiktoken.Encoding | None = None) -> list[int]:
    """Encode text, allowing ``<|endoftext|>`` as the document separator (book ch. 2)."""
    return (enc or get_encoding()).encode(text, allowed_special={ENDOFTEXT})


def encode_array(text: str) -> np.ndarray:
    """:func:`encode` as a uint32 array (picklable top-level function for tokenizer worker pools)."""
    return np.asarray(encode(text), dtype=np.uint32)


def decode(ids: list[int], enc: tiktoken.Encoding | None = None) -> str:
    return (enc or get_encoding()).decode(ids)


def fetch_bpe_file(dest: Path | None = None, *, python: str = sys.executable) -> Path:
    """Obtain a verified ``r50k_base.tiktoken`` from PyPI (no install): ``pip download`` the openai-whisper
    sdist, extract ``whisper/assets/gpt2.tiktoken`` (byte-identical to tiktoken's file) and check its sha256."""
    dest = dest or local_copy_path()
    if dest.is_file() and hashlib.sha256(dest.read_bytes()).hexdigest() == R50K_SHA256:
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        sdist = pip_download(WHISPER_SDIST, tmp, kind="sdist", error=TokenizerNotFoundError, python=python)
        with tarfile.open(sdist) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith(WHISPER_MEMBER)), None)
            if member is None or not member.isfile():
                raise TokenizerNotFoundError(f"{sdist.name}: has no {WHISPER_MEMBER}")
            data = tar.extractfile(member).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != R50K_SHA256:
        raise TokenizerNotFoundError(
            f"{WHISPER_SDIST}:{WHISPER_MEMBER} has sha256 {digest}, expected {R50K_SHA256}"
        )
    atomic_write(dest, lambda tmp: Path(tmp).write_bytes(data))
    return dest


class GPT2Tokenizer:
    """GPT-2's tokenizer with the interface every model's tokenizer has (see :class:`gptlab.hf_tokenizer.HFTokenizer`):
    ``<|endoftext|>`` ends text and pads; no BOS, no chat template (GPT-2 models use the book's Alpaca prompts)."""

    name = "gpt2"
    bos_id: int | None = None
    eos_id: int = EOT_ID
    pad_id: int = EOT_ID
    stop_ids: tuple[int, ...] = (EOT_ID,)
    chat_template: str | None = None
    vocab_size: int = VOCAB_SIZE

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return encode(text)  # GPT-2 adds no special tokens

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        ids = list(ids)
        return decode([i for i in ids if i != EOT_ID] if skip_special_tokens else ids)

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = True) -> str:
        raise UserError("GPT-2 models have no chat template (use the Alpaca prompt style)")

    def encode_chat(self, messages, *, add_generation_prompt: bool = True) -> list[int]:
        raise UserError("GPT-2 models have no chat template (use the Alpaca prompt style)")


@functools.cache
def gpt2_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """GPT-2's vocabulary (tokens in its byte-to-unicode spelling, ``<|endoftext|>`` included) and merges in rank
    order, as Hugging Face's ``vocab.json`` / ``merges.txt`` and GGUF's ``tokenizer.ggml.*`` hold them.

    Derived from tiktoken's ``r50k_base`` ranks, which have no merges: each token's merge is found as llama.cpp's
    converter finds it, by byte-pair-encoding the token with only lower-ranked merges allowed, which leaves the
    two parts it was merged from. Equal to OpenAI's published ``encoder.json`` and ``vocab.bpe`` (tests).
    Callers must not modify the returned dict (it is cached).
    """
    from gptlab.bpe import bytes_to_unicode

    ranks: dict[bytes, int] = get_encoding()._mergeable_ranks  # tiktoken keeps the ranks on this attribute
    to_char = bytes_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(to_char[x] for x in b)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            candidates = [
                (ranks.get(a + b), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))
            ]
            _, i = min((r, i) for r, i in candidates if r is not None and r < rank)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        merges.append((spell(parts[0]), spell(parts[1])))
    vocab = {spell(token): rank for token, rank in ranks.items()}
    vocab[ENDOFTEXT] = EOT_ID
    return vocab, tuple(merges)
