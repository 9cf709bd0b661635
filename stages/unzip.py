"""Safe zip extraction for the ``download`` stage: no member escapes the target (no absolute paths, ``..`` or
links), nothing half-written appears (each file goes to a temp file, is verified, then renamed), and a member can
be extracted and checked on its own — some sources (the UCI SMS Spam Collection) publish a hash for a member,
not for the archive.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import zipfile
import zlib
from pathlib import Path

from gptlab.fileio import sha256_file
from stages.fetch import CHUNK_SIZE, DownloadError, _normalize_sha, _one_line, _temp_beside

__all__ = ["extract_member", "safe_extract_zip"]


def _open_zip(zip_path: Path, shown: str | Path | None = None) -> zipfile.ZipFile:
    shown = zip_path if shown is None else shown
    try:
        return zipfile.ZipFile(zip_path)
    except FileNotFoundError:
        raise DownloadError(f"cannot open {shown}: no such file") from None
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"cannot open {shown}: not a valid zip file ({_one_line(exc)})") from None
    except OSError as exc:
        raise DownloadError(f"cannot open {shown}: {_one_line(exc.strerror or exc)}") from exc


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    # Unix mode bits live in the high half of external_attr (only for archives made on Unix).
    return stat.S_ISLNK(info.external_attr >> 16)


def _member_list(zf: zipfile.ZipFile, limit: int = 20) -> str:
    names = zf.namelist()
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "") if names else "(none)"


def _safe_target(info: zipfile.ZipInfo, root: Path) -> Path:
    """Where ``info`` may be extracted under ``root``; ValueError (the reason) if it may not."""
    name = info.filename
    norm = name.replace("\\", "/")
    if _is_symlink(info):
        raise ValueError("is a symlink")
    if "\x00" in name:
        raise ValueError("has a NUL byte in its name")
    if norm.startswith("/"):
        raise ValueError("has an absolute path")
    if re.match(r"[A-Za-z]:", norm):
        raise ValueError("has a drive letter")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError("contains '..'")
    if not parts:
        raise ValueError("has an empty name")
    target = root.joinpath(*parts)
    # resolve() also catches a pre-existing symlinked directory inside out_dir pointing elsewhere.
    if not target.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"resolves outside {root}")
    return target


def _extract_one(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, zip_path: str | Path, expected: str | None
) -> str:
    """Stream one member to a temp file beside ``target``, verify, ``os.replace``; returns its sha256."""
    digest = hashlib.sha256()
    try:
        with _temp_beside(target) as (out, tmp), zf.open(info) as src:
            while chunk := src.read(CHUNK_SIZE):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
            out.close()
            got = digest.hexdigest()
            if expected is not None and got != expected:
                raise DownloadError(
                    f"sha256 mismatch for member {info.filename!r} of {zip_path}: expected {expected}, got {got}"
                )
            os.replace(tmp, target)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # CRC errors, corrupt deflate streams
        raise DownloadError(f"cannot extract {info.filename!r} from {zip_path}: {_one_line(exc)}") from exc
    except OSError as exc:
        raise DownloadError(
            f"cannot extract {info.filename!r} from {zip_path} to {target}: {_one_line(exc.strerror or exc)}"
        ) from exc
    return got


def safe_extract_zip(
    zip_path: str | Path, out_dir: str | Path, members: list[str] | None = None
) -> list[Path]:
    """Extract ``members`` (default: all) of a zip under ``out_dir``; returns the written file paths.

    Every selected member is validated before anything is written: absolute paths, drive letters, ``..``
    components, paths that resolve outside ``out_dir`` and symlink members make the whole call fail with a
    :class:`DownloadError` and leave the disk untouched. Each file is written to a temp file and moved into
    place, so a file is either absent or complete.
    """
    zip_path, out_dir = Path(zip_path), Path(out_dir)
    with _open_zip(zip_path) as zf:
        if members is None:
            infos = zf.infolist()
        else:
            by_name = {info.filename: info for info in zf.infolist()}
            missing = [m for m in members if m not in by_name]
            if missing:
                raise DownloadError(
                    f"{zip_path} has no member(s) {', '.join(map(repr, missing))}; members: {_member_list(zf)}"
                )
            infos = [by_name[m] for m in members]
        plan: list[tuple[zipfile.ZipInfo, Path]] = []
        for info in infos:
            try:
                plan.append((info, _safe_target(info, out_dir)))
            except ValueError as exc:
                raise DownloadError(
                    f"unsafe member {info.filename!r} in {zip_path}: {exc}; nothing extracted"
                ) from None
        written: list[Path] = []
        for info, target in plan:
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            _extract_one(zf, info, target, zip_path, None)
            written.append(target)
    return written


def extract_member(
    zip_path: str | Path,
    member: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    source: str | None = None,
) -> str:
    """Extract one member of a zip to ``dest`` atomically; returns the sha256 of its bytes.

    With ``sha256``, the extracted bytes are verified before they reach ``dest`` (a mismatch leaves ``dest``
    as it was) and an existing ``dest`` with that hash is left alone without reading the zip. ``source`` is
    what errors call the archive (the URL or file the user gave) when ``zip_path`` is a scratch copy of it.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    shown = source or str(zip_path)
    expected = _normalize_sha(sha256, f"member {member!r} of {shown}")
    if expected is not None and dest.is_file() and sha256_file(dest) == expected:
        return expected
    with _open_zip(zip_path, shown) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise DownloadError(f"{shown} has no member {member!r}; members: {_member_list(zf)}") from None
        if info.is_dir() or _is_symlink(info):
            kind = "a directory" if info.is_dir() else "a symlink"
            raise DownloadError(f"member {member!r} of {shown} is {kind}, not a file")
        return _extract_one(zf, info, dest, shown, expected)
