"""Progress that reaches a log file too.

On a terminal, rich's live progress bar. When output goes to a file or pipe (``nohup``,
SLURM, ``> log``), rich draws nothing until the bar stops, so a long job's log stayed
empty; there, ``Progress`` writes one plain line per task every ``DPL_LOG_EVERY`` seconds
(default 30) and when the task finishes, flushed at once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

from rich import progress as rich_progress
from rich.console import Console

T = TypeVar("T")
LOG_EVERY_ENV = "DPL_LOG_EVERY"


def log_every() -> float:
    """Seconds between two log lines of one task (``DPL_LOG_EVERY``, default 10)."""
    try:
        return max(0.0, float(os.environ.get(LOG_EVERY_ENV, "10")))
    except ValueError:
        return 10.0


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class Progress(rich_progress.Progress):
    """``rich.progress.Progress`` that, off a terminal, logs plain progress lines."""

    def __init__(self, *columns: Any, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self._logging = not self.console.is_terminal and not self.disable
        self._logged: dict[Any, float] = {}
        self._every = log_every()

    def _log_line(self, task_id: Any, final: bool = False) -> None:
        task = self._tasks[task_id]
        now = time.monotonic()
        if not final and now - self._logged.get(task_id, -1e9) < self._every:
            return
        if final and self._logged.get(task_id) == float("inf"):
            return
        self._logged[task_id] = float("inf") if final else now
        done = f"{task.completed:g}" + (f"/{task.total:g}" if task.total else "")
        share = f" ({task.percentage:.0f}%)" if task.total else ""
        fields = "  ".join(
            str(v) if k == "status" else f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in task.fields.items()
        )
        elapsed = _clock(task.finished_time if task.finished else task.elapsed or 0.0)
        text = f"{task.description} {done}{share}  {fields}  elapsed {elapsed}".rstrip()
        file = self.console.file
        file.write(text.replace("[bold]", "").replace("[/]", "") + "\n")
        file.flush()

    def add_task(self, *args: Any, **kwargs: Any) -> Any:
        task_id = super().add_task(*args, **kwargs)
        if self._logging:
            self._logged[task_id] = time.monotonic()  # first line after one interval
        return task_id

    def update(self, task_id: Any, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        if self._logging:
            task = self._tasks[task_id]
            self._log_line(task_id, final=bool(task.total) and task.completed >= task.total)

    def advance(self, task_id: Any, advance: float = 1) -> None:
        super().advance(task_id, advance)
        if self._logging:
            task = self._tasks[task_id]
            self._log_line(task_id, final=bool(task.total) and task.completed >= task.total)


def track(
    sequence: Iterable[T],
    description: str = "working",
    total: float | None = None,
    console: Console | None = None,
    transient: bool = False,
) -> Iterator[T]:
    """``rich.progress.track`` on this module's ``Progress`` (logged off a terminal)."""
    if total is None and isinstance(sequence, Sequence):
        total = len(sequence)
    columns = Progress.get_default_columns()
    with Progress(*columns, console=console, transient=transient) as bar:
        task = bar.add_task(description, total=total)
        for item in sequence:
            yield item
            bar.advance(task)
