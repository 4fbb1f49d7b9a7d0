"""Reliability round 2, training side: checkpoint digests with a fallback to the previous
checkpoint, one-line refusals for checkpoints that do not fit the run, no silent overwrite of a
previous run, and one-line config errors from the CLI. Tiny stand-in models on CPU."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from qualiface.cli import app
from qualiface.config import from_dict
from qualiface.train import checkpoint as ckpt
from qualiface.train.loop import Trainer
from stand_ins import Blobs, LinearBackbone  # noqa: F401  (registers test-linear / test-blobs)

runner = CliRunner()


def settings(out, **train) -> dict:
    values = {"steps": 4, "batch_size": 16, "device": "cpu", "output_dir": str(out),
              "log_every": 1, "checkpoint_every": 2, "progress": False, "seed": 3}
    values.update(train)
    return {
        "model": {"backbone": "test-linear", "params": {}},
        "head": {"name": "arcface", "params": {}},
        "data": {"name": "test-blobs", "params": {}, "flip": False, "num_workers": 0},
        "optim": {"lr": 0.5},
        "schedule": {"kind": "constant"},
        "train": values,
    }


def flip_one_bit(path, position: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * position)] ^= 0x10
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- digests


def test_each_checkpoint_records_its_sha256_and_keeps_the_previous_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint(path, {"step": 1, "w": torch.ones(64)})
    ckpt.save_checkpoint(path, {"step": 2, "w": torch.zeros(64)})
    previous = tmp_path / "checkpoint.previous.pt"
    recorded = dict(reversed(line.split("  ")) for line in
                    (tmp_path / "checkpoint.pt.sha256").read_text().splitlines())
    assert recorded == {"checkpoint.pt": ckpt.file_digest(path),
                        "checkpoint.previous.pt": ckpt.file_digest(previous)}
    assert ckpt.load_checkpoint(path)["step"] == 2 and ckpt.load_checkpoint(previous)["step"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_flipped_bit_is_an_error_naming_the_file_and_resume_falls_back(tmp_path):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint(path, {"step": 1, "w": torch.ones(4096)})
    ckpt.save_checkpoint(path, {"step": 2, "w": torch.zeros(4096)})
    flip_one_bit(path)
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"checkpoint\.pt: sha256 .* does not "
                                                          r"match .* corrupt"):
        ckpt.load_checkpoint(path)
    point = ckpt.load_for_resume(path)
    assert point.path == tmp_path / "checkpoint.previous.pt" and point.state["step"] == 1
    assert len(point.warnings) == 1 and "checkpoint.pt: sha256" in point.warnings[0]
    assert "resuming from" in point.warnings[0]
    flip_one_bit(point.path, 0.7)  # both bad: one error naming both files
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint\.pt: .*checkpoint\.previous\.pt"):
        ckpt.load_for_resume(path)


def test_crash_between_the_renames_resumes_from_the_kept_checkpoint(tmp_path, monkeypatch):
    # On a filesystem without hard links the current file is renamed aside before the new one
    # lands (with them it stays in place: test_checkpoint.py), so a crash between the two
    # renames leaves only the previous file, which the resume falls back to.
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint(path, {"step": 1, "w": torch.ones(8)})
    real_replace = ckpt.os.replace

    def no_hard_links(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(ckpt.os, "link", no_hard_links)

    def crash_before_the_new_file_lands(src, dst):
        if str(src).endswith(".tmp") and str(dst) == str(path):
            raise KeyboardInterrupt  # the process dies here: old file already moved aside
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_before_the_new_file_lands)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, {"step": 2, "w": torch.zeros(8)})
    monkeypatch.undo()
    assert not path.exists() and ckpt.has_checkpoint(path)
    point = ckpt.load_for_resume(path)
    assert point.state["step"] == 1 and "missing" in point.warnings[0]


def test_trainer_resumes_from_the_previous_checkpoint_bitwise_when_the_latest_is_corrupt(
        tmp_path):
    out = tmp_path / "run"
    Trainer(from_dict(settings(out))).run()  # checkpoints at step 2 and (final) step 4
    expected = load_file(out / "final.safetensors")
    assert ckpt.load_checkpoint(out / "checkpoint.previous.pt")["global_step"] == 2
    flip_one_bit(out / "checkpoint.pt")
    trainer = Trainer(from_dict(settings(out, resume=True)))
    result = trainer.run()
    assert result.global_step == 4
    resumed = load_file(out / "final.safetensors")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)  # steps 3-4 redone exactly
    notes = [json.loads(line).get("message", "") for line in
             (out / "metrics.jsonl").read_text().splitlines()]
    assert any(n.startswith("warning:") and "checkpoint.pt: sha256" in n and
               "checkpoint.previous.pt" in n for n in notes), notes


# ----------------------------------------------------------------------------- fit to the run


def _saved_run(tmp_path):
    out = tmp_path / "run"
    Trainer(from_dict(settings(out, steps=2))).run()
    return out


def test_checkpoint_with_a_missing_key_is_one_clear_line(tmp_path):
    out = _saved_run(tmp_path)
    state = ckpt.load_checkpoint(out / "checkpoint.pt")
    del state["optimizer"], state["format_version"]
    ckpt.save_checkpoint(out / "checkpoint.pt", state, keep_previous=False)
    (out / "checkpoint.previous.pt").unlink(missing_ok=True)
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint\.pt: missing key 'optimizer'"):
        Trainer(from_dict(settings(out, steps=2, resume=True))).load_checkpoint()


def test_checkpoint_from_another_architecture_names_the_key_and_the_tensor(tmp_path):
    out = _saved_run(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=r"another architecture: "
                                                   r"model\.params\.embedding_size is absent in "
                                                   r"the checkpoint, 16 now"):
        Trainer(from_dict(settings(out, steps=2, resume=True) | {
            "model": {"backbone": "test-linear", "params": {"embedding_size": 16}}})).run()
    # Same config recorded, other tensors (e.g. a checkpoint edited or from another tool).
    state = ckpt.load_checkpoint(out / "checkpoint.pt")
    state["backbone"]["fc.weight"] = torch.zeros(16, 192)
    ckpt.save_checkpoint(out / "checkpoint.pt", state)
    with pytest.raises(ckpt.CheckpointError, match=r"backbone weights are from another "
                                                   r"architecture: 1 of another shape \(first "
                                                   r"'fc\.weight': \(16, 192\) saved, \(8, 192\)"):
        Trainer(from_dict(settings(out, steps=2, resume=True))).load_checkpoint()


def test_resume_after_a_config_change_says_which_key_differs(tmp_path):
    out = _saved_run(tmp_path)
    changed = settings(out, steps=2, resume=True, log_every=5)  # log_every may change
    changed["optim"]["lr"] = 0.25
    with pytest.raises(ckpt.CheckpointError, match=r"optim\.lr is 0\.5 in the checkpoint, "
                                                   r"0\.25 now"):
        Trainer(from_dict(changed)).run()


# ----------------------------------------------------------------------------- CLI


def _config_file(tmp_path, out, **train):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(settings(out, **train)))
    return path


def _one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_train_refuses_an_output_dir_holding_a_run_unless_overwrite_or_resume(tmp_path):
    out = tmp_path / "run"
    config = _config_file(tmp_path, out, steps=2)
    assert runner.invoke(app, ["train", str(config)]).exit_code == 0
    first = (out / "metrics.jsonl").read_text()
    again = runner.invoke(app, ["train", str(config)])
    _one_line_error(again, str(out), "checkpoint.pt", "metrics.jsonl", "resume=true",
                    "--overwrite")
    assert (out / "metrics.jsonl").read_text() == first  # untouched
    resumed = runner.invoke(app, ["train", str(config), "resume=true"])
    assert resumed.exit_code == 0, resumed.output
    fresh = runner.invoke(app, ["train", str(config), "--overwrite"])
    assert fresh.exit_code == 0, fresh.output
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2]  # one run's curve, not two interleaved


@pytest.mark.parametrize("override, key", [
    ("optim.lr=.nan", "optim.lr"), ("optim.lr=.inf", "optim.lr"), ("optim.lr=nan", "optim.lr"),
    ("epochs=.nan", "train.epochs"), ("seed=2**70", "train.seed"),
    (f"seed={2**70}", "train.seed"), ("output_dir=/dev/null", "train.output_dir"),
])
def test_bad_numbers_and_paths_are_one_line_errors_naming_the_key(tmp_path, override, key):
    result = runner.invoke(app, ["train", str(_config_file(tmp_path, tmp_path / "run")),
                                 override])
    _one_line_error(result, "train.yaml", key)
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("override, needle", [
    ("model.params.input_size=8", "multiple of 16"), ("model.params.input_size=0", "0 does not fit"),
    ("model.params.embedding_size=0", "must be positive"),
])
def test_backbone_params_it_cannot_take_are_one_line(tmp_path, override, needle):
    data = settings(tmp_path / "run")
    data["model"] = {"backbone": "iresnet-nano", "params": {"input_size": 16}}
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["train", str(config), override])
    _one_line_error(result, "train.yaml", override.partition("=")[0], needle)


def test_exponent_learning_rate_trains(tmp_path):
    result = runner.invoke(app, ["train", str(_config_file(tmp_path, tmp_path / "run", steps=1)),
                                 "optim.lr=1e-3"])
    assert result.exit_code == 0, result.output
    assert ckpt.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]["optim"]["lr"] == 1e-3


def test_a_pipeline_section_registered_on_one_side_only_is_not_a_config_change():
    from qualiface.train.checkpoint import config_differences

    saved = {"head": {"name": "qcface"}, "pipeline": {"name": "qcface",
                                                      "qcface": {"warmup_steps": 5}}}
    # another process registered a plug-in method: its options section appears, unused
    current = {"head": {"name": "qcface"}, "pipeline": {"name": "qcface",
                                                        "qcface": {"warmup_steps": 5},
                                                        "toy": {"first_steps": 2}}}
    assert config_differences(saved, current) == []
    # a change inside a section both sides know is still refused
    current["pipeline"]["qcface"]["warmup_steps"] = 6
    assert config_differences(saved, current) == [("pipeline.qcface.warmup_steps", 5, 6)]
    # and a head change is never hidden
    current["head"]["name"] = "arcface"
    assert ("head.name", "qcface", "arcface") in config_differences(saved, current)


def test_options_of_a_method_not_being_run_are_not_a_config_change():
    from qualiface.train.checkpoint import config_differences

    # a MagFace run (pipeline none) resumed after EQFace gained an option: nothing changed
    saved = {"head": {"name": "magface"}, "pipeline": {"name": "none",
                                                       "eqface": {"branch_lr": 0.01}}}
    current = {"head": {"name": "magface"}, "pipeline": {"name": "none",
                                                         "eqface": {"branch_lr": 0.01,
                                                                    "rewarm": False}}}
    assert config_differences(saved, current) == []
    # the same option added to the method being run may change its training: refused
    for side in (saved, current):
        side["head"]["name"] = side["pipeline"]["name"] = "eqface"
    assert [d[0] for d in config_differences(saved, current)] == ["pipeline.eqface.rewarm"]
    # switching the pipeline is a change, and so are both methods' sections then
    current["pipeline"]["name"] = "none"
    assert ("pipeline.name", "eqface", "none") in config_differences(saved, current)


def test_options_a_method_reads_without_its_schedule_are_still_compared():
    # QGFace reads its degradation preset under pipeline.name=none too: a changed preset on
    # resume went unnoticed and the rest of the run trained on other second views.
    from qualiface.train.checkpoint import config_differences

    saved = {"head": {"name": "qgface"}, "pipeline": {"name": "none", "qgface": {"lq_preset": "qgface"},
                                                      "qcface": {"warmup_steps": 0}}}
    current = {"head": {"name": "qgface"}, "pipeline": {"name": "none", "qgface": {"lq_preset": "mild"},
                                                        "qcface": {"warmup_steps": 9}}}
    assert config_differences(saved, current) == [("pipeline.qgface.lq_preset", "qgface", "mild")]


# ----------------------------------------------------------------------------- bad input, round 5


def test_a_device_typo_is_one_line_naming_the_key(tmp_path):
    # torch.device("gpu") raised a RuntimeError listing twenty device types, as a traceback.
    result = runner.invoke(app, ["train", str(_config_file(tmp_path, tmp_path / "run")),
                                 "device=gpu"])
    _one_line_error(result, "train.device", "'gpu' is not a device name")


def test_an_empty_config_file_is_refused_not_trained_with_every_default(tmp_path, monkeypatch):
    # An empty (or truncated to nothing) YAML used to start IResNet-50 on the defaults,
    # writing into runs/train of the current folder.
    import qualiface.train.loop

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(qualiface.train.loop, "train", lambda cfg: pytest.fail("trained the defaults"))
    for text in ("", "# only a comment\n"):
        config = tmp_path / "empty.yaml"
        config.write_text(text)
        result = runner.invoke(app, ["train", str(config)])
        _one_line_error(result, str(config), "empty config")


def test_a_start_that_failed_before_its_first_step_does_not_block_the_rerun(tmp_path):
    # Too few images for one step fails after the output folder and an empty metrics.jsonl
    # exist; the corrected rerun was refused as "holds a previous run (metrics.jsonl)".
    out = tmp_path / "run"
    config = _config_file(tmp_path, out, steps=1)
    failed = runner.invoke(app, ["train", str(config), "batch_size=100000"])
    assert failed.exit_code == 1 and "fewer than one step" in failed.output, failed.output
    assert (out / "metrics.jsonl").stat().st_size == 0
    rerun = runner.invoke(app, ["train", str(config)])
    assert rerun.exit_code == 0, rerun.output
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"] == [1]


# ----------------------------------------------------------------------------- data fingerprint


def _faces(root, names=("anna", "bert", "carl", "dora"), per_identity: int = 4):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in names:
        (root / name).mkdir(parents=True)
        for k in range(per_identity):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{k}.png")
    return root


def _folder_settings(out, root, **train):
    values = settings(out, batch_size=8, **train)
    values["data"] = {"name": "folder", "params": {"root": str(root)}, "flip": False, "num_workers": 0}
    return values


def test_resume_refuses_training_data_whose_labels_changed(tmp_path):
    # Renaming one identity folder keeps the image and class counts but shifts the labels of
    # every later folder: the resumed run trained the saved classifier rows on other people.
    root = _faces(tmp_path / "faces")
    out = tmp_path / "run"
    Trainer(from_dict(_folder_settings(out, root, steps=2))).run()
    Trainer(from_dict(_folder_settings(out, root, steps=2, resume=True))).load_checkpoint()  # same data
    (root / "bert").rename(root / "zoe")
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint\.pt: the training data changed since "
                                                   r"this checkpoint \(the images or their labels differ"):
        Trainer(from_dict(_folder_settings(out, root, steps=2, resume=True))).run()
    (root / "zoe" / "0.png").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"images: 16 then, 15 now"):
        Trainer(from_dict(_folder_settings(out, root, steps=2, resume=True))).run()


def test_the_data_fingerprint_ignores_where_the_data_lies_but_not_a_relabelled_list(tmp_path):
    import shutil

    from qualiface.data.folder import ImageFolderDataset, ListFileDataset

    root = _faces(tmp_path / "faces")
    moved = shutil.copytree(root, tmp_path / "elsewhere" / "faces")
    assert ImageFolderDataset(root).fingerprint() == ImageFolderDataset(moved).fingerprint()
    listing = tmp_path / "faces" / "train.txt"
    listing.write_text("anna/0.png 0\nbert/0.png 1\n")
    first = ListFileDataset(listing).fingerprint()
    listing.write_text("anna/0.png 1\nbert/0.png 0\n")
    assert ListFileDataset(listing).fingerprint() != first
