"""``./run.sh pipeline``: run the whole pipeline (or up to one stage) as a Prefect flow over DVC.

    python -m pipelines.run [--target STAGE] [--force] [--profile NAME] [--set-param SECTION.KEY=VALUE ...]
                            [--no-prefect]

Without ``PREFECT_API_URL`` Prefect starts a temporary local server for the run; its database lives in
``.prefect/`` so ``PREFECT_HOME=.prefect prefect server start`` shows the runs afterwards. ``--no-prefect`` runs
plain ``dvc repro`` instead.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipelines.run", description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=None, help="run only up to this DVC stage")
    parser.add_argument(
        "--force", action="store_true", help="rerun stages even if DVC says they are up to date"
    )
    parser.add_argument("--no-prefect", action="store_true", help="plain `dvc repro`, no Prefect")
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
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    from stages import run_context, tracking

    run_id = run_context.pipeline_run_id()  # minted once; the flow and every stage inherit it
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
        except (RuntimeError, ValueError) as exc:  # a bad profile/override, an unreachable tracking server
            print(f"pipeline: error: {exc}", file=sys.stderr)
            return 2
        except subprocess.CalledProcessError as exc:
            return exc.returncode
        return 0
    os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
    from pipelines.flow import pipeline  # after PREFECT_HOME: Prefect reads settings at import

    try:
        results = pipeline(
            root=str(ROOT),
            target=args.target,
            force=args.force,
            profile=args.profile,
            set_params=args.set_param,
        )
    except (RuntimeError, ValueError) as exc:
        print(f"pipeline: error: {exc}", file=sys.stderr)
        return 2
    print(f"\npipeline summary (run id {run_id}):")
    for r in results:
        print(f"  {r['stage']:<12} {'ran' if r['ran'] else 'up to date'}")
    print(
        "outputs: models/, metrics/, plots/, outputs/  |  runs: mlflow ui --backend-store-uri sqlite:///mlflow.db"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
