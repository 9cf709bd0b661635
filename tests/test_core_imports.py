"""The core library works with its own dependencies alone, in a venv without the ``pipeline``/``serve`` extras.

The venv is built from this environment's installed files: every distribution that ``gptlab``'s core
requirements pull in (transitively, extras excluded) is linked into a fresh ``venv`` and nothing else, so
mlflow, prefect, dvc, ollama, httpx, Starlette and the rest are genuinely absent there. Then every module of
``gptlab`` is imported and a model takes a training step and generates.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import pkgutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from packaging.requirements import Requirement

import gptlab

REPO = Path(__file__).resolve().parents[1]
PIPELINE_ONLY = (
    "mlflow",
    "prefect",
    "dvc",
    "ollama",
    "httpx",
    "starlette",
    "uvicorn",
    "matplotlib",
    "transformers",
    "gradio",
)


def core_distributions() -> set[str]:
    """Names of the distributions gptlab's core requirements need, transitively (no extras)."""
    seen: set[str] = set()
    todo = list(md.requires("gptlab") or [])
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        todo.extend(md.requires(name) or [])
    return seen


def link_venv(root: Path, dists: set[str]) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(root), "platbase": str(root)}))
    here = Path(sysconfig.get_path("purelib"))
    for name in dists:
        for top in {Path(str(f)).parts[0] for f in md.distribution(name).files or []}:
            if top != ".." and (here / top).exists() and not (site / top).exists():
                (site / top).symlink_to(here / top)
    (site / "gptlab-repo.pth").write_text(str(REPO) + "\n")
    return root / "bin" / "python"


def test_gptlab_imports_and_trains_with_core_dependencies_only(
    tmp_path: Path, gpt2_tiktoken_file: Path
) -> None:
    dists = core_distributions()
    assert {"torch", "numpy", "pyarrow", "safetensors", "tiktoken"} <= dists
    assert not dists & set(PIPELINE_ONLY)
    python = link_venv(tmp_path / "core-venv", dists)
    # Every core module, subpackages included; the server and chat page need their extras (by contract, see
    # tests/test_layers.py, no core module imports them).
    modules = sorted(
        m.name
        for m in pkgutil.walk_packages(gptlab.__path__, "gptlab.")
        if not m.name.startswith(("gptlab.serve", "gptlab.chatui"))
    )
    script = f"""
import importlib, torch
for name in {PIPELINE_ONLY!r}:
    try:
        importlib.import_module(name)
    except ImportError:
        continue
    raise SystemExit(f"{{name}} is importable: not a core-only environment")
for module in {modules!r}:
    importlib.import_module(module)
from gptlab.config import GPTConfig
from gptlab.generate import generate
from gptlab.model import GPT
from gptlab.train import TrainConfig, train
torch.manual_seed(0)
model = GPT(GPTConfig.from_name("gpt-nano"))
batch = (torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8)))
class Once:
    def __iter__(self):
        yield batch
    def state_dict(self):
        return {{}}
    def load_state_dict(self, state):
        pass
result = train(model, Once(), TrainConfig(max_steps=1, warmup_steps=0, eval_interval=0, progress=False))
print("ok", len({modules!r}), result.step, len(generate(model, [[1, 2, 3]], max_new_tokens=4)[0]))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["GPTLAB_TIKTOKEN_FILE"] = str(gpt2_tiktoken_file)
    proc = subprocess.run([str(python), "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", str(len(modules)), "1", "4"]
