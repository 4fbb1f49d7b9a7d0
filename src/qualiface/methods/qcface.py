"""QCFace: margin training with a warm-up, then the norm-prior regulariser.

Heads ``qcface`` (ArcFace margin), ``qcface-cur`` (CurricularFace) and ``qcface-mv``
(MV-Softmax) share the norm prior (``heads.qcface``). Under ``pipeline.name=qcface`` the head's
``norm_phase`` is off for the warm-up steps (``pipeline.qcface``), then on; under ``none`` the
head keeps its own ``norm_phase`` (on by default) throughout. Quality: the recognisability p in
[0, 1] read back from the embedding norm by inverting the prior.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qualiface.methods import METHODS
from qualiface.methods.base import Method, Phase, PipelineError, inner_head, warmup_length

if TYPE_CHECKING:
    from torch import nn


@dataclass
class QCFaceConfig:
    """QCFace warm-up: plain margin training, then the norm regulariser (``head.norm_phase``)
    is switched on. The length is ``warmup_steps`` when > 0, else ``warmup_fraction`` of the
    run's steps when > 0, else ``warmup_epochs``. A warm-up as long as the run would leave the
    regulariser (QCFace's defining term) off throughout: the trainer refuses it."""

    warmup_epochs: float = 0.0
    warmup_steps: int = 0
    warmup_fraction: float = 0.0


@METHODS.register("qcface", "qcface-cur", "qcface-mv")
class QCFaceMethod(Method):
    """Margin-only warm-up, then the norm regulariser (``head.norm_phase = True``)."""

    name = "qcface"
    heads = ("qcface", "qcface-cur", "qcface-mv")
    Config = QCFaceConfig
    quality_meaning = ("QCFace recognizability p, recovered from the embedding norm by inverting "
                       "the QCFace norm prior; higher = more recognisable")
    quality_range = (0.0, 1.0)

    def __init__(self, head_name: str, **kwargs) -> None:
        super().__init__(head_name, **kwargs)
        self._warmup_steps: int | None = None

    def warmup(self, steps_per_epoch: int, total_steps: int) -> int:
        """The norm warm-up in optimizer steps for a phase of ``total_steps``."""
        q = self.options
        return warmup_length(q.warmup_steps, q.warmup_fraction, q.warmup_epochs,
                             steps_per_epoch, total_steps)

    def describe(self, phase: Phase, steps_per_epoch: int, total_steps: int) -> list[str]:
        if not self.scheduled:
            return []
        return [f"norm warm-up {self.warmup(steps_per_epoch, total_steps):,} steps"]

    def enter_phase(self, phase: Phase, backbone: nn.Module, head: nn.Module,
                    steps_per_epoch: int) -> None:
        """Fix the warm-up in steps for this phase; refuse one that never ends."""
        super().enter_phase(phase, backbone, head, steps_per_epoch)
        if not self.scheduled:
            return
        q = self.options
        total_steps = phase.total_steps(steps_per_epoch)
        self._warmup_steps = self.warmup(steps_per_epoch, total_steps)
        if self._warmup_steps >= total_steps:
            raise PipelineError(
                f"QCFace's norm regulariser would never switch on: the warm-up "
                f"(pipeline.qcface: warmup_steps={q.warmup_steps}, warmup_fraction="
                f"{q.warmup_fraction:g}, warmup_epochs={q.warmup_epochs:g}) is "
                f"{self._warmup_steps} steps and the run has {total_steps}; shorten the "
                f"warm-up (e.g. pipeline.qcface.warmup_fraction=0.1) or lengthen the run"
            )

    def before_step(self, phase: Phase, step: int, head: nn.Module) -> None:
        if not self.scheduled:
            return
        if self._warmup_steps is None:
            raise RuntimeError("QCFaceMethod.enter_phase was not called")
        inner_head(head).norm_phase = step >= self._warmup_steps
