"""EQFace: three steps, with the optional QWDF data filter between steps 2 and 3.

Under ``pipeline.name=eqface`` (options ``pipeline.eqface``):

1. ``eqface-1-backbone``: backbone + centres with s_i = 1 (``head.stage = 1``), for
   ``train.epochs``/``train.steps`` at ``optim.lr``;
2. ``eqface-2-branch``: the backbone is frozen (eval mode, so its BN statistics stay fixed too)
   and only the quality branch trains; afterwards the branch scores (a sample of) the training
   set: a collapsed branch (mean s below ``collapse_below``) stops the run, and with
   ``s_th > 0`` QWDF drops the samples whose quality s_i < ``s_th``;
3. ``eqface-3-finetune``: the branch is frozen and backbone + centres retrain with s_i as
   per-sample weights.

Under ``pipeline.name=none`` the head trains one plain phase in its constructor's ``stage``.
Quality: the branch output s in (0, 1) on the backbone's features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qualiface.methods import METHODS
from qualiface.methods.base import Method, MethodContext, Phase, PipelineError, inner_head

if TYPE_CHECKING:
    from torch import nn


@dataclass
class EQFaceConfig:
    """EQFace's three steps. Step 1 uses ``train.epochs``/``train.steps``; steps 2 and 3 have
    their own lengths and learning rates. ``s_th > 0`` turns on QWDF: after step 2, training
    samples with quality below ``s_th`` are dropped for step 3.

    ``collapse_below``: after step 2 the branch scores (a sample of) the training set; a mean
    quality below this stops the run with a clear error, because s_i ~ 0 scales every logit
    to ~0 and step 3 then learns nothing (its loss sits at ln C). 0 disables the check.

    ``rewarm``: repeat the schedule's learning-rate warm-up at the start of steps 2 and 3. Off
    by default: the paper describes none (steps 2-3 start from a trained backbone at a 10x lower
    lr), and a one-epoch warm-up in a short step takes most of it (60 % of a 1.7-epoch step).
    """

    branch_epochs: float = 1.0
    branch_steps: int = 0
    branch_lr: float = 0.01
    finetune_epochs: float = 1.0
    finetune_steps: int = 0
    finetune_lr: float = 0.01
    s_th: float = 0.0
    collapse_below: float = 0.01
    rewarm: bool = False


@METHODS.register("eqface")
class EQFaceMethod(Method):
    """EQFace's three steps (see the module docstring)."""

    name = "eqface"
    heads = ("eqface",)
    Config = EQFaceConfig
    needs_features = True
    quality_meaning = ("EQFace quality branch output (sigmoid over backbone features); higher = "
                       "more recognisable")
    quality_range = (0.0, 1.0)

    # Enough samples for a stable mean without scoring a whole large training set twice.
    COLLAPSE_SAMPLE = 4096

    def head_params(self, params: dict, *, feature_dim: int) -> dict:
        # The quality branch reads the backbone's features: its input size comes from there.
        return {"feature_dim": int(feature_dim), **params}

    def phases(self) -> list[Phase]:
        if not self.scheduled:
            return super().phases()
        b, e = self.base, self.options
        return [
            Phase("eqface-1-backbone", b.epochs, b.steps, b.lr, stage=1),
            Phase("eqface-2-branch", e.branch_epochs, e.branch_steps, e.branch_lr, stage=2,
                  freeze_backbone=True, warmup=e.rewarm),
            Phase("eqface-3-finetune", e.finetune_epochs, e.finetune_steps, e.finetune_lr, stage=3,
                  warmup=e.rewarm),
        ]

    def enter_phase(self, phase: Phase, backbone: nn.Module, head: nn.Module,
                    steps_per_epoch: int) -> None:
        if phase.stage is not None:
            inner_head(head).stage = phase.stage
        super().enter_phase(phase, backbone, head, steps_per_epoch)

    def trainable(self, phase: Phase, backbone: nn.Module, head: nn.Module) -> list[tuple[str, nn.Parameter]]:
        if phase.stage is None:
            return super().trainable(phase, backbone, head)
        wanted = {id(p) for p in inner_head(head).trainable_parameters(phase.stage)}
        named = []
        if not phase.freeze_backbone:
            named += [(f"backbone.{n}", p) for n, p in backbone.named_parameters() if p.requires_grad]
        named += [(f"head.{n}", p) for n, p in head.named_parameters() if id(p) in wanted]
        return named

    def after_phase(self, phase: Phase, ctx: MethodContext) -> None:
        eq = self.options
        s_th = eq.s_th
        if phase.stage != 2 or (s_th <= 0 and eq.collapse_below <= 0):
            return
        limit = None if s_th > 0 else self.COLLAPSE_SAMPLE
        indices, quality = ctx.score_samples(limit=limit)
        mean = float(quality.mean()) if len(quality) else 0.0
        if eq.collapse_below > 0 and mean < eq.collapse_below:
            raise PipelineError(
                f"EQFace step 2 collapsed: the quality branch gives a mean s = {mean:.2g} over "
                f"{len(quality)} training samples (below pipeline.eqface.collapse_below="
                f"{eq.collapse_below:g}); s scales every logit, so step 3 would learn nothing "
                f"(loss stuck at ln C). Restart from the step-1 checkpoint with a lower "
                f"pipeline.eqface.branch_lr or a shorter step 2 (branch_epochs/branch_steps)"
            )
        ctx.note(f"EQFace step 2: mean quality s = {mean:.3f} over {len(quality)} samples")
        if s_th <= 0:
            return
        keep = indices[quality >= s_th]
        if len(keep) < ctx.samples_per_step:
            raise PipelineError(
                f"QWDF with s_th={s_th} keeps {len(keep)} of {len(indices)} training samples, fewer "
                f"than one optimizer step ({ctx.samples_per_step}); lower pipeline.eqface.s_th"
            )
        ctx.set_training_subset(keep)
        dropped = len(indices) - len(keep)
        ctx.note(f"QWDF: dropped {dropped} of {len(indices)} training samples with quality < {s_th} "
                 f"({len(keep)} kept for step 3)")
