"""Stage ``tokenize``: GPT-2-tokenize the pretraining corpus into Arrow shards with a train/val split.

Book ch. 2 (BPE with tiktoken, ``<|endoftext|>``) and ch. 5 (90/10 train/val split). The corpus is read in
chunks cut at paragraph boundaries and encoded by a process pool in order, so memory stays flat in corpus size
and large corpora use every core; shards and the manifest come from :class:`gptlab.data.ShardWriter`.

The split is either over the token stream (``split_by: tokens``) or, as the book's ch. 5 does it, over the
text's characters before tokenizing (``split_by: chars``: ``text[:int(0.9 * len(text))]`` and the rest are
encoded separately, so a token is never cut in two).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from gptlab.data import ShardWriter
from gptlab.errors import UserError
from gptlab.fileio import atomic_dir, utf8_error, write_json
from gptlab.tokenizer import VOCAB_SIZE, encode_array
from stages import tracking
from stages.entry import stage_main
from stages.params import load_section

SPLITS_BY = ("tokens", "chars")


@dataclass
class TokenizeParams:
    val_fraction: float = 0.1
    """Tail fraction held out for validation (the book uses 0.1)."""
    split_by: str = "tokens"
    """What ``val_fraction`` divides: ``tokens`` (the token stream) or ``chars`` (the text, before
    tokenizing, as the book's ch. 5)."""
    shard_size: int = 1 << 24
    """Tokens per Arrow shard."""
    workers: int = 0
    """Tokenizer processes; 0 = one per CPU core, 1 = in-process."""
    chunk_chars: int = 1 << 20
    """Characters per work unit; chunks are cut before a line break so the ids equal whole-text encoding."""

    def __post_init__(self) -> None:
        if self.chunk_chars < 1024:
            raise UserError(f"chunk_chars must be >= 1024, got {self.chunk_chars}")
        if self.workers < 0:
            raise UserError(f"workers must be >= 0, got {self.workers}")
        if self.split_by not in SPLITS_BY:
            raise UserError(f"split_by must be one of {', '.join(SPLITS_BY)}, got {self.split_by!r}")


def _safe_cut(text: str) -> int:
    """Index of the last newline that follows a non-space character, or -1.

    GPT-2's pre-tokenizer never joins a non-space character with the whitespace after it, so cutting there
    (and only there: a cut *after* "\n\n" would turn the pre-token "\n" + "\n" into one "\n\n") gives
    exactly the ids of encoding the whole text at once.
    """
    i = text.rfind("\n")
    while i > 0:
        if not text[i - 1].isspace():
            return i
        i = text.rfind("\n", 0, i)
    return -1


def count_chars(path: Path, block_chars: int = 1 << 20) -> int:
    """Characters in a UTF-8 text file, read in blocks."""
    n = 0
    with _utf8_errors_located(path), open(path, encoding="utf-8", newline="") as f:
        while block := f.read(block_chars):
            n += len(block)
    return n


@contextmanager
def _utf8_errors_located(path: Path) -> Iterator[None]:
    try:
        yield
    except UnicodeDecodeError:
        raise utf8_error(path) from None


def read_chunks(path: Path, chunk_chars: int, *, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """Yield consecutive pieces of characters ``[start, stop)`` of a text file, each cut where tokenization
    cannot change (the last piece ends at ``stop``, wherever that is)."""
    if start < 0 or (stop is not None and stop < start):
        raise ValueError(f"read_chunks: need 0 <= start <= stop, got start={start}, stop={stop}")
    carry = ""
    remaining = stop - start if stop is not None else None
    with _utf8_errors_located(path), open(path, encoding="utf-8", newline="") as f:
        to_skip = start
        while to_skip > 0 and (skipped := len(f.read(min(to_skip, chunk_chars)))):
            to_skip -= skipped
        while block := f.read(chunk_chars if remaining is None else min(chunk_chars, remaining)):
            if remaining is not None:
                remaining -= len(block)
            text = carry + block
            cut = _safe_cut(text)
            if cut <= 0:
                carry = text
                continue
            yield text[:cut]
            carry = text[cut:]
    if carry:
        yield carry


def tokenize_corpus(
    corpus: Path, out_dir: Path, params: TokenizeParams, *, window: int = 1, progress: bool = True
) -> dict:
    """Tokenize ``corpus`` into shards under ``out_dir`` (replaced atomically); returns the manifest.

    Each split must hold at least one training window (``window`` inputs plus the shifted target), so that a
    corpus too short for pretraining fails here, naming itself, rather than at the next stage; ``out_dir`` is
    then left as it was.
    """
    total_bytes = corpus.stat().st_size
    if total_bytes == 0:
        raise UserError(f"{corpus}: empty; expected the UTF-8 text to pretrain on")
    # Process start-up costs about a second: a corpus of one chunk is faster in-process.
    workers = min(params.workers or os.cpu_count() or 1, max(1, total_bytes // params.chunk_chars))
    if params.split_by == "chars":
        # The book's arithmetic: int(train_ratio * len(text_data)) with train_ratio = 0.90.
        cut = int((1 - params.val_fraction) * count_chars(corpus))
        parts = [
            read_chunks(corpus, params.chunk_chars, stop=cut),
            read_chunks(corpus, params.chunk_chars, start=cut),
        ]
    else:
        parts = [read_chunks(corpus, params.chunk_chars)]
    with (
        atomic_dir(out_dir) as staging,
        ShardWriter(staging, vocab_size=VOCAB_SIZE, tokenizer="gpt2", shard_size=params.shard_size) as writer,
        # None = tqdm decides: off when stderr is not a terminal (DVC logs, CI), so errors stay one line.
        tqdm(unit="tok", unit_scale=True, desc="tokenize", disable=None if progress else True) as bar,
    ):
        pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
        part_tokens = []
        try:
            for chunks in parts:
                # imap keeps chunk order and holds only a few chunks in flight.
                encoded = pool.imap(encode_array, chunks, chunksize=1) if pool else map(encode_array, chunks)
                for ids in encoded:
                    writer.add(ids)
                    bar.update(len(ids))
                part_tokens.append(writer.num_tokens)
        finally:
            if pool is not None:
                pool.close()
                pool.join()
        split = (
            {"train_tokens": part_tokens[0]}
            if params.split_by == "chars"
            else {"val_fraction": params.val_fraction}
        )
        manifest = writer.finish(**split, extra={"source": corpus.name, "source_bytes": total_bytes})
        for name, (start, stop) in manifest["splits"].items():
            if stop - start < window + 1:
                raise UserError(
                    f"{corpus}: the {name} split has {stop - start} tokens, fewer than one window of "
                    f"pretrain.context_length={window} plus its target; use a longer corpus "
                    f"({manifest['num_tokens']} tokens in all) or adjust tokenize.val_fraction"
                )
        return manifest


@stage_main("tokenize")
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="shard directory")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument(
        "--window", type=int, default=1, help="tokens per training window each split must hold (+1 target)"
    )
    args = parser.parse_args()
    params = load_section("tokenize", TokenizeParams)
    with tracking.stage_run("tokenize", params):
        start = time.perf_counter()
        manifest = tokenize_corpus(args.corpus, args.out, params, window=args.window)
        elapsed = time.perf_counter() - start
        (train_start, train_stop), (val_start, val_stop) = (
            manifest["splits"]["train"],
            manifest["splits"]["val"],
        )
        metrics = {
            "num_tokens": manifest["num_tokens"],
            "train_tokens": train_stop - train_start,
            "val_tokens": val_stop - val_start,
            "num_shards": len(manifest["shards"]),
            "chars_per_token": manifest["extra"]["source_bytes"] / max(1, manifest["num_tokens"]),
        }
        write_json(args.metrics, metrics)  # results only: equal files mean equal runs
        tracking.log_metrics({**metrics, "tokens_per_sec": manifest["num_tokens"] / max(elapsed, 1e-9)})
        tracking.log_outputs("tokenize")
        tracking.mlflow.log_artifact(str(args.out / "manifest.json"))
    print(
        f"tokenize: {metrics['num_tokens']} tokens ({metrics['train_tokens']} train / {metrics['val_tokens']} val) -> {args.out}"
    )


if __name__ == "__main__":
    main()
