"""Training output: a rich progress bar, ``metrics.jsonl`` and (optionally) TensorBoard.

Only rank 0 writes. Every record is one JSON object per line with at least ``step`` (global
optimizer step), ``phase`` and ``time`` (seconds since the run started; a resumed run counts on
from its checkpoint), so a run can be plotted with a few lines of pandas; the same scalars go to
TensorBoard when it imports. Each line is strict JSON: an undefined value (NaN) is ``null``, an
infinite one the string ``"inf"``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

from rich.progress import Progress

from qualiface.progress import console, make_progress

log = logging.getLogger("qualiface.train")


def training_progress(enabled: bool = True, every: int | None = None) -> Progress:
    """The training bar: loss, accuracy, mean feature norm and images/s next to the ETA (a
    plain line every ``every`` steps when stderr is not a terminal)."""
    return make_progress(
        enabled=enabled,
        every=every,
        unit=None,  # the bar counts optimizer steps; images/s is one of the fields
        extra="loss {task.fields[loss]} acc {task.fields[acc]} norm {task.fields[norm]} {task.fields[ips]} img/s",
    )


def _clean(value):
    """``value`` as strict JSON can hold it: NaN (undefined, e.g. a TAR at a FAR that too few
    impostor pairs reach) becomes ``null``; +/-Inf, a value but not one JSON has, stays visible
    as the string ``"inf"`` / ``"-inf"``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def _scalars(record: dict) -> dict:
    """The entries TensorBoard gets: finite numbers (not bools, not a record's bookkeeping)."""
    return {key: value for key, value in record.items()
            if key not in ("kind", "step", "time") and isinstance(value, (int, float))
            and not isinstance(value, bool) and math.isfinite(value)}


class MetricsLogger:
    """Appends JSON lines to ``out_dir/metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.start = time.time()
        self._writer = None
        # The TensorBoard writer opens at the first scalar, not here: a resume must first tell
        # it from which step on to discard the killed run's events (``resume``), and
        # SummaryWriter takes that ``purge_step`` only when it is created.
        self._open_tensorboard = enabled and tensorboard
        self._purge_step: int | None = None
        self._replay: list[dict] = []  # kept records of the resume step, re-sent after the purge
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")

    def _tensorboard(self):
        """The SummaryWriter (opened on the first call), or None when TensorBoard is off."""
        if self._open_tensorboard:
            self._open_tensorboard = False  # one try: a failure is reported once
            try:
                from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard (~1.2 s), optional at run time (ImportError handled)

                self._writer = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"),
                                             purge_step=self._purge_step)
                for row in self._replay:
                    self._add_scalars(self._writer, row["kind"], row["step"], row)
                self._replay = []
            except Exception as exc:  # tensorboard is optional; metrics.jsonl is the record
                log.info("TensorBoard logging off (%s)", exc)
        return self._writer

    def log(self, step: int, record: dict, *, kind: str = "train") -> None:
        """Write one record (floats/ints/strings) for global optimizer step ``step``."""
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, "time": round(time.time() - self.start, 3)}
        row.update({k: _clean(v) for k, v in record.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if _scalars(record) and (writer := self._tensorboard()) is not None:
            self._add_scalars(writer, kind, step, record)

    @staticmethod
    def _add_scalars(writer, kind: str, step: int, record: dict) -> None:
        for key, value in _scalars(record).items():
            writer.add_scalar(f"{kind}/{key}", value, step)

    def elapsed(self) -> float:
        """Seconds on the clock of the ``time`` field (a checkpoint records it, ``resume``)."""
        return time.time() - self.start

    def offset(self) -> int:
        """Bytes of ``metrics.jsonl`` written so far (0 when disabled): a checkpoint records it so
        that a resume from that checkpoint can drop what was logged after it (``rewind``)."""
        if not self.enabled:
            return 0
        self._file.flush()
        return os.fstat(self._file.fileno()).st_size  # append mode: every write lands at the end

    def rewind(self, offset: int) -> None:
        """Cut ``metrics.jsonl`` back to its first ``offset`` bytes: the records written after
        the checkpoint a run resumes from, whose steps it is about to redo (kept, they would be
        logged twice; a record torn by the kill goes too). A file already shorter is left as is."""
        if not self.enabled:
            return
        self._file.flush()
        if 0 <= offset < os.fstat(self._file.fileno()).st_size:
            self._file.truncate(offset)

    def resume(self, offset: int | None, *, step: int, elapsed: float | None) -> None:
        """Go on with the log of a run resumed from its checkpoint at global step ``step``
        (``step`` -1: no checkpoint, everything is redone). The records written after the
        checkpoint go (``rewind(offset)``; None, a checkpoint older than ``metrics_offset``:
        all kept), TensorBoard discards its events after ``step`` (else the redone steps would
        show twice), and the ``time`` field goes on from ``elapsed`` seconds instead of 0 (None,
        a checkpoint from before it was stored: from the last record's ``time``)."""
        if not self.enabled:
            return
        if offset is not None:
            self.rewind(offset)
        # TensorBoard purges whole steps, and the checkpoint's own step holds records from both
        # sides of it: the train record logged before the save (kept), and the final validation
        # logged after it (redone). Purge from that step and re-send the kept ones.
        self._purge_step = max(step, 0)
        self._replay = [row for row in self._tail_records() if row.get("step") == step] if step >= 0 else []
        if self._writer is not None:  # already open: reopen it, the purge is set on creation
            self._writer.close()
            self._writer, self._open_tensorboard = None, True
        if elapsed is None:
            elapsed = self._last_time()
        self.start = time.time() - elapsed

    def _tail_records(self) -> list[dict]:
        """The whole records among the last 64 KiB of ``metrics.jsonl`` (a record is < 1 KiB),
        in file order; a line torn by a kill or cut by the seek is skipped."""
        self._file.flush()
        with self.path.open("rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 65536))
            lines = handle.read().splitlines()
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def _last_time(self) -> float:
        """The ``time`` of the last whole record in ``metrics.jsonl``; 0.0 when there is none."""
        for row in reversed(self._tail_records()):
            value = row.get("time")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        return 0.0

    def note(self, step: int, message: str) -> None:
        """A human-readable event (also printed): skipped steps, phase changes, filtering."""
        console.print(f"[dim]step {step}:[/] {message}")
        self.log(step, {"message": message}, kind="event")

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a ``metrics.jsonl`` file."""
    with Path(path).open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


class Throughput:
    """Training images per second over the window since the last ``rate()`` (or since
    creation), not counting the time spent ``paused``."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.images = 0

    def add(self, images: int) -> None:
        self.images += images

    @contextlib.contextmanager
    def paused(self):
        """Leave the time spent inside (validation, checkpoints) out of the window: it is no
        training, and counted in it understated the images/s of the next record."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - start

    def rate(self) -> float:
        """The window's images/s (time spent ``paused`` left out); starts the next window."""
        elapsed = time.perf_counter() - self.start
        rate = self.images / elapsed if elapsed > 0 else 0.0
        self.start, self.images = time.perf_counter(), 0
        return rate
