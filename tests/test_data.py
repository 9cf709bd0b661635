"""Token shards (Arrow IPC) and the book's ch. 2 window loader, all under ``tmp_path``."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from gptlab.data import ShardWriter, TokenStream, token_dtype


def write_stream(
    root: Path,
    tokens: np.ndarray,
    *,
    vocab_size: int = 50257,
    shard_size: int = 1000,
    val_fraction: float = 0.1,
    chunks: list[int] | None = None,
    **kwargs,
) -> dict:
    """Write ``tokens`` in uneven chunks (so chunk and shard boundaries never line up)."""
    chunks = chunks or [1, 333, 1200, 7, 2500]
    with ShardWriter(root, vocab_size=vocab_size, tokenizer="test", shard_size=shard_size, **kwargs) as w:
        pos, i = 0, 0
        while pos < len(tokens):
            n = chunks[i % len(chunks)]
            w.add(tokens[pos : pos + n])
            pos, i = pos + n, i + 1
        return w.finish(val_fraction=val_fraction, extra={"source": "unit"})


def shard_files(root: Path) -> list[Path]:
    return sorted(root.glob("tokens-*.arrow"))


def book_windows(token_ids: list[int], max_length: int, stride: int) -> tuple[list, list]:
    """GPTDatasetV1.__init__ from book ch. 2, verbatim apart from tensors."""
    input_ids, target_ids = [], []
    for i in range(0, len(token_ids) - max_length, stride):
        input_ids.append(token_ids[i : i + max_length])
        target_ids.append(token_ids[i + 1 : i + max_length + 1])
    return input_ids, target_ids


@pytest.mark.parametrize(
    ("vocab", "dtype"), [(50257, np.uint16), (100277, np.uint32), (65536, np.uint16), (65537, np.uint32)]
)
def test_token_dtype(vocab: int, dtype: type) -> None:
    assert token_dtype(vocab) == np.dtype(dtype)


@pytest.mark.parametrize("vocab", [0, -5])
def test_token_dtype_rejects_nonpositive(vocab: int) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        token_dtype(vocab)


def test_round_trip_across_shards(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50257, size=5500)
    manifest = write_stream(tmp_path, tokens)

    assert manifest == json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == "gptlab-tokens/1"
    assert manifest["tokenizer"] == "test" and manifest["vocab_size"] == 50257
    assert manifest["dtype"] == "uint16" and manifest["num_tokens"] == 5500
    assert manifest["extra"] == {"source": "unit"}
    assert [s["num_tokens"] for s in manifest["shards"]] == [1000] * 5 + [500]
    files = shard_files(tmp_path)
    assert [f.name for f in files] == [s["file"] for s in manifest["shards"]]
    assert not list(tmp_path.glob(".*"))  # no temp files left behind
    for f, s in zip(files, manifest["shards"], strict=True):
        assert s["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
        with pa.memory_map(str(f)) as source:
            assert pa.ipc.open_file(source).schema.field("tokens").type == pa.uint16()

    whole = TokenStream(tmp_path, None, verify=True)
    assert len(whole) == 5500
    np.testing.assert_array_equal(whole.read(0, 5500), tokens)
    assert whole.read(0, 5500).dtype == np.int64
    for a, b in [(0, 0), (999, 1001), (1000, 1000), (10, 4999), (4321, 5500), (1999, 2000), (5499, 5500)]:
        np.testing.assert_array_equal(whole.read(a, b), tokens[a:b])
    with pytest.raises(ValueError, match="outside"):
        whole.read(5000, 5501)

    train = TokenStream(tmp_path, "train", vocab_size=50257)
    assert len(train) == 4950 and manifest["splits"] == {"train": [0, 4950], "val": [4950, 5500]}
    np.testing.assert_array_equal(train.read(0, 4950), tokens[:4950])


def test_multiple_record_batches_per_shard(tmp_path: Path) -> None:
    tokens = np.arange(2600) % 300
    write_stream(tmp_path, tokens, shard_size=1000, record_batch_size=128)
    stream = TokenStream(tmp_path, None)
    assert len(stream._shard(0).views) == 8  # 7 x 128 + 104
    np.testing.assert_array_equal(stream.read(0, 2600), tokens)
    np.testing.assert_array_equal(stream.read(120, 2100), tokens[120:2100])
    # a pickled stream (DataLoader worker) re-opens its maps on demand
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(stream)).read(900, 1300), tokens[900:1300])


def test_big_vocab_uses_uint32(tmp_path: Path) -> None:
    tokens = np.array([0, 70000, 100276, 5, 65536])
    manifest = write_stream(tmp_path, tokens, vocab_size=100277, shard_size=3)
    assert manifest["dtype"] == "uint32"
    with pa.memory_map(str(shard_files(tmp_path)[0])) as source:
        assert pa.ipc.open_file(source).schema.field("tokens").type == pa.uint32()
    np.testing.assert_array_equal(TokenStream(tmp_path, None).read(0, 5), tokens)


@pytest.mark.parametrize(("frac", "n_train"), [(0.0, 1000), (0.1, 900), (0.25, 750), (0.999, 1)])
def test_val_split(tmp_path: Path, frac: float, n_train: int) -> None:
    tokens = np.arange(1000)
    manifest = write_stream(tmp_path, tokens, val_fraction=frac, shard_size=300)
    assert manifest["splits"] == {"train": [0, n_train], "val": [n_train, 1000]}
    val = TokenStream(tmp_path, "val")
    assert len(val) == 1000 - n_train
    np.testing.assert_array_equal(val.read(0, len(val)), tokens[n_train:])


@pytest.mark.parametrize("frac", [1.0, -0.1, 1.5, float("nan"), "0.1"])
def test_val_fraction_validated(tmp_path: Path, frac: object) -> None:
    w = ShardWriter(tmp_path, vocab_size=10, tokenizer="t", shard_size=4)
    w.add([1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="val_fraction"):
        w.finish(val_fraction=frac)  # type: ignore[arg-type]
    w.abort()
    assert not shard_files(tmp_path)


def test_out_of_range_token(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, vocab_size=100, tokenizer="t")
    with pytest.raises(ValueError, match="token 100 at stream position 5"):
        w.add(np.array([0, 1, 2, 3, 4, 100, 7]))
    with pytest.raises(ValueError, match="token -1"):
        w.add([-1])
    with pytest.raises(ValueError, match="integers"):
        w.add(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="1-D"):
        w.add(np.zeros((2, 2), dtype=np.int64))
    w.abort()


def test_exception_in_with_block_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "tokens"
    with (
        pytest.raises(RuntimeError, match="boom"),
        ShardWriter(out, vocab_size=50, tokenizer="t", shard_size=10) as w,
    ):
        w.add(np.arange(35) % 50)  # three full shards written, five tokens buffered
        assert len(shard_files(out)) == 3
        raise RuntimeError("boom")
    assert not list(out.iterdir())


def test_missing_finish_is_an_error(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError, match="finish"),
        ShardWriter(tmp_path, vocab_size=50, tokenizer="t", shard_size=10) as w,
    ):
        w.add(np.arange(25))
    assert not shard_files(tmp_path) and not (tmp_path / "manifest.json").exists()


def test_rewrite_replaces_old_token_set(tmp_path: Path) -> None:
    write_stream(tmp_path, np.arange(5000) % 50257)
    write_stream(tmp_path, np.arange(1500) % 50257)
    assert [f.name for f in shard_files(tmp_path)] == ["tokens-00000.arrow", "tokens-00001.arrow"]
    assert len(TokenStream(tmp_path, None, verify=True)) == 1500


def test_tampered_shard_fails_verify(tmp_path: Path) -> None:
    write_stream(tmp_path, np.arange(3000) % 50257)
    target = shard_files(tmp_path)[1]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    stream = TokenStream(tmp_path, None)  # opening without verify is cheap and does not hash
    with pytest.raises(ValueError, match="tokens-00001.arrow"):
        stream.verify()
    with pytest.raises(ValueError, match="tokens-00001.arrow: sha256"):
        TokenStream(tmp_path, "train", verify=True)


def test_stream_open_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        TokenStream(tmp_path)
    write_stream(tmp_path, np.arange(2500) % 50257)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        TokenStream(tmp_path, "test")
    with pytest.raises(ValueError, match="vocab_size is 50257, expected 100277"):
        TokenStream(tmp_path, vocab_size=100277)

    manifest_path = tmp_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "vocab_size": 100277}))
    with pytest.raises(ValueError, match="dtype 'uint16' does not match vocab_size 100277"):
        TokenStream(tmp_path)
    manifest_path.write_text(json.dumps(manifest))

    (tmp_path / "tokens-00002.arrow").unlink()
    with pytest.raises(FileNotFoundError, match="tokens-00002.arrow"):
        TokenStream(tmp_path)


def test_reads_are_memory_mapped(tmp_path: Path) -> None:
    tokens = np.arange(2_000_000, dtype=np.int64) % 50257
    write_stream(tmp_path, tokens, shard_size=1 << 19, chunks=[300_000, 123_457])

    baseline = pa.total_allocated_bytes()
    stream = TokenStream(tmp_path, None)
    window = stream.read(1_500_000, 1_500_000 + 4096)  # spans a shard boundary (3 x 2^19)
    np.testing.assert_array_equal(window, tokens[1_500_000:1_504_096])
    first, last = stream.read(0, 10), stream.read(1_999_990, 2_000_000)
    np.testing.assert_array_equal(np.concatenate([first, last]), np.r_[tokens[:10], tokens[-10:]])
    # The shards hold 4 MB of uint16; had Arrow copied them into its memory pool, this would show it.
    assert pa.total_allocated_bytes() - baseline < 64 * 1024
    for shard in stream._open.values():
        assert all(not view.flags.owndata and not view.flags.writeable for view in shard.views)
