"""Answers of an instruction-tuned model to test records (book ch. 7, "Extracting and saving responses").

The prompt comes from a :class:`gptlab.prompts.Prompter`: the book's Alpaca prompt without the ``### Response:``
header, which the model writes itself and which is stripped from the answer as the book does, or the model's
chat template. Used by the SFT and DPO stages for their test sets and by the MLflow pyfunc model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from gptlab.generate import generate
from gptlab.model import GPT


def generate_responses(
    model: GPT,
    entries: Sequence[dict],
    prompter,
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    progress: bool | None = None,
) -> list[str]:
    """Greedy answers (KV cache, stop at the prompt style's end token) to each record, batched with left
    padding. A prompt is cut from the left so that prompt and answer fit the context window."""
    keep = max(1, model.config.context_length - max_new_tokens)
    responses: list[str] = []
    starts = range(0, len(entries), batch_size)
    for start in tqdm(
        starts, desc="respond", unit="batch", disable=None if progress is None else not progress
    ):
        prompts = [prompter.prompt_ids(e)[-keep:] for e in entries[start : start + batch_size]]
        outs = generate(
            model,
            prompts,
            max_new_tokens=max_new_tokens,
            eos_id=prompter.stop_ids,
            generator=torch.Generator(),
        )
        responses += [prompter.response_text(o) for o in outs]
    return responses
