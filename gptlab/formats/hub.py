"""Model files from the Hugging Face hub, verified: the one place gptlab downloads weights from the network.

Through ``huggingface_hub`` (its cache layout under ``$GPTLAB_CACHE/hf``; resumed after an interruption;
``revision`` a branch, tag or commit). The hub publishes an LFS file's sha256 as its ETag and the cache stores
each file as ``blobs/<ETag>``: every weights blob is hashed and checked against its name, and a mismatch removes
it. Offline every failure is one line naming the URL.
"""

from __future__ import annotations

import re
from pathlib import Path

from gptlab.errors import UserError
from gptlab.fileio import cache_dir as gptlab_cache
from gptlab.fileio import sha256_file

_SHA256 = re.compile(r"[0-9a-f]{64}")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


class HubError(UserError):
    """A download that failed or did not verify; the message names the URL."""


def download_files(
    repo: str,
    filenames: list[str],
    *,
    optional: tuple[str, ...] = (),
    revision: str = "main",
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    progress: bool = True,
) -> Path:
    """Download ``filenames`` (and those of ``optional`` the repo has) of ``repo``; returns their directory."""
    from huggingface_hub import hf_hub_download, hf_hub_url
    from huggingface_hub.errors import RemoteEntryNotFoundError
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    cache = Path(cache_dir or gptlab_cache() / "hf")
    folder: Path | None = None
    quiet = not progress and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        for filename in [*filenames, *optional]:
            url = hf_hub_url(repo, filename, revision=revision, endpoint=endpoint)
            try:
                path = Path(
                    hf_hub_download(repo, filename, revision=revision, cache_dir=cache, endpoint=endpoint)
                )
            except RemoteEntryNotFoundError:
                if filename in optional:
                    continue
                raise HubError(f"cannot download {url}: not found") from None
            except Exception as exc:  # huggingface_hub raises many types (HTTP, connection, offline cache)
                reason = " ".join(str(exc).split())[:200]
                raise HubError(
                    f"cannot download {url}: {reason} (offline? pass a local model directory instead)"
                ) from None
            blob = path.resolve()
            if _SHA256.fullmatch(blob.name) and (got := sha256_file(blob)) != blob.name:
                path.unlink(missing_ok=True)
                blob.unlink(missing_ok=True)
                raise HubError(f"sha256 mismatch for {url}: the hub says {blob.name}, the download is {got}")
            folder = path.parent
    finally:
        if quiet:
            enable_progress_bars()
    assert folder is not None
    return folder


def download_model(
    repo: str,
    *,
    revision: str = "main",
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    progress: bool = True,
) -> Path:
    """A Hugging Face model repo's config, weights (one file or every shard of its index) and tokenizer files."""
    import json

    common = dict(revision=revision, cache_dir=cache_dir, endpoint=endpoint, progress=progress)
    folder = download_files(
        repo, ["config.json"], optional=("model.safetensors", "model.safetensors.index.json"), **common
    )
    if not (folder / "model.safetensors").is_file():
        index = folder / "model.safetensors.index.json"
        if not index.is_file():
            raise HubError(
                f"{repo}@{revision}: has neither model.safetensors nor model.safetensors.index.json"
            )
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        download_files(repo, shards, **common)
    download_files(repo, [], optional=TOKENIZER_FILES, **common)
    return folder
