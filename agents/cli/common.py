"""What the commands share: their flags for threads and tracebacks, and how a command ends.

Bad input (:class:`~binom_rl.config.ConfigError`, raised before any work is done) ends a
command with one ``error:`` line and exit code 2. Any other failure ends it with one
``error:`` line and exit code 1; its traceback is printed with ``--verbose`` and written
to ``error.log`` in the command's folder when it has one. Ctrl-C (exit code 130) and
SIGTERM (143: what a cluster scheduler sends before it kills a job, or ``kill PID``) both
unwind the command: sampler workers are closed, TensorBoard events flushed, and the last
checkpoint, written atomically, is kept.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from binom_rl.config import ConfigError

ERROR_LOG = "error.log"


def add_common_flags(parser: argparse.ArgumentParser, *, torch_threads: bool = False) -> None:
    """``--verbose`` and, if asked, ``--torch-threads``."""
    parser.add_argument(
        "--verbose", action="store_true", help="print the traceback when the command fails"
    )
    if torch_threads:
        parser.add_argument(
            "--torch-threads",
            type=int,
            default=None,
            help="torch intra-op threads (default: torch's own choice)",
        )


def set_torch_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)``; None leaves torch's choice. ConfigError if < 1."""
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"--torch-threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM while a command runs. A KeyboardInterrupt, so that
    every cleanup written for Ctrl-C (sampler workers, Ray, event writers) runs for it too."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def run_command(
    work: Callable[[], int],
    *,
    verbose: bool,
    log_folder: str | os.PathLike | None = None,
    failure_note: Callable[[], str] | None = None,
) -> int:
    """``work()``'s exit code, or the exit code of what it raised (see the module docstring).

    ``failure_note()`` is appended to the error line of a failure (e.g. that the last good
    checkpoint is kept); ``log_folder``, where it exists, gets the traceback in ERROR_LOG.
    """
    # Python's default for SIGTERM is to die at once, skipping every finally; signal handlers
    # can only be set from the main thread (a command called from another keeps the default).
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return work()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        note = failure_note() if failure_note else ""
        if isinstance(err, Terminated):
            print(f"error: terminated (SIGTERM){note}", file=sys.stderr)
            return 128 + signal.SIGTERM
        print(f"error: interrupted{note}", file=sys.stderr)
        return 130
    except Exception as err:
        text = traceback.format_exc()
        where = " (--verbose prints the traceback)"
        if log_folder is not None and Path(log_folder).is_dir():
            path = Path(log_folder) / ERROR_LOG
            path.write_text(text)
            where = f" (traceback in {path})"
        if verbose:
            print(text, file=sys.stderr, end="")
        note = failure_note() if failure_note else ""
        print(f"error: {_one_line(err)}{note}{where}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:  # None: a handler set outside Python, left as it is
            signal.signal(signal.SIGTERM, previous)


def _one_line(err: Exception) -> str:
    """The exception's message on one line. A RuntimeError's message is written for the user
    (a sampler worker died, a NaN appeared); any other exception is most likely a bug, and
    its type says as much as its message. A message of several lines (a worker's own
    traceback) keeps its first and last."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}" if lines else ""
    if isinstance(err, RuntimeError) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
