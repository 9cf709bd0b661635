"""How instruction records become prompts and token ids: the book's Alpaca prompt, or the model's chat template.

The one place prompts are formatted and encoded, for SFT (:func:`encode_record`), DPO (:func:`encode_preference`),
generation (:class:`Prompter`) and serving (:func:`format_input`, :func:`turn_end_id`).

``alpaca`` is the book's ch. 7 format (:func:`format_input`, Taori et al. 2023, + ``### Response:``), tokenized as
one string, the response ended by the tokenizer's end-of-text; it works for every model, and GPT-2 models have
nothing else. ``chat`` renders the record as a conversation with the model's template (the instruction and
input as the user's message), so an instruction-tuned model is finetuned in the format it already knows: the
prompt is the template with the assistant's header (``add_generation_prompt``), the response is the output's
tokens followed by the template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>`` …), and
generation stops at it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gptlab.errors import UserError

STYLES = ("alpaca", "chat")
PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
RESPONSE_HEADER = "### Response:"
PREFERENCE_KEYS = ("chosen", "rejected")
_PROBE = "Zq7xW"  # a reply no template contains, to find where an assistant turn ends


def format_input(entry: dict) -> str:
    """The prompt for one record: preamble, ``### Instruction:``, and ``### Input:`` when the input is non-empty."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text


def format_response(response: str) -> str:
    """What follows the prompt: the ``### Response:`` header and the response text."""
    return f"\n\n### Response:\n{response}"


def encode_record(entry: dict, encode: Callable[[str], list[int]]) -> tuple[list[int], int]:
    """Token ids of prompt + response and the number of prompt tokens, for :func:`collate_sft`.

    The whole text is tokenized as one string, as the book does, so the ids at the prompt/response boundary
    are the ones the model sees at inference. The prompt length comes from tokenizing the prompt alone; that
    is only meaningful if those ids are a prefix of the full ids, which BPE can break when the prompt ends in
    whitespace that merges with the response header's ``\\n\\n`` (e.g. an input ending in a newline). Such a
    record raises ValueError rather than silently mis-masking; strip the fields first.
    """
    prompt = format_input(entry)
    ids = list(encode(prompt + format_response(entry["output"])))
    prompt_ids = list(encode(prompt))
    if ids[: len(prompt_ids)] != prompt_ids:
        raise UserError(
            f"prompt tokens are not a prefix of prompt + response tokens (the prompt ends in "
            f"{prompt[-20:]!r}; trailing whitespace merges with the response header): strip the record's fields"
        )
    return ids, len(prompt_ids)


def encode_preference(entry: dict, encode: Callable[[str], list[int]]) -> dict[str, list[int]]:
    """Token ids of one preference record (keys ``instruction``, ``input``, ``chosen``, ``rejected``).

    Returns ``{"prompt", "chosen", "rejected", "response_start"}``: the Alpaca prompt, the prompt followed by
    ``format_response(...)`` of each answer, and the position of the ``### Response:`` header in those (after
    the prompt's blank-line separator). The full texts are tokenized as one string (as the book does) so the
    ids are exactly what the model sees at generation time; the prompt ids must then be a prefix of both
    sequences, which holds for GPT-2 BPE because the response part starts with ``"\\n\\n"`` after a non-space
    character. Raises ``ValueError`` when a tokenizer merges across that boundary or a key is missing.
    Other keys (e.g. the book's ``output``) are ignored.
    """
    missing = [k for k in ("instruction", *PREFERENCE_KEYS) if k not in entry]
    if missing:
        raise UserError(f"preference record is missing key(s): {', '.join(missing)}")
    prompt_text = format_input(entry)
    prompt = list(encode(prompt_text))
    out: dict[str, list[int]] = {"prompt": prompt}
    for key in PREFERENCE_KEYS:
        ids = list(encode(prompt_text + format_response(entry[key])))
        # The collate masks the prompt by its length: a merge across the boundary would shift that mask.
        if ids[: len(prompt)] != prompt:
            raise UserError(
                f"prompt tokens are not a prefix of the {key!r} tokens (the tokenizer merged across the "
                "prompt/response boundary); cannot mask the prompt by length"
            )
        out[key] = ids
    # The book's collate masks the prompt and the two newline tokens after it ("+2"), keeping the header:
    # find where the header's tokens start, as the chosen ids hold them.
    header = list(encode(RESPONSE_HEADER))
    chosen, start = out["chosen"], len(prompt)
    at = next(
        (i for i in range(start, len(chosen) - len(header) + 1) if chosen[i : i + len(header)] == header),
        start,
    )
    out["response_start"] = at
    return out


def response_text(generated: str) -> str:
    """The answer in a continuation of the Alpaca prompt: the book's ``.replace("### Response:", "").strip()``."""
    return generated.replace("### Response:", "").strip()


def user_message(entry: dict) -> str:
    """The record as one user message: the instruction, then the input (if any) after a blank line."""
    return entry["instruction"] + (f"\n\n{entry['input']}" if entry.get("input") else "")


def turn_end_id(tokenizer: Any) -> int:
    """The special token the chat template writes right after an assistant's reply (falls back to EOS)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}],
        add_generation_prompt=False,
    )
    tail = text[text.rindex(_PROBE) + len(_PROBE) :]
    for token in tokenizer.tokenizer.encode(tail, add_special_tokens=False).tokens:
        if token in tokenizer.special.values() or token in _added_special(tokenizer):
            return tokenizer.tokenizer.token_to_id(token)
    if tokenizer.eos_id is None:
        raise UserError("the chat template ends a turn with no special token and the tokenizer has no EOS")
    return tokenizer.eos_id


def _added_special(tokenizer: Any) -> set[str]:
    return {t.content for t in tokenizer.tokenizer.get_added_tokens_decoder().values() if t.special}


class Prompter:
    """Token ids of instruction records in one prompt style for one tokenizer (see the module docstring)."""

    def __init__(self, style: str, tokenizer: Any) -> None:
        if style not in STYLES:
            raise UserError(f"prompt_style must be one of {', '.join(STYLES)}, got {style!r}")
        if style == "chat" and not tokenizer.chat_template:
            raise UserError(
                "prompt_style 'chat' needs a model with a chat template (GPT-2 models: use 'alpaca')"
            )
        self.style, self.tokenizer = style, tokenizer
        self.end_id: int = turn_end_id(tokenizer) if style == "chat" else tokenizer.eos_id
        """The token that ends a response (appended in training, a stop token in generation)."""
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys([self.end_id, *tokenizer.stop_ids]))

    def _plain(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, entry: dict) -> list[int]:
        """What the model reads before answering ``entry``."""
        if self.style == "alpaca":
            return self.tokenizer.encode(format_input(entry))
        return self.tokenizer.encode_chat([{"role": "user", "content": user_message(entry)}])

    def sft_item(self, entry: dict) -> tuple[list[int], int]:
        """(prompt + response ids, prompt length) for :func:`gptlab.instruct.collate_sft`, which appends the
        end token."""
        if self.style == "alpaca":
            return encode_record(entry, self.tokenizer.encode)
        prompt = self.prompt_ids(entry)
        return prompt + self._plain(entry["output"]), len(prompt)

    def preference_item(self, entry: dict) -> dict[str, list[int]]:
        """``{"prompt", "chosen", "rejected", "response_start"}`` for :func:`gptlab.dpo.collate_preferences`."""
        if self.style == "alpaca":
            return encode_preference(entry, self.tokenizer.encode)
        missing = [k for k in ("instruction", "chosen", "rejected") if k not in entry]
        if missing:
            raise UserError(f"preference record is missing key(s): {', '.join(missing)}")
        prompt = self.prompt_ids(entry)
        return {
            "prompt": prompt,
            "chosen": prompt + self._plain(entry["chosen"]) + [self.end_id],
            "rejected": prompt + self._plain(entry["rejected"]) + [self.end_id],
            "response_start": len(prompt),
        }

    def response_text(self, ids: list[int]) -> str:
        """The answer in generated ids (``### Response:`` header stripped for Alpaca, as the book does)."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return response_text(text) if self.style == "alpaca" else text.strip()
