"""The ``qualiface demo`` job: end to end on tiny settings, the identity split, clean CLI errors."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qualiface.cli import app
from qualiface.demo import (
    DemoError,
    MARKER,
    DemoOptions,
    check_out_folder,
    choose_threads,
    claim_folder,
    fnmr_after_discard,
    run_demo,
    severity_bins,
    split_identities,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A demo small enough for CI: 32-px faces, a handful of identities, three optimizer steps.
TINY = [
    "data.params.num_identities=8", "data.params.images_per_identity=4",
    "data.params.image_size=32", "model.params.input_size=32", "model.params.embedding_size=32",
    "val.params.num_identities=6", "val.params.images_per_identity=5",
    "val.params.image_size=32", "train.batch_size=16",
]


PLOTS = ("roc.png", "edc.png", "quality_hist.png", "training_loss.png",
         "model_quality_by_severity.png")


def _check_report_folder(out: Path) -> dict:
    for name in ("report.html", "report.md", "metrics.json", "curves.json"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    markdown = (out / "report.md").read_text()
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
        assert base64.b64encode(data).decode() in html, name  # self-contained: plot embedded
        assert f"({name})" in markdown, name
    assert html.count("data:image/png;base64,") == len(PLOTS)
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_synthetic_demo_writes_report_with_sane_metrics(tmp_path):
    out = tmp_path / "demo"
    result = run_demo(DemoOptions(out_dir=out, overrides=TINY, steps=3, num_pairs=200, seed=3,
                                  threads=1, progress=False))
    metrics = _check_report_folder(out)
    assert result.report == out / "report.html"
    assert (result.model_package / "model.json").is_file()

    summary = metrics["summary"]
    for key in ("accuracy", "auc", "eer", "tar@far=1e-02"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert -1.0 <= summary["spearman_quality_vs_severity"] <= 1.0
    verification = metrics["verification"]
    assert verification["num_genuine"] + verification["num_impostor"] == 200
    assert len(verification["fold_accuracies"]) == 10
    assert metrics["data"]["test_images"] == 30 and metrics["data"]["test_identities"] == 6
    assert metrics["data"]["train_images"] == 32
    assert metrics["training"]["steps"] == 3
    curve = metrics["training"]["loss_curve"]
    assert curve["step"][-1] == 3 and all(np.isfinite(curve["loss"]))
    assert len(curve["identity_loss"]) == len(curve["step"])  # QCFace logs the margin loss
    assert len(curve["norm_loss"]) == len(curve["step"])  # and its norm regulariser
    for quality in ("model quality", "feature norm"):
        assert set(metrics["quality"][quality]["vs_severity"]) == {"spearman", "kendall"}
    assert set(metrics["run"]["seconds"]) >= {"generating data", "training", "evaluating"}

    # Independent check of the quality-vs-severity number: re-render the held-out split,
    # embed it with the saved package, and rank-correlate with scipy directly.
    from scipy import stats

    from qualiface.data.synthetic import SyntheticFaces
    from qualiface.infer.model import Model

    held_out = SyntheticFaces(num_identities=6, images_per_identity=5, image_size=32, seed=3,
                              split="test")
    images = torch.stack([held_out[i][0] for i in range(len(held_out))])
    _, quality = Model.load(result.model_package).embed(images)
    expected = stats.spearmanr(quality.numpy(), held_out.severities()).statistic
    assert summary["spearman_quality_vs_severity"] == pytest.approx(expected, abs=1e-6)


def _write_face_folder(root: Path, identities: int, per_identity: int, size: int) -> None:
    import cv2

    from qualiface.data.synthetic import SyntheticFaces

    faces = SyntheticFaces(num_identities=identities, images_per_identity=per_identity,
                           image_size=size, seed=11, degradation_probability=0.0)
    for i in range(len(faces)):
        image, label = faces[i]
        folder = root / f"person_{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        bgr = np.ascontiguousarray(image.numpy().transpose(1, 2, 0)[:, :, ::-1])
        assert cv2.imwrite(str(folder / f"{i:03d}.png"), bgr)


@pytest.mark.slow
def test_cli_demo_on_image_folder_splits_identities(tmp_path):
    data = tmp_path / "faces"
    _write_face_folder(data, identities=10, per_identity=5, size=48)
    out = tmp_path / "out"
    args = ["demo", "--data", str(data), "--out", str(out), "--steps", "2", "--num-pairs", "100",
            "--threads", "1", "--no-progress", "--set", "model.params.input_size=32",
            "--set", "model.params.embedding_size=32", "--set", "train.batch_size=16"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output
    metrics = _check_report_folder(out)
    d = metrics["data"]
    assert d["format"] == "image folder" and d["source"] == str(data)
    assert d["test_identities"] == 3 and d["train_identities"] == 7  # round(0.3 * 10) held out
    assert d["train_images"] == 35 and d["test_images"] == 15
    assert str(data) in (out / "report.html").read_text()  # the report says what was used

    # The training copy is an ordinary .rec at the model's input size.
    from qualiface.data.recordio import RecordIODataset

    rec = RecordIODataset(out / "data" / "train.rec")
    assert rec.num_classes == 7 and len(rec) == 35
    assert tuple(rec[0][0].shape) == (3, 32, 32)


@pytest.mark.slow
def test_demo_on_recordio(tmp_path):
    from qualiface.data.decode import encode_jpeg
    from qualiface.data.recordio import RecordIOWriter
    from qualiface.data.synthetic import SyntheticFaces

    faces = SyntheticFaces(num_identities=8, images_per_identity=4, image_size=32, seed=5)
    with RecordIOWriter(tmp_path / "src" / "train") as writer:
        for i in range(len(faces)):
            image, label = faces[i]
            writer.add(encode_jpeg(image), label)
    out = tmp_path / "out"
    result = run_demo(DemoOptions(out_dir=out, data=tmp_path / "src" / "train.rec",
                                  overrides=TINY, steps=1, num_pairs=40, threads=1,
                                  progress=False))
    assert result.metrics["data"]["format"] == "recordio"
    assert result.metrics["data"]["train_identities"] + result.metrics["data"][
        "test_identities"] == 8
    _check_report_folder(out)


# --------------------------------------------------------------------------- fast unit tests


def test_split_identities_is_disjoint_capped_and_seeded():
    labels = np.repeat(np.arange(12), [1, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5])
    split = split_identities(labels, test_fraction=0.25, max_train=6, max_test=10, max_images=3,
                             seed=1)
    train_ids, test_ids = set(labels[split.train]), set(labels[split.test])
    assert not train_ids & test_ids
    assert len(test_ids) == 3 and len(train_ids) == 6  # round(0.25 * 12) held out; cap of 6
    assert 0 not in test_ids  # identity 0 has one image: it can only train
    assert np.bincount(split.test_labels).tolist() == [3, 3, 3]  # max_images per identity
    assert np.all(np.diff(split.train_labels) >= 0) and split.train_labels.max() == 5
    # New labels follow the original identity of each image.
    for new in range(6):
        assert len(set(labels[split.train[split.train_labels == new]])) == 1
    again = split_identities(labels, test_fraction=0.25, max_train=6, max_test=10, max_images=3,
                             seed=1)
    assert np.array_equal(again.test, split.test) and np.array_equal(again.train, split.train)
    other = split_identities(labels, test_fraction=0.25, max_train=6, max_test=10, max_images=3,
                             seed=2)
    assert not np.array_equal(other.test, split.test)


def test_split_identities_needs_enough_identities():
    with pytest.raises(DemoError, match="held-out identities"):
        split_identities(np.array([0, 0, 1, 2]), test_fraction=0.3, max_train=10, max_test=10,
                         max_images=5, seed=0)
    with pytest.raises(DemoError, match="test_fraction"):
        split_identities(np.arange(10).repeat(2), test_fraction=1.0, max_train=10, max_test=10,
                         max_images=5, seed=0)


def test_severity_bins_partition_the_images():
    severity = np.array([0.0, 0.0, 0.1, 0.34, 0.5, 0.9, 1.0])
    bins = severity_bins(severity)
    assert [label for label, _ in bins] == ["clean", "severity 0.00-0.33", "severity 0.33-0.67",
                                           "severity 0.67-1.00"]
    masks = np.stack([mask for _, mask in bins])
    assert np.array_equal(masks.sum(axis=0), np.ones(len(severity)))
    assert masks[0].sum() == 2 and masks[3].sum() == 2


def test_fnmr_after_discard_reads_the_step_curve():
    from qualiface.eval.quality import edc

    # 4 mated comparisons with qualities 1..4; the two lowest-quality ones are errors.
    scores = np.array([0.1, 0.2, 0.9, 0.95, 0.0, 0.05, 0.3, 0.15])
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    quality = np.array([1.0, 2.0, 3.0, 4.0, 1.0, 1.0, 1.0, 1.0])
    curve = edc(scores, labels, quality, threshold=0.5)
    assert fnmr_after_discard(curve, 0.0) == pytest.approx(0.5)
    assert fnmr_after_discard(curve, 0.2) == pytest.approx(0.5)  # 0.25 is the first cut
    assert fnmr_after_discard(curve, 0.25) == pytest.approx(1 / 3)
    assert fnmr_after_discard(curve, 0.5) == pytest.approx(0.0)


def test_claim_folder_only_clears_what_a_demo_wrote(tmp_path):
    ours = claim_folder(tmp_path / "train")
    (ours / "metrics.jsonl").write_text("{}\n")
    claim_folder(ours)  # a second demo run starts from an empty folder
    assert sorted(p.name for p in ours.iterdir()) == [MARKER]

    theirs = tmp_path / "data"
    theirs.mkdir()
    (theirs / "precious.jpg").write_bytes(b"x")
    with pytest.raises(DemoError, match="not written by qualiface demo"):
        claim_folder(theirs)
    assert (theirs / "precious.jpg").read_bytes() == b"x"


def test_demo_refuses_an_out_holding_another_runs_report_before_any_work(tmp_path):
    # Before: the demo trained for minutes, then overwrote the user's report and metrics.
    out = tmp_path / "eval-run"
    out.mkdir()
    (out / "metrics.json").write_text('{"mine": 1}\n')
    (out / "report.html").write_text("<p>mine</p>")
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--steps", "1"])
    assert result.exit_code == 1 and "not written by qualiface demo" in result.output
    assert (out / "metrics.json").read_text() == '{"mine": 1}\n'
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.html"]
    # An earlier demo's output (train/ carries the marker) is replaced as before.
    claim_folder(out / "train")
    check_out_folder(out)


def test_choose_threads(monkeypatch):
    assert choose_threads(3) == 3
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("os.getloadavg", lambda: (9.0, 9.0, 9.0))
    assert choose_threads(0) == 1  # oversubscribed: one thread
    monkeypatch.setattr("os.getloadavg", lambda: (0.1, 0.1, 0.1))
    assert choose_threads(0) == 2


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/faces"], "/nonexistent/faces"),
    (["--steps", "2", "--epochs", "1"], "not both"),
    (["--set", "optim.lr"], "key=value"),
    (["--set", "optim.nope=1"], "optim.nope"),
])
def test_cli_demo_bad_input_is_one_clean_error(tmp_path, args, message):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 1
    assert "error:" in result.output and message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "train").exists()


def test_cli_demo_rejects_a_folder_without_images(tmp_path):
    (tmp_path / "empty" / "someone").mkdir(parents=True)
    result = CliRunner().invoke(app, ["demo", "--data", str(tmp_path / "empty"), "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 1 and "no identity folder with images" in result.output


def test_report_plots_carry_the_loss_curve_and_severity_groups():
    from types import SimpleNamespace

    from qualiface.demo import report_plots

    groups = {"clean": np.array([0.8, 0.9]), "severity 0.67-1.00": np.array([0.2])}
    evaluation = SimpleNamespace(histograms={"model quality by severity": groups})
    lines, boxes = report_plots({"loss_curve": {"step": [2, 4, 6], "loss": [9.0, 7.5, 6.25]}},
                                evaluation)
    (title, spec), = lines.items()
    assert title == "training loss" and spec["x"] == "optimizer step"
    assert spec["series"] == {"total loss": ([2, 4, 6], [9.0, 7.5, 6.25])}
    assert spec["markers"] == []
    assert boxes == {"model quality by severity": groups}

    # QCFace: each loss term drawn, the norm prior switching on marked (an older curve without
    # ``phase_changes`` falls back to ``norm_prior_from``).
    qcface = {"step": [2, 4, 6], "loss": [9.0, 7.5, 20.0], "identity_loss": [9.0, 7.5, 6.0],
              "norm_loss": [30.0, 20.0, 14.0], "norm_prior_from": 6}
    lines, _ = report_plots({"loss_curve": qcface}, evaluation)
    assert lines["training loss"]["series"] == {
        "total loss": ([2, 4, 6], [9.0, 7.5, 20.0]),
        "identity (margin) loss": ([2, 4, 6], [9.0, 7.5, 6.0]),
        "norm regulariser L_g (x lambda_g in the total once on)": ([2, 4, 6], [30.0, 20.0, 14.0])}
    assert lines["training loss"]["markers"] == [(6, "norm regulariser on")]


# --------------------------------------------------------------------------- thread control


def test_torch_threads_restores_the_previous_count():
    from qualiface.threads import torch_threads

    torch.set_num_threads(2)
    try:
        with torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="inside"):
            with torch_threads(1):
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2  # restored on error too
        with pytest.raises(ValueError, match=">= 1"):
            with torch_threads(0):
                pass
    finally:
        torch.set_num_threads(1)


class _PerItemOnly(torch.utils.data.Dataset):
    """Hides ``render_batch``: ``decode_all`` must index item by item; records thread counts."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self.threads_seen: set[int] = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        self.threads_seen.add(torch.get_num_threads())
        return self.dataset[index]


def test_decode_all_batch_render_matches_per_item_decode_on_one_thread():
    """The demo's training cache: ``render_batch`` in chunks gives the per-item pixels."""
    from qualiface.data.synthetic import SyntheticFaces
    from qualiface.train.data import decode_all

    faces = SyntheticFaces(num_identities=5, images_per_identity=3, image_size=32, seed=7,
                           degradation_probability=0.7)
    per_item = _PerItemOnly(faces)
    chunks = []
    render_batch = faces.render_batch
    faces.render_batch = lambda indices: chunks.append(list(indices)) or render_batch(indices)
    torch.set_num_threads(2)
    try:
        batched_images, batched_labels = decode_all(faces, batch_size=4, progress=False)
        assert torch.get_num_threads() == 2  # restored afterwards
        images, labels = decode_all(per_item, batch_size=4, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14]]
    assert per_item.threads_seen == {1}  # decoded with one torch thread
    assert batched_images.shape == (15, 3, 32, 32) and batched_images.dtype == torch.uint8
    assert torch.equal(batched_images, images)
    assert batched_labels.tolist() == labels.tolist() == [i // 3 for i in range(15)]
