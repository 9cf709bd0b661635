"""gptlab's lm-evaluation-harness model (stages/lm_harness.py) against lm-eval's own ``hf`` model on the same small
GPT-2 exported to Hugging Face format: the project's offline tasks (benchmarks/tasks), every request's
log-likelihood within 1e-4 and the same accuracies; greedy ``generate_until`` with the same text."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from gptlab.checkpoint import save_checkpoint
from gptlab.config import GPTConfig
from gptlab.formats.hf_write import export_hf
from gptlab.model import GPT

lm_eval = pytest.importorskip("lm_eval", reason="the bench extra: pip install 'gptlab[bench]'")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from stages.lm_harness import GptlabLM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = ["gptlab_choice", "gptlab_ppl"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random 2-layer GPT-2 with a 64-token context (each paragraph spans several rolling windows), saved by
    gptlab and exported to HF."""
    root = tmp_path_factory.mktemp("harness")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("gpt-micro", context_length=64))
    save_checkpoint(model, root / "ckpt")
    export_hf(root / "ckpt", root / "hf")
    # lm-eval resolves the task files' data paths from the working directory: the repository root's layout.
    shutil.copytree(REPO / "benchmarks" / "tasks", root / "benchmarks" / "tasks")
    return root


def _evaluate(lm, root: Path, monkeypatch) -> dict:
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(root / "benchmarks" / "tasks"), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )


def test_loglikelihoods_and_accuracies_equal_lm_evals_hf_model(models, monkeypatch) -> None:
    ours = _evaluate(GptlabLM(models / "ckpt", batch_size=4), models, monkeypatch)
    ref = _evaluate(
        HFLM(pretrained=str(models / "hf"), device="cpu", batch_size=4, dtype="float32"), models, monkeypatch
    )
    for task, n in (("gptlab_choice", 24 * 4), ("gptlab_ppl", 12)):
        a = [r for s in ours["samples"][task] for r in s["resps"]]
        b = [r for s in ref["samples"][task] for r in s["resps"]]
        assert len(a) == len(b) == n
        ll_a = torch.tensor(
            [r[0][0] if isinstance(r[0], tuple | list) else r[0] for r in a], dtype=torch.float64
        )
        ll_b = torch.tensor(
            [r[0][0] if isinstance(r[0], tuple | list) else r[0] for r in b], dtype=torch.float64
        )
        assert torch.allclose(ll_a, ll_b, atol=1e-4, rtol=0), (ll_a - ll_b).abs().max()
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["gptlab_choice"][metric] == ref["results"]["gptlab_choice"][metric]
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["gptlab_ppl"][metric] == pytest.approx(
            ref["results"]["gptlab_ppl"][metric], rel=1e-5
        )


def test_generate_until_equals_lm_evals_hf_model(models) -> None:
    kwargs = {"until": ["\n", "."], "max_gen_toks": 12, "do_sample": False}
    contexts = ["Mira is the baker. She", "The lighthouse keeper climbed", "Juno"]
    requests = [Instance("generate_until", {}, (c, dict(kwargs)), i) for i, c in enumerate(contexts)]
    ours = GptlabLM(models / "ckpt", batch_size=2).generate_until(requests)
    ref = HFLM(pretrained=str(models / "hf"), device="cpu", batch_size=2, dtype="float32").generate_until(
        requests
    )
    assert ours == ref and any(ours)
