"""Inference-time quality estimators, and the QCFace norm prior they share with the heads.

A quality estimator maps embeddings (and, for EQFace, backbone features) to one score per face,
without labels or class centres: ``forward(embeddings, features=None) -> (B,)``. Each has
``requires_features``, ``config() -> dict`` (JSON-serialisable, with ``kind`` and every
constant) and is rebuilt by ``build_quality_estimator(config, state_dict)``. All are traceable by
``torch.onnx.export`` (no Python branching on tensor values). Kinds:

* ``norm``   - the raw embedding norm a = ||x|| (>= 0, unbounded).
* ``qcface`` - the recognizability p in [0, 1] recovered from a by inverting QCFace's z*(p).
* ``eqface`` - EQFace's quality branch on backbone features, sigmoid output in (0, 1).

``NormPrior`` holds QCFace's maths: the per-sample objective f(a, p), its minimiser z*(p)
(the target norm for recognizability p) and the inverse p(a).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from qualiface.errors import QualifaceError


class QualityConfigError(QualifaceError, ValueError):
    """A quality-estimator config that cannot be rebuilt (unknown kind, bad constants)."""


@dataclass(frozen=True)
class NormPrior:
    """QCFace's norm prior with bounds l_a < u_a and stabiliser eps.

    k is chosen so the target norm at p = 0.5 is M = (u_a + l_a) / 2:
    ``k = (M^2/l_a^2 - 1) / (1 - M^2/u_a^2)`` (about 3421.9 for the defaults).
    """

    u_a: float = 100.0
    l_a: float = 1.0
    eps: float = 1e-3

    def __post_init__(self) -> None:
        if not (math.isfinite(self.l_a) and self.l_a > 0 and math.isfinite(self.u_a)):
            raise ValueError(f"l_a must be positive and u_a finite, got {self.l_a}, {self.u_a}")
        if not self.u_a > self.l_a:
            raise ValueError(f"u_a must exceed l_a, got l_a={self.l_a}, u_a={self.u_a}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be positive, got {self.eps}")

    @property
    def k(self) -> float:
        mid = (self.u_a + self.l_a) / 2.0
        return (mid**2 / self.l_a**2 - 1.0) / (1.0 - mid**2 / self.u_a**2)

    # z*(p)^2 = (A p + 1) / (B p + C): the closed form both directions use.
    @property
    def _abc(self) -> tuple[float, float, float]:
        k = self.k
        return k - 1.0, k / self.u_a**2 - 1.0 / self.l_a**2, 1.0 / self.l_a**2 + self.eps

    def objective(self, a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """f(a, p) = k p (1/(a+eps) + a/u_a^2) + (1 - p)(1/(a+eps) + a/l_a^2), elementwise."""
        inverse = 1.0 / (a + self.eps)
        return self.k * p * (inverse + a / self.u_a**2) + (1.0 - p) * (inverse + a / self.l_a**2)

    def target_norm(self, p: torch.Tensor) -> torch.Tensor:
        """z*(p) = sqrt(((k-1) p + 1) / ((k/u_a^2 - 1/l_a^2) p + 1/l_a^2 + eps)); p in [0, 1].

        p = 0 -> ~1.0, p = 0.5 -> 50.5, p = 1 -> ~99.85 for the defaults.
        """
        a_coef, b_coef, c_coef = self._abc
        return torch.sqrt((a_coef * p + 1.0) / (b_coef * p + c_coef))

    def recognizability(self, a: torch.Tensor) -> torch.Tensor:
        """Inverse of z*: p(a) = (1 - a^2 C) / (a^2 B - A), clamped to [0, 1]; a >= 0.

        The denominator a^2 B - A is always negative (B < 0 < A), so there is no pole.
        """
        a_coef, b_coef, c_coef = self._abc
        squared = a * a
        return ((1.0 - squared * c_coef) / (squared * b_coef - a_coef)).clamp(0.0, 1.0)


class NormQuality(nn.Module):
    """Quality = raw embedding norm a = ||x|| (B,), >= 0."""

    requires_features = False

    def forward(self, embeddings: torch.Tensor, features: torch.Tensor | None = None):
        return torch.linalg.vector_norm(embeddings.float(), dim=1)

    def config(self) -> dict:
        return {"kind": "norm"}


class QCFaceQuality(nn.Module):
    """Quality = QCFace recognizability p in [0, 1], recovered from a by inverting z*(p)."""

    requires_features = False

    def __init__(self, prior: NormPrior | None = None) -> None:
        super().__init__()
        self.prior = prior or NormPrior()

    def forward(self, embeddings: torch.Tensor, features: torch.Tensor | None = None):
        return self.prior.recognizability(torch.linalg.vector_norm(embeddings.float(), dim=1))

    def config(self) -> dict:
        return {"kind": "qcface", **asdict(self.prior), "k": self.prior.k}


class EQFaceQuality(nn.Module):
    """EQFace quality branch: FC(F -> hidden) - BN - ReLU - FC(hidden -> 1) - sigmoid, (0, 1).

    ``forward(embeddings, features)`` uses only ``features`` (B, F), the backbone's flattened
    pre-embedding features; it returns (B,).
    """

    requires_features = True

    def __init__(self, feature_dim: int, hidden: int = 512) -> None:
        super().__init__()
        if not (isinstance(feature_dim, int) and feature_dim > 0):
            raise ValueError(f"feature_dim must be a positive int, got {feature_dim!r}")
        if not (isinstance(hidden, int) and hidden > 0):
            raise ValueError(f"hidden must be a positive int, got {hidden!r}")
        self.feature_dim = feature_dim
        self.hidden = hidden
        self.layers = nn.Sequential(
            nn.Linear(feature_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, 1),
        )

    def forward(self, embeddings: torch.Tensor | None = None, features: torch.Tensor | None = None):
        if features is None:
            raise ValueError("the eqface quality estimator needs the backbone features")
        return torch.sigmoid(self.layers(features).squeeze(1))

    def config(self) -> dict:
        return {"kind": "eqface", "feature_dim": self.feature_dim, "hidden": self.hidden}


def build_quality_estimator(config: dict, state_dict: dict | None = None) -> nn.Module:
    """Rebuild an estimator from its ``config()`` (and ``state_dict()`` for learned ones)."""
    if not isinstance(config, dict) or "kind" not in config:
        raise QualityConfigError(f"quality config must be a dict with a 'kind', got {config!r}")
    kind = config["kind"]
    params = {key: value for key, value in config.items() if key != "kind"}
    try:
        if kind == "norm":
            estimator: nn.Module = NormQuality()
        elif kind == "qcface":
            k = params.pop("k", None)
            estimator = QCFaceQuality(NormPrior(**params))
            if k is not None and not math.isclose(k, estimator.prior.k, rel_tol=1e-9):
                raise QualityConfigError(
                    f"qcface config k={k} disagrees with k={estimator.prior.k} derived from "
                    f"u_a={estimator.prior.u_a}, l_a={estimator.prior.l_a}"
                )
        elif kind == "eqface":
            estimator = EQFaceQuality(**params)
        else:
            raise QualityConfigError(
                f"unknown quality estimator kind {kind!r}; known: eqface, norm, qcface"
            )
    except TypeError as error:
        raise QualityConfigError(f"bad {kind!r} quality config {config!r}: {error}") from None
    if state_dict is not None:
        estimator.load_state_dict(state_dict)
    return estimator.eval()
