"""A skipped step leaves no trace in the running statistics either: one forward that overflows
(an fp16 activation past 65504 does this; simulated here on CPU by a hook that makes one forward
of the first convolution infinite) is skipped, and neither the backbone's BatchNorm running
statistics nor a head's EMAs keep the NaN it produced. Tiny IResNet on synthetic faces."""

from __future__ import annotations

import json

import pytest
import torch

from qualiface.config import from_dict
from qualiface.train.loop import Trainer

SYNTHETIC = {"num_identities": 4, "images_per_identity": 8, "image_size": 32, "seed": 1}


def overflowing_trainer(tmp_path, head: str, bad_forward: int) -> Trainer:
    trainer = Trainer(from_dict({
        "model": {"backbone": "iresnet-nano",
                  "params": {"input_size": 32, "base_width": 4, "embedding_size": 8}},
        "head": {"name": head},
        "data": {"name": "synthetic", "params": SYNTHETIC, "num_workers": 0},
        "optim": {"lr": 0.05},
        "train": {"steps": 6, "batch_size": 8, "device": "cpu", "output_dir": str(tmp_path),
                  "log_every": 1, "checkpoint_every": 0, "progress": False, "seed": 2,
                  "max_nonfinite_steps": 3},
    }))
    calls = {"n": 0}

    def overflow(module, inputs, output):
        calls["n"] += 1
        return output * float("inf") if calls["n"] == bad_forward else None

    first_conv = next(m for m in trainer.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(overflow)
    return trainer


def buffers(trainer) -> dict[str, torch.Tensor]:
    named = [(f"backbone.{n}", b) for n, b in trainer.backbone.named_buffers()]
    named += [(f"head.{n}", b) for n, b in trainer.head.named_buffers()]
    return {name: b.detach().clone() for name, b in named}


def skip_events(tmp_path) -> list[str]:
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return [r["message"] for r in rows if r["kind"] == "event" and "non-finite" in r["message"]]


@pytest.mark.parametrize("head", ["arcface", "curricular"])
def test_a_skipped_step_leaves_the_running_statistics_as_they_were(tmp_path, head):
    trainer = overflowing_trainer(tmp_path, head, bad_forward=3)  # the third step overflows
    seen = {}
    step = trainer.train_step

    def spy(micro_batches):
        seen[trainer.global_step] = buffers(trainer)
        return step(micro_batches)

    trainer.train_step = spy
    trainer.run()
    assert len(skip_events(tmp_path)) == 1
    before, after = seen[2], seen[3]  # around the skipped step (global step 2 -> 3)
    assert all(torch.equal(before[name], after[name]) for name in before), \
        [name for name in before if not torch.equal(before[name], after[name])]
    final = buffers(trainer)
    assert all(torch.isfinite(b.float()).all() for b in final.values())
    trainer.backbone.eval()
    with torch.no_grad():
        assert torch.isfinite(trainer.backbone(torch.rand(2, 3, 32, 32) * 2 - 1)).all()


def test_one_overflowing_step_does_not_poison_the_adaface_statistics(tmp_path):
    trainer = overflowing_trainer(tmp_path, "adaface", bad_forward=3)
    result = trainer.run()  # before: every later step NaN too, and the run stopped at step 5
    assert result.global_step == 6 and len(skip_events(tmp_path)) == 1
    stats = trainer.head.norm_statistic
    assert torch.isfinite(stats.batch_mean) and torch.isfinite(stats.batch_std)
