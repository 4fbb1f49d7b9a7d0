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


def test_a_small_ivf_gallery_built_with_the_default_probes_is_exact(tmp_path):
    # ~4 sqrt(N) cells, at most N // 39: a 200-template gallery has 5 cells, fewer than the
    # default 8 probes, and building it failed with "nprobe must be in [1, 5]" unless the
    # user worked out a valid --nprobe. The default now visits every cell (exact).
    pytest.importorskip("faiss")
    from qualiface.infer.search import enrol

    ids, gallery, queries = _data(n=200, q=20)
    built, _ = enrol(tmp_path / "g", ids, gallery, backend="ivf")
    assert built.nlist == 5 and built.nprobe == 5
    order, _ = _brute_force(gallery, queries, k=3)
    assert np.array_equal(built.search(queries, k=3).indices, order)
    with pytest.raises(GalleryError, match=r"nprobe must be in \[1, 5\]"):  # asked for: refused
        Gallery.build(ids, gallery, backend="ivf", nprobe=6)


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


def test_a_stored_quality_of_the_wrong_length_is_refused_at_load(tmp_path):
    """Queries read the matched template's quality by row: one value short, a gallery reported
    its neighbour's quality (or none) without a word."""
    ids, gallery, _ = _data(n=10)
    Gallery.build(ids, gallery, quality=np.linspace(0, 1, 10)).save(tmp_path / "g")
    info = json.loads((tmp_path / "g" / "gallery.json").read_text())
    arrays_path = tmp_path / "g" / info["files"]["arrays"]
    with np.load(arrays_path) as stored:
        arrays = {name: stored[name] for name in stored.files}
    arrays["quality"] = arrays["quality"][:9]
    with open(arrays_path, "wb") as handle:
        np.savez(handle, **arrays)
    with pytest.raises(GalleryError, match=r"'quality' has shape \(9,\), expected \(10,\)"):
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


def test_rank_rates_count_only_enrolled_probes():
    from qualiface.infer.search import SearchResult, rank_rates

    ids = np.array([list("abcdef"), list("bacdef"), list("bcdefg"), list("abcdef")])
    result = SearchResult(scores=np.tile(np.linspace(0.9, 0.4, 6, dtype=np.float32), (4, 1)),
                          indices=np.zeros((4, 6), np.int64), ids=ids)
    # a: rank 1; a: rank 2; z: enrolled but not returned (rank > 6); q: not enrolled, not counted
    rates, counted = rank_rates(result, ["a", "a", "z", "q"], list("abcdefgz"))
    assert counted == 3 and rates == {1: pytest.approx(1 / 3), 5: pytest.approx(2 / 3)}
    assert rank_rates(result, ["q"] * 4, list("abc")) == ({}, 0)
    with pytest.raises(GalleryError, match="3 labels for 4 probes"):
        rank_rates(result, ["a"] * 3, list("abc"))


def test_rank_rates_count_a_tie_with_the_mate_against_the_probe():
    """Rank = 1 + other ids scoring >= the mate (qualiface.scoring.identification), whichever
    of the tied entries the backend lists first; brute force: ``eval.identification.search``."""
    from qualiface.eval.identification import search
    from qualiface.infer.search import SearchResult, rank_rates

    # probe 0: mate "a" tied with impostor "b" (listed after it); probe 1: the same, listed before;
    # probe 2: mate "c" strictly first; probe 3: mate "a" tied with "b" and "d" past column 2.
    ids = np.array([list("abcd"), list("bacd"), list("cabd"), list("abdc")])
    scores = np.array([[0.9, 0.9, 0.5, 0.1], [0.9, 0.9, 0.5, 0.1], [0.8, 0.7, 0.7, 0.1],
                       [0.6, 0.6, 0.6, 0.2]], np.float32)
    result = SearchResult(scores=scores, indices=np.zeros((4, 4), np.int64), ids=ids)
    rates, counted = rank_rates(result, ["a", "a", "c", "a"], list("abcd"), ranks=(1, 2, 3))
    assert counted == 4 and rates == {1: 0.25, 2: 0.75, 3: 1.0}

    # A gallery with duplicated vectors under different ids, against the benchmark search.
    vectors = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0.6, 0.8, 0, 0], [0, 1, 0, 0]],
                       np.float32)
    gallery_ids = np.array(["a", "b", "c", "d", "e"])
    probes = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0.6, 0.8, 0, 0]], np.float32)
    labels = np.array(["a", "b", "e", "d"])
    truth = search(probes, [0, 1, 4, 3], vectors, [0, 1, 2, 3, 4])
    expected = {k: float(np.mean(truth.ranks <= k)) for k in (1, 2)}
    gallery = Gallery.build(gallery_ids, vectors, backend="exact")
    assert rank_rates(gallery.search(probes, k=3), labels, gallery_ids, ranks=(1, 2)) == (expected, 4)
    assert expected == {1: 0.25, 2: 1.0}


def _labelled_table(path, seed=3):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, 16))
    rows = [(f"person{p}/{i}.jpg", centres[p] + 0.1 * rng.standard_normal(16)) for p in range(6) for i in range(2)]
    embeddings = np.stack([e for _, e in rows]).astype(np.float32)
    write_table(path, {"ids": np.array([name for name, _ in rows]), "embeddings": embeddings,
                       "quality": np.ones(len(rows), np.float32)})
    return [name for name, _ in rows]


def test_cli_query_prints_rank_1_and_5_when_probes_carry_labels(tmp_path):
    names = _labelled_table(tmp_path / "e.npz")
    runner = CliRunner()
    assert runner.invoke(app, ["search", "enrol", str(tmp_path / "e.npz"), "-g", str(tmp_path / "g")]).exit_code == 0
    # labels from the ids by the gallery's own rule (parent folder); k=1 still reports rank-5
    query = runner.invoke(app, ["search", "query", str(tmp_path / "e.npz"), "-g", str(tmp_path / "g"), "--k", "1",
                                "--out", str(tmp_path / "r.npz")])
    assert query.exit_code == 0, query.output
    printed = " ".join(query.output.split())
    assert "rank-1 1.000, rank-5 1.000 over the 12 of 12 probes whose identity is enrolled" in printed
    assert read_table(tmp_path / "r.npz")["match_ids"].shape == (12, 1)
    # an explicit labels column wins: two probes labelled as someone else drop rank-1 to 10/12
    table = read_table(tmp_path / "e.npz")
    labels = np.array([n.split("/")[0] for n in names])
    labels[[0, 1]] = "person5"
    table["labels"] = labels
    write_table(tmp_path / "l.npz", table)
    query = runner.invoke(app, ["search", "query", str(tmp_path / "l.npz"), "-g", str(tmp_path / "g")])
    printed = " ".join(query.output.split())
    assert query.exit_code == 0 and "rank-1 0.833" in printed and "(labels: the 'labels' column)" in printed
    # labels that name no enrolled template: no rank line
    query = runner.invoke(app, ["search", "query", str(tmp_path / "e.npz"), "-g", str(tmp_path / "g"),
                                "--identity", "stem"])
    assert query.exit_code == 0 and "rank-1" not in query.output
    bad = runner.invoke(app, ["search", "query", str(tmp_path / "e.npz"), "-g", str(tmp_path / "g"),
                              "--identity", "folder"])
    assert bad.exit_code != 0 and "--identity must be one of" in " ".join(bad.output.split())


def test_every_gallery_command_takes_the_gallery_as_the_same_option(tmp_path):
    # one style: the gallery is always --gallery/-g DIR, the positional is always the input table
    import typer

    from qualiface.cli.search import app as search_app

    group = typer.main.get_command(search_app)
    for name in ("enrol", "query", "info"):
        params = {p.name: p for p in group.commands[name].params}
        assert params["gallery"].param_type_name == "option" and params["gallery"].opts == ["--gallery", "-g"]
        positional = [p.name for p in params.values() if p.param_type_name == "argument"]
        assert positional == ([] if name == "info" else ["embeddings"])


def test_extending_an_ivf_gallery_keeps_its_probe_setting(tmp_path):
    # Extending rebuilds the IVF cells; the probe count must follow the user's choice, not
    # fall back to the default 8 (which silently made an exact gallery approximate).
    pytest.importorskip("faiss")
    from qualiface.infer.search import enrol

    ids, vectors, queries = _data(n=1200, q=60)
    first, second = slice(0, 600), slice(600, 1200)
    # visiting every cell (15 of 15) is exact; after growing to 1200 templates (30 cells) too
    enrol(tmp_path / "exact", ids[first], vectors[first], backend="ivf", nlist=15, nprobe=15)
    grown, before = enrol(tmp_path / "exact", ids[second], vectors[second])
    order, scores = _brute_force(vectors, queries, k=10)
    for g in (grown, Gallery.load(tmp_path / "exact")):
        assert before == 600 and g.nlist == 30 and g.nprobe == 30
        result = g.search(queries, k=10)
        assert np.array_equal(result.indices, order)
        np.testing.assert_allclose(result.scores, scores, atol=1e-5)
    # a number the user chose is kept ...
    enrol(tmp_path / "three", ids[first], vectors[first], backend="ivf", nlist=15, nprobe=3)
    assert enrol(tmp_path / "three", ids[second], vectors[second])[0].nprobe == 3
    # ... clamped to the new cell count (here all 4 cells: exact again) ...
    enrol(tmp_path / "ten", ids[first], vectors[first], backend="ivf", nlist=15, nprobe=10)
    clamped, _ = enrol(tmp_path / "ten", ids[second], vectors[second], nlist=4)
    assert (clamped.nlist, clamped.nprobe) == (4, 4)
    assert np.array_equal(clamped.search(queries, k=10).indices, order)
    # ... and an explicit nprobe on the extending call wins
    enrol(tmp_path / "given", ids[first], vectors[first], backend="ivf", nlist=15, nprobe=15)
    assert enrol(tmp_path / "given", ids[second], vectors[second], nprobe=5)[0].nprobe == 5
    # an exact gallery converted to IVF stays exact unless told otherwise
    enrol(tmp_path / "flat", ids[first], vectors[first], backend="exact")
    converted, _ = enrol(tmp_path / "flat", ids[second], vectors[second], backend="ivf")
    assert converted.nprobe == converted.nlist
    assert np.array_equal(converted.search(queries, k=10).indices, order)


def test_cli_enrol_into_an_ivf_gallery_keeps_its_probes(tmp_path):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(5)
    runner = CliRunner()
    for part, (nlist, people) in enumerate([(4, range(0, 40)), (6, range(40, 80))]):
        names = [f"p{p}/0.jpg" for p in people]
        table = tmp_path / f"{part}.npz"
        write_table(table, {"ids": np.array(names),
                            "embeddings": rng.standard_normal((40, 16)).astype(np.float32)})
        # the first enrolment chooses 2 probes; the second (6 cells) names none
        extra = ["--backend", "ivf", "--nprobe", "2"] if part == 0 else []
        result = runner.invoke(app, ["search", "enrol", str(table), "-g", str(tmp_path / "g"),
                                     "--mode", "mean", "--nlist", str(nlist), *extra])
        assert result.exit_code == 0, result.output
    info = json.loads(runner.invoke(app, ["search", "info", "-g", str(tmp_path / "g")]).output)
    assert (info["size"], info["nlist"], info["nprobe"]) == (80, 6, 2)
