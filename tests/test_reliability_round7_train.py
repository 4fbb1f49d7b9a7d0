"""Reliability round 7, training side.

``distributed.sample_rate < 1`` (Partial FC's centre sampling) was accepted and silently ignored
in one process: the plain head trained the full softmax the user had asked to avoid. One process
now samples centres through a one-shard ``ShardedHead``; its final weights have the plain head's
keys, and a resumed run draws the same centres (bitwise the same weights as an uninterrupted one).
In-process, tiny stand-in model.
"""

from __future__ import annotations

import signal

import pytest
import torch
from safetensors.torch import load_file

from qualiface.config import from_dict
from qualiface.train.loop import Trainer, TrainingInterrupted
from qualiface.train.sharded import ShardedHead
from stand_ins import Blobs, LinearBackbone  # noqa: F401  (registers test-linear / test-blobs)

CLASSES = 20


def settings(out, sample_rate: float, resume: bool = False, **train) -> dict:
    values = {"steps": 6, "batch_size": 8, "device": "cpu", "output_dir": str(out), "log_every": 1,
              "checkpoint_every": 3, "progress": False, "seed": 2, "resume": resume}
    values.update(train)
    return {
        "model": {"backbone": "test-linear", "params": {}},
        "head": {"name": "arcface", "params": {}},
        "data": {"name": "test-blobs", "params": {"num": 80, "classes": CLASSES}, "num_workers": 0},
        "optim": {"lr": 0.1},
        "distributed": {"sample_rate": sample_rate},
        "train": values,
    }


def record_sampling(monkeypatch) -> list[int]:
    """The number of centres each training forward kept (one entry per sampling draw)."""
    kept: list[int] = []
    original = ShardedHead.sample_rows

    def recording(self, labels, step):
        rows = original(self, labels, step)
        kept.append(int(rows.numel()))
        return rows

    monkeypatch.setattr(ShardedHead, "sample_rows", recording)
    return kept


def test_sample_rate_below_one_samples_centres_in_one_process(tmp_path, monkeypatch):
    kept = record_sampling(monkeypatch)
    trainer = Trainer(from_dict(settings(tmp_path / "run", 0.25)))
    # Was: the plain ArcFace head, every one of the 20 centres in every step.
    assert isinstance(trainer.head, ShardedHead) and trainer.sharded
    assert trainer.head.num_sampled == 5 and trainer.head.num_local == CLASSES
    assert any("5 of 20 centres" in text for _, text in trainer.summary())
    result = trainer.run()
    assert len(kept) == 6  # one draw per step
    # A batch of 8 holds at most 8 classes: every draw keeps max(5, #positives) <= 8 centres.
    assert all(5 <= k <= 8 for k in kept)
    assert trainer.head.step == 6
    weights = load_file(str(result.final_weights))
    plain = Trainer(from_dict(settings(tmp_path / "plain", 1.0)))
    assert not isinstance(plain.head, ShardedHead) and not plain.sharded
    plain_keys = {f"head.{k}" for k in plain.head.state_dict()}
    assert {k for k in weights if k.startswith("head.")} == plain_keys
    assert weights["head.weight"].shape == (CLASSES, 8)


def test_sampling_run_resumed_draws_the_same_centres(tmp_path, monkeypatch):
    straight = Trainer(from_dict(settings(tmp_path / "straight", 0.25))).run()
    reference = load_file(str(straight.final_weights))

    out = tmp_path / "resumed"
    trainer = Trainer(from_dict(settings(out, 0.25)))
    step = trainer.train_step

    def stopping(micro_batches):
        result = step(micro_batches)
        if trainer.global_step + 1 == 3:
            trainer._stop_signal = signal.SIGTERM  # the loop writes a checkpoint after step 3
        return result

    trainer.train_step = stopping
    with pytest.raises(TrainingInterrupted):
        trainer.run()
    trainer.logger.close()
    resumed = Trainer(from_dict(settings(out, 0.25, resume=True)))
    result = resumed.run()
    assert resumed.head.step == 6
    weights = load_file(str(result.final_weights))
    assert weights.keys() == reference.keys()
    for key in reference:
        assert torch.equal(weights[key], reference[key]), key


# -- resuming on another world size ---------------------------------------------------------


def test_resume_on_more_ranks_gives_ranks_above_zero_their_own_augmentation(tmp_path):
    # Was: every rank restored rank 0's random streams from the main checkpoint file, so after
    # a resume on another world size all ranks flipped and degraded their batches alike.
    from qualiface.config import to_dict
    from qualiface.train import checkpoint as ckpt
    from qualiface.train.loop import augment_seed

    out = tmp_path / "one-process"
    trainer = Trainer(from_dict(settings(out, 1.0)))
    trainer._stop_signal = signal.SIGTERM
    with pytest.raises(TrainingInterrupted):
        trainer.run()
    trainer.logger.close()
    config = to_dict(from_dict(settings(out, 1.0, resume=True)))
    notes: list[str] = []
    main, _ = ckpt.load_run_checkpoint(out, config, rank=0, world_size=2,
                                       note=lambda step, message: notes.append(message))
    other, _ = ckpt.load_run_checkpoint(out, config, rank=1, world_size=2, note=lambda *_: None)
    assert main["rng"] is not None and other["rng"] is None
    assert main["optimizer"] == {} == other["optimizer"]
    assert any("fresh augmentation streams" in note for note in notes)
    same, _ = ckpt.load_run_checkpoint(out, config, rank=0, world_size=1, note=lambda *_: None)
    assert same["rng"] is not None and same["optimizer"]
    # A fresh stream differs per rank and per step, and step 0's is the start-up one.
    seeds = {augment_seed(2, rank, step) for rank in range(4) for step in (0, 1, 1000)}
    assert len(seeds) == 12
    assert augment_seed(2, 1) == augment_seed(2, 1, 0)


# -- a validation set rank 0 cannot build ---------------------------------------------------


def _bad_validation_worker(info, out_dir: str) -> dict:
    import time

    values = settings(out_dir, 1.0)
    values["val"] = {"kind": "synthetic", "num_pairs": 20,
                     "params": {"split": "test", "num_identities": 4, "images_per_identity": 4,
                                "image_size": 8, "seed": 0, "bogus": 3}}
    started = time.monotonic()
    try:
        Trainer(from_dict(values))
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - started}
    return {"error": None, "seconds": time.monotonic() - started}


@pytest.mark.slow
def test_every_rank_stops_with_rank_zeros_validation_problem(tmp_path):
    # Was: rank 0 raised alone; rank 1 went on and failed later with "a peer rank probably
    # exited" (or, under NCCL, waited for distributed.timeout_s), naming nothing.
    from qualiface.train.local_launch import launch_local

    outcomes = launch_local(_bad_validation_worker, 2, (str(tmp_path / "run"),), timeout_s=240,
                            collective_timeout_s=60)
    first, second = (outcome.value for outcome in outcomes)
    assert first["error"] is not None and "val.params" in first["error"]
    assert second["error"] is not None
    assert second["error"].startswith("ConfigError: rank 0 could not build the validation set")
    assert "val.params" in second["error"]
