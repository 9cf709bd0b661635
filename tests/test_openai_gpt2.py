"""GPT-2 import proven against Hugging Face ``transformers`` (an independent implementation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hub_server import COMMIT, serve_hub
from transformers import GPT2Config, GPT2LMHeadModel

from gptlab.cli import main as cli_main
from gptlab.formats.openai_gpt2 import (
    WeightImportError,
    config_from_hf,
    download_gpt2,
    load_hf_gpt2,
    resolve_source,
)
from gptlab.generate import generate
from gptlab.load import load_checkpoint


@pytest.fixture(scope="module")
def hf_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=320,
        n_positions=48,
        n_embd=32,
        n_layer=3,
        n_head=4,
        initializer_range=0.3,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-zero biases/norms so every tensor's mapping is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    hf_model.save_pretrained(path)
    assert (path / "model.safetensors").is_file()
    return path


def _assert_matches(ours, hf_model) -> None:
    idx = torch.randint(0, 320, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(idx).logits
    torch.testing.assert_close(ours(idx), ref, atol=1e-5, rtol=1e-5)
    prompt = idx[:1, :6]
    hf_out = hf_model.generate(
        prompt, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(prompt)
    )
    ours_out = generate(ours, [prompt[0].tolist()], max_new_tokens=20)[0]
    assert ours_out == hf_out[0, 6:].tolist()
    assert len(set(ours_out)) > 3


def test_safetensors_import_matches_transformers(hf_dir, hf_model) -> None:
    ours = load_hf_gpt2(hf_dir)
    assert ours.num_params() == sum(p.numel() for p in hf_model.parameters())
    assert ours.lm_head.weight is ours.transformer.wte.weight
    _assert_matches(ours, hf_model)


def test_pytorch_bin_with_openai_key_layout(hf_model, hf_dir, tmp_path) -> None:
    """The hub's original files name tensors without the ``transformer.`` prefix and carry mask buffers."""
    state = {
        k.removeprefix("transformer."): v.clone()
        for k, v in hf_model.state_dict().items()
        if k != "lm_head.weight"
    }
    for i in range(3):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 48, 48))
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    _assert_matches(load_hf_gpt2(tmp_path), hf_model)


def test_cli_import_then_generate(hf_dir, hf_model, tmp_path, capsys) -> None:
    assert cli_main(["import-gpt2", str(hf_dir), str(tmp_path / "ck")]) == 0
    model, config = load_checkpoint(tmp_path / "ck")
    assert config["meta"]["source"] == str(hf_dir)
    _assert_matches(model, hf_model)


def test_bad_sources_are_one_line_errors(hf_dir, tmp_path) -> None:
    with pytest.raises(WeightImportError, match="neither an existing directory nor a model name"):
        resolve_source(tmp_path / "nope")
    with pytest.raises(WeightImportError, match="config.json: not found"):
        load_hf_gpt2(tmp_path)
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(WeightImportError, match="no model.safetensors or pytorch_model.bin"):
        load_hf_gpt2(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(WeightImportError, match="model.safetensors: not a readable weights file"):
        load_hf_gpt2(tmp_path)
    with pytest.raises(WeightImportError, match="activation_function 'relu'"):
        config_from_hf({"activation_function": "relu"})
    with pytest.raises(WeightImportError, match="missing field 'n_layer'"):
        config_from_hf({"vocab_size": 5, "n_positions": 4, "n_head": 1, "n_embd": 4})


def test_wrong_shapes_name_the_tensor(hf_dir, tmp_path) -> None:
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["n_embd"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    with pytest.raises(WeightImportError, match=r"tensor 'transformer\.[\w.]+' has shape"):
        load_hf_gpt2(tmp_path)


@pytest.fixture
def hub(hf_dir):
    servers = []

    def start(bad_etag: bool = False) -> str:
        files = {f"openai-community/gpt2/{f}": hf_dir / f for f in ("config.json", "model.safetensors")}
        server = serve_hub(files, bad_etag=bad_etag)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_download_by_name_verifies_etag(hub, hf_model, tmp_path) -> None:
    endpoint = hub()
    target = download_gpt2("gpt2-small", tmp_path / "cache", endpoint=endpoint, progress=False)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    _assert_matches(load_hf_gpt2(target), hf_model)


def test_download_with_bad_etag_fails_and_leaves_nothing(hub, tmp_path) -> None:
    endpoint = hub(bad_etag=True)
    with pytest.raises(WeightImportError, match="sha256 mismatch .*model.safetensors"):
        download_gpt2("gpt2-small", tmp_path / "cache", endpoint=endpoint, progress=False)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.stat().st_size > 1000]


def test_download_is_cached_and_revision_pinned(hub, tmp_path) -> None:
    endpoint = hub()
    first = download_gpt2("gpt2-small", tmp_path / "cache", endpoint=endpoint, progress=False)
    assert first.name == COMMIT  # huggingface_hub's snapshots/<commit>/ layout
    pinned = download_gpt2(
        "gpt2-small", tmp_path / "cache", endpoint=endpoint, revision=COMMIT, progress=False
    )
    assert pinned == first


def test_download_offline_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(WeightImportError, match=r"127\.0\.0\.1:9/.*offline\?") as err:
        download_gpt2("gpt2-small", tmp_path, endpoint="http://127.0.0.1:9", progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(WeightImportError, match="unknown GPT-2 model"):
        download_gpt2("gpt3", tmp_path)
