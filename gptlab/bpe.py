"""Byte-level byte-pair encoding (BPE), trained and applied from scratch.

BPE (Sennrich et al., 2016, "Neural Machine Translation of Rare Words with Subword Units") starts from a
base alphabet and repeatedly merges the most frequent adjacent pair of symbols into a new symbol. GPT-2
(Radford et al., 2019, "Language Models are Unsupervised Multitask Learners") runs it over *bytes*, so any
string is encodable without an unknown token, and first splits text into pre-tokens with a regex so merges
never cross word/number/punctuation boundaries. Bytes are shown as printable unicode characters via
``bytes_to_unicode`` so the vocabulary and merge files stay human-readable text.

Follows the tokenizer chapter (ch. 2) of *Build a Large Language Model (From Scratch)* (Raschka, 2024) and
its bonus notebook "BPE tokenizer from scratch". ``BPETokenizer.from_gpt2_files`` loads OpenAI's
``encoder.json`` + ``vocab.bpe`` and reproduces tiktoken's ``gpt2`` ids exactly (see ``tests/test_bpe.py``).

Uses the third-party ``regex`` module (already a dependency of tiktoken) for ``\\p{L}``/``\\p{N}``.
"""

from __future__ import annotations

import functools
import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, Literal

import regex

from gptlab.errors import UserError
from gptlab.fileio import atomic_write

__all__ = ["GPT2_SPLIT_PATTERN", "GPT2_EOT", "BPETokenizer", "bytes_to_unicode"]

# GPT-2's pre-tokenizer (openai/gpt-2 src/encoder.py). Contractions are case-sensitive, as in the original.
# tiktoken's r50k pattern (possessive quantifiers, ``\s++$``, trailing ``\s``) splits identically.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = "<|endoftext|>"

_FORMAT = "gptlab-bpe"
_FORMAT_VERSION = 1
_CACHE_LIMIT = 100_000


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map, in GPT-2's id order (printables first)."""
    # Printable latin-1 bytes map to themselves; the rest (controls, space, NBSP, soft hyphen) are shifted
    # past 255 so no token ever contains whitespace or a control character.
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _byte_decoder() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _merge_word(word: tuple[int, ...], a: int, b: int, new: int) -> tuple[int, ...]:
    out: list[int] = []
    i = 0
    n = len(word)
    while i < n:
        if i < n - 1 and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _special_regex(tokens: Iterable[str]) -> regex.Pattern[str] | None:
    # Longest first so a special token that is a prefix of another never shadows it.
    toks = sorted(tokens, key=lambda t: (-len(t), t))
    return regex.compile("|".join(regex.escape(t) for t in toks)) if toks else None


class BPETokenizer:
    """Byte-level BPE: bytes_to_unicode mapping as GPT-2, merges ranked by order learned."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Iterable[tuple[str, str]],
        special_tokens: dict[str, int] | None = None,
        pattern: str = GPT2_SPLIT_PATTERN,
    ) -> None:
        """Build from a vocab (byte-unicode token string -> id) and merges in rank order (rank 0 first)."""
        self._vocab = dict(vocab)
        self._merges = [(str(a), str(b)) for a, b in merges]
        self._special = dict(special_tokens or {})
        self._pattern = pattern
        self._validate()
        self._ranks = {pair: i for i, pair in reversed(list(enumerate(self._merges)))}
        self._decoder = {i: t for t, i in self._vocab.items()}
        self._special_decoder = {i: t for t, i in self._special.items()}
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = _byte_decoder()
        self._split = regex.compile(pattern)
        self._cache: dict[str, list[int]] = {}

    def _validate(self) -> None:
        missing = [c for c in bytes_to_unicode().values() if c not in self._vocab]
        if missing:
            raise UserError(f"vocab lacks {len(missing)} of the 256 byte symbols (e.g. {missing[0]!r})")
        ids = list(self._vocab.values()) + list(self._special.values())
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids):
            raise UserError("token ids must be non-negative integers")
        if len(set(ids)) != len(ids):
            raise UserError("token ids are not unique across vocab and special tokens")
        for a, b in self._merges:
            if a not in self._vocab or b not in self._vocab or a + b not in self._vocab:
                raise UserError(f"merge {a!r} + {b!r} refers to tokens missing from the vocab")
        for tok in self._special:
            if not tok:
                raise UserError("special tokens must be non-empty strings")
        try:
            regex.compile(self._pattern)
        except regex.error as e:
            raise UserError(f"invalid split pattern: {e}") from None

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        """Number of ids in use: ordinary tokens plus special tokens (max id + 1 for GPT-2)."""
        return max([*self._vocab.values(), *self._special.values()]) + 1

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def merges(self) -> list[tuple[str, str]]:
        """Merges in rank order, as byte-unicode symbol pairs (like GPT-2's vocab.bpe)."""
        return list(self._merges)

    @property
    def vocab(self) -> dict[str, int]:
        """Ordinary (non-special) tokens: byte-unicode string -> id (like GPT-2's encoder.json)."""
        return dict(self._vocab)

    @property
    def pattern(self) -> str:
        return self._pattern

    # ------------------------------------------------------------------ training

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int,
        *,
        special_tokens: list[str] | None = None,
        pattern: str = GPT2_SPLIT_PATTERN,
        verbose: bool = False,
    ) -> BPETokenizer:
        """Learn merges on ``text`` until ``vocab_size`` ids exist (256 bytes + merges + special tokens).

        Special tokens get the last ids and their text is cut out of the corpus so no merge learns from it.
        Ties between equally frequent pairs go to the pair with the smallest (left id, right id), so
        training is deterministic. Stops early if no pair occurs any more.
        """
        specials = list(dict.fromkeys(special_tokens or []))
        n_target = vocab_size - len(specials)
        if n_target < 256:
            raise UserError(f"vocab_size={vocab_size} is below 256 byte tokens + {len(specials)} special")
        byte_enc = bytes_to_unicode()
        id_to_tok = list(byte_enc.values())  # id order = GPT-2's byte order
        tok_to_id = {t: i for i, t in enumerate(id_to_tok)}
        byte_id = {b: tok_to_id[c] for b, c in byte_enc.items()}

        split = regex.compile(pattern)
        sre = _special_regex(specials)
        chunks = sre.split(text) if sre else [text]
        counts: Counter[str] = Counter(p for chunk in chunks for p in split.findall(chunk))
        # Work on unique pre-tokens weighted by frequency: far fewer than the corpus' pre-tokens.
        words = [tuple(byte_id[b] for b in w.encode("utf-8")) for w in counts]
        freqs = list(counts.values())

        pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
        where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
        for wi, (w, f) in enumerate(zip(words, freqs, strict=True)):
            for pair in zip(w, w[1:], strict=False):
                pair_counts[pair] += f
                where[pair].add(wi)
        # Max-heap with lazy invalidation: stale entries are skipped when their count no longer matches.
        heap = [(-c, p) for p, c in pair_counts.items()]
        heapq.heapify(heap)

        merges: list[tuple[str, str]] = []
        while len(tok_to_id) < n_target:
            best: tuple[int, int] | None = None
            while heap:
                negc, pair = heapq.heappop(heap)
                if pair_counts.get(pair, 0) == -negc and negc < 0:
                    best = pair
                    break
            if best is None:
                break
            a, b = best
            merged = id_to_tok[a] + id_to_tok[b]
            # Two different merge paths can spell the same string; reuse its id instead of duplicating.
            new = tok_to_id.get(merged)
            if new is None:
                new = len(id_to_tok)
                id_to_tok.append(merged)
                tok_to_id[merged] = new
            merges.append((id_to_tok[a], id_to_tok[b]))
            if verbose:
                print(f"merge {len(merges):5d}: {id_to_tok[a]!r} + {id_to_tok[b]!r} -> {new} ({-negc}x)")

            changed: set[tuple[int, int]] = set()
            for wi in sorted(where.pop(best, ())):
                w, f = words[wi], freqs[wi]
                for pair in zip(w, w[1:], strict=False):
                    pair_counts[pair] -= f
                    changed.add(pair)
                w2 = _merge_word(w, a, b, new)
                words[wi] = w2
                for pair in zip(w2, w2[1:], strict=False):
                    pair_counts[pair] += f
                    where[pair].add(wi)
                    changed.add(pair)
            pair_counts.pop(best, None)
            changed.discard(best)
            for pair in changed:
                c = pair_counts[pair]
                if c > 0:
                    heapq.heappush(heap, (-c, pair))
                else:
                    # Keep the tables small; a stale `where` entry would only cost a wasted scan.
                    del pair_counts[pair]
                    where.pop(pair, None)

        n = len(id_to_tok)
        special = {t: n + i for i, t in enumerate(specials)}
        return cls(tok_to_id, merges, special, pattern)

    # ------------------------------------------------------------------ GPT-2 files

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | Path, vocab_bpe: str | Path) -> BPETokenizer:
        """Load OpenAI GPT-2's ``encoder.json`` + ``vocab.bpe``; ``<|endoftext|>`` is the special id 50256."""
        with open(encoder_json, encoding="utf-8") as f:
            encoder: dict[str, int] = json.load(f)
        with open(vocab_bpe, encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges: list[tuple[str, str]] = []
        for lineno, line in enumerate(lines, 1):
            line = line.rstrip("\r")
            if not line or (lineno == 1 and line.startswith("#version")):
                continue
            # Byte-unicode symbols never contain a space, so a single space always separates the pair.
            parts = line.split(" ")
            if len(parts) != 2:
                raise UserError(f"{vocab_bpe}:{lineno}: expected 'left right', got {line!r}")
            merges.append((parts[0], parts[1]))
        special = {GPT2_EOT: encoder.pop(GPT2_EOT, 50256)}
        return cls(encoder, merges, special, GPT2_SPLIT_PATTERN)

    # ------------------------------------------------------------------ encoding

    def _bpe(self, piece: str) -> list[int]:
        """BPE one pre-token: repeatedly merge the lowest-ranked adjacent pair (GPT-2's algorithm)."""
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        word = [self._byte_encoder[b] for b in piece.encode("utf-8")]
        ranks = self._ranks
        while len(word) > 1:
            best_rank: int | None = None
            best: tuple[str, str] | None = None
            for pair in zip(word, word[1:], strict=False):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best = r, pair
            if best is None:
                break
            a, b = best
            out: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        ids = [self._vocab[t] for t in word]
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode treating special-token text as plain text (tiktoken's ``encode_ordinary``)."""
        out: list[int] = []
        for piece in self._split.findall(text):
            out.extend(self._bpe(piece))
        return out

    def encode(
        self,
        text: str,
        *,
        allowed_special: Collection[str] | Literal["all"] = frozenset(),
        disallowed_special: Collection[str] | Literal["all"] = "all",
    ) -> list[int]:
        """Encode ``text`` to ids, with tiktoken's special-token semantics.

        By default any special token's text in the input raises ValueError (it usually means untrusted
        text is trying to inject a control token). ``allowed_special`` ("all" or a set) maps those tokens to
        their ids; tokens in neither set are encoded as ordinary text.
        """
        allowed = set(self._special) if allowed_special == "all" else set(allowed_special)
        unknown = allowed - set(self._special)
        if unknown:
            raise UserError(f"allowed_special has tokens this tokenizer lacks: {sorted(unknown)}")
        disallowed = (
            set(self._special) - allowed if disallowed_special == "all" else set(disallowed_special) - allowed
        )
        if disallowed:
            dre = _special_regex(disallowed)
            assert dre is not None
            if m := dre.search(text):
                raise UserError(
                    f"text contains the special token {m.group()!r}; pass allowed_special={{{m.group()!r}}} "
                    "(or 'all') to encode it as a special token, or disallowed_special=() to encode it as text"
                )
        are = _special_regex(allowed)
        if are is None:
            return self.encode_ordinary(text)
        out: list[int] = []
        pos = 0
        for m in are.finditer(text):
            out.extend(self.encode_ordinary(text[pos : m.start()]))
            out.append(self._special[m.group()])
            pos = m.end()
        out.extend(self.encode_ordinary(text[pos:]))
        return out

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids -> raw bytes (special tokens as their UTF-8 text)."""
        parts: list[bytes] = []
        bd = self._byte_decoder
        for i in ids:
            tok = self._decoder.get(i)
            if tok is not None:
                parts.append(bytes(bd[c] for c in tok))
            elif i in self._special_decoder:
                parts.append(self._special_decoder[i].encode("utf-8"))
            else:
                raise UserError(f"unknown token id {i}")
        return b"".join(parts)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; invalid UTF-8 (e.g. half a multi-byte char) becomes U+FFFD, as in GPT-2."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> None:
        """Write one JSON file (vocab, merges, special tokens, pattern) atomically."""
        path = Path(path)
        data = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "pattern": self._pattern,
            "special_tokens": self._special,
            "merges": [list(m) for m in self._merges],
            "vocab": self._vocab,
        }
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, ensure_ascii=False), "utf-8"))

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Read a file written by :meth:`save`; a malformed file raises a one-line ValueError naming it."""
        try:
            with open(path, encoding="utf-8") as f:
                data: Any = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a valid BPE tokenizer JSON file ({e})") from None
        try:
            if not isinstance(data, dict) or data.get("format") != _FORMAT:
                raise UserError(f"missing 'format': {_FORMAT!r}")
            if data.get("version") != _FORMAT_VERSION:
                raise UserError(f"unsupported version {data.get('version')!r}")
            vocab, merges = data["vocab"], data["merges"]
            special, pattern = data["special_tokens"], data["pattern"]
            if not isinstance(vocab, dict) or not isinstance(special, dict) or not isinstance(pattern, str):
                raise UserError("'vocab'/'special_tokens' must be objects and 'pattern' a string")
            if not isinstance(merges, list) or not all(
                isinstance(m, list) and len(m) == 2 and all(isinstance(s, str) for s in m) for m in merges
            ):
                raise UserError("'merges' must be a list of [left, right] string pairs")
            return cls(vocab, [(a, b) for a, b in merges], special, pattern)
        except KeyError as e:
            raise UserError(f"{path}: malformed BPE tokenizer file: missing key {e}") from None
        except ValueError as e:
            raise UserError(f"{path}: malformed BPE tokenizer file: {e}") from None

    def __repr__(self) -> str:
        return (
            f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self._merges)}, "
            f"special_tokens={list(self._special)})"
        )
