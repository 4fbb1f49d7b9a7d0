"""IJB protocol parsing and evaluation on a small fixture written in the real file layout."""

from __future__ import annotations

import numpy as np
import pytest

from qualiface.data.ijb import IJBFormatError, load_ijb, read_int_columns
from qualiface.eval.features import FeatureSet
from qualiface.eval.ijb import IJBOptions, evaluate_ijb


def write_ijb_fixture(root, seed: int = 0, name: str = "IJBC"):
    """A tiny IJB-C: 30 subjects, 2 templates each, several media per template."""
    rng = np.random.default_rng(seed)
    folder = root / name
    (folder / "meta").mkdir(parents=True)
    (folder / "loose_crop").mkdir()
    prefix = name.lower()
    lines, lmk_lines, images, templates, medias = [], [], [], [], []
    subject_of_template = {}
    image_number = 1
    for subject in range(30):
        for k in range(2):
            template = 1000 + subject * 7 + k * 3  # non-contiguous ids
            subject_of_template[template] = subject
            for _ in range(rng.integers(1, 6)):
                media = int(rng.integers(50, 60))
                image = f"{image_number}.jpg"
                image_number += 1
                lines.append(f"{image} {template} {media}")
                points = " ".join(f"{v:.3f}" for v in rng.uniform(20, 90, 10))
                lmk_lines.append(f"{image} {points} {rng.uniform(0.5, 1):.3f}")
                images.append(image)
                templates.append(template)
                medias.append(media)
    (folder / "meta" / f"{prefix}_face_tid_mid.txt").write_text("\n".join(lines) + "\n")
    (folder / "meta" / f"{prefix}_name_5pts_score.txt").write_text("\n".join(lmk_lines) + "\n")
    ids = sorted(subject_of_template)
    gallery = [t for t in ids if (t - 1000) % 7 == 0]  # k == 0 templates
    probes = [t for t in ids if t not in gallery]
    pairs = [(g, p, int(subject_of_template[g] == subject_of_template[p]))
             for g in gallery for p in probes if rng.random() < 0.5 or
             subject_of_template[g] == subject_of_template[p]]
    (folder / "meta" / f"{prefix}_template_pair_label.txt").write_text(
        "\n".join(f"{a} {b} {c}" for a, b, c in pairs) + "\n")
    # 1:N: G1 holds the first 15 subjects, G2 the rest; probes are the other templates.
    for label, members in (("G1", gallery[:15]), ("G2", gallery[15:])):
        rows = [f"{t},{subject_of_template[t]},img/{t}.jpg" for t in members]
        (folder / "meta" / f"{prefix}_1N_gallery_{label}.csv").write_text(
            "TEMPLATE_ID,SUBJECT_ID,FILENAME\n" + "\n".join(rows) + "\n")
    rows = [f"{t},{subject_of_template[t]},img/{t}.jpg" for t in probes for _ in range(2)]
    (folder / "meta" / f"{prefix}_1N_probe_mixed.csv").write_text(
        "TEMPLATE_ID,SUBJECT_ID,FILENAME\n" + "\n".join(rows) + "\n")
    # Features: subject direction + noise; raw norms vary (so norm pooling differs from mean).
    centers = rng.normal(size=(30, 16))
    feats = np.stack([centers[subject_of_template[t]] + rng.normal(0, 1.2, 16) for t in templates])
    feats *= rng.uniform(0.3, 3.0, (len(feats), 1))
    return images, FeatureSet(images, feats.astype(np.float32),
                              rng.uniform(0.1, 1, len(images)).astype(np.float32))


def _naive_templates(protocol, features, mode):
    """The InsightFace reference loops: mean within media, sum across media, normalise."""
    out = {}
    f = features.features[features.rows(protocol.images)].astype(np.float64)
    if mode == "media":
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
    for t in np.unique(protocol.template_ids):
        idx = np.flatnonzero(protocol.template_ids == t)
        total = sum(f[idx][protocol.media_ids[idx] == m].mean(0)
                    for m in np.unique(protocol.media_ids[idx]))
        out[t] = total / np.linalg.norm(total)
    return out


@pytest.mark.parametrize("mode", ["norm", "media"])
def test_vectorised_ijb_equals_naive_loops(tmp_path, mode):
    _, features = write_ijb_fixture(tmp_path)
    protocol = load_ijb(tmp_path, "IJBC")
    assert set(protocol.galleries) == {"G1", "G2"} and len(protocol.probe[0]) == 30
    result = evaluate_ijb(protocol, features, IJBOptions(aggregation=mode, fars=(1e-2, 1e-1)))
    templates = _naive_templates(protocol, features, mode)
    naive_scores = np.array([templates[a] @ templates[b]
                             for a, b in zip(protocol.pair_first, protocol.pair_second)])
    np.testing.assert_allclose(result.scores, naive_scores, atol=1e-5)
    labels = protocol.pair_label
    for far in (1e-2, 1e-1):
        best = 0.0
        for t in np.concatenate([np.unique(naive_scores), [np.inf]]):
            if np.mean(naive_scores[~labels] >= t) <= far:
                best = max(best, np.mean(naive_scores[labels] >= t))
        got = result.metrics["verification"]["tar_at_far"][f"{far:.0e}"]
        assert got == pytest.approx(best, abs=1e-9)
    # 1:N rank-1 per gallery with a naive argsort loop.
    ident = result.metrics["identification"]
    probe_ids, probe_subjects = protocol.probe
    for label, (gallery_ids, gallery_subjects) in protocol.galleries.items():
        hits, mated = 0, 0
        for t, subject in zip(probe_ids, probe_subjects):
            if subject not in gallery_subjects:
                continue
            mated += 1
            sims = np.array([templates[t] @ templates[g] for g in gallery_ids])
            hits += gallery_subjects[int(np.argmax(sims))] == subject
        assert ident["galleries"][label]["rank1"] == pytest.approx(hits / mated)
        assert ident["galleries"][label]["num_mated_probes"] == mated == 15


@pytest.mark.parametrize("mode", ["norm", "media"])
def test_detector_score_weights_unit_features_as_insightface(tmp_path, mode):
    # InsightFace: features normalised first (unless the norm is kept), then multiplied by the
    # detector score, then media-averaged and summed. Scaling the raw features was undone by
    # the per-image normalisation of 'media', so --detector-score silently did nothing there.
    _, features = write_ijb_fixture(tmp_path)
    protocol = load_ijb(tmp_path, "IJBC")
    result = evaluate_ijb(protocol, features, IJBOptions(aggregation=mode, fars=(1e-1,),
                                                         detector_score_weight=True))
    f = features.features[features.rows(protocol.images)].astype(np.float64)
    if mode == "media":
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
    f = f * protocol.detector_scores[:, None]
    templates = {}
    for t in np.unique(protocol.template_ids):
        idx = np.flatnonzero(protocol.template_ids == t)
        total = sum(f[idx][protocol.media_ids[idx] == m].mean(0)
                    for m in np.unique(protocol.media_ids[idx]))
        templates[t] = total / np.linalg.norm(total)
    naive = np.array([templates[a] @ templates[b]
                      for a, b in zip(protocol.pair_first, protocol.pair_second)])
    np.testing.assert_allclose(result.scores, naive, atol=1e-5)
    unweighted = evaluate_ijb(protocol, features, IJBOptions(aggregation=mode, fars=(1e-1,)))
    assert np.abs(result.scores - unweighted.scores).max() > 1e-3


def test_ijb_format_errors_name_file_and_line(tmp_path):
    write_ijb_fixture(tmp_path)
    pair_file = tmp_path / "IJBC" / "meta" / "ijbc_template_pair_label.txt"
    text = pair_file.read_text().splitlines()
    text[2] = "1000 1003"
    pair_file.write_text("\n".join(text) + "\n")
    with pytest.raises(IJBFormatError, match=r"ijbc_template_pair_label.txt:3: expected 3 numbers"):
        load_ijb(tmp_path, "IJBC")
    text[2] = "1000 99999 0"
    pair_file.write_text("\n".join(text) + "\n")
    with pytest.raises(IJBFormatError, match="template 99999 that has no image"):
        load_ijb(tmp_path, "IJBC")
    with pytest.raises(IJBFormatError, match="no IJBB protocol"):
        load_ijb(tmp_path, "IJBB")


def test_int_reader_handles_chunk_boundaries(tmp_path):
    rng = np.random.default_rng(3)
    values = rng.integers(0, 10**12, size=(5000, 3))
    path = tmp_path / "ints.txt"
    path.write_text("\n".join(" ".join(map(str, row)) for row in values))  # no final newline
    np.testing.assert_array_equal(read_int_columns(path, 3, chunk_bytes=997), values)
    path.write_text("1 2 3\n4 x 6\n")
    with pytest.raises(IJBFormatError, match=r"ints.txt:2: expected non-negative integers"):
        read_int_columns(path, 3)


def _tiny_ijb(tmp_path, faces="a.jpg 1 1\nb.jpg 2 2\n", pairs="1 2 0\n", points=None):
    meta = tmp_path / "IJBC" / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "ijbc_face_tid_mid.txt").write_text(faces)
    (meta / "ijbc_template_pair_label.txt").write_text(pairs)
    if points is not None:
        (meta / "ijbc_name_5pts_score.txt").write_text(points)
    return meta


@pytest.mark.parametrize("faces", ["a.jpg 1_0 1\nb.jpg 2 2\n",  # int() read template 10
                                   "a.jpg 1 1\nb.jpg -2 2\n",
                                   "a.jpg 1 1\nb.jpg 2 \u0662\n"])  # an Arabic-Indic 2
def test_ijb_face_list_ids_must_be_plain_digits(tmp_path, faces):
    _tiny_ijb(tmp_path, faces=faces, pairs="1 10 0\n")
    line = 1 if "1_0" in faces else 2
    with pytest.raises(IJBFormatError, match=f"ijbc_face_tid_mid.txt:{line}: template and media"):
        load_ijb(tmp_path, "IJBC")


@pytest.mark.parametrize("bad", ["nan", "inf", "1e400"])
def test_ijb_non_finite_landmarks_or_scores_are_refused(tmp_path, bad):
    _tiny_ijb(tmp_path, points=f"a.jpg {'1 ' * 10}0.9\nb.jpg 1 2 3 4 5 6 7 8 9 10 {bad}\n")
    with pytest.raises(IJBFormatError, match=r"ijbc_name_5pts_score.txt:2: .*finite"):
        load_ijb(tmp_path, "IJBC")


@pytest.mark.parametrize("pairs, message", [
    ("\n1 2 0\n\n1 2 5\n", r"pair_label.txt:4: label 5 is not 0 or 1"),  # was "pair 2"
    ("1 2 0\n\n1 7 1\n", r"pair_label.txt:3: pair uses template 7"),
    ("1 2 0\n1 2 1\n1 2 " + "1" * 19 + "\n", r"pair_label.txt:3: a number has more than 18"),
])
def test_ijb_pair_file_errors_give_the_file_line(tmp_path, pairs, message):
    _tiny_ijb(tmp_path, pairs=pairs)
    with pytest.raises(IJBFormatError, match=message):
        load_ijb(tmp_path, "IJBC")


def test_collapsed_landmarks_resize_the_loose_crop_and_every_odd_face_is_counted(tmp_path):
    """One detection with all points at one spot must not stop an evaluation hours in (the
    warp raised mid-extraction), and odd faces are counted for the report, not passed unseen."""
    import cv2

    from qualiface.data.alignment import TEMPLATE_112
    from qualiface.eval.features import resize_to
    from qualiface.eval.ijb import ijb_images, landmark_summary

    good = " ".join(f"{v:.2f}" for v in (TEMPLATE_112 * 1.5 + 10).ravel())
    mirrored = " ".join(f"{v:.2f}" for v in (TEMPLATE_112 * 1.5 + 10)[:, ::-1].ravel())
    _tiny_ijb(tmp_path, faces="a.jpg 1 1\nb.jpg 2 2\nc.jpg 2 3\n",
              points=f"a.jpg {good} 0.9\nb.jpg {'-1 ' * 10}0.2\nc.jpg {mirrored} 0.8\n")
    crops = tmp_path / "IJBC" / "loose_crop"
    crops.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        cv2.imwrite(str(crops / name.replace(".jpg", ".png")), rng.integers(0, 256, (190, 180, 3), dtype=np.uint8))
        (crops / name.replace(".jpg", ".png")).rename(crops / name)  # lossless pixels, IJB's names
    protocol = load_ijb(tmp_path, "IJBC")

    images = ijb_images(protocol)
    faces = [images[k] for k in range(3)]
    assert all(face.shape == (3, 112, 112) for face in faces)
    from qualiface.data.decode import read_image

    assert torch_equal(faces[1], resize_to(112)(read_image(crops / "b.jpg")))  # the loose crop, resized
    summary = landmark_summary(protocol)
    assert summary["odd"] == 2 and summary["resized_unaligned"] == 1
    assert summary["examples"][0].startswith("b.jpg: landmarks lie within 0 pixels")
    assert summary["examples"][1].startswith("c.jpg: landmarks are a mirror image")


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def _reference_landmark_kind(points, template):
    """Per face, with numpy's SVD (an independent computation of the batched closed form)."""
    if not np.isfinite(points).all():
        return "non-finite"
    centred = points - points.mean(axis=0)
    if np.sqrt((centred**2).sum(axis=1).mean()) < 1.0:
        return "collapsed"
    covariance = (template - template.mean(axis=0)).T @ centred
    singular = np.linalg.svd(covariance, compute_uv=False)
    return "mirrored" if np.linalg.det(covariance) < 0 and singular[1] > 0.25 * singular[0] else None


def test_batched_landmark_check_agrees_with_a_per_face_svd():
    from qualiface.data.alignment import TEMPLATE_112, landmark_problem, landmark_problems

    rng = np.random.default_rng(1)
    # Rotated, scaled, noisy templates; some mirrored, some tiny (collapsed), one NaN, some random.
    angles, scales = rng.uniform(-np.pi, np.pi, 400), rng.uniform(0.005, 3, 400)
    points = np.stack([TEMPLATE_112 @ np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) * s
                       for a, s in zip(angles, scales)])
    points += rng.normal(0, 3, points.shape) * rng.uniform(0, 1, (400, 1, 1)) * scales[:, None, None]
    points[::7] = points[::7, :, ::-1]
    points[::11] = rng.uniform(0, 100, (len(points[::11]), 5, 2))
    points[3, 2, 1] = np.nan
    batched = landmark_problems(points)
    reference = {k: kind for k, p in enumerate(points) if (kind := _reference_landmark_kind(p, TEMPLATE_112))}
    assert {k: p.kind for k, p in batched.items()} == reference
    assert set(reference.values()) == {"non-finite", "collapsed", "mirrored"}
    for k in (3, 7, int(np.argmin(scales))):  # the one-face form says the same
        assert landmark_problem(points[k]) == batched[k].message
