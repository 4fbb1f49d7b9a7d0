"""Bounded reads of files named by users: small files with a size cap, regular files only.

Descriptions and lists (``model.json``, ``gallery.json``, a YAML config, a list or pairs file)
are read whole. Reading ``/dev/zero``, a FIFO or a mistaken 50 GB file that way never ends or
ends in a ``MemoryError`` after minutes. Every such read goes through this module instead:

* ``open_regular`` opens without blocking (a FIFO with no writer would block ``open`` itself),
  then refuses anything that is not a regular file (devices, FIFOs, sockets, directories);
* ``read_small_bytes`` / ``read_small_text`` also refuse a file larger than the caller's cap,
  checked on the size ``fstat`` reports *and* on the bytes actually read (procfs and growing
  files report a size that is not what a read returns).

Refusals raise :class:`FileReadError`, an ``OSError`` whose ``str`` is ``"<file>: <problem>"``,
so callers that already turn ``OSError`` into their own one-line error need no new branch.
Missing files and permission errors propagate as the usual ``OSError`` subclasses; bytes that
are not UTF-8 raise ``UnicodeDecodeError`` from ``read_small_text``, as ``Path.read_text`` does.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

#: Default cap for a description file (JSON/YAML): far above any real one, far below harm.
SMALL_FILE_LIMIT = 16 * 2**20


class FileReadError(OSError):
    """A file refused before or while reading it (not regular, or larger than allowed)."""

    def __init__(self, path: str | os.PathLike, problem: str, code: int = errno.EINVAL) -> None:
        super().__init__(code, problem, str(path))
        self.path = str(path)
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike, *, what: str = "file") -> BinaryIO:
    """Open ``path`` for binary reading; ``FileReadError`` unless it is a regular file.

    ``what`` names the role in the message ("config", "pairs file"...). The caller closes the
    returned file (use it in a ``with``).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)  # FileNotFoundError / PermissionError propagate as they are
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise FileReadError(path, f"{_kind(mode)}, not a regular {what}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # a regular file: ordinary blocking reads from here on
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_small_bytes(path: str | os.PathLike, *, limit: int = SMALL_FILE_LIMIT,
                     what: str = "file") -> bytes:
    """The whole of regular file ``path``, refused (``FileReadError``) above ``limit`` bytes."""
    with open_regular(path, what=what) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limit:
            raise FileReadError(path, f"{size} bytes is too large for a {what} (limit "
                                      f"{limit} bytes)", errno.EFBIG)
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise FileReadError(path, f"more than {limit} bytes is too large for a {what}",
                            errno.EFBIG)
    return data


def read_small_text(path: str | os.PathLike, *, limit: int = SMALL_FILE_LIMIT,
                    what: str = "file", encoding: str = "utf-8") -> str:
    """``read_small_bytes`` decoded (``UnicodeDecodeError`` as ``Path.read_text`` raises it)."""
    return read_small_bytes(path, limit=limit, what=what).decode(encoding)

