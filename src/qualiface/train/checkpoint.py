"""Atomic checkpoints that resume a run exactly, and safetensors weight exports.

A checkpoint is one file (``checkpoint.pt``) holding only tensors, numbers, strings, lists and
dicts, so it loads with ``torch.load(weights_only=True)`` and never unpickles code. Random
states are stored as tensors: torch CPU/CUDA as their byte tensors, numpy's MT19937 key as an
int64 tensor, Python's ``random`` state as an int64 tensor plus its two scalars.

Writing is atomic: the bytes go to a temporary file in the same folder, are fsync'ed, and the
file is renamed over the old checkpoint (``os.replace`` is atomic on POSIX within one file
system). A crash or an exception while writing leaves the previous checkpoint untouched, and a write
that fails in the OS (a full disk) is reported as such, not as torch's "unexpected pos".
"""

from __future__ import annotations

import errno
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read (the message names the file)."""


# --------------------------------------------------------------------------- atomic files


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


def describe_os_error(exc: OSError) -> str:
    """``exc`` as text, prefixed with "disk full" for ENOSPC / EDQUOT (what the user must fix)."""
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"disk full ({exc})"
    return str(exc)


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> None:
    """Call ``write(file_object)`` on a temp file next to ``path``, fsync, then rename over it.

    An ``OSError`` (also one that ``write`` caught and replaced by its own error) becomes a
    ``CheckpointError`` naming ``path`` and the OS error; the temp file is removed and any
    previous ``path`` is left as it was. Other exceptions from ``write`` propagate unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
        os.replace(tmp_name, path)
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise CheckpointError(f"{path}: could not write: {describe_os_error(exc)}") from exc
        raise
    _fsync_dir(path.parent)


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` atomically to ``path`` (the previous file survives any failure)."""
    state = {"format_version": FORMAT_VERSION, **state}
    try:
        atomic_write(path, lambda handle: torch.save(state, handle))
    except CheckpointError:
        raise  # already names the file and the OS error
    except (RuntimeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: could not write checkpoint: {exc}") from exc


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``; clear errors for missing/corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a qualiface checkpoint (format_version missing or unknown)")
    return state


def export_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Atomically write ``tensors`` (copied to contiguous CPU memory) as a safetensors file."""
    from safetensors.torch import save

    flat = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    payload = save(flat, metadata=meta)
    atomic_write(path, lambda handle: handle.write(payload))


def prefixed(prefix: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{'w': t}`` -> ``{'prefix.w': t}`` (to put backbone and head in one weights file)."""
    return {f"{prefix}.{k}": v for k, v in state_dict.items()}


# --------------------------------------------------------------------------- random states


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Every random state the run depends on, as tensors and scalars."""
    np_kind, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(np_kind),
            "key": torch.from_numpy(np.asarray(np_key, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of ``capture_rng_state`` (named generators are restored in place)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)
    npst = state["numpy"]
    np.random.set_state(
        (npst["kind"], npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"])
    )
    pyst = state["python"]
    random.setstate((pyst["version"], tuple(int(v) for v in pyst["internal"].tolist()), pyst["gauss"]))
    for name, generator in (generators or {}).items():
        saved = state["generators"].get(name)
        if saved is None:
            raise CheckpointError(f"checkpoint has no state for random generator '{name}'")
        generator.set_state(saved)
