"""gptlab: the library behind the pipeline of *Build a Large Language Model (From Scratch)* (Raschka, 2024).

The core (the book's modules, flat, and :mod:`gptlab.formats`) is pure PyTorch + numpy/pyarrow/safetensors and
imports neither MLflow, Prefect nor DVC (those drive it from the repository's ``stages/`` and ``pipelines/``)
nor the two applications beside it, :mod:`gptlab.serve` and :mod:`gptlab.chatui`, which only :mod:`gptlab.cli`
wires. import-linter contracts in ``pyproject.toml`` hold these layers (``tests/test_layers.py``).
"""

__version__ = "0.1.0"
