"""The pipeline summary attached to a pipeline execution's MLflow parent run.

A Markdown report (and a self-contained HTML twin with the figures inlined, which the MLflow UI's artifact viewer
renders) with each stage's key metrics, the loss/accuracy/reward curves, the confusion matrix and the judge
scores, plus the links that tie the execution together: git commit, DVC experiment, Prefect flow run and the
MLflow run of every stage.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def key_metrics(root: Path, stages: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Scalar metrics per stage, read from the metrics files dvc.yaml declares."""
    out: dict[str, dict[str, Any]] = {}
    for stage in stages:
        values: dict[str, Any] = {}
        for rel in stage["metrics"]:
            path = root / rel
            if path.is_file():
                values.update(
                    {
                        k: v
                        for k, v in json.loads(path.read_text()).items()
                        if isinstance(v, int | float | str)
                    }
                )
        out[stage["name"]] = values
    return out


def build(
    root: Path, stages: list[dict[str, Any]], links: dict[str, str], stage_runs: dict[str, str]
) -> tuple[str, str]:
    """(markdown, html) summary of one pipeline execution."""
    metrics = key_metrics(root, stages)
    md = ["# gptlab pipeline summary", ""]
    md += [f"- **{k}**: {v}" for k, v in links.items()]
    md += ["", "## Stage metrics", ""]
    for name, values in metrics.items():
        run = stage_runs.get(name, "not run in this execution")
        md += [f"### {name}", "", f"MLflow run: `{run}`", ""]
        if values:
            md += ["| metric | value |", "| --- | --- |"] + [
                f"| {k} | {_fmt(v)} |" for k, v in values.items()
            ]
        md.append("")
    md += ["## Figures", ""]
    # The PNG plots dvc.yaml declares for each stage, titled "<stage>: <file name>".
    present = [
        (f"{stage['name']}: {Path(rel).stem}", rel)
        for stage in stages
        for rel in stage.get("figures", [])
        if (root / rel).is_file()
    ]
    md += [f"![{title}]({rel})" for title, rel in present]
    markdown = "\n".join(md) + "\n"

    parts = ["<html><head><meta charset='utf-8'><title>gptlab pipeline summary</title></head><body>"]
    parts.append("<h1>gptlab pipeline summary</h1><ul>")
    parts += [f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in links.items()]
    parts.append("</ul>")
    for name, values in metrics.items():
        parts.append(
            f"<h2>{html.escape(name)}</h2><p>MLflow run: <code>{html.escape(stage_runs.get(name, '-'))}</code></p>"
        )
        rows = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in values.items()
        )
        parts.append(f"<table border='1' cellpadding='4'>{rows}</table>")
    for title, rel in present:
        data = base64.b64encode((root / rel).read_bytes()).decode()
        parts.append(
            f"<h3>{html.escape(title)}</h3><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
        )
    parts.append("</body></html>")
    return markdown, "\n".join(parts)
