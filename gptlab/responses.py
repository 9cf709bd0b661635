"""Answers of an instruction-tuned model to the book's Alpaca prompts (ch. 7, "Extracting and saving responses").

The prompt is :func:`gptlab.instruct.format_input` without the ``### Response:`` header, which the model writes
itself and :func:`response_text` strips, as the book does. Used by the SFT and DPO stages for their test sets
and by the MLflow pyfunc model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from gptlab.generate import generate
from gptlab.instruct import format_input
from gptlab.model import GPT
from gptlab.tokenizer import EOT_ID, decode, encode


def response_text(generated: str) -> str:
    """The answer in a continuation of the Alpaca prompt: the book's ``.replace("### Response:", "").strip()``."""
    return generated.replace("### Response:", "").strip()


def generate_responses(
    model: GPT,
    entries: Sequence[dict],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    progress: bool | None = None,
) -> list[str]:
    """Greedy answers (KV cache, stop at ``<|endoftext|>``) to each record's Alpaca prompt, batched with left
    padding (book ch. 7, "Extracting and saving responses"). A prompt is cut from the left so that prompt and
    answer fit the context window."""
    keep = max(1, model.config.context_length - max_new_tokens)
    responses: list[str] = []
    starts = range(0, len(entries), batch_size)
    for start in tqdm(
        starts, desc="respond", unit="batch", disable=None if progress is None else not progress
    ):
        prompts = [encode(format_input(e))[-keep:] for e in entries[start : start + batch_size]]
        outs = generate(
            model, prompts, max_new_tokens=max_new_tokens, eos_id=EOT_ID, generator=torch.Generator()
        )
        responses += [response_text(decode(o)) for o in outs]
    return responses
