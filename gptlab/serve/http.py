"""HTTP plumbing shared by the Ollama and OpenAI endpoints: JSON bodies, responses, streaming, errors.

A stream sends its status line before the first token exists, so an error after that point is reported
in-band, as Ollama does (``{"error": ...}`` as the last NDJSON line; an SSE ``data:`` event for OpenAI). A
client that disconnects stops its decoding at the next step.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gptlab.serve.decoding import ClientGone, Generation, ServerStopping, pieces
from gptlab.serve.models import ServedModel, canonical_name
from gptlab.serve.requests import ApiError, type_name

MAX_BODY_BYTES = 16 * 2**20
JSON = "application/json; charset=utf-8"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
NOTE = "gptlab.note"  # scope key: a remark for the request log line


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(obj, ensure_ascii=False), status, headers, media_type=JSON)


def plain_response(text: str) -> Response:
    return Response(text, media_type="text/plain; charset=utf-8")


def is_openai(request_or_path: Request | str) -> bool:
    path = request_or_path if isinstance(request_or_path, str) else request_or_path.url.path
    return path.startswith("/v1/")


def error_payload(path: str, status: int, message: str) -> dict[str, Any]:
    if is_openai(path):
        kind = {404: "not_found_error", 500: "api_error"}.get(status, "invalid_request_error")
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return {"error": message}


def error_response(path: str, exc: ApiError) -> Response:
    headers = {"Allow": ", ".join(exc.allow)} if exc.allow else None
    return json_response(error_payload(path, exc.status, exc.message), exc.status, headers)


async def json_body(request: Request) -> Any:
    """The request's JSON body (the caller checks its shape); 400/413 with a one-line message otherwise."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        status = 400 if not declared.isdigit() else 413
        raise ApiError(
            status, "invalid Content-Length" if status == 400 else f"request body over {MAX_BODY_BYTES} bytes"
        )
    body = bytearray()
    timeout = request.app.state.limits.read_timeout
    try:
        with anyio.fail_after(timeout):  # a client that sends less than it announced must not hold a request
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    except TimeoutError:
        got = f"{len(body)} of {declared} bytes" if declared else f"{len(body)} bytes"
        raise ApiError(408, f"request body not received within {timeout:g} s ({got})") from None
    if not body:
        raise ApiError(400, "missing request body: expected a JSON object")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"invalid JSON in request body: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type_name(data)}")
    return data


def find_model(request: Request, name: str) -> ServedModel:
    served = request.app.state.models.get(canonical_name(name))
    if served is None:
        raise ApiError(404, f"model {name!r} not found")
    return served


def endpoint(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a handler: ApiError becomes its JSON error; anything else a logged 500 (the server stays up)."""

    async def run(request: Request) -> Response:
        try:
            return await fn(request)
        except ApiError as exc:
            return error_response(request.url.path, exc)
        except Exception as exc:  # a bug or a model failure: report it, keep serving
            traceback.print_exc(file=request.app.state.log)
            return error_response(request.url.path, ApiError(500, f"{type(exc).__name__}: {exc}"))

    return run


async def _text(request: Request, gen: Generation) -> str:
    try:
        return "".join([piece async for piece in pieces(gen, request.is_disconnected)])
    except ServerStopping as exc:
        raise ApiError(503, str(exc)) from None


async def _events(
    request: Request,
    gen: Generation,
    body: Callable[[AsyncIterator[str]], AsyncIterator[bytes]],
    error: Callable[[str], bytes],
) -> AsyncIterator[bytes]:
    try:
        async for data in body(pieces(gen, request.is_disconnected)):
            yield data
    except ClientGone:
        request.scope[NOTE] = " (client disconnected)"
    except ServerStopping as exc:
        yield error(str(exc))
    except Exception as exc:  # the status line is gone: say it in-band
        traceback.print_exc(file=request.app.state.log)
        yield error(f"{type(exc).__name__}: {exc}")


def _json_line(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


def _sse(obj: Any) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return b"data: " + data.encode() + b"\n\n"


async def ndjson_reply(
    request: Request,
    gen: Generation,
    streaming: bool,
    line: Callable[[str], dict[str, Any]],
    final: Callable[[str], dict[str, Any]],
) -> Response:
    """Ollama's reply: NDJSON ``line(piece)`` objects then ``final("")``, or ``final(text)`` alone."""
    if not streaming:
        return json_response(final(await _text(request, gen)))

    async def body(stream: AsyncIterator[str]) -> AsyncIterator[bytes]:
        async for piece in stream:
            yield _json_line(line(piece))
        yield _json_line(final(""))

    def error(message: str) -> bytes:
        return _json_line({"error": message})

    return _streaming(_events(request, gen, body, error), NDJSON)


async def sse_reply(
    request: Request,
    gen: Generation,
    streaming: bool,
    first: dict[str, Any],
    chunk: Callable[[str], dict[str, Any]],
    last: Callable[[], list[dict[str, Any]]],
    whole: Callable[[str], dict[str, Any]],
) -> Response:
    """OpenAI's reply: SSE events ``first``, ``chunk(piece)``…, ``last()``… and ``[DONE]``, or ``whole(text)``."""
    if not streaming:
        return json_response(whole(await _text(request, gen)))

    async def body(stream: AsyncIterator[str]) -> AsyncIterator[bytes]:
        yield _sse(first)
        async for piece in stream:
            yield _sse(chunk(piece))
        for event in last():
            yield _sse(event)
        yield _sse("[DONE]")

    def error(message: str) -> bytes:
        return _sse(error_payload("/v1/", 500, message))

    return _streaming(_events(request, gen, body, error), SSE)


def _streaming(body: AsyncIterator[bytes], media_type: str) -> StreamingResponse:
    # The content type as given (Starlette would append a charset to text/event-stream).
    return StreamingResponse(body, headers={"Content-Type": media_type, "Cache-Control": "no-cache"})
