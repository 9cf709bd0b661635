"""``./run.sh pipeline``: run the whole pipeline (or up to one stage) as a Prefect flow over DVC.

    python -m pipelines.run [--target STAGE] [--force] [--profile NAME] [--set-param SECTION.KEY=VALUE ...]
                            [--no-prefect | --stack]

Without ``PREFECT_API_URL`` Prefect starts a temporary local server for the run; its database lives in
``.prefect/`` so ``PREFECT_HOME=.prefect prefect server start`` shows the runs afterwards. ``--no-prefect`` runs
plain ``dvc repro`` instead; ``--stack`` runs it on the team stack's work pool (:mod:`pipelines.stack_run`).

The terminal shows the stages' progress and their own messages; everything else (DVC's, Prefect's and MLflow's
output, a stage's full log) goes to ``logs/pipeline-<run id>.log``, whose path is printed first, and again with a
failing stage's one-line error.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]


def log_to_file(path: Path) -> IO[str]:
    """Send file descriptors 1 and 2, this process's and every child's (DVC, the stages, Prefect's server), to
    ``path``; return a stream on the original stdout, for the progress lines."""
    sys.stdout.flush()
    sys.stderr.flush()
    console = os.fdopen(os.dup(1), "w", buffering=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    return console


def yaml_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as YAML (one line naming the file, line and column), or None if it can.
    DVC would report it only as "YAML file structure is corrupted", deep in the log."""
    import yaml

    try:
        yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return f"{path.name}: not found in {path.parent}"
    except UnicodeDecodeError:
        return f"{path.name}: not UTF-8 text"
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        return f"{path.name}: invalid YAML{where}: {problem}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipelines.run", description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=None, help="run only up to this DVC stage")
    parser.add_argument(
        "--force", action="store_true", help="rerun stages even if DVC says they are up to date"
    )
    parser.add_argument("--no-prefect", action="store_true", help="plain `dvc repro`, no Prefect")
    parser.add_argument(
        "--stack",
        action="store_true",
        help="run on the team stack (./run.sh stack up): a worker runs it, its servers track it, "
        "its DVC remote gets the outputs",
    )
    parser.add_argument("--profile", default=None, help="switch params.yaml to profiles/<PROFILE>.yaml first")
    parser.add_argument(
        "--set-param",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a param (repeatable)",
    )
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    for path in (ROOT / "dvc.yaml", ROOT / "params.yaml"):
        problem = yaml_problem(path)
        if problem:
            print(f"pipeline: error: {problem}", file=sys.stderr)
            return 2
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    from stages import run_context, tracking

    run_id = run_context.pipeline_run_id()  # minted once; the flow and every stage inherit it
    if args.stack:
        if args.no_prefect:
            print("pipeline: error: --stack runs through Prefect; drop --no-prefect", file=sys.stderr)
            return 2
        from pipelines import stack_run

        return stack_run.run(args.target, args.force, args.profile, args.set_param, run_id)
    if args.no_prefect:
        from pipelines.profile import activate, apply_overrides

        try:
            if args.profile:
                activate(args.profile, ROOT)
            if args.set_param:
                apply_overrides(args.set_param, ROOT)
            cmd = (
                [sys.executable, "-m", "dvc", "repro"]
                + ([args.target] if args.target else [])
                + (["--force"] if args.force else [])
            )
            with run_context.execution(tracking.configure()):
                code = subprocess.call(cmd)
                if code != 0:
                    raise subprocess.CalledProcessError(code, cmd)
            from pipelines.graph import dvc_stages, sweep_work

            for stage in dvc_stages(ROOT, args.target):  # all up to date now
                sweep_work(ROOT, stage["work"])
        except (RuntimeError, ValueError) as exc:  # a bad profile/override, an unreachable tracking server
            print(f"pipeline: error: {exc}", file=sys.stderr)
            return 2
        except subprocess.CalledProcessError as exc:
            return exc.returncode
        return 0
    if not (args.force or args.profile or args.set_param) and nothing_to_do(args.target, run_id):
        return 0
    os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry errors offline
    # Prefect waits 20 s for its temporary server, which a slow or busy 2-core machine can take just to start it
    # (database migrations included); a run that does work is minutes long, so wait up to two minutes.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    log = Path("logs") / f"pipeline-{run_id}.log"
    console = log_to_file(ROOT / log)
    print(f"pipeline {run_id} (full log: {log})", file=console)
    from pipelines import flow  # after PREFECT_HOME: Prefect reads settings at import

    flow.CONSOLE = console
    try:
        results = flow.pipeline(
            root=str(ROOT),
            target=args.target,
            force=args.force,
            profile=args.profile,
            set_params=args.set_param,
        )
    except (RuntimeError, ValueError) as exc:  # a failed stage, a bad profile, an unreachable server
        print(f"pipeline: error: {exc}\n  full log: {log}", file=console)
        return 2
    except Exception as exc:  # noqa: BLE001 - not the user's doing: the traceback goes to the log
        traceback.print_exc()
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"pipeline: error: unexpected {type(exc).__name__}: {first}\n  full log: {log}", file=console)
        return 1
    print(summary(run_id, [(r["stage"], r["ran"]) for r in results]), file=console)
    return 0


def summary(run_id: str, stages: list[tuple[str, bool]]) -> str:
    lines = [f"\npipeline summary (run id {run_id}):"]
    lines += [f"  {name:<12} {'ran' if ran else 'up to date'}" for name, ran in stages]
    lines += [
        "outputs: models/ metrics/ plots/ outputs/ exports/",
        "runs:    mlflow ui --backend-store-uri sqlite:///mlflow.db",
    ]
    return "\n".join(lines)


def nothing_to_do(target: str | None, run_id: str) -> bool:
    """When ``dvc status`` says every stage is up to date, say so and skip starting Prefect's temporary server
    (most of a no-op run's time): a run with nothing to do records nothing in Prefect or MLflow."""
    from pipelines.graph import stages_if_up_to_date, sweep_work

    try:
        stages = stages_if_up_to_date(ROOT, target)
    except Exception:  # noqa: BLE001 - a broken project is the full run's to report, with its log
        return False
    if stages is None:
        return False
    for stage in stages:
        sweep_work(ROOT, stage["work"])
    print(f"pipeline {run_id}: nothing to do", file=sys.stdout)
    print(summary(run_id, [(s["name"], False) for s in stages]))
    return True


if __name__ == "__main__":
    sys.exit(main())
