"""Streaming aggregation: per-track EQFace progressive templates and whole-video QWFA/QWFAF."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from qualiface.cli import app
from qualiface.infer.io import read_table, write_table
from qualiface.infer.stream import StreamAggregator, aggregate_tracks


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_progressive_template_follows_the_eqface_update():
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((6, 8))
    quality = np.array([0.05, 0.9, 0.4, 0.7, 0.02, 0.6])
    aggregator = StreamAggregator(quality_threshold=0.1)
    accepted = aggregator.feed_many(["t"] * 6, frames, quality)
    assert accepted.tolist() == [False, True, True, True, False, True]
    # Independent computation: quality-weighted mean of the accepted unit features.
    used = quality > 0.1
    expected = _unit((quality[used, None] * _unit(frames[used])).sum(0))
    template = aggregator.template("t")
    np.testing.assert_allclose(template.embedding, expected, atol=1e-6)
    assert template.frames_seen == 6 and template.frames_used == 4
    assert template.quality == pytest.approx(quality[used].sum())


def test_tracks_are_independent_and_disagreeing_frames_are_rejected():
    base = np.eye(4)
    aggregator = StreamAggregator(feature_threshold=0.5)
    aggregator.feed("a", base[0], 1.0)
    aggregator.feed("b", base[1], 1.0)
    assert not aggregator.feed("a", base[2], 1.0)  # orthogonal to a's template: cosine 0 < 0.5
    assert aggregator.feed("a", base[0] + 0.1 * base[2], 1.0)
    templates = {t.track_id: t for t in aggregator.templates()}
    assert set(templates) == {"a", "b"}
    np.testing.assert_allclose(templates["b"].embedding, base[1], atol=1e-6)
    assert templates["a"].frames_used == 2 and templates["a"].frames_seen == 3
    final = aggregator.drop("a")
    assert final.track_id == "a" and aggregator.template("a") is None
    aggregator.feed("c", base[0], 0.0)  # quality not above s_th = 0
    assert aggregator.tracks_without_template() == ["c"]


def test_batch_modes_match_their_formulas():
    rng = np.random.default_rng(1)
    tracks = np.array([2, 1, 2, 1, 2, 1])
    frames = rng.standard_normal((6, 5)) * rng.uniform(0.5, 3, (6, 1))
    quality = np.array([0.9, 0.2, 0.1, 0.3, 0.8, 0.1])
    qwfa = {t.track_id: t for t in aggregate_tracks(tracks, frames, quality, mode="qwfa")}
    for track in (1, 2):
        m = tracks == track
        expected = _unit((quality[m, None] * _unit(frames[m])).sum(0))
        np.testing.assert_allclose(qwfa[track].embedding, expected, atol=1e-5)
    # QWFAF with s_th = 0.5: track 2 (mean 0.6) keeps frames >= 0.5; track 1 (mean 0.2) plain mean.
    qwfaf = {t.track_id: t for t in aggregate_tracks(tracks, frames, quality, mode="qwfaf", quality_threshold=0.5)}
    keep = (tracks == 2) & (quality >= 0.5)
    np.testing.assert_allclose(qwfaf[2].embedding, _unit((quality[keep, None] * _unit(frames[keep])).sum(0)), atol=1e-5)
    assert qwfaf[2].frames_used == 2
    np.testing.assert_allclose(qwfaf[1].embedding, _unit(_unit(frames[tracks == 1]).mean(0)), atol=1e-5)
    with pytest.raises(ValueError, match="unknown mode"):
        aggregate_tracks(tracks, frames, quality, mode="median")


def test_batch_and_progressive_agree_on_frames_used_whatever_the_order():
    """A frame of quality 0 adds nothing to QWFA: neither path counts it as used; the templates
    are equal (default thresholds) for any frame order and chunking; all-zero: the plain mean."""
    frames = np.array([[1, 0, 0, 0], [0, 2, 0, 0], [1, 1, 0, 0], [0, 0, 3, 0], [0, 0, 0, 1], [0, 1, 1, 0]],
                      np.float32)
    tracks = np.array(["a", "a", "a", "b", "b", "b"])
    quality = np.array([0.0, 0.5, 0.25, 0.0, 0.0, 0.0])  # track b: every quality 0
    batch = {t.track_id: t for t in aggregate_tracks(tracks, frames, quality, mode="qwfa")}
    assert batch["a"].frames_used == 2 and batch["a"].frames_seen == 3  # was 3: the 0 counted
    assert batch["b"].frames_used == 3  # fallback to the plain mean pools every frame
    np.testing.assert_allclose(batch["a"].embedding, _unit(0.5 * _unit(frames[1]) + 0.25 * _unit(frames[2])),
                               atol=1e-6)
    np.testing.assert_allclose(batch["b"].embedding, _unit(_unit(frames[3:]).sum(0)), atol=1e-6)
    filtered = {t.track_id: t for t in aggregate_tracks(tracks, frames, quality, mode="qwfaf",
                                                        quality_threshold=0.0)}
    assert filtered["a"].frames_used == 2 and filtered["b"].frames_used == 3
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        aggregator = StreamAggregator()
        aggregator.feed_many(tracks[order][:1], frames[order][:1], quality[order][:1])
        aggregator.feed_many(tracks[order][1:], frames[order][1:], quality[order][1:])
        streamed = aggregator.template("a")
        assert streamed.frames_used == batch["a"].frames_used
        np.testing.assert_allclose(streamed.embedding, batch["a"].embedding, atol=1e-6)
        assert streamed.quality == pytest.approx(batch["a"].quality)


def test_cli_aggregate_writes_enrollable_templates(tmp_path):
    rng = np.random.default_rng(2)
    write_table(tmp_path / "frames.parquet", {
        "track_ids": np.array([7, 7, 8, 8, 8]),
        "embeddings": rng.standard_normal((5, 6)).astype(np.float32),
        "quality": np.array([0.5, 0.6, 0.7, 0.1, 0.9], dtype=np.float32),
    })
    result = CliRunner().invoke(app, ["search", "aggregate", str(tmp_path / "frames.parquet"), "--out", str(tmp_path / "t.npz")])
    assert result.exit_code == 0, result.output
    table = read_table(tmp_path / "t.npz", required=("ids", "embeddings"))
    assert table["ids"].tolist() == ["7", "8"] and table["frames_seen"].tolist() == [2, 3]
    np.testing.assert_allclose(np.linalg.norm(table["embeddings"], axis=1), 1.0, atol=1e-5)
    bad = CliRunner().invoke(app, ["search", "aggregate", str(tmp_path / "t.npz"), "--out", str(tmp_path / "u.npz")])
    assert bad.exit_code == 1 and "missing column(s) track_ids" in bad.output.replace("\n", "")


@pytest.mark.parametrize("mode", ["progressive", "qwfa", "mean"])
@pytest.mark.parametrize("bad", ["nan quality", "zero embedding"])
def test_every_mode_refuses_a_bad_frame_naming_the_file_and_the_row(tmp_path, mode, bad):
    """Progressive skipped a NaN quality silently (the batch modes refused it) and stopped on a
    zero embedding with a message naming neither file nor frame."""
    rng = np.random.default_rng(4)
    embeddings = rng.standard_normal((5, 6)).astype(np.float32)
    quality = np.array([0.5, 0.6, 0.7, 0.1, 0.9], dtype=np.float32)
    if bad == "nan quality":
        quality[3] = np.nan
    else:
        embeddings[3] = 0
    write_table(tmp_path / "frames.npz", {"track_ids": np.array([7, 7, 8, 8, 8]),
                                          "embeddings": embeddings, "quality": quality})
    result = CliRunner().invoke(app, ["search", "aggregate", str(tmp_path / "frames.npz"),
                                      "--out", str(tmp_path / "t.npz"), "--mode", mode])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "frames.npz: frame 3:" in text, text
    assert not (tmp_path / "t.npz").exists()
