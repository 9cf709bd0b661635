"""Request bodies of the Ollama and OpenAI APIs as pydantic models, and the one-line errors they give.

Ollama's field names (https://github.com/ollama/ollama/blob/main/docs/api.md) and OpenAI's chat completions
(https://platform.openai.com/docs/api-reference/chat). Unknown fields are ignored, as both servers do; a field
of the wrong type is a 400 naming it (``field 'stream' must be a boolean, got str``), never a silent coercion:
JSON ``true`` is not a number and ``"5"`` is not an integer. What a GPT-2 cannot honour (images, tools,
thinking, ``suffix``, structured ``format``) is refused rather than ignored.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from gptlab.generate import SamplingConfig
from gptlab.serve.decoding import DecodeOptions
from gptlab.serve.models import DEFAULT_NUM_PREDICT


class ApiError(Exception):
    """Ends a request with ``status`` and ``{"error": message}`` (in-band when a stream has begun)."""

    def __init__(self, status: int, message: str, *, allow: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.allow = allow  # for 405: the methods the path allows


def type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {type_name(value)}")
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be a boolean, got {type_name(value)}")
    return value


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"must be a number, got {value!r}")
    return float(value)


def _integer(value: object) -> int:
    if isinstance(value, float) and value.is_integer():  # JSON has one number type; 40.0 is a fine top_k
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, got {value!r}")
    return value


def _stops(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ValueError("must be a string or a list of strings")
    return tuple(value)


def _content(value: object) -> str:
    """A message's content: a string, or (OpenAI) a list of ``{"type": "text", "text": ...}`` parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if not all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
        ):
            raise ValueError("only text content parts are supported")
        return "".join(p["text"] for p in value)
    raise ValueError(f"must be a string, got {type_name(value)}")


Str = Annotated[str, BeforeValidator(_string)]
Bool = Annotated[bool, BeforeValidator(_boolean)]
Number = Annotated[float, BeforeValidator(_number)]
Integer = Annotated[int, BeforeValidator(_integer)]
Stops = Annotated[tuple[str, ...], BeforeValidator(_stops)]
Content = Annotated[str, BeforeValidator(_content)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Options(_Body):
    """Ollama's ``options`` (others, such as ``num_ctx`` or ``repeat_penalty``, are accepted and ignored)."""

    temperature: Number | None = None
    top_k: Integer | None = None
    top_p: Number | None = None
    seed: Integer | None = None
    num_predict: Integer | None = None
    stop: Stops | None = None


class Message(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Content = ""
    images: list[Any] | None = None

    def as_dict(self) -> dict[str, str]:
        # OpenAI's "developer" messages are system messages for newer models.
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class _Unsupported(_Body):
    images: list[Any] | None = None
    tools: list[Any] | None = None
    think: Any = None
    suffix: Any = None
    format: Any = None
    keep_alive: Any = None

    def refuse_unsupported(self) -> None:
        """Features a GPT-2 cannot honour: an explicit 400 beats silently ignoring them (as Ollama does)."""
        for field, what in (
            ("images", "images"),
            ("tools", "tools"),
            ("think", "thinking"),
            ("suffix", "insert (suffix)"),
            ("format", "structured outputs (format)"),
        ):
            if getattr(self, field):
                raise ApiError(400, f"model {self.model!r} does not support {what}")  # type: ignore[attr-defined]

    def unloads(self) -> bool:
        return self.keep_alive in (0, "0", "0s")


class GenerateRequest(_Unsupported):
    model: Str
    prompt: Str | None = None
    system: Str | None = None
    raw: Bool = False
    stream: Bool = True
    context: list[Integer] | None = None
    options: Options | None = None


class ChatRequest(_Unsupported):
    model: Str
    messages: list[Message] | None = None
    stream: Bool = True
    options: Options | None = None


class ShowRequest(_Body):
    model: Str | None = None
    name: Str | None = None  # older clients send "name"; Ollama accepts both

    @property
    def model_name(self) -> str:
        if not (self.model or self.name):
            raise ApiError(400, "field 'name' is required")
        return self.model or self.name  # type: ignore[return-value]


class StreamOptions(_Body):
    include_usage: Bool = False


class ResponseFormat(_Body):
    type: str


class OpenAIChatRequest(_Body):
    model: Str
    messages: list[Message]
    stream: Bool = False
    n: Integer = 1
    tools: list[Any] | None = None
    response_format: ResponseFormat | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    seed: Integer | None = None
    max_tokens: Integer | None = None
    max_completion_tokens: Integer | None = None  # OpenAI's newer name for max_tokens
    stop: Stops | None = None
    stream_options: StreamOptions | None = None


def parse(cls: type[_Body], body: object) -> Any:
    """``body`` (decoded JSON) as ``cls``; ApiError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type_name(body)}")
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        raise ApiError(400, _message(exc.errors()[0])) from None


def _message(error: dict[str, Any]) -> str:
    loc = [str(part) for part in error["loc"]]
    if len(loc) >= 3 and loc[0] == "messages" and loc[1].isdigit():  # ("messages", 0, "role")
        where, field = f"messages[{loc[1]}]", loc[2]
        if field == "role":
            return f"{where}: 'role' must be system, user, assistant or tool, got {error.get('input')!r}"
        return f"{where}: {field!r} {_reason(error)}"
    if len(loc) == 2 and loc[0] == "messages" and loc[1].isdigit():
        return f"messages[{loc[1]}] must be an object, got {type_name(error.get('input'))}"
    return f"field {loc[-1] if loc else 'body'!r} {_reason(error)}"


def _reason(error: dict[str, Any]) -> str:
    kind, value = error["type"], error.get("input")
    if kind == "missing":
        return "is required"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be an object, got {type_name(value)}"
    if kind in ("list_type", "tuple_type"):
        return f"must be a list, got {type_name(value)}"
    return error["msg"]


def decode_options(
    fields: Options | OpenAIChatRequest, defaults: dict[str, float], *, max_tokens: int | None
) -> DecodeOptions:
    """Sampling and stopping for one request: the client's values over the API's defaults."""
    num_predict = DEFAULT_NUM_PREDICT if max_tokens is None else max_tokens
    if num_predict < -2:
        key = "num_predict" if isinstance(fields, Options) else "max_tokens"
        raise ApiError(
            400, f"field {key!r} must be >= -2 (-1: unlimited, -2: fill the context), got {num_predict}"
        )
    top_k = getattr(fields, "top_k", None)
    try:
        sampling = SamplingConfig(
            temperature=defaults["temperature"] if fields.temperature is None else fields.temperature,
            top_k=int(defaults["top_k"]) if top_k is None else top_k,
            top_p=defaults["top_p"] if fields.top_p is None else fields.top_p,
        )
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    return DecodeOptions(sampling=sampling, seed=fields.seed, num_predict=num_predict, stop=fields.stop)
