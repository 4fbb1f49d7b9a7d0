"""MagFace (Meng et al. 2021): a norm-dependent ArcFace margin plus a norm regulariser.

With a = ||x|| clamped to [l_a, u_a] = [10, 110]:
``m(a) = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m`` (from l_m = 0.45 to u_m = 0.8), target
``s cos(t_y + m(a))`` (``arc_margin`` fallback, per sample), ``g(a) = 1/a + a/u_a^2`` and
``loss = CE + lambda_g * mean_i g(a_i)`` with lambda_g = 35. The paper's convergence argument
needs ``lambda_g >= s k u_a^2 l_a^2 / (u_a^2 - l_a^2)`` (k the slope of m); constructing a head
below that bound emits a ``UserWarning``.

Quality: the raw (unclamped) feature norm a >= 0; larger = more recognizable (MagFace's claim).
"""

from __future__ import annotations

import math
import warnings

import torch

from qualiface.heads import HEADS
from qualiface.heads.common import ClassBatch, MarginHead, arc_margin, check_positive, check_range


def magface_lambda_bound(scale: float, l_a: float, u_a: float, l_m: float, u_m: float) -> float:
    """Smallest lambda_g of MagFace's theorem: s k u_a^2 l_a^2 / (u_a^2 - l_a^2)."""
    slope = (u_m - l_m) / (u_a - l_a)
    return scale * slope * u_a**2 * l_a**2 / (u_a**2 - l_a**2)


@HEADS.register("magface")
class MagFace(MarginHead):
    """MagFace; quality = raw feature norm a >= 0, larger = better."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
        scale: float = 64.0,
    ) -> None:
        super().__init__(embedding_size, num_classes, scale)
        check_positive("l_a", l_a)
        if not u_a > l_a:
            raise ValueError(f"u_a must exceed l_a, got l_a={l_a}, u_a={u_a}")
        check_range("l_m", l_m, 0.0, math.pi)
        check_range("u_m", u_m, l_m, math.pi, closed_high=True)
        check_range("lambda_g", lambda_g, 0.0, float("inf"))
        self.l_a, self.u_a, self.l_m, self.u_m = float(l_a), float(u_a), float(l_m), float(u_m)
        self.lambda_g = float(lambda_g)
        bound = magface_lambda_bound(self.scale, self.l_a, self.u_a, self.l_m, self.u_m)
        if self.lambda_g < bound:
            warnings.warn(
                f"MagFace lambda_g={self.lambda_g} is below the paper's bound "
                f"s*k*u_a^2*l_a^2/(u_a^2-l_a^2) = {bound:.3f}; the norm may not be monotone "
                "in quality",
                UserWarning,
                stacklevel=2,
            )

    def clamped_norm(self, batch: ClassBatch) -> torch.Tensor:
        return batch.norm.clamp(self.l_a, self.u_a)

    def margin_target(self, batch: ClassBatch) -> torch.Tensor:
        a = self.clamped_norm(batch)
        slope = (self.u_m - self.l_m) / (self.u_a - self.l_a)
        margin = slope * (a - self.l_a) + self.l_m
        return arc_margin(batch.target_cos, margin)

    def regularise(self, batch, output, *, features, second_view) -> None:
        a = self.clamped_norm(batch)
        g = 1.0 / a + a / self.u_a**2
        g_mean = g.mean()
        output.loss = output.loss + self.lambda_g * g_mean
        output.metrics["magface_g"] = g_mean.detach()
