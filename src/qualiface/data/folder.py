"""Image datasets read straight from disk: an identity-per-folder tree, or a ``path label`` list.

``ImageFolderDataset`` (registered as ``folder``) reads ``root/<identity>/<image>``: identity
folders sorted by name (compared in Unicode NFC form) get labels ``0..N-1`` and images inside
each are sorted, so the labelling is reproducible on any machine. Identity folders without a
single image are skipped and listed in ``skipped_identities`` (and logged), never given a label
silently.

``ListFileDataset`` (registered as ``list``) reads ``relative/path label`` lines, the layout of
the shared training manifest. Paths resolve against the list file's folder (or ``root``);
absolute paths and ``..`` that would leave that root are refused, because a manifest is data and
must not be able to point the loader at arbitrary files.

Both return ``(uint8 (3, H, W) RGB, int label)`` through ``qualiface.data.decode`` and give the
source path in ``meta(i)``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import unicodedata
from pathlib import Path

import torch

from qualiface.data import DATASETS
from qualiface.data.decode import DEFAULT_MAX_PIXELS, DataError, read_image
from qualiface.files import read_small_text_as

logger = logging.getLogger(__name__)

#: File extensions treated as images (compared lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: Largest list file read (~5M ``path label`` lines); bigger sets belong in a RecordIO pack.
LIST_FILE_LIMIT = 256 * 2**20


class DatasetError(DataError):
    """A dataset layout or manifest that cannot be used (names the file and line where known)."""


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has one of ``IMAGE_EXTENSIONS`` (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def _sort_key(name: str) -> tuple[str, str]:
    """Order names by their NFC form: the same folder is "José" composed on one file system and
    decomposed ("Jose" + U+0301) on another (HFS+, some copies from macOS), and raw code points
    sort the two differently, which would give the identities other labels there."""
    return unicodedata.normalize("NFC", name), name


def _sha256_lines(lines) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def list_identity_folders(root: str | os.PathLike) -> tuple[list[str], list[list[Path]], list[str]]:
    """Scan ``root/<identity>/<image>``.

    Returns ``(identities, images_per_identity, skipped)``: identity names sorted, each one's
    image paths sorted, and the names of folders that hold no image (not labelled). Hidden
    entries (names starting with ``.``) are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory (expected root/<identity>/<image>)")
    identities: list[str] = []
    images: list[list[Path]] = []
    skipped: list[str] = []
    for entry in sorted(os.scandir(root), key=lambda e: _sort_key(e.name)):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        files = sorted(
            (f.name for f in os.scandir(entry.path)
             if not f.name.startswith(".") and f.is_file() and is_image_file(f.name)),
            key=_sort_key,
        )
        if not files:
            skipped.append(entry.name)
            continue
        identities.append(entry.name)
        images.append([Path(entry.path) / name for name in files])
    return identities, images, skipped


@DATASETS.register("folder", "image_folder")
class ImageFolderDataset(torch.utils.data.Dataset):
    """``root/<identity>/<image>`` -> ``(uint8 (3, H, W) RGB, label)``; labels follow sorted names.

    Attributes: ``identities`` (label -> folder name), ``samples`` (list of ``(path, label)``),
    ``skipped_identities`` (folders without images), ``num_classes``.
    """

    def __init__(self, root: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.root = Path(root)
        self.max_pixels = max_pixels
        self.identities, per_identity, self.skipped_identities = list_identity_folders(root)
        if self.skipped_identities:
            shown = ", ".join(self.skipped_identities[:5])
            more = len(self.skipped_identities) - 5
            logger.warning("%s: skipped %d identity folder(s) without images: %s%s", root,
                           len(self.skipped_identities), shown,
                           f" (+{more} more)" if more > 0 else "")
        if not self.identities:
            raise DatasetError(f"{root}: no identity folder with images (expected "
                               f"root/<identity>/<image> with extensions "
                               f"{', '.join(IMAGE_EXTENSIONS)})")
        self.samples: list[tuple[Path, int]] = [
            (path, label) for label, paths in enumerate(per_identity) for path in paths
        ]

    @property
    def num_classes(self) -> int:
        return len(self.identities)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return read_image(path, max_pixels=self.max_pixels), label

    def meta(self, index: int) -> dict:
        path, label = self.samples[index]
        return {"path": str(path), "identity": self.identities[label]}

    def fingerprint(self) -> str:
        """sha256 of every sample's label and ``identity/file`` name (not the root: a moved
        tree is the same data); a resume checks it (``train.data.data_fingerprint``)."""
        return _sha256_lines(f"{label}\t{path.parent.name}/{path.name}" for path, label in self.samples)


def _inside(root: str, candidate: str) -> bool:
    return candidate == root or candidate.startswith(root.rstrip(os.sep) + os.sep)


def parse_list_file(
    list_file: str | os.PathLike, root: str | os.PathLike | None = None
) -> tuple[list[str], list[int]]:
    """Parse ``path label`` lines -> (absolute normalised path strings, labels).

    Blank lines and lines starting with ``#`` are skipped; the label is the last
    whitespace-separated field, so paths may contain spaces. Relative paths resolve against
    ``root`` (default: the list file's folder). Raises ``DatasetError`` naming the file and line
    for a missing label, a label that is not an int >= 0, an absolute path, or a path that
    escapes the root.
    """
    list_file = Path(list_file)
    base = Path(root) if root is not None else list_file.parent
    base_str = os.path.normpath(os.path.abspath(base))

    text = read_small_text_as(list_file, DatasetError, what="list file", limit=LIST_FILE_LIMIT)
    paths: list[str] = []
    labels: list[int] = []
    for line_number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.rsplit(None, 1)
        where = f"{list_file}:{line_number}"
        if len(fields) != 2:
            raise DatasetError(f"{where}: expected 'path label', got {line!r}")
        rel, label_text = fields
        try:
            label = int(label_text)
        except ValueError:
            raise DatasetError(f"{where}: label {label_text!r} is not an integer") from None
        if label < 0:
            raise DatasetError(f"{where}: label {label} is negative (labels are ints >= 0)")
        if os.path.isabs(rel) or rel.startswith(("/", "\\")) or os.path.splitdrive(rel)[0]:
            raise DatasetError(f"{where}: absolute path {rel!r} refused (paths must be "
                               f"relative to {base_str})")
        # Lexical check: '..' may move inside the root but never out of it.
        full = os.path.normpath(os.path.join(base_str, rel))
        if not _inside(base_str, full):
            raise DatasetError(f"{where}: path {rel!r} escapes the root {base_str}")
        paths.append(full)
        labels.append(label)
    if not paths:
        raise DatasetError(f"{list_file}: no 'path label' lines")
    return paths, labels


@DATASETS.register("list", "list_file")
class ListFileDataset(torch.utils.data.Dataset):
    """``path label`` manifest -> ``(uint8 (3, H, W) RGB, label)``.

    ``num_classes`` is ``max(label) + 1`` unless given (it must then exceed every label).
    ``meta(i)`` gives ``{"path": ...}``. Missing image files fail when read, naming the file.
    """

    def __init__(
        self,
        list_file: str | os.PathLike,
        root: str | os.PathLike | None = None,
        *,
        num_classes: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        self.list_file = Path(list_file)
        self.max_pixels = max_pixels
        self.paths, self.labels = parse_list_file(list_file, root)
        self.base = os.path.abspath(root if root is not None else self.list_file.parent)
        largest = max(self.labels)
        if num_classes is not None and num_classes <= largest:
            raise DatasetError(f"{list_file}: label {largest} does not fit num_classes="
                               f"{num_classes}")
        self._num_classes = num_classes if num_classes is not None else largest + 1

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return read_image(self.paths[index], max_pixels=self.max_pixels), self.labels[index]

    def meta(self, index: int) -> dict:
        return {"path": self.paths[index]}

    def fingerprint(self) -> str:
        """sha256 of every sample's label and path relative to the root (see
        ``ImageFolderDataset.fingerprint``)."""
        return _sha256_lines(f"{label}\t{os.path.relpath(path, self.base)}"
                             for path, label in zip(self.paths, self.labels))

    def missing_files(self) -> list[str]:
        """Paths in the list that do not exist (one ``stat`` per entry)."""
        return [path for path in self.paths if not os.path.isfile(path)]
