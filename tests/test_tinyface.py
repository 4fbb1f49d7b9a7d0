"""TinyFace layout parsing and rank-k on a synthetic fixture, against a naive loop."""

from __future__ import annotations

import numpy as np
import pytest

from qualiface.data.tinyface import TinyFaceFormatError, load_tinyface, subject_of
from qualiface.eval.features import FeatureSet
from qualiface.eval.tinyface import evaluate_tinyface


def write_tinyface(root, seed=0):
    rng = np.random.default_rng(seed)
    test = root / "tinyface" / "Testing_Set"
    for name in ("Probe", "Gallery_Match", "Gallery_Distractor"):
        (test / name).mkdir(parents=True)
    centers = rng.normal(size=(12, 8))
    ids, feats = [], []
    for subject in range(12):
        for n in range(2):
            (test / "Probe" / f"{subject + 1}_{n}.jpg").write_bytes(b"")
            ids.append(f"Probe/{subject + 1}_{n}.jpg")
            feats.append(centers[subject] + rng.normal(0, 0.9, 8))
        for n in range(3):
            (test / "Gallery_Match" / f"{subject + 1}_{10 + n}.jpg").write_bytes(b"")
            ids.append(f"Gallery_Match/{subject + 1}_{10 + n}.jpg")
            feats.append(centers[subject] + rng.normal(0, 0.9, 8))
    for n in range(40):  # distractor names may look like identities: they never match
        name = f"{(n % 12) + 1}_{500 + n}.jpg"
        (test / "Gallery_Distractor" / name).write_bytes(b"")
        ids.append(f"Gallery_Distractor/{name}")
        feats.append(rng.normal(size=8) * 1.5)
    return FeatureSet(ids, np.array(feats, np.float32), np.ones(len(ids), np.float32))


def test_tinyface_rank_k_equals_naive_loop(tmp_path):
    features = write_tinyface(tmp_path)
    protocol = load_tinyface(tmp_path)
    assert len(protocol.probe_paths) == 24 and np.sum(protocol.gallery_subjects < 0) == 40
    metrics = evaluate_tinyface(protocol, features)  # the default ranks: AdaFace's 1, 5, 20 and 10
    assert [key for key in metrics if key.startswith("rank")] == ["rank1", "rank5", "rank10", "rank20"]
    f = features.features / np.linalg.norm(features.features, axis=1, keepdims=True)
    row = {i: k for k, i in enumerate(features.ids)}
    gallery = protocol.gallery_paths
    for k in (1, 5, 10, 20):
        hits = 0
        for path in protocol.probe_paths:
            subject = subject_of(path)
            sims = [f[row[path]] @ f[row[g]] for g in gallery]
            top = np.argsort(sims)[::-1][:k]
            hits += any(g.startswith("Gallery_Match/") and subject_of(gallery[i]) == subject
                        for i, g in ((i, gallery[i]) for i in top))
        assert metrics[f"rank{k}"] == pytest.approx(hits / 24)
    assert 0 < metrics["rank1"] <= metrics["rank5"] <= 1


def test_tinyface_layout_errors(tmp_path):
    with pytest.raises(TinyFaceFormatError, match="missing folder"):
        load_tinyface(tmp_path)
    with pytest.raises(TinyFaceFormatError, match="<subject>_<n>"):
        subject_of("noseparator.jpg")


def test_probe_without_a_gallery_match_is_refused(tmp_path):
    # Once the unmated probe was silently left out of rank-k (reported over fewer probes).
    write_tinyface(tmp_path)
    probe = tmp_path / "tinyface" / "Testing_Set" / "Probe"
    (probe / "99_0.jpg").write_bytes(b"")
    with pytest.raises(TinyFaceFormatError, match=r"Probe: 1 probe image.*99_0\.jpg") as info:
        load_tinyface(tmp_path)
    assert str(probe) in str(info.value)
