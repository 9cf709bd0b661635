"""Prompt styles (:mod:`gptlab.prompts`): the book's Alpaca format for any tokenizer, a model's chat template."""

from __future__ import annotations

import pytest
from tiny_gguf import tiny_llama, write_llama_gguf

from gptlab.formats.gguf_read import load_gguf
from gptlab.prompts import Prompter, encode_record, format_input, turn_end_id, user_message
from gptlab.tokenizer import GPT2Tokenizer

ENTRY = {
    "instruction": "Name a color.",
    "input": "in the sky",
    "output": "Blue.",
    "chosen": "Blue.",
    "rejected": "Red",
}


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    return load_gguf(write_llama_gguf(tiny_llama(), tmp_path_factory.mktemp("g") / "t.gguf"))[1]


def test_alpaca_is_the_books_format_for_gpt2() -> None:
    tok = GPT2Tokenizer()
    p = Prompter("alpaca", tok)
    assert p.end_id == 50256 and p.stop_ids == (50256,)
    assert p.sft_item(ENTRY) == encode_record(ENTRY, tok.encode)
    assert p.prompt_ids(ENTRY) == tok.encode(format_input(ENTRY))
    assert p.response_text(tok.encode("\n\n### Response:\nBlue.")) == "Blue."
    with pytest.raises(ValueError, match="prompt_style 'chat' needs a model with a chat template"):
        Prompter("chat", tok)


def test_chat_items_are_the_rendered_conversation(chat_tokenizer) -> None:
    tok = chat_tokenizer
    p = Prompter("chat", tok)
    im_end = tok.tokenizer.token_to_id("<|im_end|>")
    assert turn_end_id(tok) == p.end_id == im_end
    prompt = tok.encode_chat([{"role": "user", "content": "Name a color.\n\nin the sky"}])
    assert user_message(ENTRY) == "Name a color.\n\nin the sky"
    ids, n = p.sft_item(ENTRY)
    assert (ids[:n], n) == (prompt, len(prompt))
    # the training text + the end token collate_sft appends = the template's own rendering of the full turn
    full = tok.apply_chat_template(
        [{"role": "user", "content": user_message(ENTRY)}, {"role": "assistant", "content": "Blue."}],
        add_generation_prompt=False,
    )
    assert tok.decode(ids + [p.end_id], skip_special_tokens=False) == full.rstrip("\n")
    pref = p.preference_item(ENTRY)
    assert pref["prompt"] == prompt and pref["response_start"] == len(prompt)
    assert pref["chosen"] == ids + [im_end] and pref["rejected"][-1] == im_end
    assert p.response_text(tok.encode(" Blue. ") + [im_end]) == "Blue."
    with pytest.raises(ValueError, match="missing key\\(s\\): chosen, rejected"):
        p.preference_item({"instruction": "x", "input": ""})
