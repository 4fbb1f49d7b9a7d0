"""1:N gallery search over L2-normalised templates: exact (torch) or faiss (flat / IVF).

A :class:`Gallery` holds template ids and embeddings (normalised on enrolment, so the inner
product is the cosine similarity) and answers top-k queries. Backends:

- ``exact``: chunked matrix product + ``torch.topk``; exact, fine up to ~1e5 templates.
- ``flat``: faiss ``IndexFlatIP``; exact, SIMD-optimised.
- ``ivf``: faiss ``IndexIVFFlat`` (inner product) with ``nlist`` cells, ``nprobe`` cells visited
  per query; approximate, exact when ``nprobe == nlist``. For large galleries.

On disk a gallery is a folder: ``gallery.json`` (format, backend, parameters), an arrays file
(ids, optional template quality, and the embeddings for ``exact``) and a faiss index file for
the faiss backends. No pickle anywhere.

Writes never lose or tear a gallery. Each save writes its data files under fresh names
(``gallery-<token>.npz``, ``index-<token>.faiss``), then atomically replaces ``gallery.json``,
which names them: a reader sees the old gallery or the new one, never a mix, and a crash leaves
the old one intact. Writers hold an exclusive ``flock`` on ``.lock`` in the folder for the whole
read-modify-write of :func:`enrol` (so concurrent enrolments serialise instead of one silently
replacing the other), readers a shared one (so a writer does not delete the files they are
reading). Format version 1 folders (fixed names ``gallery.npz`` / ``index.faiss``) still load.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qualiface.errors import QualifaceError
from qualiface.files import (
    FileWriteError,
    atomic_write,
    make_folder,
    read_small_text_as,
    write_bytes_atomic,
    write_text_atomic,
)
from qualiface.scoring.identification import SearchResult as Ranked
from qualiface.scoring.identification import rank_accuracy
from qualiface.scoring.similarity import similarity_blocks

GALLERY_FORMAT = "qualiface-gallery"
GALLERY_VERSION = 2
GALLERY_JSON = "gallery.json"
LOCK_FILE = ".lock"
#: A gallery.json holds parameters and metadata only; anything larger is not one.
GALLERY_JSON_LIMIT = 4 * 2**20
# Version 1 galleries stored their data under these fixed names.
_V1_FILES = {"arrays": "gallery.npz", "index": "index.faiss"}
BACKENDS = ("exact", "flat", "ivf")
AUTO_EXACT_LIMIT = 100_000  # above this many templates "auto" picks IVF
DEFAULT_NPROBE = 8  # IVF cells a query visits unless the user says otherwise


class GalleryError(QualifaceError, ValueError):
    """Bad gallery input or a gallery folder that cannot be loaded."""


@dataclass
class SearchResult:
    """Top-k answers for Q queries.

    scores:  (Q, k') float32 cosine similarities, best first (-inf where fewer than k found);
             k' = min(k, gallery size) columns.
    indices: (Q, k') int64 rows of the gallery (-1 where fewer than k found).
    ids:     (Q, k') template ids ('' where fewer than k found).
    """

    scores: np.ndarray
    indices: np.ndarray
    ids: np.ndarray


def rank_rates(result: SearchResult, labels, enrolled_ids, ranks=(1, 5)) -> tuple[dict[int, float], int]:
    """Closed-set rank-k of labelled probes -> ``({k: rate}, number of probes counted)``.

    Counted are the probes whose label is an enrolled template id; a probe's rank is 1 + the
    number of other ids scoring at least as high as its own best one (ties count against the
    probe, as in ``qualiface.scoring.identification``), and the rate for ``k`` is the share of
    them at rank <= k. ``result`` must hold at least ``max(ranks) + 1`` columns (or the whole
    gallery) for the rates to be exact: one column past the last rank shows whether a tie runs
    on. No counted probe: ``({}, 0)``.
    """
    labels = np.asarray(labels).astype(str)
    if labels.shape != (result.ids.shape[0],):
        raise GalleryError(f"{labels.size} labels for {result.ids.shape[0]} probes")
    mated = np.isin(labels, np.asarray(enrolled_ids).astype(str))
    if not mated.any():
        return {}, 0
    hit = result.ids == labels[:, None]
    found, position = hit.any(axis=1), hit.argmax(axis=1)
    mated_scores = np.where(found, result.scores[np.arange(len(labels)), position], -np.inf)
    # every other returned id scoring at least as high as the best mate: one tied with it
    # counts against the probe wherever the backend happened to list it
    beaten_by = ((result.scores >= mated_scores[:, None]) & ~hit & (result.ids != "")).sum(axis=1)
    # the rank of the probe's own id: past the last result when not returned, 0 (a probe
    # without a mate, not counted) when not enrolled
    rank = np.where(found, beaten_by + 1, result.ids.shape[1] + 1) * mated
    ranked = Ranked(rank, mated_scores, result.scores[:, 0])
    return rank_accuracy(ranked, ranks), int(mated.sum())


def _normalise(embeddings, what: str, ids: np.ndarray | None = None) -> np.ndarray:
    array = np.asarray(embeddings.detach().cpu() if hasattr(embeddings, "detach") else embeddings, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] == 0:
        raise GalleryError(f"{what} must be a non-empty (N, D) array, got shape {array.shape}")
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        raise GalleryError(f"{what}: row {int(np.flatnonzero(~finite)[0])} contains NaN or infinite "
                           f"values ({int((~finite).sum())} such row(s))")
    # float64: the squares of tiny float32 values (1e-30) would underflow to a zero norm.
    norms = np.linalg.norm(array.astype(np.float64), axis=1, keepdims=True)
    # A zero row has no direction: it scores 0 against everything, so as a template it sits in
    # every result list at cosine 0, and as a probe its "matches" are decided by position.
    zero = np.flatnonzero(~array.any(axis=1))
    if zero.size:
        named = f" (id {str(ids[zero[0]])!r})" if ids is not None and ids.shape == (array.shape[0],) else ""
        raise GalleryError(f"{what}: row {int(zero[0])}{named} is all zeros ({zero.size} such row(s)); "
                           "a zero feature has no direction to compare")
    return np.ascontiguousarray(array / norms, dtype=np.float32)


#: Queries per step of ``Gallery.search`` (one progress-bar update each).
SEARCH_CHUNK = 8192


def exact_topk(queries: np.ndarray, gallery: np.ndarray, k: int, chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k: queries (Q, D), gallery (N, D) -> scores, indices (Q, k).

    Scores come from ``scoring.similarity.similarity_blocks``: each depends on its two rows
    alone, so a template and an identical copy score the same wherever they stand (a float32
    matrix product could put them 1 float32 step apart by position, and ``rank_rates``, which
    counts ties against the probe, would miss the tie). Queries are scored ``chunk_size`` at a
    time so the score matrix stays at chunk x N.
    """
    k = min(k, gallery.shape[0])
    g = torch.from_numpy(gallery)
    scores_out, index_out = [], []
    for _, scores in similarity_blocks(torch.from_numpy(queries), g, chunk_size):
        top = torch.topk(scores, k, dim=1)
        scores_out.append(top.values.numpy())
        index_out.append(top.indices.numpy())
    return np.concatenate(scores_out), np.concatenate(index_out).astype(np.int64)


def _require_faiss():
    try:
        import faiss  # lazy: optional dependency (the `faiss` extra)
    except ImportError:
        raise GalleryError("faiss is not installed: pip install 'qualiface[faiss]' (or use --backend exact)") from None
    return faiss


class Gallery:
    """Enrolled templates and a search backend. Build with :meth:`build`, reload with :meth:`load`."""

    def __init__(
        self,
        ids: np.ndarray,
        embeddings: np.ndarray | None,
        backend: str,
        *,
        index=None,
        nlist: int | None = None,
        nprobe: int = 1,
        quality: np.ndarray | None = None,
        metadata: dict | None = None,
    ) -> None:
        self.ids = np.asarray(ids).astype(str)
        self.embeddings = embeddings
        self.backend = backend
        self.index = index
        self.nlist = nlist
        self.nprobe = nprobe
        self.quality = quality
        self.metadata = metadata or {}

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1] if self.embeddings is not None else self.index.d)

    @classmethod
    def build(
        cls,
        ids,
        embeddings,
        *,
        backend: str = "auto",
        nlist: int | None = None,
        nprobe: int | None = None,
        quality=None,
        metadata: dict | None = None,
        seed: int = 0,
    ) -> Gallery:
        """Enrol templates: ``ids`` (N,) strings, ``embeddings`` (N, D) (normalised here).

        ``backend``: ``exact`` | ``flat`` | ``ivf`` | ``auto`` (exact up to 100k templates,
        else IVF). ``nlist`` (IVF cells) defaults to ~4 sqrt(N), capped so each cell is trained
        on >= 39 points where possible; ``nprobe`` cells are visited per query (None: 8, or
        every cell of a gallery with fewer, which is then exact; a number above ``nlist`` is
        refused).
        """
        ids = np.asarray(ids).astype(str)
        vectors = _normalise(embeddings, "gallery embeddings", ids)
        if ids.shape != (vectors.shape[0],):
            raise GalleryError(f"{ids.shape[0] if ids.ndim else 0} ids for {vectors.shape[0]} embeddings")
        names, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            # As enrolling an id a second time is refused (``enrol``): one template per id, so
            # a result's id names one template. Several images of one identity are pooled first
            # (``scoring.aggregation.aggregate_templates``, as ``search enrol`` does).
            twice = names[counts > 1]
            shown = ", ".join(map(str, twice[:5])) + (" ..." if twice.size > 5 else "")
            raise GalleryError(f"{twice.size} template id(s) given more than once: {shown} (pool each "
                               "identity's images into one template first, e.g. aggregate_templates)")
        if backend == "auto":
            backend = "exact" if vectors.shape[0] <= AUTO_EXACT_LIMIT else "ivf"
        if backend not in BACKENDS:
            raise GalleryError(f"unknown backend {backend!r}; known: auto, {', '.join(BACKENDS)}")
        if quality is not None:
            quality = np.asarray(quality, dtype=np.float32)
            if quality.shape != ids.shape:
                raise GalleryError(f"quality has shape {quality.shape}, expected ({ids.shape[0]},)")
        if backend == "exact":
            return cls(ids, vectors, backend, quality=quality, metadata=metadata)
        faiss = _require_faiss()
        dim = vectors.shape[1]
        if backend == "flat":
            index = faiss.IndexFlatIP(dim)
            index.add(vectors)
            return cls(ids, None, backend, index=index, quality=quality, metadata=metadata)
        n = vectors.shape[0]
        if nlist is None:
            nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        if not 1 <= nlist <= n:
            raise GalleryError(f"nlist must be in [1, {n}] (number of templates), got {nlist}")
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed  # reproducible k-means cells
        index.train(vectors)
        index.add(vectors)
        gallery = cls(ids, None, backend, index=index, nlist=nlist, quality=quality, metadata=metadata)
        gallery.set_nprobe(min(DEFAULT_NPROBE, nlist) if nprobe is None else nprobe)
        return gallery

    def set_nprobe(self, nprobe: int) -> None:
        """IVF only: how many cells a query visits (1..nlist; nlist = exact)."""
        if self.backend != "ivf":
            return
        if not 1 <= nprobe <= self.nlist:
            raise GalleryError(f"nprobe must be in [1, {self.nlist}] (nlist), got {nprobe}")
        self.nprobe = int(nprobe)
        self.index.nprobe = self.nprobe

    def search(self, queries, k: int = 5, *, progress: bool = False) -> SearchResult:
        """Top-``k`` templates for each query embedding (Q, D) (normalised here); ``progress``:
        a bar over the queries (searched ``SEARCH_CHUNK`` at a time; each row's answer is the
        same however the queries are split)."""
        q = _normalise(queries, "query embeddings")
        if q.shape[1] != self.dim:
            raise GalleryError(f"queries have dimension {q.shape[1]}, the gallery {self.dim}")
        if k < 1:
            raise GalleryError(f"k must be >= 1, got {k}")
        from qualiface.progress import make_progress  # lazy: rich only when searching

        parts = []
        with make_progress(enabled=progress, unit="query") as bar:
            task = bar.add_task("searching", total=len(q))
            for start in range(0, len(q), SEARCH_CHUNK):
                chunk = q[start:start + SEARCH_CHUNK]
                if self.backend == "exact":
                    parts.append(exact_topk(chunk, self.embeddings, k))
                else:
                    found_scores, found_rows = self.index.search(chunk, min(k, self.size))
                    parts.append((found_scores, found_rows.astype(np.int64)))
                bar.advance(task, len(chunk))
        if parts:
            scores, indices = (np.concatenate(p) for p in zip(*parts))
        else:  # no queries: the shapes one search call gives
            scores = np.zeros((0, min(k, self.size)), np.float32)
            indices = np.zeros((0, min(k, self.size)), np.int64)
        found = indices >= 0
        scores = np.where(found, scores, -np.inf).astype(np.float32)
        ids = np.where(found, self.ids[np.clip(indices, 0, None)], "")
        return SearchResult(scores=scores, indices=indices, ids=ids)

    def info(self) -> dict:
        """Summary for ``qualiface search info``."""
        return {
            "format": GALLERY_FORMAT,
            "format_version": GALLERY_VERSION,
            "backend": self.backend,
            "size": self.size,
            "dim": self.dim,
            "unique_ids": int(np.unique(self.ids).shape[0]),
            "nlist": self.nlist,
            "nprobe": self.nprobe if self.backend == "ivf" else None,
            "has_quality": self.quality is not None,
            "metadata": self.metadata,
        }

    def vectors(self) -> np.ndarray:
        """All (N, D) normalised template vectors (from the faiss index for faiss backends)."""
        if self.embeddings is not None:
            return self.embeddings
        if self.backend == "ivf":
            self.index.make_direct_map()  # IVF lists are not addressable by row without it
        return np.asarray(self.index.reconstruct_n(0, self.index.ntotal), dtype=np.float32)

    def save(self, folder: str | Path) -> Path:
        """Persist to ``folder`` atomically (see the module docstring); takes the folder lock.

        :func:`enrol` holds the lock around its whole read-modify-write; saving directly
        replaces whatever gallery the folder held.
        """
        with gallery_lock(folder, exclusive=True):
            return self._save_locked(Path(folder))

    def _save_locked(self, folder: Path) -> Path:
        # The files the replaced gallery.json names: the only ones besides this format's own
        # orphans that the clean-up after the commit may delete (see _remove_stale_files).
        previous = _gallery_files(folder)
        token = secrets.token_hex(8)
        files = {"arrays": f"gallery-{token}.npz"}
        arrays = {"ids": self.ids}
        if self.quality is not None:
            arrays["quality"] = self.quality
        if self.backend == "exact":
            arrays["embeddings"] = self.embeddings
        info = self.info()
        try:
            if self.backend != "exact":
                files["index"] = f"index-{token}.faiss"
                blob = _require_faiss().serialize_index(self.index)
                write_bytes_atomic(folder / files["index"], blob.tobytes())
            atomic_write(folder / files["arrays"], lambda handle: np.savez(handle, **arrays))
            text = json.dumps({**info, "files": files}, indent=2) + "\n"
            # The commit point: until this rename the folder still describes the old gallery.
            write_text_atomic(folder / GALLERY_JSON, text)
        except FileWriteError as exc:  # the message names the file and says "disk full"
            for name in files.values():
                (folder / name).unlink(missing_ok=True)
            raise GalleryError(str(exc)) from None
        _remove_stale_files(folder, keep=set(files.values()), previous=previous)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Gallery:
        """Reload a saved gallery; :class:`GalleryError` names the file and the problem."""
        with gallery_lock(folder, exclusive=False):
            return cls._load_locked(Path(folder))

    @classmethod
    def _load_locked(cls, folder: Path) -> Gallery:
        info = read_gallery_info(folder)
        json_path = folder / GALLERY_JSON
        backend = info["backend"]
        npz_path = folder / info["files"]["arrays"]
        try:
            with np.load(npz_path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except FileNotFoundError:
            raise GalleryError(f"{npz_path}: missing") from None
        except Exception as exc:
            raise GalleryError(f"{npz_path}: cannot read ({exc})") from None
        if "ids" not in arrays:
            raise GalleryError(f"{npz_path}: no 'ids' array")
        ids = arrays["ids"]
        embeddings = index = None
        if backend == "exact":
            embeddings = arrays.get("embeddings")
            if embeddings is None or embeddings.ndim != 2 or embeddings.shape[0] != ids.shape[0]:
                raise GalleryError(f"{npz_path}: 'embeddings' missing or not ({ids.shape[0]}, D)")
            embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        else:
            faiss = _require_faiss()
            index_path = folder / info["files"].get("index", _V1_FILES["index"])
            if not index_path.exists():
                raise GalleryError(f"{index_path}: missing")
            try:
                index = faiss.read_index(str(index_path))
            except RuntimeError as exc:
                raise GalleryError(f"{index_path}: not a faiss index ({str(exc).splitlines()[0]})") from None
            if index.ntotal != ids.shape[0]:
                raise GalleryError(f"{index_path}: holds {index.ntotal} vectors but {npz_path} has {ids.shape[0]} ids")
        quality = arrays.get("quality")
        if quality is not None and quality.shape != ids.shape:  # else a query reads another id's quality
            raise GalleryError(f"{npz_path}: 'quality' has shape {quality.shape}, expected ({ids.shape[0]},)")
        gallery = cls(
            ids, embeddings, backend, index=index, nlist=info["nlist"],
            quality=quality, metadata=info["metadata"],
        )
        if backend == "ivf":
            if info["nlist"] is None:
                raise GalleryError(f"{json_path}: 'nlist' is required for the ivf backend")
            gallery.set_nprobe(info["nprobe"] or 1)
        return gallery


def _field(info: dict, key: str, types: tuple[type, ...], json_path: Path, expected: str):
    """``info[key]`` (None when absent) if of ``types``; else a GalleryError naming the field."""
    value = info.get(key)
    if value is None or (isinstance(value, types) and not isinstance(value, bool)):
        return value
    raise GalleryError(f"{json_path}: '{key}' must be {expected}, got {type(value).__name__} "
                       f"{json.dumps(value)[:40]}")


def read_gallery_info(folder: str | Path) -> dict:
    """``gallery.json`` of ``folder``, every field type-checked (``GalleryError`` names the field).

    Returns the parsed document with ``files`` (data file names), ``nlist``, ``nprobe`` and
    ``metadata`` filled in. Read with a size cap, regular files only (see ``qualiface.files``).
    """
    folder = Path(folder)
    json_path = folder / GALLERY_JSON
    text = read_small_text_as(json_path, GalleryError, what="gallery.json",
                              limit=GALLERY_JSON_LIMIT,
                              missing=f"missing (is {folder} a gallery made by "
                                      "'qualiface search enrol'?)")
    try:
        info = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GalleryError(f"{json_path}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
    except RecursionError:
        raise GalleryError(f"{json_path}: JSON nested too deeply to be a gallery description") from None
    if not isinstance(info, dict) or info.get("format") != GALLERY_FORMAT:
        raise GalleryError(f"{json_path}: 'format' must be '{GALLERY_FORMAT}'")
    version = _field(info, "format_version", (int,), json_path, "an integer")
    if version is None or not 1 <= version <= GALLERY_VERSION:
        raise GalleryError(f"{json_path}: unsupported 'format_version' {info.get('format_version')!r}")
    backend = info.get("backend")
    if backend not in BACKENDS:
        raise GalleryError(f"{json_path}: 'backend' must be one of {BACKENDS}, got {backend!r}")
    for key in ("nlist", "nprobe"):
        value = _field(info, key, (int,), json_path, "an integer")
        if value is not None and value < 1:
            raise GalleryError(f"{json_path}: '{key}' must be >= 1, got {value}")
        info[key] = value
    info["metadata"] = _field(info, "metadata", (dict,), json_path, "an object") or {}
    files = _field(info, "files", (dict,), json_path, "an object")
    if version >= 2 and files is None:
        raise GalleryError(f"{json_path}: 'files' is missing")
    files = dict(_V1_FILES if files is None else files)
    for role, name in files.items():
        # Names only, never paths: a hostile gallery.json must not point outside its folder.
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise GalleryError(f"{json_path}: 'files.{role}' must be a file name in the gallery "
                               f"folder, got {json.dumps(name)[:60]}")
    if "arrays" not in files:
        raise GalleryError(f"{json_path}: 'files.arrays' is missing")
    info["files"] = files
    return info


# A data file this format names itself: ``gallery-<token>.npz`` / ``index-<token>.faiss`` with
# the 16 hex digits of ``secrets.token_hex(8)``.
_OWN_DATA_FILE = re.compile(r"(gallery-[0-9a-f]{16}\.npz|index-[0-9a-f]{16}\.faiss)")


def _gallery_files(folder: Path) -> set[str]:
    """The data files the gallery.json in ``folder`` names (none without a readable one)."""
    if not (folder / GALLERY_JSON).exists():
        return set()
    try:
        return set(read_gallery_info(folder)["files"].values())
    except GalleryError:  # a broken description: delete nothing on its word
        return set()


def _remove_stale_files(folder: Path, keep: set[str], previous: set[str] = frozenset()) -> None:
    """Delete data files of earlier saves (caller holds the exclusive lock).

    Only ``previous`` (what the replaced gallery.json named, version 1's fixed names included)
    and orphans of an interrupted save, named exactly as this format names them. A glob such as
    ``gallery-*.npz`` or the bare name ``gallery.npz`` also matched the user's own files: ``search
    enrol gallery.npz -g .`` deleted the very table it enrolled (and ``gallery-faces.npz`` beside
    it).
    """
    for path in folder.iterdir():
        name = path.name
        if name in keep or not (name in previous or _OWN_DATA_FILE.fullmatch(name)):
            continue
        if path.is_file():
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def gallery_lock(folder: str | Path, *, exclusive: bool) -> Iterator[None]:
    """Hold ``flock`` on ``folder/.lock``: exclusive for writers, shared for readers.

    Writers create the folder and the lock file. A reader opens the lock file read-only (so
    read-only media work) and reads unlocked where there is none (no folder, a version 1
    gallery): no writer of this version has been there.
    """
    folder = Path(folder)
    if exclusive:
        make_folder(folder)  # a gallery path below a file: one line naming it, no traceback
    # Readers never create the lock file: a folder without one has had no writer of this format.
    flags = (os.O_RDWR | os.O_CREAT if exclusive else os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(folder / LOCK_FILE, flags, 0o666)
    except OSError as exc:
        if exclusive:
            raise GalleryError(f"{folder / LOCK_FILE}: cannot create the gallery lock ({exc.strerror or exc})") from None
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _kept_nprobe(existing: Gallery, nlist: int) -> int:
    """The probe count an extended IVF gallery of ``nlist`` cells gets from ``existing``.

    Extending rebuilds the cells (~4 sqrt(N) of them unless ``nlist`` is given), so the old
    probe count would mean something else afterwards. An exact gallery (exact or flat backend,
    or IVF visiting every cell) stays exact and visits all the new cells: turning it approximate
    would silently lose matches. A number of probes the user chose is kept, clamped to the new
    cell count.
    """
    if existing.backend != "ivf" or existing.nprobe >= existing.nlist:
        return nlist
    return min(existing.nprobe, nlist)


def enrol(folder: str | Path, ids, embeddings, *, replace: bool = False, backend: str = "auto",
          nlist: int | None = None, nprobe: int | None = None, quality=None,
          metadata: dict | None = None) -> tuple[Gallery, int]:
    """Add templates to the gallery in ``folder`` (creating it) -> ``(gallery, templates before)``.

    Holds the exclusive lock from reading the current gallery to committing the new one, so
    two processes enrolling into one folder at once both land. An existing gallery is extended:
    its templates are kept, the new ones appended (``backend="auto"`` keeps its backend); a
    template id that is already enrolled, a different dimension or quality present on one side
    only is refused (the message says to pass ``replace=True`` to start a new gallery instead).

    ``nprobe=None`` means 8 (at most the cell count) for a new gallery and, for an extended one, the probe setting it
    already had (see :func:`_kept_nprobe`); a number given here is used as it is.
    """
    folder = Path(folder)
    with gallery_lock(folder, exclusive=True):
        existing = None
        if not replace and (folder / GALLERY_JSON).exists():
            existing = Gallery._load_locked(folder)
        if existing is None:
            gallery = Gallery.build(ids, embeddings, backend=backend, nlist=nlist, nprobe=nprobe,
                                    quality=quality, metadata=metadata)
            gallery._save_locked(folder)
            return gallery, 0
        new = Gallery.build(ids, embeddings, backend="exact", quality=quality)  # validates input
        where = f"{folder}: cannot add to the existing gallery"
        if new.dim != existing.dim:
            raise GalleryError(f"{where}: it holds {existing.dim}-d templates, the new ones are "
                               f"{new.dim}-d (pass --replace to start a new gallery)")
        again = np.intersect1d(existing.ids, new.ids)
        if again.size:
            shown = ", ".join(map(str, again[:5])) + (" ..." if again.size > 5 else "")
            raise GalleryError(f"{where}: {again.size} template id(s) already enrolled: {shown} "
                               "(pass --replace to rebuild the gallery from this input alone)")
        if (existing.quality is None) != (new.quality is None):
            has = "has" if existing.quality is not None else "has no"
            raise GalleryError(f"{where}: it {has} template quality and the new input does "
                               "not match (pass --replace to start a new gallery)")
        earlier = existing.metadata.get("enrolments")
        if not isinstance(earlier, list):  # the existing gallery came from one enrolment
            earlier = [{k: v for k, v in existing.metadata.items() if k != "enrolments"}]
        enrolments = [*earlier, metadata or {}]
        merged_quality = (None if new.quality is None
                          else np.concatenate([existing.quality, new.quality]))
        gallery = Gallery.build(
            np.concatenate([existing.ids, new.ids]),
            np.concatenate([existing.vectors(), new.embeddings]),
            backend=existing.backend if backend == "auto" else backend, nlist=nlist,
            nprobe=1,  # any valid value: the cell count is only known once built; set below
            quality=merged_quality,
            metadata={**(metadata or {}), "enrolments": enrolments},
        )
        if gallery.backend == "ivf":
            gallery.set_nprobe(_kept_nprobe(existing, gallery.nlist) if nprobe is None else nprobe)
        gallery._save_locked(folder)
        return gallery, existing.size
