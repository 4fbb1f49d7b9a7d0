"""TinyFace test set (``Testing_Set``) in the layout AdaFace evaluates.

``<root>/`` (or ``<root>/Testing_Set/``, or ``<root>/tinyface/Testing_Set/``) holds::

    Probe/<subject>_<n>.jpg                probe images of 2,570 identities
    Gallery_Match/<subject>_<n>.jpg        gallery images of the same identities
    Gallery_Distractor/<anything>.jpg      153k distractors, none of a probe's identity

The identity of a probe or gallery-match image is the file name up to the first underscore.
Distractors get subject id -1 whatever their name, so they can never be a mate. Every probe's
subject must have a Gallery_Match image (the protocol has no unmated probes). Images are
tiny (about 20 x 16 pixels on average) and are resized to 112 x 112 for embedding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qualiface.data.decode import DataError
from qualiface.data.folder import is_image_file

FOLDERS = ("Probe", "Gallery_Match", "Gallery_Distractor")
DISTRACTOR = -1


class TinyFaceFormatError(DataError):
    """A TinyFace folder that does not follow the Testing_Set layout (names the path)."""


@dataclass
class TinyFaceProtocol:
    """Image paths (relative to ``root``) and subject ids of probes and the gallery.

    probe_paths (P,), probe_subjects (P,) int64; gallery_paths (G,), gallery_subjects (G,) int64
    (match images first, then distractors with id -1); subject_names maps id -> name.
    """

    root: Path
    probe_paths: list[str]
    probe_subjects: np.ndarray
    gallery_paths: list[str]
    gallery_subjects: np.ndarray
    subject_names: list[str]

    @property
    def all_paths(self) -> list[str]:
        return [*self.probe_paths, *self.gallery_paths]


def find_testing_set(root: str | os.PathLike) -> Path:
    """The folder holding Probe/, Gallery_Match/ and Gallery_Distractor/."""
    root = Path(root)
    for folder in (root, root / "Testing_Set", root / "tinyface" / "Testing_Set"):
        if all((folder / name).is_dir() for name in FOLDERS):
            return folder
    missing = [name for name in FOLDERS if not (root / name).is_dir()]
    raise TinyFaceFormatError(f"{root}: not a TinyFace Testing_Set (missing folder(s) "
                              f"{', '.join(missing)})")


def subject_of(file_name: str) -> str:
    """``'123_4.jpg' -> '123'``: the identity part of a probe / gallery-match file name."""
    stem = os.path.splitext(os.path.basename(file_name))[0]
    subject, sep, _ = stem.partition("_")
    if not sep or not subject:
        raise TinyFaceFormatError(f"{file_name}: expected '<subject>_<n>' in the file name")
    return subject


def _images(folder: Path) -> list[str]:
    names = sorted(e.name for e in os.scandir(folder)
                   if e.is_file() and not e.name.startswith(".") and is_image_file(e.name))
    if not names:
        raise TinyFaceFormatError(f"{folder}: no images")
    return names


def load_tinyface(root: str | os.PathLike) -> TinyFaceProtocol:
    """Scan a TinyFace Testing_Set; errors name the folder or file at fault."""
    folder = find_testing_set(root)
    probe_names = _images(folder / "Probe")
    match_names = _images(folder / "Gallery_Match")
    distractor_names = _images(folder / "Gallery_Distractor")
    ids: dict[str, int] = {}
    probe_subjects = [ids.setdefault(subject_of(n), len(ids)) for n in probe_names]
    match_subjects = [ids.setdefault(subject_of(n), len(ids)) for n in match_names]
    if not set(probe_subjects) & set(match_subjects):
        raise TinyFaceFormatError(f"{folder}: no probe subject appears in Gallery_Match")
    # Every TinyFace probe has a mate: one without is a missing Gallery_Match image, and rank-k
    # would silently be computed over fewer probes than the protocol has.
    mated = set(match_subjects)
    unmated = [n for n, s in zip(probe_names, probe_subjects) if s not in mated]
    if unmated:
        shown = ", ".join(unmated[:5]) + (" ..." if len(unmated) > 5 else "")
        raise TinyFaceFormatError(f"{folder / 'Probe'}: {len(unmated)} probe image(s) whose "
                                  f"subject has no image in Gallery_Match: {shown}")
    return TinyFaceProtocol(
        root=folder,
        probe_paths=[f"Probe/{n}" for n in probe_names],
        probe_subjects=np.asarray(probe_subjects, dtype=np.int64),
        gallery_paths=[f"Gallery_Match/{n}" for n in match_names]
        + [f"Gallery_Distractor/{n}" for n in distractor_names],
        gallery_subjects=np.asarray(match_subjects + [DISTRACTOR] * len(distractor_names),
                                    dtype=np.int64),
        subject_names=list(ids),
    )
