"""Every base-model source through :func:`gptlab.formats.pretrained.load_pretrained` and ``gptlab import``: a Hugging Face
directory with sharded safetensors and its tokenizer, a hub repo id (a stand-in hub on 127.0.0.1: cached,
revision-pinned, sha256-verified), a GGUF file, a checkpoint; and the one-line errors."""

from __future__ import annotations

import pytest
import torch
from hub_server import COMMIT, serve_hub
from tiny_gguf import tiny_llama, write_llama_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

from gptlab.checkpoint import read_config
from gptlab.cli import main as cli_main
from gptlab.formats.gguf_read import load_gguf
from gptlab.formats.hub import HubError
from gptlab.formats.pretrained import load_pretrained
from gptlab.load import load_checkpoint, load_tokenizer

IDS = torch.tensor([[5, 70, 80, 90, 100, 3, 200, 7]])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A Hugging Face model directory: config.json, three safetensors shards + index, tokenizer files."""
    root = tmp_path_factory.mktemp("hf")
    model = tiny_llama(tie=False, seed=3)
    model.save_pretrained(root / "model", max_shard_size="200KB")
    _, tokenizer = load_gguf(write_llama_gguf(model, root / "tiny.gguf"))
    tokenizer.save(root / "model")
    return root / "model"


def _reference(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_sharded_directory_imports_with_its_tokenizer(hf_dir, tmp_path, capsys) -> None:
    assert len(list(hf_dir.glob("model-*.safetensors"))) > 1
    assert cli_main(["import", str(hf_dir), str(tmp_path / "ck")]) == 0
    assert f"from hf:{hf_dir}" in capsys.readouterr().err
    model, _ = load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), _reference(hf_dir)(IDS).logits, atol=1e-4, rtol=1e-4)
    tokenizer = load_tokenizer(tmp_path / "ck")
    assert (
        tokenizer.name == "hf"
        and tokenizer.encode("the cat") == AutoTokenizer.from_pretrained(hf_dir)("the cat")["input_ids"]
    )
    assert read_config(tmp_path / "ck")["meta"]["source"] == f"hf:{hf_dir}"
    # a checkpoint is a source too
    again, tok, origin = load_pretrained(tmp_path / "ck")
    assert origin == f"checkpoint:{tmp_path / 'ck'}" and tok.chat_template == tokenizer.chat_template


@pytest.fixture
def hub(hf_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    files = {f"org/tiny/{p.name}": p for p in hf_dir.iterdir()}
    servers = []

    def start(**kw) -> str:
        servers.append(serve_hub(files, **kw))
        return f"http://127.0.0.1:{servers[-1].server_port}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_repo_id_downloads_every_shard_and_the_tokenizer(hub, hf_dir, tmp_path) -> None:
    endpoint = hub()
    model, tokenizer, origin = load_pretrained("org/tiny", endpoint=endpoint, progress=False)
    assert origin == "hub:org/tiny@main"
    snapshot = tmp_path / "cache" / "hf" / "models--org--tiny" / "snapshots" / COMMIT
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(p.name for p in hf_dir.iterdir())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), _reference(hf_dir)(IDS).logits, atol=1e-4, rtol=1e-4)
    assert tokenizer.encode("the cat") == AutoTokenizer.from_pretrained(hf_dir)("the cat")["input_ids"]
    # pinned to the commit it resolved to: served from the cache, the same files
    pinned, _, origin = load_pretrained("org/tiny", endpoint=endpoint, revision=COMMIT, progress=False)
    assert origin == f"hub:org/tiny@{COMMIT}"


def test_repo_id_with_a_corrupt_shard_fails_and_keeps_nothing(hub, tmp_path) -> None:
    endpoint = hub(bad_etag=True)
    with pytest.raises(HubError, match=r"sha256 mismatch for .*model-00001-of-0000\d\.safetensors"):
        load_pretrained("org/tiny", endpoint=endpoint, progress=False)
    blobs = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.stat().st_size > 100_000]
    assert blobs == []


def test_unknown_sources_are_one_line_errors(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"gpt5: expected a directory, a \.gguf file, a hub repo id") as err:
        load_pretrained("gpt5")
    assert "smollm2-135m-instruct" in str(err.value)
    with pytest.raises(
        ValueError, match=r"config\.json: not found \(expected a gptlab checkpoint or a Hugging"
    ):
        load_pretrained(tmp_path)
    with pytest.raises(HubError, match=r"cannot download http://127\.0\.0\.1:9/org/x/.*offline\?"):
        load_pretrained("org/x", endpoint="http://127.0.0.1:9", progress=False)
