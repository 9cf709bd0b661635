"""Bad-input suite: each case runs a stage's ``cmd`` from dvc.yaml on a copy of the session's pipeline run after
spoiling one input or param. Every case must exit 2 with one stderr line ``<stage>: error: …`` that names the
file or field and what was expected, no traceback, and leave every output of the stage byte-for-byte as it was
(and no temp file behind).

Most cases run the command's module in this process (``runpy`` with its ``sys.argv``, in the clone, with the
stage's environment): the same ``main()`` a process runs, without ~6 s of interpreter and library start-up per
case. The cases marked ``process`` run as DVC runs them, a shell command in a new process, to prove the process
boundary: exit status 2 and a single stderr line from a real interpreter.

The cases cover the defects a fault-and-bad-input probe found (non-UTF-8 TSV, empty SMS text, zip errors, a
``config.json`` that is not an object, a pickle that would run code, an empty or too short corpus) and every
validator of the download, params, classify, sft and dpo stages.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from clones import clean_env, set_params

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("pipeline")]  # the session run's worker
INPUTS = [
    "params.yaml",
    "data/raw/corpus.txt",
    "data/raw/sms_spam.tsv",
    "data/raw/instruction-data.json",
    "data/raw/instruction-data-with-preference.json",
]


class RunsCode:
    """A pickle payload: unpickling it would create the file ``PWNED`` (weights_only must refuse it)."""

    def __reduce__(self):
        return (Path.touch, (Path("PWNED"),))


@dataclass
class Case:
    id: str
    stage: str
    spoil: Callable[[Path], None]
    expect: str
    """Regex for the error line after ``<stage>: error: ``."""
    process: bool = False
    """Run as a real process (``cmd`` in a shell) rather than in this one."""


def params(updates: dict) -> Callable[[Path], None]:
    return lambda root: set_params(root, updates)


def empty_sources(text: str) -> str:
    data = yaml.safe_load(text)
    data["download"]["sources"] = {}
    return yaml.safe_dump(data, sort_keys=False)


def write(rel: str, data: bytes | str) -> Callable[[Path], None]:
    def spoil(root: Path) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    return spoil


def edit(rel: str, fn: Callable[[str], str]) -> Callable[[Path], None]:
    return lambda root: (root / rel).write_text(fn((root / rel).read_text()))


def edit_json(rel: str, fn: Callable[[list], None]) -> Callable[[Path], None]:
    def spoil(root: Path) -> None:
        data = json.loads((root / rel).read_text())
        fn(data)
        (root / rel).write_text(json.dumps(data))

    return spoil


def both(*spoils: Callable[[Path], None]) -> Callable[[Path], None]:
    def spoil(root: Path) -> None:
        for s in spoils:
            s(root)

    return spoil


def source(name: str, spec: dict) -> Callable[[Path], None]:
    def spoil(root: Path) -> None:
        data = yaml.safe_load((root / "params.yaml").read_text())
        data["download"]["sources"] = {name: spec}
        (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    return spoil


def hf_dir(config: object, weights: bytes | None = None) -> Callable[[Path], None]:
    """A Hugging Face GPT-2 directory under ``bad/hf`` as the base model's source."""

    def spoil(root: Path) -> None:
        write("bad/hf/config.json", json.dumps(config))(root)
        if weights is not None:
            write("bad/hf/pytorch_model.bin", weights)(root)
        set_params(root, {"base_model": {"source": "bad/hf"}})

    return spoil


HF_CONFIG = {
    "model_type": "gpt2",
    "n_layer": 1,
    "n_head": 2,
    "n_embd": 8,
    "n_positions": 16,
    "vocab_size": 50257,
}
SMS = "data/raw/sms_spam.tsv"
SFT = "data/raw/instruction-data.json"
PREF = "data/raw/instruction-data-with-preference.json"
SHA0 = "0" * 64

CASES = [
    # download
    Case("sources-empty", "download", edit("params.yaml", empty_sources), r"download\.sources is empty"),
    Case(
        "no-checksum",
        "download",
        source("x.txt", {"url": "data/sample/corpus.txt"}),
        r"sources\.x\.txt.*sha256",
    ),
    Case(
        "sha-mismatch",
        "download",
        source("corpus.txt", {"url": "data/sample/corpus.txt", "sha256": SHA0}),
        r"sha256 mismatch.*data/sample/corpus\.txt",
        process=True,
    ),
    Case(
        "missing-file",
        "download",
        source("corpus.txt", {"url": "data/sample/nope.txt", "sha256": SHA0}),
        r"data/sample/nope\.txt.*(no such file|not found)",
    ),
    Case(
        "not-a-zip",
        "download",
        source(
            "sms.tsv",
            {
                "url": "data/sample/corpus.txt",
                "sha256": "de3c023f8583e22bad9b4d4ca09d17227268b1ec94b96eeedffdf73a92d8e51f",
                "member": "SMSSpamCollection",
            },
        ),
        r"cannot open data/sample/corpus\.txt: not a valid zip file",
    ),
    Case(
        "zip-no-member",
        "download",
        both(
            write("bad/a.zip", bytes.fromhex("504b0506" + "00" * 18)),  # an empty zip archive
            source(
                "sms.tsv",
                {
                    "url": "bad/a.zip",
                    "sha256": hashlib.sha256(bytes.fromhex("504b0506" + "00" * 18)).hexdigest(),
                    "member": "SMSSpamCollection",
                },
            ),
        ),
        r"bad/a\.zip has no member 'SMSSpamCollection'",
    ),
    Case(
        "mirror-not-dir",
        "download",
        params({"download": {"mirror": "nowhere"}}),
        r"download: mirror: nowhere is not a directory",
    ),
    Case(
        "name-not-plain",
        "download",
        source("../x.txt", {"url": "data/sample/corpus.txt", "sha256": SHA0}),
        r"download\.sources key '\.\./x\.txt' must be a plain file name",
    ),
    # params.yaml itself
    Case(
        "invalid-yaml",
        "classify",
        edit("params.yaml", lambda t: t + "\n  : [\n"),
        r"params\.yaml: invalid YAML",
        process=True,
    ),
    Case(
        "unknown-key",
        "sft",
        params({"sft": {"learning_rate": 1}}),
        r"params\.yaml: sft: unknown key\(s\) learning_rate",
    ),
    Case(
        "mistyped",
        "dpo",
        params({"dpo": {"train": {"lr": "fast"}}}),
        r"dpo\.train\.lr: expected a number, got 'fast'",
    ),
    Case(
        "missing-section",
        "classify",
        edit("params.yaml", lambda t: t.replace("\nclassify:", "\nclassify_old:")),
        r"params\.yaml: missing section 'classify'",
    ),
    # tokenize
    Case("empty-corpus", "tokenize", write("data/raw/corpus.txt", ""), r"data/raw/corpus\.txt: empty"),
    Case(
        "short-corpus",
        "tokenize",
        write("data/raw/corpus.txt", "A few words only, far fewer than one window.\n" * 3),
        r"corpus\.txt: the train split has \d+ tokens, fewer than one window of pretrain\.context_length=",
    ),
    Case(
        "corpus-not-utf8",
        "tokenize",
        write("data/raw/corpus.txt", b"fine\n" * 5 + b"caf\xe9\n"),
        r"data/raw/corpus\.txt: line 6, column 4: byte 0xe9 is not UTF-8",
    ),
    # pretrain
    Case(
        "window-too-long",
        "pretrain",
        params({"pretrain": {"context_length": 100000}}),
        r"pretrain\.context_length \(100000\) exceeds the model's context_length",
    ),
    Case(
        "unknown-model", "pretrain", params({"pretrain": {"model": "gpt-huge"}}), r"pretrain\.model.*gpt-huge"
    ),
    # base_model
    Case("config-not-object", "base_model", hf_dir([1, 2]), r"bad/hf/config\.json: expected a JSON object"),
    Case(
        "pickle-runs-code",
        "base_model",
        hf_dir(HF_CONFIG, pickle.dumps({"wte.weight": RunsCode()})),
        r"bad/hf/pytorch_model\.bin: refused: unpickling it would run code .*use model\.safetensors",
        process=True,
    ),
    Case(
        "unknown-source",
        "base_model",
        params({"base_model": {"source": "gpt5"}}),
        r"base_model\.source 'gpt5': expected 'pretrain'",
    ),
    # classify
    Case(
        "tsv-not-utf8",
        "classify",
        write(SMS, b"ham\thello\n" * 40 + b"spam\tcaf\xe9 prize\n"),
        r"data/raw/sms_spam\.tsv: line 41, column 9: byte 0xe9 is not UTF-8",
    ),
    Case(
        "empty-message",
        "classify",
        edit(SMS, lambda t: "ham\t  \n" + t),
        r"sms_spam\.tsv: line 1: empty message after label 'ham'",
    ),
    Case(
        "no-tab",
        "classify",
        edit(SMS, lambda t: t + "spam no tab here\n"),
        r"sms_spam\.tsv: line \d+: expected 'label<TAB>text', found no tab",
    ),
    Case(
        "unknown-label",
        "classify",
        edit(SMS, lambda t: "maybe\thello\n" + t),
        r"sms_spam\.tsv: line 1: unknown label 'maybe'; expected one of ham, spam",
    ),
    Case("too-few", "classify", write(SMS, "ham\thi\nspam\tWIN\n"), r"sms_spam\.tsv: too few messages"),
    Case(
        "trainable",
        "classify",
        params({"classify": {"trainable": "some"}}),
        r"params\.yaml: classify: trainable must be one of head, last_block, all, lora, got 'some'",
    ),
    Case(
        "lora-rank",
        "classify",
        params({"classify": {"lora": {"rank": 0}}}),
        r"params\.yaml: classify\.lora: LoRA rank must be a positive integer, got 0",
    ),
    Case("head-init", "classify", params({"classify": {"head_init": "zeros"}}), r"head_init must be one of"),
    # sft
    Case("sft-invalid-json", "sft", edit(SFT, lambda t: t[:-10]), r"instruction-data\.json: invalid JSON"),
    Case(
        "sft-not-utf8",
        "sft",
        write(SFT, b'[{"instruction": "caf\xe9"}]'),
        r"instruction-data\.json: line 1, column 22: byte 0xe9",
    ),
    Case(
        "sft-not-list",
        "sft",
        write(SFT, '{"instruction": "x"}'),
        r"instruction-data\.json: expected a JSON list of records",
    ),
    Case(
        "sft-missing-output",
        "sft",
        edit_json(SFT, lambda d: d[3].pop("output")),
        r"instruction-data\.json: record 3: .*output",
    ),
    Case(
        "sft-fractions",
        "sft",
        params({"sft": {"train_frac": 0.95}}),
        r"train_frac \+ test_frac must be at most 1",
    ),
    # dpo
    Case(
        "dpo-missing-rejected",
        "dpo",
        edit_json(PREF, lambda d: d[5].pop("rejected")),
        r"instruction-data-with-preference\.json: record 5: .*rejected",
    ),
    Case("dpo-reduction", "dpo", params({"dpo": {"reduction": "max"}}), r"reduction must be one of"),
    Case(
        "dpo-eval-train", "dpo", params({"dpo": {"train": {"eval_train": True}}}), r"dpo: train\.eval_train"
    ),
    # evaluate
    Case(
        "judge-concurrency",
        "evaluate",
        params({"evaluate": {"judge": {"concurrency": 0}}}),
        r"concurrency must be an int >= 1",
    ),
]


def stage_commands(root: Path) -> dict[str, tuple[str, list[str]]]:
    """Each stage's command (templating resolved) and outputs, from DVC itself."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {s.name: (s.cmd, [o.def_path for o in s.outs]) for s in repo.index.stages}


def snapshot(root: Path, outs: list[str]) -> dict[str, str]:
    files = {}
    for out in outs:
        path = root / out
        for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            files[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return files


@pytest.fixture(scope="module")
def pipeline_done(sample_run, tmp_path_factory) -> tuple[Path, dict]:
    root = sample_run.copy(tmp_path_factory.mktemp("bad") / "gptlab")
    return root, stage_commands(root)


def run_in_process(
    cmd: str, root: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` as ``runpy`` in this process: cwd, argv and environment as the process gets them."""
    python, flag, module, *args = shlex.split(cmd)
    assert (python, flag) == ("python", "-m"), cmd
    environ = dict(os.environ)  # the stage may set variables of its own (its run ids): none outlive the case
    with monkeypatch.context() as m:
        m.chdir(root)
        m.setattr(sys, "argv", [module, *args])
        m.delitem(sys.modules, module, raising=False)  # as `python -m` finds it: not yet imported
        for key in [k for k in os.environ if k.startswith(("PREFECT_", "MLFLOW_"))]:
            m.delenv(key)
        for key, value in clean_env(root).items():
            m.setenv(key, value)
        capsys.readouterr()
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
    os.environ.clear()
    os.environ.update(environ)
    return subprocess.CompletedProcess(cmd, code, out, err)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_outputs_untouched(
    pipeline_done, case: Case, monkeypatch, capsys
) -> None:
    root, commands = pipeline_done
    saved = {rel: (root / rel).read_bytes() for rel in INPUTS}
    cmd, outs = commands[case.stage]
    before = snapshot(root, outs)
    try:
        case.spoil(root)
        if case.process:
            proc = subprocess.run(
                cmd, shell=True, cwd=root, env=clean_env(root), capture_output=True, text=True, timeout=300
            )
        else:
            proc = run_in_process(cmd, root, monkeypatch, capsys)
    finally:
        for rel, data in saved.items():
            (root / rel).write_bytes(data)
        shutil.rmtree(root / "bad", ignore_errors=True)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    prefix = f"{case.stage}: error: "
    assert lines[0].startswith(prefix), lines[0]
    assert re.search(case.expect, lines[0][len(prefix) :]), lines[0]
    assert snapshot(root, outs) == before
    assert not [p for p in root.rglob(".*.tmp")], "temp files left behind"
    assert not (root / "PWNED").exists()


def test_cli_import_gpt2_config_not_an_object(tmp_path) -> None:
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text("[1, 2]")
    proc = subprocess.run(
        [sys.executable, "-m", "gptlab.cli", "import-gpt2", str(src), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"gptlab import-gpt2: error: {src / 'config.json'}: expected a JSON object (a GPT2Config), got list"
    )
    assert not (tmp_path / "out").exists()
