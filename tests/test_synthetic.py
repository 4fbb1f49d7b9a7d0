"""Synthetic face dataset: determinism, the dataset contract, recorded severities that match the
damage, identity structure (within < between), splits, landmarks, and verification pairs."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from qualiface.data import DATASETS
from qualiface.data.degrade import psnr
from qualiface.data.pairs import PairsError
from qualiface.data.synthetic import (
    TEMPLATE,
    SyntheticConfig,
    SyntheticDataError,
    SyntheticFaces,
    make_pairs,
)


def small(**kwargs) -> SyntheticFaces:
    settings = {"num_identities": 6, "images_per_identity": 4, "seed": 3}
    settings.update(kwargs)
    return SyntheticFaces(SyntheticConfig(**settings))


def test_samples_are_deterministic_for_a_seed_and_change_with_it():
    a, b = small(), small()
    for i in (0, 7, 23, 5):  # arbitrary access order must not matter
        image_a, label_a = a[i]
        image_b, label_b = b[i]
        assert torch.equal(image_a, image_b) and label_a == label_b
    assert torch.equal(a[7][0], a[7][0])
    assert not torch.equal(a[7][0], small(seed=4)[7][0])
    np.testing.assert_array_equal(a.severities(), b.severities())


def test_dataset_contract_shapes_dtype_labels():
    ds = small()
    assert len(ds) == 24 and ds.num_classes == 6
    image, label = ds[5]
    assert image.shape == (3, 112, 112) and image.dtype == torch.uint8
    assert label == 1 and isinstance(label, int)
    labels = ds.labels()
    assert labels.dtype == np.int64 and labels.min() == 0 and labels.max() == 5
    assert [ds[i][1] for i in range(0, 24, 5)] == labels[::5].tolist()
    assert ds[-1][1] == 5
    with pytest.raises(IndexError):
        ds[24]
    tiny = small(image_size=48)
    assert tiny[0][0].shape == (3, 48, 48)


def test_registered_as_synthetic_and_picklable_for_worker_processes():
    ds = DATASETS.build("synthetic", num_identities=3, images_per_identity=2, seed=1)
    assert isinstance(ds, SyntheticFaces) and ds.num_classes == 3
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[4][0], ds[4][0])


def test_meta_matches_severities_and_clean_samples_are_untouched():
    ds = small(num_identities=8, images_per_identity=5, degradation_probability=0.7)
    severities = ds.severities()
    assert severities.shape == (40,) and severities.dtype == np.float32
    assert severities.min() >= 0 and severities.max() <= 1
    assert (severities == 0).any() and (severities > 0.3).any()
    for i in range(len(ds)):
        meta = ds.meta(i)
        assert meta["severity"] == pytest.approx(float(severities[i]))
        assert meta["identity"] == ds.labels()[i] and meta["split"] == "train"
        # Per-kind severities combine by probabilistic union into the recorded one.
        union = 1.0 - np.prod([1.0 - s for s in meta["degradations"].values()])
        assert meta["severity"] == pytest.approx(union, abs=1e-6)
        degraded, clean = ds.image(i), ds.image(i, degraded=False)
        if meta["severity"] == 0:
            assert torch.equal(degraded, clean)
        else:
            assert not torch.equal(degraded, clean)


def test_recorded_severity_tracks_image_damage():
    ds = small(num_identities=10, images_per_identity=8, seed=0, degradation_probability=0.8)
    severities = ds.severities()
    damage = [-min(60.0, float(psnr(ds.image(i, degraded=False), ds.image(i))))
              for i in range(len(ds))]
    rho = spearmanr(severities, damage).correlation
    assert rho > 0.6, rho


def test_clean_share_follows_the_degradation_settings_without_rendering():
    config = SyntheticConfig(num_identities=200, images_per_identity=10, seed=2,
                             degradation_probability=0.6, kind_probability=0.25, max_severity=0.5)
    severities = SyntheticFaces(config).severities()
    kinds = len(config.degradation_kinds)
    expected_clean = 0.4 + 0.6 * 0.75**kinds
    assert abs((severities == 0).mean() - expected_clean) < 0.04
    # Each kind is at most 0.5, so the union of K kinds is at most 1 - 0.5**K.
    assert severities.max() <= 1 - 0.5**kinds + 1e-6
    none = SyntheticFaces(SyntheticConfig(num_identities=5, degradation_probability=0.0))
    assert not none.severities().any()


def _within_between(images: torch.Tensor, labels: np.ndarray) -> tuple[float, float]:
    flat = images.float().flatten(1)
    distance = torch.cdist(flat, flat) / flat.shape[1] ** 0.5  # RMS pixel distance
    labels = torch.as_tensor(labels)
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool)
    return float(distance[same & off_diagonal].mean()), float(distance[~same].mean())


def test_same_identity_samples_are_closer_than_different_identities():
    ds = small(num_identities=8, images_per_identity=4, seed=5, degradation_probability=0.0)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    # Whole crop: background and lighting change per sample, so the margin is modest.
    within, between = _within_between(images, ds.labels())
    assert within < 0.9 * between, (within, between)
    # Face region (inside the cheeks, brows to chin): identity dominates.
    within, between = _within_between(images[:, :, 28:100, 28:84], ds.labels())
    assert within < 0.75 * between, (within, between)
    # Not trivially separable: samples of one identity are not near-duplicates.
    assert within > 0.3 * between


def test_train_and_test_splits_have_disjoint_identities():
    train = small()
    test = train.held_out(num_identities=4)
    assert test.config.split == "test" and test.num_classes == 4 and test.config.seed == 3
    assert set(train.identity_ids).isdisjoint(test.identity_ids)
    assert test.meta(0)["global_identity"] not in set(train.identity_ids)
    assert not torch.equal(train.image(0, degraded=False), test.image(0, degraded=False))
    again = small(split="test", num_identities=4)
    assert torch.equal(again[3][0], test[3][0])
    with pytest.raises(SyntheticDataError, match="already"):
        test.held_out()


def test_landmarks_sit_on_the_alignment_template_and_on_the_eyes():
    ds = small(num_identities=30, images_per_identity=4, degradation_probability=0.0)
    points = np.stack([ds.landmarks(i) for i in range(len(ds))])
    assert np.abs(points.mean(axis=0) - TEMPLATE).max() < 1.5
    assert points.std(axis=0).max() < 5.0  # pose jitter stays in an alignment-residual range
    # Eye landmarks hit the iris/pupil: darker than the face around them (median over samples).
    contrast = []
    for i in range(len(ds)):
        gray = ds.image(i).float().mean(0)
        for x, y in points[i, :2]:
            centre = gray[int(round(y)), int(round(x))]
            cheek = gray[int(round(y)) + 12, int(round(x))]
            contrast.append(float(cheek - centre))
    assert np.median(contrast) > 30


def test_scaled_landmarks_follow_image_size():
    big = small(image_size=224, degradation_probability=0.0)
    base = small(degradation_probability=0.0)
    np.testing.assert_allclose(big.landmarks(2), 2 * base.landmarks(2), atol=1e-3)


def test_make_pairs_is_balanced_correct_and_reproducible():
    ds = small(num_identities=10, images_per_identity=3)
    idx1, idx2, issame = make_pairs(ds, 101, seed=7)
    assert idx1.dtype == np.int64 and issame.dtype == bool and len(idx1) == 101
    assert issame.sum() == 51
    labels = ds.labels()
    np.testing.assert_array_equal(labels[idx1] == labels[idx2], issame)
    assert np.all(idx1 != idx2)
    assert idx1.min() >= 0 and max(idx1.max(), idx2.max()) < len(ds)
    assert len(set(issame[:20].tolist())) == 2  # shuffled, not all genuine first
    again = make_pairs(ds, 101, seed=7)
    for x, y in zip((idx1, idx2, issame), again):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(make_pairs(ds, 101, seed=8)[0], idx1)


def test_make_pairs_on_a_generic_dataset_and_bad_inputs():
    generic = [(torch.zeros(1), label) for label in (0, 0, 1, 2, 2, 2)]
    idx1, idx2, issame = make_pairs(generic, 40, seed=0)
    labels = np.array([label for _, label in generic])
    np.testing.assert_array_equal(labels[idx1] == labels[idx2], issame)
    with pytest.raises(PairsError, match="two identities"):
        make_pairs([(None, 0), (None, 0)], 4)
    with pytest.raises(PairsError, match="at least two samples"):
        make_pairs([(None, 0), (None, 1)], 4)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"num_identities": 0}, "num_identities"),
        ({"split": "val"}, "split"),
        ({"degradation_probability": 1.5}, "degradation_probability"),
        ({"max_severity": -0.1}, "max_severity"),
        ({"kind_probability": 2.0}, "kind_probability"),
        ({"image_size": 8}, "image_size"),
    ],
)
def test_invalid_config_raises(settings, message):
    with pytest.raises(SyntheticDataError, match=message):
        SyntheticFaces(SyntheticConfig(**settings))


def test_render_batch_matches_per_item_rendering():
    ds = small(num_identities=5, images_per_identity=4, degradation_probability=0.9)
    order = [3, 17, 0, 9, 12, 5, 19]
    images, labels = ds.render_batch(order)
    assert images.shape == (7, 3, 112, 112) and images.dtype == torch.uint8
    assert labels.tolist() == [ds.label(i) for i in order]
    for row, i in enumerate(order):
        # Batched and single convolutions may round a pixel differently by one grey level.
        diff = (images[row].int() - ds[i][0].int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, i
