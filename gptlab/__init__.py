"""gptlab: the library behind the pipeline of *Build a Large Language Model (From Scratch)* (Raschka, 2024).

Pure PyTorch + numpy/pyarrow. Nothing here imports mlflow, prefect or dvc: those live in ``stages/`` and
``pipelines/``, which depend on this package and never the other way round.
"""

__version__ = "0.1.0"
