"""Data-parallel training (:mod:`gptlab.distributed` + :func:`gptlab.train.train`) under ``torchrun`` with two CPU
processes and gloo: the same global batch gives a single process's losses and weights, with gradient accumulation
(one all-reduce per optimizer step) too, and a run stopped at its checkpoint resumes to the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import run

REPO = Path(__file__).resolve().parents[1]
TIMING = ("tokens_per_sec", "peak_memory_mb", "mfu")


def torchrun(cases: list[dict], tmp: Path) -> None:
    """One ``torchrun`` launch of two ranks that run ``cases`` one after another (see ddp_worker.py)."""
    spec = tmp / "cases.json"
    spec.write_text(
        json.dumps([{k: str(v) if isinstance(v, Path) else v for k, v in c.items()} for c in cases])
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(REPO / "tests" / "ddp_worker.py"), str(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def results(out: Path) -> tuple[list[dict], dict]:
    history = json.loads((out / "history.json").read_text())
    return history, torch.load(out / "weights.pt", weights_only=True)


def assert_same_run(history, weights, ref) -> None:
    assert len(history) == len(ref["history"])
    for got, want in zip(history, ref["history"], strict=True):
        assert set(got) == set(want)
        for key in set(got) - set(TIMING):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    for name, tensor in ref["weights"].items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-5)


STRATEGIES = ("ddp", "fsdp")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every two-rank run of this module in one launch: the DDP/FSDP x accumulation matrix, and per strategy a
    run stopped after its step-4 checkpoint (max_steps=4, constant lr: the first half of the same run) that a
    second run resumes, plus a stopped FSDP run whose checkpoint is left as it was written."""
    tmp = tmp_path_factory.mktemp("two-ranks")
    cases: list[dict] = []
    for parallelism in STRATEGIES:
        for accum in (1, 2):
            cases.append(
                {"out": tmp / f"multi-{parallelism}-{accum}", "grad_accum": accum, "parallelism": parallelism}
            )
        ck = tmp / f"ck-{parallelism}"
        cases.append(
            {
                "out": tmp / f"first-{parallelism}",
                "checkpoint": ck,
                "max_steps": 4,
                "parallelism": parallelism,
            }
        )
        cases.append({"out": tmp / f"resumed-{parallelism}", "checkpoint": ck, "parallelism": parallelism})
    cases.append(
        {"out": tmp / "stopped-fsdp", "checkpoint": tmp / "ck-stopped", "max_steps": 4, "parallelism": "fsdp"}
    )
    torchrun(cases, tmp)
    return tmp


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    """One process's run of the same global batches, per accumulation count (in this process)."""
    tmp = tmp_path_factory.mktemp("single")
    return {accum: run(tmp / str(accum), accum) for accum in (1, 2)}


@pytest.mark.parametrize("parallelism", STRATEGIES)
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_two_ranks_reproduce_one_process(two_ranks, single, grad_accum, parallelism) -> None:
    history, weights = results(two_ranks / f"multi-{parallelism}-{grad_accum}")
    assert_same_run(history, weights, single[grad_accum])
    assert [r["step"] for r in history if "val_loss" in r] == [4, 8]


@pytest.mark.parametrize("parallelism", STRATEGIES)
def test_stopped_run_resumes_from_its_checkpoint(two_ranks, single, parallelism) -> None:
    history, weights = results(two_ranks / f"resumed-{parallelism}")
    assert_same_run(history, weights, single[1])
    first, _ = results(two_ranks / f"first-{parallelism}")
    assert (
        history[:4] == first
    )  # carried from the checkpoint, timing figures included: steps 1-4 did not rerun


def test_fsdp_checkpoint_is_an_ordinary_checkpoint_with_sharded_optimizer_state(two_ranks, tmp_path) -> None:
    """FSDP's checkpoint holds the whole model (safetensors, as every stage reads) and the optimizer state gathered by
    parameter name; a single-process run refuses to resume it with a message instead of mis-reading it."""
    from gptlab.load import load_checkpoint

    ck = two_ranks / "ck-stopped"
    model, _ = load_checkpoint(ck)
    _, weights = results(two_ranks / "stopped-fsdp")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, weights[name])
    state = torch.load(ck / "training_state.pt", weights_only=True)
    assert state["optimizer_layout"] == "sharded"
    assert "transformer.h.0.attn.c_attn.weight" in state["optimizer"]["state"]
    with pytest.raises(ValueError, match="parallelism: fsdp.*resume it the same way"):
        run(tmp_path / "single", 1, ck, 8)


@pytest.mark.slow
def test_pretrain_stage_relaunches_itself_under_torchrun(tmp_path) -> None:
    """``dvc repro``'s command line with ``launch.nproc_per_node: 2``: the stage starts torchrun itself; rank 0
    writes the same checkpoint and metrics a single process writes, and logs once."""
    import numpy as np
    import yaml

    from gptlab.data import ShardWriter

    with ShardWriter(tmp_path / "tokens", vocab_size=50257, tokenizer="gpt2", shard_size=4000) as w:
        w.add(np.tile(np.random.default_rng(0).integers(0, 500, 64), 80))
        w.finish(val_fraction=0.1)
    params = yaml.safe_load((REPO / "profiles" / "sample.yaml").read_text())
    section = params["pretrain"]
    section.update(model="gpt-micro", model_overrides={"n_layer": 1, "dropout": 0.0}, context_length=32)
    section["train"].update(
        max_steps=4, warmup_steps=0, eval_interval=2, eval_batches=1, log_interval=1, precision="fp32"
    )
    section["sample_max_new_tokens"] = 4
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    metrics = {}
    for n, parallelism in ((1, "ddp"), (2, "ddp"), (2, "fsdp")):
        section["launch"]["nproc_per_node"] = n
        section["train"]["parallelism"] = parallelism
        run_dir = tmp_path / f"n{n}-{parallelism}"
        run_dir.mkdir()
        (run_dir / "params.yaml").write_text(yaml.safe_dump(params))
        outs = ["--model", "model", "--metrics", "m.json", "--loss-csv", "l.csv", "--loss-png", "l.png"]
        proc = subprocess.run(
            [sys.executable, "-m", "stages.pretrain", "--tokens", str(tmp_path / "tokens"), *outs]
            + ["--samples", "s.json", "--work", "work"],
            cwd=run_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and "OMP_NUM_THREADS" not in proc.stderr
        metrics[run_dir.name] = json.loads((run_dir / "m.json").read_text())
        assert proc.stdout.count("pretrain: val loss") == 1  # rank 0 alone reports
    from safetensors.torch import load_file

    one = load_file(tmp_path / "n1-ddp" / "model" / "model.safetensors")
    assert metrics["n1-ddp"]["processes"] == 1
    for name in ("n2-ddp", "n2-fsdp"):
        assert metrics[name]["processes"] == 2
        assert metrics[name]["val_loss"] == pytest.approx(metrics["n1-ddp"]["val_loss"], rel=1e-5)
        assert metrics[name]["tokens_seen"] == metrics["n1-ddp"]["tokens_seen"]
        two = load_file(tmp_path / name / "model" / "model.safetensors")
        for key, tensor in one.items():
            torch.testing.assert_close(two[key], tensor, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, parallelism",
    # Every finetuning stage once; DDP's stage path is shared code (pretrain's relaunch test runs it too), FSDP
    # is where the stages differ: a partly frozen model (classify) and a frozen reference (dpo).
    [("sft", "ddp"), ("classify", "fsdp"), ("dpo", "fsdp")],
)
def test_finetuning_stages_run_under_torchrun(tmp_path, stage, parallelism) -> None:
    """dvc.yaml's own command for the stage, with ``launch.nproc_per_node: 2``: two ranks train, rank 0 writes.
    FSDP covers a partly frozen model (classify trains the last block and head) and DPO's frozen reference."""
    import re
    import shlex
    import shutil

    import yaml
    from stage_fixtures import tiny_checkpoint

    params = yaml.safe_load((REPO / "profiles" / "sample.yaml").read_text())
    for name in ("classify", "sft", "dpo"):
        params[name]["launch"]["nproc_per_node"] = 2
        params[name]["drop_last"] = True  # every batch splits evenly over the two processes
        params[name]["train"].update(
            max_steps=2,
            epochs=None,
            warmup_steps=0,
            eval_interval=1,
            eval_batches=1,  # evaluation runs under both strategies at each step, on one batch
            precision="fp32",
            parallelism=parallelism,
        )
        if name != "classify":
            params[name]["max_new_tokens"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    tiny_checkpoint(tmp_path / "models" / "base")
    tiny_checkpoint(tmp_path / "models" / "sft", stage="sft", prompt_format="alpaca")
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    shutil.copy(REPO / "data" / "sample" / "SMSSpamCollection", raw / "sms_spam.tsv")
    for name in ("instruction-data.json", "instruction-data-with-preference.json"):
        shutil.copy(REPO / "data" / "sample" / name, raw / name)
    raw_cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    # DVC's templating, as `dvc repro` fills it in: ${section.key} from params.yaml
    cmd = shlex.split(re.sub(r"\$\{([\w.]+)\}", lambda m: str(_lookup(params, m.group(1))), raw_cmd))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    proc = subprocess.run(
        [sys.executable, *cmd[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{stage}: 2 processes (torchrun, 1 node(s))" in proc.stderr and "Traceback" not in proc.stderr
    metrics = json.loads((tmp_path / "metrics" / f"{stage}.json").read_text())
    assert metrics["precision"] == "fp32" and metrics.get("steps", 2) == 2


def _lookup(params: dict, dotted: str):
    for key in dotted.split("."):
        params = params[key]
    return params
