"""Gallery search: exact and faiss backends return brute-force top-k; persistence round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from qualiface.cli import app
from qualiface.infer.io import read_table, write_table
from qualiface.infer.search import Gallery, GalleryError


def _data(n=600, q=40, d=24, seed=0):
    rng = np.random.default_rng(seed)
    gallery = rng.standard_normal((n, d)).astype(np.float32)
    queries = rng.standard_normal((q, d)).astype(np.float32)
    return np.array([f"id{i}" for i in range(n)]), gallery, queries


def _brute_force(gallery, queries, k):
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = qn.astype(np.float64) @ g.T.astype(np.float64)
    order = np.argsort(-scores, axis=1)[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


@pytest.mark.parametrize("backend", ["exact", "flat", "ivf"])
def test_topk_equals_brute_force(backend, tmp_path):
    if backend != "exact":
        pytest.importorskip("faiss")
    ids, gallery, queries = _data()
    kwargs = {"nlist": 8, "nprobe": 8} if backend == "ivf" else {}  # nprobe = nlist: exact
    built = Gallery.build(ids, gallery, backend=backend, **kwargs)
    order, scores = _brute_force(gallery, queries, k=5)
    for g in (built, Gallery.load(built.save(tmp_path / backend))):
        result = g.search(queries, k=5)
        assert np.array_equal(result.indices, order)
        np.testing.assert_allclose(result.scores, scores, atol=1e-5)
        assert np.array_equal(result.ids, ids[order])


def test_ivf_with_few_probes_is_approximate_but_sane():
    pytest.importorskip("faiss")
    ids, gallery, queries = _data(n=2000, q=50)
    g = Gallery.build(ids, gallery, backend="ivf", nlist=32, nprobe=1)
    result = g.search(queries, k=1)
    order, _ = _brute_force(gallery, queries, k=1)
    recall = float(np.mean(result.indices[:, 0] == order[:, 0]))
    assert 0.0 < recall <= 1.0
    g.set_nprobe(32)
    assert np.array_equal(g.search(queries, k=1).indices, order)
    with pytest.raises(GalleryError, match="nprobe"):
        g.set_nprobe(33)


def test_k_larger_than_gallery_and_bad_inputs():
    ids, gallery, queries = _data(n=3, q=2)
    result = Gallery.build(ids, gallery).search(queries, k=10)
    assert result.indices.shape == (2, 3)
    with pytest.raises(GalleryError, match="dimension"):
        Gallery.build(ids, gallery).search(queries[:, :5])
    with pytest.raises(GalleryError, match="ids"):
        Gallery.build(ids[:2], gallery)
    with pytest.raises(GalleryError, match="backend"):
        Gallery.build(ids, gallery, backend="annoy")
    with pytest.raises(GalleryError, match="NaN"):
        Gallery.build(ids, np.full_like(gallery, np.nan))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(GalleryError, match="gallery.json: missing"):
        Gallery.load(tmp_path)
    ids, gallery, _ = _data(n=10)
    Gallery.build(ids, gallery).save(tmp_path / "g")
    (tmp_path / "g" / "gallery.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(GalleryError, match="'format'"):
        Gallery.load(tmp_path / "g")


def test_cli_enrol_pools_identities_and_query_finds_them(tmp_path):
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((4, 16))
    rows = [(f"person{p}/{i}.jpg", centres[p] + 0.1 * rng.standard_normal(16)) for p in range(4) for i in range(3)]
    embeddings = np.stack([e for _, e in rows]).astype(np.float32)
    norms = np.linalg.norm(embeddings, axis=1)
    write_table(tmp_path / "e.npz", {
        "ids": np.array([name for name, _ in rows]), "embeddings": embeddings / norms[:, None],
        "norms": norms, "quality": rng.uniform(0.2, 1.0, len(rows)).astype(np.float32),
    })
    runner = CliRunner()
    enrol = runner.invoke(app, ["search", "enrol", str(tmp_path / "e.npz"), "--gallery", str(tmp_path / "g")])
    assert enrol.exit_code == 0, enrol.output
    info = runner.invoke(app, ["search", "info", "--gallery", str(tmp_path / "g")])
    assert json.loads(info.output)["size"] == 4
    query = runner.invoke(app, ["search", "query", str(tmp_path / "e.npz"), "--gallery", str(tmp_path / "g"),
                                "--k", "2", "--out", str(tmp_path / "r.parquet")])
    assert query.exit_code == 0, query.output
    result = read_table(tmp_path / "r.parquet")
    assert result["match_ids"].shape == (12, 2)
    assert result["match_ids"][:, 0].tolist() == [name.split("/")[0] for name, _ in rows]
    bad = runner.invoke(app, ["search", "info", "--gallery", str(tmp_path / "nothing")])
    assert bad.exit_code == 1 and "gallery.json: missing" in bad.output.replace("\n", "")
