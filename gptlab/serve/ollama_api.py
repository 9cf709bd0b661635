"""The Ollama REST API (https://github.com/ollama/ollama/blob/main/docs/api.md), the subset clients use:

    GET  /                   "Ollama is running" (clients probe it, the Go CLI with HEAD)
    GET  /api/version        {"version": "gptlab-<version>"}
    GET  /api/tags           the served models (name, size, sha256 digest of the weights, details)
    GET  /api/ps             the same models, as "loaded" (they are loaded at start-up and stay loaded)
    POST /api/show           modelfile, parameters, template, details, model_info (architecture numbers)
    POST /api/generate       completion; NDJSON stream by default, one object with "stream": false
    POST /api/chat           chat; NDJSON stream by default, one object with "stream": false

Decoding options (Ollama's ``options``): ``temperature`` (0 = greedy), ``top_k`` (0 = off), ``top_p``, ``seed``,
``num_predict`` (-1 = until the context window is full) and ``stop``. Defaults follow Ollama's (temperature
0.8, top_k 40, top_p 0.9) except ``num_predict``, 128 here (Ollama: unlimited), so a model that never emits
``<|endoftext|>`` cannot keep a request busy forever. Generation always stops at ``<|endoftext|>``. A ``stop``
given in a request replaces the template's default stop strings (Ollama's rule for a Modelfile's ``stop``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gptlab.serve.decoding import Generation
from gptlab.serve.http import find_model, json_body, json_response, ndjson_reply, plain_response
from gptlab.serve.models import (
    ALPACA_HEADER,
    ALPACA_STOPS,
    OLLAMA_SAMPLING,
    PLAIN_CHAT_STOPS,
    VERSION,
    ServedModel,
    render_chat_prompt,
    render_generate_prompt,
    rfc3339,
)
from gptlab.serve.requests import (
    ApiError,
    ChatRequest,
    GenerateRequest,
    Message,
    Options,
    ShowRequest,
    decode_options,
    parse,
)


async def root(request: Request) -> Response:
    return plain_response("Ollama is running")


async def version(request: Request) -> Response:
    return json_response({"version": VERSION})


async def tags(request: Request) -> Response:
    return json_response({"models": [m.tag_entry() for m in request.app.state.models.values()]})


async def ps(request: Request) -> Response:
    models = []
    for m in request.app.state.models.values():
        entry = m.tag_entry()
        del entry["modified_at"]
        gpu = m.device.type != "cpu"
        # Loaded at start-up and never unloaded: expires "never", rendered as a far-away date.
        entry.update(expires_at="2999-12-31T23:59:59Z", size_vram=m.size if gpu else 0)
        entry["context_length"] = m.model.config.context_length
        models.append(entry)
    return json_response({"models": models})


async def show(request: Request) -> Response:
    req: ShowRequest = parse(ShowRequest, await json_body(request))
    m = find_model(request, req.model_name)
    return json_response(
        {
            "modelfile": m.modelfile(),
            "parameters": m.parameters(),
            "template": m.template(),
            "details": m.details(),
            "model_info": m.model_info(),
            "capabilities": ["completion"],
            "modified_at": rfc3339(m.modified_at),
        }
    )


def _options(options: Options | None):
    options = options or Options()
    return decode_options(options, OLLAMA_SAMPLING, max_tokens=options.num_predict)


def _load_response(name: str, unload: bool, extra: dict[str, Any]) -> Response:
    # An empty prompt / message list is how clients (the ollama CLI) preload or unload a model.
    reason = "unload" if unload else "load"
    return json_response(
        {"model": name, "created_at": rfc3339(), **extra, "done": True, "done_reason": reason}
    )


def _stats(gen: Generation, t_start: int, t_decode: int) -> dict[str, Any]:
    return {
        "done_reason": gen.done_reason,
        "total_duration": time.perf_counter_ns() - t_start,
        "load_duration": t_decode - t_start,  # request parsing + tokenizing: the models are preloaded
        "prompt_eval_count": gen.prompt_eval_count,
        "prompt_eval_duration": gen.prompt_eval_ns,
        "eval_count": gen.eval_count,
        "eval_duration": gen.eval_ns,
    }


async def generate(request: Request) -> Response:
    t_start = time.perf_counter_ns()
    req: GenerateRequest = parse(GenerateRequest, await json_body(request))
    m = find_model(request, req.model)
    context = req.context or []
    vocab = m.model.config.vocab_size
    if not all(0 <= t < vocab for t in context):
        raise ApiError(400, f"field 'context' must be a list of token ids in [0, {vocab})")
    req.refuse_unsupported()
    options = _options(req.options)
    if not req.prompt and not req.system and not context:
        return _load_response(req.model, req.unloads(), {"response": ""})
    alpaca = m.prompt_format == "alpaca" and not req.raw
    text = render_generate_prompt(
        req.prompt or "", system=req.system, raw=req.raw, prompt_format=m.prompt_format, tokenizer=m.tokenizer
    )
    templated = m.prompt_format == "chat" and not req.raw
    gen = Generation(
        m,
        [*context, *m.encode(text, templated=templated)],
        options,
        options.stop if options.stop is not None else (ALPACA_STOPS if alpaca else ()),
        strip_leading=alpaca,
        header=ALPACA_HEADER if alpaca else None,
        stopping=request.app.state.stopping,
    )
    t_decode = time.perf_counter_ns()

    def final(response: str) -> dict[str, Any]:
        return {
            "model": req.model,
            "created_at": rfc3339(),
            "response": response,
            "done": True,
            **_stats(gen, t_start, t_decode),
            "context": [*gen.prompt_ids, *gen.output_ids],
        }

    return await _reply(request, gen, req.stream, req.model, lambda piece: {"response": piece}, final)


def chat_generation(request: Request, m: ServedModel, messages: list[dict[str, str]], options) -> Generation:
    """The generation for a chat (``/api/chat`` and ``/v1/chat/completions`` render it the same way)."""
    try:
        text = render_chat_prompt(messages, prompt_format=m.prompt_format, tokenizer=m.tokenizer)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    alpaca, templated = m.prompt_format == "alpaca", m.prompt_format == "chat"
    default_stops = ALPACA_STOPS if alpaca else () if templated else PLAIN_CHAT_STOPS
    return Generation(
        m,
        m.encode(text, templated=templated),
        options,
        options.stop if options.stop is not None else default_stops,
        strip_leading=True,  # "assistant:" / "### Response:\n" is followed by a space or a newline
        header=ALPACA_HEADER if alpaca else None,
        stopping=request.app.state.stopping,
    )


def chat_messages(messages: list[Message] | None, *, required: bool) -> list[dict[str, str]]:
    messages = messages or []
    if required and not messages:
        raise ApiError(400, "field 'messages' must not be empty")
    for i, message in enumerate(messages):
        if message.images:
            raise ApiError(400, f"messages[{i}]: this model does not support images")
    return [message.as_dict() for message in messages]


async def chat(request: Request) -> Response:
    t_start = time.perf_counter_ns()
    req: ChatRequest = parse(ChatRequest, await json_body(request))
    m = find_model(request, req.model)
    messages = chat_messages(req.messages, required=False)
    req.refuse_unsupported()
    options = _options(req.options)
    if not messages:
        return _load_response(req.model, req.unloads(), {"message": {"role": "assistant", "content": ""}})
    gen = chat_generation(request, m, messages, options)
    t_decode = time.perf_counter_ns()

    def final(content: str) -> dict[str, Any]:
        return {
            "model": req.model,
            "created_at": rfc3339(),
            "message": {"role": "assistant", "content": content},
            "done": True,
            **_stats(gen, t_start, t_decode),
        }

    return await _reply(
        request,
        gen,
        req.stream,
        req.model,
        lambda piece: {"message": {"role": "assistant", "content": piece}},
        final,
    )


async def _reply(
    request: Request,
    gen: Generation,
    streaming: bool,
    name: str,
    chunk: Callable[[str], dict[str, Any]],
    final: Callable[[str], dict[str, Any]],
) -> Response:
    """NDJSON ``{"model", "created_at", **chunk(piece), "done": false}`` lines and the final object, or the final
    object alone with the whole text."""

    def line(piece: str) -> dict[str, Any]:
        return {"model": name, "created_at": rfc3339(), **chunk(piece), "done": False}

    return await ndjson_reply(request, gen, streaming, line, final)


ROUTES = {
    "/": (("GET",), root),
    "/api/version": (("GET",), version),
    "/api/tags": (("GET",), tags),
    "/api/ps": (("GET",), ps),
    "/api/show": (("POST",), show),
    "/api/generate": (("POST",), generate),
    "/api/chat": (("POST",), chat),
}
