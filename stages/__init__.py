"""Pipeline stages: one module per DVC stage, each runnable as ``python -m stages.<name>``.

A stage reads its own ``params.yaml`` section, its inputs as files (paths come from ``dvc.yaml``), calls the
``gptlab`` library, writes its outputs atomically and logs to MLflow.
"""
