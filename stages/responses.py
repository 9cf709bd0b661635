"""Test-set responses shared by the ``sft`` and ``dpo`` stages (book ch. 7, "Extracting and saving responses").

Greedy decoding with the KV cache, stopping at ``<|endoftext|>``, from the Alpaca prompt; the ``### Response:``
header the model writes is stripped. Saved as JSON (the book's layout plus ``model_response``) and as a Parquet
table for the evaluation stage and MLflow.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from gptlab.fileio import atomic_write, write_json
from gptlab.generate import generate
from gptlab.instruct import format_input
from gptlab.model import GPT
from gptlab.tokenizer import EOT_ID, decode, encode
from stages import tracking


def generate_responses(
    model: GPT, entries: list[dict], *, max_new_tokens: int, batch_size: int = 8, desc: str = "respond"
) -> list[str]:
    """Greedy responses for each record's prompt, batched with left padding."""
    context = model.config.context_length
    responses = []
    for start in tqdm(range(0, len(entries), batch_size), desc=desc, unit="batch"):
        batch = entries[start : start + batch_size]
        # Keep the prompt's tail so prompt + response fits the context window.
        keep = max(1, context - max_new_tokens)
        prompts = [encode(format_input(e))[-keep:] for e in batch]
        outs = generate(
            model, prompts, max_new_tokens=max_new_tokens, eos_id=EOT_ID, generator=torch.Generator()
        )
        responses += [decode(o).replace("### Response:", "").strip() for o in outs]
    return responses


def write_responses(records: list[dict], json_path: Path, parquet_path: Path) -> None:
    """Save the responses as JSON and Parquet and log them to the active MLflow run as a table."""
    write_json(json_path, records)
    frame = pd.DataFrame.from_records(records)
    atomic_write(parquet_path, lambda tmp: frame.to_parquet(tmp, index=False))
    tracking.mlflow.log_table(data=frame, artifact_file="responses_table.json")
