"""Atomic checkpoints that resume a run exactly, and safetensors weight exports.

A checkpoint is one file (``checkpoint.pt``) holding only tensors, numbers, strings, lists and
dicts, so it loads with ``torch.load(weights_only=True)`` and never unpickles code. Random
states are stored as tensors: torch CPU/CUDA as their byte tensors, numpy's MT19937 key as an
int64 tensor, Python's ``random`` state as an int64 tensor plus its two scalars.

Writing is atomic (:func:`qualiface.files.atomic_write`): the bytes go to a temporary file in the
same folder, are fsync'ed, and the file is renamed over the old checkpoint. A crash or an
exception while writing leaves the previous checkpoint untouched, and a write that fails in the
OS (a full disk) is reported as such (a ``CheckpointError``), not as torch's "unexpected pos".

Integrity. torch does not check its zip CRCs, so a flipped bit on disk would resume silently with
a wrong weight or counter. Every checkpoint's sha256 is recorded in ``<name>.sha256`` (the
``sha256sum`` format: ``<hex>  <file name>`` lines) and checked before the file is read. The
checkpoint it replaces is kept as ``<stem>.previous<suffix>`` (``checkpoint.previous.pt``), so
``load_for_resume`` can fall back to it, with a warning, when the latest one is corrupt or missing.
The digest file is written first, allowing the old and the new content for each name, and
narrowed after the renames, so a crash at any point leaves every file that exists verifiable;
the previous version is kept through a hard link, so once written ``checkpoint.pt`` never goes
missing, not even for the moment between the two renames.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from qualiface.errors import QualifaceError
from qualiface.files import FileWriteError, atomic_write, describe_os_error
from qualiface.methods import options_section

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1
PREVIOUS_TAG = ".previous"
DIGEST_SUFFIX = ".sha256"


class CheckpointError(QualifaceError, RuntimeError):
    """A checkpoint that cannot be written or read (the message names the file)."""


class CorruptCheckpointError(CheckpointError):
    """The file is not the checkpoint that was written (digest mismatch, unreadable, torn):
    ``load_for_resume`` falls back to the previous checkpoint for these, and only these."""


# --------------------------------------------------------------------------- atomic files


def _write_atomic(path: str | Path, write: Callable[[Any], None], *,
                  before_replace: Callable[[Path], None] | None = None) -> None:
    """:func:`qualiface.files.atomic_write`, its ``FileWriteError`` raised as a
    ``CheckpointError`` with the same message (the file, then the OS error or "disk full")."""
    try:
        atomic_write(path, write, before_replace=before_replace)
    except FileWriteError as exc:
        raise CheckpointError(str(exc)) from exc


# --------------------------------------------------------------------------- digests


def previous_path(path: str | Path) -> Path:
    """Where the checkpoint that ``path`` replaced is kept: ``checkpoint.pt`` ->
    ``checkpoint.previous.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}{PREVIOUS_TAG}{path.suffix}")


def digest_path(path: str | Path) -> Path:
    """The digest file that vouches for ``path`` and for its previous version."""
    path = Path(path)
    if path.stem.endswith(PREVIOUS_TAG):
        path = path.with_name(path.stem[: -len(PREVIOUS_TAG)] + path.suffix)
    return path.with_name(path.name + DIGEST_SUFFIX)


def file_digest(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """sha256 of a file as hex, read in chunks (a checkpoint may be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _read_digests(path: Path) -> dict[str, set[str]]:
    """``{file name: digests accepted for it}`` from ``digest_path(path)``; {} when absent.

    A line that is not ``<64 hex>  <name>`` vouches for nothing (the file it was meant for then
    fails verification instead of passing it).
    """
    try:
        text = digest_path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CheckpointError(f"{digest_path(path)}: cannot read ({describe_os_error(exc)})") from None
    recorded: dict[str, set[str]] = {}
    for line in text.splitlines()[:16]:  # two names, at most two digests each when intact
        digest, sep, name = line.partition("  ")
        if sep and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
            recorded.setdefault(name, set()).add(digest)
    return recorded


def _write_digests(path: Path, recorded: dict[str, set[str]]) -> None:
    text = "".join(f"{digest}  {name}\n" for name in sorted(recorded)
                   for digest in sorted(recorded[name]))
    _write_atomic(digest_path(path), lambda handle: handle.write(text.encode("utf-8")))


def verify_digest(path: str | Path) -> bool:
    """Check ``path`` against its recorded sha256: True when it matches, False when no digest
    was recorded (an older qualiface, or the file was copied without its ``.sha256``).

    Raises ``CorruptCheckpointError`` naming the file when the content differs from what was
    written.
    """
    path = Path(path)
    accepted = _read_digests(path).get(path.name)
    if not accepted:
        return False
    try:
        actual = file_digest(path)
    except OSError as exc:
        raise CorruptCheckpointError(f"{path}: cannot read ({describe_os_error(exc)})") from None
    if actual not in accepted:
        raise CorruptCheckpointError(
            f"{path}: sha256 {actual[:16]}... does not match the digest recorded when it was "
            f"written ({digest_path(path).name}); the file is corrupt (a flipped bit, a torn or "
            f"partial copy)")
    return True


def _keep_as_previous(path: Path, previous: Path) -> None:
    """Make ``previous`` hold what ``path`` holds now, without ``path`` ever going missing.

    A hard link to the current file is renamed over ``previous``, so ``path`` keeps its content
    until the new checkpoint replaces it: a process killed between the two renames still leaves
    ``checkpoint.pt`` in place (a plain rename would leave only the previous file for that
    moment). On a filesystem without hard links it falls back to that rename, which
    ``load_for_resume`` survives through the previous file.
    """
    link = path.with_name(f".{path.name}.{os.getpid()}.previous.tmp")
    try:
        link.unlink(missing_ok=True)  # left by a process that was killed right here
        os.link(path, link)
    except OSError:
        os.replace(path, previous)
        return
    try:
        os.replace(link, previous)
    except BaseException:
        link.unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, state: dict, *, keep_previous: bool = True) -> None:
    """Write ``state`` atomically to ``path`` (the previous file survives any failure).

    The sha256 of the new file is recorded in ``digest_path(path)``; with ``keep_previous`` the
    file it replaces becomes ``previous_path(path)`` (the resume fallback).
    """
    path = Path(path)
    state = {"format_version": FORMAT_VERSION, **state}
    previous = previous_path(path)
    recorded = _read_digests(path)

    def publish(temp: Path) -> None:
        new = file_digest(temp)
        old_current = recorded.get(path.name, set())
        rotate = keep_previous and path.is_file()
        # While the renames below are in flight, each name may hold its old or its new content.
        during = {path.name: {*old_current, new}}
        if rotate:
            during[previous.name] = {*recorded.get(previous.name, set()), *old_current}
        elif previous.is_file() and previous.name in recorded:
            during[previous.name] = recorded[previous.name]
        _write_digests(path, during)
        if rotate:
            _keep_as_previous(path, previous)
        final = {path.name: {new}}
        if previous.name in during:
            final[previous.name] = old_current if rotate else during[previous.name]
        recorded.clear()
        recorded.update(final)

    try:
        _write_atomic(path, lambda handle: torch.save(state, handle), before_replace=publish)
    except CheckpointError:
        raise  # already names the file and the OS error
    except (RuntimeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: could not write checkpoint: {exc}") from exc
    _write_digests(path, {name: digests for name, digests in recorded.items() if digests})


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *,
                    verify: bool = True) -> dict:
    """Read a checkpoint with ``weights_only=True``; clear errors for missing/corrupt files.

    The file is checked against its recorded sha256 first (``verify_digest``; ``verify=False``
    when the caller just did); a mismatch or an unreadable file raises
    ``CorruptCheckpointError``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    if verify:
        verify_digest(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / foreign files
        raise CorruptCheckpointError(f"{path}: not a readable checkpoint ({_load_failure(exc)})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a qualiface checkpoint (format_version missing or unknown)")
    return state


def _load_failure(exc: Exception) -> str:
    """torch's load error in one line: its weights-only refusals span a dozen lines of advice
    (including "load with weights_only=False", which is exactly what must not be done here)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return f"{type(exc).__name__}: {line.split('. Please')[0]}"
    first = lines[0] if lines else ""
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


def has_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` or its kept previous version exists (what ``load_for_resume`` needs)."""
    return Path(path).is_file() or previous_path(path).is_file()


@dataclass
class ResumePoint:
    """The checkpoint a resume starts from: its ``state``, the file it came from, and warnings
    (a fallback to the previous checkpoint, a file without a recorded digest) to show the user."""

    state: dict
    path: Path
    warnings: list[str] = field(default_factory=list)


def load_for_resume(path: str | Path, map_location: str | torch.device = "cpu") -> ResumePoint:
    """The latest verified checkpoint: ``path``, else (corrupt or missing) its previous version.

    Only corruption falls back: a checkpoint that reads fine but does not fit the run is the
    caller's error to report. Raises ``CheckpointError`` naming every file tried when neither
    is usable.
    """
    path = Path(path)
    problems: list[str] = []
    for candidate in (path, previous_path(path)):
        if not candidate.is_file():
            problems.append(f"{candidate}: missing")
            continue
        try:
            verified = verify_digest(candidate)
            state = load_checkpoint(candidate, map_location, verify=False)
        except CorruptCheckpointError as exc:
            problems.append(str(exc))
            continue
        notes = [f"{problem}; resuming from {candidate} instead" for problem in problems]
        if not verified:
            notes.append(f"{candidate}: no sha256 recorded in {digest_path(candidate).name}; "
                         "its integrity was not verified")
        return ResumePoint(state, candidate, notes)
    raise CheckpointError("no usable checkpoint: " + "; ".join(problems))


def require_keys(state: dict, keys: tuple[str, ...], path: str | Path) -> None:
    """``CheckpointError`` naming the first of ``keys`` that ``state`` lacks (a checkpoint from
    another tool or version would otherwise fail with a bare ``KeyError`` deep in the resume)."""
    for key in keys:
        if key not in state:
            raise CheckpointError(f"{path}: missing key '{key}' (not a complete qualiface "
                                  f"training checkpoint)")


def load_module_state(module: torch.nn.Module, state: Any, *, what: str, path: str | Path) -> None:
    """``module.load_state_dict(state)`` with one clear line when the tensors do not fit (another
    architecture or size) instead of torch's multi-line list of every mismatching key."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: '{what}' is a {type(state).__name__}, not a state dict")
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    reshaped = [key for key in expected if key in state and isinstance(state[key], torch.Tensor)
                and tuple(state[key].shape) != tuple(expected[key].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (first '{missing[0]}')")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first '{unexpected[0]}')")
    if reshaped:
        key = reshaped[0]
        problems.append(f"{len(reshaped)} of another shape (first '{key}': "
                        f"{tuple(state[key].shape)} saved, {tuple(expected[key].shape)} here)")
    if problems:
        raise CheckpointError(f"{path}: the {what} weights are from another architecture: "
                              + "; ".join(problems))
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot load the {what} weights ({first_line})") from None


#: What a training run leaves in its output folder that a new run would overwrite or mix with
#: (``metrics.jsonl`` is appended to, so two runs would interleave in one curve).
RUN_FILES = (CHECKPOINT_NAME, previous_path(CHECKPOINT_NAME).name, "metrics.jsonl",
             "weights.safetensors", "final.safetensors")


def existing_run_files(out_dir: str | Path) -> list[Path]:
    """The ``RUN_FILES`` and per-rank checkpoints already in ``out_dir`` (a previous run)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [out_dir / name for name in RUN_FILES if (out_dir / name).is_file()]
    # A start that failed before its first record (too few images for one step, a bad device)
    # leaves an empty metrics.jsonl: nothing to lose, so it must not block the corrected rerun.
    found = [p for p in found if not (p.name == "metrics.jsonl" and p.stat().st_size == 0)]
    return found + sorted(out_dir.glob("checkpoint-rank*.pt"))


def remove_run_files(out_dir: str | Path) -> list[Path]:
    """Delete a previous run's files (``existing_run_files`` plus checkpoint digests) so a fresh
    run neither mixes its metrics with the old ones nor leaves an old checkpoint to resume.

    Only those named files go: never folders, never anything else the user keeps there.
    """
    out_dir = Path(out_dir)
    doomed = existing_run_files(out_dir)
    if out_dir.is_dir():
        doomed += sorted(out_dir.glob(f"checkpoint*.pt{DIGEST_SUFFIX}"))
    for path in doomed:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot remove ({describe_os_error(exc)})") from None
    return doomed


#: Top-level keys ``Trainer.load_checkpoint`` reads from the main checkpoint.
RESUME_KEYS = ("phase_index", "phase_step", "global_step", "nonfinite_streak", "world_size",
               "backbone", "head", "optimizer", "scaler", "rng", "data", "config")

# Config keys that may differ between the run that wrote a checkpoint and the one resuming it:
# where output goes, how often to log/evaluate/checkpoint, workers, and the validation set.
# Everything else changes what is trained, so a resume across such a change is refused.
RESUME_MAY_CHANGE = ("train.resume", "train.output_dir", "train.progress", "train.log_every",
                     "train.eval_every", "train.checkpoint_every", "train.device",
                     "train.max_nonfinite_steps", "train.compile", "data.num_workers",
                     "data.cache", "data.cache_max_gb", "distributed.backend",
                     "distributed.timeout_s", "val")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; an empty mapping contributes no keys, so a
    parameter added to an empty ``model.params`` is reported by its own name."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


class _Absent:
    def __repr__(self) -> str:
        return "absent"


ABSENT = _Absent()


def config_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, current value)`` for every key that differs, except
    ``RESUME_MAY_CHANGE`` (a key or a whole section); ``ABSENT`` stands for a missing key."""
    old, new = _flatten(saved), _flatten(current)

    # ``pipeline`` holds one options section per *registered* method, and only the sections
    # the run reads shape training: the scheduled one (``pipeline.name``) and the one of the
    # head's method, read even unscheduled (QGFace's degradation preset under
    # ``pipeline.name=none``). The others (a plug-in registered in one process only, an option
    # added to another method since) are not differences. A change of ``pipeline.name`` or of
    # the head itself still is.
    active: set = set()
    for side in (saved, current):
        if isinstance(side, dict):
            active.add((side.get("pipeline") or {}).get("name"))
            head = (side.get("head") or {}).get("name")
            if isinstance(head, str):
                active.add(options_section(head))

    def may_change(key: str) -> bool:
        if key.startswith("pipeline.") and key.count(".") >= 2 and key.split(".")[1] not in active:
            return True
        return any(key == allowed or key.startswith(allowed + ".") for allowed in RESUME_MAY_CHANGE)

    keys = list(old) + [key for key in new if key not in old]
    return [(key, old.get(key, ABSENT), new.get(key, ABSENT)) for key in keys
            if not may_change(key) and old.get(key, ABSENT) != new.get(key, ABSENT)]


def check_resume_config(path: str | Path, saved: Any, current: dict) -> None:
    """Refuse to resume ``path`` under a config that differs in a key that changes training.

    The message names the first differing key with both values (model keys first: a backbone
    change is the likeliest), and how many more differ.
    """
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: missing key 'config' (cannot tell which run wrote it)")
    differences = config_differences(saved, current)
    if not differences:
        return
    differences.sort(key=lambda item: not item[0].startswith("model."))
    key, old, new = differences[0]
    more = f" (and {len(differences) - 1} more key(s))" if len(differences) > 1 else ""
    what = "architecture" if key.startswith("model.") else "config"
    raise CheckpointError(f"{path}: written with another {what}: {key} is {old!r} in the "
                          f"checkpoint, {new!r} now{more}; resume with the run's config "
                          f"(config.yaml next to it) or start a new run (--overwrite or another "
                          f"train.output_dir)")


def export_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Atomically write ``tensors`` (copied to contiguous CPU memory) as a safetensors file."""
    flat = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    payload = safetensors.torch.save(flat, metadata=meta)
    _write_atomic(path, lambda handle: handle.write(payload))


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


# ---------------------------------------------------------------------- a run's checkpoint files

#: What a rank > 0 keeps in its own file: its head shard's optimizer moments and its RNG streams.
RANK_KEYS = ("global_step", "optimizer", "rng")


def rank_checkpoint_path(out_dir: str | Path, rank: int) -> Path:
    """``checkpoint-rank<r>.pt``: the per-rank part of a multi-process run's checkpoint."""
    return Path(out_dir) / f"checkpoint-rank{rank}.pt"


def save_run_checkpoint(out_dir: str | Path, state: dict, *, rank: int, world_size: int) -> None:
    """Rank 0 writes ``checkpoint.pt`` (``state``: see ``RESUME_KEYS``) and the weights as
    ``weights.safetensors``; ranks > 0 of a multi-process run write their ``RANK_KEYS``."""
    out_dir = Path(out_dir)
    if rank == 0:
        save_checkpoint(out_dir / CHECKPOINT_NAME, state)
        weights = {**prefixed("backbone", state["backbone"]), **prefixed("head", state["head"])}
        export_safetensors(out_dir / "weights.safetensors", weights, {"global_step": state["global_step"]})
    elif world_size > 1:
        save_checkpoint(rank_checkpoint_path(out_dir, rank), {k: state[k] for k in RANK_KEYS})


def load_run_checkpoint(out_dir: str | Path, current_config: dict, *, rank: int, world_size: int,
                        note: Callable[[int, str], None]) -> tuple[dict, Path]:
    """The state to resume from, and the file it came from: the latest checkpoint, or the previous
    one when the latest is corrupt or missing (``load_for_resume``; ``note`` gets the warning).
    A checkpoint of another config or architecture, or with keys missing, is refused in one
    line. A rank > 0 takes its optimizer moments and RNG from its own file; on another world
    size the head re-shards from its full state but the optimizer moments are reset (empty)."""
    out_dir = Path(out_dir)
    main_path = out_dir / CHECKPOINT_NAME
    point = load_for_resume(main_path)
    state, source = point.state, point.path
    require_keys(state, RESUME_KEYS, source)
    step = state["global_step"] if isinstance(state["global_step"], int) else 0
    for warning in point.warnings:
        note(step, f"warning: {warning}")
    check_resume_config(source, state["config"], current_config)
    if rank > 0 and state["world_size"] == world_size:
        # Per-rank files exist only for the world size that wrote them.
        rank_path = rank_checkpoint_path(out_dir, rank)
        if source != main_path:  # fell back: the ranks' files fall back too
            rank_path = previous_path(rank_path)
        rank_state = load_checkpoint(rank_path)
        if rank_state["global_step"] != state["global_step"]:
            raise CheckpointError(
                f"{out_dir}: rank {rank}'s checkpoint is from step "
                f"{rank_state['global_step']}, the main one from {state['global_step']}"
            )
        state.update({k: rank_state[k] for k in ("optimizer", "rng")})
    if state["world_size"] != world_size:
        state["optimizer"] = {}
        if rank > 0:
            # The main file holds rank 0's random streams; restoring them on every rank would
            # give all ranks the same flips and degraded views from here on. ``rng: None`` tells
            # the trainer to start this rank's streams afresh (seeded by seed, rank and step).
            state["rng"] = None
        note(state["global_step"], f"world size changed {state['world_size']} -> "
             f"{world_size}: optimizer moments reset, ranks > 0 draw fresh augmentation streams")
    return state, source
