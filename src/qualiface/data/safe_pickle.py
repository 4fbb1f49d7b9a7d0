"""Load untrusted pickles that hold only plain data (the InsightFace ``.bin`` verification sets).

``pickle.load`` on a downloaded file runs whatever the file asks for (``__reduce__`` can call
``os.system``). Every way a pickle reaches code goes through ``Unpickler.find_class`` (globals,
``INST``/``OBJ``, extension codes) or ``persistent_load``; ``RestrictedUnpickler`` refuses both,
so nothing but built-in values can ever be constructed. After loading, the value is walked and
anything outside ``bytes, bytearray, str, list, tuple, bool, int, float, None`` (e.g. a dict or
set, which need no global) is refused too.

What this accepts, and what it does not (by design):

* Python 3 pickles of protocol 3-5 (``bytes`` are native opcodes there), and Python 2 pickles
  of any protocol: their ``str`` values load as ``bytes`` (``encoding="bytes"``).
* Not numpy arrays or numpy scalars (e.g. ``numpy.bool_`` in an ``issame`` list): rebuilding
  them needs ``numpy.core.multiarray`` globals, i.e. find_class. Such files fail with an
  ``UnsafePickleError`` naming the global; convert them once in a trusted environment.
* Not Python 3 pickles of protocol 0-2 that contain ``bytes``: Python pickles those through
  the global ``_codecs.encode``, which is refused like any other global.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

from qualiface.data.decode import DataError

#: The only value types a safe load may return (containers are checked recursively).
ALLOWED_TYPES = (bytes, bytearray, str, list, tuple, bool, int, float, type(None))


class UnsafePickleError(pickle.UnpicklingError, DataError):
    """The pickle asked for something outside the allowed plain-data types."""

    def __init__(self, source: str, refused: str) -> None:
        super().__init__(source, refused)
        self.source = source
        self.refused = refused

    def __str__(self) -> str:
        return (f"{self.source}: refused to unpickle {self.refused} (only bytes, str, numbers, "
                "bools, None, lists and tuples are loaded from untrusted pickles)")


class PickleFormatError(DataError):
    """The data is not a readable pickle (truncated, corrupt or not a pickle at all)."""


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that can build only built-in values: every global is refused."""

    def __init__(self, file, *, source: str = "<pickle>", encoding: str = "bytes") -> None:
        super().__init__(file, encoding=encoding)
        self.source = source

    def find_class(self, module: str, name: str):
        raise UnsafePickleError(self.source, f"global '{module}.{name}'")

    def persistent_load(self, pid):
        raise UnsafePickleError(self.source, "a persistent id")


def _check_plain(value: object, source: str) -> None:
    # Iterative walk: hostile input may nest deeply or reference itself through the memo.
    stack = [value]
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        if type(item) not in ALLOWED_TYPES:
            raise UnsafePickleError(source, f"a value of type '{type(item).__name__}'")
        if type(item) in (list, tuple):
            if id(item) in seen:
                continue
            seen.add(id(item))
            stack.extend(item)


def safe_loads(data: bytes, *, source: str = "<bytes>", encoding: str = "bytes") -> object:
    """Unpickle plain data from ``data``; ``source`` names it in errors.

    Raises ``UnsafePickleError`` (a refused global or type) or ``PickleFormatError`` (corrupt).
    """
    try:
        value = RestrictedUnpickler(io.BytesIO(data), source=source, encoding=encoding).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # any failure parsing untrusted bytes is a format error
        raise PickleFormatError(f"{source}: not a readable pickle "
                                f"({type(exc).__name__}: {exc})") from None
    _check_plain(value, source)
    return value


def safe_load(path: str | os.PathLike, *, encoding: str = "bytes") -> object:
    """Unpickle plain data from a file (see ``safe_loads``); errors name the file."""
    path = Path(path)
    return safe_loads(path.read_bytes(), source=str(path), encoding=encoding)
