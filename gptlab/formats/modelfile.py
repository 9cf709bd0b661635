"""Ollama ``Modelfile`` for an exported GGUF file: ``FROM``, a Go-template ``TEMPLATE``, ``SYSTEM``, ``PARAMETER``s.

Ollama formats a conversation with a Go ``text/template`` (https://github.com/ollama/ollama/blob/main/docs/
template.md), not the model's Jinja chat template, so the known Jinja families are recognised by their markers
and rewritten in Go's syntax, iterating ``.Messages`` as Ollama's own library templates do (Ollama passes the
system prompt as the first message):

* ChatML (SmolLM2, Qwen): ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; a default system message in the
  Jinja template becomes ``SYSTEM``, which Ollama sends when a request has none, as the template prepends it;
* Llama 3: ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`` (the BOS is llama.cpp's, from
  ``tokenizer.ggml.add_bos_token``);
* Gemma: ``<start_of_turn>{user|model}\\n{content}<end_of_turn>\\n`` (system text as a user turn, as Ollama's
  Gemma 3 template does).

Models without a chat template (GPT-2 base and SFT models) get the book's Alpaca prompt (ch. 7,
:func:`gptlab.prompts.format_input`) ending in ``### Response:`` so the reply is all that is generated. A chat
template of another family is left out with a comment saying so (Ollama then passes the prompt through as-is).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from gptlab.prompts import PREAMBLE

DEFAULT_TEMPERATURE = 0.8
"""Ollama's documented default (what ``gptlab serve`` uses too); ``gptlab generate`` defaults to greedy."""

_LAST = "{{- $last := eq (len (slice $.Messages $i)) 1 }}"


@dataclass(frozen=True)
class ChatFamily:
    name: str
    markers: tuple[str, ...]
    """Strings whose presence in the Jinja template identifies the family."""
    template: str
    """The Go template."""
    turn_end: str
    """The token that ends every turn (a ``stop`` parameter)."""


CHAT_FAMILIES = (
    ChatFamily(
        "chatml",
        ("<|im_start|>", "<|im_end|>"),
        "{{- range $i, $_ := .Messages }}\n" + _LAST + "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        '{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}\n{{- end }}',
        "<|im_end|>",
    ),
    ChatFamily(
        "llama3",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "{{- range $i, $_ := .Messages }}\n"
        + _LAST
        + "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"
        '{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}\n'
        "{{- end }}",
        "<|eot_id|>",
    ),
    ChatFamily(
        "gemma",
        ("<start_of_turn>", "<end_of_turn>"),
        "{{- range $i, $_ := .Messages }}\n" + _LAST + '{{ if eq .Role "assistant" }}<start_of_turn>model\n'
        "{{ else }}<start_of_turn>user\n{{ end }}{{ .Content }}<end_of_turn>\n"
        '{{ if and $last (ne .Role "assistant") }}<start_of_turn>model\n{{ end }}\n{{- end }}',
        "<end_of_turn>",
    ),
)

ALPACA_TEMPLATE = f"{PREAMBLE}\n\n### Instruction:\n{{{{ .Prompt }}}}\n\n### Response:\n"
"""The book's Alpaca prompt (``format_input`` + ``### Response:`` header) for a single ``.Prompt``."""
_ALPACA_STOP = "### Instruction:"  # a base model that runs on starts the next record with this header

_CHATML_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}<>]+?)<\|im_end\|>")


def chat_family(template: str | None) -> ChatFamily | None:
    """The known family a Jinja chat template belongs to, or None."""
    if not template:
        return None
    return next((f for f in CHAT_FAMILIES if all(m in template for m in f.markers)), None)


def default_system(template: str) -> str | None:
    """The system message a ChatML template writes when the conversation has none (SmolLM2's), if any."""
    match = _CHATML_SYSTEM.search(template)
    return match.group(1) if match else None


def _quote(text: str) -> str:
    if '"""' in text:
        raise ValueError(f'cannot quote {text[:40]!r}… in a Modelfile: it contains """')
    return f'"""{text}"""'


def render_modelfile(
    gguf_name: str,
    *,
    chat_template: str | None,
    stop_tokens: list[str],
    context_length: int,
    temperature: float = DEFAULT_TEMPERATURE,
) -> str:
    """The Modelfile text for ``gguf_name`` (a file in the same directory)."""
    lines = [
        "# Ollama Modelfile written by gptlab export gguf: ollama create NAME -f THIS_FILE",
        f"FROM ./{gguf_name}",
    ]
    stops = list(stop_tokens)
    system = None
    family = chat_family(chat_template)
    if chat_template is None:
        lines.append("# No chat template: the book's Alpaca instruction prompt (ch. 7).")
        lines.append(f"TEMPLATE {_quote(ALPACA_TEMPLATE)}")
        stops.append(_ALPACA_STOP)
    elif family is None:
        lines.append(
            "# The model's Jinja chat template is of no family gptlab converts (ChatML, Llama 3, Gemma): no "
            "TEMPLATE, so Ollama sends prompts unformatted; write one by hand (docs/template.md)."
        )
    else:
        lines.append(f"# {family.name} chat format, converted from the model's Jinja chat template.")
        lines.append(f"TEMPLATE {_quote(family.template)}")
        stops.insert(0, family.turn_end)
        if family.name == "chatml":
            system = default_system(chat_template)
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    for stop in dict.fromkeys(stops):
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    lines.append(f"PARAMETER temperature {temperature}")
    lines.append(f"PARAMETER num_ctx {context_length}")
    return "\n".join(lines) + "\n"
