"""Starting and reading a run: the start-up summary, --threads, data workers, progress lines on
a non-terminal stderr, and what relative data paths in a config are relative to."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from qualiface.cli import app
from qualiface.config import ConfigError, check_data_paths, from_dict, load_config
from qualiface.train.loop import Trainer
from stand_ins import Blobs, LinearBackbone  # noqa: F401  (registers test-linear / test-blobs)


def _config(tmp_path, *, head="arcface", pipeline=None, data=None, schedule=None, **train) -> dict:
    settings = {"epochs": 3, "batch_size": 16, "device": "cpu", "output_dir": str(tmp_path / "run"),
                "log_every": 2, "checkpoint_every": 0, "progress": False, "seed": 3}
    settings.update(train)
    return {
        "model": {"backbone": "test-linear", "params": {}},
        "head": {"name": head, "params": {}},
        "data": {"name": "test-blobs", "params": {}, "flip": False, "num_workers": 0, **(data or {})},
        "schedule": {"kind": "constant", **(schedule or {})},
        "pipeline": pipeline or {"name": "none"},
        "train": settings,
    }


def _rows(trainer: Trainer) -> dict[str, str]:
    return dict(trainer.summary())


# --------------------------------------------------------------------------- start-up summary


def test_summary_converts_epochs_and_warm_ups_to_steps(tmp_path):
    # 64 blobs / 16 per step = 4 steps per epoch: 3 epochs = 12 steps, lr warm-up 0.5 epoch = 2
    # steps, QCFace's norm warm-up 1 epoch = 4 steps.
    cfg = from_dict(_config(tmp_path, head="qcface", schedule={"warmup_epochs": 0.5},
                            pipeline={"name": "qcface", "qcface": {"warmup_epochs": 1}}))
    rows = _rows(Trainer(cfg))
    assert rows["data"].startswith("test-blobs: 64 images, 4 classes")
    assert rows["steps/epoch"].startswith("4 of 16 images")
    assert rows["phase 1/1"] == ("train: 12 steps (3 epochs), lr 0.1, lr warm-up 2 steps, "
                                 "norm warm-up 4 steps")
    assert rows["total steps"] == "12"
    assert rows["device"] == "cpu, precision fp32"
    assert rows["output"] == str(tmp_path / "run")
    assert rows["threads"].startswith(f"{torch.get_num_threads()} torch intra-op, 0 data workers")


def test_summary_lists_every_eqface_step(tmp_path):
    cfg = from_dict(_config(tmp_path, head="eqface", pipeline={
        "name": "eqface", "eqface": {"branch_steps": 2, "finetune_epochs": 0.5, "finetune_lr": 0.02}}))
    rows = _rows(Trainer(cfg))
    assert rows["phase 1/3"].startswith("eqface-1-backbone: 12 steps (3 epochs), lr 0.1")
    assert rows["phase 2/3"].startswith("eqface-2-branch: 2 steps, lr 0.01")
    assert rows["phase 3/3"].startswith("eqface-3-finetune: 2 steps (0.5 epochs), lr 0.02")
    assert rows["total steps"] == "16"


def test_train_prints_the_summary_before_training(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path, epochs=1)))
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert text.index("steps/epoch") < text.index("done")
    for label in ("images", "classes", "phase 1/1", "lr warm-up", "total steps", "data workers",
                  "device", "output"):
        assert label in text, label


# --------------------------------------------------------------------------- threads and workers


def test_train_threads_option_sets_torch_threads_for_the_run_only(tmp_path):
    before = torch.get_num_threads()
    wanted = 2 if before != 2 else 1
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path, epochs=1)))
    result = CliRunner().invoke(app, ["train", str(config), "--threads", str(wanted)])
    assert result.exit_code == 0, result.output
    assert f"{wanted} torch intra-op" in result.output
    assert torch.get_num_threads() == before
    assert CliRunner().invoke(app, ["train", str(config), "--threads", "-1"]).exit_code == 2


def test_eval_threads_option_sets_torch_threads_while_embedding(tmp_path, monkeypatch):
    import qualiface.cli.eval as cli_eval
    from test_eval_cli import _fake_embed, _write_lfw

    seen = []

    def embed(images):
        seen.append(torch.get_num_threads())
        return _fake_embed(images)

    monkeypatch.setattr(cli_eval, "_load_embed_fn", lambda model, device: (embed, "fake-1"))
    (tmp_path / "model").mkdir()
    _write_lfw(tmp_path / "lfw")
    before = torch.get_num_threads()
    wanted = 2 if before != 2 else 1
    result = CliRunner().invoke(app, ["eval", "lfw", "--model", str(tmp_path / "model"),
                                      "--data", str(tmp_path / "lfw"), "--out", str(tmp_path / "out"),
                                      "--threads", str(wanted)])
    assert result.exit_code == 0, result.output
    assert seen and set(seen) == {wanted}
    assert torch.get_num_threads() == before


def test_data_workers_are_capped_at_the_available_cpus(tmp_path):
    from qualiface.threads import available_cpus, data_workers

    cpus = available_cpus()
    assert 1 <= cpus <= (os.cpu_count() or cpus)
    assert data_workers(0) == 0 and data_workers(1) == 1 and data_workers(10_000) == cpus
    trainer = Trainer(from_dict(_config(tmp_path, data={"num_workers": 10_000})))
    assert trainer.num_workers == cpus
    assert f"{cpus} data workers (data.num_workers=10000; {cpus} CPUs available)" in _rows(trainer)["threads"]


# --------------------------------------------------------------------------- progress lines


def test_training_logs_a_progress_line_every_log_every_steps_when_not_a_terminal(tmp_path, capsys):
    from qualiface.progress import console

    assert not console.is_terminal  # pytest captures stderr
    Trainer(from_dict(_config(tmp_path, steps=6, log_every=2, progress=True))).run()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train ")]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"], lines
    assert all("ETA" in line and "loss" in line and "img/s" in line for line in lines)


def test_other_jobs_log_lines_every_n_items_and_at_the_end(capsys):
    from qualiface.progress import LineProgress, make_progress

    with make_progress(every=4) as bar:
        assert isinstance(bar, LineProgress)
        task = bar.add_task("embedding", total=10)
        for _ in range(10):
            bar.advance(task)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split()[1] for line in lines] == ["4/10", "8/10", "10/10"], lines
    assert all("img/s" in line and "ETA" in line for line in lines)
    with make_progress(enabled=False) as bar:  # disabled stays silent
        bar.advance(bar.add_task("quiet", total=3), 3)
    assert capsys.readouterr().err == ""


def test_a_progress_without_every_logs_by_time(capsys, monkeypatch):
    import qualiface.progress as progress
    from rich.progress import MofNCompleteColumn, TextColumn

    now = [0.0]
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 10.0)
    bar = progress.LineProgress(TextColumn("{task.description}"), MofNCompleteColumn(),
                                console=progress.console, get_time=lambda: now[0])
    with bar:
        task = bar.add_task("packing", total=None)
        for _ in range(7):
            now[0] += 4.0  # an item every 4 s: a line at 12 s and 24 s, the rest at stop()
            bar.advance(task)
    counts = [line.split()[1] for line in capsys.readouterr().err.splitlines()]
    assert counts == ["3/?", "6/?", "7/?"], counts


# --------------------------------------------------------------------------- relative data paths


def _shipped_with_data_paths():
    for path in sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if data.get("data", {}).get("params", {}).get("list_file"):
            return path.stem, data
    pytest.skip("no shipped config with a data.params.list_file")


def test_shipped_config_data_paths_are_relative_to_the_checkout(tmp_path, monkeypatch):
    from qualiface.config import project_root

    name, raw = _shipped_with_data_paths()
    root = project_root()
    assert root is not None and (root / "pyproject.toml").is_file()  # tests run from a checkout
    monkeypatch.chdir(tmp_path)
    cfg = load_config(name)
    expected = os.path.normpath(root / raw["data"]["params"]["list_file"])
    assert cfg.data.params["list_file"] == expected
    assert cfg.val.root == os.path.normpath(root / raw["val"]["root"])
    # an override on the command line stays relative to the current directory
    cfg = load_config(name, ["data.params.list_file=mine/train.txt"])
    assert cfg.data.params["list_file"] == "mine/train.txt"


def test_a_user_config_keeps_paths_relative_to_the_current_directory(tmp_path, monkeypatch):
    config = tmp_path / "configs" / "mine.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump(_config(tmp_path, data={"name": "list",
                                                             "params": {"list_file": "data/train.txt"}})))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(config)
    assert cfg.data.params["list_file"] == "data/train.txt"
    with pytest.raises(ConfigError) as caught:
        check_data_paths(cfg, source=str(config))
    message = str(caught.value)
    assert "data.params.list_file: data/train.txt not found" in message
    assert f"relative to the current directory, {tmp_path}" in message
    assert "data.params.list_file=/path/to/train.txt" in message
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text("a.jpg 0\n")
    check_data_paths(cfg)  # found: no error


def test_train_refuses_a_missing_validation_folder_before_training(tmp_path):
    raw = _config(tmp_path, epochs=1)
    raw["val"] = {"kind": "pairs", "root": str(tmp_path / "no-lfw")}
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 1, result.output
    assert f"val.root: {tmp_path / 'no-lfw'} not found" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()  # refused before the run started
