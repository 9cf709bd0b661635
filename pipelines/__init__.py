"""How users drive the pipeline: Prefect flows and deployments over DVC's stage graph.

DVC owns the graph and the cache (``dvc.yaml``); a flow asks DVC for the stages in order and runs each through
``dvc repro --single-item`` so DVC decides what actually reruns.
"""
