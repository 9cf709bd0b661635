"""The IMDB reader (book ch. 6 bonus) on small archives in Stanford's ``aclImdb`` layout, checked against the book's
own ``download_prepare_dataset.py`` procedure (extract, read folder by folder with pandas, two seeded shuffles,
35k/5k/10k split — scaled to the small archive)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from gptlab.errors import UserError
from stages import aclimdb
from stages.classify import ClassifyParams, prepare_splits
from stages.download import DownloadParams, Source, download_all

ODD = [
    'Tabs\tinside, "quotes" and a\nline break',
    '"Starts with a quote" and ends with one"',
    "Unicode: naïve café — 映画 <br /><br />with the site's HTML breaks",
]


def make_archive(path: Path, per_folder: int = 6, *, extra: bool = True) -> Path:
    """An aclImdb tar.gz: ``per_folder`` reviews in each labelled folder, unlabelled and stray members besides."""
    k = 0
    with tarfile.open(path, "w:gz") as tar:

        def add(name: str, text: str) -> None:
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for subset in ("train", "test"):
            for label in ("neg", "pos"):
                for i in range(per_folder):
                    text = ODD[k % len(ODD)] if i < 2 else f"{subset} {label} review number {i}, k={k}."
                    add(f"aclImdb/{subset}/{label}/{10 - i}_{i + 1}.txt", text)  # names sort as strings
                    k += 1
        if extra:
            add("aclImdb/train/unsup/0_0.txt", "unlabelled")
            add("aclImdb/README", "readme")
            add("outside/test/pos/1_1.txt", "not the dataset")
            link = tarfile.TarInfo("aclImdb/test/pos/99_9.txt")
            link.type, link.linkname = tarfile.SYMTYPE, "../../README"
            tar.addfile(link)
    return path


def book_partition(archive: Path, workdir: Path) -> dict[str, list[tuple[int, str]]]:
    """The book's procedure: extract, load (test/train, pos/neg, sorted names), shuffle, shuffle again, split."""
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, filter="data")
    frames = []
    labels = {"pos": 1, "neg": 0}
    for subset in ("test", "train"):
        for label in ("pos", "neg"):
            path = workdir / "aclImdb" / subset / label
            for file in sorted(os.listdir(path)):
                if (path / file).is_symlink():  # the book's archive has none; ours carries one to be skipped
                    continue
                text = (path / file).read_text(encoding="utf-8")
                frames.append(pd.DataFrame({"text": [text], "label": [labels[label]]}))
    df = pd.concat(frames, ignore_index=True).sample(frac=1, random_state=123).reset_index(drop=True)
    df = df.sample(frac=1, random_state=123).reset_index(drop=True)
    n = len(df)
    train_end, val_end = int(n * 0.7), int(n * 0.7) + int(n * 0.1)  # 35000/5000/10000 of 50000
    parts = {"train": df.iloc[:train_end], "val": df.iloc[train_end:val_end], "test": df.iloc[val_end:]}
    return {k: list(zip(v.label.tolist(), v.text.tolist(), strict=True)) for k, v in parts.items()}


def test_download_converts_archive_to_the_books_split(tmp_path) -> None:
    archive = make_archive(tmp_path / "aclImdb_v1.tar.gz")
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    params = DownloadParams(sources={"imdb.tsv": Source(str(archive), sha, layout="aclimdb")})
    record = download_all(params, tmp_path / "raw", progress=False)
    assert record["imdb.tsv"]["sha256"] == sha

    tsv = tmp_path / "raw" / "imdb.tsv"
    ours = prepare_splits_text(tsv.read_text(encoding="utf-8"))
    book = book_partition(archive, tmp_path / "book")
    assert {k: len(v) for k, v in book.items()} == {"train": 16, "val": 2, "test": 6}
    assert ours == book  # same reviews, same labels, same order in every split, odd characters intact


def prepare_splits_text(text: str) -> dict[str, list[tuple[int, str]]]:
    from gptlab.classify import parse_labeled_tsv, split

    params = ClassifyParams(dataset="imdb", balance=False)
    rows = parse_labeled_tsv(text, labels=params.labels, quoting=True)
    return split(rows, seed=123)._asdict()


def test_classify_reads_imdb_as_two_sentiment_classes(tmp_path) -> None:
    tsv = tmp_path / "imdb.tsv"
    n = aclimdb.convert(make_archive(tmp_path / "a.tar.gz", extra=False), tsv)
    assert n == 24
    # dataset: imdb reads CSV quoting whatever csv_quoting says: the file is written with it
    params = ClassifyParams(dataset="imdb", balance=False, csv_quoting=False)
    splits, max_length = prepare_splits(
        tsv.read_text(encoding="utf-8"), params, source="imdb.tsv", context_length=64
    )
    ids, labels = splits["train"]
    assert ids.shape == (16, max_length) and set(labels.tolist()) == {0, 1}
    assert params.labels == ("neg", "pos")


def test_bad_archives_are_one_line_errors(tmp_path) -> None:
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz") as tar:
        info = tarfile.TarInfo("aclImdb/train/pos/1_1.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(UserError, match=r"empty\.tar\.gz: no reviews in aclImdb/test/pos, .*aclImdb layout"):
        aclimdb.read_reviews(empty)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not an archive")
    with pytest.raises(UserError, match=r"junk\.tar\.gz: not a readable tar archive"):
        aclimdb.read_reviews(junk)
    with pytest.raises(UserError, match="layout must be one of"):
        Source("x.tar.gz", "0" * 64, layout="zip")
    with pytest.raises(UserError, match="layout aclimdb reads the whole archive"):
        Source("x.zip", member="a", member_sha256="0" * 64, layout="aclimdb")
    with pytest.raises(UserError, match="dataset must be one of"):
        ClassifyParams(dataset="yelp")
