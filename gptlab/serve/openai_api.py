"""OpenAI's chat completions API (https://platform.openai.com/docs/api-reference/chat), as Ollama's OpenAI
compatibility layer serves it (https://github.com/ollama/ollama/blob/main/docs/openai.md):

    POST /v1/chat/completions   "chat.completion", or Server-Sent Events of "chat.completion.chunk"
    GET  /v1/models             the served models

OpenAI's defaults (temperature 1, top_p 1, no top-k) and gptlab's 128-token limit; the prompt is rendered as
for ``/api/chat``. Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gptlab.serve.http import find_model, json_body, json_response, sse_reply
from gptlab.serve.models import OPENAI_SAMPLING
from gptlab.serve.ollama_api import chat_generation, chat_messages
from gptlab.serve.requests import ApiError, OpenAIChatRequest, decode_options, parse


async def models(request: Request) -> Response:
    data = [
        {"id": m.name, "object": "model", "created": int(m.modified_at), "owned_by": "gptlab"}
        for m in request.app.state.models.values()
    ]
    return json_response({"object": "list", "data": data})


async def chat_completions(request: Request) -> Response:
    req: OpenAIChatRequest = parse(OpenAIChatRequest, await json_body(request))
    m = find_model(request, req.model)
    messages = chat_messages(req.messages, required=True)
    if req.n != 1:
        raise ApiError(400, f"only n=1 is supported, got {req.n}")
    if req.tools:
        raise ApiError(400, f"model {req.model!r} does not support tools")
    if req.response_format is not None and req.response_format.type != "text":
        raise ApiError(400, "only response_format {'type': 'text'} is supported")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    options = decode_options(req, OPENAI_SAMPLING, max_tokens=max_tokens)
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    gen = chat_generation(request, m, messages, options)
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": req.model}

    def usage() -> dict[str, int]:
        return {
            "prompt_tokens": gen.prompt_eval_count,
            "completion_tokens": gen.eval_count,
            "total_tokens": gen.prompt_eval_count + gen.eval_count,
        }

    def event(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {**base, "object": "chat.completion.chunk", "choices": choices, **extra}

    def last() -> list[dict[str, Any]]:
        events = [event([{"index": 0, "delta": {}, "finish_reason": gen.done_reason}])]
        return events + ([event([], usage=usage())] if include_usage else [])

    def whole(content: str) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": gen.done_reason,
        }
        return {**base, "object": "chat.completion", "choices": [choice], "usage": usage()}

    return await sse_reply(
        request,
        gen,
        req.stream,
        first=event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]),
        chunk=lambda piece: event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}]),
        last=last,
        whole=whole,
    )


ROUTES = {
    "/v1/models": (("GET",), models),
    "/v1/chat/completions": (("POST",), chat_completions),
}
