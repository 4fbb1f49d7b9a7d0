"""LFW ``pairs.txt`` parsing: the verification protocol as a typed list of image pairs with folds.

View 2 (``pairs.txt``): a header ``10 300`` then 10 folds, each 300 matched lines ``name i j``
followed by 300 mismatched lines ``name1 i name2 j``. View 1 (``pairsDevTrain.txt``): a header
with one number ``N``, then N matched and N mismatched lines (read as a single fold). A file
without a header is read as one fold with matched/mismatched told apart by the field count.
Image ``i`` of ``name`` is ``<name>/<name>_<i:04d>.jpg``.

Folds are numbered as in the official protocol, **1-based** (``fold == 8`` is the eighth
fold), so the project's test split is ``pairs.select_folds(8, 9, 10)``.

``LFWPairs.unique_images()`` gives each image once plus index pairs into that list, so
features are extracted once per image rather than once per pair side; ``resolve(root)``
checks every image exists under an image folder and reports all missing ones at once.
Malformed files raise ``PairsFormatError`` naming the file and line; so do pairs no protocol
holds (an image paired with itself, a mismatched line naming one person twice, a pair listed
twice in either order).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np

from qualiface.data.decode import DataError
from qualiface.files import FileReadError, absent_as, open_regular

# Bounded digit counts keep int() cheap and far from Python's int/str conversion limit.
_NUMBER = re.compile(r"[0-9]{1,9}")
#: Most pairs a headerless file may list (LFW has 6,000; the largest public protocols ~10^5).
MAX_PAIRS = 1_000_000
#: Longest line read: a pair line is two names and two numbers.
MAX_LINE_BYTES = 4096


class PairsFormatError(DataError):
    """A pairs file that does not follow the LFW layout (names the file and line)."""


class MissingImagesError(DataError):
    """Images referenced by a pairs file that do not exist under the image folder."""

    def __init__(self, message: str, missing: list[str]) -> None:
        super().__init__(message)
        self.missing = missing


def lfw_image_path(name: str, number: int, extension: str = "jpg") -> str:
    """Relative path of image ``number`` of ``name``: ``<name>/<name>_<number:04d>.<ext>``."""
    return f"{name}/{name}_{number:04d}.{extension}"


@dataclass(frozen=True)
class LFWPairs:
    """Verification pairs.

    paths1, paths2: image paths of each pair's two sides (relative to the image folder until
        ``resolve`` makes them absolute).
    issame: (P,) bool, True for matched pairs.
    fold:   (P,) int64, official 1-based fold number.
    source: where the pairs came from (for messages).
    """

    paths1: tuple[str, ...]
    paths2: tuple[str, ...]
    issame: np.ndarray
    fold: np.ndarray
    source: str = "<pairs>"

    def __len__(self) -> int:
        return len(self.paths1)

    @property
    def folds(self) -> list[int]:
        """The fold numbers present, ascending."""
        return sorted(int(f) for f in np.unique(self.fold))

    def select_folds(self, *folds: int) -> LFWPairs:
        """Only the pairs of the given (1-based) folds, in file order."""
        unknown = set(folds) - set(self.folds)
        if unknown:  # a DataError (a ValueError): one clear line in the CLI
            raise PairsFormatError(f"{self.source}: no fold(s) {sorted(unknown)}; folds are "
                                   f"{self.folds}")
        keep = np.isin(self.fold, list(folds))
        index = np.flatnonzero(keep)
        return replace(self, paths1=tuple(self.paths1[i] for i in index),
                       paths2=tuple(self.paths2[i] for i in index),
                       issame=self.issame[keep], fold=self.fold[keep])

    def unique_images(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """``(images, index1, index2)``: each path once (first-seen order) and (P,) int64
        indices such that pair ``k`` is ``images[index1[k]], images[index2[k]]``."""
        position: dict[str, int] = {}
        for first, second in zip(self.paths1, self.paths2):  # reading order of the file
            position.setdefault(first, len(position))
            position.setdefault(second, len(position))
        index1 = np.fromiter((position[p] for p in self.paths1), np.int64, len(self))
        index2 = np.fromiter((position[p] for p in self.paths2), np.int64, len(self))
        return list(position), index1, index2

    def missing_images(self, image_root: str | os.PathLike) -> list[str]:
        """Relative paths (unique, first-seen order) that do not exist under ``image_root``."""
        root = Path(image_root)
        images, _, _ = self.unique_images()
        return [path for path in images if not (root / path).is_file()]

    def resolve(self, image_root: str | os.PathLike) -> LFWPairs:
        """Paths made absolute under ``image_root``; ``MissingImagesError`` lists any missing."""
        root = Path(image_root)
        if not root.is_dir():
            raise MissingImagesError(f"{root}: {absent_as(root, 'image folder')}", [])
        missing = self.missing_images(root)
        if missing:
            total = len(self.unique_images()[0])
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise MissingImagesError(f"{root}: {len(missing)} of {total} images named in "
                                     f"{self.source} are missing: {shown}", missing)
        base = os.path.abspath(root)
        return replace(self, paths1=tuple(os.path.join(base, p) for p in self.paths1),
                       paths2=tuple(os.path.join(base, p) for p in self.paths2))


def _parse_number(token: str, where: str, what: str) -> int:
    if not _NUMBER.fullmatch(token):
        raise PairsFormatError(f"{where}: {what} {token[:40]!r} is not a positive integer")
    value = int(token)
    if value < 1:
        raise PairsFormatError(f"{where}: {what} must be >= 1, got {value}")
    return value


def _check_name(token: str, where: str) -> str:
    # Names become folder names: refuse anything that could walk out of the image folder.
    if token in (".", "..") or "/" in token or "\\" in token or "\0" in token:
        raise PairsFormatError(f"{where}: {token[:40]!r} is not a valid person name")
    return token


def parse_pairs_text(text: str, *, source: str = "<text>", extension: str = "jpg") -> LFWPairs:
    """Parse the text of a pairs file (see the module docstring for accepted layouts)."""
    return _parse_pair_lines(enumerate(text.splitlines(), start=1), source, extension)


def _parse_pair_lines(lines: Iterable[tuple[int, str]], source: str, extension: str) -> LFWPairs:
    """Parse numbered lines one at a time, keeping only the pairs (not the lines).

    Bounded: with a header, the file may not hold more pairs than it announces (checked as
    each line arrives, so a 10M-line file fails at the first extra line); without one, at most
    ``MAX_PAIRS``. Each pair's matched/mismatched kind is checked against its fold as read.
    """
    header: tuple[int, int] | None = None
    header_line = 0
    paths1: list[str] = []
    paths2: list[str] = []
    issame: list[bool] = []
    misplaced: tuple[int, int] | None = None  # (pair position, line) of the first wrong kind
    seen: dict[tuple[str, str], int] = {}  # each pair (either order) -> its line
    repeated: str | None = None  # the first repeated pair, reported after the layout checks
    for line_number, line in lines:
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        where = f"{source}:{line_number}"
        if not header_line and not issame and len(fields) in (1, 2):
            values = [_parse_number(token, where, "header value") for token in fields]
            header = (values[0], values[1]) if len(values) == 2 else (1, values[0])
            header_line = line_number
            continue
        header_line = header_line or -1  # pairs have started: no header from here on
        limit = header[0] * 2 * header[1] if header is not None else MAX_PAIRS
        if len(issame) >= limit:
            if header is None:
                raise PairsFormatError(f"{where}: more than {MAX_PAIRS:,} pairs; a pairs file "
                                       "this long is not a verification protocol")
            raise PairsFormatError(f"{source}:{header_line}: header says {header[0]} fold(s) of "
                                   f"{header[1]} matched + {header[1]} mismatched pairs "
                                   f"({limit} lines), the file has more (line {line_number})")
        if len(fields) == 3:
            name = _check_name(fields[0], where)
            first = lfw_image_path(name, _parse_number(fields[1], where, "image number"), extension)
            second = lfw_image_path(name, _parse_number(fields[2], where, "image number"), extension)
            same = True
        elif len(fields) == 4:
            name1, name2 = _check_name(fields[0], where), _check_name(fields[2], where)
            first = lfw_image_path(name1, _parse_number(fields[1], where, "image number"), extension)
            second = lfw_image_path(name2, _parse_number(fields[3], where, "image number"), extension)
            same = False
            if name1 == name2:  # would be scored as an impostor pair of one person
                raise PairsFormatError(f"{where}: mismatched pair names {name1!r} twice (a "
                                       "matched pair is 'name i j')")
        else:
            raise PairsFormatError(f"{where}: expected 'name i j' or 'name1 i name2 j', got "
                                   f"{len(fields)} fields")
        if first == second:  # an image compared with itself is no verification pair
            raise PairsFormatError(f"{where}: pair compares {first!r} with itself")
        key = (first, second) if first < second else (second, first)
        if key in seen and repeated is None:  # counted twice, possibly in two folds
            repeated = f"{where}: the same pair as line {seen[key]} ({first} / {second})"
        seen.setdefault(key, line_number)
        if header is not None and misplaced is None:
            # Within a fold the first per_side lines are matched, the next per_side mismatched;
            # reported after the count check, which says more when lines are missing.
            position = len(issame)
            if same != ((position % (2 * header[1])) < header[1]):
                misplaced = (position, line_number)
        paths1.append(first)
        paths2.append(second)
        issame.append(same)
    if not issame:
        raise PairsFormatError(f"{source}: header but no pairs" if header is not None
                               else f"{source}: no pairs (empty file)")
    if header is None:
        fold = np.ones(len(issame), dtype=np.int64)
    else:
        folds, per_side = header
        expected = folds * 2 * per_side
        if len(issame) != expected:
            raise PairsFormatError(f"{source}:{header_line}: header says {folds} fold(s) of "
                                   f"{per_side} matched + {per_side} mismatched pairs "
                                   f"({expected} lines), the file has {len(issame)}")
        if misplaced is not None:
            position, line_number = misplaced
            kind = ("mismatched ('name1 i name2 j')" if issame[position]
                    else "matched ('name i j')")
            raise PairsFormatError(f"{source}:{line_number}: fold {position // (2 * per_side) + 1} "
                                   f"expects a {kind} pair on this line")
        fold = np.arange(expected) // (2 * per_side) + 1
    if repeated is not None:
        raise PairsFormatError(repeated)
    return LFWPairs(tuple(paths1), tuple(paths2), np.asarray(issame, dtype=bool),
                    fold.astype(np.int64), source)


def _numbered_lines(handle: BinaryIO, source: str) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a binary file, one line in memory at a time."""
    offset = 0
    for number in itertools.count(1):
        raw = handle.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if len(raw) > MAX_LINE_BYTES:
            raise PairsFormatError(f"{source}:{number}: line longer than {MAX_LINE_BYTES} bytes "
                                   "(not a pairs file?)")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PairsFormatError(f"{source}: not UTF-8 text (byte {offset + exc.start})") from None
        offset += len(raw)
        yield number, text


def read_pairs(path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
               extension: str = "jpg") -> LFWPairs:
    """Read a pairs file, streamed line by line; with ``image_root`` the paths are resolved and
    checked to exist. Devices and FIFOs are refused (``qualiface.files.open_regular``)."""
    path = Path(path)
    try:
        with open_regular(path, what="pairs file") as handle:
            pairs = _parse_pair_lines(_numbered_lines(handle, str(path)), str(path), extension)
    except FileNotFoundError:
        raise PairsFormatError(f"{path}: pairs file not found") from None
    except FileReadError as exc:
        raise PairsFormatError(str(exc)) from None
    except OSError as exc:
        raise PairsFormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return pairs.resolve(image_root) if image_root is not None else pairs
