"""The progress of long runs (evaluation, benchmarks): done / total, elapsed and an ETA, on stderr.

On a terminal it is a live bar. Where stderr is a log file or CI's capture, a live bar would show
nothing until the end, so each finished step prints one plain line instead.

The ETA is the run's mean pace so far times the steps left. Rich's own estimate looks at the last 30
seconds only, which for steps of minutes (a RULER sample on a CPU) is one step or none.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text


def _duration(seconds: float | None) -> str:
    return "?" if seconds is None else str(timedelta(seconds=round(seconds)))


def time_left(task: Task) -> float | None:
    """Seconds left at the run's mean pace so far; None before the first step is done."""
    if not task.completed or task.elapsed is None or task.total is None:
        return None
    return task.elapsed / task.completed * max(task.total - task.completed, 0)


class _TimeLeftColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(_duration(time_left(task)), style="progress.remaining")


class _LineProgress(Progress):
    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        task = self._tasks[task_id]
        self.console.print(f"{task.completed:g}/{task.total:g} {task.description} | elapsed {_duration(task.elapsed)}"
                           f" | eta {_duration(time_left(task))}", markup=False, highlight=False,
                           soft_wrap=True)  # one line however long: a log is read line by line


def progress_bar(get_time: Callable[[], float] | None = None) -> Progress:
    """A live bar on a terminal, else one line per finished step; `get_time`: the clock (tests)."""
    console = Console(stderr=True)
    if console.is_terminal:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("eta"), _TimeLeftColumn(), console=console, get_time=get_time)
    return _LineProgress(console=console, disable=True, get_time=get_time)
