"""``gptlab serve``: the pipeline's checkpoints behind the Ollama REST API and OpenAI's chat completions.

Beside the core library, never below it (the core does not import this package; only :mod:`gptlab.cli` wires it):
it needs the ``serve`` extra (Starlette, uvicorn, pydantic). Split by concern: :mod:`~gptlab.serve.models`
(loaded checkpoints, prompt templates), :mod:`~gptlab.serve.decoding` (token-by-token generation, stop
strings), :mod:`~gptlab.serve.batching` (continuous batching: one decoding worker per model) with
:mod:`~gptlab.serve.cache_rows` (its KV-cache row surgery), :mod:`~gptlab.serve.requests` (request bodies),
:mod:`~gptlab.serve.ollama_api` and :mod:`~gptlab.serve.openai_api` (the endpoints), :mod:`~gptlab.serve.http`
(JSON and streaming plumbing) and :mod:`~gptlab.serve.app` (the app, the server, the CLI entry point).
"""
