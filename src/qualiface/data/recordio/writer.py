"""``RecordIOWriter``: write an InsightFace-layout ``.rec``/``.idx``/``property`` (+ names).

The writer writes to temporary files and renames them on success, so a failure never leaves half
a dataset behind.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qualiface.data.decode import probe_image
from qualiface.data.recordio.format import FLOAT32_EXACT, frame_record, pack_record
from qualiface.data.recordio.layout import IDENTITIES_FILE, PROPERTY_FILE, identity_name_problem
from qualiface.files import create_temp, make_folder


class RecordIOWriter:
    """Write an InsightFace-layout ``.rec``/``.idx``/``property`` (+ ``identities.txt``).

    Add images grouped by identity with non-decreasing labels (the identity block stores one
    contiguous record range per label). Use as a context manager: on success the temporary files
    are renamed into place (a pack without names removes an older ``identities.txt`` there, which
    would otherwise pass for this pack's names), on an exception they are removed::

        with RecordIOWriter("out/train") as writer:
            writer.add(jpeg_bytes, label=0)
    """

    def __init__(self, prefix: str | os.PathLike, *, image_size: tuple[int, int] | None = None,
                 identity_names: Sequence[str] | None = None, identity_block: bool = True,
                 validate_images: bool = True) -> None:
        prefix = Path(prefix)
        self.rec_path, self.idx_path, self.property_path, self.identities_path = (
            self.output_paths(prefix))
        self.image_size = image_size
        self.identity_names = list(identity_names) if identity_names is not None else None
        self.identity_block = identity_block
        self.validate_images = validate_images
        make_folder(self.rec_path.parent, output=self.rec_path)  # one line naming the .rec
        self._temps: list[Path] = []
        self._rec = self._open_temp(self.rec_path, "wb")
        self._idx = self._open_temp(self.idx_path, "w")
        self._labels: list[int] = []
        self._offset = 0
        self._finished = False
        self._next_key = 0
        if identity_block:
            # Placeholder with the final size: patched with the real range on commit.
            self._write(pack_record((0.0, 0.0)), key=0)

    @staticmethod
    def output_paths(prefix: str | os.PathLike) -> tuple[Path, Path, Path, Path]:
        """The files a writer for ``prefix`` creates: ``.rec``, ``.idx``, property, identities."""
        prefix = Path(prefix)
        if prefix.suffix in (".rec", ".idx"):
            prefix = prefix.with_suffix("")
        return (prefix.with_name(prefix.name + ".rec"), prefix.with_name(prefix.name + ".idx"),
                prefix.parent / PROPERTY_FILE, prefix.parent / IDENTITIES_FILE)

    def _open_temp(self, final: Path, mode: str):
        handle, temp = create_temp(final)
        self._temps.append(temp)
        return os.fdopen(handle, mode, **({} if "b" in mode else {"encoding": "utf-8"}))

    def _write(self, payload: bytes, key: int) -> None:
        framed = frame_record(payload)
        self._rec.write(framed)
        self._idx.write(f"{key}\t{self._offset}\n")
        self._offset += len(framed)
        self._next_key = key + 1

    def __len__(self) -> int:
        return len(self._labels)

    def add(self, image: bytes, label: int) -> int:
        """Append one encoded image with its label; returns its record key."""
        if self._finished:
            raise RuntimeError(f"{self.rec_path}: writer already closed")
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0:
            raise ValueError(f"{self.rec_path}: label must be an int >= 0, got {label!r}")
        label = int(label)
        if self._labels and label < self._labels[-1]:
            raise ValueError(f"{self.rec_path}: labels must be added in non-decreasing order "
                             f"(got {label} after {self._labels[-1]}); group images by identity")
        key = self._next_key
        if label >= FLOAT32_EXACT or key >= FLOAT32_EXACT:
            raise ValueError(f"{self.rec_path}: label/record {max(label, key)} exceeds 2**24, "
                             "which float32 headers cannot store exactly")
        name = f"{self.rec_path} record {key}"
        if self.validate_images or self.image_size is None:
            info = probe_image(image, name=name)
            if self.image_size is None:
                self.image_size = (info.height, info.width)
        self._write(pack_record(float(label), image, record_id=key), key=key)
        self._labels.append(label)
        return key

    def commit(self) -> None:
        """Write identity headers, ``property`` (and names), then move every file into place."""
        if self._finished:
            return
        try:
            if not self._labels:
                raise ValueError(f"{self.rec_path}: no images were added")
            num_classes = self._labels[-1] + 1
            if self.identity_names is not None:
                if len(self.identity_names) != num_classes:
                    raise ValueError(f"{self.rec_path}: {len(self.identity_names)} identity "
                                     f"names for {num_classes} classes")
                for name in self.identity_names:
                    # The same rule read_identity_names applies, so every pack reads back.
                    problem = identity_name_problem(name)
                    if problem is not None:
                        raise ValueError(f"{problem}: cannot be stored in {IDENTITIES_FILE}")
            if self.identity_block:
                self._write_identity_block(num_classes)
            self._rec.flush()
            os.fsync(self._rec.fileno())
            self._rec.close()
            self._idx.close()
            height, width = self.image_size  # type: ignore[misc]
            finals = [self.rec_path, self.idx_path, self.property_path]
            with self._open_temp(self.property_path, "w") as out:
                out.write(f"{num_classes},{height},{width}\n")
            if self.identity_names is not None:
                finals.append(self.identities_path)
                with self._open_temp(self.identities_path, "w") as out:
                    out.write("".join(f"{label}\t{name}\n"
                                      for label, name in enumerate(self.identity_names)))
            # Everything is complete on disk before the first rename.
            for temp, final in zip(self._temps, finals):
                os.replace(temp, final)
            if self.identity_names is None:
                # An identities.txt left by an earlier pack at this place would be read as
                # this pack's names (unpack names folders after it): it must go.
                self.identities_path.unlink(missing_ok=True)
            self._finished = True
        except BaseException:
            self.abort()
            raise

    def _write_identity_block(self, num_classes: int) -> None:
        labels = np.asarray(self._labels)
        first_key = 1  # images occupy keys 1..len(labels)
        starts = first_key + np.searchsorted(labels, np.arange(num_classes), side="left")
        ends = first_key + np.searchsorted(labels, np.arange(num_classes), side="right")
        first_identity = self._next_key
        end_identity = first_identity + num_classes
        if end_identity >= FLOAT32_EXACT:
            raise ValueError(f"{self.rec_path}: {end_identity} records exceed 2**24")
        for label in range(num_classes):
            key = first_identity + label
            self._write(pack_record((float(starts[label]), float(ends[label])), record_id=key),
                        key=key)
        record0 = frame_record(pack_record((float(first_identity), float(end_identity))))
        self._rec.seek(0)
        self._rec.write(record0)  # same length as the placeholder: no magic word can appear
        self._rec.seek(0, os.SEEK_END)

    def abort(self) -> None:
        """Drop everything written so far (temporary files are removed)."""
        self._finished = True
        for handle in (self._rec, self._idx):
            if not handle.closed:
                handle.close()
        for temp in self._temps:
            temp.unlink(missing_ok=True)

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def __del__(self) -> None:
        if not getattr(self, "_finished", True):
            self.abort()
