"""Named phases of a meta-iteration, timed where the code declares them.

The meta-learner's parts mark their work with ``with phases("sampling"): ...``; a disabled
:class:`PhaseTimer` (the default) only enters a context manager, an enabled one (what
``agents/profiling.py`` turns on) charges the wall time to the phase. Time is exclusive:
a phase entered inside another is charged to the inner one only (TRPO's line search
re-adapts: that time counts as "inner steps", the rest of each try as "line search"), so
the phases of one iteration add up to its wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

#: Every phase the meta-learner declares, in the order a profile lists them.
PHASES = (
    "sampling",  # env steps with the policy in the loop
    "advantages",  # baseline fits, GAE, the batches' extra fields (old policy, DiCE weights)
    "inner steps",  # every inner gradient step: adaptation and each re-adaptation
    "outer objective",  # outer loss / KL terms and their gradients at the adapted points
    "meta-gradient",  # the estimator's J^T products
    "fisher-vector products",  # TRPO: building the operator and every product of the solve
    "line search",  # TRPO: each try's surrogate and KL (its re-adaptation is inner steps)
    "Adam updates",  # PPO (ProMP): optimiser steps and the KL-penalty rule
)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that wall time is the work's time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Exclusive wall time per phase while ``enabled``; :attr:`spent` maps phase to seconds.

    ``clock`` (default ``time.perf_counter``) is the time source; the device is synchronised
    at every phase boundary when enabled, never when disabled.
    """

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.perf_counter):
        self.device = device
        self.clock = clock
        self.enabled = False
        self.spent: dict[str, float] = {}
        self._stack: list[str] = []
        self._mark = 0.0

    def _switch(self) -> None:
        """Charge the time since the last boundary to the innermost open phase."""
        sync(self.device)
        now = self.clock()
        if self._stack:
            top = self._stack[-1]
            self.spent[top] = self.spent.get(top, 0.0) + now - self._mark
        self._mark = now

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._switch()
        self._stack.append(phase)
        try:
            yield
        finally:
            self._switch()
            self._stack.pop()
