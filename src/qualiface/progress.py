"""The one progress-bar factory: count, percentage, rate, elapsed time and ETA, on stderr.

Every long-running piece (training, decoding a dataset into memory, feature extraction,
packing a RecordIO file, embedding, alignment) uses this, so all bars look and behave alike.

When stderr is not a terminal (a log file, CI, ``nohup``, a pipe), rich would draw the bar only
once, at the end; there the factory returns a ``LineProgress`` instead, which writes the same
columns as one plain line every ``every`` items (every ``LINE_INTERVAL_S`` seconds when no
``every`` is given) and once more when a task completes or the progress ends.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

# soft_wrap: long paths are printed on one line (wrapping them breaks copy-paste).
console = Console(stderr=True, soft_wrap=True)


class RateColumn(ProgressColumn):
    """Items per second, from rich's own speed estimate (``unit`` names the items)."""

    def __init__(self, unit: str = "img") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        shown = f"{speed:,.1f}" if speed and speed < 100 else f"{speed:,.0f}" if speed else "-"
        return Text(f"{shown} {self.unit}/s", style="progress.data.speed")


#: Seconds between two lines of a ``LineProgress`` that has no ``every``.
LINE_INTERVAL_S = 10.0


class LineProgress(Progress):
    """A ``Progress`` without a live display that logs plain lines (for a non-terminal stderr).

    A task gets a line when its count crosses a multiple of ``every`` (or, without ``every``,
    when ``LINE_INTERVAL_S`` seconds passed since its last line), when it completes, and at
    ``stop()`` when it moved since its last line. A line is the bar's columns as text, bar left
    out: ``train 150/600 25% 0:00:41 ETA 0:02:03 loss 12.301 ...``.
    """

    def __init__(self, *columns, every: int | None = None, **kwargs) -> None:
        super().__init__(*columns, disable=True, **kwargs)
        if every is not None and every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self._last_line: dict[TaskID, tuple[float, float]] = {}  # task -> (completed, time)

    def add_task(self, *args, **kwargs) -> TaskID:
        task_id = super().add_task(*args, **kwargs)
        self._last_line[task_id] = (self._task(task_id).completed, self.get_time())
        return task_id

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._maybe_line(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_line(task_id)

    def stop(self) -> None:
        for task in self.tasks:
            if task.completed != self._last_line[task.id][0]:
                self._print_line(task)
        super().stop()

    def line(self, task_id: TaskID) -> str:
        """The task's state as one line of text."""
        task = self._task(task_id)
        parts = (column.render(task) for column in self.columns if not isinstance(column, BarColumn))
        return " ".join(part.plain if isinstance(part, Text) else str(part) for part in parts)

    def _task(self, task_id: TaskID):
        return next(task for task in self.tasks if task.id == task_id)

    def _maybe_line(self, task_id: TaskID) -> None:
        task = self._task(task_id)
        last_completed, last_time = self._last_line[task_id]
        if task.completed < last_completed:  # restarted (the next training phase): count anew
            self._last_line[task_id] = (task.completed, self.get_time())
            return
        if task.completed == last_completed:
            return
        if self.every is not None:
            due = task.completed // self.every > last_completed // self.every
        else:
            due = self.get_time() - last_time >= LINE_INTERVAL_S
        if due or task.finished:
            self._print_line(task)

    def _print_line(self, task) -> None:
        self._last_line[task.id] = (task.completed, self.get_time())
        self.console.print(self.line(task.id), markup=False, highlight=False)


def make_progress(*, enabled: bool = True, extra: str = "", unit: str | None = "img",
                  every: int | None = None) -> Progress:
    """A progress bar; ``extra`` is a format string of task fields shown after the ETA, and
    ``unit`` names what is counted for the rate column (None hides the rate).

    On a stderr that is not a terminal, a ``LineProgress`` with the same columns: a plain
    line every ``every`` counted items (every ``LINE_INTERVAL_S`` seconds when None)."""
    columns: list = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
    ]
    if unit:
        columns.append(RateColumn(unit))
    columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    if extra:
        columns.append(TextColumn(extra))
    if enabled and not (console.is_terminal or console.is_jupyter):
        return LineProgress(*columns, console=console, every=every)
    return Progress(*columns, console=console, disable=not enabled, transient=False)
