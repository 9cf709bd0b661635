"""``stage_main``: a user's mistake is one line and exit 2; a bug keeps its traceback, then one line, exit 1."""

from __future__ import annotations

import pytest

from gptlab.checkpoint import CheckpointError
from stages.entry import UserError, stage_log, stage_main


def run_main(fn) -> int:
    with pytest.raises(SystemExit) as exit_info:
        stage_main("demo")(fn)()
    return exit_info.value.code


@pytest.mark.parametrize(
    "error",
    [
        UserError("params.yaml: demo.lr: expected a number, got 'fast'"),
        CheckpointError("models/x/config.json: not found"),  # the library's input errors are UserErrors
        FileNotFoundError(2, "No such file or directory", "data/raw/corpus.txt"),
    ],
)
def test_user_errors_are_one_line_exit_2(capsys, error: Exception) -> None:
    def fails() -> None:
        raise error

    assert run_main(fails) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"demo: error: {error}"]


def test_a_bug_keeps_its_traceback_then_one_line_exit_1(capsys) -> None:
    def fails() -> None:
        {}["missing"]  # a bug: no user input explains a KeyError

    assert run_main(fails) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "Traceback (most recent call last):"
    assert any('{}["missing"]' in line for line in err)
    assert err[-1] == "demo: error: unexpected KeyError: 'missing' (a bug, not bad input: traceback above)"


def test_progress_goes_through_logging_as_stage_lines(capsys) -> None:
    log = stage_log("demo")

    def works() -> None:
        log.info("val loss %.3f", 1.23456)

    stage_main("demo")(works)()
    stage_main("demo")(works)()  # a second main in one process does not print twice
    assert capsys.readouterr().out.splitlines() == ["demo: val loss 1.235", "demo: val loss 1.235"]
