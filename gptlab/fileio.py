"""Atomic file and directory writes (write beside the target, then ``os.replace`` into place), file digests and
gptlab's cache directory.

A reader (or a DVC stage downstream) never sees a half-written file or directory: either the old content or the
complete new one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gptlab.errors import UserError


def cache_dir() -> Path:
    """gptlab's cache: ``$GPTLAB_CACHE`` or ``~/.cache/gptlab`` (tokenizer files, partial downloads)."""
    return Path(os.environ.get("GPTLAB_CACHE", Path.home() / ".cache" / "gptlab")).expanduser()


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``chunk_size`` pieces (weights files need not fit in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError as exc:
        return exc.errno != errno.ESRCH
    return True


def sweep_temps(path: str | Path) -> None:
    """Remove what an earlier writer of ``path`` left behind when it was killed (``kill -9`` runs no cleanup).

    Temp siblings are named ``.{name}.{pid}-{hex}.tmp``; one whose process is gone is removed. Names from older
    gptlab versions (``mkstemp``'s ``.{name}.{8 chars}.tmp``) carry no pid and are removed too. A writer killed
    between the two renames of :func:`replace_dir` leaves only ``.{name}.old``: it is renamed back, so the
    previous complete version is what the next reader sees.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return
    name = re.escape(path.name)
    ours = re.compile(rf"\.{name}\.(\d+)-[0-9a-f]{{12}}\.tmp")
    legacy = re.compile(rf"\.{name}\.[a-z0-9_]{{8}}\.tmp")
    for entry in path.parent.iterdir():
        match = ours.fullmatch(entry.name)
        if match is None and legacy.fullmatch(entry.name) is None:
            continue
        if match is not None and _pid_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, path)


def make_temp(path: str | Path, *, directory: bool = False) -> Path:
    """Create an empty hidden temp file (or directory) beside ``path`` after sweeping stale ones.

    The name carries this process's pid so that a later :func:`sweep_temps` can tell a dead writer's leftovers
    from a live writer's work. Files get mode 0o666 minus umask, like any ordinary file (``mkstemp``'s 0o600
    would leak into the renamed result).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temps(path)
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp")
        try:
            if directory:
                tmp.mkdir()
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


class NotUTF8Error(UserError):
    """A text input with bytes that are not UTF-8; the message names the file, line and byte."""


def utf8_error(path: str | Path) -> NotUTF8Error:
    """Locate the first invalid UTF-8 byte of ``path`` (a UTF-8 character never contains a newline byte, so
    decoding line by line finds it exactly, in constant memory)."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return NotUTF8Error(
                    f"{path}: line {lineno}, column {exc.start + 1}: byte 0x{line[exc.start]:02x} is not UTF-8 "
                    "(expected UTF-8 text; re-encode it, e.g. `iconv -f latin1 -t utf-8`)"
                )
    return NotUTF8Error(f"{path}: not UTF-8 (expected UTF-8 text)")


def read_utf8(path: str | Path) -> str:
    """The text of a UTF-8 file; bad bytes raise :class:`NotUTF8Error` naming the file and line."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise utf8_error(path) from None


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    tmp = make_temp(path)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory ``src`` to ``dst``, replacing any existing ``dst`` (old copy removed afterwards)."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp directory beside ``path``; on success it replaces ``path``, on error it vanishes."""
    tmp = make_temp(path, directory=True)
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json_object(
    path: str | Path, *, error: type[Exception] = ValueError, what: str = ""
) -> dict[str, Any]:
    """A JSON file that must hold an object (a model's ``config.json``, ``tokenizer_config.json`` …); a
    missing, unparsable or non-object file raises ``error`` naming the file (``what`` names what was expected)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise error(f"{path}: invalid JSON ({exc})") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
    if not isinstance(data, dict):
        raise error(
            f"{path}: expected a JSON object{f' ({what})' if what else ''}, got {type(data).__name__}"
        )
    return data
