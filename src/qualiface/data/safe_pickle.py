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
from qualiface.files import FileReadError, open_regular

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


class PickleTooLargeError(PickleFormatError):
    """The pickle references far more data than it holds (one object referenced many times)."""


#: Data (bytes and str) a pickle may reference beyond twice its own size. A pickle stores each
#: object once and may reference it many times (the memo), so 20,000 references to one 1 MB
#: bytearray in a 1 MB file would decode to 20 GB once copied; real files reference each image
#: about once, so their total stays near the file size.
REFERENCED_BYTES_SLACK = 16 * 2**20


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that can build only built-in values: every global is refused."""

    def __init__(self, file, *, source: str = "<pickle>", encoding: str = "bytes") -> None:
        super().__init__(file, encoding=encoding)
        self.source = source

    def find_class(self, module: str, name: str):
        raise UnsafePickleError(self.source, f"global '{module}.{name}'")

    def persistent_load(self, pid):
        raise UnsafePickleError(self.source, "a persistent id")


def _check_plain(value: object, source: str, max_bytes: int | None = None) -> None:
    # Iterative walk: hostile input may nest deeply or reference itself through the memo.
    # Bytes and str are counted at every reference (what a consumer copying them would use);
    # containers once (a consumer walks a shared list once per reference, but it holds only
    # references, each one an opcode in the file).
    stack = [value]
    seen: set[int] = set()
    total = 0
    while stack:
        item = stack.pop()
        if type(item) not in ALLOWED_TYPES:
            raise UnsafePickleError(source, f"a value of type '{type(item).__name__}'")
        if type(item) in (bytes, bytearray, str):
            total += len(item)
            if max_bytes is not None and total > max_bytes:
                raise PickleTooLargeError(
                    f"{source}: refused: references more than {max_bytes} bytes of data, far "
                    "more than the file holds (one object referenced many times?)")
        if type(item) in (list, tuple):
            if id(item) in seen:
                continue
            seen.add(id(item))
            stack.extend(item)


def safe_loads(data: bytes, *, source: str = "<bytes>", encoding: str = "bytes") -> object:
    """Unpickle plain data from ``data``; ``source`` names it in errors.

    Raises ``UnsafePickleError`` (a refused global or type) or ``PickleFormatError`` (corrupt,
    or ``PickleTooLargeError``: the value references more than ``2 * len(data)`` bytes plus
    ``REFERENCED_BYTES_SLACK`` of bytes/str data, see that constant).
    """
    try:
        value = RestrictedUnpickler(io.BytesIO(data), source=source, encoding=encoding).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # any failure parsing untrusted bytes is a format error
        raise PickleFormatError(f"{source}: not a readable pickle "
                                f"({type(exc).__name__}: {exc})") from None
    _check_plain(value, source, max_bytes=2 * len(data) + REFERENCED_BYTES_SLACK)
    return value


def safe_load(path: str | os.PathLike, *, encoding: str = "bytes") -> object:
    """Unpickle plain data from a regular file (see ``safe_loads``); errors name the file."""
    path = Path(path)
    try:  # a device or FIFO (``/dev/zero``) would be read forever
        with open_regular(path, what="pickle file") as handle:
            data = handle.read()
    except FileReadError as exc:
        raise PickleFormatError(str(exc)) from None
    return safe_loads(data, source=str(path), encoding=encoding)
