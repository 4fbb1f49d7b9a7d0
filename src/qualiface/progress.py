"""The one progress-bar factory: count, percentage, rate, elapsed time and ETA, on stderr.

Every long-running piece (training, decoding a dataset into memory, feature extraction,
packing a RecordIO file, embedding, alignment) uses this, so all bars look and behave alike.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
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


def make_progress(*, enabled: bool = True, extra: str = "", unit: str | None = "img") -> Progress:
    """A progress bar; ``extra`` is a format string of task fields shown after the ETA, and
    ``unit`` names what is counted for the rate column (None hides the rate)."""
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
    return Progress(*columns, console=console, disable=not enabled, transient=False)
