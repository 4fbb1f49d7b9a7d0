"""Round 9 (user-facing quality): long loops show a progress bar with a total (rate and ETA come
from ``make_progress``), and benchmarks with tables of figures write a PNG and a Markdown file
beside their JSON."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from qualiface.cli import app
from qualiface.infer.io import read_table, write_table
from test_bench_smoke import _load as load_bench_script

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _Recorder:
    """Stands in for a rich ``Progress``: records every task, its total and how far it got."""

    def __init__(self, calls: list, **kwargs) -> None:
        self.kwargs = kwargs
        self.tasks: list[dict] = []
        calls.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description, total=None, **fields):
        self.tasks.append({"description": description, "total": total, "completed": 0})
        return len(self.tasks) - 1

    def advance(self, task, advance=1):
        self.tasks[task]["completed"] += advance

    def update(self, task, *, advance=None, completed=None, **fields):
        if completed is not None:
            self.tasks[task]["completed"] = completed
        if advance is not None:
            self.tasks[task]["completed"] += advance


@pytest.fixture
def bars(monkeypatch) -> list[_Recorder]:
    """Every ``make_progress`` made during the test (the helpers import it lazily)."""
    import qualiface.progress

    calls: list[_Recorder] = []
    monkeypatch.setattr(qualiface.progress, "make_progress",
                        lambda **kwargs: _Recorder(calls, **kwargs))
    return calls


def _task(bars, description) -> tuple[dict, dict]:
    """The one task called ``description`` on a bar that is shown (``enabled``)."""
    found = [(bar.kwargs, task) for bar in bars for task in bar.tasks
             if task["description"] == description and bar.kwargs.get("enabled", True)]
    assert len(found) == 1, [t for b in bars for t in b.tasks]
    return found[0]


def _valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()


# ------------------------------------------------------------------------------ progress bars


def test_search_query_shows_a_bar_over_the_probes_and_the_answers_do_not_change(
        bars, monkeypatch, tmp_path):
    import qualiface.infer.search as search

    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((30, 8)).astype(np.float32)
    write_table(tmp_path / "g.npz", {"ids": np.array([f"p{i}/a.jpg" for i in range(30)]),
                                     "embeddings": gallery})
    probes = rng.standard_normal((50, 8)).astype(np.float32)
    write_table(tmp_path / "q.npz", {"ids": np.array([f"q{i}" for i in range(50)]),
                                     "embeddings": probes})
    runner = CliRunner()
    enrolled = runner.invoke(app, ["search", "enrol", str(tmp_path / "g.npz"), "-g",
                                   str(tmp_path / "gal"), "--mode", "mean", "--backend", "exact"])
    assert enrolled.exit_code == 0, enrolled.output
    whole = search.Gallery.load(tmp_path / "gal").search(probes, k=3)
    monkeypatch.setattr(search, "SEARCH_CHUNK", 16)  # four steps of the bar
    result = runner.invoke(app, ["search", "query", str(tmp_path / "q.npz"), "-g",
                                 str(tmp_path / "gal"), "--k", "3", "--identity", "id",
                                 "--out", str(tmp_path / "r.npz")])
    assert result.exit_code == 0, result.output
    kwargs, task = _task(bars, "searching")
    assert kwargs.get("enabled", True) and task["total"] == 50 and task["completed"] == 50
    out = read_table(tmp_path / "r.npz")
    assert np.array_equal(out["match_ids"], whole.ids)
    assert np.array_equal(out["scores"], whole.scores)


def test_library_search_stays_quiet_by_default(bars):
    from qualiface.infer.search import Gallery

    rng = np.random.default_rng(1)
    g = Gallery.build(np.array(["a", "b", "c"]), rng.standard_normal((3, 4)).astype(np.float32))
    g.search(rng.standard_normal((5, 4)).astype(np.float32), k=2)
    assert all(bar.kwargs.get("enabled") is False for bar in bars)


def test_search_aggregate_progressive_shows_a_bar_over_the_frames(bars, monkeypatch, tmp_path):
    import qualiface.infer.stream as stream

    rng = np.random.default_rng(2)
    frames = 40
    table = {"track_ids": rng.integers(0, 4, frames),
             "embeddings": rng.standard_normal((frames, 8)).astype(np.float32),
             "quality": rng.random(frames).astype(np.float32) + 0.1}
    write_table(tmp_path / "frames.npz", table)
    whole = stream.aggregate_tracks(table["track_ids"], table["embeddings"], table["quality"])
    monkeypatch.setattr(stream, "FEED_CHUNK", 7)
    result = CliRunner().invoke(app, ["search", "aggregate", str(tmp_path / "frames.npz"),
                                      "--out", str(tmp_path / "t.npz")])
    assert result.exit_code == 0, result.output
    kwargs, task = _task(bars, "aggregating")
    assert kwargs.get("enabled", True) and task["total"] == frames and task["completed"] == frames
    out = read_table(tmp_path / "t.npz")
    by_id = {str(t.track_id): t.embedding for t in whole}
    for track, embedding in zip(out["ids"], out["embeddings"]):
        np.testing.assert_array_equal(embedding, by_id[str(track)])


def test_progressive_aggregation_still_refuses_a_length_mismatch():
    from qualiface.infer.stream import aggregate_tracks

    with pytest.raises(ValueError, match="track ids"):
        aggregate_tracks([0, 1], np.ones((3, 4), np.float32), np.ones(3))


def test_degraded_copies_show_a_bar_over_every_copy(bars):
    from qualiface.data.degrade import degraded_copies

    images = torch.randint(0, 255, (10, 3, 16, 16), dtype=torch.uint8)
    quiet, _ = degraded_copies(images, [0.5, 1.0], seed=3, chunk=4)
    assert all(bar.kwargs.get("enabled") is False for bar in bars)
    shown, _ = degraded_copies(images, [0.5, 1.0], seed=3, chunk=4, progress=True)
    kwargs, task = [(b.kwargs, t) for b in bars if b.kwargs.get("enabled") for t in b.tasks][0]
    assert task["description"] == "degrading" and task["total"] == 20 and task["completed"] == 20
    assert all(torch.equal(quiet[s], shown[s]) for s in quiet)


def test_eval_degrade_reads_and_degrades_under_bars(bars, monkeypatch, tmp_path):
    import qualiface.cli.eval as eval_cli
    import qualiface.eval.degraded as degraded

    images = [torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8) for _ in range(6)]
    bench = SimpleNamespace(images=images, ids=[str(i) for i in range(6)], name="tiny")
    copies, kinds = degraded.degraded_images(bench, [0.5], 1, progress=True)
    assert copies[0.5].shape == (6, 3, 16, 16) and len(kinds) == 6
    assert _task(bars, "reading images")[1]["completed"] == 6
    assert _task(bars, "degrading")[1]["total"] == 6

    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(degraded, "degraded_images", record)
    with pytest.raises(RuntimeError, match="stop here"):
        eval_cli._degraded(tmp_path, bench, None, tmp_path, "cpu", "none", 4, [0.5], 1)
    assert seen.get("progress") is True


# ---------------------------------------------------------------------------------- figures


def test_write_figures_writes_a_png_and_markdown_beside_the_json(tmp_path):
    common = load_bench_script("common")
    json_path = tmp_path / "result.json"
    paths = common.write_figures(
        json_path, "title", [("plain", {"a": 1.0, "b": float("nan"), "c": None}, False),
                             ("grouped", {"x": {"fast": 0.1, "slow": 2.0}}, True),
                             ("empty", {"z": None}, False)],
        common.markdown_table(["k", "v"], [["a", "1"]]))
    assert paths == (tmp_path / "result.png", tmp_path / "result.md")
    _valid_png(paths[0])
    text = paths[1].read_text()
    assert "![title](result.png)" in text and "| a | 1 |" in text
    assert common.write_figures(tmp_path / "none.json", "t", [("p", {"a": None}, False)]) is None
    assert not (tmp_path / "none.png").exists()


def test_eval_ijb_speed_writes_its_figure(tmp_path):
    speed = load_bench_script("eval_ijb_speed")
    out = tmp_path / "speed.json"
    result = speed.main(["--tiny", "--skip-naive", "--out", str(out)])
    _valid_png(tmp_path / "speed.png")
    assert "| 1:1 | pooling |" in (tmp_path / "speed.md").read_text()
    assert json.loads(out.read_text()).keys() == json.loads(json.dumps(result, default=str)).keys()


def test_components_figure_groups_measures_by_unit(tmp_path):
    components = load_bench_script("components")
    panels = dict((title, values) for title, values, _ in components.figure_panels({
        "decode_cv2_us_per_image": 120.0, "recordio_write_img_per_s": 5000.0,
        "synthetic_clean_ms_per_image": 1.6, "search_exact_s": 0.7,
        "search_ivf_nprobe8_recall_at_10": 0.98}))
    assert panels["microseconds per image"] == {"decode_cv2": 120.0}
    assert panels["throughput (items/s, log scale)"] == {"recordio_write_img": 5000.0}
    assert panels["seconds"] == {"search_exact": 0.7}
    assert panels["recall@10"] == {"search_ivf_nprobe8": 0.98}
    common = load_bench_script("common")
    png, _ = common.write_figures(tmp_path / "c.json", "components",
                                  components.figure_panels({"search_exact_s": 0.7}))
    _valid_png(png)


def test_train_throughput_figure_panels(tmp_path):
    throughput = load_bench_script("train_throughput")
    payload = {"results": [
        {"backbone": "nano", "head": "arcface", "phase": "train", "images_per_s": 100.0,
         "mfu": None},
        {"backbone": "nano", "head": "qgface", "error": "out of GPU memory"}]}
    panels = throughput.figure_panels(payload, False)
    assert panels[0][1] == {"nano / arcface (train)": 100.0}
    rec = throughput.figure_panels({"results": [
        {"backbone": "n", "head": "a", "end_to_end_images_per_s": 50.0,
         "loader_only_images_per_s": 80.0}]}, True)
    assert rec[0][1] == {"n / a": {"end-to-end": 50.0, "loader only": 80.0}}
    common = load_bench_script("common")
    png, md = common.write_figures(tmp_path / "t.json", "throughput", panels)
    _valid_png(png)
