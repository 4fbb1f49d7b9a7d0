"""Combined-margin softmax heads: ``combined``, ``arcface`` and ``cosface``.

With a = ||x|| and cos t_j the cosine between x/a and W_j/||W_j||, the target logit is
``s (m1 cos(t_y + m2) - m3)`` and every other logit is ``s cos t_j`` (note: m1 multiplies the
cosine, as in this project's spec, not the angle). ArcFace is (m1, m2, m3) = (1, 0.5, 0) and
CosFace (1, 0, 0.35). Past t_y + m2 > pi the fallback of ``common.arc_margin`` applies.

Quality score of these heads: the raw feature norm a (unbounded, >= 0); margin heads do not
train it, so it is only weakly related to recognizability.
"""

from __future__ import annotations

import math

from qualiface.heads import HEADS
from qualiface.heads.common import ClassBatch, MarginHead, arc_margin, check_positive, check_range


class CombinedMargin:
    """The (m1, m2, m3) target transform, shared by every head that uses a combined margin."""

    def __init__(self, m1: float, m2: float, m3: float, easy_margin: bool = False) -> None:
        check_positive("m1", m1)
        check_range("m2", m2, 0.0, math.pi)
        check_range("m3", m3, -1.0, 2.0)
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)
        self.easy_margin = bool(easy_margin)

    def __call__(self, target_cos):
        """(B,) cos t_y -> (B,) m1 cos(t_y + m2) - m3 (cosine units, before the scale)."""
        shifted = (arc_margin(target_cos, self.m2, self.easy_margin) if self.m2 > 0
                   else target_cos)
        return self.m1 * shifted - self.m3


@HEADS.register("combined")
class CombinedMarginHead(MarginHead):
    """Combined margin softmax; defaults (m1, m2, m3) = (1, 0.3, 0.2) as in InsightFace.

    Quality: raw feature norm a >= 0 (not trained by the loss).
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        m1: float = 1.0,
        m2: float = 0.3,
        m3: float = 0.2,
        scale: float = 64.0,
        easy_margin: bool = False,
    ) -> None:
        super().__init__(embedding_size, num_classes, scale)
        self.margin = CombinedMargin(m1, m2, m3, easy_margin)

    def margin_target(self, batch: ClassBatch):
        return self.margin(batch.target_cos)

    def extra_repr(self) -> str:
        m = self.margin
        return f"classes={self.num_classes}, s={self.scale}, m=({m.m1}, {m.m2}, {m.m3})"


@HEADS.register("arcface")
class ArcFace(CombinedMarginHead):
    """ArcFace (Deng et al. 2019): target ``s cos(t_y + m)``, m = 0.5, s = 64; ``easy_margin``
    applies no margin where cos t_y <= 0 (see ``common.arc_margin``).

    Quality: raw feature norm a >= 0 (not trained by the loss).
    """

    def __init__(self, embedding_size: int, num_classes: int, margin: float = 0.5,
                 scale: float = 64.0, easy_margin: bool = False) -> None:
        super().__init__(embedding_size, num_classes, 1.0, margin, 0.0, scale, easy_margin)


@HEADS.register("cosface")
class CosFace(CombinedMarginHead):
    """CosFace (Wang et al. 2018): target ``s (cos t_y - m)``, m = 0.35, s = 64.

    Quality: raw feature norm a >= 0 (not trained by the loss).
    """

    def __init__(self, embedding_size: int, num_classes: int, margin: float = 0.35,
                 scale: float = 64.0) -> None:
        super().__init__(embedding_size, num_classes, 1.0, 0.0, margin, scale)
