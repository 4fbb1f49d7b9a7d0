"""`qualiface eval ...` end to end with a fake embedding function (no model package needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qualiface.cli import app
from qualiface.data.decode import encode_jpeg
from qualiface.data.verification_bin import write_verification_bin


def _fake_embed(images):
    x = images.float() / 255
    grid = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)  # colour layout, 12-d
    return (grid - 0.5) * 4, x.std(dim=(1, 2, 3))


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    import qualiface.cli.eval as cli_eval

    monkeypatch.setattr(cli_eval, "_load_embed_fn", lambda model, device: (_fake_embed, "fake-1"))
    model = tmp_path / "model"
    model.mkdir()
    return model


def _write_lfw(root, people=8, per_person=3, seed=0):
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 220, size=(people, 2, 2, 3))
    names = [f"Person_{chr(65 + i)}" for i in range(people)]
    for i, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for k in range(1, per_person + 1):
            base = np.kron(colours[i], np.ones((8, 8, 1)))
            noisy = np.clip(base + rng.normal(0, 25 * k, base.shape), 0, 255).astype(np.uint8)
            (root / name / f"{name}_{k:04d}.jpg").write_bytes(
                encode_jpeg(torch.from_numpy(noisy).permute(2, 0, 1).contiguous()))
    lines = ["2 6"]
    for fold in range(2):
        for j in range(6):
            name = names[(fold * 6 + j) % people]
            # Fold 2 pairs other images than fold 1 (a pairs file may not repeat a pair).
            lines.append(f"{name} 1 {2 + (j % 2)}" if fold == 0 else f"{name} 2 3")
        for j in range(6):
            a, b = names[j % people], names[(j + 1 + fold) % people]
            lines.append(f"{a} {1 + j % 3} {b} {1 + (j + 1) % 3}")
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")


def test_lfw_bin_features_and_compare(tmp_path, fake_model):
    data = tmp_path / "lfw"
    _write_lfw(data)
    runner = CliRunner()
    out = tmp_path / "run-lfw"
    result = runner.invoke(app, ["eval", "lfw", "--model", str(fake_model), "--data", str(data),
                                 "--out", str(out), "--flip", "sum"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    verification = metrics["verification"]
    assert metrics["num_pairs"] == 24 and len(verification["fold_accuracies"]) == 2
    assert 0.5 <= verification["accuracy"] <= 1.0
    for name in ("report.html", "report.md", "roc.png", "edc.png", "quality_hist.png"):
        assert (out / name).stat().st_size > 0
    assert "data:image/png;base64," in (out / "report.html").read_text()
    features_file = next(out.glob("features-lfw-*.safetensors"))

    # The precomputed features give the same numbers without any model.
    again = tmp_path / "run-features"
    result = runner.invoke(app, ["eval", "features", str(features_file), "--protocol", "lfw",
                                 "--source", str(data), "--out", str(again)])
    assert result.exit_code == 0, result.output
    assert json.loads((again / "metrics.json").read_text())["verification"] == verification

    # A .bin of the same pairs.
    images = torch.randint(0, 255, (8, 3, 16, 16), dtype=torch.uint8)
    bin_path = write_verification_bin(tmp_path / "tiny.bin", images, [True, False, True, False])
    bin_out = tmp_path / "run-bin"
    result = runner.invoke(app, ["eval", "bin", str(bin_path), "--model", str(fake_model),
                                 "--out", str(bin_out), "--flip", "none"])
    assert result.exit_code == 0, result.output
    assert json.loads((bin_out / "metrics.json").read_text())["num_pairs"] == 4

    compared = tmp_path / "compare"
    result = runner.invoke(app, ["eval", "compare", str(out), str(bin_out), "--out", str(compared)])
    assert result.exit_code == 0, result.output
    table = (compared / "report.md").read_text()
    assert "run-lfw" in table and "run-bin" in table and (compared / "roc.png").is_file()


def test_clean_errors_name_the_missing_file(tmp_path, fake_model):
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "lfw", "--model", str(fake_model), "--data",
                                 str(tmp_path / "absent"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "absent" in result.output and "Traceback" not in result.output
    data = tmp_path / "lfw"
    _write_lfw(data)
    (data / "Person_A" / "Person_A_0002.jpg").unlink()
    result = runner.invoke(app, ["eval", "lfw", "--model", str(fake_model), "--data", str(data),
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "Person_A_0002.jpg" in result.output
    result = runner.invoke(app, ["eval", "ijb", "--model", str(fake_model), "--root",
                                 str(tmp_path), "--name", "IJBC", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "no IJBC protocol" in result.output
    result = runner.invoke(app, ["eval", "compare", str(tmp_path / "nothing"), "--out",
                                 str(tmp_path / "c")])
    assert result.exit_code == 1 and "metrics.json" in result.output


def test_lfw_degraded_levels_add_accuracy_per_severity_and_rank_correlation(tmp_path, fake_model):
    data = tmp_path / "lfw"
    _write_lfw(data)
    out = tmp_path / "run-degraded"
    result = CliRunner().invoke(app, ["eval", "lfw", "--model", str(fake_model), "--data",
                                      str(data), "--out", str(out), "--flip", "none",
                                      "--degrade", "0.9,0.3", "--degrade-seed", "5"])
    assert result.exit_code == 0, result.output
    degraded = json.loads((out / "metrics.json").read_text())["degraded"]
    assert list(degraded["levels"]) == ["0.3", "0.9"] and degraded["seed"] == 5
    from qualiface.eval.benchmarks import lfw_benchmark

    bench = lfw_benchmark(data)
    assert sum(degraded["kinds"].values()) == len(bench.ids)  # each image in a pair got one kind
    for level in degraded["levels"].values():
        assert 0.0 <= level["accuracy"] <= 1.0 and 0.0 <= level["auc"] <= 1.0
    for score in ("model quality", "feature norm"):
        rho = degraded["rank_correlation"][score]["spearman"]
        assert -1.0 <= rho <= 1.0
    # The fake model's quality is the pixel standard deviation: check the correlation against an
    # independent computation over clean (severity 0) and both degraded levels.
    from scipy.stats import spearmanr

    from qualiface.data.degrade import degraded_copies

    clean = torch.stack([bench.images[i] for i in range(len(bench.ids))])
    copies, _ = degraded_copies(clean, [0.3, 0.9], seed=5)
    quality = [_fake_embed(images)[1].numpy() for images in (clean, copies[0.3], copies[0.9])]
    severity = np.repeat([0.0, 0.3, 0.9], len(clean))
    expected = spearmanr(np.concatenate(quality), severity).statistic
    assert degraded["rank_correlation"]["model quality"]["spearman"] == pytest.approx(expected, abs=1e-6)
    assert (out / "model_quality_by_severity.png").is_file()
    assert 'alt="model quality by severity"' in (out / "report.html").read_text()
    assert "Spearman(quality, severity)" in result.output


@pytest.mark.parametrize("bad", ["0", "1.5", "a,b", "0.25,0.2500001"])  # the last: one key "0.25"
def test_lfw_degrade_rejects_bad_severities(tmp_path, fake_model, bad):
    data = tmp_path / "lfw"
    _write_lfw(data)
    result = CliRunner().invoke(app, ["eval", "lfw", "--model", str(fake_model), "--data",
                                      str(data), "--out", str(tmp_path / "o"), "--degrade", bad])
    assert result.exit_code == 1
    assert "--degrade" in result.output and "Traceback" not in result.output


def test_lfw_with_a_model_of_another_input_size_fails_cleanly(tmp_path):
    from qualiface.backbones import build_backbone
    from qualiface.heads.quality import NormQuality
    from qualiface.infer.model import save_model_package

    kwargs = {"embedding_size": 8, "base_width": 4, "input_size": 32}
    package = save_model_package(tmp_path / "model", backbone=build_backbone("iresnet-nano", **kwargs),
                                 backbone_name="iresnet-nano", backbone_kwargs=kwargs,
                                 quality_estimator=NormQuality())
    data = tmp_path / "lfw"
    _write_lfw(data)  # 16x16 images
    result = CliRunner().invoke(app, ["eval", "lfw", "--model", str(package), "--data", str(data),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "expects 32x32" in result.output and "Traceback" not in result.output


def test_feature_cache_is_keyed_on_the_data_not_only_the_name(tmp_path, fake_model):
    """Two different ``lfw.bin`` (same name, same ids) into one --out: each gets its own numbers."""
    runner = CliRunner()
    generator = torch.Generator().manual_seed(0)
    bins = {}
    for side in ("A", "B"):
        images = torch.randint(0, 255, (16, 3, 16, 16), dtype=torch.uint8, generator=generator)
        (tmp_path / side).mkdir()
        bins[side] = write_verification_bin(tmp_path / side / "lfw.bin", images,
                                            [True, False] * 4)

    def run(path, out):
        result = runner.invoke(app, ["eval", "bin", str(path), "--model", str(fake_model),
                                     "--out", str(out), "--flip", "none"])
        assert result.exit_code == 0, result.output
        return json.loads((out / "metrics.json").read_text())["verification"], result.output

    alone_b, _ = run(bins["B"], tmp_path / "only-b")
    shared = tmp_path / "shared"
    run(bins["A"], shared)
    after_a, output = run(bins["B"], shared)
    assert "reusing cached features" not in output
    assert after_a == alone_b
    again, output = run(bins["B"], shared)  # same data: reused, and the run says so
    assert again == alone_b
    assert "reusing cached features" in output and "features-lfw-" in output


def test_lfw_feature_cache_follows_the_image_folder_and_content(tmp_path, fake_model):
    import os

    runner = CliRunner()
    for side, seed in (("A", 0), ("B", 1)):
        _write_lfw(tmp_path / side / "lfw", seed=seed)

    def run(data, out):
        result = runner.invoke(app, ["eval", "lfw", "--model", str(fake_model), "--data",
                                     str(data), "--out", str(out), "--flip", "none"])
        assert result.exit_code == 0, result.output
        return json.loads((out / "metrics.json").read_text())["verification"], result.output

    alone_b, _ = run(tmp_path / "B" / "lfw", tmp_path / "only-b")
    shared = tmp_path / "shared"
    run(tmp_path / "A" / "lfw", shared)
    after_a, output = run(tmp_path / "B" / "lfw", shared)
    assert after_a == alone_b and "reusing" not in output
    # An image replaced in place (same path, other content) is embedded again.
    image = tmp_path / "B" / "lfw" / "Person_A" / "Person_A_0001.jpg"
    image.write_bytes((tmp_path / "A" / "lfw" / "Person_B" / "Person_B_0002.jpg").read_bytes())
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed, output = run(tmp_path / "B" / "lfw", shared)
    fresh, _ = run(tmp_path / "B" / "lfw", tmp_path / "fresh-b")
    assert "reusing" not in output and changed == fresh


def test_ijb_template_options_that_would_be_ignored_or_fail_late_are_refused_first(tmp_path,
                                                                                   fake_model):
    # --quality-threshold only filters under qwfaf: with norm pooling it was silently ignored.
    # All three are refused before any image is embedded (the root does not even exist).
    runner = CliRunner()
    base = ["eval", "ijb", "--model", str(fake_model), "--root", str(tmp_path / "absent"),
            "--out", str(tmp_path / "o")]
    for extra, message in ((["--quality-threshold", "0.5"], "qwfaf only"),
                           (["--aggregation", "qwfaf"], "needs --quality-threshold"),
                           (["--aggregation", "bogus"], "use one of")):
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "absent" not in result.output


def test_features_refuses_options_its_protocol_ignores(tmp_path):
    # --qmagface was accepted with --protocol ijb/tinyface (even a missing file) and not applied.
    from test_ijb import write_ijb_fixture

    _, features = write_ijb_fixture(tmp_path)
    features.save(tmp_path / "f.safetensors")
    runner = CliRunner()
    base = ["eval", "features", str(tmp_path / "f.safetensors"), "--protocol", "ijb",
            "--source", str(tmp_path), "--out", str(tmp_path / "o")]
    for extra, flag in ((["--qmagface", str(tmp_path / "q.json")], "--qmagface"),
                        (["--folds", "1,2"], "--folds"), (["--pairs", "p.txt"], "--pairs")):
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 1 and f"{flag}: not used by --protocol ijb" in result.output
        assert not (tmp_path / "o" / "metrics.json").exists()
