"""Stage ``download``: fetch every raw input named in ``params.yaml`` into one directory, verified.

Sources are ``http(s)://`` URLs, ``file://`` URLs or local paths, each with the sha256 of the file, or, for a zip
whose own hash is not known (the UCI SMS Spam Collection), the sha256 of the member to extract. Everything is
staged in a temp directory and moved into place only when every source verified, so a failure leaves nothing
half-written in the output directory. Book: ch. 2 (the-verdict.txt), ch. 6 (SMS spam zip; the IMDB bonus's
``aclImdb_v1.tar.gz`` with ``layout: aclimdb``), ch. 7 (instruction and preference JSON).

``mirror`` names a local directory tried before the network: a file there named like the last component of a
source's URL (``the-verdict.txt``, ``sms+spam+collection.zip``, …) is used when it verifies, so the book profile
runs offline from local copies with its URLs unchanged.
"""

from __future__ import annotations

import argparse
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from gptlab.errors import UserError
from gptlab.fileio import atomic_dir, write_json
from stages import aclimdb, tracking
from stages.entry import stage_log, stage_main
from stages.fetch import DownloadError, fetch
from stages.params import load_section
from stages.unzip import extract_member

LOG = stage_log("download")
LAYOUTS = (None, "aclimdb")


@dataclass
class Source:
    """One raw input; its key in ``download.sources`` is the file name it gets in the output directory."""

    url: str
    """``http(s)://`` or ``file://`` URL, or a path relative to the repository root."""
    sha256: str | None = None
    """sha256 of the fetched file (required unless ``member_sha256`` pins a zip member)."""
    member: str | None = None
    """Extract this member of the fetched zip instead of keeping the zip."""
    member_sha256: str | None = None
    """sha256 of the extracted member."""
    layout: str | None = None
    """``aclimdb``: the fetched file is Stanford's ``aclImdb_v1.tar.gz``, written as the classify stage's
    ``label<TAB>review`` file in the book's order (:mod:`stages.aclimdb`); ``sha256`` is the archive's."""

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise UserError(f"layout must be one of {', '.join(map(str, LAYOUTS))}, got {self.layout!r}")
        if self.layout is not None and (self.member is not None or self.sha256 is None):
            raise UserError(
                f"{self.url}: layout {self.layout} reads the whole archive: give its sha256, no member"
            )
        if self.member is None and self.member_sha256 is not None:
            raise UserError("member_sha256 needs member")
        if self.sha256 is None and self.member_sha256 is None:
            raise UserError(
                f"{self.url}: give sha256 (or member + member_sha256) so the download can be verified"
            )


@dataclass
class DownloadParams:
    sources: dict[str, Source] = field(default_factory=dict)
    """Output file name -> source."""
    retries: int = 3
    """Consecutive failed attempts allowed per source (resumes where the server allows)."""
    timeout: float = 30.0
    """Socket timeout in seconds."""
    mirror: str | None = None
    """Local directory (absolute, or relative to the repository root) searched first for each source by its
    URL's file name; a copy that fails verification is reported and the URL is fetched instead."""

    def __post_init__(self) -> None:
        if self.mirror is not None and not Path(self.mirror).expanduser().is_dir():
            raise UserError(f"mirror: {self.mirror} is not a directory")


def mirror_candidate(mirror: str | None, url: str) -> Path | None:
    """The file in ``mirror`` named like ``url``'s last path component, if there is one."""
    if not mirror:
        return None
    name = urllib.parse.unquote(Path(urllib.parse.urlparse(url).path).name)
    candidate = Path(mirror).expanduser() / name
    return candidate if name and candidate.is_file() else None


def _fetch_source(src: Source, dest: Path, scratch: Path, location: str, **kw) -> str:
    """Fetch one source from ``location`` into ``dest`` (extracting its member or converting its layout),
    verified; the sha256 of what was fetched (the member's for a member)."""
    if src.layout == "aclimdb":
        archive = scratch / f"{dest.name}.tar.gz"
        digest = fetch(location, archive, sha256=src.sha256, **kw)
        n = aclimdb.convert(archive, dest, source=location)
        LOG.info("%s: %d reviews from %s", dest.name, n, Path(location).name)
        return digest
    if src.member is None:
        return fetch(location, dest, sha256=src.sha256, **kw)
    archive = scratch / f"{dest.name}.zip"
    archive.unlink(missing_ok=True)
    fetch(location, archive, sha256=src.sha256, **kw)
    return extract_member(archive, src.member, dest, sha256=src.member_sha256, source=location)


def download_all(
    params: DownloadParams, out_dir: Path, *, progress: bool = True
) -> dict[str, dict[str, str]]:
    """Fetch and verify every source into ``out_dir`` (replaced atomically); returns name -> {url, sha256}."""
    if not params.sources:
        raise UserError("download.sources is empty")
    record = {}
    with atomic_dir(out_dir) as staging, tempfile.TemporaryDirectory() as scratch:
        for name, src in params.sources.items():
            if Path(name).name != name:
                raise UserError(f"download.sources key {name!r} must be a plain file name")
            kw = dict(retries=params.retries, timeout=params.timeout, progress=progress)
            origin = src.url
            candidate = mirror_candidate(params.mirror, src.url)
            digest = None
            if candidate is not None:
                try:
                    digest = _fetch_source(src, staging / name, Path(scratch), str(candidate), **kw)
                    origin = str(candidate)
                except DownloadError as exc:
                    LOG.warning("mirror copy %s not used: %s", candidate, exc)
            if digest is None:
                digest = _fetch_source(src, staging / name, Path(scratch), src.url, **kw)
            record[name] = {"url": src.url, "sha256": digest}
            LOG.info("%s <- %s (sha256 %s…)", name, origin, digest[:12])
    return record


@stage_main("download")
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory for the raw files")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON record of what was fetched")
    args = parser.parse_args()
    params = load_section("download", DownloadParams)
    with tracking.stage_run("download", params):
        record = download_all(params, args.out)
        sizes = {name: (args.out / name).stat().st_size for name in record}
        metrics = {"files": len(record), "bytes": sum(sizes.values()), "sources": record}
        write_json(args.metrics, metrics)
        tracking.log_metrics({"files": metrics["files"], "bytes": metrics["bytes"]})
        tracking.log_outputs("download")
    print(f"download: {len(record)} files -> {args.out}")


if __name__ == "__main__":
    main()
