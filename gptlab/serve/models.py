"""The models ``gptlab serve`` serves: checkpoints loaded once at start-up, what the Ollama API reports about
them (``/api/tags``, ``/api/show``), and how requests become prompts (the Ollama template rules).

Prompt rendering (what Ollama does with a model's TEMPLATE):

- plain language models: ``/api/generate`` uses the prompt as-is (``system``, if any, goes before it,
  separated by a blank line); ``/api/chat`` writes one ``role: content`` line per message and ends with
  ``assistant:``, and stops by default where the model starts a new ``\\nuser:``/``\\nassistant:``/``\\nsystem:``
  line.
- checkpoints with a chat template (Llama / Qwen3 / Gemma 3 / SmolLM2 instruction models, and SFT/DPO models
  trained with ``prompt_style: chat``): the model's own template renders the conversation (``/api/generate``:
  the system and the prompt as one turn), and generation stops at its end-of-turn token.
- checkpoints whose ``meta.prompt_format`` is ``"alpaca"`` (the SFT and DPO stages): the book's Alpaca prompt
  (:func:`gptlab.prompts.format_input`) followed by ``### Response:``. For chat, the last user message is the
  instruction, system messages are prepended to it (blank-line separated, since the Alpaca preamble the model
  was tuned on must stay as it is), and earlier turns go to the ``### Input:`` section as ``User: ...`` /
  ``Assistant: ...`` lines. Like the book's ``.replace("### Response:", "").strip()``, leading whitespace and a
  repeated ``### Response:`` header are removed from the output, and the model stops by default at a new
  ``### Instruction:``/``### Input:``/``### Response:`` section. ``"raw": true`` bypasses the template.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from gptlab import __version__
from gptlab.checkpoint import WEIGHTS, CheckpointError
from gptlab.fileio import sha256_file
from gptlab.load import load_checkpoint, load_tokenizer
from gptlab.model import GPT
from gptlab.prompts import format_input, format_response, turn_end_id

VERSION = f"gptlab-{__version__}"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434  # Ollama's, so clients find the server without configuration
DEFAULT_NUM_PREDICT = 128
OLLAMA_SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}  # Ollama's documented defaults
OPENAI_SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}  # OpenAI's (no top-k there)
ALPACA_HEADER = format_response("").strip()  # "### Response:"
ALPACA_STOPS = ("### Instruction:", "### Input:", "### Response:")
PLAIN_CHAT_STOPS = ("\nuser:", "\nassistant:", "\nsystem:")
PROMPT_FORMATS = (None, "alpaca", "chat")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*(:[A-Za-z0-9][A-Za-z0-9._-]*)?$")


# ----------------------------------------------------------------------------------------------- models


def parse_model_arg(spec: str) -> tuple[str, Path]:
    """``"NAME=CHECKPOINT_DIR"`` (the ``--model`` argument) -> ``(NAME, Path(CHECKPOINT_DIR))``."""
    name, sep, directory = spec.partition("=")
    if not sep or not name or not directory:
        raise ValueError(f"--model expects NAME=CHECKPOINT_DIR (e.g. sft=models/sft), got {spec!r}")
    if not _NAME_RE.match(name):
        raise ValueError(
            f"--model {spec!r}: invalid model name {name!r} (letters, digits, '.', '_', '-', '/', "
            "optionally ':tag')"
        )
    return name, Path(directory)


def canonical_name(name: str) -> str:
    """Ollama names carry a tag and clients append ``:latest`` when there is none: ``sft`` == ``sft:latest``."""
    return name if ":" in name else f"{name}:latest"


def rfc3339(ts: float | None = None) -> str:
    # RFC 3339 with a "Z": what Go's time.Time (the ollama CLI) and pydantic (the Python client) both parse.
    return datetime.fromtimestamp(time.time() if ts is None else ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _human_count(n: int) -> str:
    """Ollama's ``parameter_size`` style: 7.3M, 124.4M, 1.6B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + unit
    return str(n)


_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass
class ServedModel:
    """One checkpoint loaded for serving, with the facts ``/api/tags`` and ``/api/show`` report."""

    name: str
    """Canonical ``name:tag``."""
    path: Path
    model: GPT
    config: dict[str, Any]
    size: int
    """Bytes of ``model.safetensors``."""
    digest: str
    """sha256 of ``model.safetensors`` (hex), as Ollama reports a model's digest."""
    modified_at: float
    tokenizer: Any = None
    """The checkpoint's tokenizer (GPT-2's or the model's own, with its chat template)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    batcher: Any = None
    """The model's :class:`gptlab.serve.batching.Batcher` (continuous batching), or None: requests decode alone,
    serialized step by step by ``lock``."""

    @property
    def meta(self) -> dict[str, Any]:
        return self.config.get("meta") or {}

    @property
    def prompt_format(self) -> str | None:
        """``alpaca``, ``chat`` (the model's template; the default when it has one) or None (plain text)."""
        fmt = self.meta.get("prompt_format")
        if fmt is None and self.tokenizer.chat_template:
            return "chat"
        return fmt

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end a reply: the template's end of turn (chat), the tokenizer's EOS and stop tokens."""
        first = [turn_end_id(self.tokenizer)] if self.prompt_format == "chat" else []
        return tuple(dict.fromkeys([*first, *self.tokenizer.stop_ids]))

    def encode(self, text: str, *, templated: bool = False) -> list[int]:
        """Token ids of a prompt; a rendered chat template already holds its special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=not templated)

    @property
    def family(self) -> str:
        return self.config.get("model", {}).get("family", "gpt2")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "safetensors",
            "family": self.family,
            "families": [self.family],
            "parameter_size": _human_count(self.model.num_params()),
            "quantization_level": _DTYPE_NAMES.get(next(self.model.parameters()).dtype, "F32"),
        }

    def tag_entry(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": rfc3339(self.modified_at),
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
        }

    def template(self) -> str:
        """The prompt rendering as an Ollama (Go) template, for display by ``/api/show``."""
        if self.prompt_format == "alpaca":
            instruction = "{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}"
            return format_input({"instruction": instruction, "input": ""}) + format_response("")
        if self.prompt_format == "chat":
            return self.tokenizer.chat_template  # Jinja, as the model ships it (not a Go template)
        return "{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}"

    def parameters(self) -> str:
        stops = ALPACA_STOPS if self.prompt_format == "alpaca" else ()
        specials = [self.tokenizer.decode([i], skip_special_tokens=False) for i in self.stop_ids]
        lines = [f"{'stop':<15}{json.dumps(s)}" for s in (*specials, *stops)]
        lines += [f"{k:<15}{v}" for k, v in OLLAMA_SAMPLING.items()]
        lines.append(f"{'num_predict':<15}{DEFAULT_NUM_PREDICT}")
        lines.append(f"{'num_ctx':<15}{self.model.config.context_length}")
        return "\n".join(lines)

    def modelfile(self) -> str:
        params = "\n".join(f"PARAMETER {line}" for line in self.parameters().splitlines())
        return (
            f"# Modelfile generated by gptlab serve ({VERSION}); the weights are a gptlab checkpoint\n"
            f"FROM {self.path.resolve()}\n"
            f'TEMPLATE """{self.template()}"""\n'
            f"{params}\n"
        )

    def model_info(self) -> dict[str, Any]:
        cfg = self.model.config
        arch = self.family
        info: dict[str, Any] = {
            # GGUF key names, which the ollama CLI's `show` reads (<architecture>.context_length, ...).
            "general.architecture": arch,
            "general.name": cfg.name,
            "general.parameter_count": self.model.num_params(),
            f"{arch}.context_length": cfg.context_length,
            f"{arch}.embedding_length": cfg.n_embd,
            f"{arch}.block_count": cfg.n_layer,
            f"{arch}.attention.head_count": cfg.n_head,
            f"{arch}.vocab_size": cfg.vocab_size,
            "tokenizer.ggml.model": "gpt2",
            "gptlab.checkpoint": str(self.path.resolve()),
            "gptlab.prompt_format": self.prompt_format or "raw",
        }
        if arch == "gpt2":
            info["gpt2.feed_forward_length"] = 4 * cfg.n_embd
            info["gpt2.attention.layer_norm_epsilon"] = cfg.layer_norm_eps
        else:
            info[f"{arch}.feed_forward_length"] = cfg.intermediate_size
            info[f"{arch}.attention.head_count_kv"] = cfg.n_kv_head
            info[f"{arch}.attention.layer_norm_rms_epsilon"] = cfg.rms_norm_eps
            info[f"{arch}.rope.freq_base"] = cfg.rope_theta
        for key, value in self.meta.items():
            if isinstance(value, str | int | float | bool):
                info[f"gptlab.meta.{key}"] = value
        return info


def load_model(name: str, directory: str | Path, *, device: str | torch.device = "cpu") -> ServedModel:
    """Load one checkpoint for serving; a ValueError names the model and the directory on any problem."""
    directory = Path(directory)
    try:
        model, config = load_checkpoint(directory, device=device)
    except CheckpointError as exc:
        raise ValueError(f"model {name!r}: {exc}") from None
    if model.config.num_classes is not None:
        raise ValueError(f"model {name!r}: {directory} is a classifier checkpoint; it cannot generate text")
    try:
        tokenizer = load_tokenizer(directory)
    except (ValueError, RuntimeError) as exc:  # a missing GPT-2 BPE file, unreadable tokenizer files
        raise ValueError(f"model {name!r}: {exc}") from None
    prompt_format = (config.get("meta") or {}).get("prompt_format")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"model {name!r}: {directory} has unknown meta.prompt_format {prompt_format!r}")
    weights = directory / WEIGHTS
    stat = weights.stat()
    return ServedModel(
        name=canonical_name(name),
        path=directory,
        model=model,
        config=config,
        size=stat.st_size,
        digest=sha256_file(weights),
        modified_at=stat.st_mtime,
        tokenizer=tokenizer,
    )


# ---------------------------------------------------------------------------------------------- prompts


def render_generate_prompt(
    prompt: str,
    *,
    system: str | None = None,
    raw: bool = False,
    prompt_format: str | None = None,
    tokenizer: Any = None,
) -> str:
    """The text ``/api/generate`` feeds the model (module docstring: "Prompt rendering")."""
    if raw:  # Ollama: raw skips the template, system prompt included
        return prompt
    if prompt_format == "chat":
        messages = [{"role": "system", "content": system}] if system else []
        return tokenizer.apply_chat_template([*messages, {"role": "user", "content": prompt}])
    if prompt_format == "alpaca":
        instruction = f"{system}\n\n{prompt}" if system else prompt
        return format_input({"instruction": instruction, "input": ""}) + format_response("")
    return f"{system}\n\n{prompt}" if system else prompt


def render_chat_prompt(
    messages: Sequence[Mapping[str, str]], *, prompt_format: str | None = None, tokenizer: Any = None
) -> str:
    """The text ``/api/chat`` and ``/v1/chat/completions`` feed the model; ``messages`` are
    ``{"role", "content"}`` dicts and must end with a user message (after any system messages)."""
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("the conversation must end with a message whose role is 'user'")
    if prompt_format == "chat":
        return tokenizer.apply_chat_template([dict(m) for m in messages])
    if prompt_format == "alpaca":
        systems = [m["content"] for m in messages if m["role"] == "system" and m["content"]]
        *history, last = turns
        instruction = "\n\n".join([*systems, last["content"]])
        context = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in history)
        return format_input({"instruction": instruction, "input": context}) + format_response("")
    return "\n".join([*(f"{m['role']}: {m['content']}" for m in messages), "assistant:"])


def load_models(
    models: Mapping[str, str | Path], *, device: str | torch.device = "cpu"
) -> dict[str, ServedModel]:
    """Load every ``name -> checkpoint directory`` (fail fast: one ValueError naming the bad one), keyed by
    canonical ``name:tag``."""
    if not models:
        raise ValueError("no models to serve: give at least one NAME=CHECKPOINT_DIR")
    seen: set[str] = set()
    for name in models:
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid model name {name!r}")
        if canonical_name(name) in seen:
            raise ValueError(f"model name {name!r} is given twice (as {canonical_name(name)!r})")
        seen.add(canonical_name(name))
    return {canonical_name(n): load_model(n, d, device=device) for n, d in models.items()}
