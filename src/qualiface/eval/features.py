"""Feature extraction for benchmarks: batched, cached, with flip-test fusion.

Any ``embed_fn(images) -> (features, quality)`` works (uint8 (B, 3, H, W) RGB in; raw,
*unnormalised* features (B, D) and a quality score (B,) out, torch or numpy), so evaluation does
not depend on how a model is packaged; ``qualiface.infer.model.package_embed_fn(path)`` adapts a model package.

Flip test (``flip``), with ``f = n u`` a raw feature (norm ``n``, unit direction ``u``) of the
image and ``f' = n' u'`` of its horizontal mirror:

- ``none``: ``f`` only (half the compute).
- ``sum``:  ``f + f'`` (what the InsightFace evaluation scripts do). The direction is the
  norm-weighted mean of the two directions, but the norm roughly doubles and shrinks when the
  two views disagree, so norm-based quality changes scale.
- ``norm``: norm-preserving fusion: the direction of ``n u + n' u'`` (the same norm-weighted
  direction as ``sum``, as in AdaFace's fusion) rescaled to the mean norm ``(n + n') / 2``, so a
  fused feature keeps the norm scale of a single view and MagFace-style norm qualities, norm
  weighting and QMagFace keep their meaning.

The quality of a fused sample is the mean of the two views' qualities in both fused modes.

Results are a ``FeatureSet`` (image ids, raw features, quality) saved as safetensors (ids and
options in the header metadata). ``cached_features`` keys the file by a hash of the model
identity, the benchmark, the image list, the options and the data itself (``data_digest``:
the bytes of a ``.bin`` / pairs file, path + size + mtime of every image file), so changing any
of them recomputes: two benchmarks with the same name and image ids (``A/lfw.bin`` and
``B/lfw.bin``) must never share features.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.numpy
from safetensors import safe_open

from qualiface.eval import EvaluationError
from qualiface.files import write_bytes_atomic
from qualiface.progress import make_progress

FLIP_MODES = ("none", "sum", "norm")
EmbedFn = Callable[..., tuple]
_FORMAT = "qualiface-features-v1"


@dataclass
class FeatureSet:
    """Per-image features of one benchmark.

    ids: image ids (N,) (paths relative to the benchmark root, or ``"<index>"``);
    features: (N, D) float32 raw (unnormalised); quality: (N,) float32; meta: options used.
    """

    ids: list[str]
    features: np.ndarray
    quality: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.features = np.ascontiguousarray(self.features, dtype=np.float32)
        self.quality = np.ascontiguousarray(self.quality, dtype=np.float32).reshape(-1)
        n = len(self.ids)
        if self.features.ndim != 2 or len(self.features) != n or len(self.quality) != n:
            raise EvaluationError(f"FeatureSet: {n} ids, features {self.features.shape}, "
                                  f"quality {self.quality.shape} do not match")

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row index of each id (K,); ``EvaluationError`` names the first id not present."""
        position = {image_id: i for i, image_id in enumerate(self.ids)}
        try:
            return np.fromiter((position[i] for i in ids), np.int64, len(ids))
        except KeyError as exc:
            raise EvaluationError(f"features have no image {exc.args[0]!r}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write as safetensors (atomically); ids and meta go in the header metadata."""
        payload = safetensors.numpy.save({"features": self.features, "quality": self.quality},
                       metadata={"format": _FORMAT, "ids": json.dumps(self.ids),
                                 "meta": json.dumps(self.meta)})
        return write_bytes_atomic(path, payload)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureSet:
        """Read a file written by ``save``; errors name the file and the problem."""
        path = Path(path)
        if not path.is_file():
            raise EvaluationError(f"{path}: features file not found")
        try:
            with safe_open(str(path), framework="numpy") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("format") != _FORMAT:
                    raise EvaluationError(f"{path}: not a qualiface features file (format "
                                          f"{metadata.get('format')!r})")
                features = handle.get_tensor("features")
                quality = handle.get_tensor("quality")
            ids = json.loads(metadata["ids"])
            meta = json.loads(metadata.get("meta", "{}"))
        except EvaluationError:
            raise
        except Exception as exc:  # safetensors raises several unrelated types
            raise EvaluationError(f"{path}: unreadable features file ({exc})") from None
        return cls(ids, features, quality, meta)


def fuse_flip(features, quality, flipped_features, flipped_quality, mode: str):
    """Fuse the features (B, D) and qualities (B,) of images and their mirrors (see module doc)."""
    features = np.asarray(features, dtype=np.float32)
    flipped_features = np.asarray(flipped_features, dtype=np.float32)
    quality = np.asarray(quality, dtype=np.float32).reshape(-1)
    flipped_quality = np.asarray(flipped_quality, dtype=np.float32).reshape(-1)
    if mode == "none":
        return features, quality
    fused_quality = 0.5 * (quality + flipped_quality)
    total = features + flipped_features
    if mode == "sum":
        return total, fused_quality
    if mode == "norm":
        mean_norm = 0.5 * (np.linalg.norm(features, axis=1) + np.linalg.norm(flipped_features, axis=1))
        scale = mean_norm / np.maximum(np.linalg.norm(total, axis=1), 1e-12)
        return total * scale[:, None], fused_quality
    raise EvaluationError(f"unknown flip mode {mode!r}; known: {', '.join(FLIP_MODES)}")


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _first_item(batch):
    """Collate items that are images or (image, ...) tuples into a uint8 (B, 3, H, W) batch."""
    import torch  # lazy: torch (~1 s): eval's scoring modules import without it

    images = [item[0] if isinstance(item, (tuple, list)) else item for item in batch]
    return torch.stack(images)


def extract_features(images, embed_fn: EmbedFn, *, ids: Sequence[str] | None = None,
                     flip: str = "none", batch_size: int = 64, num_workers: int = 0,
                     progress: bool = True, description: str = "embedding",
                     meta: dict | None = None) -> FeatureSet:
    """Embed every image of ``images`` -> ``FeatureSet``.

    images: a dataset (``len`` + indexing) whose items are uint8 (3, H, W) RGB tensors or tuples
    starting with one, all the same size; ids: one id per image (default ``"0"``, ``"1"``...).
    flip: ``none`` / ``sum`` / ``norm`` (module docstring). Decoding runs in ``num_workers``
    DataLoader processes; the embedding runs here in batches of ``batch_size``.
    """
    import torch  # lazy: torch (~1 s): eval's scoring modules import without it

    if flip not in FLIP_MODES:
        raise EvaluationError(f"unknown flip mode {flip!r}; known: {', '.join(FLIP_MODES)}")
    total = len(images)
    if total == 0:
        raise EvaluationError("no images to embed")
    ids = [str(i) for i in range(total)] if ids is None else [str(i) for i in ids]
    if len(ids) != total:
        raise EvaluationError(f"{len(ids)} ids for {total} images")
    # torch's DataLoader refuses these only with its own ValueError, deep inside an evaluation.
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"batch size must be a whole number >= 1, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise EvaluationError(f"decoding workers must be a whole number >= 0, got {num_workers!r}")
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=_first_item)
    features, qualities = [], []
    with make_progress(enabled=progress) as bar:
        task = bar.add_task(description, total=total)
        for batch in loader:
            if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[1] != 3:
                raise EvaluationError(f"{description}: expected uint8 (B, 3, H, W) images, got "
                                      f"{batch.dtype} {tuple(batch.shape)}")
            feats, quality = (_to_numpy(v) for v in embed_fn(batch))
            if flip != "none":
                mirror_feats, mirror_quality = (_to_numpy(v) for v in embed_fn(batch.flip(-1)))
                feats, quality = fuse_flip(feats, quality, mirror_feats, mirror_quality, flip)
            features.append(feats)
            qualities.append(quality.reshape(-1))
            bar.update(task, advance=len(batch))
    return FeatureSet(ids, np.concatenate(features), np.concatenate(qualities),
                      {"flip": flip, **(meta or {})})


def cache_key(**parts) -> str:
    """A stable hex digest of the JSON of ``parts`` (model id, benchmark, options, image ids)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def cached_features(cache_dir: str | os.PathLike | None, name: str, key_parts: dict,
                    compute: Callable[[], FeatureSet], *,
                    on_reuse: Callable[[Path], None] | None = None) -> FeatureSet:
    """Load ``<cache_dir>/<name>-<key>.safetensors`` if present, else ``compute()`` and save it.

    ``key_parts`` must hold everything that changes the features (model identity, flip mode,
    the image ids or a digest of them, preprocessing options, and the data content from
    ``data_digest``). ``cache_dir=None`` disables it. ``on_reuse(path)`` is called when a cached
    file is returned, so callers can say which numbers come from an earlier run.
    """
    if cache_dir is None:
        return compute()
    key = cache_key(**key_parts)
    path = Path(cache_dir) / f"{name}-{key[:20]}.safetensors"
    if path.is_file():
        cached = FeatureSet.load(path)
        if cached.meta.get("cache_key") == key:
            if on_reuse is not None:
                on_reuse(path)
            return cached
    result = compute()
    result.meta = {**result.meta, "cache_key": key}
    result.save(path)
    return result


def ids_digest(ids: Sequence[str]) -> str:
    """Digest of an image list (keeps cache keys short for 469k IJB-C images)."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (a .bin of several GB never sits in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_digest(images, files: Sequence[str | os.PathLike] = (), arrays: Sequence = ()) -> str | None:
    """A digest of the data a feature set is computed from, for the cache key; None if unknown.

    The image ids alone do not identify the data: every ``lfw.bin`` has ids ``"0"``...``"N"``
    and every LFW copy the same relative paths. So the digest covers, deduplicated and in order:

    - the bytes of each of ``files`` (pairs / protocol files) and of ``images.path`` when the
      dataset reads one file (a ``.bin``);
    - for a dataset of image files (``ImageFiles``): the absolute path, size and modification
      time of every image, which changes when an image is replaced or the folder is another one,
      without reading every image again (469k IJB-C files);
    - the bytes of in-memory images (a tensor / array, e.g. degraded copies) and of ``arrays``
      (e.g. IJB landmarks, which change the aligned crops).

    Returns None when ``images`` is of a kind whose content cannot be fingerprinted, and the
    caller should then not cache.
    """
    digest = hashlib.sha256()
    paths = [Path(f) for f in files]
    single = getattr(images, "path", None)
    known = isinstance(single, (str, os.PathLike)) and Path(single).is_file()
    if known:
        paths.append(Path(single))
    for path in dict.fromkeys(paths):
        digest.update(f"file {path.name} {file_digest(path)}\n".encode())
    if isinstance(images, ImageFiles):
        for name in images.paths:
            stat = os.stat(name)
            digest.update(f"image {os.path.abspath(name)} {stat.st_size} {stat.st_mtime_ns}\n"
                          .encode())
        known = True
    in_memory = hasattr(images, "shape") and hasattr(images, "dtype")
    known = known or in_memory
    for array in ([images] if in_memory else []) + list(arrays):
        if hasattr(array, "detach"):
            array = array.detach().cpu().numpy()
        array = np.ascontiguousarray(array)
        digest.update(f"array {array.dtype} {array.shape}\n".encode())
        digest.update(array.reshape(-1).view(np.uint8).data)
    return digest.hexdigest() if known else None


def benchmark_features(images, embed_fn: EmbedFn, model_id: str, name: str, ids: Sequence[str],
                       *, cache_dir: str | os.PathLike | None, flip: str = "none",
                       batch_size: int = 64, num_workers: int = 0,
                       files: Sequence[str | os.PathLike] = (), arrays: Sequence = (),
                       meta: dict | None = None,
                       on_reuse: Callable[[Path], None] | None = None) -> FeatureSet:
    """Features of benchmark ``name``'s ``images``, reused from ``cache_dir`` only when the model
    (``model_id``), the options *and the data* match.

    ``files`` / ``arrays``: protocol files and arrays (pairs.txt, IJB landmarks) that change the
    features besides the images themselves; ``data_digest`` hashes them with the images, and
    images whose content it cannot fingerprint are never cached. The file is
    ``<cache_dir>/features-<name>-<key>.safetensors`` (see ``cached_features``).
    """
    data = data_digest(images, files, arrays)
    key = {"model": model_id, "benchmark": name, "flip": flip, "ids": ids_digest(ids),
           "data": data}
    return cached_features(
        cache_dir if data is not None else None, f"features-{name}", key,
        lambda: extract_features(images, embed_fn, ids=ids, flip=flip, batch_size=batch_size,
                                 num_workers=num_workers, description=f"embedding {name}",
                                 meta=meta),
        on_reuse=on_reuse)


class ImageFiles:
    """A dataset over image files: item ``i`` is ``read_image(paths[i])`` as uint8 (3, H, W).

    ``transform``: optional callable on the decoded image (e.g. resize, landmark alignment
    taking ``(image, index)`` when ``pass_index``). Errors name the file.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], transform=None, *,
                 pass_index: bool = False) -> None:
        self.paths = [str(p) for p in paths]
        self.transform = transform
        self.pass_index = pass_index

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from qualiface.data.decode import read_image  # lazy: imports torch; eval's scoring modules import without it

        image = read_image(self.paths[index])
        if self.transform is not None:
            image = self.transform(image, index) if self.pass_index else self.transform(image)
        return image


def resize_to(size: int = 112):
    """A transform resizing uint8 (3, H, W) to (3, size, size) (bilinear, antialiased)."""

    def resize(image):
        import torch.nn.functional as F  # lazy: torch (~1 s): eval's scoring modules import without it

        if image.shape[-2:] == (size, size):
            return image
        resized = F.interpolate(image[None].float(), size=(size, size), mode="bilinear",
                                align_corners=False, antialias=True)
        return resized[0].round().clamp(0, 255).to(image.dtype)

    return resize
