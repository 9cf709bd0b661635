"""Chat templates: a model's own Jinja template turns a list of messages into its prompt text.

Rendered the way Hugging Face ``transformers``' ``apply_chat_template`` does it, so a prompt here is the same
string (and, tokenized without extra special tokens, the same ids) as there: a sandboxed Jinja environment with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that does not escape
HTML, ``raise_exception`` and ``strftime_now`` globals, and the tokenizer's special tokens (``bos_token``,
``eos_token`` …) as variables. Templates come from the model's files (``tokenizer_config.json``,
``chat_template.jinja`` or GGUF ``tokenizer.chat_template``) and are untrusted: the sandbox keeps them from
reaching Python internals.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gptlab.errors import UserError


class ChatTemplateError(UserError):
    """A template that does not compile or that refuses the conversation (``raise_exception``)."""


class _Generation(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}`` (marks assistant text for training masks): rendered as-is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise(message: str):
    raise ChatTemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from None


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
) -> str:
    """The prompt text for ``messages`` (``[{"role": ..., "content": ...}, ...]``).

    ``add_generation_prompt`` appends the header that starts the assistant's turn (for generation);
    without it the text ends after the last message (for training on a complete conversation).
    """
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ChatTemplateError(f"message {i}: expected {{'role': str, 'content': str}}, got {m!r}")
    try:
        return _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **(special_tokens or {})
        )
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed: {exc}") from None
