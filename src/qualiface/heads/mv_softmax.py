"""MV-Softmax (Wang et al. 2020, "mis-classified vector guided softmax").

Target: a margin on the target cosine, ArcFace-style by default ("mv-arc":
``cos(t_y + m_arc) - m_cos`` with m_arc = 0.5, m_cos = 0; set m_arc = 0, m_cos = 0.35 for
"mv-am"). A negative j is *mis-classified* when ``cos t_j`` exceeds the margined target cosine
(both before scaling); such negatives become ``t cos t_j + t - 1`` (t = 1.2 as in the paper; the
public QCFace code uses 1.12), the others stay ``cos t_j``. Everything is then scaled by s = 64.

Quality: raw feature norm a >= 0 (not trained by the loss).
"""

from __future__ import annotations

import math

import torch

from qualiface.heads import HEADS
from qualiface.heads.common import (
    ClassBatch,
    MarginHead,
    check_range,
    hard_negative_mask,
    hard_negative_metrics,
)
from qualiface.heads.margins import CombinedMargin


@HEADS.register("mv-softmax")
class MVSoftmax(MarginHead):
    """MV-Softmax; quality = raw feature norm a >= 0 (not trained by the loss)."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        m_arc: float = 0.5,
        m_cos: float = 0.0,
        t: float = 1.2,
        scale: float = 64.0,
    ) -> None:
        super().__init__(embedding_size, num_classes, scale)
        check_range("t", t, 1.0, math.inf)
        self.margin = CombinedMargin(1.0, m_arc, m_cos)
        self.t = float(t)

    def margin_target(self, batch: ClassBatch) -> torch.Tensor:
        return self.margin(batch.target_cos)

    def adjust_negatives(self, batch: ClassBatch, target: torch.Tensor):
        hard = hard_negative_mask(batch, target)
        adjusted = torch.where(hard, self.t * batch.cos + self.t - 1.0, batch.cos)
        return adjusted, hard_negative_metrics(batch, hard)
