"""MobileFaceNet (Chen et al., 2018): a ~1M-parameter face backbone with a GDC head.

Layout for a 112x112 input (t = expansion, c = output channels, n = repeats, s = stride):

=====================  ===  ===  ===  ===  =========
operator               t    c    n    s    output
=====================  ===  ===  ===  ===  =========
conv3x3                -    64   1    2    56x56
depthwise conv3x3      -    64   1    1    56x56
bottleneck             2    64   5    2    28x28
bottleneck             4    128  1    2    14x14
bottleneck             2    128  6    1    14x14
bottleneck             4    128  1    2    7x7
bottleneck             2    128  2    1    7x7
conv1x1                -    512  1    1    7x7
linear GDC conv7x7     -    512  1    1    1x1
linear conv1x1         -    D    1    1    1x1
=====================  ===  ===  ===  ===  =========

Every conv is followed by BN, and by PReLU unless marked linear. A bottleneck is expand 1x1 -
depthwise 3x3 (stride) - linear project 1x1, with an identity shortcut when stride is 1 and the
width is unchanged. The GDC ("global depthwise conv") replaces global average pooling with a
learned per-channel 7x7 weighting, which keeps the spatial layout of the aligned face.

``features`` (the EQFace quality branch input) is the flattened 512x7x7 map before the GDC.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from qualiface.backbones import BACKBONES

BN_EPS = 1e-5

# (expansion, out_channels, repeats, first_stride) of the bottleneck stages, from the paper.
BOTTLENECK_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)


class ConvBN(nn.Sequential):
    """Conv2d (no bias) - BN - optional PReLU."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        activation: bool = True,
    ) -> None:
        padding = kernel_size // 2  # "same" size for the 1x1 and 3x3 convs used here
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch, eps=BN_EPS),
        ]
        if activation:
            layers.append(nn.PReLU(out_ch))
        super().__init__(*layers)


class Bottleneck(nn.Module):
    """Inverted residual: expand 1x1 - depthwise 3x3 (stride) - linear project 1x1."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.use_shortcut = stride == 1 and in_ch == out_ch
        self.body = nn.Sequential(
            ConvBN(in_ch, hidden, 1),
            ConvBN(hidden, hidden, 3, stride=stride, groups=hidden),
            ConvBN(hidden, out_ch, 1, activation=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.use_shortcut else out


class MobileFaceNet(nn.Module):
    """MobileFaceNet: (B, 3, 112, 112) float in [-1, 1] -> (B, embedding_size).

    Args:
        embedding_size: output dimension D (512 here by default; the paper uses 128).
        input_size: side of the square input; must be a multiple of 16 (the GDC kernel covers
            the whole final map, input_size / 16).
        width_mult: channel multiplier of every layer (1.0 is the paper; small values make a
            thin net for tests).
    """

    def __init__(
        self, embedding_size: int = 512, input_size: int = 112, width_mult: float = 1.0
    ) -> None:
        super().__init__()
        if input_size % 16 != 0:
            raise ValueError(f"MobileFaceNet input_size must be a multiple of 16, got {input_size}")
        if embedding_size < 1 or width_mult <= 0:
            raise ValueError(
                "embedding_size and width_mult must be positive, got "
                f"{embedding_size}, {width_mult}"
            )

        def width(channels: int) -> int:
            return max(8, int(round(channels * width_mult)))

        self.embedding_size = int(embedding_size)
        self.input_size = int(input_size)
        stem = width(64)
        self.stem = nn.Sequential(
            ConvBN(3, stem, 3, stride=2), ConvBN(stem, stem, 3, groups=stem)
        )
        blocks: list[nn.Module] = []
        in_ch = stem
        for expansion, channels, repeats, stride in BOTTLENECK_SETTINGS:
            out_ch = width(channels)
            for k in range(repeats):
                blocks.append(Bottleneck(in_ch, out_ch, stride if k == 0 else 1, expansion))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        head_ch = width(512)
        self.conv_sep = ConvBN(in_ch, head_ch, 1)
        final_side = input_size // 16
        self.feature_dim = head_ch * final_side * final_side
        # GDC: one k x k filter per channel over the whole final map (no padding).
        self.gdc = nn.Sequential(
            nn.Conv2d(head_ch, head_ch, final_side, groups=head_ch, bias=False),
            nn.BatchNorm2d(head_ch, eps=BN_EPS),
        )
        self.embed = nn.Sequential(
            nn.Conv2d(head_ch, self.embedding_size, 1, bias=False),
            nn.BatchNorm2d(self.embedding_size, eps=BN_EPS),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """x: (B, 3, S, S) float -> embedding (B, D), or (embedding, features (B, feature_dim))."""
        feature_map = self.conv_sep(self.blocks(self.stem(x)))
        embedding = torch.flatten(self.embed(self.gdc(feature_map)), 1)
        if return_features:
            return embedding, torch.flatten(feature_map, 1)
        return embedding


@BACKBONES.register("mobilefacenet", "mfn")
def mobilefacenet(**kwargs) -> MobileFaceNet:
    """Build MobileFaceNet; kwargs go to MobileFaceNet (embedding_size, input_size, width_mult)."""
    return MobileFaceNet(**kwargs)


# Expose MobileFaceNet's keyword arguments so config validation can name typos.
mobilefacenet.__signature__ = inspect.signature(MobileFaceNet)
