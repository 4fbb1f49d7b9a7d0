"""20-step CPU smoke trains of every method pipeline on the synthetic faces (tiny IResNet),
checking what each pipeline promises: phases, stage switches, QWDF filtering, the second view,
held-out validation records and the exported weights / model package."""

from __future__ import annotations

import json

import pytest
import torch

from qualiface.config import from_dict
from qualiface.train.loop import Trainer
from qualiface.train.pipelines import PipelineError, inner_head

SYNTHETIC = {"num_identities": 8, "images_per_identity": 8, "image_size": 32, "seed": 1}


def config(tmp_path, head, pipeline=None, **train):
    settings = {"steps": 20, "batch_size": 16, "device": "cpu", "output_dir": str(tmp_path),
                "log_every": 5, "checkpoint_every": 0, "progress": False, "seed": 0}
    settings.update(train)
    return from_dict({
        "model": {"backbone": "iresnet-nano", "params": {"input_size": 32, "base_width": 4, "embedding_size": 16}},
        "head": {"name": head, "params": {}},
        "data": {"name": "synthetic", "params": SYNTHETIC},
        "optim": {"lr": 0.05},
        "train": settings,
        "pipeline": pipeline or {"name": "none"},
    })


def records(path, kind):
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def test_plain_pipeline_with_validation(tmp_path):
    cfg = config(tmp_path, "arcface", eval_every=10)
    cfg.val.kind = "synthetic"
    cfg.val.params = {**SYNTHETIC, "split": "test", "num_identities": 6}
    cfg.val.num_pairs = 60
    result = Trainer(cfg).run()
    assert result.global_step == 20
    val = records(tmp_path, "val")
    assert [r["step"] for r in val] == [10, 20, 20]  # periodic + the end of training
    assert all(0.0 <= r["val_accuracy"] <= 1.0 and 0.0 <= r["val_auc"] <= 1.0 for r in val)
    train_rows = records(tmp_path, "train")
    assert train_rows[0]["loss"] > 0 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train_rows)


def test_qcface_warmup_then_norm_phase(tmp_path):
    cfg = config(tmp_path, "qcface", {"name": "qcface", "qcface": {"warmup_steps": 10}})
    trainer = Trainer(cfg)
    trainer.run()
    rows = records(tmp_path, "train")
    assert [r["norm_phase"] for r in rows] == [0.0, 0.0, 1.0, 1.0]  # logged at steps 5, 10, 15, 20
    assert inner_head(trainer.head).norm_phase is True


def test_qcface_warmup_as_fraction_of_the_run(tmp_path):
    cfg = config(tmp_path, "qcface", {"name": "qcface", "qcface": {"warmup_fraction": 0.25}})
    Trainer(cfg).run()
    # 25 % of 20 steps = 5 warm-up steps: logged after steps 5 (still warm-up), 10, 15, 20
    assert [r["norm_phase"] for r in records(tmp_path, "train")] == [0.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("warmup", [{"warmup_epochs": 50.0}, {"warmup_steps": 20},
                                    {"warmup_fraction": 1.0}])
def test_qcface_warmup_as_long_as_the_run_is_refused(tmp_path, warmup):
    # A warm-up >= the run would train plain ArcFace and still ship a "QCFace quality" package.
    cfg = config(tmp_path, "qcface", {"name": "qcface", "qcface": warmup})
    with pytest.raises(PipelineError, match="norm regulariser would never switch on.*20"):
        Trainer(cfg).run()


def test_eqface_collapsed_branch_stops_with_a_clear_error(tmp_path, monkeypatch):
    # Measured on this tiny set: step 2 at the default branch_lr drives s to ~2e-5.
    monkeypatch.setattr("qualiface.methods.eqface.EQFaceMethod.COLLAPSE_RETRIES", 0)
    pipeline = {"name": "eqface", "eqface": {"branch_steps": 5, "finetune_steps": 5}}
    trainer = Trainer(config(tmp_path, "eqface", pipeline, steps=10))
    with pytest.raises(PipelineError, match="EQFace step 2 collapsed at lr 0.01: .*mean s = .*branch_lr"):
        trainer.run()
    assert inner_head(trainer.head).stage == 2  # stopped before step 3 trained anything


def step_two_snapshots(trainer):
    """Record, at every entry into EQFace's step 2, the backbone and the branch as it starts."""
    entries = []
    original = trainer.method.enter_phase

    def spy(phase, backbone, head, steps_per_epoch):
        original(phase, backbone, head, steps_per_epoch)
        if phase.stage == 2:
            entries.append({"lr": phase.lr,
                            "branch": {k: v.clone() for k, v in inner_head(head).quality_branch.state_dict().items()},
                            "backbone": {k: v.clone() for k, v in backbone.state_dict().items()}})

    trainer.method.enter_phase = spy
    return entries


def test_eqface_collapse_restarts_step_two_from_a_fresh_branch_at_lower_lr(tmp_path):
    # Step 2 collapses at lr 0.01 (test above); the method restarts it with a re-initialised
    # branch at 0.001, then 0.0001, keeping step 1's backbone, and goes on to step 3 once the
    # branch no longer collapses -- instead of throwing step 1 away.
    pipeline = {"name": "eqface", "eqface": {"branch_steps": 5, "finetune_steps": 5}}
    trainer = Trainer(config(tmp_path, "eqface", pipeline, steps=10))
    entries = step_two_snapshots(trainer)
    result = trainer.run()
    lrs = [entry["lr"] for entry in entries]
    assert lrs[0] == 0.01 and len(lrs) >= 2
    assert lrs == pytest.approx([0.01 * 0.1 ** k for k in range(len(lrs))])
    events = [r["message"] for r in records(tmp_path, "event")]
    restarts = [m for m in events if "restarting step 2 from a fresh branch" in m]
    assert len(restarts) == len(lrs) - 1
    assert inner_head(trainer.head).stage == 3
    assert result.global_step == 10 + 5 * len(lrs) + 5
    for earlier, later in zip(entries, entries[1:]):
        # same step-1 backbone; a branch reset to a fresh draw (not the collapsed one)
        assert all(torch.equal(later["backbone"][k], v) for k, v in earlier["backbone"].items())
        assert not torch.equal(later["branch"]["layers.0.weight"], earlier["branch"]["layers.0.weight"])
        bound = 1 / (inner_head(trainer.head).quality_branch.feature_dim ** 0.5)
        assert float(later["branch"]["layers.0.weight"].abs().max()) <= bound
        assert torch.equal(later["branch"]["layers.1.running_mean"],
                           torch.zeros_like(later["branch"]["layers.1.running_mean"]))


def test_eqface_restart_resumes_exactly(tmp_path):
    # Stopped right after a collapse (the checkpoint written at the restart), the run resumes
    # with the same attempt, the same fresh branch and the same final weights.
    pipeline = {"name": "eqface", "eqface": {"branch_steps": 5, "finetune_steps": 5}}
    straight = Trainer(config(tmp_path / "straight", "eqface", pipeline, steps=10))
    straight.run()

    stopped = Trainer(config(tmp_path / "stopped", "eqface", pipeline, steps=10))
    original = stopped.save_checkpoint

    def stop_after_restart():
        original()
        if stopped.method.reset_branch:
            raise KeyboardInterrupt  # killed once the restart is on disk, before step 2 reran

    stopped.save_checkpoint = stop_after_restart
    with pytest.raises(KeyboardInterrupt):
        stopped.run()
    resumed = Trainer(config(tmp_path / "stopped", "eqface", pipeline, steps=10, resume=True))
    resumed.run()
    assert resumed.method.branch_attempt == straight.method.branch_attempt >= 1
    for ours, theirs in ((resumed.backbone, straight.backbone), (resumed.head, straight.head)):
        for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), name


def test_eqface_three_steps_with_qwdf(tmp_path):
    # collapse_below=0: this test checks QWDF's filtering mechanics on a branch that collapses
    # on this tiny set (see the test above), not the branch's quality.
    pipeline = {"name": "eqface", "eqface": {"branch_steps": 5, "finetune_steps": 5, "s_th": 0.5,
                                             "collapse_below": 0.0}}
    cfg = config(tmp_path, "eqface", pipeline, steps=10)
    trainer = Trainer(cfg)
    backbone_before_branch = {}

    original = trainer.method.after_phase

    def spy(phase, ctx):
        if phase.stage == 1:
            backbone_before_branch.update({k: v.clone() for k, v in trainer.backbone.state_dict().items()})
        if phase.stage == 2:  # step 2 trained only the branch: the backbone is untouched
            for k, v in trainer.backbone.state_dict().items():
                assert torch.equal(v, backbone_before_branch[k]), k
        # make the QWDF threshold drop a known share: the median quality of the training set
        if phase.stage == 2:
            _, quality = ctx.score_samples()
            trainer.method.options.s_th = float(quality.median())
        original(phase, ctx)

    trainer.method.after_phase = spy
    result = trainer.run()
    assert result.global_step == 20
    assert inner_head(trainer.head).stage == 3
    assert 16 <= len(trainer.indices) < 64  # QWDF dropped the low-quality half, kept >= one step
    events = [r["message"] for r in records(tmp_path, "event")]
    assert any(m.startswith("QWDF: dropped") for m in events)
    assert [r["stage"] for r in records(tmp_path, "train")] == [1.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("rewarm", [False, True])
def test_eqface_later_steps_warm_up_only_on_request(tmp_path, rewarm):
    # Step 1 warms up over 4 steps; steps 2-3 start at their own lr (0.01) unless rewarm=True
    # repeats the warm-up (lr_k = 0.01 (k + 1) / 4).
    pipeline = {"name": "eqface", "eqface": {"branch_steps": 4, "finetune_steps": 4,
                                             "collapse_below": 0.0, "rewarm": rewarm}}
    cfg = config(tmp_path, "eqface", pipeline, steps=4, log_every=1)
    cfg.schedule.kind, cfg.schedule.warmup_steps = "constant", 4
    Trainer(cfg).run()
    lrs = {}
    for row in records(tmp_path, "train"):
        lrs.setdefault(row["stage"], []).append(row["lr"])
    assert lrs[1.0] == pytest.approx([0.05 * k / 4 for k in (1, 2, 3, 4)])
    later = [0.01 * k / 4 for k in (1, 2, 3, 4)] if rewarm else [0.01] * 4
    assert lrs[2.0] == pytest.approx(later) and lrs[3.0] == pytest.approx(later)


def test_eqface_pipeline_rejects_other_heads(tmp_path):
    with pytest.raises(PipelineError, match="eqface head"):
        Trainer(config(tmp_path, "arcface", {"name": "eqface"})).run()


def test_qgface_gets_a_second_view(tmp_path):
    cfg = config(tmp_path, "qgface", {"name": "qgface"}, steps=20, batch_size=8)
    trainer = Trainer(cfg)
    seen = []
    forward = trainer.head.forward

    def spy(embeddings, labels, **kwargs):
        seen.append(kwargs.get("second_view"))
        return forward(embeddings, labels, **kwargs)

    trainer.head.forward = spy
    trainer.run()
    assert len(seen) == 20 and all(v is not None and v.shape == (8, 16) for v in seen)
    rows = records(tmp_path, "train")
    assert rows[-1]["contrastive_active"] == 1.0 and rows[-1]["queue_filled"] > 0
    assert (tmp_path / "final.safetensors").is_file()
