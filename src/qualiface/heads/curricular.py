"""CurricularFace (Huang et al. 2020): ArcFace target plus adaptively re-weighted hard negatives.

Target: ``s cos(t_y + m)`` (m = 0.5, with the ``arc_margin`` fallback). A negative j is *hard*
when ``cos t_j`` exceeds the margined target cosine; hard negatives become
``cos t_j (T + cos t_j)``, easy ones stay ``cos t_j``. T is an EMA of the batch mean *plain*
target cosine: ``T <- momentum * mean(cos t_y) + (1 - momentum) T`` (momentum 0.01, T0 = 0). In
training mode T is updated **before** it is used on the batch (as in the reference code); in eval
mode it is only read. T is a buffer, saved in ``state_dict``.

Quality: raw feature norm a >= 0 (not trained by the loss).
"""

from __future__ import annotations

import math

import torch

from qualiface.heads import HEADS
from qualiface.heads.common import (
    ClassBatch,
    MarginHead,
    arc_margin,
    check_range,
    hard_negative_mask,
    hard_negative_metrics,
)


@HEADS.register("curricular")
class CurricularFace(MarginHead):
    """CurricularFace; quality = raw feature norm a >= 0 (not trained by the loss)."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin: float = 0.5,
        scale: float = 64.0,
        momentum: float = 0.01,
    ) -> None:
        super().__init__(embedding_size, num_classes, scale)
        check_range("margin", margin, 0.0, math.pi)
        check_range("momentum", momentum, 0.0, 1.0, closed_high=True)
        self.margin = float(margin)
        self.momentum = float(momentum)
        self.register_buffer("t", torch.zeros(()))

    def margin_target(self, batch: ClassBatch) -> torch.Tensor:
        return arc_margin(batch.target_cos, self.margin)

    def adjust_negatives(self, batch: ClassBatch, target: torch.Tensor):
        if self.training:
            with torch.no_grad():
                batch_mean = batch.target_cos.detach().mean().to(self.t.dtype)
                self.t.mul_(1.0 - self.momentum).add_(self.momentum * batch_mean)
        hard = hard_negative_mask(batch, target)
        t = self.t.to(batch.cos.dtype)
        adjusted = torch.where(hard, batch.cos * (t + batch.cos), batch.cos)
        metrics = hard_negative_metrics(batch, hard)
        metrics["curricular_t"] = self.t.detach().clone()  # T changes in place next forward
        return adjusted, metrics
