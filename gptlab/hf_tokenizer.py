"""A model's own tokenizer (Hugging Face ``tokenizers``) and chat template, for the Llama / Qwen3 / Gemma 3 models.

Read from a Hugging Face model directory (``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``,
``generation_config.json``) or built from a GGUF file's metadata (``tokenizer.ggml.*``: tokens, merges, token
types, special-token ids, ``tokenizer.chat_template``) exactly as ``transformers`` builds it for
``from_pretrained(..., gguf_file=...)``: byte-level BPE with GPT-2's byte alphabet, the split regex named by
``tokenizer.ggml.pre``, control tokens as special tokens. A gptlab checkpoint stores the same files, so every
stage and ``gptlab serve`` pick the tokenizer and template up with the weights. GPT-2 keeps tiktoken
(:mod:`gptlab.tokenizer`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from gptlab.bpe import bytes_to_unicode
from gptlab.chat_template import render_chat
from gptlab.errors import UserError
from gptlab.fileio import read_json_object

SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")
# tokenizer.ggml.pre -> the regex its merges were learned with (llama.cpp's names, as transformers maps them).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4


class TokenizerFileError(UserError):
    """Tokenizer files that cannot be read; the message names the file."""


def _content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """``encode``/``decode`` plus special-token ids and the chat template of one model.

    ``encode(text)`` adds what the tokenizer's post-processor adds (a BOS for Llama 3 and Gemma), as
    ``transformers``' ``tokenizer(text)`` does; :meth:`encode_chat` renders the template and encodes the result
    without adding anything, as ``apply_chat_template(..., tokenize=True)`` does.
    """

    name = "hf"

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        special: dict[str, str | None],
        chat_template: str | None = None,
        stop_ids: Iterable[int] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.special = {k: v for k, v in special.items() if v is not None}
        self.chat_template = chat_template
        ids = {k: tokenizer.token_to_id(v) for k, v in self.special.items()}
        missing = [f"{k}={self.special[k]!r}" for k, i in ids.items() if i is None]
        if missing:
            raise TokenizerFileError(f"special token(s) not in the vocabulary: {', '.join(missing)}")
        self.bos_id: int | None = ids.get("bos_token")
        self.eos_id: int | None = ids.get("eos_token")
        self.pad_id: int = ids.get("pad_token", self.eos_id if self.eos_id is not None else 0)
        stops = [i for i in [self.eos_id, *stop_ids] if i is not None]
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(stops))
        """Tokens that end a generated reply: the EOS plus the model's end-of-turn tokens."""

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        if not self.chat_template:
            raise TokenizerFileError("this model has no chat template (use the Alpaca prompt style instead)")
        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special,
        )

    def encode_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> list[int]:
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    # ---------------------------------------------------------------- files

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json`` (the stop ids)."""
        directory = Path(directory)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        config = {**self.special, "tokenizer_class": "PreTrainedTokenizerFast"}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        )
        generation = {"eos_token_id": list(self.stop_ids), "pad_token_id": self.pad_id}
        if self.bos_id is not None:
            generation["bos_token_id"] = self.bos_id
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    @classmethod
    def from_dir(cls, directory: str | Path) -> HFTokenizer:
        """Read a Hugging Face model directory's (or a gptlab checkpoint's) tokenizer files."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerFileError(f"{path}: not found")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises its own exception type
            raise TokenizerFileError(
                f"{path}: not a tokenizers file ({' '.join(str(exc).split())[:200]})"
            ) from None
        config = _read_json(directory / "tokenizer_config.json")
        special_map = _read_json(directory / "special_tokens_map.json")
        special = {k: _content(config.get(k, special_map.get(k))) for k in SPECIAL}
        template = config.get("chat_template")
        if (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        stops = _read_json(directory / "generation_config.json").get("eos_token_id", [])
        stops = [stops] if isinstance(stops, int) else list(stops or [])
        try:
            return cls(tokenizer, special=special, chat_template=template, stop_ids=stops)
        except TokenizerFileError as exc:
            raise TokenizerFileError(f"{directory / 'tokenizer_config.json'}: {exc}") from None

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], *, source: str = "GGUF") -> HFTokenizer:
        """Build the tokenizer a GGUF file describes (``tokenizer.ggml.model == "gpt2"``: byte-level BPE)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise TokenizerFileError(
                f"{source}: tokenizer.ggml.model {kind!r} is not supported (byte-level BPE 'gpt2' is); import the "
                "model's Hugging Face directory instead"
            )
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        spell = bytes_to_unicode()
        alphabet = set(spell.values())
        vocab = {
            (t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8"))): i
            for i, t in enumerate(tokens)
        }
        merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
        tk = Tokenizer(
            BPE(
                vocab=vocab,
                merges=merges,
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
            )
        )
        split = GGUF_SPLITS.get(meta.get("tokenizer.ggml.pre"))
        if split is None:
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            tk.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        tk.decoder = decoders.ByteLevel()
        tk.add_special_tokens(
            [
                AddedToken(t, normalized=False, special=True)
                for t, kind in zip(tokens, types, strict=True)
                if kind == _CONTROL and set(t) <= alphabet
            ]
        )
        user = [
            AddedToken(t, normalized=False, special=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _USER_DEFINED
        ]
        if user:
            tk.add_tokens(user)

        def token(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

        special = {
            "bos_token": token("bos"),
            "eos_token": token("eos"),
            "pad_token": token("padding"),
            "unk_token": token("unknown"),
        }
        bos = special["bos_token"]
        if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
            tk.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, vocab.get(bos, tokens.index(bos)))],
            )
        else:
            tk.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
        eot = meta.get("tokenizer.ggml.eot_token_id")
        return cls(
            tk,
            special=special,
            chat_template=meta.get("tokenizer.chat_template"),
            stop_ids=[eot] if isinstance(eot, int) else [],
        )


def _read_json(path: Path) -> dict:
    return read_json_object(path, error=TokenizerFileError) if path.is_file() else {}
