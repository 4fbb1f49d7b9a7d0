"""The benchmark scripts (bench/train_throughput.py, bench/real_faces.py) in --smoke mode on CPU.

They run in-process (imported from their files) with tiny sizes; the GPU measurements are
checked only where CUDA exists. What a user relies on: the JSON has the documented keys and
sane values, the FLOP/MFU arithmetic is the stated formula, the test-set helpers are
deterministic and follow the protocol, and bad flags fail with one clear line.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import yaml
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def throughput():
    return _load("train_throughput")


@pytest.fixture(scope="module")
def real_faces():
    return _load("real_faces")


PROVENANCE_KEYS = {"machine", "torch", "date", "command", "git_commit", "settings"}


# --------------------------------------------------------------------------- train_throughput


def test_throughput_smoke_writes_expected_json(throughput, tmp_path):
    out = tmp_path / "tt.json"
    throughput.main(["--smoke", "--heads", "arcface,eqface,qgface", "--out", str(out)])
    data = json.loads(out.read_text())
    assert PROVENANCE_KEYS <= set(data) and data["benchmark"] == "train_throughput"
    assert data["settings"]["batch_size"] == 8 and data["settings"]["device"] == "cpu"
    assert data["reference"]["insightface_h100_fp16_images_per_s"] == {"iresnet50": 2425.0,
                                                                       "iresnet100": 1633.0}
    by_head = {r["head"]: r for r in data["results"]}
    assert set(by_head) == {"arcface", "eqface", "qgface"}
    for r in by_head.values():
        assert r["images_per_s"] > 0 and r["step_ms_median"] > 0 and r["skipped_steps"] == 0
        # train FLOPs = 3 x (views x backbone forward + 2*D*C logits), D=64, C=100 in smoke.
        expected = 3 * (r["views_per_image"] * r["forward_gflops_per_image"] + 2 * 64 * 100 / 1e9)
        assert r["train_gflops_per_image"] == pytest.approx(expected)
        assert r["achieved_tflops"] == pytest.approx(r["images_per_s"] * expected / 1e3)
        assert r["mfu"] is None  # no peak known for a CPU
    assert by_head["eqface"]["phase"] == "eqface-3-finetune"  # EQFace timed in its step 3
    assert by_head["qgface"]["views_per_image"] == 2 and by_head["qgface"]["second_view_ms"] > 0
    assert by_head["arcface"]["views_per_image"] == 1


def test_flop_count_matches_the_published_iresnet50_cost(throughput):
    from qualiface.backbones import build_backbone

    with torch.device("meta"):  # shapes only: no memory, no compute
        backbone = build_backbone("iresnet50")
    flops = throughput.count_forward_flops(backbone, 112, torch.device("meta"))
    assert flops / 1e9 == pytest.approx(throughput.REFERENCE_FORWARD_GFLOPS["iresnet50"], rel=0.01)


def test_peak_lookup_by_gpu_name(throughput):
    assert throughput.peak_tflops_for("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert throughput.peak_tflops_for("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert throughput.peak_tflops_for("NVIDIA H200") == pytest.approx(989.4)
    assert throughput.peak_tflops_for("Some Future GPU") is None
    assert throughput.peak_tflops_for(None) is None


def test_throughput_from_rec_smoke(throughput, tmp_path):
    from qualiface.data.decode import encode_jpeg
    from qualiface.data.recordio import RecordIOWriter

    generator = torch.Generator().manual_seed(0)
    with RecordIOWriter(tmp_path / "rec" / "train") as writer:
        for i in range(40):
            image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator)
            writer.add(encode_jpeg(image), label=i // 4)
    out = tmp_path / "rec.json"
    throughput.main(["--smoke", "--heads", "arcface", "--from-rec",
                     str(tmp_path / "rec" / "train.rec"), "--out", str(out)])
    (entry,) = json.loads(out.read_text())["results"]
    assert entry["num_classes"] == 10
    assert entry["end_to_end_images_per_s"] > 0 and entry["loader_only_images_per_s"] > 0


def test_throughput_bad_input_is_one_clear_line(throughput, tmp_path, capsys):
    code = throughput.run_main(throughput.main, ["--smoke", "--from-rec", str(tmp_path / "no.rec"),
                                                 "--out", str(tmp_path / "x.json")])
    assert code == 2 and "no.rec: .rec file not found" in capsys.readouterr().err
    code = throughput.run_main(throughput.main, ["--smoke", "--steps", "0"])
    assert code == 2 and "--steps must be positive" in capsys.readouterr().err
    if not torch.cuda.is_available():
        code = throughput.run_main(throughput.main, ["--device", "cuda"])
        assert code == 2 and "CUDA is not available" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_throughput_on_gpu_reports_memory_syncs_and_mfu(throughput, tmp_path):
    out = tmp_path / "gpu.json"
    throughput.main(["--backbones", "iresnet-nano", "--heads", "arcface,qgface", "--batch-size",
                     "32", "--classes", "1000", "--steps", "3", "--warmup", "2", "--out", str(out)])
    data = json.loads(out.read_text())
    for r in data["results"]:
        assert r["peak_memory_gib"] > 0 and isinstance(r["host_syncs_per_step"], int)
        if data["peak_tflops"]:
            assert r["mfu"] == pytest.approx(r["achieved_tflops"] / data["peak_tflops"])


# --------------------------------------------------------------------------- real_faces


def test_phase_lengths_keep_their_shipped_share(real_faces):
    cfg = real_faces.RealFacesConfig(epochs=12.0)
    shipped = {"name": "eqface", "eqface": {"branch_epochs": 4, "finetune_epochs": 4, "s_th": 0.0}}
    scaled = real_faces.rescale_phases(shipped, 24.0, cfg)  # 4 of 24 epochs -> 2 of 12
    assert scaled["eqface"] == {"branch_epochs": 2.0, "finetune_epochs": 2.0, "s_th": 0.0}
    budget = real_faces.rescale_phases(shipped, 24.0, real_faces.RealFacesConfig(max_steps=60))
    assert budget["eqface"]["branch_steps"] == 10 and budget["eqface"]["finetune_steps"] == 10


def test_protocol_length_covers_every_phase(real_faces, tmp_path):
    # EQFace ships 24 + 4 + 4 epochs (steps 1, 2, 3): a 10-epoch protocol gives it 7.5 + 1.25 +
    # 1.25, the same 10 epochs of optimizer steps as a one-phase method, in the shipped shares.
    cfg = real_faces.RealFacesConfig(epochs=10.0, device="cpu")
    args = (tmp_path / "train.txt", tmp_path, tmp_path / "run")
    eq = real_faces.run_config(cfg, "eqface", 0, *args)
    assert eq.train.epochs == pytest.approx(7.5)
    assert (eq.pipeline.eqface.branch_epochs, eq.pipeline.eqface.finetune_epochs) == (
        pytest.approx(1.25), pytest.approx(1.25))
    qc = real_faces.run_config(cfg, "qcface", 0, *args)  # its warm-up is inside the one phase
    assert qc.train.epochs == 10.0 and qc.pipeline.qcface.warmup_epochs == pytest.approx(10 / 12)
    budget = real_faces.run_config(real_faces.RealFacesConfig(max_steps=64), "eqface", 0, *args)
    assert (budget.train.steps, budget.pipeline.eqface.branch_steps,
            budget.pipeline.eqface.finetune_steps) == (48, 8, 8)


def test_protocol_subsets(real_faces, shared_data, tmp_path):
    bench = real_faces.test_benchmark(shared_data, 8)
    assert sorted(set(bench.folds.tolist())) == [8, 9, 10] and len(bench.labels) == 24
    for fold in (8, 9, 10):
        assert bench.labels[bench.folds == fold].sum() == 4  # half genuine per fold
    assert bench.first.max() < len(bench.ids) and bench.second.max() < len(bench.ids)
    subset = real_faces.train_subset_list(shared_data, 5, tmp_path / "subset.txt")
    labels = [int(line.rsplit(None, 1)[1]) for line in subset.read_text().splitlines()]
    assert sorted(set(labels)) == [0, 1, 2, 3, 4]
    assert all(labels.count(k) >= 2 for k in range(5))


def test_real_faces_smoke_writes_expected_outputs(real_faces, shared_data, tmp_path):
    out = tmp_path / "rf.json"
    real_faces.main(["--smoke", "--data",
                     str(shared_data), "--out", str(out), "--runs-dir", str(tmp_path / "runs")])
    data = json.loads(out.read_text())
    assert PROVENANCE_KEYS <= set(data) and data["benchmark"] == "real_faces"
    assert data["protocol"]["severities"] == [0.25, 0.5, 0.75]
    assert [r["method"] for r in data["runs"]] == list(real_faces.METHODS)
    for run in data["runs"]:
        assert "error" not in run, run.get("error")
        results = run["results"]
        assert set(results) == {"severity_0", "severity_0.25", "severity_0.5", "severity_0.75",
                                "mixed", "spearman_vs_severity", "quality_by_severity",
                                "spearman_by_kind"}
        assert set(results["spearman_by_kind"]) == set(data["protocol"]["kinds_count"])
        assert run["train"]["seconds"] > 0 and run["train"]["images_per_s"] > 0
        # the method's whole config is used: its model parameters survive the protocol
        shipped_params = yaml.safe_load((REPO / "configs" / f"{run['method']}_r50.yaml")
                                        .read_text())["model"]["params"]
        if shipped_params.get("learnable_embedding_scale"):
            assert run["config"]["model"]["params"]["learnable_embedding_scale"] is True
        clean = results["severity_0"]["summary"]
        assert 0 <= clean["accuracy"] <= 1 and 0 <= clean["auc"] <= 1
        mixed = results["mixed"]["summary"]
        for key in ("quality_pauc_20", "quality_pauc_30", "norm_pauc_20", "norm_pauc_30"):
            assert 0 <= mixed[key] <= 1
        assert mixed["quality_pauc_20"] <= mixed["quality_pauc_30"]  # area grows with the limit
        rho = results["spearman_vs_severity"]["model quality"]["spearman"]
        assert -1 <= rho <= 1
    eq_steps = next(r for r in data["runs"] if r["method"] == "eqface")["train"]["steps"]
    assert eq_steps == 2 + 1 + 1  # step 1 uses the budget; steps 2-3 their (min 1) share
    summary = data["summary"]["arcface"]
    assert summary["severity_0:accuracy"]["n"] == 1
    markdown = Path(data["markdown"]).read_text()
    assert "CPU smoke scale" in markdown and "| qgface |" in markdown
    assert Path(data["edc_plot"]).stat().st_size > 0
    assert Path(data["quality_plot"]).stat().st_size > 0
    assert Path(data["kind_plot"]).stat().st_size > 0
    assert not math.isnan(summary["severity_0:accuracy"]["mean"])

    # One result file per run beside --out; a second invocation reuses them (no training) and
    # --table rebuilds the same table from the folder alone.
    run_files = sorted((tmp_path / "rf_runs").glob("*-seed0.json"))
    assert [p.name for p in run_files] == sorted(f"{m}-seed0.json" for m in real_faces.METHODS)
    again = real_faces.main(["--smoke", "--data", str(shared_data), "--out",
                             str(tmp_path / "again.json"), "--results-dir",
                             str(tmp_path / "rf_runs"), "--runs-dir", str(tmp_path / "nothing")])
    assert not list((tmp_path / "nothing").glob("*-seed0"))  # nothing was trained again
    assert again["summary"]["arcface"] == summary
    table = real_faces.main(["--table", str(tmp_path / "rf_runs")])
    assert table["summary"]["qcface"] == data["summary"]["qcface"]
    main_table, kind_table = (tmp_path / "rf_runs" / "table.md").read_text().split(
        "per degradation kind")
    assert main_table.count("| qcface |") == 1 and kind_table.count("| qcface |") == 1

    # --merge: a second "seed" from another job (on another thread count, which is not a
    # difference in what was measured); mean and sample std over the two.
    other = json.loads(out.read_text())
    other["settings"]["threads"] = 7
    for run in other["runs"]:
        run["seed"] = 1
        run["results"]["severity_0"]["summary"]["accuracy"] = 0.5
    second = tmp_path / "rf_seed1.json"
    second.write_text(json.dumps(other))
    merged_path = tmp_path / "merged.json"
    merged = real_faces.main(["--merge", str(out), str(second), "--out", str(merged_path)])
    first_acc = data["runs"][0]["results"]["severity_0"]["summary"]["accuracy"]
    entry = merged["summary"][data["runs"][0]["method"]]["severity_0:accuracy"]
    assert entry["n"] == 2 and entry["mean"] == pytest.approx((first_acc + 0.5) / 2)
    assert entry["std"] == pytest.approx(abs(first_acc - 0.5) / math.sqrt(2))
    assert merged["settings"]["seeds"] == [0, 1]
    assert " ± " in merged_path.with_suffix(".md").read_text()
    other["settings"]["epochs"] = 3.0  # a different protocol is refused, naming the key
    second.write_text(json.dumps(other))
    with pytest.raises(real_faces.BenchError, match="differ.*epochs"):
        real_faces.main(["--merge", str(out), str(second), "--out", str(merged_path)])


def test_real_faces_variant_rows_stay_apart_and_stale_results_are_refused(
        real_faces, shared_data, tmp_path, capsys):
    results = tmp_path / "results"
    common = ["--smoke", "--methods", "arcface", "--data", str(shared_data),
              "--results-dir", str(results), "--runs-dir", str(tmp_path / "runs")]
    real_faces.main(common)
    variant = real_faces.main(common + ["--variant", "easy", "--set",
                                        "head.params.easy_margin=true"])
    assert sorted(p.name for p in results.glob("*-seed0.json")) == [
        "arcface-seed0.json", "arcface@easy-seed0.json"]
    # a row command rebuilds its folder's whole table, not a table of its own rows only
    assert variant["settings"]["methods"] == ["arcface", "arcface@easy"]
    assert "| arcface |" in (results / "table.md").read_text()
    run = next(r for r in variant["runs"] if r.get("variant"))
    assert run["variant"] == "easy" and run["overrides"] == ["head.params.easy_margin=true"]
    assert run["config"]["head"]["params"]["easy_margin"] is True
    assert (tmp_path / "runs" / "arcface@easy-seed0").is_dir()
    # a file written before a setting existed counts it at its default; a real difference is named
    older = json.loads((results / "arcface-seed0.json").read_text())
    for key in ("variant", "reevaluate", "ship_best"):
        older["settings"].pop(key)
    (results / "arcface-seed0.json").write_text(json.dumps(older))
    table = real_faces.main(["--table", str(results)])
    assert table["settings"]["methods"] == ["arcface", "arcface@easy"]
    other = dict(older, settings={**older["settings"], "epochs": 3.0})
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "arcface-seed0.json").write_text(json.dumps(older))
    (tmp_path / "elsewhere" / "cosface-seed0.json").write_text(json.dumps(other))
    code = real_faces.run_main(real_faces.main, ["--table", str(tmp_path / "elsewhere")])
    assert code == 2 and "differ" in (err := capsys.readouterr().err) and "epochs" in err
    protocol_run = json.loads((results / "arcface-seed0.json").read_text())["run"]
    assert protocol_run["config"]["head"]["params"].get("easy_margin", False) is False
    markdown = (results / "table.md").read_text()
    assert "| arcface@easy |" in markdown and "`head.params.easy_margin=true`" in markdown
    assert "per degradation kind" in markdown and "Stale rows" not in markdown

    # a row trained under a config that has changed since is named as stale, with the key
    drifted = json.loads((results / "arcface-seed0.json").read_text())
    drifted["run"]["config"]["head"]["params"]["margin"] = 0.3
    (results / "arcface-seed0.json").write_text(json.dumps(drifted))
    table = real_faces.main(["--table", str(results)])
    assert table["stale_rows"] == {"arcface-seed0": ["head.params.margin"]}
    assert "`arcface-seed0`: `head.params.margin`" in (results / "table.md").read_text()
    assert "head.params.margin" in capsys.readouterr().err
    (results / "arcface-seed0.json").write_text(json.dumps(older))

    # --ship-best: the best protocol row's package (variants are not candidates) with its card
    shipped = real_faces.main(["--table", str(results), "--ship-best"])
    best = Path(shipped["shipped"])
    assert best == results / "best_model"
    assert {p.name for p in best.iterdir()} == {"model.json", "weights.safetensors", "README.md"}
    card = (best / "README.md").read_text()
    assert card.startswith("# Best model of the real-face CPU protocol: arcface (seed 0)")
    assert "research-only data" in card and "--ship-best" in card
    made = json.loads((results / "arcface-seed0.json").read_text())["provenance"]["command"]
    assert f"Made by: `{made}`" in card  # the shipped run's own command
    from qualiface.package.io import package_identity
    assert package_identity(best) == package_identity(tmp_path / "runs" / "arcface-seed0" / "model")
    assert package_identity(best) in card
    code = real_faces.run_main(real_faces.main, common + ["--ship-best"])
    assert code == 2 and "--table" in capsys.readouterr().err

    # --reevaluate: the finished run's package scored again, no training; the evaluation is
    # deterministic, so the stored results come back unchanged.
    stored = json.loads((results / "arcface-seed0.json").read_text())["run"]
    again = real_faces.main(common + ["--reevaluate", "--runs-dir", str(tmp_path / "gone")])
    assert not list((tmp_path / "gone").glob("*-seed0"))  # nothing trained
    fresh = json.loads((results / "arcface-seed0.json").read_text())["run"]
    assert fresh["reevaluated"]["changed"] == [] and fresh["train"] == stored["train"]
    assert max(fresh["reevaluated"]["largest_change"].values()) == 0.0  # same threads: bitwise
    assert fresh["results"] == stored["results"] and again["runs"][0]["seed"] == 0

    # A result made under other settings is not silently reused for this command.
    code = real_faces.run_main(real_faces.main, common + ["--max-steps", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "arcface-seed0.json" in err and "max_steps" in err
    code = real_faces.run_main(real_faces.main, common + ["--set", "optim.lr=0.5"])
    assert code == 2 and "--variant" in capsys.readouterr().err
    code = real_faces.run_main(real_faces.main, common + ["--variant", "Bad Name", "--set",
                                                          "optim.lr=0.5"])
    assert code == 2 and "Bad Name" in capsys.readouterr().err


def test_rows_train_in_parallel_processes_and_a_failed_row_is_named(
        real_faces, shared_data, tmp_path, capsys, monkeypatch):
    results, runs = tmp_path / "results", tmp_path / "runs"
    common = ["--smoke", "--data", str(shared_data), "--results-dir", str(results),
              "--runs-dir", str(runs)]
    monkeypatch.setattr(real_faces, "PROGRESS_EVERY_S", 2.0)  # each child's status, often
    payload = real_faces.main(common + ["--methods", "arcface,cosface", "--jobs", "2"])
    assert sorted(p.name for p in results.glob("*-seed0.json")) == [
        "arcface-seed0.json", "cosface-seed0.json"]
    for name in ("arcface-seed0", "cosface-seed0"):
        stored = json.loads((results / f"{name}.json").read_text())
        assert stored["settings"]["threads"] == max(1, (os.cpu_count() or 1) // 2)
        assert "error" not in stored["run"]
        assert (runs / f"{name}.log").stat().st_size > 0
    assert payload["settings"]["methods"] == ["arcface", "cosface"]
    err = capsys.readouterr().err
    assert "2 row(s), 2 at a time" in err and "arcface-seed0: done" in err
    assert "\n   cosface-seed0: " in err  # a progress line from the child's log
    # the options the parent owns are replaced in the child's command, the others kept
    assert real_faces.without_options(
        ["--smoke", "--methods", "a", "--seeds=1", "--force", "--set", "x=1"],
        {"--methods", "--seeds"}, {"--force"}) == ["--smoke", "--set", "x=1"]

    # a child that fails is named with its log; the rows already done are not trained again
    monkeypatch.setattr(real_faces, "child_command", lambda *a: [
        sys.executable, "-c", "print('boom: bad row'); raise SystemExit(3)"])
    code = real_faces.run_main(real_faces.main, common + ["--methods", "arcface,adaface",
                                                          "--jobs", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "1 of 1 row(s) failed" in err and "adaface-seed0" in err
    assert "exit 3" in err and "boom: bad row" in err
    code = real_faces.run_main(real_faces.main, common + ["--jobs", "0"])
    assert code == 2 and "--jobs" in capsys.readouterr().err


def test_an_interrupted_row_is_one_line_and_the_signals_exit_status(real_faces, tmp_path,
                                                                   capsys):
    import signal

    from qualiface.train.loop import TrainingInterrupted

    def stopped(argv):
        raise TrainingInterrupted(signal.SIGTERM, 352, tmp_path / "checkpoint.pt")

    assert real_faces.run_main(stopped, []) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err.startswith("interrupted: SIGTERM received: checkpoint written at step 352")
    assert "run the same command again to resume" in err and "Traceback" not in err


def test_a_row_resumed_across_commits_lists_the_commit_of_each_start(
        real_faces, shared_data, tmp_path, monkeypatch):
    import signal

    from qualiface.train import loop

    results, runs = tmp_path / "results", tmp_path / "runs"
    common = ["--smoke", "--methods", "arcface", "--data", str(shared_data),
              "--results-dir", str(results), "--runs-dir", str(runs)]
    train = loop.train

    def killed(cfg, **kwargs):
        raise loop.TrainingInterrupted(signal.SIGTERM, 1, Path(cfg.train.output_dir))

    # the first start dies on one commit, the resume finishes the row on another
    monkeypatch.setattr(real_faces, "git_commit", lambda: "1" * 40)
    monkeypatch.setattr(loop, "train", killed)
    with pytest.raises(loop.TrainingInterrupted):
        real_faces.main(common)
    monkeypatch.setattr(real_faces, "git_commit", lambda: "2" * 40)
    monkeypatch.setattr(loop, "train", train)
    real_faces.main(common)
    row_file = results / "arcface-seed0.json"
    row = json.loads(row_file.read_text())
    assert row["run"]["train"]["commits"] == ["1" * 40, "2" * 40]
    assert "git_commit" in row and "git_commit" in row["provenance"]  # kept as they were

    # a run folder trained before the log existed: its earlier commits are marked unknown
    (runs / "arcface-seed0" / "bench_commits.txt").unlink()
    real_faces.main(common + ["--force"])
    assert json.loads(row_file.read_text())["run"]["train"]["commits"] == ["unrecorded", "2" * 40]

    # a row written before ``commits`` existed is still a current row of the table
    older = json.loads(row_file.read_text())
    del older["run"]["train"]["commits"]
    row_file.write_text(json.dumps(older))
    table = real_faces.main(["--table", str(results)])
    assert table["stale_rows"] == {} and table["settings"]["methods"] == ["arcface"]


def test_reevaluation_gap_is_the_largest_numeric_difference(real_faces):
    gap = real_faces.largest_gap
    assert gap({"a": [1.0, 2.0], "b": "x"}, {"a": [1.0, 2.5], "b": "x"}) == 0.5
    assert gap({"a": None}, {"a": None}) == 0.0
    assert gap({"a": 1.0}, {"b": 1.0}) == math.inf and gap([1.0], [1.0, 2.0]) == math.inf
    assert gap({"a": "x"}, {"a": "y"}) == math.inf and gap(None, 0.3) == math.inf


def test_convergence_is_the_late_gain_of_each_rows_accuracy_curve(real_faces, tmp_path):
    def run(method, seed, accuracies, logged_twice=()):
        curve = [{"step": 10 * (i + 1), "accuracy": a, "auc": None}
                 for i, a in enumerate(accuracies)]
        # a resumed run logs a check again: the later record counts
        curve[1:1] = [{"step": 10 * (i + 1), "accuracy": 0.0, "auc": None} for i in logged_twice]
        return {"method": method, "seed": seed, "results": {},
                "train": {"steps": 10 * len(accuracies), "validation_curve": curve}}

    assert real_faces.late_gain([0.5, 0.7, 0.8, 0.81, 0.79, 0.80]) == pytest.approx(0.01)
    assert real_faces.late_gain([0.5, 0.6, 0.7, 0.8]) == pytest.approx(0.3)  # still rising
    assert real_faces.late_gain([0.5, 0.6, 0.7]) is None  # too short to tell
    runs = [run("qcface", 1, [0.1, 0.2, 0.3, 0.4]),  # not the first seed: not shown
            run("qcface", 0, [0.50, 0.70, 0.80, 0.81, 0.79, 0.80], logged_twice=[2]),
            run("arcface", 0, [0.6, 0.7])]
    header, rows = real_faces.convergence_table(runs, ["arcface", "qcface", "magface"])
    assert header[-1] == "gain in last 3 (pt)"
    assert rows == [["arcface", "60.0 70.0", "70.0", "70.0", "-"],
                    ["qcface", "50.0 70.0 80.0 81.0 79.0 80.0", "81.0", "80.0", "+1.0"]]
    plot = real_faces.plot_convergence(tmp_path / "c.png", runs, ["arcface", "qcface"])
    assert plot.stat().st_size > 0
    assert real_faces.plot_convergence(tmp_path / "none.png", runs, ["magface"]) is None


def test_real_faces_bad_input_is_one_clear_line(real_faces, tmp_path, capsys):
    code = real_faces.run_main(real_faces.main, ["--smoke", "--data", str(tmp_path)])
    assert code == 2 and f"{tmp_path / 'train.txt'}: not found" in capsys.readouterr().err
    code = real_faces.run_main(real_faces.main, ["--smoke", "--methods", "arcface,nosuch"])
    assert code == 2 and "nosuch" in capsys.readouterr().err


def test_components_bench_smoke(tmp_path):
    components = _load("components")
    out = tmp_path / "components.json"
    payload = components.main(["--images", "20", "--batch", "2", "--steps", "1", "--gallery",
                               "2000", "--queries", "20", "--threads", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert PROVENANCE_KEYS <= set(data)
    results = data["results"]
    for key in ("decode_cv2_us_per_image", "recordio_read_decode_img_per_s",
                "synthetic_clean_ms_per_image", "nano_train_channels_last_img_per_s",
                "search_exact_s", "search_ivf_nprobe8_recall_at_10"):
        assert results[key] > 0, key
    assert results["search_ivf_nprobe8_recall_at_10"] <= 1.0
    assert payload["results"] == results


def test_ship_best_falls_back_to_a_seed_whose_package_survived(real_faces, tmp_path):
    """Run folders do not always survive between sessions: the best row ships from the lowest
    seed whose package is still there, and the card names that seed."""
    from test_infer_model import make_package

    from qualiface.package.io import package_identity

    make_package(tmp_path / "runs" / "qcface-seed1" / "model", seed=1)

    def run(seed):
        return {"method": "qcface", "seed": seed, "results": {},
                "run_dir": str(tmp_path / "runs" / f"qcface-seed{seed}"),
                "train": {"steps": 10, "seconds": 60.0}}

    payload = {"summary": {"qcface": {"severity_0:accuracy": {"mean": 0.9}},
                           "arcface": {"severity_0:accuracy": {"mean": 0.8}}},
               "runs": [run(0), run(1), run(2)], "settings": {},
               "command": "python bench/real_faces.py ...", "machine": {"cpu": "test cpu"}}
    best = real_faces.ship_best(payload, tmp_path / "table")
    assert package_identity(best) == package_identity(tmp_path / "runs" / "qcface-seed1" / "model")
    assert (best / "README.md").read_text().startswith(
        "# Best model of the real-face CPU protocol: qcface (seed 1)")

    payload["runs"] = [run(0), run(2)]  # no seed left on disk: refused, naming the seeds
    with pytest.raises(real_faces.BenchError, match=r"qcface is gone for every seed \(0, 2\)"):
        real_faces.ship_best(payload, tmp_path / "other")


def _synthetic_row(folder: Path, method: str, seed: int, accuracy: float, *, variant: str = "",
                   name: str | None = None, drop_kendall: bool = False) -> dict:
    """One ``<label>-seed<k>.json`` as a trained row writes it, with made-up numbers."""
    from dataclasses import asdict

    rf = _load("real_faces")

    def summary(acc):
        return {"accuracy": acc, "accuracy_std": 0.01, "tar_at_far_1e-2": acc - 0.2, "auc": 0.9,
                "quality_pauc_20": 0.1, "quality_pauc_30": 0.15, "norm_pauc_20": 0.11,
                "norm_pauc_30": 0.16}

    results = {f"severity_{s:g}": {"summary": summary(accuracy - s / 10)}
               for s in (0, 0.25, 0.5, 0.75)}
    results["mixed"] = {"summary": summary(accuracy)}
    results["spearman_vs_severity"] = {"model quality": {"spearman": -0.3, "kendall": -0.2},
                                       "feature norm": {"spearman": -0.1, "kendall": -0.05}}
    if drop_kendall:  # evaluated before that column existed
        del results["spearman_vs_severity"]["model quality"]["kendall"]
    run = {"method": method, "seed": seed, "run_dir": str(folder / "gone"), "config": {},
           "train": {"steps": 100, "seconds": 600.0, "images_per_s": 21.3,
                     "validation_curve": []},
           "results": results}
    if variant:
        run.update(variant=variant, overrides=["head.params.easy_margin=true"])
    header = {"benchmark": "real_faces", "machine": {"cpu": "test cpu"}, "torch": "x",
              "date": "today", "command": "python bench/real_faces.py", "git_commit": None,
              "settings": asdict(rf.RealFacesConfig()), "train_set": "train.txt",
              "test_set": "LFW folds 8-10"}
    stem = name or rf.row_name(method, variant, seed)
    (folder / f"{stem}.json").write_text(json.dumps({**header, "provenance": header, "run": run}))
    return run


def test_table_cells_are_seed_means_and_a_missing_column_is_not_hidden(real_faces, tmp_path):
    rows = tmp_path / "rows"
    rows.mkdir()
    _synthetic_row(rows, "qcface", 0, 0.90)
    _synthetic_row(rows, "qcface", 1, 0.86, drop_kendall=True)
    _synthetic_row(rows, "qcface", 0, 0.80, variant="official")
    _synthetic_row(rows, "arcface", 0, 0.85)
    table = real_faces.main(["--table", str(rows)])
    assert table["settings"]["methods"] == ["arcface", "qcface", "qcface@official"]
    markdown = (rows / "table.md").read_text().split("\n")
    header = next(line for line in markdown if line.startswith("| method |"))
    cells = {line.split(" | ")[0][2:]: dict(zip(header.split(" | "), line.split(" | ")))
             for line in markdown if line.startswith("| ") and " | " in line}
    # mean and sample std over seeds 0 and 1 (percent, as the header says); the variant apart
    assert cells["qcface"]["acc %"] == "88.0 ± 2.8"
    assert cells["qcface@official"]["acc %"] == "80.0" and cells["arcface"]["acc %"] == "85.0"
    assert cells["qcface"]["acc % s0.5"] == "83.0 ± 2.8" and cells["qcface"]["AUC"].startswith(
        "0.900 ± 0.000")
    # seed 1 has no Kendall tau: the cell is seed 0's value, and says so (not a mean of both)
    assert cells["qcface"]["tau q"] == "-0.200 (1 of 2 seeds)"
    assert table["summary"]["qcface"]["kendall:model quality"]["n"] == 1
    assert cells["qcface"]["tau norm"] == "-0.050 ± 0.000"


def test_a_run_counted_twice_is_not_two_seeds(real_faces, tmp_path):
    """A copied result file (``*-seed*.json`` matches a backup too) or a file merged twice
    would shift the mean and shrink the std: refused, naming the row and seed."""
    rows = tmp_path / "rows"
    rows.mkdir()
    _synthetic_row(rows, "qcface", 0, 0.90)
    _synthetic_row(rows, "qcface", 1, 0.86)
    _synthetic_row(rows, "qcface", 1, 0.86, name="qcface-seed1.bak")
    with pytest.raises(real_faces.BenchError, match=r"qcface: seed\(s\) \[1\] appear more"):
        real_faces.main(["--table", str(rows)])


def test_reevaluation_names_every_changed_result(real_faces, tmp_path, monkeypatch):
    """Not only the clean and mixed sets: a changed degraded-set accuracy (a table column) or
    per-kind correlation is named too."""
    package = tmp_path / "run" / "model"
    package.mkdir(parents=True)
    (package / "model.json").write_text("{}")
    stored = {"severity_0": {"summary": {"accuracy": 0.9}},
              "severity_0.5": {"summary": {"accuracy": 0.8}},
              "mixed": {"summary": {"accuracy": 0.85}},
              "spearman_vs_severity": {"model quality": {"spearman": -0.3}},
              "spearman_by_kind": {"noise": {"model quality": {"spearman": -0.2}}}}
    earlier = {"run": {"method": "arcface", "seed": 0, "run_dir": str(tmp_path / "run"),
                       "train": {"steps": 5}, "results": stored}}
    fresh = json.loads(json.dumps(stored))
    fresh["severity_0.5"]["summary"]["accuracy"] = 0.7
    fresh["spearman_by_kind"]["noise"]["model quality"]["spearman"] = +0.2
    monkeypatch.setattr(real_faces, "evaluate_package",
                        lambda *a, **k: {"results": fresh, "edcs": {}})
    run = real_faces.reevaluate(earlier, tmp_path / "arcface-seed0.json", *[None] * 4, "cpu",
                                real_faces.RealFacesConfig(), "arcface s0")
    assert sorted(run["reevaluated"]["changed"]) == ["severity_0.5", "spearman_by_kind"]
    assert run["reevaluated"]["largest_change"]["severity_0"] == 0.0
    assert run["train"] == {"steps": 5} and run["results"] == fresh


def test_ship_best_card_quotes_the_shipped_seeds_own_scores(real_faces, tmp_path):
    """The row is picked on its mean over seeds, but the card's scores are the shipped
    package's (here seed 1's 86.0 %, not the row's mean 88.0 %)."""
    from test_infer_model import make_package

    make_package(tmp_path / "runs" / "qcface-seed1" / "model", seed=1)
    rows = tmp_path / "rows"
    rows.mkdir()
    runs = [_synthetic_row(rows, "qcface", seed, acc) for seed, acc in ((0, 0.90), (1, 0.86))]
    for run in runs:
        run["run_dir"] = str(tmp_path / "runs" / f"qcface-seed{run['seed']}")
    payload = {"summary": real_faces.aggregate(runs, ["qcface"], [0.25, 0.5, 0.75]),
               "runs": runs, "settings": {}, "command": "python bench/real_faces.py ...",
               "machine": {"cpu": "test cpu"}}
    card = (real_faces.ship_best(payload, tmp_path / "table") / "README.md").read_text()
    assert card.startswith("# Best model of the real-face CPU protocol: qcface (seed 1)")
    assert "LFW 8-10 accuracy 86.0 %" in card and "accuracy 86.0 %, TAR@FAR1e-2\n  66.0 %" in card
    assert "88.0 %\n  over its seeds" in card


def test_every_row_of_a_plot_has_its_own_colour(real_faces, tmp_path, monkeypatch):
    # Eleven rows: with matplotlib's ten-colour cycle the eleventh (QGFace) was drawn in the
    # first's colour (ArcFace) in every real-face plot.
    figures = []

    def keep(fig, path):
        figures.append(fig)
        return path

    monkeypatch.setattr(real_faces, "save_figure", keep)
    methods = [f"m{i}" for i in range(11)]
    runs = [{"method": m, "seed": 0, "train": {"steps": 20, "validation_curve": [
        {"step": 10, "accuracy": 0.5 + i / 100}, {"step": 20, "accuracy": 0.6 + i / 100}]},
        "results": {}} for i, m in enumerate(methods)]
    real_faces.plot_convergence(tmp_path / "c.png", runs, methods)
    colours = [tuple(line.get_color()) for line in figures[0].axes[0].get_lines()]
    assert len(colours) == 11 and len(set(colours)) == 11
