"""Stage ``download`` against a real HTTP server on 127.0.0.1 serving ``../shared/datasets``."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from stages.download import DownloadParams, Source, download_all, mirror_candidate
from stages.fetch import DownloadError
from stages.params import ParamsError, from_dict, load_section

REPO = Path(__file__).resolve().parents[1]
VERDICT_SHA = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
INSTRUCTIONS_SHA = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
PREFERENCE_SHA = "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"
SMS_MEMBER_SHA = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"


def book_sources(server) -> dict[str, Source]:
    """The book profile's four sources, pointed at the local server instead of the internet."""
    return {
        "corpus.txt": Source(server.url("/files/the-verdict.txt"), VERDICT_SHA),
        "sms_spam.tsv": Source(
            server.url("/files/sms+spam+collection.zip"),
            member="SMSSpamCollection",
            member_sha256=SMS_MEMBER_SHA,
        ),
        "instruction-data.json": Source(server.url("/files/instruction-data.json"), INSTRUCTIONS_SHA),
        "instruction-data-with-preference.json": Source(
            server.url("/files/instruction-data-with-preference.json"), PREFERENCE_SHA
        ),
    }


def test_all_book_sources_verified(server, tmp_path) -> None:
    record = download_all(
        DownloadParams(sources=book_sources(server), retries=2), tmp_path / "raw", progress=False
    )
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(record)
    assert record["sms_spam.tsv"]["sha256"] == SMS_MEMBER_SHA
    assert (tmp_path / "raw" / "sms_spam.tsv").read_text().startswith("ham\tGo until jurong point")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no staging dirs left


def test_checksum_failure_leaves_nothing_and_keeps_old_output(server, tmp_path) -> None:
    out = tmp_path / "raw"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    sources = book_sources(server)
    sources["instruction-data.json"] = Source(server.url("/files/instruction-data.json"), VERDICT_SHA)
    with pytest.raises(DownloadError, match=r"sha256 mismatch .*instruction-data\.json"):
        download_all(DownloadParams(sources=sources, retries=1), out, progress=False)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_404_names_the_url(server, tmp_path) -> None:
    sources = {"corpus.txt": Source(server.url("/files/missing.txt"), VERDICT_SHA)}
    with pytest.raises(DownloadError, match=r"404.*/files/missing\.txt|/files/missing\.txt.*404"):
        download_all(DownloadParams(sources=sources, retries=3, timeout=5), tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw").exists()


def test_interrupted_transfer_is_resumed(server, tmp_path) -> None:
    server.script = ["cut"]
    server.cut_after = 5000
    sources = {"corpus.txt": Source(server.url("/files/the-verdict.txt"), VERDICT_SHA)}
    params = DownloadParams(sources=sources, retries=2)
    download_all(params, tmp_path / "raw", progress=False)
    assert any(s.headers.get("Range") == "bytes=5000-" for s in server.seen)


def test_zip_slip_archive_rejected(server, tmp_path) -> None:
    evil = tmp_path / "served" / "evil.zip"
    evil.parent.mkdir()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escaped.txt", "pwned")
    server.root = evil.parent
    sources = {
        "sms_spam.tsv": Source(
            server.url("/files/evil.zip"), member="../../escaped.txt", member_sha256=VERDICT_SHA
        )
    }
    with pytest.raises(DownloadError, match="escaped.txt"):
        download_all(DownloadParams(sources=sources), tmp_path / "a" / "raw", progress=False)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (tmp_path / "a" / "raw").exists()


@pytest.mark.parametrize(
    ("content", "member", "expected"),
    [
        (b"not a zip at all", "SMSSpamCollection", "not a valid zip file"),
        (None, "SMSSpamCollection", r"has no member 'SMSSpamCollection'; members: readme\.txt"),
    ],
)
def test_zip_errors_name_the_source_not_a_temp_path(server, tmp_path, content, member, expected) -> None:
    archive = tmp_path / "served" / "sms.zip"
    archive.parent.mkdir()
    if content is None:
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("readme.txt", "hi")
    else:
        archive.write_bytes(content)
    server.root = archive.parent
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    sources = {"sms_spam.tsv": Source(server.url("/files/sms.zip"), sha, member=member)}
    with pytest.raises(DownloadError, match=expected) as info:
        download_all(DownloadParams(sources=sources), tmp_path / "raw", progress=False)
    message = str(info.value)
    assert server.url("/files/sms.zip") in message and "tmp" not in message.replace(str(tmp_path), "")
    assert not (tmp_path / "raw").exists()


def test_source_needs_a_checksum() -> None:
    with pytest.raises(ValueError, match="give sha256"):
        Source("https://example.invalid/x")
    with pytest.raises(ValueError, match="member_sha256 needs member"):
        Source("x", member_sha256=VERDICT_SHA)


def test_stage_cli_one_line_error_exit_2(server, tmp_path) -> None:
    """The stage as DVC runs it: a checksum mismatch is one stderr line naming the source, exit 2."""
    params = {
        "download": {
            "sources": {"corpus.txt": {"url": server.url("/files/the-verdict.txt"), "sha256": "0" * 64}},
            "retries": 1,
        }
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, "-m", "stages.download", "--out", "data/raw", "--metrics", "metrics/download.json"],
        cwd=tmp_path,
        env={**_env(tmp_path), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("download: error: sha256 mismatch") and "the-verdict.txt" in last
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "raw").exists()


def test_unknown_and_missing_keys_are_named(tmp_path) -> None:
    bad = {"download": {"sources": {"a.txt": {"url": "x", "sha256": "1" * 64, "sha512": "?"}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(
        ParamsError, match=r"params\.yaml: download\.sources\.a\.txt: unknown key\(s\) sha512"
    ):
        load_section("download", DownloadParams, tmp_path / "params.yaml")
    bad = {"download": {"sources": {"a.txt": {"sha256": "1" * 64}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ParamsError, match=r"download\.sources\.a\.txt\.url: missing"):
        load_section("download", DownloadParams, tmp_path / "params.yaml")


def _env(tmp_path: Path) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return env


def test_the_book_profile_runs_offline_from_a_mirror(shared_dir, tmp_path, caplog) -> None:
    """The book's real URLs (unreachable here) with ``mirror`` pointing at local copies: nothing is fetched."""
    caplog.set_level(logging.INFO, logger="stages")
    book = yaml.safe_load((REPO / "profiles" / "book.yaml").read_text())["download"]
    book["mirror"] = str(shared_dir / "datasets")
    params = from_dict(DownloadParams, book, "download")
    record = download_all(params, tmp_path / "raw", progress=False)
    assert record["corpus.txt"] == {"url": book["sources"]["corpus.txt"]["url"], "sha256": VERDICT_SHA}
    assert record["sms_spam.tsv"]["sha256"] == SMS_MEMBER_SHA
    assert caplog.text.count(str(shared_dir / "datasets")) == 4


def test_a_mirror_copy_that_fails_verification_falls_back_to_the_url(server, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="stages")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "the-verdict.txt").write_text("not the story")
    sources = {"corpus.txt": Source(server.url("/files/the-verdict.txt"), VERDICT_SHA)}
    record = download_all(
        DownloadParams(sources=sources, mirror=str(mirror)), tmp_path / "raw", progress=False
    )
    assert record["corpus.txt"]["sha256"] == VERDICT_SHA
    assert f"mirror copy {mirror / 'the-verdict.txt'} not used: sha256 mismatch" in caplog.text
    assert [s.path for s in server.seen] == ["/files/the-verdict.txt"]


def test_mirror_candidate_is_the_urls_file_name(tmp_path) -> None:
    (tmp_path / "sms+spam+collection.zip").write_bytes(b"x")
    url = "https://archive.ics.uci.edu/static/public/228/sms%2Bspam%2Bcollection.zip?download=1"
    assert mirror_candidate(str(tmp_path), url) == tmp_path / "sms+spam+collection.zip"
    assert mirror_candidate(str(tmp_path), "https://x/other.zip") is None
    assert mirror_candidate(None, url) is None


def test_a_mirror_that_is_not_a_directory_is_a_params_error(tmp_path) -> None:
    data = {
        "sources": {"c.txt": {"url": "https://x/c.txt", "sha256": VERDICT_SHA}},
        "mirror": str(tmp_path / "no"),
    }
    with pytest.raises(ParamsError, match=rf"download: mirror: {tmp_path / 'no'} is not a directory"):
        from_dict(DownloadParams, data, "params.yaml: download")
