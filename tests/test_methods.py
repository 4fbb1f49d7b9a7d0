"""The ``Method`` interface: the registry, the config sections, and adding a method in one file.

``ToyMethod`` below is a complete new method, defined the way a method file in
``qualiface.methods`` defines one: its head (a trivial subclass of an existing head, registered
under a new name), its options dataclass (read from ``pipeline.test-toy``), two phases, a
per-step hook, work between phases through the ``MethodContext``, and its quality meaning.
Nothing else in the package is touched for it to train.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from qualiface.config import ConfigError, from_dict, to_dict
from qualiface.heads import HEADS
from qualiface.heads.margins import ArcFace
from qualiface.methods import METHODS, Method, Phase, PipelineError, build_method, method_options
from qualiface.methods.base import inner_head
from qualiface.train.loop import Trainer
from stand_ins import Blobs, LinearBackbone  # noqa: F401  (registers test-linear / test-blobs)


class ToyHead(ArcFace):
    """ArcFace that counts its training forwards."""

    def __init__(self, embedding_size: int, num_classes: int, margin: float = 0.5) -> None:
        super().__init__(embedding_size, num_classes, margin=margin)
        self.forwards = 0
        self.switched = False

    def forward(self, embeddings, labels, **kwargs):
        self.forwards += 1
        return super().forward(embeddings, labels, **kwargs)


@dataclass
class ToyConfig:
    """The toy method's options (``pipeline.test-toy``)."""

    first_steps: int = 2
    switch_at: int = 1


class ToyMethod(Method):
    """Two phases; a switch on the head from step ``switch_at`` of the first; a note between."""

    name = "test-toy"
    heads = ("test-toy",)
    Config = ToyConfig
    quality_meaning = "toy: the embedding norm; higher = more recognisable"
    quality_range = (0.0, None)

    def __init__(self, head_name: str, **kwargs) -> None:
        super().__init__(head_name, **kwargs)
        self.steps_seen: list[tuple[str, int]] = []

    def phases(self) -> list[Phase]:
        first = self.options.first_steps
        return [Phase("toy-1", 0, first, self.base.lr, stage=1),
                Phase("toy-2", 0, self.base.steps - first, self.base.lr, stage=2)]

    def before_step(self, phase: Phase, step: int, head) -> None:
        self.steps_seen.append((phase.name, step))
        if phase.stage == 1 and step >= self.options.switch_at:
            inner_head(head).switched = True

    def after_phase(self, phase: Phase, ctx) -> None:
        _indices, quality = ctx.score_samples(limit=8)
        ctx.note(f"toy: {phase.name} done, {len(quality)} samples scored, "
                 f"{ctx.samples_per_step} per step")


if "test-toy" not in HEADS:
    HEADS.register("test-toy")(ToyHead)
if "test-toy" not in METHODS:
    METHODS.register("test-toy")(ToyMethod)


def config(tmp_path, head="test-toy", pipeline=None, steps=3):
    return from_dict({
        "model": {"backbone": "test-linear", "params": {}},
        "head": {"name": head, "params": {}},
        "data": {"name": "test-blobs", "params": {}, "flip": False, "num_workers": 0},
        "optim": {"lr": 0.1},
        "schedule": {"kind": "constant"},
        "pipeline": pipeline or {"name": "none"},
        "train": {"steps": steps, "batch_size": 16, "device": "cpu", "output_dir": str(tmp_path),
                  "log_every": 1, "checkpoint_every": 0, "progress": False, "seed": 3},
    })


def test_a_method_defined_in_one_place_trains(tmp_path):
    cfg = config(tmp_path, pipeline={"name": "test-toy", "test-toy": {"first_steps": 2, "switch_at": 1}})
    assert isinstance(cfg.pipeline.sections()["test-toy"], ToyConfig)
    assert to_dict(cfg)["pipeline"]["test-toy"] == {"first_steps": 2, "switch_at": 1}
    trainer = Trainer(cfg)
    assert isinstance(trainer.method, ToyMethod) and isinstance(trainer.head, ToyHead)
    result = trainer.run()
    assert result.global_step == 3
    assert trainer.method.steps_seen == [("toy-1", 0), ("toy-1", 1), ("toy-2", 0)]
    assert trainer.head.forwards == 3 and trainer.head.switched
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    notes = [r["message"] for r in rows if r["kind"] == "event"]
    assert "toy: toy-1 done, 8 samples scored, 16 per step" in notes
    assert [r["phase"] for r in rows if r["kind"] == "train"] == ["toy-1", "toy-1", "toy-2"]
    assert ToyMethod.quality_meaning in (tmp_path / "model" / "model.json").read_text()


def test_method_options_are_config_sections():
    assert {"qcface", "eqface", "qgface"} <= set(method_options())
    cfg = from_dict({"pipeline": {"name": "qcface", "qcface": {"warmup_fraction": 0.5}}})
    assert cfg.pipeline.qcface.warmup_fraction == 0.5
    assert cfg.pipeline.eqface.s_th == 0.0  # absent sections take the method's defaults
    with pytest.raises(ConfigError, match="pipeline.qcface.warmup_typo"):
        from_dict({"pipeline": {"qcface": {"warmup_typo": 1}}})
    with pytest.raises(ConfigError, match="pipeline.qcface.warmup_steps: expected an integer"):
        from_dict({"pipeline": {"qcface": {"warmup_steps": "many"}}})


@pytest.mark.parametrize(("head", "method"), [
    ("arcface", "plain"), ("adaface", "plain"), ("qcface-cur", "qcface"), ("eqface", "eqface"),
    ("qgface", "qgface"),
])
def test_every_head_name_finds_its_method(head, method):
    assert build_method(from_dict({"head": {"name": head}})).name == method


def test_a_schedule_of_another_method_is_refused():
    with pytest.raises(PipelineError, match="pipeline qcface needs the qcface head"):
        build_method(from_dict({"head": {"name": "arcface"}, "pipeline": {"name": "qcface"}}))
