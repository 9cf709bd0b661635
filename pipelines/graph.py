"""DVC's own stage graph, read through DVC's API: the stage order the flow runs, each stage's metrics and figures,
and its ``--work`` directories (resume state). The pipeline is never described a second time outside dvc.yaml."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path
from typing import Any


def dvc_stages(root: Path, target: str | None = None) -> list[dict[str, Any]]:
    """DVC's stages in a deterministic topological order (dependencies first), up to ``target`` if given."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return _stages(repo, target)


def stages_if_up_to_date(root: Path, target: str | None = None) -> list[dict[str, Any]] | None:
    """:func:`dvc_stages` when ``dvc status`` finds nothing to do for ``target`` and its dependencies, else None."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        if repo.status(targets=[target] if target else None, with_deps=True):
            return None
        return _stages(repo, target)


def _stages(repo, target: str | None) -> list[dict[str, Any]]:
    import networkx as nx

    graph = repo.index.graph  # edges point from a stage to the stages it depends on
    stages = {s.addressing: s for s in graph.nodes}
    if target is not None:
        if target not in stages:
            raise ValueError(f"unknown stage {target!r}; dvc.yaml has: {', '.join(stages)}")
        keep = {s.addressing for s in nx.descendants(graph, stages[target])} | {target}
    else:
        keep = set(stages)
    order = nx.lexicographical_topological_sort(graph.reverse(copy=False), key=lambda s: s.addressing)
    return [
        {
            "name": s.addressing,
            "outs": [o.def_path for o in s.outs],
            "metrics": [o.def_path for o in s.outs if o.metric],
            "figures": [o.def_path for o in s.outs if o.plot and o.def_path.endswith(".png")],
            "work": work_dirs(s.cmd),
        }
        for s in order
        if s.addressing in keep
    ]


def removed_outputs(root: Path, stage: str, outs: list[str]) -> list[str]:
    """The outputs of ``stage`` that DVC removed before running it and that its cache still holds: those of a
    stage dvc.lock records (it ran before) that are now missing from the workspace."""
    import yaml

    lock = root / "dvc.lock"
    try:
        locked = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(stage, {})
    except (OSError, yaml.YAMLError):
        return []
    recorded = {o["path"] for o in locked.get("outs", [])}
    return [o for o in outs if o in recorded and not (root / o).exists()]


def work_dirs(cmd: str | list[str]) -> list[str]:
    """The ``--work DIR`` arguments of a stage's command: resume state that only an unfinished run needs."""
    words = [w for c in ([cmd] if isinstance(cmd, str) else cmd) for w in shlex.split(c)]
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--work"]


def sweep_work(root: Path, work: list[str]) -> None:
    """Remove an up-to-date stage's work directories: left by a run that was killed and then never resumed,
    because DVC restored the outputs from its run cache instead (or the params changed back)."""
    for directory in work:
        shutil.rmtree(root / directory, ignore_errors=True)
