"""Reading and writing tables of per-face arrays (embed outputs, per-frame files, templates).

One table = a dict of equal-length numpy arrays: 1-D columns (``ids``, ``quality``, ...) and
2-D ones (``embeddings`` (N, D)). Three on-disk forms, chosen by the path:

- ``*.npz``: one ``np.savez`` archive (string columns stored as fixed-width unicode, so
  ``np.load`` never needs pickle);
- ``*.parquet``: a pyarrow table, 2-D arrays as fixed-size list columns;
- anything else: a folder with one ``<column>.npy`` per array.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from qualiface.errors import QualifaceError
from qualiface.files import atomic_path, atomic_write, make_folder


class TableError(QualifaceError, ValueError):
    """A table file that is missing, unreadable, or lacks / mis-shapes a required column."""


def table_format(path: str | Path) -> str:
    """``npz``, ``parquet`` or ``npy-folder`` for a path (by its suffix)."""
    suffix = Path(path).suffix.lower()
    return {".npz": "npz", ".parquet": "parquet"}.get(suffix, "npy-folder")


def _check_lengths(arrays: dict[str, np.ndarray], source: str) -> int:
    # A 0-d array (``np.savez(..., dim=512)``) has no length: a TableError, not len()'s TypeError.
    scalars = [name for name, a in arrays.items() if np.ndim(a) == 0]
    if scalars:
        raise TableError(f"{source}: column(s) {', '.join(repr(n) for n in scalars)} hold a single "
                         "value, not one per row")
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise TableError(f"{source}: columns differ in length: {lengths}")
    return next(iter(lengths.values()), 0)


# Columns every command reads with one meaning: how many dimensions they have and what they hold.
# ``text`` columns name things (an integer is read as its decimal text: id 7 is the name "7");
# ``number`` columns are real numbers (not booleans, complex or text). Other columns are free.
_TEXT_COLUMNS = ("ids", "labels", "track_ids")
_NUMBER_COLUMNS = {"embeddings": 2, "quality": 1, "quality_calibrated": 1, "norms": 1}


def _describe_dtype(dtype: np.dtype) -> str:
    names = {"U": "text", "S": "bytes", "b": "booleans", "c": "complex numbers", "O": "objects",
             "V": "records", "M": "dates", "m": "time spans"}
    return f"{names.get(dtype.kind, 'values')} ({dtype})"


def _check_known_columns(arrays: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Refuse, naming the file and column, a known column of the wrong kind or shape.

    Without this a table of text embeddings was parsed number by number ("0.5" -> 0.5), complex
    ones lost their imaginary part with a warning, booleans searched as 0/1 vectors, integer or
    byte ids gave a ``TypeError`` traceback in ``search enrol``, and a text or 2-D quality column
    failed deep inside the pooling naming no file.
    """
    for name in _TEXT_COLUMNS:
        if name not in arrays or arrays[name].ndim == 0:  # a single value: _check_lengths says so
            continue
        array = arrays[name]
        if array.ndim != 1:
            raise TableError(f"{source}: column '{name}' must be 1-D (one per row), got shape "
                             f"{array.shape}")
        if array.dtype.kind in "iu":
            arrays[name] = array.astype(str)
        elif array.dtype.kind != "U":
            raise TableError(f"{source}: column '{name}' must hold text (or whole numbers), got "
                             f"{_describe_dtype(array.dtype)}")
    for name, ndim in _NUMBER_COLUMNS.items():
        if name not in arrays or arrays[name].ndim == 0:
            continue
        array = arrays[name]
        if array.dtype.kind not in "fiu":
            raise TableError(f"{source}: column '{name}' must hold real numbers, got "
                             f"{_describe_dtype(array.dtype)}")
        if array.ndim != ndim or (ndim == 2 and array.shape[1] == 0):
            want = "(rows, dimension)" if ndim == 2 else "1-D (one per row)"
            raise TableError(f"{source}: column '{name}' must be {want}, got shape {array.shape}")
    return arrays


def _storable(array) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == object:  # python strings -> fixed-width unicode (loadable without pickle)
        array = array.astype(str)
    return array


def table_destination_problem(path: str | Path, columns) -> str | None:
    """Why a table with ``columns`` must not be written to ``path``, or None when it may.

    Only a folder of ``.npy`` files can go wrong: the folder *is* the table, so every ``.npy`` in
    it is read back as a column (one left by an earlier table, e.g. another model's
    ``quality_calibrated``, would join this one), and an existing folder holding other files is
    somebody's data (``embed faces/ --out faces/`` would scatter columns among the images).
    Commands call this before their work, ``write_table`` again before writing. Two more
    destinations fail only when written, so they are named here too, before hours of embedding
    are lost: a ``.parquet`` without pyarrow (an optional dependency), and a folder path that is
    an existing file (``--out emb.npy``: a path without ``.npz`` / ``.parquet`` is a folder).
    """
    path = Path(path)
    fmt = table_format(path)
    if fmt == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401  # lazy: optional dependency (the `parquet` extra)
        except ImportError:
            return (f"{path}: writing .parquet needs pyarrow (pip install 'qualiface[parquet]'); "
                    "name a .npz file or a folder instead")
        return None
    if fmt != "npy-folder" or not path.exists():
        return None
    if not path.is_dir():
        return (f"{path}: exists and is not a folder; a table path without .npz or .parquet is "
                "a folder of .npy columns: name a .npz file, or a new folder")
    entries = sorted(path.iterdir())
    foreign = [entry.name for entry in entries if entry.suffix != ".npy" or not entry.is_file()]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return (f"{path}: is a folder holding other files ({shown}); a table folder holds only its "
                "own .npy columns: write to a new folder, or name a .npz or .parquet file")
    stale = [entry.name for entry in entries if entry.stem not in set(columns)]
    if stale:
        return (f"{path}: holds {', '.join(stale)}, which this table does not have and would be "
                "read back as its columns; remove them or write to a new folder")
    return None


def write_table(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write equal-length arrays (1-D or 2-D) to ``path`` in the format its suffix names."""
    path = Path(path)
    arrays = {name: _storable(a) for name, a in arrays.items()}
    _check_lengths(arrays, str(path))
    fmt = table_format(path)
    if fmt == "parquet":  # pyarrow missing: one line naming the table, not an ImportError
        problem = table_destination_problem(path, arrays)
        if problem:
            raise TableError(problem)
    make_folder(path.parent, output=path)  # FileWriteError naming the table, as the writes below
    if fmt == "npz":
        atomic_write(path, lambda handle: np.savez(handle, **arrays))
    elif fmt == "parquet":
        import pyarrow as pa  # lazy: optional dependency (the `parquet` extra)
        import pyarrow.parquet as pq  # lazy: optional dependency (the `parquet` extra)

        columns = {}
        for name, array in arrays.items():
            if array.ndim == 1:
                columns[name] = pa.array(array)
            elif array.ndim == 2:
                flat = pa.array(np.ascontiguousarray(array).reshape(-1))
                columns[name] = pa.FixedSizeListArray.from_arrays(flat, array.shape[1])
            else:
                raise TableError(f"{path}: column '{name}' has {array.ndim} dimensions (1 or 2 allowed)")
        table = pa.table(columns)
        atomic_write(path, lambda handle: pq.write_table(table, handle))
    else:
        problem = table_destination_problem(path, arrays)
        if problem:
            raise TableError(problem)
        make_folder(path)
        # Every column is written under a temporary name first and the renames come only once
        # all are on disk: a failure or kill while writing (seconds for large embeddings) leaves
        # the earlier table whole, never new columns beside old ones of the same length, which
        # would read back as one table.
        with contextlib.ExitStack() as renames:
            for name, array in arrays.items():
                temp = renames.enter_context(atomic_path(path / f"{name}.npy"))
                with open(temp, "wb") as handle:
                    np.save(handle, array, allow_pickle=False)
    return path


def read_table(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Read a table written by :func:`write_table` (or by hand in the same layout).

    ``required`` column names are checked; a missing one raises :class:`TableError` naming the
    file and listing the columns it has.
    """
    path = Path(path)
    if not path.exists():
        raise TableError(f"{path}: no such file or folder")
    fmt = table_format(path)
    try:
        if fmt == "npz":
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        elif fmt == "parquet":
            import pyarrow.parquet as pq  # lazy: optional dependency (the `parquet` extra)

            table = pq.read_table(path)
            arrays = {}
            for name in table.column_names:
                column = table.column(name).combine_chunks()
                flat = column.flatten() if hasattr(column.type, "list_size") else column
                # pyarrow turns a missing value into NaN, or into the text 'None' once strings
                # become numpy unicode: an id or a number that was never there.
                missing = column.null_count + (flat.null_count if flat is not column else 0)
                if missing:
                    raise TableError(f"{path}: column '{name}' has {missing} missing (null) value(s)")
                if flat is not column:
                    values = flat.to_numpy(zero_copy_only=False)
                    arrays[name] = values.reshape(len(column), column.type.list_size)
                else:
                    arrays[name] = column.to_numpy(zero_copy_only=False)
                if arrays[name].dtype == object:  # pyarrow strings -> fixed-width unicode
                    arrays[name] = arrays[name].astype(str)
        else:
            if not path.is_dir():
                raise TableError(f"{path}: expected a .npz, a .parquet or a folder of .npy files")
            arrays = {p.stem: np.load(p, allow_pickle=False) for p in sorted(path.glob("*.npy"))}
    except TableError:
        raise
    except Exception as exc:  # numpy / pyarrow raise many types for corrupt files
        raise TableError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    missing = [name for name in required if name not in arrays]
    if missing:
        raise TableError(f"{path}: missing column(s) {', '.join(missing)}; it has: {', '.join(sorted(arrays)) or 'none'}")
    arrays = _check_known_columns(arrays, str(path))
    _check_lengths(arrays, str(path))
    return arrays
