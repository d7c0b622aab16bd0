"""The progress of long runs (evaluation, benchmarks): done / total, elapsed and an ETA, on stderr.

On a terminal it is a live bar. Where stderr is a log file or CI's capture, a live bar would show
nothing until the end, so each finished step prints one plain line instead.
"""

from __future__ import annotations

from datetime import timedelta

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _duration(seconds: float | None) -> str:
    return "?" if seconds is None else str(timedelta(seconds=round(seconds)))


class _LineProgress(Progress):
    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        task = self._tasks[task_id]
        self.console.print(f"{task.completed:g}/{task.total:g} {task.description} | elapsed {_duration(task.elapsed)}"
                           f" | eta {_duration(task.time_remaining)}", markup=False, highlight=False)


def progress_bar() -> Progress:
    console = Console(stderr=True)
    if console.is_terminal:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("eta"), TimeRemainingColumn(), console=console)
    return _LineProgress(console=console, disable=True)
