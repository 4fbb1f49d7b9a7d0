"""The quality calibration stored in ``model.json``: its data class and (de)serialisation.

A :class:`QualityCalibration` is a monotone map from raw quality to the probability that a
verification pair involving a sample of this quality is decided correctly at the operating
threshold: isotonic breakpoints (applied by linear interpolation) or a logistic curve. It is
plain JSON inside the model package (no pickle); ``from_dict`` validates a stored one and names
the bad key.

Fitting one from labelled pairs is ``qualiface.infer.calibrate`` (which re-exports these names).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from qualiface.errors import QualifaceError

CALIBRATION_METHODS = ("isotonic", "logistic")


class CalibrationError(QualifaceError, ValueError):
    """Invalid calibration data (bad shapes, a single class, malformed stored calibration)."""


@dataclass
class QualityCalibration:
    """A monotone map from raw quality to P(pair with this sample verified correctly).

    method:     ``isotonic`` (piecewise linear through ``x``/``y`` breakpoints, clipped at the
                ends) or ``logistic`` (``sigmoid(coef * q + intercept)``).
    fmr:        the target false match rate that fixed the operating threshold.
    threshold:  the cosine threshold (accept when score >= threshold) the outcomes refer to.
    n_pairs:    pairs used for fitting; ``accuracy``: overall pair accuracy at the threshold.
    """

    method: str
    fmr: float
    threshold: float
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    coef: float = 0.0
    intercept: float = 0.0
    n_pairs: int = 0
    accuracy: float = float("nan")

    def apply(self, quality) -> np.ndarray:
        """Raw quality (any shape, array-like or tensor) -> calibrated probability, float32."""
        q = np.asarray(quality.detach().cpu() if hasattr(quality, "detach") else quality, dtype=np.float64)
        if self.method == "isotonic":
            out = np.interp(q, np.asarray(self.x), np.asarray(self.y))
        else:
            out = 1.0 / (1.0 + np.exp(-(self.coef * q + self.intercept)))
        return out.astype(np.float32)

    def to_dict(self) -> dict:
        """JSON-able dict (what ``model.json`` stores under ``calibration``)."""
        data = asdict(self)
        if self.method == "isotonic":
            data.pop("coef"), data.pop("intercept")
        else:
            data.pop("x"), data.pop("y")
        if not np.isfinite(self.accuracy):
            data["accuracy"] = None
        return data

    @classmethod
    def from_dict(cls, data: object) -> QualityCalibration:
        """Validate and rebuild a stored calibration; ``CalibrationError`` names the bad key."""
        if not isinstance(data, dict):
            raise CalibrationError(f"calibration must be an object, got {type(data).__name__}")
        method = data.get("method")
        if method not in CALIBRATION_METHODS:
            raise CalibrationError(f"calibration.method must be one of {CALIBRATION_METHODS}, got {method!r}")
        for key in ("fmr", "threshold"):
            if not isinstance(data.get(key), (int, float)):
                raise CalibrationError(f"calibration.{key} must be a number, got {data.get(key)!r}")
        kwargs = dict(method=method, fmr=float(data["fmr"]), threshold=float(data["threshold"]))
        if method == "isotonic":
            x, y = data.get("x"), data.get("y")
            for key, values in (("x", x), ("y", y)):
                if not isinstance(values, list) or not values or not all(
                    isinstance(v, (int, float)) for v in values
                ):
                    raise CalibrationError(f"calibration.{key} must be a non-empty list of numbers")
            if len(x) != len(y):
                raise CalibrationError(f"calibration.x and .y differ in length ({len(x)} vs {len(y)})")
            if np.any(np.diff(x) < 0) or np.any(np.diff(y) < 0):
                raise CalibrationError("calibration breakpoints must be non-decreasing in x and y")
            if not all(0.0 <= v <= 1.0 for v in y):  # y is a probability, written as such by embed
                raise CalibrationError(f"calibration.y must be probabilities in [0, 1], got values from "
                                       f"{min(y)} to {max(y)}")
            kwargs.update(x=[float(v) for v in x], y=[float(v) for v in y])
        else:
            for key in ("coef", "intercept"):
                if not isinstance(data.get(key), (int, float)):
                    raise CalibrationError(f"calibration.{key} must be a number, got {data.get(key)!r}")
            if data["coef"] < 0:  # as breakpoints must rise: higher quality, never lower P
                raise CalibrationError(f"calibration.coef must be >= 0 (a monotone increasing map), "
                                       f"got {data['coef']!r}")
            kwargs.update(coef=float(data["coef"]), intercept=float(data["intercept"]))
        if isinstance(data.get("n_pairs"), int):
            kwargs["n_pairs"] = data["n_pairs"]
        if isinstance(data.get("accuracy"), (int, float)):
            kwargs["accuracy"] = float(data["accuracy"])
        return cls(**kwargs)
