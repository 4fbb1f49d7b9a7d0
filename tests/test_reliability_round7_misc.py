"""Round 7: IJB landmarks checked once, one single-fold rule, calibrate embeds only the folds
it uses (and compares weights once), Euclidean scores of zero features, video frames checked as
the float32 values they are pooled as."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qualiface.cli import app

# -- eval ijb: landmark_problems once per protocol ------------------------------------------


def _fake_embed(images):
    x = images.float() / 255
    grid = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
    return (grid - 0.5) * 4, x.std(dim=(1, 2, 3))


def _ijb_with_odd_landmarks(root):
    """4 faces (one template each), 2 genuine + 2 impostor pairs; face b's points are collapsed
    (resized from the loose crop), face c's mirrored."""
    import cv2

    from qualiface.data.alignment import TEMPLATE_112

    folder = root / "IJBC"
    (folder / "meta").mkdir(parents=True)
    (folder / "loose_crop").mkdir()
    good = " ".join(f"{v:.2f}" for v in (TEMPLATE_112 * 1.5 + 10).ravel())
    mirrored = " ".join(f"{v:.2f}" for v in (TEMPLATE_112 * 1.5 + 10)[:, ::-1].ravel())
    (folder / "meta" / "ijbc_face_tid_mid.txt").write_text(
        "a.jpg 1 1\nb.jpg 2 2\nc.jpg 3 3\nd.jpg 4 4\n")
    (folder / "meta" / "ijbc_name_5pts_score.txt").write_text(
        f"a.jpg {good} 0.9\nb.jpg {'-1 ' * 10}0.2\nc.jpg {mirrored} 0.8\nd.jpg {good} 0.7\n")
    (folder / "meta" / "ijbc_template_pair_label.txt").write_text("1 2 1\n3 4 1\n1 3 0\n2 4 0\n")
    rng = np.random.default_rng(0)
    for name in "abcd":
        png = folder / "loose_crop" / f"{name}.png"
        cv2.imwrite(str(png), rng.integers(0, 256, (150, 140, 3), dtype=np.uint8))
        png.rename(folder / "loose_crop" / f"{name}.jpg")


def test_eval_ijb_checks_the_landmarks_once_and_reports_the_same_counts(tmp_path, monkeypatch):
    """The CLI's warning, the image alignment and the report each ran ``landmark_problems``
    over every face of the protocol (three passes over IJB-C's half a million)."""
    import qualiface.cli.eval as cli_eval
    import qualiface.data.alignment as alignment
    import qualiface.eval.ijb as eval_ijb

    _ijb_with_odd_landmarks(tmp_path)
    original = alignment.landmark_problems
    whole_protocol_calls = []

    def counted(landmarks, *args, **kwargs):
        if len(landmarks) == 4:  # the protocol's faces, not a single face's check
            whole_protocol_calls.append(1)
        return original(landmarks, *args, **kwargs)

    monkeypatch.setattr(alignment, "landmark_problems", counted)
    monkeypatch.setattr(eval_ijb, "landmark_problems", counted, raising=False)  # where it was read
    monkeypatch.setattr(cli_eval, "_load_embed_fn", lambda model, device: (_fake_embed, "fake-1"))
    (tmp_path / "model").mkdir()
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["eval", "ijb", "--model", str(tmp_path / "model"), "--root",
                                      str(tmp_path), "--name", "IJBC", "--out", str(out),
                                      "--flip", "none"])
    assert result.exit_code == 0, result.output
    assert len(whole_protocol_calls) == 1
    printed = " ".join(result.output.split())
    assert "2 face(s) have odd 5-point landmarks (1 resized from the loose crop" in printed
    landmarks = json.loads((out / "metrics.json").read_text())["landmarks"]
    assert landmarks["odd"] == 2 and landmarks["resized_unaligned"] == 1
    assert landmarks["examples"][0].startswith("b.jpg: landmarks lie within 0 pixels")
    assert landmarks["examples"][1].startswith("c.jpg: landmarks are a mirror image")


def test_protocol_rechecks_landmarks_it_is_given_anew(tmp_path):
    from qualiface.data.ijb import load_ijb

    _ijb_with_odd_landmarks(tmp_path)
    protocol = load_ijb(tmp_path, "IJBC")
    assert sorted(protocol.landmark_problems()) == [1, 2]
    protocol.landmarks = np.repeat(protocol.landmarks[:1], 4, axis=0)  # every face as a's
    assert protocol.landmark_problems() == {}
    protocol.landmarks = None
    assert protocol.landmark_problems() == {}


# -- one single-fold rule --------------------------------------------------------------------


def test_accuracy_folds_is_the_rule_both_pair_evaluations_use():
    from qualiface.eval.verification import accuracy_folds

    assert accuracy_folds(None) == (None, None)
    assert accuracy_folds(np.array([], dtype=np.int64)) == (None, None)
    folds, note = accuracy_folds([8, 8, 9, 9])
    assert folds.tolist() == [8, 8, 9, 9] and note is None
    folds, note = accuracy_folds(np.array([9, 9, 9]))
    assert folds is None and note.startswith("one protocol fold (9) selected")


# -- export calibrate ------------------------------------------------------------------------


def _write_pairs(path, num_folds: int, people: list[str]) -> None:
    """LFW-style: ``num_folds`` folds x (6 genuine + 6 impostor pairs) over 6 people each."""
    lines = [f"{num_folds}\t6"]
    for fold in range(num_folds):
        group = people[6 * fold: 6 * fold + 6]
        lines += [f"{p}\t1\t2" for p in group]
        lines += [f"{group[i]}\t1\t{group[(i + 1) % 6]}\t2" for i in range(6)]
    path.write_text("\n".join(lines) + "\n")


def test_calibrate_embeds_only_the_folds_it_fits_and_reports_on(tmp_path, monkeypatch):
    """Every image of the pairs file was embedded, those of unused folds included (LFW's
    --folds 1-7 --holdout-folds 8,9,10 is all of it, but any other choice paid for unused
    folds); the calibration is that of a file holding only the used folds."""
    from qualiface.infer.model import Model, read_model_spec
    from test_infer_cli import _write_images
    from test_infer_model import make_package, random_images

    make_package(tmp_path / "pkg")
    people = [f"P{i}" for i in range(18)]
    _write_images(tmp_path / "lfw", random_images(36, seed=3),
                  [f"{p}/{p}_{n:04d}.jpg" for p in people for n in (1, 2)])
    _write_pairs(tmp_path / "three.txt", 3, people)
    _write_pairs(tmp_path / "two.txt", 2, people[:12])  # folds 1 and 2 of three.txt
    embedded = []
    original = Model.embed

    def counting(self, images, *args, **kwargs):
        embedded.extend(images)
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(Model, "embed", counting)
    outputs = {}
    for name in ("three", "two"):
        embedded.clear()
        result = CliRunner().invoke(app, [
            "export", "calibrate", "--model", str(tmp_path / "pkg"), "--pairs",
            str(tmp_path / f"{name}.txt"), "--images", str(tmp_path / "lfw"), "--fmr", "0.2",
            "--folds", "1", "--holdout-folds", "2", "--out", str(tmp_path / f"c-{name}")])
        assert result.exit_code == 0, result.output
        outputs[name] = result.output.split("rejection thresholds", 1)[1]
        assert len(embedded) == len(set(embedded)) == 24, name  # folds 1 and 2: 12 people
        assert not any(f"P{i}_" in str(path) for path in embedded for i in range(12, 18))
    calibrations = [read_model_spec(tmp_path / f"c-{name}").calibration
                    for name in ("three", "two")]
    assert calibrations[0] == calibrations[1] and calibrations[0].n_pairs == 12
    assert outputs["three"] == outputs["two"]


def test_calibrate_compares_the_out_weights_once(tmp_path, monkeypatch):
    """Recalibrating an earlier calibrated copy compared the weights byte by byte twice."""
    import qualiface.cli.export as cli_export
    from test_reliability_round6_infer import _two_fold_calibration_args

    args = [*_two_fold_calibration_args(tmp_path), "--out", str(tmp_path / "copy")]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    original = cli_export._same_weights
    calls = []

    def counted(folder, model):
        calls.append(folder)
        return original(folder, model)

    monkeypatch.setattr(cli_export, "_same_weights", counted)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert len(calls) == 1


# -- Euclidean scores of zero features -------------------------------------------------------


def test_euclidean_score_of_a_zero_feature_is_that_of_orthogonal_features():
    """A zero row's cosine is 0 (orthogonal), but its Euclidean score was -1 against a unit row
    (a cosine of 0.5) and 0, a perfect match, against another zero row: the two metrics
    ranked such pairs differently, against the documented d^2 = 2 - 2 cos."""
    from qualiface.eval.similarity import cosine_scores, euclidean_scores

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=(6, 8)).astype(np.float32)
    a[0] = 0  # zero vs a feature
    b[1] = 0  # a feature vs zero
    a[2] = b[2] = 0  # zero vs zero
    cosine, euclidean = cosine_scores(a, b), euclidean_scores(a, b)
    assert euclidean.dtype == np.float32
    np.testing.assert_allclose(cosine[:3], 0.0)
    np.testing.assert_allclose(euclidean[:3], -np.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(euclidean, -np.sqrt(2 - 2 * cosine.astype(np.float64)), atol=1e-5)
    # Other rows: the distance of the normalised rows, as before.
    ua = a[3:] / np.linalg.norm(a[3:], axis=1, keepdims=True)
    ub = b[3:] / np.linalg.norm(b[3:], axis=1, keepdims=True)
    np.testing.assert_allclose(euclidean[3:], -np.linalg.norm(ua - ub, axis=1), rtol=1e-6)
    assert np.all(np.diff(euclidean[np.argsort(cosine)]) >= -1e-6)  # same order as the cosine


@pytest.mark.parametrize("rows", [0, 1])
def test_euclidean_scores_of_no_or_one_pair(rows):
    from qualiface.eval.similarity import euclidean_scores

    assert euclidean_scores(np.zeros((rows, 4)), np.ones((rows, 4))).shape == (rows,)


# -- stream: frames checked as pooled -------------------------------------------------------


@pytest.mark.parametrize("mode", ["mean", "qwfa", "qwfaf", "progressive"])
def test_a_frame_beyond_float32_is_refused_not_pooled_into_nan(mode):
    # Was: checked as float64 (finite), pooled as float32 (inf): a NaN template, silently.
    from qualiface.infer.stream import FrameError, aggregate_tracks

    embeddings = np.ones((3, 4))
    embeddings[1, 2] = 1e39
    with pytest.raises(FrameError, match="frame 1: embedding is zero or not finite"):
        aggregate_tracks([0, 0, 1], embeddings, np.ones(3), mode=mode)
    # Large but representable values still pool (the norm is taken in float64).
    embeddings[1, 2] = 1e30
    templates = aggregate_tracks([0, 0, 1], embeddings, np.ones(3), mode=mode)
    assert all(np.isfinite(t.embedding).all() for t in templates)
