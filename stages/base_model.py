"""Stage ``base_model``: the model every finetuning stage starts from.

Either OpenAI's GPT-2 weights (book ch. 5, "Loading pretrained weights from OpenAI"), imported through
:mod:`gptlab.gpt2_weights` from a local Hugging Face directory or downloaded by name, or the ``pretrain``
stage's own checkpoint. Written as a standard checkpoint directory, with its parameter count and its loss on the
corpus's validation split as metrics.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from gptlab.batches import WindowLoader
from gptlab.checkpoint import load_checkpoint, read_config, save_checkpoint
from gptlab.config import GPT2_PRESETS
from gptlab.data import TokenStream
from gptlab.fileio import write_json
from gptlab.gpt2_weights import load_hf_gpt2, resolve_source
from gptlab.model import GPT
from gptlab.train import evaluate
from stages import tracking
from stages.entry import resolve_device, stage_main
from stages.params import load_section


@dataclass
class BaseModelParams:
    source: str = "pretrain"
    """``pretrain`` (this pipeline's model), a GPT-2 size (``gpt2-small|medium|large|xl``, downloaded), or a path
    to a Hugging Face GPT-2 directory or a gptlab checkpoint directory."""
    eval_context_length: int = 256
    """Window length for the validation loss (capped at the model's context)."""
    eval_batch_size: int = 4
    eval_batches: int | None = 20
    """Batches of the validation split to score (None: all)."""
    device: str = "auto"


def load_base(params: BaseModelParams, pretrained: Path) -> tuple[GPT, str]:
    """The base model and a description of where it came from."""
    if params.source == "pretrain":
        return load_checkpoint(pretrained)[0], f"pretrain:{pretrained}"
    path = Path(params.source)
    if path.is_dir() and (path / "config.json").is_file():
        try:
            read_config(path)
        except ValueError:
            pass  # not a gptlab checkpoint: treat it as a Hugging Face GPT-2 directory below
        else:
            return load_checkpoint(path)[0], f"checkpoint:{path}"
    if params.source not in GPT2_PRESETS and not path.exists():
        raise ValueError(
            f"base_model.source {params.source!r}: expected 'pretrain', one of {', '.join(GPT2_PRESETS)}, or a directory"
        )
    return load_hf_gpt2(resolve_source(params.source), name=params.source), f"gpt2:{params.source}"


def base_model(params: BaseModelParams, pretrained: Path, tokens: Path, device: str) -> tuple[GPT, dict]:
    """The base model and its metrics (origin, size, validation loss on the corpus); no files written."""
    model, origin = load_base(params, pretrained)
    model.to(device)
    T = min(params.eval_context_length, model.config.context_length)
    val = WindowLoader(
        TokenStream(tokens, "val"),
        context_length=T,
        batch_size=params.eval_batch_size,
        shuffle=False,
        drop_last=False,
    )
    val_loss = evaluate(model, val, max_batches=params.eval_batches, device=device)
    metrics = {
        "source": origin,
        "num_params": model.num_params(),
        "val_loss": val_loss,
        "val_perplexity": math.exp(min(val_loss, 50.0)),
        "context_length": model.config.context_length,
    }
    return model, metrics


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
        model, metrics = base_model(params, args.pretrained, args.tokens, device)
        save_checkpoint(model, args.out, meta={"stage": "base_model", "source": metrics["source"]})
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
