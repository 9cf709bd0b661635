"""Test-set responses of the ``sft`` and ``dpo`` stages (book ch. 7, "Extracting and saving responses"), saved
as JSON (the book's layout plus ``model_response``) and as a Parquet table for the evaluation stage and MLflow.
The answers themselves come from :func:`gptlab.instruct.generate_responses`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from gptlab.fileio import atomic_write, write_json
from stages import tracking


def write_responses(records: list[dict], json_path: Path, parquet_path: Path) -> None:
    """Save the responses as JSON and Parquet and log them to the active MLflow run as a table."""
    write_json(json_path, records)
    frame = pd.DataFrame.from_records(records)
    atomic_write(parquet_path, lambda tmp: frame.to_parquet(tmp, index=False))
    tracking.mlflow.log_table(data=frame, artifact_file="responses_table.json")
