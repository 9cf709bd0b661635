"""Exported GGUF files (:mod:`gptlab.formats.gguf_write`) run in llama.cpp itself — node-llama-cpp's prebuilt CPU build,
from npm, the engine Ollama runs: its tokenization of a prompt and its greedy continuation equal gptlab's.

``./run.sh setup`` installs it into ``$VENV/llama-cpp`` (tests skip, saying so, where npm is missing).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_gguf_write import DECODERS, decoder_checkpoint, gpt_checkpoint

from gptlab.formats.gguf_write import export_gguf
from gptlab.generate import generate
from gptlab.load import load_checkpoint, load_tokenizer

ENTRY = Path(sys.prefix) / "llama-cpp" / "node_modules" / "node-llama-cpp" / "dist" / "index.js"
SCRIPT = Path(__file__).with_name("llama_cpp_greedy.mjs")
pytestmark = pytest.mark.skipif(
    not ENTRY.is_file() or shutil.which("node") is None,
    reason=f"llama.cpp (npm node-llama-cpp) is not installed at {ENTRY.parents[2]}: ./run.sh setup installs it",
)


def llama_cpp(gguf: Path, text: str, new_tokens: int) -> tuple[list[int], list[int]]:
    proc = subprocess.run(
        ["node", str(SCRIPT), str(ENTRY), str(gguf), str(new_tokens)],
        input=text,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["tokens"], result["out"]


def gptlab_greedy(checkpoint: Path, ids: list[int], new_tokens: int) -> list[int]:
    model, _ = load_checkpoint(checkpoint)
    stops = load_tokenizer(checkpoint).stop_ids
    return generate(model.eval(), [ids], max_new_tokens=new_tokens, eos_id=stops)[0]


def assert_same_run(checkpoint: Path, gguf: Path, prompt_ids: list[int], text: str, n: int) -> None:
    ids, out = llama_cpp(gguf, text, n)
    assert ids == prompt_ids  # llama.cpp tokenizes with the metadata written: as gptlab does
    stops = set(load_tokenizer(checkpoint).stop_ids)
    if out and out[-1] in stops:
        out = out[:-1]
    assert out == gptlab_greedy(checkpoint, prompt_ids, n)


def test_gpt2_export_runs_in_llama_cpp_as_in_gptlab(tmp_path) -> None:
    checkpoint = gpt_checkpoint(tmp_path / "gpt")  # untied head, no biases, padded vocabulary
    gguf = export_gguf(checkpoint, tmp_path / "gpt.gguf", qtype="f32")
    text = "The lighthouse keeper said: ünïcödé, 12345 and     spaces."
    assert_same_run(checkpoint, gguf, load_tokenizer(checkpoint).encode(text), text, 12)


@pytest.mark.parametrize("family", list(DECODERS))
def test_decoder_export_runs_in_llama_cpp_as_in_gptlab(tmp_path, family) -> None:
    checkpoint = decoder_checkpoint(tmp_path / family, family)
    gguf = export_gguf(checkpoint, tmp_path / f"{family}.gguf", qtype="f32")
    tokenizer = load_tokenizer(checkpoint)
    ids = tokenizer.encode_chat([{"role": "user", "content": "hello there"}])
    assert_same_run(checkpoint, gguf, ids, tokenizer.decode(ids, skip_special_tokens=False), 10)


@pytest.mark.slow
def test_smollm2_f16_export_answers_in_llama_cpp_as_in_gptlab(smollm2_dir, tmp_path) -> None:
    """The real model in f16 (every weight exact: it was imported from a 4-bit file): llama.cpp's chat answers are
    gptlab's token for token, Unicode included."""
    gguf = export_gguf(smollm2_dir, tmp_path / "smol.gguf", qtype="f16")
    tokenizer = load_tokenizer(smollm2_dir)
    for question in ["What is the capital of France?", "Écris une phrase sur la mer. 日本語も"]:
        ids = tokenizer.encode_chat([{"role": "user", "content": question}])
        assert_same_run(smollm2_dir, gguf, ids, tokenizer.decode(ids, skip_special_tokens=False), 24)
