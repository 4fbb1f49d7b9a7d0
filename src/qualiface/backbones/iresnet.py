"""Improved ResNets (IResNet), ArcFace form: ``iresnet18`` ... ``iresnet200``, ``iresnet-nano``.

Layout (for ``base_width`` w = 64, 112x112 input):

* stem: 3x3 conv (3 -> w, stride 1) - BN - PReLU;
* four stages of ``IBasicBlock`` with w, 2w, 4w, 8w channels, each starting with stride 2
  (112 -> 56 -> 28 -> 14 -> 7);
* ``IBasicBlock``: BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus a 1x1 conv + BN
  shortcut whenever the shape changes;
* head ("BN-Dropout-FC-BN"): BN2d - Dropout - flatten - Linear(8w*7*7 -> D) - BN1d whose scale is
  frozen at 1, so the embedding norm is learned only through the FC layer and the BN shift.

``features`` (the EQFace quality branch input) is the flattened output of the head's BN2d,
shape (B, 8w * (input_size/16)^2). With w = 64 the parameter counts are the published ones
(IResNet-50: 43.6M, IResNet-100: 65.2M). Mixed precision is applied from outside with
``torch.autocast``; the module itself is dtype-agnostic.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from qualiface.backbones import BACKBONES

BN_EPS = 1e-5

# Blocks per stage of the named depths.
IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
    "iresnet-nano": (1, 1, 1, 1),
}
NANO_BASE_WIDTH = 16


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class StridedPointwiseConv(nn.Conv2d):
    """1x1 convolution with stride, computed as subsample-then-1x1 (mathematically identical).

    PyTorch 2.13's CPU (oneDNN) backward of a strided 1x1 conv in channels_last crashes the
    process when it has fewer than 16 input channels, which thin test/demo nets hit. Taking
    every ``stride``-th pixel first and running a stride-1 conv avoids that kernel; the
    parameters (and state-dict keys) are those of a plain ``nn.Conv2d``.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__(in_ch, out_ch, kernel_size=1, stride=1, bias=False)
        self.subsample = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.subsample > 1:
            x = x[:, :, :: self.subsample, :: self.subsample]
        return super().forward(x)


class IBasicBlock(nn.Module):
    """Pre-activation-style residual block of IResNet: BN-conv-BN-PReLU-conv(stride)-BN."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, eps=BN_EPS)
        self.conv1 = _conv3x3(in_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch, stride)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                StridedPointwiseConv(in_ch, out_ch, stride),
                nn.BatchNorm2d(out_ch, eps=BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        return out + shortcut


class IResNet(nn.Module):
    """IResNet backbone: (B, 3, S, S) float in [-1, 1] -> (B, embedding_size).

    Args:
        layers: blocks in each of the four stages.
        embedding_size: output dimension D.
        dropout: dropout probability before the FC layer (0 disables it).
        base_width: channels of the stem and first stage (64 in the published nets); the
            stages use 1x, 2x, 4x, 8x this. Small values give thin nets for tests and demos.
        input_size: side of the square input; must be a multiple of 16 (112 for face crops).
        zero_init_residual: start each residual branch's last BN at zero so every block is
            the identity at initialisation (helps very deep nets train from scratch).
        learnable_embedding_scale: let the final BN1d learn its per-dimension scale. Off by
            default, as in ArcFace's IResNet; with the scale frozen at 1 and BN in training
            mode the mean squared norm is at least D, which norm-target methods (QCFace,
            MagFace) may want to go below.
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int] | list[int],
        embedding_size: int = 512,
        dropout: float = 0.0,
        base_width: int = 64,
        input_size: int = 112,
        zero_init_residual: bool = False,
        learnable_embedding_scale: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"IResNet needs four stages of >= 1 block, got {list(layers)}")
        if base_width < 1 or embedding_size < 1:
            raise ValueError(
                "base_width and embedding_size must be positive, got "
                f"{base_width}, {embedding_size}"
            )
        if input_size % 16 != 0:
            raise ValueError(f"IResNet input_size must be a multiple of 16, got {input_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embedding_size = int(embedding_size)
        self.input_size = int(input_size)
        widths = [base_width, 2 * base_width, 4 * base_width, 8 * base_width]
        final_side = input_size // 16
        self.feature_dim = widths[-1] * final_side * final_side

        self.conv1 = _conv3x3(3, base_width)
        self.bn1 = nn.BatchNorm2d(base_width, eps=BN_EPS)
        self.prelu = nn.PReLU(base_width)
        stages = []
        in_ch = base_width
        for width, blocks in zip(widths, layers):
            stage = [IBasicBlock(in_ch, width, stride=2)]
            stage += [IBasicBlock(width, width, stride=1) for _ in range(int(blocks) - 1)]
            stages.append(nn.Sequential(*stage))
            in_ch = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(widths[-1], eps=BN_EPS)
        # Not in-place: `features` is returned to the caller and must stay the pre-dropout map.
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(self.feature_dim, self.embedding_size)
        self.features = nn.BatchNorm1d(self.embedding_size, eps=BN_EPS)
        self._init_weights(zero_init_residual, learnable_embedding_scale)

    def _init_weights(self, zero_init_residual: bool, learnable_embedding_scale: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, IBasicBlock):
                    nn.init.zeros_(module.bn3.weight)
        # By default the embedding BN keeps a unit scale (as in ArcFace's IResNet).
        self.features.weight.requires_grad_(learnable_embedding_scale)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """x: (B, 3, S, S) float -> embedding (B, D), or (embedding, features (B, feature_dim))."""
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        features = torch.flatten(self.bn2(x), 1)
        embedding = self.features(self.fc(self.dropout(features)))
        if return_features:
            return embedding, features
        return embedding


def _factory(name: str):
    def build(**kwargs) -> IResNet:
        if name == "iresnet-nano":
            kwargs.setdefault("base_width", NANO_BASE_WIDTH)
        return IResNet(IRESNET_LAYERS[name], **kwargs)

    # Expose IResNet's keyword arguments (less `layers`) so config validation can name typos.
    options = [p for p in inspect.signature(IResNet).parameters.values() if p.name != "layers"]
    build.__signature__ = inspect.Signature(
        [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in options]
    )
    build.__name__ = name.replace("-", "_")
    build.__doc__ = f"Build {name} (layers {IRESNET_LAYERS[name]}); kwargs go to IResNet."
    return build


iresnet18 = BACKBONES.register("iresnet18", "ir18")(_factory("iresnet18"))
iresnet34 = BACKBONES.register("iresnet34", "ir34")(_factory("iresnet34"))
iresnet50 = BACKBONES.register("iresnet50", "ir50")(_factory("iresnet50"))
iresnet100 = BACKBONES.register("iresnet100", "ir100")(_factory("iresnet100"))
iresnet200 = BACKBONES.register("iresnet200", "ir200")(_factory("iresnet200"))
iresnet_nano = BACKBONES.register("iresnet-nano", "iresnet_nano")(_factory("iresnet-nano"))
