"""Crash-safe JSON-lines files for long runs: each row is on disk before the next starts, and a
killed run's half-written last line is ignored when read and cut before new rows are appended."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO


def read_rows(path: Path) -> list[dict]:
    """The finished lines of a JSON-lines file (none when it does not exist)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line
    return rows


def drop_torn_tail(path: Path) -> None:
    """Cut a half-written last line (a killed run), so new lines are not appended onto it."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        partial = path.with_suffix(".partial")
        partial.write_bytes(data[: data.rfind(b"\n") + 1])
        partial.replace(path)  # atomic: the file is whole before and after


def append_row(handle: IO[str], row: dict) -> None:
    handle.write(json.dumps(row) + "\n")
    handle.flush()
    os.fsync(handle.fileno())  # on disk before the next one starts
