"""What a test compares to show that a call left a folder's files alone."""

from __future__ import annotations

from pathlib import Path


def listing(folder: Path) -> dict[str, int]:
    """Each file's name and modification time (ns): equal listings, nothing written."""
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
