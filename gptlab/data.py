"""Token streams on disk and the (input, target) window loader of book ch. 2, made to scale past RAM.

The book (ch. 2, ``GPTDatasetV1`` and ``create_dataloader_v1``) tokenizes the whole text into one Python
list and slices overlapping windows out of it. That is fine for *The Verdict* but not for a corpus of
gigabytes, so here the same idea is split in two:

* :class:`ShardWriter` appends token arrays (e.g. from parallel tokenizer workers) and writes them as
  fixed-size shards in the Arrow IPC *file* format (https://arrow.apache.org/docs/format/Columnar.html#ipc-file-format),
  one ``uint16``/``uint32`` column ``"tokens"``, plus a ``manifest.json`` with counts, sha256 digests
  and the train/val split. Memory while writing is one record batch, never the corpus.
* :class:`TokenStream` memory-maps those shards (``pa.memory_map`` + ``pa.ipc.open_file``) and serves
  ``read(start, stop)`` over one split as if it were a single array; RAM stays flat as the corpus grows.
* :class:`WindowLoader` is ``create_dataloader_v1``: windows start at ``range(0, N - T, stride)``
  exactly as ``GPTDatasetV1`` does, targets are inputs shifted by one, batches are shuffled per epoch by
  a seeded permutation, and the position is resumable through ``state_dict``/``load_state_dict``.

Directory layout::

    manifest.json        {"format": "gptlab-tokens/1", "tokenizer", "vocab_size", "dtype", "num_tokens",
                          "shards": [{"file", "num_tokens", "sha256"}], "splits": {"train": [0, n],
                          "val": [n, N]}, "extra": {...}}
    tokens-00000.arrow   Arrow IPC file, schema {tokens: uint16 | uint32}
    tokens-00001.arrow   ...
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from gptlab.errors import UserError
from gptlab.fileio import sha256_file

FORMAT = "gptlab-tokens/1"
MANIFEST = "manifest.json"
COLUMN = "tokens"
SPLITS = ("train", "val")
_SHARD_RE = re.compile(r"^tokens-\d{5,}\.arrow$")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding ids ``0 .. vocab_size - 1`` (GPT-2's 50257 fits in uint16)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int | np.integer):
        raise UserError(f"vocab_size must be an int, got {vocab_size!r}")
    if vocab_size <= 0:
        raise UserError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise UserError(f"vocab_size {vocab_size} does not fit in uint32")


def shard_name(index: int) -> str:
    return f"tokens-{index:05d}.arrow"


def _write_json_atomic(path: Path, data: Any) -> None:
    # Serialize first so a non-JSON ``extra`` fails before anything touches the directory.
    text = json.dumps(data, indent=2) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise UserError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class ShardWriter:
    """Append token arrays; writes fixed-size Arrow IPC *file* shards (one column "tokens") + manifest.json.

    Opening a writer claims ``out_dir``'s token set: an existing ``manifest.json`` and ``tokens-*.arrow``
    files there are removed first, so a reader never sees an old manifest describing new shards. Each
    shard is written to a hidden temp name and renamed into place when complete; the manifest is written
    last, so a directory with a manifest is always a complete token set. Used as a context manager, an
    exception (or leaving the block without :meth:`finish`) removes every shard this writer wrote.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        vocab_size: int,
        tokenizer: str,
        shard_size: int = 1 << 24,
        record_batch_size: int = 1 << 20,
    ) -> None:
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = int(vocab_size)
        self.tokenizer = str(tokenizer)
        self.shard_size = positive_int("shard_size", shard_size)
        batch = min(positive_int("record_batch_size", record_batch_size), self.shard_size)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / MANIFEST).unlink(missing_ok=True)
        for stale in self.out_dir.iterdir():
            if _SHARD_RE.match(stale.name):
                stale.unlink()

        self._schema = pa.schema([pa.field(COLUMN, pa.from_numpy_dtype(self.dtype), nullable=False)])
        # One record batch is the only token buffer: memory is O(record_batch_size) whatever the corpus.
        self._buf = np.empty(batch, dtype=self.dtype)
        self._fill = 0
        self._shards: list[dict[str, Any]] = []
        self._written = 0  # tokens in completed shards
        self._shard_tokens = 0  # tokens already written as batches into the open shard
        self._sink: pa.NativeFile | None = None
        self._ipc: pa.ipc.RecordBatchFileWriter | None = None
        self._tmp: Path | None = None
        self._closed = False

    @property
    def num_tokens(self) -> int:
        """Tokens added so far (written or buffered)."""
        return self._written + self._shard_tokens + self._fill

    def add(self, tokens: Any) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter is closed (finish() or abort() already ran)")
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise UserError(f"tokens must be 1-D, got shape {arr.shape}")
        if arr.size == 0:
            return
        if arr.dtype.kind not in "iu":
            raise UserError(f"tokens must be integers, got dtype {arr.dtype}")
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            bad = int(np.flatnonzero((arr < 0) | (arr >= self.vocab_size))[0])
            raise UserError(
                f"token {int(arr[bad])} at stream position {self.num_tokens + bad} is outside the "
                f"vocabulary [0, {self.vocab_size}) of tokenizer {self.tokenizer!r}"
            )
        done = 0
        while done < arr.size:
            room = min(self._buf.size - self._fill, self.shard_size - self._shard_tokens - self._fill)
            take = min(room, arr.size - done)
            self._buf[self._fill : self._fill + take] = arr[done : done + take]
            self._fill += take
            done += take
            if self._shard_tokens + self._fill == self.shard_size:
                self._flush_batch()
                self._close_shard()
            elif self._fill == self._buf.size:
                self._flush_batch()

    def _flush_batch(self) -> None:
        if self._fill == 0:
            return
        if self._ipc is None:
            name = shard_name(len(self._shards))
            self._tmp = self.out_dir / f".{name}.{os.getpid()}.tmp"
            self._sink = pa.OSFile(str(self._tmp), "wb")
            self._ipc = pa.ipc.new_file(self._sink, self._schema)
        # pa.array over a numpy slice is zero-copy; write_batch copies it to the file before we reuse _buf.
        column = pa.array(self._buf[: self._fill])
        self._ipc.write_batch(pa.record_batch([column], schema=self._schema))
        self._shard_tokens += self._fill
        self._fill = 0

    def _close_shard(self) -> None:
        if self._ipc is None:
            return
        assert self._sink is not None and self._tmp is not None
        self._ipc.close()
        self._sink.close()
        name = shard_name(len(self._shards))
        digest = sha256_file(self._tmp)
        os.replace(self._tmp, self.out_dir / name)
        self._shards.append({"file": name, "num_tokens": self._shard_tokens, "sha256": digest})
        self._written += self._shard_tokens
        self._shard_tokens = 0
        self._ipc = self._sink = self._tmp = None

    def finish(
        self, *, val_fraction: float | None = None, train_tokens: int | None = None, extra: dict | None = None
    ) -> dict:
        """Flush the last shard, write ``manifest.json`` atomically and return the manifest.

        The split is by position: the first ``train_tokens`` tokens are train, the rest val. Or, with
        ``val_fraction``, as the book's ``train_ratio = 0.90``: the first ``floor((1 - val_fraction) * N)``.
        """
        if self._closed:
            raise RuntimeError("ShardWriter is closed (finish() or abort() already ran)")
        if (val_fraction is None) == (train_tokens is None):
            raise UserError("pass exactly one of val_fraction and train_tokens")
        if val_fraction is not None and (
            isinstance(val_fraction, bool)
            or not isinstance(val_fraction, int | float)
            or not 0 <= val_fraction < 1
        ):
            raise UserError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
        if train_tokens is not None and (
            isinstance(train_tokens, bool)
            or not isinstance(train_tokens, int | np.integer)
            or not 0 <= train_tokens <= self.num_tokens
        ):
            raise UserError(f"train_tokens must be in [0, {self.num_tokens}], got {train_tokens!r}")
        if extra is not None and not isinstance(extra, dict):
            raise UserError(f"extra must be a dict or None, got {type(extra).__name__}")
        try:
            self._flush_batch()
            self._close_shard()
            n = self._written
            # Decimal(repr()) splits at the fraction as written (0.1, not 0.1000000000000000055...), so
            # 5500 tokens at val_fraction=0.1 give exactly 4950 train tokens.
            if train_tokens is not None:
                n_train = train_tokens
            else:
                n_train = math.floor((1 - Decimal(repr(float(val_fraction)))) * n)
            manifest = {
                "format": FORMAT,
                "tokenizer": self.tokenizer,
                "vocab_size": self.vocab_size,
                "dtype": self.dtype.name,
                "num_tokens": n,
                "shards": list(self._shards),
                "splits": {"train": [0, n_train], "val": [n_train, n]},
                "extra": dict(extra or {}),
            }
            _write_json_atomic(self.out_dir / MANIFEST, manifest)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return manifest

    def abort(self) -> None:
        """Remove every shard (and temp file) this writer produced; no manifest is written."""
        if self._ipc is not None:
            # Already failing; the temp file is deleted below whatever state close() leaves it in.
            with contextlib.suppress(Exception):
                self._ipc.close()
        if self._sink is not None:
            with contextlib.suppress(Exception):
                self._sink.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        for shard in self._shards:
            (self.out_dir / shard["file"]).unlink(missing_ok=True)
        self._ipc = self._sink = self._tmp = None
        self._shards = []
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.abort()
            raise RuntimeError(
                f"ShardWriter for {self.out_dir} left its with-block without finish(); shards removed"
            )


class _Shard:
    """One memory-mapped shard: zero-copy numpy views of its record batches and their start offsets."""

    def __init__(self, path: Path, dtype: np.dtype, num_tokens: int) -> None:
        self.source = pa.memory_map(str(path), "r")
        reader = pa.ipc.open_file(self.source)
        field = reader.schema.field(COLUMN) if COLUMN in reader.schema.names else None
        if field is None or field.type != pa.from_numpy_dtype(dtype):
            raise UserError(f"{path}: expected column {COLUMN!r} of {dtype}, found schema {reader.schema}")
        self.views: list[np.ndarray] = []
        self.starts: list[int] = []
        offset = 0
        for i in range(reader.num_record_batches):
            view = reader.get_batch(i).column(0).to_numpy(zero_copy_only=True)
            if view.size:
                self.views.append(view)
                self.starts.append(offset)
                offset += view.size
        if offset != num_tokens:
            raise UserError(f"{path}: holds {offset} tokens, manifest says {num_tokens}")


class TokenStream:
    """Read-only, memory-mapped view of one split (or the whole stream, ``split=None``) of a shard directory.

    Shards are opened lazily, on the first read that touches them, so opening a stream over thousands of
    shards costs no file descriptors; the stream pickles without its maps (for DataLoader workers).
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = "train",
        *,
        verify: bool = False,
        vocab_size: int | None = None,
    ) -> None:
        root = Path(root)
        if root.name == MANIFEST and root.is_file():
            root = root.parent
        self.root = root
        path = root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no token manifest (run the tokenize stage first)")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise UserError(f"{path}: format is {found!r}, expected {FORMAT!r}")
        for key in ("tokenizer", "vocab_size", "dtype", "num_tokens", "shards", "splits"):
            if key not in manifest:
                raise UserError(f"{path}: missing field {key!r}")
        self.manifest: dict = manifest
        self.vocab_size: int = int(manifest["vocab_size"])
        self.tokenizer: str = manifest["tokenizer"]
        if vocab_size is not None and int(vocab_size) != self.vocab_size:
            raise UserError(f"{path}: vocab_size is {self.vocab_size}, expected {vocab_size}")
        self.dtype = token_dtype(self.vocab_size)
        if manifest["dtype"] != self.dtype.name:
            raise UserError(
                f"{path}: dtype {manifest['dtype']!r} does not match vocab_size {self.vocab_size} "
                f"(expected {self.dtype.name!r})"
            )

        self._files: list[Path] = []
        self._counts: list[int] = []
        self._starts: list[int] = []
        total = 0
        for shard in manifest["shards"]:
            file = root / shard["file"]
            if not file.is_file():
                raise FileNotFoundError(f"{file}: shard listed in {path} is missing")
            self._files.append(file)
            self._starts.append(total)
            self._counts.append(int(shard["num_tokens"]))
            total += int(shard["num_tokens"])
        if total != manifest["num_tokens"]:
            raise UserError(f"{path}: shards hold {total} tokens, num_tokens says {manifest['num_tokens']}")

        self.split = split
        if split is None:
            lo, hi = 0, total
        elif split in manifest["splits"]:
            lo, hi = (int(v) for v in manifest["splits"][split])
            if not 0 <= lo <= hi <= total:
                raise UserError(f"{path}: split {split!r} = [{lo}, {hi}) is outside [0, {total})")
        else:
            raise UserError(
                f"{path}: unknown split {split!r}; available: {sorted(manifest['splits'])} or None"
            )
        self._lo, self._hi = lo, hi
        self._open: dict[int, _Shard] = {}
        if verify:
            self.verify()

    def __len__(self) -> int:
        return self._hi - self._lo

    def __repr__(self) -> str:
        return f"TokenStream({str(self.root)!r}, split={self.split!r}, tokens={len(self)})"

    def __getstate__(self) -> dict:
        # Memory maps do not pickle; a worker process re-opens shards on demand.
        state = self.__dict__.copy()
        state["_open"] = {}
        return state

    def _shard(self, k: int) -> _Shard:
        shard = self._open.get(k)
        if shard is None:
            shard = self._open[k] = _Shard(self._files[k], self.dtype, self._counts[k])
        return shard

    def read(self, start: int, stop: int) -> np.ndarray:
        """int64 copy of tokens ``[start, stop)`` of the split; may span record batches and shards."""
        n = len(self)
        if not 0 <= start <= stop <= n:
            raise UserError(f"read [{start}, {stop}) is outside the {self.split or 'whole'} split [0, {n})")
        out = np.empty(stop - start, dtype=np.int64)
        pos, end = self._lo + start, self._lo + stop
        k = bisect.bisect_right(self._starts, pos) - 1
        while pos < end:
            shard = self._shard(k)
            local = pos - self._starts[k]
            j = bisect.bisect_right(shard.starts, local) - 1
            while pos < end and j < len(shard.views):
                view = shard.views[j]
                a = local - shard.starts[j]
                take = min(view.size - a, end - pos)
                out[pos - self._lo - start : pos - self._lo - start + take] = view[a : a + take]
                pos += take
                local += take
                j += 1
            k += 1
        return out

    def verify(self) -> None:
        """Recompute every shard's sha256 against the manifest; ValueError naming the first bad file."""
        for file, shard in zip(self._files, self.manifest["shards"], strict=True):
            digest = sha256_file(file)
            if digest != shard["sha256"]:
                raise UserError(f"{file}: sha256 {digest} does not match manifest {shard['sha256']}")
