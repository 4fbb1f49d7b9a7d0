"""Flip fusion, feature files and the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qualiface.eval import EvaluationError
from qualiface.eval.features import FeatureSet, cached_features, extract_features, fuse_flip


def _fake_embed(images):
    """Deterministic 'model': features from pixel statistics, quality = mean brightness."""
    x = images.float() / 255
    left = x[..., : x.shape[-1] // 2].mean(dim=(2, 3))
    right = x[..., x.shape[-1] // 2 :].mean(dim=(2, 3))
    return torch.cat([left, 2 * right], 1) + 0.1, x.mean(dim=(1, 2, 3))


def test_flip_modes():
    rng = np.random.default_rng(0)
    f, g = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    q, r = rng.uniform(size=6), rng.uniform(size=6)
    fused, fq = fuse_flip(f, q, g, r, "sum")
    np.testing.assert_allclose(fused, f + g, rtol=1e-6)
    np.testing.assert_allclose(fq, (q + r) / 2, rtol=1e-6)
    fused, _ = fuse_flip(f, q, g, r, "norm")
    mean_norm = (np.linalg.norm(f, axis=1) + np.linalg.norm(g, axis=1)) / 2
    np.testing.assert_allclose(np.linalg.norm(fused, axis=1), mean_norm, rtol=1e-5)
    direction = (f + g) / np.linalg.norm(f + g, axis=1, keepdims=True)
    np.testing.assert_allclose(fused / mean_norm[:, None], direction, atol=1e-6)
    with pytest.raises(EvaluationError, match="unknown flip mode"):
        fuse_flip(f, q, g, r, "max")


def test_extract_uses_mirrored_images_and_cache_round_trip(tmp_path):
    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    feats = extract_features(images, _fake_embed, flip="sum", batch_size=4, progress=False)
    a, qa = _fake_embed(images)
    b, qb = _fake_embed(images.flip(-1))
    np.testing.assert_allclose(feats.features, (a + b).numpy(), rtol=1e-6)
    np.testing.assert_allclose(feats.quality, ((qa + qb) / 2).numpy(), rtol=1e-6)
    calls = []

    def compute():
        calls.append(1)
        return extract_features(images, _fake_embed, progress=False)

    key = {"model": "m1", "flip": "none"}
    first = cached_features(tmp_path, "demo", key, compute)
    second = cached_features(tmp_path, "demo", key, compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.features, second.features)
    assert second.ids == [str(i) for i in range(10)]
    cached_features(tmp_path, "demo", {"model": "m2", "flip": "none"}, compute)
    assert len(calls) == 2  # another model id is another cache entry


def test_feature_file_errors(tmp_path):
    with pytest.raises(EvaluationError, match="not found"):
        FeatureSet.load(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(EvaluationError, match="bad.safetensors: unreadable"):
        FeatureSet.load(bad)
    fs = FeatureSet(["a", "b"], np.ones((2, 3)), np.ones(2))
    with pytest.raises(EvaluationError, match="no image 'c'"):
        fs.rows(["a", "c"])


def test_data_digest_tells_same_named_data_apart_and_reuse_is_reported(tmp_path):
    import os

    from qualiface.eval.features import ImageFiles, data_digest

    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "lfw.bin").write_bytes(side.encode() * 100)
    from types import SimpleNamespace

    def one_file(side):  # a dataset read from one file, like VerificationBinDataset
        return data_digest(SimpleNamespace(path=tmp_path / side / "lfw.bin"))

    assert one_file("a") != one_file("b") and one_file("a") is not None
    image = tmp_path / "a" / "x.jpg"
    image.write_bytes(b"one")
    before = data_digest(ImageFiles([image]))
    image.write_bytes(b"two")  # same size: the modification time tells it apart
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert data_digest(ImageFiles([image])) != before
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    assert data_digest(images) != data_digest(images + 1)
    assert data_digest([object()]) is None  # unknown content: the caller must not cache

    reused = []
    compute = lambda: FeatureSet(["0"], np.ones((1, 2)), np.ones(1))  # noqa: E731
    cached_features(tmp_path / "c", "f", {"data": "x"}, compute, on_reuse=reused.append)
    assert reused == []
    cached_features(tmp_path / "c", "f", {"data": "x"}, compute, on_reuse=reused.append)
    assert len(reused) == 1 and reused[0].name.startswith("f-")
