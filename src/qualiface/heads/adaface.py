"""AdaFace (Kim et al. 2022): a margin that adapts to the feature-norm "image quality proxy".

a = ||x|| (detached). mu, sigma are EMAs of the batch mean and (unbiased) std of a:
``mu <- alpha * mean(a) + (1 - alpha) mu`` (alpha = 0.01, mu0 = 20, sigma0 = 100, as AdaFace).
``z = clip(h (a - mu) / (sigma + 1e-3), -1, 1)`` (h = 0.333), and the target logit is
``s (cos(clip(t_y - m z, eps, pi - eps)) - (m + m z))`` with m = 0.4, eps = 1e-3.

Order, as in the reference code: in training mode the EMAs are updated with the current batch
**first**, and z is then computed with the updated mu, sigma. In eval mode they are only read.
mu and sigma are buffers (``batch_mean``, ``batch_std``) saved in ``state_dict``.

Quality: the raw feature norm a >= 0 (larger = better); z in [-1, 1] is in ``extras["z"]``.
"""

from __future__ import annotations

import math

import torch

from qualiface.heads import HEADS
from qualiface.heads.common import COS_EPS, ClassBatch, MarginHead, check_positive, check_range


class NormStatistic(torch.nn.Module):
    """AdaFace's EMA-normalised norm z, shared with QGFace.

    Buffers ``batch_mean`` (mu) and ``batch_std`` (sigma); ``forward(norm) -> z`` (B,) in [-1, 1],
    updating the EMAs first when the module is in training mode; ``normalise(norm)`` only reads
    them. ``initial_std`` may be 0 (``std_eps`` keeps z finite).
    """

    def __init__(self, h: float = 0.333, momentum: float = 0.01, initial_mean: float = 20.0,
                 initial_std: float = 100.0, std_eps: float = 1e-3) -> None:
        super().__init__()
        check_positive("h", h)
        check_range("momentum", momentum, 0.0, 1.0, closed_high=True)
        check_range("initial_std", initial_std, 0.0, math.inf)
        self.h = float(h)
        self.momentum = float(momentum)
        self.std_eps = float(std_eps)
        self.register_buffer("batch_mean", torch.tensor(float(initial_mean)))
        self.register_buffer("batch_std", torch.tensor(float(initial_std)))

    def forward(self, norm: torch.Tensor) -> torch.Tensor:
        a = norm.detach()
        if self.training and a.numel() > 0:
            with torch.no_grad():
                mean = a.mean().to(self.batch_mean.dtype)
                # Unbiased std like torch.std in the reference; one sample has no spread.
                std = a.std() if a.numel() > 1 else torch.zeros_like(mean)
                self.batch_mean.mul_(1.0 - self.momentum).add_(self.momentum * mean)
                self.batch_std.mul_(1.0 - self.momentum).add_(self.momentum * std.to(mean.dtype))
        return self.normalise(a)

    def normalise(self, norm: torch.Tensor) -> torch.Tensor:
        """z of (B,) norms with the current mu, sigma, never updating them."""
        a = norm.detach()
        mu = self.batch_mean.to(a.dtype)
        sigma = self.batch_std.to(a.dtype)
        return (self.h * (a - mu) / (sigma + self.std_eps)).clamp(-1.0, 1.0)


def adaface_target(target_cos: torch.Tensor, z: torch.Tensor, margin: float, eps: float):
    """(B,) cos t_y, z -> cos(clip(t_y - m z, eps, pi - eps)) - (m + m z) (cosine units)."""
    theta = torch.acos(target_cos.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS))
    theta_m = (theta - margin * z).clamp(eps, math.pi - eps)
    return torch.cos(theta_m) - (margin + margin * z)


@HEADS.register("adaface")
class AdaFace(MarginHead):
    """AdaFace; quality = raw feature norm a >= 0, larger = better (z in extras)."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin: float = 0.4,
        h: float = 0.333,
        momentum: float = 0.01,
        eps: float = 1e-3,
        scale: float = 64.0,
    ) -> None:
        super().__init__(embedding_size, num_classes, scale)
        check_range("margin", margin, 0.0, math.pi)
        check_range("eps", eps, 0.0, 0.5)
        self.margin = float(margin)
        self.eps = float(eps)
        self.norm_statistic = NormStatistic(h=h, momentum=momentum)

    def margin_target(self, batch: ClassBatch) -> torch.Tensor:
        z = self.norm_statistic(batch.norm)
        batch.extras["z"] = z
        return adaface_target(batch.target_cos, z, self.margin, self.eps)

    def regularise(self, batch, output, *, features, second_view) -> None:
        z = batch.extras["z"]
        # Copies: the EMA buffers change in place on the next forward.
        output.metrics["mean_z"] = z.mean()
        output.metrics["adaface_mu"] = self.norm_statistic.batch_mean.detach().clone()
        output.metrics["adaface_sigma"] = self.norm_statistic.batch_std.detach().clone()
