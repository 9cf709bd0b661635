"""End to end: the README's main command in a fresh temporary clone on the sample profile (tiny params).

Every stage runs, outputs and metrics exist, MLflow holds a run per stage with metrics and the model, the
second run is a no-op, a param change reruns only downstream stages, and a DVC remote round-trips the outputs.
The run is the session's shared one (``sample_run`` in conftest.py); tests that change the clone copy it. How
good the stages' results are is for the stage functions' own tests (tests/test_stage_*.py).
"""

from __future__ import annotations

import json
import re
import socket
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from clones import TINY_PARAMS, clean_env, git, run, set_params
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("pipeline")]  # the session run's worker
STAGES = [
    "download", "tokenize", "pretrain", "base_model", "classify", "sft", "dpo", "benchmark", "evaluate", "export"
]  # fmt: skip
REGISTERED = {"classify": "gptlab-spam-classifier", "sft": "gptlab-sft", "dpo": "gptlab-dpo"}


@pytest.fixture(scope="module")
def clone(sample_run) -> Path:
    return sample_run.root


@pytest.fixture(scope="module")
def first_run(sample_run):
    return sample_run.proc


@pytest.fixture
def copy(sample_run, tmp_path: Path) -> Path:
    return sample_run.copy(tmp_path / "gptlab")


def _runs(clone: Path):
    mlflow.set_tracking_uri(f"sqlite:///{clone / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{clone / 'mlflow.db'}")
    client = MlflowClient()
    exp = client.get_experiment_by_name("gptlab")
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_main_command_runs_every_stage(clone: Path, first_run) -> None:
    out = first_run.stdout
    # The terminal shows progress and the stages' own lines; DVC's and the libraries' output is in the log.
    log = (clone / re.search(r"full log: (\S+)\)", out).group(1)).read_text()
    assert "Traceback" not in out and "Updating lock file" not in out and "Updating lock file" in log
    assert all(len(line) <= 80 for line in out.splitlines())
    for stage in STAGES:
        assert f"Running stage '{stage}'" in log and f"] {stage}" in out
        assert f"{stage:<12} ran" in out
    for path in [
        "data/raw/corpus.txt",
        "data/raw/sms_spam.tsv",
        "data/raw/instruction-data.json",
        "data/raw/instruction-data-with-preference.json",
        "data/tokens/manifest.json",
        "models/pretrain/model.safetensors",
        "models/base/model.safetensors",
        "models/base/config.json",
        "plots/pretrain/loss.csv",
        "plots/pretrain/loss.png",
        "outputs/pretrain/samples.json",
        "dvc.lock",
    ]:
        assert (clone / path).is_file(), path
    pretrain = json.loads((clone / "metrics/pretrain.json").read_text())
    tokenize = json.loads((clone / "metrics/tokenize.json").read_text())
    base = json.loads((clone / "metrics/base_model.json").read_text())
    assert pretrain["steps"] == TINY_PARAMS["pretrain"]["train"]["max_steps"]
    assert pretrain["tokens_seen"] == pretrain["steps"] * 8 * 128
    assert tokenize["num_tokens"] == tokenize["train_tokens"] + tokenize["val_tokens"] > 9000
    assert base["source"].startswith("pretrain") and base["num_params"] == pretrain["num_params"]
    assert base["val_loss"] == pytest.approx(pretrain["val_loss"], abs=0.2)
    samples = json.loads((clone / "outputs/pretrain/samples.json").read_text())
    assert all(s["completion"] for s in samples)


def test_finetuning_stages_write_their_outputs(clone: Path, first_run) -> None:
    clf = json.loads((clone / "metrics/classify.json").read_text())
    assert 0 <= clf["test_accuracy"] <= 1 and clf["test_majority_baseline"] == pytest.approx(42 / 81)
    assert clf["split_sizes"] == {"train": 281, "val": 40, "test": 81}  # 201 spam + 201 ham, 70/10/20
    assert set(clf["test_per_class"]) == {"ham", "spam"}
    confusion = json.loads((clone / "outputs/classify/confusion.json").read_text())
    assert sum(map(sum, confusion["matrix"])) == 81
    assert (clone / "plots/classify/confusion.png").is_file() and (
        clone / "plots/classify/curves.csv"
    ).is_file()

    sft = json.loads((clone / "metrics/sft.json").read_text())
    assert sft["split_sizes"] == {"train": 261, "test": 30, "val": 17} and sft["skipped_records"] == 0
    responses = json.loads((clone / "outputs/sft/responses.json").read_text())
    assert len(responses) == 30
    assert set(responses[0]) == {"instruction", "input", "output", "model_response"}
    assert pd.read_parquet(clone / "outputs/sft/responses.parquet").shape == (30, 4)

    dpo = json.loads((clone / "metrics/dpo.json").read_text())
    assert dpo["steps"] == 2 and dpo["initial_train_reward_accuracy"] == 0.0  # policy == reference at first
    rows = json.loads((clone / "outputs/dpo/responses.json").read_text())
    assert len(rows) == 10 and {"reference_response", "model_response"} <= set(rows[0])

    out = run(
        [
            "python",
            "-m",
            "gptlab.cli",
            "classify",
            "--checkpoint",
            "models/classifier",
            "WIN a FREE prize! Txt CLAIM to 80086 now",
        ],
        clone,
        clean_env(clone),
    ).stdout
    assert out.split("\t")[0] in {"ham", "spam"}


def test_evaluate_without_a_judge_reports_reference_metrics(clone: Path, first_run) -> None:
    metrics = json.loads((clone / "metrics/evaluate.json").read_text())
    assert metrics["judge_status"] == "unreachable"  # the sample profile's default: no Ollama needed
    assert set(metrics["models"]) == {"sft", "sft_on_preference", "dpo"}
    assert metrics["models"]["sft"]["n"] == 30 and 0 <= metrics["models"]["sft"]["rouge_l_f1"] <= 1
    table = pd.read_parquet(clone / "outputs/evaluate/scores.parquet")
    assert len(table) == 50 and table["score"].isna().all()
    assert "evaluate: no judge at http://127.0.0.1:11434: reference metrics only" in first_run.stdout
    # Both models' answers are MLflow evaluation runs of reference scores, saying why there is no judge score.
    assert "evaluate: MLflow evaluations: sft 10 rows, dpo 10 rows" in first_run.stdout
    client, runs = _runs(clone)
    evaluations = {r.info.run_name: r for r in runs if r.data.tags.get("gptlab.role") == "evaluation"}
    assert sorted(evaluations) == ["evaluate-dpo", "evaluate-sft"]
    for r in evaluations.values():
        assert r.data.tags["gptlab.judge_status"] == "unreachable"
        assert "No judge reachable at http://127.0.0.1:11434" in r.data.tags["mlflow.note.content"]
        assert "rouge_l_f1/mean" in r.data.metrics and "judge_score/mean" not in r.data.metrics
    dpo = metrics["models"]["dpo"]["rouge_l_f1"]
    assert evaluations["evaluate-dpo"].data.metrics["rouge_l_f1/mean"] == pytest.approx(dpo)


def test_export_writes_models_that_load_back(clone: Path, first_run) -> None:
    metrics = json.loads((clone / "metrics/export.json").read_text())
    assert metrics["hf_greedy_match"] == 1.0 and metrics["hf_max_abs_logit_diff"] < 1e-4
    assert metrics["gguf_type"] == "q8_0" and metrics["gguf_max_abs_logit_diff"] < 1.0
    assert (clone / "exports/hf/config.json").is_file() and (clone / "exports/hf/model.safetensors").is_file()
    modelfile = (clone / "exports/gptlab-dpo.Modelfile").read_text()
    assert "FROM ./gptlab-dpo.gguf" in modelfile
    client, runs = _runs(clone)
    (version,) = client.search_model_versions("name='gptlab-dpo'")
    (export_run,) = [r for r in runs if r.data.tags.get("gptlab.stage") == "export"]
    assert version.tags["gptlab.export.run_id"] == export_run.info.run_id
    files = {f.path for f in client.list_artifacts(export_run.info.run_id, "gguf")}
    assert {"gguf/gptlab-dpo.gguf", "gguf/gptlab-dpo.Modelfile"} <= files


def test_mlflow_has_a_run_per_stage(clone: Path, first_run) -> None:
    client, runs = _runs(clone)
    by_stage = {r.data.tags["gptlab.stage"]: r for r in runs if r.data.tags.get("gptlab.role") == "stage"}
    assert sorted(by_stage) == sorted(STAGES)
    assert len({r.data.tags["gptlab.pipeline_run_id"] for r in by_stage.values()}) == 1
    commit = git("rev-parse", "HEAD", cwd=clone).strip()
    dirty = "true" if git("status", "--porcelain", "--untracked-files=no", cwd=clone).strip() else "false"
    for stage, r in by_stage.items():
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.source.git.commit"] == commit
        assert r.data.tags["dvc.stage"] == stage and r.data.tags["gptlab.profile"] == "sample"
        assert r.data.tags["prefect.flow_run_id"]
        assert r.data.params, stage
        assert r.data.tags["mlflow.source.name"] == f"stages/{stage}.py"
        assert r.data.tags["gptlab.git_dirty"] == dirty  # the tests' tiny params.yaml: true
    # Each stage's data and model deps are its run's datasets, digested by DVC's md5 as dvc.lock records them.
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    for stage in ("tokenize", "pretrain", "classify", "evaluate"):
        logged = {
            d.dataset.name: (d.dataset.digest, d.dataset.source_type, {t.key: t.value for t in d.tags})
            for d in by_stage[stage].inputs.dataset_inputs
        }
        data = {
            d["path"]: d["md5"].removesuffix(".dir")
            for d in lock[stage]["deps"]
            if not d["path"].endswith(".py")
        }
        assert data and {k: v[0] for k, v in logged.items()} == data, stage
        assert all(src == "dvc" for _, src, _ in logged.values())
    assert set(logged) == {"outputs/sft/responses.json", "outputs/dpo/responses.json"}
    contexts = {d.dataset.name: d.tags[0].value for d in by_stage["classify"].inputs.dataset_inputs}
    assert contexts == {"models/base": "model", "data/raw/sms_spam.tsv": "data"}
    pretrain = by_stage["pretrain"]
    assert pretrain.data.params["train.lr"] == "0.001"
    history = client.get_metric_history(pretrain.info.run_id, "train_loss")
    assert [m.step for m in history] == [2, 4] and history[-1].value < history[0].value
    for stage in ("pretrain", "base_model"):
        files = {f.path for f in client.list_artifacts(by_stage[stage].info.run_id, "model")}
        assert {"model/model.safetensors", "model/config.json"} <= files
    assert "loss.png" in {f.path for f in client.list_artifacts(pretrain.info.run_id)}
    # Finetuned models are registered under stable names, linked to their run, with the metrics attached.
    for stage, name in REGISTERED.items():
        (version,) = client.search_model_versions(f"name='{name}'")
        assert version.run_id == by_stage[stage].info.run_id
        key = "test_accuracy" if stage == "classify" else "steps"
        logged = client.get_logged_model(version.source.removeprefix("models:/"))
        assert key in {m.key for m in logged.metrics} and key in version.tags
    classify_files = {f.path for f in client.list_artifacts(by_stage["classify"].info.run_id)}
    # What dvc.yaml declares for the stage is logged, nothing listed a second time in the code.
    assert {"confusion.png", "confusion.json", "curves.csv", "curves.png", "classify.json"} <= classify_files
    # DPO's rewards also under the names TRL logs, so runs of both line up.
    dpo_metrics = client.get_run(by_stage["dpo"].info.run_id).data.metrics
    assert {"rewards/margins", "eval_rewards/accuracies", "logps/chosen"} <= set(dpo_metrics)
    # The experiment opens in MLflow's model-training view.
    assert client.get_experiment_by_name("gptlab").tags["mlflow.experimentKind"] == "custom_model_development"
    model = mlflow.pyfunc.load_model("models:/gptlab-spam-classifier/1")
    (pred,) = model.predict(["Free entry! Claim your £500 prize now"])
    assert pred["label"] in {"ham", "spam"} and 0.5 <= pred["probability"] <= 1.0


def test_stage_runs_nest_under_a_parent_run_with_a_summary(clone: Path, first_run) -> None:
    client, runs = _runs(clone)
    parents = [r for r in runs if r.data.tags.get("gptlab.role") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["gptlab.profile"] == "sample"
    stages = [r for r in runs if r.data.tags.get("gptlab.role") == "stage"]
    assert len(stages) == len(STAGES)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in stages)
    files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"pipeline_summary.md", "pipeline_summary.html"} <= files
    summary = (Path(client.download_artifacts(parent.info.run_id, "pipeline_summary.md"))).read_text()
    for stage in STAGES:
        assert f"### {stage}" in summary
    assert "![classify: confusion](plots/classify/confusion.png)" in summary
    clf = json.loads((clone / "metrics/classify.json").read_text())
    assert parent.data.metrics["classify.test_accuracy"] == pytest.approx(clf["test_accuracy"])


def test_second_run_is_a_no_op(clone: Path, first_run) -> None:
    _, before = _runs(clone)
    out = run(["./run.sh", "pipeline"], clone, clean_env(clone)).stdout
    assert "Running stage" not in out and "nothing to do" in out
    for stage in STAGES:
        assert f"{stage:<12} up to date" in out
    _, after = _runs(clone)
    # dvc status found nothing to do: no Prefect server started, no run logged anywhere.
    assert len(after) == len(before)


def test_param_change_reruns_only_downstream(copy: Path) -> None:
    clone = copy
    _, before = _runs(clone)
    set_params(clone, {"base_model": {"eval_batch_size": 2}})
    out = run(["dvc", "repro"], clone, clean_env(clone)).stdout
    assert "Running stage 'base_model'" in out
    for stage in ("download", "tokenize", "pretrain"):
        assert f"Running stage '{stage}'" not in out
    # A plain `dvc repro` is one pipeline execution too: its stage runs share one id and one parent run.
    _, after = _runs(clone)
    new = [r for r in after if r.info.run_id not in {b.info.run_id for b in before}]
    stage_runs = [r for r in new if r.data.tags.get("gptlab.role") == "stage"]
    # eval_batch_size leaves the weights unchanged, so DVC reruns nothing downstream of base_model
    assert {r.data.tags["gptlab.stage"] for r in stage_runs} == {"base_model"}
    assert len({r.data.tags["gptlab.pipeline_run_id"] for r in new}) == 1
    assert next(iter({r.data.tags["gptlab.pipeline_run_id"] for r in new})).startswith("dvc-")
    assert len({r.data.tags["mlflow.parentRunId"] for r in stage_runs}) == 1
    metrics = run(["dvc", "metrics", "show", "--json"], clone, clean_env(clone)).stdout
    # Results only in the metrics files (timings, which differ run to run, are in MLflow).
    assert "val_perplexity" in metrics and "tokens_per_sec" not in metrics
    run(["dvc", "plots", "show", "-o", str(clone / "dvc_plots")], clone, clean_env(clone))
    assert (clone / "dvc_plots" / "index.html").is_file()
    set_params(clone, {"base_model": {"eval_batch_size": 4}})
    # Back to the old params: DVC's run cache restores base_model's old outputs instead of recomputing.
    out = run(["dvc", "repro"], clone, clean_env(clone)).stdout
    assert "Stage 'base_model' is cached - skipping run, checking out outputs" in out


def test_dvc_remote_push_pull_round_trip(copy: Path, tmp_path) -> None:
    clone = copy
    env = clean_env(clone)
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "local", str(remote)], clone, env)
    git("add", "-A", cwd=clone)
    git("commit", "-q", "-m", "pipeline outputs", cwd=clone)
    run(["dvc", "push"], clone, env)
    fresh = tmp_path / "fresh"
    git("clone", "-q", str(clone), str(fresh), cwd=tmp_path)
    assert not (fresh / "models").exists()
    run(["dvc", "pull"], fresh, clean_env(fresh))
    for rel in ("models/base/model.safetensors", "data/tokens/manifest.json", "data/raw/corpus.txt"):
        assert (fresh / rel).read_bytes() == (clone / rel).read_bytes(), rel
    status = run(["dvc", "status"], fresh, clean_env(fresh)).stdout
    assert "up to date" in status


def test_unreachable_tracking_server_is_a_clear_error(clone: Path, first_run) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = clean_env(clone, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}")
    proc = __import__("subprocess").run(
        [
            "python",
            "-m",
            "stages.base_model",
            "--pretrained",
            "models/pretrain",
            "--tokens",
            "data/tokens",
            "--out",
            "/nonexistent/x",
            "--metrics",
            "/nonexistent/m.json",
        ],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"base_model: error: MLflow tracking server http://127.0.0.1:{port} is unreachable")
    )


def _main_command_fails(clone: Path, env: dict[str, str], *args: str) -> list[str]:
    proc = __import__("subprocess").run(
        ["./run.sh", "pipeline", *args], cwd=clone, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and "Error" not in out.replace("error:", ""), out
    return [ln for ln in out.splitlines() if ln.strip()]


def test_main_command_failures_are_one_line_and_a_log_path(copy: Path, prefect_server: str) -> None:
    clone = copy
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # --force: with nothing to do the pipeline would not need the tracking server at all
    env = clean_env(clone, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}")
    lines = _main_command_fails(clone, env, "--force", "--target", "download")
    assert lines[-2].startswith(
        f"pipeline: error: MLflow tracking server http://127.0.0.1:{port} is unreachable"
    )
    assert re.fullmatch(r"  full log: logs/pipeline-run-[0-9a-f]+\.log", lines[-1])
    assert len(lines) == 3  # the header line naming the log, the error, the log again
    # A stage's bad input: the stage's own one-line error, after the progress lines of the stages before it.
    params = (clone / "params.yaml").read_text()
    try:
        set_params(clone, {"classify": {"train": {"lr": "fast"}}})
        # On the session's server: the temporary one (Prefect's default, which the run above started) costs ~30 s.
        lines = _main_command_fails(clone, clean_env(clone, PREFECT_API_URL=prefect_server))
    finally:
        (clone / "params.yaml").write_text(params)
    assert lines[-3] == (
        "pipeline: error: stage classify failed: classify: error: "
        "params.yaml: classify.train.lr: expected a number, got 'fast'"
    )
    # DVC removed the classifier it had before running the stage again; the error says so and how to restore it.
    hint = re.fullmatch(
        r"  DVC removed its previous outputs before running it \((.+)\): `dvc checkout classify` restores them",
        lines[-2],
    )
    assert hint, lines[-2]
    gone = hint.group(1).split(", ")
    assert gone and not any((clone / p).exists() for p in gone)
    assert lines[-1].startswith("  full log: logs/pipeline-run-")
    assert (clone / lines[-1].split("full log: ")[1]).is_file()
    assert len(lines) <= 17, lines  # header, [i/n] lines and "up to date" notes, the error, the hint
    run([sys.executable, "-m", "dvc", "checkout", "classify"], clone, env)
    assert all((clone / p).exists() for p in gone)
    # A params.yaml a user broke by hand: the terminal names the file, line and column (no Prefect, no log).
    (clone / "params.yaml").write_text(params.replace("classify:", "classify:\n  - [", 1))
    try:
        lines = _main_command_fails(clone, env)
    finally:
        (clone / "params.yaml").write_text(params)
    assert len(lines) == 1 and re.fullmatch(
        r"pipeline: error: params\.yaml: invalid YAML at line \d+, column \d+: .+", lines[0]
    ), lines
