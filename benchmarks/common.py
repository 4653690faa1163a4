"""Pieces every benchmark harness uses: the report's environment line and tables, the
chunk-size flag, and one timed call on a CUDA device."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from binom_rl.runtime import peak_memory_mb


def environment_line(device: str) -> str:
    """Torch version and the device (GPU name, or CPU cores), for a report's header."""
    if device.startswith("cuda") and torch.cuda.is_available():
        where = torch.cuda.get_device_name(torch.device(device))
    else:
        where = f"CPU ({os.cpu_count()} logical cores)"
    return f"torch {torch.__version__}, {where}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def parse_chunk_size(text: str) -> int | None:
    """A ``--chunk-sizes`` entry: an int, or ``none`` for all at once."""
    return None if text.lower() == "none" else int(text)


def given_flags(values: dict[str, Any]) -> dict[str, Any]:
    """The optional flags given on the command line (not None), lists as tuples: overrides
    for an options dataclass, whose sequence fields are tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v is not None}


def timed_cuda_call(call: Callable[[], Any], device: str) -> tuple[float, float, Any]:
    """Seconds of one ``call()`` on a CUDA ``device`` (CUDA events), its peak memory growth
    in MiB (``max_memory_allocated`` during the call minus ``memory_allocated`` before it),
    and its result."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base_mb = torch.cuda.memory_allocated(device) / 2**20
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    result = call()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1000, peak_memory_mb(device) - base_mb, result
