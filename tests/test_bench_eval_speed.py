"""bench/eval_ijb_speed.py at a tiny size: the vectorised and naive 1:1 and 1:N paths agree,
the naive 1:N loop follows the documented tie and threshold rules, and the JSON has its keys.

The script is imported from its file (bench/ is not a package); everything runs on the CPU in a
few seconds.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def speed():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_eval_ijb_speed", BENCH / "eval_ijb_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_tiny_run_checks_both_tasks_and_writes_expected_json(speed, tmp_path):
    out = tmp_path / "speed.json"
    speed.main(["--tiny", "--out", str(out), "--naive-probes", "100000"])
    data = json.loads(out.read_text())
    assert {"machine", "torch", "date", "command", "git_commit", "settings", "device",
            "stage_devices", "naive_device", "naive_extrapolated_from", "verification",
            "identification"} <= data.keys()
    assert data["device"] == "cpu" and data["settings"]["device"] == "cpu"
    assert set(data["stage_devices"]) == {"pooling", "scoring", "roc", "search", "rank/tpir"}
    verification = data["verification"]
    assert set(verification["vectorised_s"]) == {"pooling", "scoring", "roc", "total"}
    assert set(verification["naive_s"]) == {"pooling", "scoring", "roc", "total"}
    identification = data["identification"]
    assert set(identification["vectorised_s"]) == {"search", "metrics", "total"}
    assert set(identification["naive_s"]) == {"search", "metrics", "total"}
    assert identification["naive_checked_probes"] == speed.TINY.probes  # capped at all probes
    metrics = identification["metrics"]
    assert set(metrics["galleries"]) == {"G1", "G2"}
    for k in (1, 5, 10):
        mean = np.mean([metrics["galleries"][g][f"rank{k}"] for g in ("G1", "G2")])
        assert metrics[f"rank{k}"] == pytest.approx(mean)
    assert 0 < metrics["rank1"] <= metrics["rank5"] <= metrics["rank10"] <= 1
    assert set(metrics["tpir_at_fpir"]) == {"1e-02", "1e-01"}
    for stage, seconds in identification["vectorised_s"].items():
        assert seconds >= 0, stage


def test_one_to_n_paths_agree_and_the_check_catches_a_wrong_rank(speed, monkeypatch):
    inputs = speed.make_identification(speed.TINY, seed=3)
    result = speed.time_identification(inputs, naive_probes=None)
    assert result["naive_checked_probes"] == speed.TINY.probes
    # Half the probes are mated per gallery (open set), as in IJB-C 1:N.
    probe_subjects = inputs.probe[1]
    for gallery_ids, gallery_subjects in inputs.galleries.values():
        mated = np.isin(probe_subjects, gallery_subjects).mean()
        assert 0.2 < mated < 0.8

    original = speed.naive_search

    def off_by_one(*args, **kwargs):
        ranks, mated, top = original(*args, **kwargs)
        ranks[np.flatnonzero(ranks)[0]] += 1
        return ranks, mated, top

    monkeypatch.setattr(speed, "naive_search", off_by_one)
    with pytest.raises(AssertionError):
        speed.time_identification(inputs, naive_probes=None)


def test_one_to_n_subset_compares_metrics_over_the_same_probes(speed):
    inputs = speed.make_identification(speed.TINY, seed=1)
    result = speed.time_identification(inputs, naive_probes=120)
    assert result["naive_checked_probes"] == 120
    assert result["naive_s"]["search"] > 0
    full, _ = speed.library_identification(inputs)
    assert result["metrics"] == full  # the reported metrics cover every probe


def test_naive_search_counts_ties_against_the_probe(speed):
    gallery = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    gallery_subjects = np.array([5, 6, 7])
    probes = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    probe_subjects = np.array([6, 7, 9])  # tie with a non-mate; clear rank 1; no mate
    ranks, mated, top = speed.naive_search(probes, probe_subjects, gallery, gallery_subjects)
    np.testing.assert_array_equal(ranks, [2, 1, 0])
    np.testing.assert_array_equal(mated, np.array([1.0, 1.0, -np.inf], dtype=np.float32))
    np.testing.assert_allclose(top, [1.0, 1.0, 0.8])
    from qualiface.eval.identification import search

    library = search(probes, probe_subjects, gallery, gallery_subjects)
    np.testing.assert_array_equal(library.ranks, ranks)


def test_naive_metrics_follow_the_fpir_threshold_rule(speed):
    # 10 non-mated probes: FPIR 0.1 allows one above the threshold -> threshold is the 2nd
    # highest non-mated top score (0.8); FPIR 0.01 allows none -> NaN.
    nonmated_top = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0], dtype=np.float32)
    ranks = np.concatenate([[1, 1, 1, 3], np.zeros(10, dtype=np.int64)])
    mated = np.concatenate([np.array([0.95, 0.8, 0.85, 0.99], dtype=np.float32),
                            np.full(10, -np.inf, dtype=np.float32)])
    top = np.concatenate([mated[:4], nonmated_top])
    entry = speed.naive_metrics(ranks, mated, top)
    assert entry["rank1"] == 0.75 and entry["rank5"] == 1.0
    assert entry["tpir_at_fpir"]["1e-01"] == 0.5  # 0.95 and 0.85 beat 0.8; 0.8 ties, 0.99 rank 3
    assert math.isnan(entry["tpir_at_fpir"]["1e-02"])


def test_one_to_one_paths_agree_on_both_pair_structures(speed):
    for structure in ("ijbc", "random"):
        inputs = speed.make_verification(speed.TINY, seed=2, structure=structure)
        result = speed.time_verification(inputs, speed.TINY, naive_templates=None,
                                         naive_pairs=None)
        assert result["naive_s"]["total"] == pytest.approx(
            sum(result["naive_s"][s] for s in ("pooling", "scoring", "roc")))
        assert math.isnan(result["tar_at_far"]["1e-06"])  # 3,000 pairs cannot measure 1e-6


def test_cuda_stages_say_where_they_run(speed):
    devices = speed.stage_devices("cuda")
    for stage, where in devices.items():
        assert where == "cuda" or where.startswith("cpu ("), (stage, where)
    assert speed.stage_devices("cpu") == dict.fromkeys(devices, "cpu")


@pytest.mark.parametrize("argv, message", [
    (["--naive-probes", "0"], "--naive-probes must be at least 1"),
    (["--device", "cuda"], "no CUDA device"),
])
def test_bad_input_is_one_clear_line(speed, tmp_path, capsys, argv, message):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from common import run_main

    status = run_main(speed.main, ["--tiny", "--out", str(tmp_path / "x.json"), *argv])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "x.json").exists()
