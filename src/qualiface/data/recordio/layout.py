"""The files around a ``.rec``: where they are, ``property`` and ``identities.txt``.

A dataset folder holds ``NAME.rec`` and ``NAME.idx`` (see ``index``), ``property`` with the line
``num_classes,height,width``, and, when the writer was given names, ``identities.txt``
(``label<TAB>name``) so an unpacked folder gets its identity names back. Identity names become
folder names on unpacking, so they are checked as such (``identity_name_problem``).
"""

from __future__ import annotations

import os
from pathlib import Path

from qualiface.data.recordio.format import RecordIOError
from qualiface.files import read_small_bytes

IDENTITIES_FILE = "identities.txt"
PROPERTY_FILE = "property"


def resolve_paths(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """``dir``, ``dir/train``, ``dir/train.rec`` or ``.idx`` -> (rec, idx, property) paths.

    A directory must hold exactly one ``.rec`` (or ``train.rec``).
    """
    path = Path(path)
    if path.is_dir():
        recs = sorted(path.glob("*.rec"))
        preferred = [rec for rec in recs if rec.name == "train.rec"]
        if preferred:
            recs = preferred
        if len(recs) != 1:
            found = ", ".join(r.name for r in recs) or "none"
            raise RecordIOError(path, None, f"expected one .rec file in the folder, found "
                                            f"{found}")
        rec = recs[0]
    elif path.suffix in (".rec", ".idx"):
        rec = path.with_suffix(".rec")
    else:
        rec = path.with_name(path.name + ".rec")
    if not rec.is_file():
        raise RecordIOError(rec, None, "RecordIO file not found")
    return rec, rec.with_suffix(".idx"), rec.parent / PROPERTY_FILE


def read_property(property_path: str | os.PathLike) -> tuple[int, int, int] | None:
    """``property`` file -> ``(num_classes, height, width)``, or None when absent."""
    property_path = Path(property_path)
    if not property_path.is_file():
        return None
    try:  # one short line: a large file here is not a property file
        data = read_small_bytes(property_path, limit=4096, what="property file")
    except OSError as exc:
        raise RecordIOError(property_path, None, getattr(exc, "problem", None)
                            or f"cannot read ({exc.strerror or exc})") from None
    text = data.decode("utf-8", errors="replace").strip()
    try:
        values = tuple(int(v) for v in text.split(","))
        if len(values) != 3 or min(values) <= 0:
            raise ValueError
    except ValueError:
        raise RecordIOError(property_path, None, f"expected 'num_classes,height,width', got "
                                                 f"{text[:80]!r}") from None
    return values  # type: ignore[return-value]


def identity_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an identity name (None when it can).

    ``unpack`` uses each name as a folder under its output directory, so a name must be one
    plain path component: not empty, not ``.`` or ``..``, no ``/``, ``\\`` or NUL (a backslash is
    a separator on Windows), and no tab or line break (they would break ``identities.txt``).
    """
    if not name:
        return "empty identity name"
    if name in (".", ".."):
        return f"identity name {name!r} is not a folder name"
    for character, what in (("/", "'/'"), ("\\", "'\\'"), ("\0", "NUL"), ("\t", "a tab"),
                            ("\r", "a line break"), ("\n", "a line break")):
        if character in name:
            return f"identity name {name[:80]!r} contains {what}"
    return None


def read_identity_names(folder: str | os.PathLike) -> list[str] | None:
    """``identities.txt`` (``label<TAB>name`` lines, labels 0..N-1 in order) or None.

    Raises ``RecordIOError`` naming the file and line for a malformed line or a name that is not
    a single plain folder name (see ``identity_name_problem``): the file may be hostile.
    """
    path = Path(folder) / IDENTITIES_FILE
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecordIOError(path, exc.start, "not UTF-8 text") from None
    names: list[str] = []
    seen: dict[str, int] = {}
    # Split on "\n" only (the writer's line end; a "\r" before it is tolerated):
    # str.splitlines() would also split on \x0c, \x1c-\x1e, \x85 and \u2028/\u2029, which a
    # valid identity name may contain, so such a pack would not read back.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for line_number, line in enumerate(lines, 1):
        line = line.removesuffix("\r")
        label, sep, name = line.partition("\t")
        if not sep or label != str(len(names)) or not name:
            raise RecordIOError(path, None, f"line {line_number}: expected "
                                            f"'{len(names)}<TAB>name', got {line[:80]!r}")
        problem = identity_name_problem(name)
        if problem is not None:
            raise RecordIOError(path, None, f"line {line_number}: {problem}")
        # Each name becomes one folder: a name given twice would merge two identities (unpack
        # puts both labels' images in one folder, and a repack then counts one class).
        if name in seen:
            raise RecordIOError(path, None, f"line {line_number}: identity {name[:80]!r} is "
                                            f"also label {seen[name]}")
        seen[name] = len(names)
        names.append(name)
    return names
