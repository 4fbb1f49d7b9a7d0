"""EQFace: three steps, with the optional QWDF data filter between steps 2 and 3.

Under ``pipeline.name=eqface`` (options ``pipeline.eqface``):

1. ``eqface-1-backbone``: backbone + centres with s_i = 1 (``head.stage = 1``), for
   ``train.epochs``/``train.steps`` at ``optim.lr``;
2. ``eqface-2-branch``: the backbone is frozen (eval mode, so its BN statistics stay fixed too)
   and only the quality branch trains; afterwards the branch scores (a sample of) the training
   set. A collapsed branch (mean s below ``collapse_below``) is re-initialised and step 2 runs
   again at a tenth of its learning rate, up to ``COLLAPSE_RETRIES`` times, then the run stops
   with a clear error; step 1's training is never lost to a retry (the backbone and centres
   are frozen in step 2, so restarting step 2 needs nothing but a fresh branch). With
   ``s_th > 0`` QWDF then drops the samples whose quality s_i < ``s_th``;
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
    quality below this means the branch collapsed: s_i ~ 0 scales every logit to ~0 and step 3
    would learn nothing (its loss sits at ln C). Step 2 then restarts from a fresh branch at a
    tenth of its lr (``EQFaceMethod.COLLAPSE_RETRIES`` times at most, then a clear error).
    0 disables the check.

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
    # A collapsed step 2 restarts from a fresh branch at RETRY_LR_FACTOR times its last lr, at
    # most this often: the paper traces the collapse to a too-fast branch, and two tenfold
    # cuts cover a hundredfold range without turning a real failure into an endless loop.
    COLLAPSE_RETRIES = 2
    RETRY_LR_FACTOR = 0.1

    def __init__(self, head_name: str, **kwargs) -> None:
        super().__init__(head_name, **kwargs)
        self.branch_attempt = 0  # restarts of step 2 after a collapse so far
        self.reset_branch = False  # the next entry into step 2 starts from a fresh branch

    def state_dict(self) -> dict:
        return {"branch_attempt": self.branch_attempt, "reset_branch": self.reset_branch}

    def load_state_dict(self, state: dict) -> None:
        self.branch_attempt = int(state.get("branch_attempt", 0))
        self.reset_branch = bool(state.get("reset_branch", False))

    def branch_lr(self) -> float:
        """Step 2's learning rate for the current attempt."""
        return self.options.branch_lr * self.RETRY_LR_FACTOR ** self.branch_attempt

    def head_params(self, params: dict, *, feature_dim: int) -> dict:
        # The quality branch reads the backbone's features: its input size comes from there.
        return {"feature_dim": int(feature_dim), **params}

    def phases(self) -> list[Phase]:
        if not self.scheduled:
            return super().phases()
        b, e = self.base, self.options
        return [
            Phase("eqface-1-backbone", b.epochs, b.steps, b.lr, stage=1),
            Phase("eqface-2-branch", e.branch_epochs, e.branch_steps, self.branch_lr(), stage=2,
                  freeze_backbone=True, warmup=e.rewarm),
            Phase("eqface-3-finetune", e.finetune_epochs, e.finetune_steps, e.finetune_lr, stage=3,
                  warmup=e.rewarm),
        ]

    def enter_phase(self, phase: Phase, backbone: nn.Module, head: nn.Module,
                    steps_per_epoch: int) -> None:
        if phase.stage is not None:
            inner_head(head).stage = phase.stage
        if phase.stage == 2 and self.reset_branch:
            # Seeded by the attempt, so a resumed run draws the same fresh branch.
            reinitialise(inner_head(head).quality_branch, seed=self.branch_attempt)
            self.reset_branch = False
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

    def after_phase(self, phase: Phase, ctx: MethodContext) -> bool:
        eq = self.options
        s_th = eq.s_th
        if phase.stage != 2 or (s_th <= 0 and eq.collapse_below <= 0):
            return False
        limit = None if s_th > 0 else self.COLLAPSE_SAMPLE
        indices, quality = ctx.score_samples(limit=limit)
        mean = float(quality.mean()) if len(quality) else 0.0
        if eq.collapse_below > 0 and mean < eq.collapse_below:
            collapsed = (f"EQFace step 2 collapsed at lr {phase.lr:g}: the quality branch gives a "
                         f"mean s = {mean:.2g} over {len(quality)} training samples (below "
                         f"pipeline.eqface.collapse_below={eq.collapse_below:g})")
            if self.branch_attempt < self.COLLAPSE_RETRIES:
                self.branch_attempt += 1
                self.reset_branch = True
                ctx.note(f"{collapsed}; restarting step 2 from a fresh branch at lr "
                         f"{self.branch_lr():g} (retry {self.branch_attempt} of "
                         f"{self.COLLAPSE_RETRIES})")
                return True
            raise PipelineError(
                f"{collapsed}, after {self.COLLAPSE_RETRIES} restarts at ever lower lr; s scales "
                f"every logit, so step 3 would learn nothing (loss stuck at ln C). Train again "
                f"(a new output folder) with a lower pipeline.eqface.branch_lr or a shorter "
                f"step 2 (branch_epochs/branch_steps), or check that step 1 learned (its "
                f"training accuracy in metrics.jsonl)"
            )
        ctx.note(f"EQFace step 2: mean quality s = {mean:.3f} over {len(quality)} samples")
        if s_th <= 0:
            return False
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
        return False


def reinitialise(branch: nn.Module, seed: int) -> None:
    """Re-draw ``branch``'s layers with PyTorch's own default initialisation
    (``reset_parameters``), from the random state seeded with ``seed``; the global random
    state is restored afterwards, so the rest of the run draws as it would have."""
    import torch  # lazy: methods/ imports no torch at import time (the config parser reads it)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in branch.modules():
            if module is not branch and hasattr(module, "reset_parameters"):
                module.reset_parameters()
