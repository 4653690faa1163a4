"""How a command ends: exit codes, the one error line, where the traceback goes, SIGTERM."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from binom_rl.agents.cli.common import run_command, set_torch_threads
from binom_rl.config import ConfigError


def _raise(err: BaseException):
    def work() -> int:
        raise err

    return work


def test_success_returns_the_works_exit_code(capsys):
    assert run_command(lambda: 0, verbose=False) == 0
    assert run_command(lambda: 3, verbose=False) == 3
    assert capsys.readouterr().err == ""


def test_config_error_is_one_line_exit_2_and_no_log(tmp_path, capsys):
    rc = run_command(_raise(ConfigError("fast-lr must be > 0")), verbose=True, log_folder=tmp_path)
    assert rc == 2
    assert capsys.readouterr().err == "error: fast-lr must be > 0\n"
    assert list(tmp_path.iterdir()) == []  # bad input writes nothing


@pytest.mark.parametrize(
    "err,line",
    [
        (RuntimeError("sampler worker 0 died"), "error: sampler worker 0 died"),
        (KeyError("returns/step_1"), "error: KeyError: 'returns/step_1'"),
        (ValueError(), "error: ValueError"),
        (
            RuntimeError("worker 1 raised:\nTraceback ...\n  x\nValueError: bad task\n"),
            "error: worker 1 raised: ... ValueError: bad task",
        ),
    ],
    ids=["runtime", "bug", "empty", "several-lines"],
)
def test_failure_is_one_line_exit_1_with_the_traceback_in_the_log(tmp_path, capsys, err, line):
    rc = run_command(_raise(err), verbose=False, log_folder=tmp_path, failure_note=lambda: "; x")
    assert rc == 1
    log = tmp_path / "error.log"
    assert capsys.readouterr().err == f"{line}; x (traceback in {log})\n"
    text = log.read_text()
    assert text.startswith("Traceback (most recent call last):")
    assert f"\n{type(err).__name__}" in text  # the exception itself ends the traceback


def test_failure_without_a_folder_points_to_verbose(tmp_path, capsys):
    assert run_command(_raise(KeyError("k")), verbose=False, log_folder=tmp_path / "no") == 1
    assert capsys.readouterr().err == "error: KeyError: 'k' (--verbose prints the traceback)\n"
    assert run_command(_raise(KeyError("k")), verbose=True) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "Traceback (most recent call last):" and err[-2] == "KeyError: 'k'"
    assert err[-1] == "error: KeyError: 'k' (--verbose prints the traceback)"


def test_interrupt_is_one_line_exit_130(capsys):
    assert run_command(_raise(KeyboardInterrupt()), verbose=False) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_sigterm_unwinds_the_command_exit_143_and_the_handler_is_restored(capsys):
    """SIGTERM while work() runs raises in it (its finally blocks run), ends the command with
    one line and exit 143, and leaves SIGTERM's handler as it was before."""
    before = signal.getsignal(signal.SIGTERM)
    unwound = []

    def work() -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler raises here, at once
            return 0
        finally:
            unwound.append(True)

    started = time.monotonic()
    assert run_command(work, verbose=False, failure_note=lambda: "; note") == 143
    assert time.monotonic() - started < 5
    assert unwound == [True]
    assert capsys.readouterr().err == "error: terminated (SIGTERM); note\n"
    assert signal.getsignal(signal.SIGTERM) is before


def test_set_torch_threads():
    set_torch_threads(None)
    assert torch.get_num_threads() == 1  # left as it was (the suite runs on one thread)
    set_torch_threads(2)
    assert torch.get_num_threads() == 2
    with pytest.raises(ConfigError, match="--torch-threads must be >= 1, got 0"):
        set_torch_threads(0)
