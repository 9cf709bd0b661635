"""Robust, checksum-verified downloads for the ``download`` stage.

The stage fetches the raw datasets listed in ``params.yaml`` (``http(s)://`` URLs, ``file://`` URLs or local
paths). Model weights come from the Hugging Face hub through ``huggingface_hub`` instead
(:func:`gptlab.formats.openai_gpt2.download_gpt2`).

Guarantees of :func:`fetch`:

* nothing half-written ever appears at or beside ``dest``: bytes stream into a partial file under
  ``$GPTLAB_CACHE/partial`` and are moved into place with :func:`os.replace` only after verification;
* interrupted transfers resume with an HTTP ``Range`` request (guarded by ``If-Range``) instead of restarting;
* transient failures (connection errors, timeouts, truncated bodies, HTTP 5xx/429) are retried with
  exponential backoff; permanent ones (404, 403...) fail at once;
* content is checked against the caller's sha256 or, failing that, a sha256-looking ``X-Linked-Etag``/``ETag``
  (which is how the Hugging Face hub publishes the sha256 of LFS files);
* every failure is a one-line :class:`DownloadError` naming the source and what went wrong.

Zip archives are extracted by :mod:`stages.unzip`.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import http.client
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import Message
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit, urlunsplit

from tqdm import tqdm

from gptlab import __version__
from gptlab.errors import UserError
from gptlab.fileio import cache_dir, make_temp, sha256_file

__all__ = ["DownloadError", "fetch", "partial_path", "sha256_file"]

CHUNK_SIZE = 1 << 20
USER_AGENT = f"gptlab/{__version__} (Python urllib)"
# Retry-After can ask for anything; a pipeline stage should not sleep for an hour on a server's say-so.
_MAX_RETRY_AFTER_S = 60.0
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE_RE = re.compile(r"bytes\s+\*/(\d+)")


class DownloadError(UserError, RuntimeError):
    """One-line, user-facing: always names the source (URL/path) and what went wrong."""


class _Retryable(Exception):
    """A transient failure inside one attempt; ``reason`` ends up in the final DownloadError."""

    def __init__(self, reason: str, *, retry_after: float | None = None, free: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        # A "free" retry fixes our own state (a stale partial file) and cannot recur, so it costs no attempt.
        self.free = free


# --------------------------------------------------------------------------------------------------- helpers


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _display(source: str) -> str:
    """The source as it may appear in messages: URL passwords are never printed."""
    parts = urlsplit(source)
    if parts.password is None:
        return source
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _normalize_sha(sha256: str | None, what: str) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if not _SHA256_RE.fullmatch(value):
        raise DownloadError(f"invalid sha256 {sha256!r} for {what}: expected 64 hex characters")
    return value


def _etag_sha256(value: str | None) -> str | None:
    """The sha256 an ETag carries, if it looks like one (``"<64 hex>"``, optionally weak ``W/``)."""
    if not value:
        return None
    value = value.strip()
    if value[:2].upper() == "W/":
        value = value[2:]
    value = value.strip().strip('"')
    return value.lower() if _SHA256_RE.fullmatch(value) else None


def _classify(source: str) -> tuple[str, str | Path]:
    """``("http", url)`` or ``("file", absolute_path)``; anything else is a DownloadError."""
    parts = urlsplit(source)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise DownloadError(f"cannot download {_display(source)}: no host in URL")
        return "http", source
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise DownloadError(f"cannot read {source}: file:// URLs must name a local path (no host)")
        return "file", Path(urllib.request.url2pathname(parts.path))
    # "C:\data\x.zip" parses with scheme "c"; on Windows that is a path, not a URL.
    if not scheme or (os.name == "nt" and len(scheme) == 1):
        return "file", Path(source).expanduser().resolve()
    raise DownloadError(
        f"cannot download {_display(source)}: unsupported scheme {scheme!r} (use http(s)://, file:// or a local path)"
    )


def partial_path(source: str, partial_dir: str | Path | None = None) -> Path:
    """Where :func:`fetch` keeps the partial file for ``source`` (named by a hash of the canonical source)."""
    kind, target = _classify(source)
    canonical = str(target) if kind == "http" else Path(target).as_uri()
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:32]
    # A readable tail makes `ls ~/.cache/gptlab/partial` useful; the hash alone keeps names unique.
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", urlsplit(canonical).path.rsplit("/", 1)[-1])[-48:]
    base = Path(partial_dir) if partial_dir is not None else cache_dir() / "partial"
    return base / f"{digest}-{tail}.part"


def _validator_path(partial: Path) -> Path:
    return partial.with_name(partial.name + ".validator")


def _discard(partial: Path) -> None:
    partial.unlink(missing_ok=True)
    _validator_path(partial).unlink(missing_ok=True)


@contextmanager
def _temp_beside(path: Path) -> Iterator[tuple[BinaryIO, Path]]:
    """A new hidden temp file in ``path``'s directory, removed unless the caller ``os.replace``-d it away."""
    tmp = make_temp(path)
    try:
        with open(tmp, "wb") as f:
            yield f, tmp
    finally:
        tmp.unlink(missing_ok=True)


def _finalize(partial: Path, dest: Path) -> None:
    """Move a verified partial file to ``dest`` atomically (copy first when on another filesystem)."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(partial, dest)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        with _temp_beside(dest) as (out, tmp), open(partial, "rb") as src:
            shutil.copyfileobj(src, out, CHUNK_SIZE)
            out.flush()
            os.fsync(out.fileno())
            out.close()
            os.replace(tmp, dest)
        partial.unlink(missing_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot write {dest}: {_one_line(exc.strerror or exc)}") from exc


def _progress_bar(total: int | None, initial: int, label: str, progress: bool) -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=label,
        # None = tqdm decides: off when stderr is not a terminal (DVC logs, CI).
        disable=None if progress else True,
        leave=False,
    )


# ------------------------------------------------------------------------------------------------------ HTTP


class _RecordingRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects like urllib, but remembers the hub's ``X-Linked-Etag`` and keeps tokens on their
    host.

    The Hugging Face hub answers ``/resolve/`` with a redirect to a CDN; the sha256 of an LFS file is only on
    that first (redirect) response, so it must be captured here, before urllib throws the response away.
    """

    def __init__(self) -> None:
        super().__init__()
        self.linked_etag: str | None = None

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        linked = headers.get("X-Linked-Etag")
        if linked:
            self.linked_etag = linked
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        # urllib forwards every header on redirect; an HF token must not travel to a third-party CDN.
        if new is not None and urlsplit(new.full_url).hostname != urlsplit(req.full_url).hostname:
            new.remove_header("Authorization")
        return new


def _split_credentials(url: str, headers: dict[str, str] | None) -> tuple[str, dict[str, str] | None]:
    """``http://user:pw@host/x`` -> (``http://host/x``, Basic auth header).

    urllib would take ``user:pw@host`` for the host name. An explicit ``Authorization`` header wins.
    """
    parts = urlsplit(url)
    if parts.username is None:
        return url, headers
    host = parts.netloc.rpartition("@")[2]
    headers = dict(headers or {})
    if not any(k.lower() == "authorization" for k in headers):
        user = unquote(parts.username)
        password = unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        headers["Authorization"] = f"Basic {token}"
    return urlunsplit(parts._replace(netloc=host)), headers


def _claimed_sha256(
    redirects: _RecordingRedirectHandler, headers: Message, validator_file: Path
) -> str | None:
    """The sha256 the server vouches for: X-Linked-Etag (on a redirect hop or the final response), else the
    ETag, else the ETag recorded when the partial file was started (a resumed response may omit it)."""
    for value in (redirects.linked_etag, headers.get("X-Linked-Etag"), headers.get("ETag")):
        if sha := _etag_sha256(value):
            return sha
    return _etag_sha256(validator_file.read_text()) if validator_file.is_file() else None


def _retry_after(headers: Message) -> float | None:
    value = headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP-date: rare enough that plain backoff will do


def _describe(exc: BaseException, timeout: float) -> str:
    """A short human reason for a transport-level failure."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        inner = exc.reason
        if isinstance(inner, BaseException):
            exc = inner
        else:
            return _one_line(inner)
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError | http.client.RemoteDisconnected):
        return "connection reset by server"
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g}s"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host ({_one_line(exc.strerror or exc)})"
    if isinstance(exc, http.client.IncompleteRead):
        return f"connection closed mid-body ({len(exc.partial)} bytes of the last read)"
    return _one_line(getattr(exc, "strerror", None) or exc) or exc.__class__.__name__


def _http_attempt(
    url: str,
    display: str,
    partial: Path,
    *,
    timeout: float,
    headers: dict[str, str] | None,
    label: str,
    progress: bool,
) -> str | None:
    """One request. Appends to ``partial``; returns the sha256 the server's ETag claims (or None).

    Raises :class:`_Retryable` for transient failures and :class:`DownloadError` for permanent ones.
    """
    offset = partial.stat().st_size if partial.is_file() else 0
    req_headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **(headers or {})}
    validator_file = _validator_path(partial)
    if offset:
        req_headers["Range"] = f"bytes={offset}-"
        # If-Range: if the remote file changed since the partial began, the server sends it whole (200) instead
        # of a range that would splice two versions together.
        if validator_file.is_file():
            req_headers["If-Range"] = validator_file.read_text().strip()
    redirects = _RecordingRedirectHandler()
    opener = urllib.request.build_opener(redirects)
    try:
        resp = opener.open(urllib.request.Request(url, headers=req_headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        with exc:
            status, reason, resp_headers = exc.code, _one_line(exc.reason), exc.headers
        if status == 416 and offset:
            # Either the partial file is already complete (a crash between download and rename) or it is
            # longer than the remote file; the server's "bytes */TOTAL" tells which.
            match = _UNSATISFIED_RANGE_RE.fullmatch((resp_headers.get("Content-Range") or "").strip())
            if match and int(match.group(1)) == offset:
                return _claimed_sha256(redirects, resp_headers, validator_file)
            _discard(partial)
            raise _Retryable("server rejected the resume range (HTTP 416)", free=True) from exc
        if status == 429 or 500 <= status < 600:
            raise _Retryable(f"HTTP {status} {reason}", retry_after=_retry_after(resp_headers)) from exc
        raise DownloadError(f"cannot download {display}: HTTP {status} {reason}") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise _Retryable(_describe(exc, timeout)) from exc
    except ValueError as exc:  # malformed URL (bad port, control characters): retrying cannot help
        raise DownloadError(f"cannot download {display}: {_one_line(exc)}") from exc

    with resp:
        rh = resp.headers
        length = rh.get("Content-Length")
        length = int(length) if length and length.strip().isdigit() else None
        if resp.status == 206:
            match = _CONTENT_RANGE_RE.fullmatch((rh.get("Content-Range") or "").strip())
            if not match or int(match.group(1)) != offset:
                # Not the bytes we asked for: start over rather than splice.
                _discard(partial)
                raise _Retryable(f"server sent an unexpected Content-Range {rh.get('Content-Range')!r}")
            total = int(match.group(3)) if match.group(3) != "*" else None
            mode = "ab"
        else:
            # A 200 to a Range request means the server ignores ranges (or If-Range failed): restart from zero.
            offset, total, mode = 0, length, "wb"
            validator = rh.get("ETag")
            if validator and validator.strip()[:2].upper() == "W/":
                validator = None  # weak ETags are not allowed in If-Range
            validator = validator or rh.get("Last-Modified")
            partial.parent.mkdir(parents=True, exist_ok=True)
            if validator:
                validator_file.write_text(validator.strip())
            else:
                validator_file.unlink(missing_ok=True)
        if total is None and length is not None:
            total = offset + length
        etag = _claimed_sha256(redirects, rh, validator_file)

        size = offset
        with open(partial, mode) as out, _progress_bar(total, offset, label, progress) as bar:
            try:
                while chunk := resp.read(CHUNK_SIZE):
                    out.write(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as exc:
                # What arrived is kept: the next attempt resumes after it.
                raise _Retryable(_describe(exc, timeout)) from exc
            finally:
                out.flush()
                os.fsync(out.fileno())
    if total is not None and size < total:
        raise _Retryable(f"connection closed after {size} of {total} bytes")
    if total is not None and size > total:
        _discard(partial)
        raise _Retryable(f"server sent {size} bytes but announced {total}")
    return etag


def _fetch_http(
    url: str,
    display: str,
    partial: Path,
    *,
    retries: int,
    backoff: float,
    timeout: float,
    headers: dict[str, str] | None,
    label: str,
    progress: bool,
) -> str | None:
    attempts = max(1, retries)
    failures = 0  # consecutive attempts that got no new bytes; progress resets it (a 6 GB file may need many)
    tries = 0
    while True:
        before = partial.stat().st_size if partial.is_file() else 0
        tries += 1
        try:
            return _http_attempt(
                url, display, partial, timeout=timeout, headers=headers, label=label, progress=progress
            )
        except _Retryable as exc:
            if exc.free:
                continue
            after = partial.stat().st_size if partial.is_file() else 0
            failures = 0 if after > before else failures + 1
            if failures >= attempts:
                plural = "attempt" if tries == 1 else "attempts"
                raise DownloadError(
                    f"cannot download {display}: {exc.reason} after {tries} {plural}"
                ) from exc
            delay = backoff * 2 ** max(failures - 1, 0)
            if exc.retry_after is not None:
                delay = max(delay, min(exc.retry_after, _MAX_RETRY_AFTER_S))
            if delay > 0:
                time.sleep(delay)


def _copy_local(path: Path, display: str, partial: Path, *, label: str, progress: bool) -> None:
    try:
        src = open(path, "rb")  # noqa: SIM115 (closed by the with below; opened first to word the error)
    except FileNotFoundError:
        raise DownloadError(f"cannot read {display}: no such file") from None
    except IsADirectoryError:
        raise DownloadError(f"cannot read {display}: is a directory") from None
    except OSError as exc:
        raise DownloadError(f"cannot read {display}: {_one_line(exc.strerror or exc)}") from exc
    _validator_path(partial).unlink(missing_ok=True)
    try:
        total = os.fstat(src.fileno()).st_size
        with src, open(partial, "wb") as out, _progress_bar(total, 0, label, progress) as bar:
            while chunk := src.read(CHUNK_SIZE):
                out.write(chunk)
                bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        _discard(partial)
        raise DownloadError(f"cannot copy {display}: {_one_line(exc.strerror or exc)}") from exc


def fetch(
    source: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 30.0,
    partial_dir: str | Path | None = None,
    progress: bool = True,
    headers: dict[str, str] | None = None,
    verify_etag: bool = True,
) -> str:
    """Fetch ``source`` to ``dest`` atomically; return the sha256 of what was written.

    Args:
        source: ``http(s)://`` URL, ``file://`` URL, or a local path (relative to the current directory).
        dest: final path; parent directories are created. Written only by an atomic ``os.replace``.
        sha256: expected hex digest. When given and ``dest`` already has it, nothing is fetched (cache hit);
            a mismatch deletes the download and raises.
        retries: attempts allowed in a row without new bytes (1 = no retry). An attempt that resumed and
            received more data does not count, so long transfers over a flaky link still finish.
        backoff: seconds before the first retry, doubled each further retry (``backoff * 2**n``); a
            ``Retry-After`` (capped at 60 s) can lengthen it.
        timeout: socket timeout per connect/read, seconds.
        partial_dir: where partial files live (default ``$GPTLAB_CACHE/partial``, ``~/.cache/gptlab/partial``).
        progress: show a tqdm bar (only on a terminal).
        headers: extra request headers (e.g. ``Authorization``; dropped on redirects to another host).
        verify_etag: when ``sha256`` is None, check a sha256-shaped ``X-Linked-Etag``/``ETag`` (Hugging Face
            LFS files). Turn off for a server whose 64-hex ETags are not content hashes.

    Raises:
        DownloadError: one line naming the source and the problem.
    """
    dest = Path(dest)
    display = _display(source)
    expected = _normalize_sha(sha256, display)
    if expected is not None and dest.is_file() and sha256_file(dest) == expected:
        return expected
    kind, target = _classify(source)
    partial = partial_path(source, partial_dir)
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(
            f"cannot download {display}: cannot create {partial.parent}: {exc.strerror}"
        ) from exc
    label = dest.name
    if kind == "http":
        url, headers = _split_credentials(str(target), headers)
        etag = _fetch_http(
            url,
            display,
            partial,
            retries=retries,
            backoff=backoff,
            timeout=timeout,
            headers=headers,
            label=label,
            progress=progress,
        )
    else:
        _copy_local(Path(target), display, partial, label=label, progress=progress)
        etag = None

    got = sha256_file(partial)
    if expected is None and verify_etag and etag is not None and got != etag:
        _discard(partial)
        raise DownloadError(f"sha256 mismatch for {display}: expected {etag} (the server's ETag), got {got}")
    if expected is not None and got != expected:
        _discard(partial)
        raise DownloadError(f"sha256 mismatch for {display}: expected {expected}, got {got}")
    _finalize(partial, dest)
    _validator_path(partial).unlink(missing_ok=True)
    return got
