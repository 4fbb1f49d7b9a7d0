"""Checkpoints: atomic writes, weights_only loading, RNG round trips, safetensors export."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from qualiface.train import checkpoint as ckpt


def test_round_trip_with_weights_only(tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = {"step": 7, "model": {"w": torch.randn(3, 4)}, "config": {"optim": {"lr": 0.1}}, "names": ["a"]}
    ckpt.save_checkpoint(path, state)
    loaded = torch.load(path, weights_only=True)  # what load_checkpoint uses; must not need pickle
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert ckpt.load_checkpoint(path)["config"] == {"optim": {"lr": 0.1}}


def test_failing_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    real_save = torch.save

    def broken_save(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(ckpt.CheckpointError, match="disk full"):
        ckpt.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    state = ckpt.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    # no temp files left; the digest file vouches for the surviving checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "checkpoint.pt.sha256"]


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after the raise point runs (not even ``except Exception``)."""


def test_kill_between_keeping_previous_and_publishing_leaves_checkpoint_in_place(tmp_path, monkeypatch):
    # The rename of the new file over checkpoint.pt is the one that "never happens": the file a
    # resume reads first must still be there, hold the last complete state and verify.
    import os

    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    ckpt.save_checkpoint(path, {"step": 2, "w": torch.full((3,), 2.0)})
    real_replace = os.replace

    def killed_before_publishing(src, dst):
        if Path(dst) == path:
            raise _Killed
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_publishing)
    with pytest.raises(_Killed):
        ckpt.save_checkpoint(path, {"step": 3, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert ckpt.verify_digest(path) and ckpt.load_checkpoint(path)["step"] == 2
    previous = ckpt.previous_path(path)
    assert ckpt.verify_digest(previous) and ckpt.load_checkpoint(previous)["step"] == 2
    assert ckpt.load_for_resume(path).state["step"] == 2
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_previous_is_kept_on_a_filesystem_without_hard_links(tmp_path, monkeypatch):
    import os

    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "checkpoint.pt"
    for step in (1, 2, 3):
        ckpt.save_checkpoint(path, {"step": step})
    assert ckpt.load_checkpoint(path)["step"] == 3
    assert ckpt.load_checkpoint(ckpt.previous_path(path))["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.previous.pt", "checkpoint.pt", "checkpoint.pt.sha256"]


def test_unpicklable_object_is_refused_at_load(tmp_path):
    path = tmp_path / "evil.pt"

    from fractions import Fraction  # an arbitrary class: loading it would need a pickle global

    torch.save({"format_version": ckpt.FORMAT_VERSION, "x": Fraction(1, 3)}, path)
    with pytest.raises(ckpt.CheckpointError, match="evil.pt"):
        ckpt.load_checkpoint(path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(ckpt.CheckpointError, match="bad.pt"):
        ckpt.load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"w": torch.ones(1)}, foreign)
    with pytest.raises(ckpt.CheckpointError, match="not a qualiface checkpoint"):
        ckpt.load_checkpoint(foreign)


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(1), np.random.seed(2), random.seed(4)
    np.random.randn()  # leaves a cached gaussian-state worth checking
    ckpt.save_checkpoint(tmp_path / "c.pt", {"rng": ckpt.capture_rng_state({"augment": generator})})
    expected = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=generator))
    torch.manual_seed(99), np.random.seed(99), random.seed(99), generator.manual_seed(99)
    ckpt.restore_rng_state(ckpt.load_checkpoint(tmp_path / "c.pt")["rng"], {"augment": generator})
    got = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=generator))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and torch.equal(got[3], expected[3])


def test_safetensors_export(tmp_path):
    from safetensors.torch import load_file

    w = torch.randn(4, 5)
    ckpt.export_safetensors(tmp_path / "w.safetensors", {"backbone.w": w.t(), "head.b": torch.ones(2)},
                            {"step": 3})
    loaded = load_file(tmp_path / "w.safetensors")
    assert torch.equal(loaded["backbone.w"], w.t()) and set(loaded) == {"backbone.w", "head.b"}
