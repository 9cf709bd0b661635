"""stages.fetch against a real HTTP server on 127.0.0.1 serving the real datasets from ``../shared``.

The server speaks just enough HTTP to exercise what matters: Range/206/416, ETags, redirects, and scripted
faults (500s, connections cut mid-body, stalls) so retries and resume are tested over real sockets.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import re
import socket
import stat
import zipfile
from pathlib import Path

import pytest
from datasets_server import ServerState

from gptlab.fileio import sha256_file
from stages.fetch import DownloadError, fetch, partial_path
from stages.unzip import extract_member, safe_extract_zip

VERDICT_SHA = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
INSTRUCTIONS_SHA = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
SMS_MEMBER_SHA = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
BAD_SHA = "0" * 64


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # An environment proxy would swallow requests to 127.0.0.1; the default cache must not be ~/.cache.
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(directory for dest, partial_dir)."""
    return tmp_path / "out", tmp_path / "partial"


def _listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------- HTTP


def test_checksum_pass(server: ServerState, dirs: tuple[Path, Path], shared_dir: Path) -> None:
    out, partial = dirs
    dest = out / "nested" / "the-verdict.txt"
    got = fetch(
        server.url("/files/the-verdict.txt"),
        dest,
        sha256=VERDICT_SHA.upper(),
        partial_dir=partial,
        progress=False,
    )
    assert got == VERDICT_SHA
    assert dest.read_bytes() == (shared_dir / "datasets" / "the-verdict.txt").read_bytes()
    assert _listing(dest.parent) == ["the-verdict.txt"]
    assert _listing(partial) == []
    assert server.seen[0].headers.get("Accept-Encoding") == "identity"


def test_checksum_mismatch_removes_everything(server: ServerState, dirs: tuple[Path, Path]) -> None:
    out, partial = dirs
    url = server.url("/files/the-verdict.txt")
    with pytest.raises(DownloadError) as info:
        fetch(url, out / "v.txt", sha256=BAD_SHA, partial_dir=partial, backoff=0, progress=False)
    msg = str(info.value)
    assert msg == f"sha256 mismatch for {url}: expected {BAD_SHA}, got {VERDICT_SHA}"
    assert not (out / "v.txt").exists()
    assert _listing(out) == []
    assert _listing(partial) == []


def test_404_fails_at_once(server: ServerState, dirs: tuple[Path, Path]) -> None:
    out, partial = dirs
    url = server.url("/files/no-such-file.txt")
    with pytest.raises(DownloadError, match="404") as info:
        fetch(url, out / "x", retries=3, backoff=0, partial_dir=partial, progress=False)
    assert url in str(info.value)
    assert len(server.seen) == 1
    assert _listing(out) == []


def test_500_then_success(server: ServerState, dirs: tuple[Path, Path]) -> None:
    out, partial = dirs
    server.script = ["500", "500"]
    got = fetch(
        server.url("/files/the-verdict.txt"),
        out / "v.txt",
        retries=3,
        backoff=0,
        partial_dir=partial,
        progress=False,
    )
    assert got == VERDICT_SHA == sha256_file(out / "v.txt")
    assert len(server.seen) == 3


def test_500_exhausts_retries(server: ServerState, dirs: tuple[Path, Path]) -> None:
    out, partial = dirs
    server.script = ["500"] * 5
    url = server.url("/files/the-verdict.txt")
    with pytest.raises(DownloadError) as info:
        fetch(url, out / "v.txt", retries=2, backoff=0.01, partial_dir=partial, progress=False)
    assert str(info.value) == f"cannot download {url}: HTTP 500 Internal Server Error after 2 attempts"
    assert len(server.seen) == 2


def test_interrupted_transfer_resumes_with_range(server: ServerState, dirs: tuple[Path, Path]) -> None:
    out, partial = dirs
    server.script = ["cut"]
    server.cut_after = 50_000
    server.etag = '"v1"'  # strong, not a sha256: used as If-Range, not for verification
    got = fetch(
        server.url("/files/instruction-data.json"),
        out / "instructions.json",
        sha256=INSTRUCTIONS_SHA,
        retries=2,
        backoff=0,
        partial_dir=partial,
        progress=False,
    )
    assert got == INSTRUCTIONS_SHA == sha256_file(out / "instructions.json")
    assert [s.headers.get("Range") for s in server.seen] == [None, "bytes=50000-"]
    assert server.seen[1].headers.get("If-Range") == '"v1"'
    assert _listing(partial) == []


def test_resume_across_calls_leaves_nothing_beside_dest(server: ServerState, dirs: tuple[Path, Path]) -> None:
    out, partial = dirs
    url = server.url("/files/instruction-data.json")
    # The cut makes progress (so it costs no attempt); the 500 then exhausts retries=1.
    server.script = ["cut", "500"]
    server.cut_after = 70_000
    with pytest.raises(DownloadError, match="HTTP 500"):
        fetch(url, out / "i.json", retries=1, backoff=0, partial_dir=partial, progress=False)
    assert _listing(out) == []
    assert partial_path(url, partial).stat().st_size == 70_000

    assert fetch(url, out / "i.json", partial_dir=partial, backoff=0, progress=False) == INSTRUCTIONS_SHA
    assert server.seen[-1].headers.get("Range") == "bytes=70000-"
    assert _listing(out) == ["i.json"]
    assert _listing(partial) == []


def test_server_ignoring_range_restarts_from_zero(server: ServerState, dirs: tuple[Path, Path]) -> None:
    out, partial = dirs
    url = server.url("/files/instruction-data.json")
    server.script = ["cut", "500"]
    with pytest.raises(DownloadError):
        fetch(url, out / "i.json", retries=1, backoff=0, partial_dir=partial, progress=False)
    server.ignore_range = True
    assert fetch(url, out / "i.json", sha256=INSTRUCTIONS_SHA, partial_dir=partial, progress=False)
    assert server.seen[-1].headers.get("Range") == "bytes=10000-"
    assert sha256_file(out / "i.json") == INSTRUCTIONS_SHA


def test_complete_partial_is_finished_without_body(
    server: ServerState, dirs: tuple[Path, Path], shared_dir: Path
) -> None:
    out, partial = dirs
    url = server.url("/files/the-verdict.txt")
    part = partial_path(url, partial)
    part.parent.mkdir(parents=True)
    data = (shared_dir / "datasets" / "the-verdict.txt").read_bytes()
    part.write_bytes(data)
    assert fetch(url, out / "v.txt", sha256=VERDICT_SHA, partial_dir=partial, progress=False) == VERDICT_SHA
    assert [s.headers.get("Range") for s in server.seen] == [f"bytes={len(data)}-"]  # answered 416, no body
    assert not part.exists()


def test_timeout_is_retried_then_reported(server: ServerState, dirs: tuple[Path, Path]) -> None:
    out, partial = dirs
    server.script = ["stall", "stall"]
    url = server.url("/files/the-verdict.txt")
    with pytest.raises(DownloadError, match=r"timed out after 0\.1s after 2 attempts") as info:
        fetch(url, out / "v.txt", retries=2, backoff=0, timeout=0.1, partial_dir=partial, progress=False)
    assert url in str(info.value)


def test_connection_refused_is_one_line(dirs: tuple[Path, Path]) -> None:
    out, partial = dirs
    url = f"http://127.0.0.1:{_closed_port()}/the-verdict.txt"
    with pytest.raises(DownloadError) as info:
        fetch(url, out / "v.txt", retries=2, backoff=0, partial_dir=partial, progress=False)
    assert str(info.value) == f"cannot download {url}: connection refused after 2 attempts"
    assert _listing(out) == []


def test_cache_hit_makes_no_request(server: ServerState, dirs: tuple[Path, Path], shared_dir: Path) -> None:
    out, partial = dirs
    dest = out / "v.txt"
    out.mkdir()
    dest.write_bytes((shared_dir / "datasets" / "the-verdict.txt").read_bytes())
    assert (
        fetch(server.url("/files/the-verdict.txt"), dest, sha256=VERDICT_SHA, partial_dir=partial)
        == VERDICT_SHA
    )
    assert server.seen == []
    # A stale dest is replaced.
    dest.write_text("stale")
    fetch(server.url("/files/the-verdict.txt"), dest, sha256=VERDICT_SHA, partial_dir=partial, progress=False)
    assert sha256_file(dest) == VERDICT_SHA and len(server.seen) == 1


@pytest.mark.parametrize("etag", [f'"{VERDICT_SHA}"', f'W/"{VERDICT_SHA.upper()}"', '"not-a-sha-abc123"'])
def test_etag_verification_passes(server: ServerState, dirs: tuple[Path, Path], etag: str) -> None:
    out, partial = dirs
    server.etag = etag
    assert fetch(
        server.url("/files/the-verdict.txt"), out / "v.txt", partial_dir=partial, progress=False
    ) == (VERDICT_SHA)


def test_bad_etag_fails_unless_disabled(server: ServerState, dirs: tuple[Path, Path]) -> None:
    out, partial = dirs
    server.etag = f'"{BAD_SHA}"'
    url = server.url("/files/the-verdict.txt")
    with pytest.raises(DownloadError, match=rf"sha256 mismatch for {re.escape(url)}: expected {BAD_SHA}"):
        fetch(url, out / "v.txt", partial_dir=partial, progress=False)
    assert _listing(out) == [] and _listing(partial) == []
    assert fetch(url, out / "v.txt", partial_dir=partial, progress=False, verify_etag=False) == VERDICT_SHA


def test_hub_style_redirect_linked_etag_and_token(server: ServerState, dirs: tuple[Path, Path]) -> None:
    out, partial = dirs
    server.etag = '"cdn-etag-1"'  # the CDN's own ETag: not a sha256, must not be what is checked
    url = server.url("/redirect/the-verdict.txt")
    server.linked_etag = f'"{BAD_SHA}"'
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        fetch(url, out / "v.txt", partial_dir=partial, progress=False, headers={"Authorization": "Bearer t"})
    assert server.seen[0].headers.get("Authorization") == "Bearer t"
    assert "Authorization" not in server.seen[1].headers  # redirected to another host (localhost)
    server.linked_etag = VERDICT_SHA
    assert fetch(url, out / "v.txt", partial_dir=partial, progress=False) == VERDICT_SHA


def test_url_credentials_become_basic_auth_and_are_never_printed(
    server: ServerState, dirs: tuple[Path, Path]
) -> None:
    out, partial = dirs
    url = f"http://u:p%40ss@127.0.0.1:{server.port}/files/the-verdict.txt"
    assert fetch(url, out / "v.txt", partial_dir=partial, progress=False) == VERDICT_SHA
    assert server.seen[0].headers["Authorization"] == "Basic " + base64.b64encode(b"u:p@ss").decode()
    with pytest.raises(DownloadError) as info:
        fetch(url.replace("the-verdict", "missing"), out / "m.txt", partial_dir=partial, progress=False)
    assert "p%40ss" not in str(info.value) and "u:***@127.0.0.1" in str(info.value)


def test_default_partial_dir_is_under_gptlab_cache(server: ServerState, tmp_path: Path) -> None:
    url = server.url("/files/the-verdict.txt")
    server.script = ["cut", "500"]
    server.cut_after = 1000
    with pytest.raises(DownloadError):
        fetch(url, tmp_path / "out" / "v.txt", retries=1, backoff=0, progress=False)
    part = partial_path(url)
    assert part.parent == tmp_path / "cache" / "partial"
    assert part.stat().st_size == 1000
    assert not (tmp_path / "out").exists()


def test_cross_filesystem_copy_fallback(
    server: ServerState, dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, partial = dirs
    real_replace = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        if Path(src).parent == partial:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(src, dst)

    monkeypatch.setattr("stages.fetch.os.replace", replace)
    url = server.url("/files/the-verdict.txt")
    assert fetch(url, out / "v.txt", sha256=VERDICT_SHA, partial_dir=partial, progress=False) == VERDICT_SHA
    assert _listing(out) == ["v.txt"] and _listing(partial) == []
    assert stat.S_IMODE((out / "v.txt").stat().st_mode) & 0o044  # not mkstemp's 0600


# ----------------------------------------------------------------------------------------- local sources


def test_file_url_and_plain_paths(
    shared_dir: Path, dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, partial = dirs
    src = shared_dir / "datasets" / "the-verdict.txt"
    assert fetch(src.as_uri(), out / "a.txt", sha256=VERDICT_SHA, partial_dir=partial) == VERDICT_SHA
    assert fetch(str(src), out / "b.txt", partial_dir=partial) == VERDICT_SHA
    monkeypatch.chdir(src.parent)
    assert fetch("the-verdict.txt", out / "c.txt", partial_dir=partial) == VERDICT_SHA
    assert _listing(out) == ["a.txt", "b.txt", "c.txt"] and _listing(partial) == []


def test_bad_local_sources(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    out, partial = dirs
    with pytest.raises(DownloadError, match=r"no such file"):
        fetch(str(tmp_path / "missing.txt"), out / "x", partial_dir=partial)
    with pytest.raises(DownloadError, match=r"unsupported scheme 'ftp'"):
        fetch("ftp://example.com/x", out / "x", partial_dir=partial)
    with pytest.raises(DownloadError, match="invalid sha256"):
        fetch(str(tmp_path), out / "x", sha256="abc", partial_dir=partial)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------ zip


def _zip(path: Path, members: dict[str | zipfile.ZipInfo, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(
    "evil",
    ["../evil.txt", "/tmp/gptlab-evil-abs.txt", "C:/evil.txt", "sub/../../evil.txt", "..\\evil.txt", "link"],
)
def test_zip_slip_rejected_before_anything_is_written(tmp_path: Path, evil: str) -> None:
    bad = _symlink_info(evil) if evil == "link" else evil
    archive = _zip(
        tmp_path / "a.zip", {"ok.txt": b"fine", "dir/ok2.txt": b"fine", bad: b"../../../etc/passwd"}
    )
    out = tmp_path / "x" / "out"
    with pytest.raises(DownloadError, match=r"unsafe member .* nothing extracted") as info:
        safe_extract_zip(archive, out)
    assert str(archive) in str(info.value)
    assert not out.exists()
    assert _listing(tmp_path) == ["a.zip"]
    assert not (tmp_path / "x" / "evil.txt").exists() and not Path("/tmp/gptlab-evil-abs.txt").exists()


def test_safe_extract_zip_writes_members(tmp_path: Path, shared_dir: Path) -> None:
    archive = _zip(tmp_path / "a.zip", {"top.txt": b"1", "d/e/f.txt": b"2", "d/": b""})
    out = tmp_path / "out"
    written = safe_extract_zip(archive, out)
    assert written == [out / "top.txt", out / "d" / "e" / "f.txt"]
    assert (out / "d" / "e" / "f.txt").read_bytes() == b"2"
    assert safe_extract_zip(archive, tmp_path / "sub", members=["top.txt"]) == [tmp_path / "sub" / "top.txt"]
    with pytest.raises(DownloadError, match=r"no member\(s\) 'nope'"):
        safe_extract_zip(archive, out, members=["nope"])

    real = safe_extract_zip(shared_dir / "datasets" / "sms+spam+collection.zip", tmp_path / "sms")
    assert real == [tmp_path / "sms" / "SMSSpamCollection"]
    assert sha256_file(real[0]) == SMS_MEMBER_SHA


def test_extract_member_real_uci_zip(tmp_path: Path, shared_dir: Path) -> None:
    archive = shared_dir / "datasets" / "sms+spam+collection.zip"
    dest = tmp_path / "raw" / "sms.tsv"
    assert extract_member(archive, "SMSSpamCollection", dest, sha256=SMS_MEMBER_SHA) == SMS_MEMBER_SHA
    assert sha256_file(dest) == SMS_MEMBER_SHA
    assert _listing(dest.parent) == ["sms.tsv"]


def test_extract_member_wrong_sha_leaves_nothing(tmp_path: Path, shared_dir: Path) -> None:
    archive = shared_dir / "datasets" / "sms+spam+collection.zip"
    dest = tmp_path / "raw" / "sms.tsv"
    with pytest.raises(DownloadError) as info:
        extract_member(archive, "SMSSpamCollection", dest, sha256=BAD_SHA)
    msg = str(info.value)
    assert str(archive) in msg and "'SMSSpamCollection'" in msg and SMS_MEMBER_SHA in msg
    assert not dest.exists() and _listing(dest.parent) == []


def test_extract_member_missing_and_corrupt(tmp_path: Path, shared_dir: Path) -> None:
    archive = shared_dir / "datasets" / "sms+spam+collection.zip"
    with pytest.raises(DownloadError, match=r"has no member 'readme.txt'; members: SMSSpamCollection"):
        extract_member(archive, "readme.txt", tmp_path / "r.txt")
    not_zip = tmp_path / "not.zip"
    not_zip.write_bytes(hashlib.sha256(b"x").digest())
    with pytest.raises(DownloadError, match="not a valid zip file"):
        extract_member(not_zip, "a", tmp_path / "a")
    assert _listing(tmp_path) == ["not.zip"]
