"""Faults during training: SIGKILL at seeded random points, SIGINT, a crash or a full disk while
writing a checkpoint, non-finite losses and gradients. Extends ``test_resume.py`` (one SIGKILL,
SIGTERM) and reuses its subprocess helpers; in-process cases use a tiny IResNet on 16x16 images.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal

import pytest
import torch
from stand_ins import DiskFull
from test_bad_data import record_counts
from test_resume import (
    TOTAL_STEPS,
    assert_bitwise_equal,
    final_weights,
    launch,
    logged_steps,
    make_folder,
    uninterrupted_run,
    wait_until,
    write_config,
)
from typer.testing import CliRunner

from qualiface.config import from_dict
from qualiface.train import checkpoint as ckpt
from qualiface.train.loop import Trainer, TrainingError

KILL_TRIALS = 3
KILL_SEED = 20240600  # kills after steps 1, 4 and 9: before any checkpoint, at one, between


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted CLI run: (tmp folder, data folder, its final weights)."""
    return uninterrupted_run(tmp_path_factory.mktemp("faults"))


@pytest.mark.slow
def test_sigkill_at_seeded_random_points_then_resume_is_bitwise_identical(reference_run,
                                                                          request):
    tmp, data, expected = reference_run
    # Any step from 1 to the second-to-last: some land before the first checkpoint (resume
    # starts fresh), some right at a checkpoint write (atomic rename is what saves those).
    kill_steps = random.Random(KILL_SEED).sample(range(1, TOTAL_STEPS - 1), KILL_TRIALS)
    resumed_from_checkpoint = 0
    for trial, kill_after in enumerate(kill_steps):
        out = tmp / f"killed{trial}"
        config = write_config(tmp, data, out)
        proc = launch(config)
        wait_until(proc, lambda: logged_steps(out) >= kill_after)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
        if (out / "checkpoint.pt").exists():
            saved = ckpt.load_checkpoint(out / "checkpoint.pt")  # never a torn file
            assert 0 < saved["global_step"] < TOTAL_STEPS
            resumed_from_checkpoint += 1
        resumed = launch(config, "resume=true")
        output, _ = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, output
        assert_bitwise_equal(final_weights(out), expected)
        # a temp file left by the kill is harmless (never read) and is the only debris
        assert all(name.startswith(".checkpoint.pt.") or name.startswith(".weights.")
                   for name in leftovers), leftovers
    record_counts(request, faults_injected=KILL_TRIALS, runs_resumed=KILL_TRIALS,
                  runs_compared=KILL_TRIALS)
    assert resumed_from_checkpoint >= 1, f"no trial got past a checkpoint: {kill_steps}"


@pytest.mark.slow
def test_sigint_writes_a_final_checkpoint_exits_130_and_resumes_identically(reference_run,
                                                                            request):
    tmp, data, expected = reference_run
    out = tmp / "interrupted"
    config = write_config(tmp, data, out)
    proc = launch(config)
    wait_until(proc, lambda: logged_steps(out) >= 6)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, output
    assert "Traceback" not in output and "SIGINT" in output and "resume=true" in output
    saved = ckpt.load_checkpoint(out / "checkpoint.pt")
    assert 6 <= saved["global_step"] < TOTAL_STEPS  # the interrupt's checkpoint, not step 4's
    resumed = launch(config, "resume=true")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert_bitwise_equal(final_weights(out), expected)
    record_counts(request, faults_injected=1, runs_resumed=1, runs_compared=1)


# ----------------------------------------------------------------------------- in-process


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("faces") / "faces", identities=4, per_identity=6)


def tiny_config(data, out, **train):
    settings = {"steps": 6, "batch_size": 8, "device": "cpu", "output_dir": str(out),
                "checkpoint_every": 2, "log_every": 1, "progress": False, "seed": 11}
    settings.update(train)
    return from_dict({
        "model": {"backbone": "iresnet-nano",
                  "params": {"input_size": 16, "base_width": 4, "embedding_size": 8}},
        "head": {"name": "arcface"},
        "data": {"name": "folder", "params": {"root": str(data)}, "num_workers": 0},
        "optim": {"lr": 0.05},
        "schedule": {"kind": "cosine"},
        "train": settings,
    })


def _weights(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "final.safetensors")


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(faces, tmp_path, monkeypatch,
                                                                 request):
    expected = Trainer(tiny_config(faces, tmp_path / "straight")).run()
    out = tmp_path / "crashed"
    real_save = torch.save
    calls = {"n": 0}

    def crashing_save(obj, handle, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (step 4): half written, then the crash
            real_save(obj, handle, *args, **kwargs)
            handle.truncate(handle.tell() // 2)
            raise RuntimeError("simulated crash inside torch.save")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(ckpt.CheckpointError, match="simulated crash"):
        Trainer(tiny_config(faces, out)).run()
    monkeypatch.undo()
    assert ckpt.load_checkpoint(out / "checkpoint.pt")["global_step"] == 2  # previous one intact
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # temp file removed
    Trainer(tiny_config(faces, out, resume=True)).run()
    assert_bitwise_equal(_weights(out), _weights(expected.out_dir))
    record_counts(request, faults_injected=1, runs_resumed=1, runs_compared=1)


@pytest.mark.parametrize("budget", [0, 4096], ids=["no-space", "fills-mid-write"])
def test_disk_full_is_reported_clearly_by_the_cli(faces, tmp_path, monkeypatch, budget,
                                                  request):
    import yaml

    from qualiface.cli import app

    out = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"backbone": "iresnet-nano",
                  "params": {"input_size": 16, "base_width": 4, "embedding_size": 8}},
        "head": {"name": "arcface"},
        "data": {"name": "folder", "params": {"root": str(faces)}, "num_workers": 0},
        "train": {"steps": 4, "batch_size": 8, "device": "cpu", "output_dir": str(out),
                  "checkpoint_every": 2, "progress": False},
    }))
    real_fdopen = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        handle = real_fdopen(fd, mode, *args, **kwargs)
        return DiskFull(handle, budget) if "w" in mode else handle

    monkeypatch.setattr(ckpt.os, "fdopen", fdopen)
    result = CliRunner().invoke(app, ["train", str(config)])
    monkeypatch.undo()
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "No space left on device" in text and "checkpoint.pt" in text, text
    assert "Traceback" not in result.output
    assert not (out / "checkpoint.pt").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    record_counts(request, faults_injected=1)


def _poison_loss(trainer, bad_calls, value):
    forward = trainer.head.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if calls["n"] in bad_calls:
            out.loss = out.loss * value
        calls["n"] += 1
        return out

    trainer.head.forward = poisoned


def test_inf_loss_steps_stop_the_run_after_n_in_a_row(faces, tmp_path, request):
    # test_train.py covers NaN; +Inf takes the same path and must be caught too.
    trainer = Trainer(tiny_config(faces, tmp_path, steps=8, max_nonfinite_steps=3,
                                  checkpoint_every=0))
    _poison_loss(trainer, set(range(100)), math.inf)
    with pytest.raises(TrainingError, match="3 consecutive steps had a NaN/Inf loss"):
        trainer.run()
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum("non-finite" in e.get("message", "") for e in events) == 3
    record_counts(request, faults_injected=3)


def _poison_gradient(trainer, bad_steps):
    """NaN gradient (finite loss) on the first conv weight during the given 0-based steps."""
    weight = trainer.backbone.conv1.weight
    state = {"backward": 0}

    def hook(grad):
        step = state["backward"]
        state["backward"] += 1
        return grad * float("nan") if step in bad_steps else grad

    weight.register_hook(hook)


def test_nan_gradient_with_finite_loss_skips_the_step(faces, tmp_path, request):
    trainer = Trainer(tiny_config(faces, tmp_path, steps=4, checkpoint_every=0))
    _poison_gradient(trainer, bad_steps={1})
    record_counts(request, faults_injected=1)
    trainer.run()
    for name, value in trainer.backbone.state_dict().items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), f"{name} became non-finite"
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("non-finite" in e.get("message", "") for e in events)
