"""EQFace (Liu et al. 2021): an explicit quality branch trained through the recognition loss.

Quality branch (``quality.EQFaceQuality``) on the backbone's flattened pre-embedding features
(``feature_dim`` required): FC(F -> 512) - BN - ReLU - FC(512 -> 1) - sigmoid gives s_i in (0, 1).
Loss: every logit of the combined margin (m1, m2, m3) = (1, 0.3, 0.2) is multiplied by s_i S
(S = 64), i.e. s_i is a per-sample scale, then cross-entropy. Three training steps, selected by
``head.stage``:

1. s_i = 1 in the loss (plain combined-margin training of backbone + centres). The branch still
   runs (no gradient, BN frozen) and its output is reported as the quality.
2. Only the branch learns: the head detaches embeddings and centres itself, so the loss moves
   nothing but the branch (the trainer should also freeze the backbone to save compute).
3. The branch is frozen (s_i detached, BN in eval mode) and backbone + centres are retrained
   with the quality-scaled logits: low-quality faces get a small scale, hence a flat softmax and
   small gradients - s_i acts as a per-sample weight.

``head.trainable_parameters(stage)`` lists what the trainer should optimise among the head's own
parameters (1: centres, 2: branch, 3: centres); the backbone is trained in stages 1 and 3.

Quality: s_i in (0, 1), 1 = good quality (meaningful after stage 2).
"""

from __future__ import annotations

import torch
from torch import nn

from qualiface.heads import HEADS
from qualiface.heads.base import LOCAL
from qualiface.heads.common import ClassBatch
from qualiface.heads.margins import CombinedMarginHead
from qualiface.heads.quality import EQFaceQuality

STAGES = (1, 2, 3)


@HEADS.register("eqface")
class EQFace(CombinedMarginHead):
    """EQFace; quality = branch output s_i in (0, 1), higher = better."""

    requires_features = True

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        feature_dim: int,
        m1: float = 1.0,
        m2: float = 0.3,
        m3: float = 0.2,
        scale: float = 64.0,
        hidden: int = 512,
        stage: int = 1,
    ) -> None:
        super().__init__(embedding_size, num_classes, m1=m1, m2=m2, m3=m3, scale=scale)
        self.quality_branch = EQFaceQuality(feature_dim, hidden)
        self.stage = stage

    @property
    def stage(self) -> int:
        return self._stage

    @stage.setter
    def stage(self, value: int) -> None:
        if value not in STAGES:
            raise ValueError(f"EQFace stage must be one of {STAGES}, got {value!r}")
        self._stage = int(value)
        self._sync_branch_mode()

    def train(self, mode: bool = True) -> EQFace:
        super().train(mode)
        self._sync_branch_mode()
        return self

    def _sync_branch_mode(self) -> None:
        # BN statistics of the branch only move while the branch is being trained (stage 2).
        self.quality_branch.train(self.training and self._stage == 2)

    def trainable_parameters(self, stage: int | None = None) -> list[nn.Parameter]:
        """The head's parameters to optimise in ``stage`` (default: the current stage)."""
        stage = self._stage if stage is None else stage
        if stage not in STAGES:
            raise ValueError(f"EQFace stage must be one of {STAGES}, got {stage!r}")
        if stage == 2:
            return list(self.quality_branch.parameters())
        return [self.weight]

    def forward(self, embeddings, labels, *, weight=None, local_labels=None, class_ids=None,
                reducer=LOCAL, features=None, second_view=None):
        """See ``qualiface.heads``; in stage 2 embeddings and centres are detached."""
        if self._stage == 2:
            embeddings = embeddings.detach()
            weight = (self.weight if weight is None else weight).detach()
        return super().forward(embeddings, labels, weight=weight, local_labels=local_labels,
                               class_ids=class_ids, reducer=reducer, features=features,
                               second_view=second_view)

    def branch_quality(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) features -> (B,) s_i; differentiable only in stage 2."""
        if self._stage == 2:
            return self.quality_branch(None, features)
        with torch.no_grad():
            return self.quality_branch(None, features.detach())

    def row_scale(self, batch: ClassBatch, features) -> torch.Tensor | float:
        s = self.branch_quality(features).to(batch.cos.dtype)
        batch.extras["branch_quality"] = s.detach()
        if self._stage == 1:
            return self.scale
        return self.scale * s

    def regularise(self, batch, output, *, features, second_view) -> None:
        quality = batch.extras["branch_quality"]
        output.quality = quality
        output.extras["branch_quality"] = quality
        output.metrics["mean_quality"] = quality.mean()
        output.metrics["stage"] = float(self._stage)

    def quality_estimator(self) -> EQFaceQuality:
        """A copy of the branch (eval mode): features -> s in (0, 1)."""
        estimator = EQFaceQuality(self.quality_branch.feature_dim, self.quality_branch.hidden)
        estimator.load_state_dict(self.quality_branch.state_dict())
        return estimator.to(self.weight.device).eval()
