"""IJB-B / IJB-C protocol files in the InsightFace release layout.

``<root>/<NAME>/`` (or ``<root>`` itself when it is that folder) holds::

    loose_crop/<image>                        face crops, aligned later with the 5 points
    meta/<name>_face_tid_mid.txt              "<image> <template id> <media id>" per image
    meta/<name>_name_5pts_score.txt           "<image> x1 y1 ... x5 y5 <detector score>"
    meta/<name>_template_pair_label.txt       "<template 1> <template 2> <label 0/1>"
    meta/<name>_1N_gallery_G1.csv, _G2.csv    1:N galleries (IJB-B: _S1.csv, _S2.csv)
    meta/<name>_1N_probe_mixed.csv            1:N probes

where ``<name>`` is the lower-cased name (``ijbc``). The CSVs have a header naming at least
``TEMPLATE_ID`` and ``SUBJECT_ID`` (and ``FILENAME``); only the template -> subject mapping is
used, the template features come from the 1:1 image list as in the reference protocol.

The pair file of IJB-C has 15.7 M lines, so it is parsed with a vectorised integer reader
(chunks of bytes -> digits -> numbers with ``np.add.reduceat``), a few seconds instead of the
minute ``np.loadtxt`` takes. Malformed lines raise ``IJBFormatError`` naming file and line.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qualiface.data.decode import DataError

if TYPE_CHECKING:
    from qualiface.data.alignment import LandmarkProblem


class IJBFormatError(DataError):
    """A missing or malformed IJB protocol file (names the file and, where known, the line)."""


#: An id in the text files: ASCII digits only, as ``read_int_columns`` reads them (``int()``
#: would also take ``-1``, ``+1``, ``1_0`` and non-ASCII digits).
_ID = re.compile(r"[0-9]{1,18}")


@dataclass
class IJBProtocol:
    """One IJB benchmark's protocol.

    images: image file names (N,) under ``image_dir``; template_ids, media_ids: (N,) int64;
    landmarks: (N, 5, 2) float32 and detector_scores: (N,) float32 (None without the file);
    pair_first, pair_second: (P,) int64 template ids; pair_label: (P,) bool (True = genuine);
    galleries: ``{"G1": (template ids, subject ids), ...}``; probe: (template ids, subject ids)
    or None (each template once).
    """

    name: str
    folder: Path
    images: list[str]
    template_ids: np.ndarray
    media_ids: np.ndarray
    pair_first: np.ndarray
    pair_second: np.ndarray
    pair_label: np.ndarray
    landmarks: np.ndarray | None = None
    detector_scores: np.ndarray | None = None
    galleries: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    probe: tuple[np.ndarray, np.ndarray] | None = None
    # (the landmarks array checked, its problems): see ``landmark_problems``.
    _landmark_check: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def image_dir(self) -> Path:
        return self.folder / "loose_crop"

    def landmark_problems(self) -> dict[int, LandmarkProblem]:
        """``alignment.landmark_problems`` of ``landmarks`` ({} without them): {image index:
        problem}, computed once per protocol and shared by everything that reads it (the CLI's
        warning, the images' alignment, the report), so they agree and IJB-C's half a million
        faces are checked once. Assigning another ``landmarks`` array re-checks; editing the
        array in place does not (treat it as read-only)."""
        if self.landmarks is None:
            return {}
        if self._landmark_check is None or self._landmark_check[0] is not self.landmarks:
            from qualiface.data.alignment import landmark_problems  # lazy: imports torch, cv2

            self._landmark_check = (self.landmarks, landmark_problems(self.landmarks))
        return dict(self._landmark_check[1])

    def image_paths(self) -> list[str]:
        return [str(self.image_dir / name) for name in self.images]


def find_ijb_folder(root: str | os.PathLike, name: str) -> Path:
    """``root/NAME`` when it exists, else ``root`` if it has the meta files; else an error."""
    root = Path(root)
    prefix = name.lower()
    for folder in (root / name, root / name.upper(), root):
        if (folder / "meta" / f"{prefix}_face_tid_mid.txt").is_file():
            return folder
    raise IJBFormatError(f"{root}: no {name} protocol found (expected "
                         f"{root / name / 'meta' / (prefix + '_face_tid_mid.txt')})")


def read_int_columns(path: str | os.PathLike, columns: int, *,
                     chunk_bytes: int = 1 << 24) -> np.ndarray:
    """Read a whitespace-separated file of non-negative integers -> (lines, columns) int64.

    Vectorised (no Python loop over lines); every line must have exactly ``columns`` numbers.
    """
    path = Path(path)
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise IJBFormatError(f"{path}: file not found") from None
    parts: list[np.ndarray] = []
    lines_before = 0
    carry = b""
    with handle:
        while True:
            block = handle.read(chunk_bytes)
            data = carry + block
            if not block:
                if data.strip():
                    parts.append(_parse_block(data + b"\n", columns, path, lines_before))
                break
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                carry = data
                continue
            parsed = _parse_block(data[:cut], columns, path, lines_before)
            lines_before += data.count(b"\n", 0, cut)
            parts.append(parsed)
            carry = data[cut:]
    # Whitespace-only files parse to zero rows: the same "empty" as a zero-byte file.
    if sum(len(part) for part in parts) == 0:
        raise IJBFormatError(f"{path}: empty file")
    return np.concatenate(parts)


def _parse_block(data: bytes, columns: int, path: Path, lines_before: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    is_digit = (raw >= 48) & (raw <= 57)
    is_space = (raw == 32) | (raw == 9) | (raw == 10) | (raw == 13)
    bad = ~(is_digit | is_space)
    if bad.any():
        at = int(np.argmax(bad))
        line = lines_before + data.count(b"\n", 0, at) + 1
        raise IJBFormatError(f"{path}:{line}: expected non-negative integers, found "
                             f"{chr(raw[at])!r}")
    previous = np.concatenate([[False], is_digit[:-1]])
    following = np.concatenate([is_digit[1:], [False]])
    starts = np.flatnonzero(is_digit & ~previous)
    ends = np.flatnonzero(is_digit & ~following) + 1
    if np.any(ends - starts > 18):
        at = int(starts[np.argmax(ends - starts > 18)])
        line = lines_before + data.count(b"\n", 0, at) + 1
        raise IJBFormatError(f"{path}:{line}: a number has more than 18 digits")
    # Each digit's place value: 10 ** (digits after it within its number).
    token = np.cumsum(is_digit & ~previous) - 1
    digit_positions = np.flatnonzero(is_digit)
    place = ends[token[digit_positions]] - digit_positions - 1
    values = np.add.reduceat((raw[digit_positions] - 48).astype(np.int64) * 10 ** place,
                             np.searchsorted(digit_positions, starts))
    newline = np.flatnonzero(raw == 10)
    line_of_token = np.searchsorted(newline, starts)
    per_line = np.bincount(line_of_token, minlength=len(newline))
    # Blank lines are allowed; any other line must have exactly `columns` numbers.
    wrong = np.flatnonzero((per_line != columns) & (per_line != 0))
    if wrong.size:
        line = lines_before + int(wrong[0]) + 1
        raise IJBFormatError(f"{path}:{line}: expected {columns} numbers, found "
                             f"{int(per_line[wrong[0]])}")
    return values.reshape(-1, columns)


def _open_utf8(path: Path, newline: str | None = None) -> io.StringIO:
    """The whole file as UTF-8 text (a leading BOM is dropped), as ``open(path, newline=...)``
    would give it; ``IJBFormatError`` naming the file, line and byte offset otherwise.

    Decoded in one piece (the largest IJB text file is tens of MB) so that a decoding error
    knows its byte offset in the file, which a text-mode file object cannot tell.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IJBFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise IJBFormatError(f"{path}:{line}: not UTF-8 text (invalid byte "
                             f"0x{data[exc.start]:02x} at byte offset {exc.start})") from None
    return io.StringIO(text, newline=newline)


def _read_face_list(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    if not path.is_file():
        raise IJBFormatError(f"{path}: file not found")
    images: list[str] = []
    templates: list[int] = []
    medias: list[int] = []
    with _open_utf8(path) as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 3:
                raise IJBFormatError(f"{path}:{number}: expected '<image> <template id> "
                                     f"<media id>', got {len(fields)} fields")
            if not (_ID.fullmatch(fields[1]) and _ID.fullmatch(fields[2])):
                raise IJBFormatError(f"{path}:{number}: template and media ids must be "
                                     f"non-negative integers, got {fields[1][:20]!r} "
                                     f"{fields[2][:20]!r}")
            templates.append(int(fields[1]))
            medias.append(int(fields[2]))
            images.append(fields[0])
    if not images:
        raise IJBFormatError(f"{path}: no images listed")
    return images, np.asarray(templates, dtype=np.int64), np.asarray(medias, dtype=np.int64)


def _read_landmarks(path: Path, images: list[str]) -> tuple[np.ndarray, np.ndarray]:
    landmarks = np.zeros((len(images), 5, 2), dtype=np.float32)
    scores = np.zeros(len(images), dtype=np.float32)
    count = 0
    with _open_utf8(path) as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 12:
                raise IJBFormatError(f"{path}:{number}: expected '<image> x1 y1 ... x5 y5 "
                                     f"<score>' (12 fields), got {len(fields)}")
            if count >= len(images) or fields[0] != images[count]:
                expected = images[count] if count < len(images) else "(end of face list)"
                raise IJBFormatError(f"{path}:{number}: image {fields[0]!r} does not match the "
                                     f"face list's {expected!r} at the same position")
            try:
                values = np.asarray(fields[1:], dtype=np.float32)
            except ValueError:
                raise IJBFormatError(f"{path}:{number}: landmarks and score must be numbers") from None
            if not np.isfinite(values).all():  # nan/inf would align or weight silently wrong
                raise IJBFormatError(f"{path}:{number}: landmarks and score must be finite "
                                     "numbers")
            landmarks[count] = values[:10].reshape(5, 2)
            scores[count] = values[10]
            count += 1
    if count != len(images):
        raise IJBFormatError(f"{path}: {count} lines for {len(images)} images in the face list")
    return landmarks, scores


def read_template_subjects(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A 1:N CSV -> (template ids (T,), subject ids (T,)), each template once, file order."""
    path = Path(path)
    if not path.is_file():
        raise IJBFormatError(f"{path}: file not found")
    with _open_utf8(path, newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = [h.strip().upper() for h in next(reader)]
        except StopIteration:
            raise IJBFormatError(f"{path}: empty file") from None
        try:
            t_col, s_col = header.index("TEMPLATE_ID"), header.index("SUBJECT_ID")
        except ValueError:
            raise IJBFormatError(f"{path}:1: header must name TEMPLATE_ID and SUBJECT_ID, got "
                                 f"{header[:6]}") from None
        subject_of: dict[int, int] = {}
        for number, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                template, subject = int(row[t_col]), int(row[s_col])
            except (ValueError, IndexError):
                raise IJBFormatError(f"{path}:{number}: TEMPLATE_ID and SUBJECT_ID must be "
                                     "integers") from None
            if subject_of.setdefault(template, subject) != subject:
                raise IJBFormatError(f"{path}:{number}: template {template} listed with two "
                                     f"subjects ({subject_of[template]} and {subject})")
    if not subject_of:
        raise IJBFormatError(f"{path}: no rows")
    return (np.fromiter(subject_of.keys(), np.int64, len(subject_of)),
            np.fromiter(subject_of.values(), np.int64, len(subject_of)))


def _line_of_row(path: Path, row: int) -> int:
    """The 1-based line of table row ``row`` (0-based, blank lines skipped) of a file read by
    ``read_int_columns``; only called to word an error, so a plain scan is fine."""
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                if row == 0:
                    return number
                row -= 1
    return 0


def load_ijb(root: str | os.PathLike, name: str = "IJBC", *, with_1n: bool = True) -> IJBProtocol:
    """Read an IJB protocol (1:1 always; 1:N when its CSVs exist and ``with_1n``)."""
    folder = find_ijb_folder(root, name)
    meta = folder / "meta"
    prefix = name.lower()
    images, templates, medias = _read_face_list(meta / f"{prefix}_face_tid_mid.txt")
    pairs = read_int_columns(meta / f"{prefix}_template_pair_label.txt", 3)
    pair_file = meta / f"{prefix}_template_pair_label.txt"
    if not np.all((pairs[:, 2] == 0) | (pairs[:, 2] == 1)):
        row = int(np.flatnonzero((pairs[:, 2] != 0) & (pairs[:, 2] != 1))[0])
        raise IJBFormatError(f"{pair_file}:{_line_of_row(pair_file, row)}: label "
                             f"{pairs[row, 2]} is not 0 or 1")
    known = np.unique(templates)
    unknown = ~np.isin(pairs[:, :2], known)
    if unknown.any():
        row, col = np.argwhere(unknown)[0]
        raise IJBFormatError(f"{pair_file}:{_line_of_row(pair_file, int(row))}: pair uses "
                             f"template {pairs[row, col]} that has no image in "
                             f"{prefix}_face_tid_mid.txt")
    landmarks = scores = None
    five_points = meta / f"{prefix}_name_5pts_score.txt"
    if five_points.is_file():
        landmarks, scores = _read_landmarks(five_points, images)
    protocol = IJBProtocol(name, folder, images, templates, medias, pairs[:, 0].copy(),
                           pairs[:, 1].copy(), pairs[:, 2].astype(bool), landmarks, scores)
    if with_1n:
        for label in ("G1", "G2", "S1", "S2"):
            path = meta / f"{prefix}_1N_gallery_{label}.csv"
            if path.is_file():
                protocol.galleries[label] = read_template_subjects(path)
        probe_path = meta / f"{prefix}_1N_probe_mixed.csv"
        if protocol.galleries and probe_path.is_file():
            protocol.probe = read_template_subjects(probe_path)
        for label, (ids, _) in [*protocol.galleries.items(),
                                *([("probe", protocol.probe)] if protocol.probe else [])]:
            missing = ~np.isin(ids, known)
            if missing.any():
                raise IJBFormatError(f"{meta}: 1:N {label} template {ids[missing][0]} has no "
                                     f"image in {prefix}_face_tid_mid.txt")
    return protocol
