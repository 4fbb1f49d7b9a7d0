"""The ``.idx`` file of a RecordIO dataset: ``key<TAB>byte offset`` lines for random access.

``read_index`` parses and validates one (a hostile or broken index must not turn one record into
many); ``rebuild_index`` writes it again from a scan of the ``.rec``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qualiface.data.recordio.format import FRAME_HEADER_SIZE, RecordIOError, iter_records
from qualiface.files import write_text_atomic


def read_index(idx_path: str | os.PathLike, rec_size: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Parse a ``.idx`` file -> ``(keys, offsets)`` int64 arrays sorted by key.

    Checks every line is ``int<TAB>int``, keys are unique and >= 0, offsets lie inside the
    ``.rec`` (``0 <= offset < rec_size`` when ``rec_size`` is given), and no two keys share an
    offset or start closer than one record header.
    """
    idx_path = Path(idx_path)
    if not idx_path.is_file():
        raise RecordIOError(idx_path, None, "index file not found (random access needs the "
                                            ".idx next to the .rec; rebuild it with "
                                            "qualiface.data.recordio.rebuild_index)")
    try:
        text = idx_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordIOError(idx_path, exc.start, "index is not text") from None
    keys: list[int] = []
    offsets: list[int] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 2:
                raise ValueError
            key, offset = int(fields[0]), int(fields[1])
        except ValueError:
            raise RecordIOError(idx_path, None, f"line {line_number}: expected "
                                                f"'key<TAB>offset', got {line[:80]!r}") from None
        if key < 0 or offset < 0:
            raise RecordIOError(idx_path, None, f"line {line_number}: negative key or offset")
        if rec_size is not None and offset >= rec_size:
            raise RecordIOError(idx_path, None, f"line {line_number}: offset {offset} is past "
                                                f"the end of the .rec ({rec_size} bytes)")
        keys.append(key)
        offsets.append(offset)
    if not keys:
        raise RecordIOError(idx_path, None, "index has no records")
    key_array = np.asarray(keys, dtype=np.int64)
    offset_array = np.asarray(offsets, dtype=np.int64)
    order = np.argsort(key_array, kind="stable")
    key_array, offset_array = key_array[order], offset_array[order]
    duplicate = np.flatnonzero(key_array[1:] == key_array[:-1])
    if duplicate.size:
        raise RecordIOError(idx_path, None, f"key {key_array[duplicate[0]]} appears twice")
    _check_offsets_distinct(idx_path, key_array, offset_array)
    return key_array, offset_array


def _check_offsets_distinct(idx_path: Path, keys: np.ndarray, offsets: np.ndarray) -> None:
    """Refuse two keys at one offset, or offsets closer than one frame header.

    Either way two "records" would read the same bytes: a hostile or broken index could turn one
    image into many (silently duplicated training samples). Records that start far enough apart
    but still overlap are caught on read, where the frame's true length is known (see
    ``RecordIODataset._record``).
    """
    order = np.argsort(offsets, kind="stable")
    gaps = np.diff(offsets[order])
    close = np.flatnonzero(gaps < FRAME_HEADER_SIZE)
    if not close.size:
        return
    first, second = order[close[0]], order[close[0] + 1]
    key_a, key_b = int(keys[first]), int(keys[second])
    offset_a, offset_b = int(offsets[first]), int(offsets[second])
    if offset_a == offset_b:
        reason = f"keys {key_a} and {key_b} share byte offset {offset_a} (one record listed twice)"
    else:
        reason = (f"keys {key_a} and {key_b} start at bytes {offset_a} and {offset_b}, closer "
                  f"than one {FRAME_HEADER_SIZE}-byte record header (overlapping records)")
    raise RecordIOError(idx_path, None, reason)


def rebuild_index(rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None
                  ) -> Path:
    """Scan a ``.rec`` and write its ``.idx`` (keys = record order, as mxnet writes them)."""
    rec_path = Path(rec_path)
    idx_path = Path(idx_path) if idx_path is not None else rec_path.with_suffix(".idx")
    lines = [f"{key}\t{offset}\n" for key, (offset, _) in enumerate(iter_records(rec_path))]
    write_text_atomic(idx_path, "".join(lines))
    return idx_path
