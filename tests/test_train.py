"""Training engine: optimizer param groups, gradient accumulation, NaN skipping, loop outputs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from qualiface.backbones import BACKBONES
from qualiface.config import OptimConfig, from_dict
from qualiface.train.loop import Trainer, TrainingError
from qualiface.train.optim import build_optimizer, split_decay
from stand_ins import Blobs, LinearBackbone  # noqa: F401  (registers test-linear / test-blobs)


def tiny_config(tmp_path, **train):
    settings = {"steps": 3, "batch_size": 16, "device": "cpu", "output_dir": str(tmp_path),
                "log_every": 1, "checkpoint_every": 0, "progress": False, "seed": 3}
    settings.update(train)
    return from_dict({
        "model": {"backbone": "test-linear", "params": {}},
        "head": {"name": "arcface", "params": {}},
        "data": {"name": "test-blobs", "params": {}, "flip": False},
        "optim": {"lr": 0.5},
        "schedule": {"kind": "constant"},
        "train": settings,
    })


def test_weight_decay_only_on_weight_matrices():
    from qualiface.backbones import build_backbone

    backbone = build_backbone("iresnet-nano", input_size=32)
    optimizer = build_optimizer([backbone], OptimConfig(weight_decay=5e-4))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"])
    no_decay_ids = {id(p) for p in no_decay["params"]}
    for module in backbone.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.PReLU)):
            for p in module.parameters():
                if p.requires_grad:
                    assert id(p) in no_decay_ids
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            assert id(module.bias) in no_decay_ids
    frozen = [p for p in backbone.parameters() if not p.requires_grad]
    assert not {id(p) for p in frozen} & {id(p) for g in optimizer.param_groups for p in g["params"]}
    # behaviour: with zero gradients only decayed tensors move
    bn = backbone.bn1.weight.detach().clone()
    conv = backbone.conv1.weight.detach().clone()
    for p in backbone.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert torch.equal(backbone.bn1.weight, bn)
    assert torch.allclose(backbone.conv1.weight, conv * (1 - 0.1 * 5e-4))


def test_split_decay_skips_frozen_and_duplicates():
    layer = nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    decay, no_decay = split_decay([("w", layer.weight), ("w_again", layer.weight), ("b", layer.bias)])
    assert decay == [layer.weight] and no_decay == []


def _accumulation_pair(tmp_path):
    big = Trainer(tiny_config(tmp_path / "big", batch_size=16, grad_accum=1))
    big.run()
    small = Trainer(tiny_config(tmp_path / "small", batch_size=8, grad_accum=2))
    small.run()
    assert big.global_step == small.global_step == 3  # the schedule counts optimizer steps
    pairs = [(f"backbone.{name}", a, b) for (name, a), b in
             zip(big.backbone.state_dict().items(), small.backbone.state_dict().values())]
    pairs.append(("head.weight", big.head.weight.detach(), small.head.weight.detach()))
    # and the run actually trained (the comparison is not between two untouched models)
    fresh = BACKBONES.build("test-linear").to(big.backbone.fc.weight.dtype)
    assert not torch.allclose(fresh.fc.weight, big.backbone.fc.weight)
    return pairs


def _worst_relative_gap(pairs) -> tuple[str, float]:
    """Largest |a - b| of a tensor, relative to that tensor's largest magnitude."""
    gaps = {name: ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()
            for name, a, b in pairs}
    name = max(gaps, key=gaps.get)
    return name, gaps[name]


def test_grad_accumulation_equals_large_batch_exactly_in_float64(tmp_path):
    # In float64 the two runs may differ only by float64 rounding (measured 2.9e-16 relative):
    # any real accumulation error (a wrong loss scale, a missed micro-batch, a step per
    # micro-batch) is orders of magnitude larger.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pairs = _accumulation_pair(tmp_path)
    finally:
        torch.set_default_dtype(previous)
    assert all(a.dtype == torch.float64 for _, a, _ in pairs)
    name, gap = _worst_relative_gap(pairs)
    assert gap < 1e-12, (name, gap)


def test_grad_accumulation_equals_large_batch_in_float32(tmp_path):
    # float32 sums the 16 per-sample gradients in another order (one sum of 16 versus two sums
    # of 8 added), so each update carries rounding of about eps32 = 1.2e-7 times the size of the
    # gradient terms, which at lr 0.5 are as large as the weights: worst measured gap 4.6e-7 of
    # a tensor's scale (fc.bias). Element-wise rtol fails for weights near zero (the old
    # atol=1e-6 check failed by 8.6e-6 on every run), so the bound is relative to each
    # tensor's scale, 100x the measured gap: a lost micro-batch moves weights by ~1e-1.
    name, gap = _worst_relative_gap(_accumulation_pair(tmp_path))
    assert gap < 5e-5, (name, gap)


def _poison(trainer, bad_calls):
    """Make the head return a NaN loss on the given forward calls (0-based)."""
    forward = trainer.head.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if calls["n"] in bad_calls:
            out.loss = out.loss * float("nan")
        calls["n"] += 1
        return out

    trainer.head.forward = poisoned


def test_nan_step_is_skipped_and_logged(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, steps=4))
    _poison(trainer, bad_calls={1})
    before = {}

    original_step = trainer.train_step

    def spy(batches):
        before[trainer.global_step] = trainer.backbone.fc.weight.detach().clone()
        return original_step(batches)

    trainer.train_step = spy
    trainer.run()
    assert trainer.global_step == 4
    # the skipped step (global step 1 -> 2) left the weights as they were
    assert torch.equal(before[1], before[2])
    assert not torch.equal(before[2], before[3])
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "event" and "non-finite" in e["message"] for e in events)
    assert torch.isfinite(trainer.backbone.fc.weight).all()


def test_training_stops_after_consecutive_nan_steps(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, steps=10, max_nonfinite_steps=3))
    _poison(trainer, bad_calls=set(range(100)))
    with pytest.raises(TrainingError, match="3 consecutive steps"):
        trainer.run()
    assert trainer.global_step == 3


def test_run_writes_config_metrics_and_weights(tmp_path):
    from safetensors.torch import load_file

    result = Trainer(tiny_config(tmp_path, steps=2)).run()
    assert (tmp_path / "config.yaml").is_file()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2]
    assert {"loss", "acc", "norm", "lr", "images_per_s"} <= set(train_records[0])
    weights = load_file(result.final_weights)
    assert "backbone.fc.weight" in weights and "head.weight" in weights
    html = (tmp_path / "report" / "report.html").read_text()
    assert 'alt="training loss"' in html and (tmp_path / "report" / "training_loss.png").is_file()


def test_training_plots_follow_the_logged_records():
    from qualiface.train.report import loss_curve, training_plots

    records = [
        {"kind": "train", "step": 1, "loss": 5.0, "identity_loss": 5.0, "norm_phase": 0.0,
         "acc": 0.1, "norm": 20.0, "lr": 0.1},
        {"kind": "event", "step": 1, "message": "phase change"},
        {"kind": "train", "step": 2, "loss": 9.0, "identity_loss": 4.0, "norm_phase": 1.0,
         "acc": 0.2, "norm": 18.0, "lr": 0.05},
        {"kind": "val", "step": 2, "val_accuracy": 0.7, "val_auc": 0.8},
    ]
    curve = loss_curve(records)
    assert curve == {"step": [1, 2], "loss": [5.0, 9.0], "identity_loss": [5.0, 4.0],
                     "norm_prior_from": 2, "phase_changes": [[2, "norm regulariser on"]]}
    plots = training_plots(records)
    assert set(plots) == {"training loss", "training accuracy", "mean feature norm",
                          "learning rate", "held-out verification"}
    assert set(plots["training loss"]["series"]) == {"total loss", "identity (margin) loss"}
    for plot in plots.values():  # the phase change is marked on every curve
        assert plot["markers"] == [(2, "norm regulariser on")]
    assert plots["learning rate"]["series"]["lr"] == ((1, 2), (0.1, 0.05))
    assert plots["held-out verification"]["series"]["val_auc"] == ((2,), (0.8,))
    assert training_plots([]) == {}


def _refuse_constant(name):
    raise ValueError(f"bare {name} is not JSON")


def test_undefined_metrics_are_logged_as_null_on_strict_json_lines(tmp_path):
    from qualiface.train.logging import MetricsLogger, read_metrics
    from qualiface.train.report import training_plots

    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(2, {"val_accuracy": 0.75, "val_auc": float("nan"), "val_tar@far=1e-03": float("nan"),
                   "val_eer": float("inf")}, kind="val")
    logger.log(4, {"val_accuracy": 0.8, "val_auc": 0.9}, kind="val")
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "NaN" not in lines[0] and '"nan"' not in lines[0]
    first = json.loads(lines[0], parse_constant=_refuse_constant)  # NaN/Infinity would raise
    assert json.loads(lines[1], parse_constant=_refuse_constant)["val_auc"] == 0.9
    assert first["val_auc"] is None and first["val_tar@far=1e-03"] is None
    assert first["val_eer"] == "inf" and first["val_accuracy"] == 0.75
    records = read_metrics(tmp_path / "metrics.jsonl")
    series = training_plots(records)["held-out verification"]["series"]
    assert series["val_auc"] == ((4,), (0.9,))  # the null point is left out of the curve
    assert series["val_accuracy"] == ((2, 4), (0.75, 0.8))


class HostReadCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operations that make the host wait for the device on a GPU: reading a value
    (``item``/``float``/``int``/``bool`` -> ``_local_scalar_dense``, ``tolist``) and ops whose
    output size depends on the data (``nonzero``, boolean-mask indexing, ``unique``). On the CPU
    they cost nothing, but counting them here catches a sync before it reaches a GPU run."""

    DATA_DEPENDENT = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select",
                      "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
                      "aten::equal", "aten::is_nonzero")

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        boolean_index = name == "aten::index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        )
        if name in self.DATA_DEPENDENT or boolean_index:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("head", ["arcface", "adaface", "curricular", "magface", "qcface"])
def test_train_step_reads_the_device_once(tmp_path, monkeypatch, head):
    from qualiface.heads.common import CosineHead

    cfg = tiny_config(tmp_path, grad_accum=2, batch_size=8)
    cfg.head.name = head
    trainer = Trainer(cfg)
    phase = trainer.method.phases()[-1]
    trainer.prepare_phase(phase)
    # The label checks read the host on CPU tensors only (free there); take the accelerator
    # path to see what a GPU step pays.
    check = CosineHead.check_index_range
    monkeypatch.setattr(CosineHead, "check_index_range", staticmethod(
        lambda values, low, high, what, on_host: check(values, low, high, what, on_host=False)))
    tolist = torch.Tensor.tolist
    counter = HostReadCounter()

    def counting_tolist(tensor):
        counter.reads.append("tolist")
        return tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    images = trainer.dataset.images[:8]
    labels = trainer.dataset.labels[:8]
    before = trainer.backbone.fc.weight.detach().clone()
    with counter:
        metrics = trainer.train_step([(images, labels), (images.flip(0), labels.flip(0))])
    assert counter.reads == ["tolist"]  # the skip decision, nothing else
    assert not torch.equal(before, trainer.backbone.fc.weight)  # the step was taken
    assert {"loss", "norm", "acc", "accuracy", "mean_norm"} <= set(metrics)
    for key, value in metrics.items():
        assert isinstance(value, float) or (isinstance(value, torch.Tensor) and value.dim() == 0), key


def test_metrics_reach_the_host_as_the_head_computed_them(tmp_path):
    from qualiface.train.loop import metrics_to_host

    values = {"a": torch.tensor(0.1, dtype=torch.float32), "b": 2.5, "c": torch.tensor(3),
              "phase": "main", "d": torch.tensor(1 / 3, dtype=torch.float64)}
    host = metrics_to_host(values)
    assert list(host) == list(values)
    assert host == {"a": float(values["a"]), "b": 2.5, "c": 3.0, "phase": "main", "d": 1 / 3}
    assert all(type(v) in (float, str) for v in host.values())

    result = Trainer(tiny_config(tmp_path, steps=2, grad_accum=2, batch_size=8)).run()
    assert result.last_metrics and all(
        isinstance(v, (int, float, str)) for v in result.last_metrics.values())
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if r["kind"] == "train"][-1]
    assert last["loss"] == result.last_metrics["loss"] and last["acc"] == result.last_metrics["acc"]


def test_images_per_s_leaves_validation_and_checkpoint_time_out(tmp_path, monkeypatch):
    # A fake clock: each training step takes 1 s, each validation 100 s, each checkpoint 10 s.
    # The truth is 16 images per 1 s step; the old window counted the validation and the
    # checkpoint after each logged step too, so every record after the first said 0.144 img/s.
    import time
    from types import SimpleNamespace

    from qualiface.train import logging as train_logging

    clock = {"t": 0.0}
    monkeypatch.setattr(train_logging, "time", SimpleNamespace(perf_counter=lambda: clock["t"], time=time.time))
    trainer = Trainer(tiny_config(tmp_path, steps=4, eval_every=1, checkpoint_every=1))

    def timed(function, seconds):
        def run(*args, **kwargs):
            clock["t"] += seconds
            return function(*args, **kwargs)
        return run

    trainer.train_step = timed(trainer.train_step, 1.0)
    trainer.validate = timed(lambda: {}, 100.0)
    trainer.save_checkpoint = timed(lambda: None, 10.0)
    trainer._finish = lambda validation: None  # the model package and report: not timed, slow
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in records if r["kind"] == "train"]
    assert rates == pytest.approx([16.0] * 4)
