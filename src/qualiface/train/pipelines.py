"""Method pipelines: how a method's training is split into phases and what changes per step.

The training loop (``train.loop``) knows nothing about methods. It asks the pipeline for:

* ``phases()``: the list of ``Phase`` objects run one after the other (each resumable: the
  checkpoint records the phase index and the step inside it);
* ``enter_phase(phase, backbone, head)``: set the head's stage and freeze what must not train;
* ``trainable(phase, backbone, head)``: the ``(name, parameter)`` pairs the optimizer updates;
* ``before_step(phase, step, head)``: per-step switches (QCFace's ``norm_phase``);
* ``second_view(images, generator)``: the degraded view for heads that
  ``requires_second_view`` (QGFace);
* ``after_phase(phase, trainer)``: work between phases (EQFace's QWDF data filter).

Pipelines:

``none``   one phase; any head.
``qcface`` one phase; the head's ``norm_phase`` is off for the warm-up steps, then on.
``eqface`` three phases: step 1 trains backbone + centres with s_i = 1 (``head.stage = 1``);
           step 2 freezes the backbone (eval mode, so its BN statistics stay fixed too) and
           trains only the quality branch; optional QWDF drops training samples whose quality
           s_i < ``s_th``; step 3 freezes the branch and retrains backbone + centres with s_i as
           per-sample weights.
``qgface`` one phase; every batch gets a low-quality view from the degradation preset, and
           the head receives its embeddings as ``second_view`` (the delayed start of the
           contrastive term is the head's ``contrastive_start_step`` parameter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qualiface.errors import QualifaceError


class PipelineError(QualifaceError, ValueError):
    """A pipeline that does not fit the chosen head (e.g. ``eqface`` with an ArcFace head)."""


@dataclass(frozen=True)
class Phase:
    """One stretch of training with a fixed set of trainable parameters.

    ``steps > 0`` fixes the length; otherwise ``epochs`` of the (current) training set.
    """

    name: str
    epochs: float
    steps: int
    lr: float
    stage: int | None = None
    freeze_backbone: bool = False

    def total_steps(self, steps_per_epoch: int) -> int:
        if self.steps > 0:
            return self.steps
        return max(1, round(self.epochs * steps_per_epoch))


def warmup_length(steps: int, fraction: float, epochs: float, steps_per_epoch: int,
                  total_steps: int) -> int:
    """A warm-up in optimizer steps: ``steps`` when > 0, else ``fraction`` of ``total_steps``
    when > 0, else ``epochs`` of ``steps_per_epoch``."""
    if steps > 0:
        return int(steps)
    if fraction > 0:
        return int(round(fraction * total_steps))
    return int(round(epochs * steps_per_epoch))


def inner_head(head: nn.Module) -> nn.Module:
    """The method head itself (unwraps a ``ShardedHead``, which keeps it as ``.head``)."""
    return getattr(head, "head", head)


class Pipeline:
    """The plain pipeline (``none``): one phase training backbone and head together."""

    name = "none"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self._degrader = None

    def phases(self) -> list[Phase]:
        t = self.cfg.train
        return [Phase("train", t.epochs, t.steps, self.cfg.optim.lr)]

    def enter_phase(self, phase: Phase, backbone: nn.Module, head: nn.Module) -> None:
        set_frozen(backbone, phase.freeze_backbone)
        # A frozen backbone also runs in eval mode so its BN running statistics stay fixed.
        backbone.train(not phase.freeze_backbone)
        head.train()

    def trainable(self, phase: Phase, backbone: nn.Module, head: nn.Module) -> list[tuple[str, nn.Parameter]]:
        named = [(f"backbone.{n}", p) for n, p in backbone.named_parameters()]
        named += [(f"head.{n}", p) for n, p in head.named_parameters()]
        return [(n, p) for n, p in named if p.requires_grad]

    def before_step(self, phase: Phase, step: int, head: nn.Module) -> None:
        """Called before every optimizer step (``step`` counts within the phase)."""

    def after_phase(self, phase: Phase, trainer) -> None:
        """Called once a phase has finished (not on resume into a later phase)."""

    def describe(self, phase: Phase, steps_per_epoch: int, total_steps: int) -> list[str]:
        """What the pipeline switches during ``phase``, in steps, for the start-up summary."""
        return []

    def second_view(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A degraded uint8 copy of ``images`` (B, 3, H, W) for heads that need two views.

        Degradation runs on the CPU with the (CPU) augmentation generator: JPEG needs the CPU
        anyway, and one generator keeps the view reproducible on any device.
        """
        if self._degrader is None:
            from qualiface.data import degrade

            name = self.cfg.pipeline.qgface.lq_preset
            presets = {"qgface": degrade.qgface_lq_config}
            if name not in presets:
                raise PipelineError(f"unknown lq_preset '{name}' (known: {', '.join(presets)})")
            self._degrader = degrade.CompositeDegradation(presets[name]())
        degraded, _severity = self._degrader(images.cpu(), generator=generator)
        return degraded.to(images.device)


def set_frozen(module: nn.Module, frozen: bool) -> None:
    """Freeze all parameters of ``module``, or restore their original ``requires_grad``.

    Some backbones keep parameters frozen by design (e.g. the embedding BN's scale), so
    unfreezing restores the flags recorded the first time instead of thawing everything.
    """
    if not hasattr(module, "_qualiface_trainable"):
        module._qualiface_trainable = {n: p.requires_grad for n, p in module.named_parameters()}
    for name, param in module.named_parameters():
        param.requires_grad_(False if frozen else module._qualiface_trainable.get(name, True))


class QCFacePipeline(Pipeline):
    """QCFace: margin-only warm-up, then the norm regulariser (``head.norm_phase = True``)."""

    name = "qcface"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._warmup_steps: int | None = None

    def warmup(self, steps_per_epoch: int, total_steps: int) -> int:
        """The norm warm-up in optimizer steps for a phase of ``total_steps``."""
        q = self.cfg.pipeline.qcface
        return warmup_length(q.warmup_steps, q.warmup_fraction, q.warmup_epochs,
                             steps_per_epoch, total_steps)

    def describe(self, phase: Phase, steps_per_epoch: int, total_steps: int) -> list[str]:
        return [f"norm warm-up {self.warmup(steps_per_epoch, total_steps):,} steps"]

    def resolve(self, steps_per_epoch: int, total_steps: int) -> None:
        """Fix the warm-up in steps for a phase of ``total_steps``; refuse one that never ends."""
        q = self.cfg.pipeline.qcface
        self._warmup_steps = self.warmup(steps_per_epoch, total_steps)
        if self._warmup_steps >= total_steps:
            raise PipelineError(
                f"QCFace's norm regulariser would never switch on: the warm-up "
                f"(pipeline.qcface: warmup_steps={q.warmup_steps}, warmup_fraction="
                f"{q.warmup_fraction:g}, warmup_epochs={q.warmup_epochs:g}) is "
                f"{self._warmup_steps} steps and the run has {total_steps}; shorten the "
                f"warm-up (e.g. pipeline.qcface.warmup_fraction=0.1) or lengthen the run"
            )

    def enter_phase(self, phase: Phase, backbone: nn.Module, head: nn.Module) -> None:
        if not hasattr(inner_head(head), "norm_phase"):
            raise PipelineError(
                f"pipeline qcface needs a head with a norm_phase switch (qcface, qcface-cur, "
                f"qcface-mv), not {type(inner_head(head)).__name__}"
            )
        super().enter_phase(phase, backbone, head)

    def before_step(self, phase: Phase, step: int, head: nn.Module) -> None:
        if self._warmup_steps is None:
            raise RuntimeError("QCFacePipeline.resolve(steps_per_epoch) was not called")
        inner_head(head).norm_phase = step >= self._warmup_steps


class EQFacePipeline(Pipeline):
    """EQFace's three steps (see the module docstring), with optional QWDF between 2 and 3."""

    name = "eqface"

    def phases(self) -> list[Phase]:
        t, e = self.cfg.train, self.cfg.pipeline.eqface
        return [
            Phase("eqface-1-backbone", t.epochs, t.steps, self.cfg.optim.lr, stage=1),
            Phase("eqface-2-branch", e.branch_epochs, e.branch_steps, e.branch_lr, stage=2, freeze_backbone=True),
            Phase("eqface-3-finetune", e.finetune_epochs, e.finetune_steps, e.finetune_lr, stage=3),
        ]

    def enter_phase(self, phase: Phase, backbone: nn.Module, head: nn.Module) -> None:
        method = inner_head(head)
        if not hasattr(method, "stage") or not hasattr(method, "trainable_parameters"):
            raise PipelineError(f"pipeline eqface needs the eqface head, not {type(method).__name__}")
        method.stage = phase.stage
        super().enter_phase(phase, backbone, head)

    def trainable(self, phase: Phase, backbone: nn.Module, head: nn.Module) -> list[tuple[str, nn.Parameter]]:
        method = inner_head(head)
        wanted = {id(p) for p in method.trainable_parameters(phase.stage)}
        named = []
        if not phase.freeze_backbone:
            named += [(f"backbone.{n}", p) for n, p in backbone.named_parameters() if p.requires_grad]
        named += [(f"head.{n}", p) for n, p in head.named_parameters() if id(p) in wanted]
        return named

    # Enough samples for a stable mean without scoring a whole large training set twice.
    COLLAPSE_SAMPLE = 4096

    def after_phase(self, phase: Phase, trainer) -> None:
        eq = self.cfg.pipeline.eqface
        s_th = eq.s_th
        if phase.stage != 2 or (s_th <= 0 and eq.collapse_below <= 0):
            return
        limit = None if s_th > 0 else self.COLLAPSE_SAMPLE
        indices, quality = trainer.score_training_set(limit=limit)
        mean = float(quality.mean()) if len(quality) else 0.0
        if eq.collapse_below > 0 and mean < eq.collapse_below:
            raise PipelineError(
                f"EQFace step 2 collapsed: the quality branch gives a mean s = {mean:.2g} over "
                f"{len(quality)} training samples (below pipeline.eqface.collapse_below="
                f"{eq.collapse_below:g}); s scales every logit, so step 3 would learn nothing "
                f"(loss stuck at ln C). Restart from the step-1 checkpoint with a lower "
                f"pipeline.eqface.branch_lr or a shorter step 2 (branch_epochs/branch_steps)"
            )
        trainer.logger.note(trainer.global_step,
                            f"EQFace step 2: mean quality s = {mean:.3f} over {len(quality)} samples")
        if s_th <= 0:
            return
        keep = indices[quality >= s_th]
        if len(keep) < trainer.samples_per_step:
            raise PipelineError(
                f"QWDF with s_th={s_th} keeps {len(keep)} of {len(indices)} training samples, fewer "
                f"than one optimizer step ({trainer.samples_per_step}); lower pipeline.eqface.s_th"
            )
        trainer.set_training_subset(keep)
        dropped = len(indices) - len(keep)
        trainer.logger.note(
            trainer.global_step,
            f"QWDF: dropped {dropped} of {len(indices)} training samples with quality < {s_th} "
            f"({len(keep)} kept for step 3)",
        )


class QGFacePipeline(Pipeline):
    """QGFace joint training: the base pipeline already supplies the LQ second view."""

    name = "qgface"

    def enter_phase(self, phase: Phase, backbone: nn.Module, head: nn.Module) -> None:
        if not getattr(inner_head(head), "requires_second_view", False):
            raise PipelineError(f"pipeline qgface needs the qgface head, not {type(inner_head(head)).__name__}")
        super().enter_phase(phase, backbone, head)


PIPELINES = {p.name: p for p in (Pipeline, QCFacePipeline, EQFacePipeline, QGFacePipeline)}


def build_pipeline(cfg) -> Pipeline:
    """The pipeline named by ``cfg.pipeline.name``."""
    try:
        return PIPELINES[cfg.pipeline.name](cfg)
    except KeyError:
        raise PipelineError(f"unknown pipeline '{cfg.pipeline.name}' (known: {', '.join(PIPELINES)})") from None
