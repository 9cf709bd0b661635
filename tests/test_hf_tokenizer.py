"""Model tokenizers and chat templates (:mod:`gptlab.hf_tokenizer`, :mod:`gptlab.chat_template`) against
``transformers.AutoTokenizer`` reading the same files: a GGUF file's vocabulary, and ``tokenizer.json`` +
``tokenizer_config.json`` written from it."""

from __future__ import annotations

import json

import pytest
from tiny_gguf import CHATML, tiny_llama, write_llama_gguf
from transformers import AutoTokenizer

from gptlab.chat_template import ChatTemplateError, render_chat
from gptlab.formats.gguf_read import load_gguf
from gptlab.hf_tokenizer import HFTokenizer, TokenizerFileError

TEXTS = [
    "Hello the world! 12 23",
    "a  1 in the at<|im_start|>user\nhi<|im_end|>",
    "ÄÖ ü 😀 code() {\n\treturn x;\n}  \n\n end",
    "  leading and trailing spaces   ",
    "<|endoftext|>the<|im_end|><|im_end|>",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "ÄÖ 😀"},
    ],
]
LLAMA3_LIKE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n\n' + "
    "message['content'] | trim + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n\n' }}{% endif %}"
)
GEMMA_LIKE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}
{%- else -%}{%- set first = '' -%}{%- set loop_messages = messages -%}{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<|im_start|>' + role + '\n' + (first if loop.first else '') + message['content'] | trim + '<|im_end|>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|im_start|>model\n' }}{%- endif -%}"""


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return write_llama_gguf(tiny_llama(), tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def tokenizer_dir(gguf_file, tmp_path_factory):
    """A Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json) holding the GGUF's vocabulary."""
    _, tokenizer = load_gguf(gguf_file)
    directory = tmp_path_factory.mktemp("hf")
    tokenizer.save(directory)
    return directory


@pytest.mark.parametrize("source", ["gguf", "tokenizer.json"])
def test_encode_decode_and_chat_equal_transformers(source, gguf_file, tokenizer_dir) -> None:
    if source == "gguf":
        ref = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        _, ours = load_gguf(gguf_file)
    else:
        ref = AutoTokenizer.from_pretrained(tokenizer_dir)
        ours = HFTokenizer.from_dir(tokenizer_dir)
    for text in TEXTS:
        ids = ref(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    for chat in CHATS:
        for gen in (True, False):
            text = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == text
            ids = ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen, return_dict=True)
            assert ours.encode_chat(chat, add_generation_prompt=gen) == ids["input_ids"]


@pytest.mark.parametrize("template", [CHATML, LLAMA3_LIKE, GEMMA_LIKE], ids=["chatml", "llama3", "gemma"])
def test_templates_render_as_transformers_renders_them(template, tokenizer_dir, tmp_path) -> None:
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    for name in ("tokenizer.json", "generation_config.json"):
        (tmp_path / name).write_bytes((tokenizer_dir / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    ref, ours = AutoTokenizer.from_pretrained(tmp_path), HFTokenizer.from_dir(tmp_path)
    for chat in CHATS:
        for gen in (True, False):
            want = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == want


def test_template_errors_are_one_line() -> None:
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat(GEMMA_LIKE, two_users, special_tokens={"bos_token": "<s>"})
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat("{% for %}", two_users)
    with pytest.raises(ChatTemplateError, match=r"message 0: expected \{'role': str"):
        render_chat(CHATML, [{"text": "hi"}])
    # the sandbox: a template cannot reach Python internals
    with pytest.raises(ChatTemplateError, match="failed"):
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", two_users)


def test_bad_tokenizer_files_name_the_file(tokenizer_dir, tmp_path) -> None:
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.json: not found"):
        HFTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.json: not a tokenizers file"):
        HFTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(
        TokenizerFileError, match=r"tokenizer_config\.json: special token\(s\) not in the vocab"
    ):
        HFTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(TokenizerFileError, match=r"tokenizer_config\.json: expected a JSON object, got list"):
        HFTokenizer.from_dir(tmp_path)
