"""Crash-safe files for long runs: each JSON line is on disk before the next starts, a killed run's
half-written last line is ignored when read and cut before new rows are appended, one run at a time
writes to a folder, and a failure to write says what was kept."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import ConfigError

try:
    import fcntl
except ImportError:  # not a POSIX system: runs into one folder are not guarded
    fcntl = None

LOCK = ".draftkv.lock"


def read_rows(path: Path) -> list[dict]:
    """The finished rows of a JSON-lines file (none when it does not exist); a line that is not a JSON
    object (a torn last line, bytes that are not UTF-8) is left out."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_bytes().splitlines():
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(row, dict):
            rows.append(row)
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


@contextlib.contextmanager
def writing(what: str, kept: str) -> Iterator[None]:
    """A failure to write `what` (a full disk, a folder turned read-only) becomes an error that says so
    and what was kept."""
    try:
        yield
    except OSError as error:
        raise ConfigError(f"cannot write {what} ({error.strerror or error}); {kept}") from None


@contextlib.contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """This process alone writes into `folder` while the block runs; another run into it is refused with
    who holds it (the lock goes with the process, so a killed run leaves none behind)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a+", encoding="utf-8") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise ConfigError(f"another run is writing to {folder} ({holder}); wait for it to finish, or give "
                                  "another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)


def check_free(folder: Path) -> None:
    """Refuse now, before any model loads, a folder another run is writing to."""
    if (folder / LOCK).exists():
        with exclusive(folder):
            pass
