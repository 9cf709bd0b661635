"""``gptlab serve``: the pipeline's checkpoints behind the Ollama REST API and OpenAI's chat completions.

Outside the core library: it needs the ``serve`` extra (Starlette, uvicorn, pydantic). Split by concern:
:mod:`serving.models` (loaded checkpoints, prompt templates), :mod:`serving.decoding` (token-by-token generation,
stop strings), :mod:`serving.batching` (continuous batching: one decoding worker per model), :mod:`serving.requests` (request bodies), :mod:`serving.ollama_api` and
:mod:`serving.openai_api` (the endpoints), :mod:`serving.http` (JSON and streaming plumbing) and
:mod:`serving.app` (the app, the server, the CLI entry point).
"""
