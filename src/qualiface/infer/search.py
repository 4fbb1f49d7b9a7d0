"""1:N gallery search over L2-normalised templates: exact (torch) or faiss (flat / IVF).

A :class:`Gallery` holds template ids and embeddings (normalised on enrolment, so the inner
product is the cosine similarity) and answers top-k queries. Backends:

- ``exact``: chunked matrix product + ``torch.topk``; exact, fine up to ~1e5 templates.
- ``flat``: faiss ``IndexFlatIP``; exact, SIMD-optimised.
- ``ivf``: faiss ``IndexIVFFlat`` (inner product) with ``nlist`` cells, ``nprobe`` cells visited
  per query; approximate, exact when ``nprobe == nlist``. For large galleries.

On disk a gallery is a folder: ``gallery.json`` (format, backend, parameters), ``gallery.npz``
(ids, optional template quality, and the embeddings for ``exact``) and ``index.faiss`` for the
faiss backends. No pickle anywhere.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

GALLERY_FORMAT = "qualiface-gallery"
GALLERY_VERSION = 1
BACKENDS = ("exact", "flat", "ivf")
AUTO_EXACT_LIMIT = 100_000  # above this many templates "auto" picks IVF


class GalleryError(ValueError):
    """Bad gallery input or a gallery folder that cannot be loaded."""


@dataclass
class SearchResult:
    """Top-k answers for Q queries.

    scores:  (Q, k) float32 cosine similarities, best first (-inf where fewer than k found).
    indices: (Q, k) int64 rows of the gallery (-1 where fewer than k found).
    ids:     (Q, k) template ids ('' where fewer than k found).
    """

    scores: np.ndarray
    indices: np.ndarray
    ids: np.ndarray


def _normalise(embeddings, what: str) -> np.ndarray:
    array = np.asarray(embeddings.detach().cpu() if hasattr(embeddings, "detach") else embeddings, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] == 0:
        raise GalleryError(f"{what} must be a non-empty (N, D) array, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise GalleryError(f"{what} contains NaN or infinite values")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return np.ascontiguousarray(array / np.maximum(norms, 1e-12), dtype=np.float32)


def exact_topk(queries: np.ndarray, gallery: np.ndarray, k: int, chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k: queries (Q, D), gallery (N, D) -> scores, indices (Q, k).

    Queries are processed ``chunk_size`` at a time so the score matrix stays at chunk x N.
    """
    k = min(k, gallery.shape[0])
    g = torch.from_numpy(gallery)
    scores_out, index_out = [], []
    for start in range(0, queries.shape[0], chunk_size):
        scores = torch.from_numpy(queries[start : start + chunk_size]) @ g.T
        top = torch.topk(scores, k, dim=1)
        scores_out.append(top.values.numpy())
        index_out.append(top.indices.numpy())
    return np.concatenate(scores_out), np.concatenate(index_out).astype(np.int64)


def _require_faiss():
    try:
        import faiss
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
        nprobe: int = 8,
        quality=None,
        metadata: dict | None = None,
        seed: int = 0,
    ) -> Gallery:
        """Enrol templates: ``ids`` (N,) strings, ``embeddings`` (N, D) (normalised here).

        ``backend``: ``exact`` | ``flat`` | ``ivf`` | ``auto`` (exact up to 100k templates,
        else IVF). ``nlist`` (IVF cells) defaults to ~4 sqrt(N), capped so each cell is trained
        on >= 39 points where possible; ``nprobe`` cells are visited per query.
        """
        vectors = _normalise(embeddings, "gallery embeddings")
        ids = np.asarray(ids).astype(str)
        if ids.shape != (vectors.shape[0],):
            raise GalleryError(f"{ids.shape[0] if ids.ndim else 0} ids for {vectors.shape[0]} embeddings")
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
        gallery.set_nprobe(nprobe)
        return gallery

    def set_nprobe(self, nprobe: int) -> None:
        """IVF only: how many cells a query visits (1..nlist; nlist = exact)."""
        if self.backend != "ivf":
            return
        if not 1 <= nprobe <= self.nlist:
            raise GalleryError(f"nprobe must be in [1, {self.nlist}] (nlist), got {nprobe}")
        self.nprobe = int(nprobe)
        self.index.nprobe = self.nprobe

    def search(self, queries, k: int = 5) -> SearchResult:
        """Top-``k`` templates for each query embedding (Q, D) (normalised here)."""
        q = _normalise(queries, "query embeddings")
        if q.shape[1] != self.dim:
            raise GalleryError(f"queries have dimension {q.shape[1]}, the gallery {self.dim}")
        if k < 1:
            raise GalleryError(f"k must be >= 1, got {k}")
        if self.backend == "exact":
            scores, indices = exact_topk(q, self.embeddings, k)
        else:
            scores, indices = self.index.search(q, min(k, self.size))
            indices = indices.astype(np.int64)
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

    def save(self, folder: str | Path) -> Path:
        """Persist to ``folder`` (gallery.json + gallery.npz [+ index.faiss])."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"ids": self.ids}
        if self.quality is not None:
            arrays["quality"] = self.quality
        if self.backend == "exact":
            arrays["embeddings"] = self.embeddings
        else:
            _require_faiss().write_index(self.index, str(folder / "index.faiss"))
        np.savez(folder / "gallery.npz", **arrays)
        (folder / "gallery.json").write_text(json.dumps(self.info(), indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Gallery:
        """Reload a saved gallery; :class:`GalleryError` names the file and the problem."""
        folder = Path(folder)
        json_path = folder / "gallery.json"
        try:
            info = json.loads(json_path.read_text())
        except FileNotFoundError:
            raise GalleryError(f"{json_path}: missing (is {folder} a gallery made by 'qualiface search enrol'?)") from None
        except json.JSONDecodeError as exc:
            raise GalleryError(f"{json_path}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(info, dict) or info.get("format") != GALLERY_FORMAT:
            raise GalleryError(f"{json_path}: 'format' must be '{GALLERY_FORMAT}'")
        if not isinstance(info.get("format_version"), int) or info["format_version"] > GALLERY_VERSION:
            raise GalleryError(f"{json_path}: unsupported 'format_version' {info.get('format_version')!r}")
        backend = info.get("backend")
        if backend not in BACKENDS:
            raise GalleryError(f"{json_path}: 'backend' must be one of {BACKENDS}, got {backend!r}")
        npz_path = folder / "gallery.npz"
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
            index_path = folder / "index.faiss"
            if not index_path.exists():
                raise GalleryError(f"{index_path}: missing")
            try:
                index = faiss.read_index(str(index_path))
            except RuntimeError as exc:
                raise GalleryError(f"{index_path}: not a faiss index ({str(exc).splitlines()[0]})") from None
            if index.ntotal != ids.shape[0]:
                raise GalleryError(f"{index_path}: holds {index.ntotal} vectors but {npz_path} has {ids.shape[0]} ids")
        gallery = cls(
            ids, embeddings, backend, index=index, nlist=info.get("nlist"),
            quality=arrays.get("quality"), metadata=info.get("metadata") or {},
        )
        if backend == "ivf":
            gallery.set_nprobe(int(info.get("nprobe") or 1))
        return gallery
