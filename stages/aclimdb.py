"""The Large Movie Review Dataset (Maas et al., ACL 2011: "Learning Word Vectors for Sentiment Analysis") as the
classify stage's ``label<TAB>text`` file, for the book's ch. 6 bonus experiment (IMDB sentiment).

Stanford publishes one archive, ``aclImdb_v1.tar.gz`` (:data:`URL`, :data:`SHA256`): ``aclImdb/{train,test}/
{pos,neg}/<id>_<rating>.txt``, 25,000 reviews per half, plus unlabelled reviews (``train/unsup``) that are not
used. The book's ``download_prepare_dataset.py`` reads ``test`` then ``train``, ``pos`` then ``neg``, each
folder's files in sorted name order, and shuffles the 50,000 rows with ``df.sample(frac=1, random_state=123)``;
:func:`convert` writes the rows in that order, so the classify stage's 70/10/20 split (``split``, one more such
shuffle) gives the book's 35,000/5,000/10,000 train/validation/test partition.

The archive is read as a stream, never extracted: only regular files under the four labelled folders are read
(no links, no other paths), so a hostile archive can neither write anywhere nor be mistaken for the dataset.
Reviews are written with CSV quoting (tab-separated), so a review keeps every character, tabs and line breaks
included; the classify stage reads them back with ``csv_quoting``.
"""

from __future__ import annotations

import csv
import re
import tarfile
from pathlib import Path

import numpy as np

from gptlab.errors import UserError
from gptlab.fileio import atomic_write

URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"
LABELS = ("neg", "pos")
"""Class 0 and 1, as the book's ``labels={"pos": 1, "neg": 0}``."""
BOOK_SHUFFLE_SEED = 123

_MEMBER = re.compile(r"(?:\./)?aclImdb/(test|train)/(pos|neg)/([^/]+\.txt)")
_ORDER = [(subset, label) for subset in ("test", "train") for label in ("pos", "neg")]


def read_reviews(archive: Path, *, source: str | None = None) -> list[tuple[str, str]]:
    """(label, review) for every labelled review in an ``aclImdb`` tar.gz, in the book's order (before its
    shuffle): folder by folder (test/pos, test/neg, train/pos, train/neg), files by sorted name."""
    shown = source or str(archive)
    folders: dict[tuple[str, str], dict[str, str]] = {key: {} for key in _ORDER}
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in tar:
                match = _MEMBER.fullmatch(member.name)
                if match is None or not member.isfile():
                    continue
                subset, label, name = match.groups()
                data = tar.extractfile(member).read()
                try:
                    folders[(subset, label)][name] = data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise UserError(f"{shown}: {member.name}: not UTF-8 text ({exc.reason})") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UserError(f"{shown}: not a readable tar archive ({exc})") from None
    empty = [f"aclImdb/{s}/{lab}" for (s, lab), files in folders.items() if not files]
    if empty:
        raise UserError(
            f"{shown}: no reviews in {', '.join(empty)}; expected the aclImdb layout "
            "(aclImdb/{train,test}/{pos,neg}/*.txt)"
        )
    return [(label, folders[(s, label)][name]) for s, label in _ORDER for name in sorted(folders[(s, label)])]


def book_order(rows: list) -> list:
    """The rows as the book's ``df.sample(frac=1, random_state=123)`` orders them (pandas draws
    ``RandomState(seed).permutation(n)``)."""
    return [rows[i] for i in np.random.RandomState(BOOK_SHUFFLE_SEED).permutation(len(rows))]


def convert(archive: Path, dest: Path, *, source: str | None = None) -> int:
    """Write the archive's labelled reviews to ``dest`` as CSV-quoted ``label<TAB>review`` lines in the book's
    shuffled order (atomically); returns the number of reviews."""
    rows = book_order(read_reviews(archive, source=source))

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            csv.writer(f, delimiter="\t", lineterminator="\n").writerows(rows)

    atomic_write(dest, write)
    return len(rows)
