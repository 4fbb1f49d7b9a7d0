"""Short CPU trainings of every head on a tiny synthetic problem.

Identities are random unit vectors in 32-d; a sample is its identity plus Gaussian noise whose
scale is the sample's degradation severity; a small MLP plays the backbone. That isolates the
head's behaviour: the loss must go down, and the quality heads' score must fall with severity.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from qualiface.heads import build_head

IDENTITIES, INPUT_DIM, HIDDEN, EMBED = 12, 32, 48, 16
STEPS, BATCH = 200, 64
QUALITY_HEADS = {"qcface", "qcface-cur", "qcface-mv", "magface", "adaface", "eqface", "qgface"}
HEADS = ["arcface", "cosface", "combined", "curricular", "mv-softmax", "magface", "adaface",
         "qcface", "qcface-cur", "qcface-mv", "eqface", "qgface"]


class TinyBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(INPUT_DIM, HIDDEN), nn.ReLU())
        self.embed = nn.Linear(HIDDEN, EMBED)

    def forward(self, x):
        features = self.features(x)
        # Real backbones start with norms of ~10-30; a fixed gain gives the tiny MLP the same.
        return 20.0 * self.embed(features), features


class Faces:
    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.identities = nn.functional.normalize(
            torch.randn(IDENTITIES, INPUT_DIM, generator=self.gen), dim=1)

    def sample(self, n: int, extra_noise: float = 0.0):
        labels = torch.randint(0, IDENTITIES, (n,), generator=self.gen)
        severity = torch.rand(n, generator=self.gen)
        noise = torch.randn(n, INPUT_DIM, generator=self.gen)
        clean = self.identities[labels]
        # Unit-norm inputs: severity shows as lost alignment with the identity, not as a larger
        # input (which would let the norm grow with noise for free).
        x = nn.functional.normalize(clean + noise * (0.45 * severity)[:, None], dim=1)
        second = nn.functional.normalize(
            x + extra_noise * torch.randn(n, INPUT_DIM, generator=self.gen), dim=1)
        return x, labels, severity, second


def train(head_name: str, steps: int = STEPS, seed: int = 0):
    torch.manual_seed(seed)
    faces = Faces(seed)
    backbone = TinyBackbone()
    params = {"feature_dim": HIDDEN, "hidden": 32} if head_name == "eqface" else {}
    if head_name == "qgface":
        params = {"queue_size": 256}
    head = build_head(head_name, EMBED, IDENTITIES, **params).train()
    optimiser = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=3e-3)
    losses, accuracies = [], []

    def step(x, y, second):
        embeddings, features = backbone(x)
        second_view = backbone(second)[0] if head.requires_second_view else None
        out = head(embeddings, y, features=features, second_view=second_view)
        optimiser.zero_grad()
        out.loss.backward()
        optimiser.step()
        accuracies.append(float(out.metrics["accuracy"]))
        return float(out.loss.detach())

    for _ in range(steps):
        x, y, _, second = faces.sample(BATCH, extra_noise=0.3)
        losses.append(step(x, y, second))
    if head_name == "eqface":  # stage 2: the quality branch alone, backbone fixed
        head.stage = 2
        optimiser = torch.optim.Adam(head.trainable_parameters(), lr=3e-3)
        backbone.requires_grad_(False)
        for _ in range(steps // 2):
            x, y, _, second = faces.sample(BATCH)
            step(x, y, second)
    backbone.eval()
    head.eval()
    x, y, severity, _ = faces.sample(1000)
    with torch.no_grad():
        embeddings, features = backbone(x)
        quality = head.quality_estimator()(embeddings, features)
    return losses, accuracies, quality, severity


@pytest.mark.slow
@pytest.mark.parametrize("name", HEADS)
def test_short_training_lowers_loss_and_quality_tracks_severity(name):
    losses, accuracies, quality, severity = train(name)
    if name == "qgface":
        # QGFace's total loss need not fall: its gate moves rows between the classification
        # and the contrastive term as the norm statistics move (measured 10.1 -> 9.3 while the
        # training accuracy rose from 5 % to 92 %), so identity learning is checked directly.
        start, end = sum(accuracies[:20]) / 20, sum(accuracies[-20:]) / 20
        assert end > 0.8 and end > start + 0.5, (start, end)
    else:
        start, end = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
        assert end < 0.7 * start, (start, end)
    if name in QUALITY_HEADS:
        rho = spearmanr(quality.numpy(), severity.numpy()).statistic
        assert rho < -0.2, rho
