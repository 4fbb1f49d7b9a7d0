"""Bounded reads of files named by users, and the one atomic write all qualiface files go through.

Reading
-------

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
``read_small_text_as`` turns all of these into the caller's own error class, one message each.

Writing
-------
Every file qualiface writes (checkpoints and their digests, weights, ``model.json``, the
gallery, evaluation reports and feature caches, record files, ``.bin`` pair sets, benchmark
results) is written with :func:`atomic_write` or its two shorthands :func:`write_bytes_atomic`
and :func:`write_text_atomic`:

* the bytes go to a temporary file in the same folder (``.<name>.<random>.tmp``, created with
  the usual umask permissions, like ``open(path, "w")``), are flushed and fsync'ed, and the file
  is renamed over ``path`` (``os.replace`` is atomic on POSIX within one file system), then the
  folder is fsync'ed. A reader sees the old file or the new one, never a torn one; a crash or an
  error while writing leaves any previous ``path`` as it was and no temporary file behind.
* an ``OSError`` on the way (a full disk, a read-only folder) becomes a :class:`FileWriteError`
  (an ``OSError``) whose ``str`` is ``"<file>: could not write: <problem>"``, with ``disk full``
  spelled out for ``ENOSPC``/``EDQUOT``. Writers that catch the OS error themselves and raise
  their own (torch's zip writer reports only "unexpected pos") still surface the OS error.

A writer that needs a file *name* rather than a handle (the ONNX exporter) uses
:func:`atomic_path`, the same contract as a context manager around a temporary path.
"""

from __future__ import annotations

import errno
import math
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from qualiface.errors import QualifaceError

#: Default cap for a description file (JSON/YAML): far above any real one, far below harm.
SMALL_FILE_LIMIT = 16 * 2**20


class FileReadError(QualifaceError, OSError):
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


def absent_as(path: str | os.PathLike, what: str) -> str:
    """Why ``path``, which is not the folder or regular file wanted, cannot be used
    as ``what``: "<what> not found", or what is there instead (``eval lfw --data pairs.txt``
    said "image folder not found" of a file that exists)."""
    if not os.path.exists(path):
        return f"{what} not found"
    mode = os.stat(path).st_mode
    there = "a file" if stat.S_ISREG(mode) else _kind(mode)
    return f"is {there}, not the {what} expected"


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


def read_small_text_as(path: str | os.PathLike, error_cls: type[Exception], *,
                       what: str = "file", limit: int = SMALL_FILE_LIMIT,
                       missing: str | None = None) -> str:
    """``read_small_text``, with every way it fails raised as ``error_cls("<file>: <problem>")``.

    For readers that report their own error class (``ConfigError``, ``DatasetError``...): a
    missing file (``missing`` is the problem text then, default ``"<what> not found"``), a file
    refused unread (a device, a FIFO, a directory, one over ``limit`` bytes: the
    :class:`FileReadError` message as it is), any other ``OSError`` ("cannot read <what>", with
    the OS reason) and bytes that are not UTF-8 (the reason and the offset of the first bad
    byte). The original exception is not chained: the message says all the user can act on.
    """
    try:
        return read_small_text(path, limit=limit, what=what)
    except FileNotFoundError:
        raise error_cls(f"{path}: {missing or f'{what} not found'}") from None
    except FileReadError as exc:  # its message already names the file and the problem
        raise error_cls(str(exc)) from None
    except OSError as exc:
        raise error_cls(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise error_cls(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


# --------------------------------------------------------------------------- atomic writes


class FileWriteError(QualifaceError, OSError):
    """A file that could not be written; ``str`` is ``"<file>: could not write: <problem>"``.

    ``errno`` is the OS error's, ``path`` the file meant, ``problem`` the OS error as text (with
    "disk full" spelled out, see :func:`describe_os_error`).
    """

    def __init__(self, path: str | os.PathLike, error: OSError) -> None:
        super().__init__(error.errno, describe_os_error(error), str(path))
        self.path = str(path)
        self.problem = describe_os_error(error)

    def __str__(self) -> str:
        return f"{self.path}: could not write: {self.problem}"


def describe_os_error(exc: OSError) -> str:
    """``exc`` as text, prefixed with "disk full" for ENOSPC / EDQUOT (what the user must fix)."""
    if isinstance(exc, FileWriteError):
        return exc.problem
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"disk full ({exc})"
    return str(exc)


def make_folder(path: str | os.PathLike, *, output: str | os.PathLike | None = None) -> Path:
    """``mkdir -p path``; an ``OSError`` becomes a :class:`FileWriteError` naming ``output`` (the
    file the folder is made for, when given) or ``path``.

    An output folder below a file (``--out faces.npz/x``) or in a read-only folder otherwise
    ends in a bare ``NotADirectoryError`` / ``FileExistsError`` traceback from deep inside a
    command, and mkdir's own message names neither the output nor which part is in the way.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            exc = NotADirectoryError(f"{blocker} is a file, not a folder")
        raise FileWriteError(output or path, exc) from None
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _WriteErrorRecorder:
    """A file object that remembers the first ``OSError`` raised by ``write()``.

    torch's zip writer catches the error of a failed write and reports only "unexpected pos",
    which hides the cause (typically a full disk); ``atomic_write`` re-raises the recorded one.
    """

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.first_error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._handle.write(data)
        except OSError as exc:
            if self.first_error is None:
                self.first_error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def create_temp(path: str | os.PathLike) -> tuple[int, Path]:
    """A new, empty ``.<name>.<random>.tmp`` next to ``path``: ``(fd open for writing, path)``.

    ``O_EXCL`` with mode 0o666 lets the umask set the permissions, as for any new file (the
    ``tempfile.mkstemp`` default of 0o600 would make datasets and models private). Used by
    :func:`atomic_write`, and by writers that stream into temp files and rename several of
    them together (``RecordIOWriter``); those remove the temp file on failure themselves.
    """
    path = Path(path)
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
             | getattr(os, "O_BINARY", 0))
    while True:
        temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(temp, flags, 0o666), temp
        except FileExistsError:  # pragma: no cover - 48 random bits collided
            continue


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], *,
                 before_replace: Callable[[Path], None] | None = None) -> Path:
    """Call ``write(file_object)`` on a temp file next to ``path``, fsync, then rename over it.

    ``write`` gets a binary file object. The parent folder is created when missing. An
    ``OSError`` (also one that ``write`` caught and replaced by its own error) becomes a
    :class:`FileWriteError` naming ``path``; the temp file is removed and any previous ``path``
    is left as it was. Other exceptions from ``write`` propagate unchanged (the temp file is
    removed too). ``before_replace(temp_path)`` runs once the bytes are durable and before the
    rename (the checkpoint uses it to record the digest and keep the file it replaces); an
    ``OSError`` it raises is reported the same way. Returns ``path`` as a ``Path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = create_temp(path)
    except OSError as exc:
        raise FileWriteError(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            recorder = _WriteErrorRecorder(handle)
            try:
                write(recorder)
            except Exception:
                if recorder.first_error is not None:
                    raise recorder.first_error from None
                raise
            if recorder.first_error is not None:  # swallowed without any error at all
                raise recorder.first_error
            handle.flush()
            os.fsync(handle.fileno())
        if before_replace is not None:
            before_replace(temp)
        os.replace(temp, path)
    except BaseException as exc:
        try:
            os.unlink(temp)
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, FileWriteError):
            raise FileWriteError(path, exc) from exc
        raise
    _fsync_dir(path.parent)
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary path next to ``path`` for a writer that needs a file name.

    When the ``with`` block ends normally the file is fsync'ed and renamed over ``path`` and the
    folder fsync'ed, as :func:`atomic_write` does; when it raises (a failed export, a check
    that did not pass) the temporary file is removed and any previous ``path`` is left as it
    was. An ``OSError`` of the creation, fsync or rename becomes :class:`FileWriteError`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = create_temp(path)
        os.close(fd)
    except OSError as exc:
        raise FileWriteError(path, exc) from exc
    try:
        yield temp
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, FileWriteError):
            raise FileWriteError(path, exc) from exc
        raise
    _fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`); returns ``path``."""
    return atomic_write(path, lambda handle: handle.write(data))


def write_text_atomic(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (``\\n`` line ends on every platform); returns
    ``path``."""
    return write_bytes_atomic(path, text.encode(encoding))


def json_ready(value: Any) -> Any:
    """``value`` as strict JSON (``allow_nan=False``) can hold it, recursively: NaN and +/-Inf
    (a metric that is undefined, such as a TAR at a FAR too few impostor pairs reach, or
    unbounded) become ``null``; numpy arrays and scalars (anything with ``tolist``) become
    Python values, paths become strings, and mapping keys strings. The one policy for result
    files (evaluation reports, benchmark results)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return json_ready(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
