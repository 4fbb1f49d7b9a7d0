"""``RecordIODataset`` (registered as ``recordio`` and ``rec``): an InsightFace ``.rec`` read by
random access through its ``.idx``.

InsightFace training layout: record 0 holds no image; its header has ``flag = 2`` and labels
``(first_identity_record, end_record)``. Records ``1 .. first_identity_record - 1`` are the
images; records ``first_identity_record .. end_record - 1`` are one header per identity (in
label order) with labels ``(first_image_record, end_image_record)`` of that identity. Datasets
without this block (record 0 is an ordinary image) are read as a flat list of images.

The dataset opens the ``.rec`` lazily and re-opens it when the process id changes, so one
instance can be handed to DataLoader workers (fork or spawn).
"""

from __future__ import annotations

import hashlib
import logging
import math
import mmap
import os

import numpy as np
import torch

from qualiface.data import DATASETS
from qualiface.data.decode import DEFAULT_MAX_PIXELS, decode_image
from qualiface.data.recordio.format import (
    FLOAT32_EXACT,
    IRHeader,
    RecordIOError,
    map_file,
    read_frame,
    unpack_record,
)
from qualiface.data.recordio.index import read_index
from qualiface.data.recordio.layout import read_property, resolve_paths

#: Classes a dataset may have beyond its image count (sparse labels); see _check_num_classes.
MAX_CLASSES_WITHOUT_IMAGES = 1 << 16

logger = logging.getLogger(__name__)


def _integral_label(value: float, limit: int | None) -> int | None:
    if not math.isfinite(value) or value != int(value) or value < 0:
        return None
    label = int(value)
    if limit is not None and label >= limit:
        return None
    return label


@DATASETS.register("recordio", "rec")
class RecordIODataset(torch.utils.data.Dataset):
    """InsightFace ``.rec`` -> ``(uint8 (3, H, W) RGB, int label)`` with random access via ``.idx``.

    ``path``: the folder, the prefix (``dir/train``) or the ``.rec`` / ``.idx`` path.
    ``num_classes``: from ``property`` (which must agree with the identity block when both
    exist), else the identity block, else a scan of all headers.
    ``meta(i)``: ``{"record": key, "id": header id, "offset": byte offset, "path": rec}``.
    """

    def __init__(self, path: str | os.PathLike, *,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.rec_path, self.idx_path, self.property_path = resolve_paths(path)
        self.max_pixels = max_pixels
        self._rec_size = self.rec_path.stat().st_size
        keys, offsets = read_index(self.idx_path, self._rec_size)
        # Where the next indexed record starts, for the overlap check in ``_record``.
        self._sorted_offsets = np.sort(offsets)
        self._buffer: mmap.mmap | bytes | None = None
        self._pid: int | None = None
        self.identity_block: tuple[int, int] | None = None
        self._image_keys, self._image_offsets = keys, offsets
        if keys[0] == 0:
            header, image = self._record(int(offsets[0]))
            if header.flag >= 2 and not image:
                self._use_identity_block(header, keys, offsets)
        if len(self._image_keys) == 0:
            raise RecordIOError(self.rec_path, None, "no image records")
        prop = read_property(self.property_path)
        self.image_size: tuple[int, int] | None = (prop[1], prop[2]) if prop else None
        if prop is not None:
            self._num_classes = prop[0]
        elif self.identity_block is not None:
            self._num_classes = self.identity_block[1] - self.identity_block[0]
        else:
            self._num_classes = self._scan_num_classes()
        self._check_num_classes(prop is not None)
        if prop is not None and self.identity_block is not None:
            self._check_property_matches_block(prop[0])

    def _check_property_matches_block(self, num_classes: int) -> None:
        """Refuse a ``property`` whose class count differs from record 0's identity range.

        Both come from the same pack, so a mismatch means one of them belongs to another pack
        (a stale ``property`` left in the folder, say). The head would then be sized for the
        wrong number of identities, or labels past ``property``'s count would fail mid-epoch.
        """
        first, end = self.identity_block
        if num_classes != end - first:
            raise RecordIOError(self.property_path, None,
                                f"'property' says {num_classes} classes but record 0 of "
                                f"{self.rec_path} lists {end - first} identities (records "
                                f"{first}..{end - 1}); the two do not describe the same pack")

    def _check_num_classes(self, from_property: bool) -> None:
        """Refuse a class count the records cannot back (the head allocates one row per class).

        A real set has at least one image per class; sparse labels (a filtered subset keeping
        its original labels) are allowed up to ``MAX_CLASSES_WITHOUT_IMAGES`` classes, which a
        head holds in a few hundred MB at most. Beyond both, the count is a corrupt or hostile
        header, not a dataset: ``property`` 1e12 or one label 3e9 asked for terabytes.
        """
        limit = max(len(self), MAX_CLASSES_WITHOUT_IMAGES)
        if self._num_classes <= limit:
            return
        source = (self.property_path if from_property
                  else self.rec_path if self.identity_block is None else self.idx_path)
        what = ("'property' says" if from_property
                else "the identity block of record 0 spans" if self.identity_block is not None
                else "the largest label implies")
        raise RecordIOError(source, None, f"{what} {self._num_classes} classes, but the .rec holds "
                                          f"only {len(self)} images; more classes than images "
                                          f"is accepted up to {MAX_CLASSES_WITHOUT_IMAGES} only "
                                          "(a corrupt header?)")

    def _use_identity_block(self, header: IRHeader, keys: np.ndarray, offsets: np.ndarray
                            ) -> None:
        first, end = header.labels[0], header.labels[1]
        # Record numbers: whole, and at least one identity (int() would truncate 2.5 to 2, and
        # an empty range left every label out of range, reported only when read).
        if not (math.isfinite(first) and math.isfinite(end) and 1 <= first < end
                and first == int(first) and end == int(end)):
            raise RecordIOError(self.rec_path, int(offsets[0]), f"record 0 has an invalid "
                                                                f"identity range {first}, {end}")
        first, end = int(first), int(end)
        is_image = (keys >= 1) & (keys < first)
        if int(is_image.sum()) != first - 1:
            raise RecordIOError(self.idx_path, None, f"record 0 says records 1..{first - 1} "
                                                     f"are images but the index lists "
                                                     f"{int(is_image.sum())} of them")
        # Every identity header must be indexed: this also bounds the class count (end - first)
        # by the records that exist, so a corrupt record 0 cannot ask for terabytes.
        headers = int(((keys >= first) & (keys < end)).sum())
        if headers != end - first:
            raise RecordIOError(self.idx_path, None, f"record 0 says records {first}..{end - 1} "
                                                     f"are identity headers but the index lists "
                                                     f"{headers} of them")
        # Records past the block are neither images nor identity headers: nothing reads them,
        # so a pack with images appended after its block would silently train without them.
        beyond = keys[keys >= end]
        if beyond.size:
            logger.warning("%s: ignoring %d record(s) after the identity block (keys %d..%d): "
                           "record 0 says the identity headers end at record %d", self.rec_path,
                           beyond.size, int(beyond[0]), int(beyond[-1]), end - 1)
        self.identity_block = (first, end)
        self._all_keys, self._all_offsets = keys, offsets
        self._image_keys, self._image_offsets = keys[is_image], offsets[is_image]

    def _scan_num_classes(self) -> int:
        largest = -1
        for i in range(len(self)):
            offset = int(self._image_offsets[i])
            label = self._record(offset)[0].label
            checked = _integral_label(label, None)
            if checked is None:
                raise RecordIOError(self.rec_path, offset, f"label {label} is not an int >= 0")
            if checked >= FLOAT32_EXACT:  # float32 headers cannot store it exactly: corrupt
                raise RecordIOError(self.rec_path, offset, f"label {label:.0f} is not below "
                                                           f"2**24 (float32 labels are exact "
                                                           "only up to there)")
            largest = max(largest, checked)
        return largest + 1

    # Lazily (re)open per process: a memory map inherited through fork is shared state, and
    # one created under spawn does not exist yet, so each worker maps the file itself.
    def _data(self) -> mmap.mmap | bytes:
        pid = os.getpid()
        if self._buffer is None or self._pid != pid:
            self._buffer = map_file(self.rec_path)
            self._pid = pid
            if len(self._buffer) < self._rec_size:
                raise RecordIOError(self.rec_path, len(self._buffer), "file shrank after the "
                                                                      "index was read")
        return self._buffer

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_buffer"] = None
        state["_pid"] = None
        return state

    def _record(self, offset: int) -> tuple[IRHeader, bytes]:
        payload, following = read_frame(self._data(), offset, source=str(self.rec_path))
        # A record must end where the next indexed one starts (or before): otherwise the index
        # points into the middle of this record and the same bytes would be read twice.
        position = int(np.searchsorted(self._sorted_offsets, offset, side="right"))
        if position < len(self._sorted_offsets) and following > self._sorted_offsets[position]:
            raise RecordIOError(self.idx_path, None, f"the record at byte {offset} runs to byte "
                                                     f"{following}, past the indexed record at "
                                                     f"byte {int(self._sorted_offsets[position])} "
                                                     f"(overlapping records)")
        return unpack_record(payload, source=str(self.rec_path), offset=offset)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def __len__(self) -> int:
        return len(self._image_keys)

    def record_key(self, index: int) -> int:
        """The ``.idx`` key (record number) of image ``index``."""
        return int(self._image_keys[index])

    def read_raw(self, index: int) -> tuple[bytes, int, IRHeader]:
        """Image ``index`` without decoding: ``(encoded bytes, label, header)``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        offset = int(self._image_offsets[index])
        header, image = self._record(offset)
        label = _integral_label(header.label, self._num_classes)
        if label is None:
            raise RecordIOError(self.rec_path, offset, f"label {header.label} out of range "
                                                       f"[0, {self._num_classes})")
        return image, label, header

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label, _ = self.read_raw(index)
        offset = int(self._image_offsets[index])
        name = f"{self.rec_path} record {int(self._image_keys[index])} (byte {offset})"
        return decode_image(image, name=name, max_pixels=self.max_pixels), label

    def fingerprint(self) -> str:
        """sha256 of the ``.rec`` size, the class count and every image record's key and
        offset: another pack (or the same one repacked) gives another value, without reading
        the images. A resume checks it (``train.data.data_fingerprint``)."""
        digest = hashlib.sha256(f"{self._rec_size}\t{self._num_classes}\n".encode())
        digest.update(np.ascontiguousarray(self._image_keys, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(self._image_offsets, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def meta(self, index: int) -> dict:
        offset = int(self._image_offsets[index])
        header, _ = self._record(offset)
        return {"record": int(self._image_keys[index]), "id": header.id, "offset": offset,
                "path": str(self.rec_path)}

    def identity_ranges(self) -> np.ndarray | None:
        """(num_identities, 2) int64 ``[first_record, end_record)`` per label, or None."""
        if self.identity_block is None:
            return None
        first, end = self.identity_block
        position = np.searchsorted(self._all_keys, np.arange(first, end))
        ranges = np.zeros((end - first, 2), dtype=np.int64)
        for row, pos in enumerate(position):
            key = first + row
            if pos >= len(self._all_keys) or self._all_keys[pos] != key:
                raise RecordIOError(self.idx_path, None, f"identity record {key} is missing")
            offset = int(self._all_offsets[pos])
            header, _ = self._record(offset)
            if header.flag < 2:
                raise RecordIOError(self.rec_path, offset, f"record {key} is not an identity "
                                                           "header")
            ranges[row] = (int(header.labels[0]), int(header.labels[1]))
        return ranges
