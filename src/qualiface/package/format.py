"""The model-package format: what ``model.json`` holds and how it is validated.

A model package is a directory with two files:

- ``weights.safetensors``: the backbone tensors (prefix ``backbone.``) and the quality
  estimator tensors (prefix ``quality.``); safetensors, so loading never unpickles anything.
- ``model.json``: everything needed to rebuild and use the model without the training config:
  format version, backbone name + constructor kwargs, embedding size, head name, input size,
  normalisation mean/std, channel order, the quality definition (kind, estimator config,
  meaning, range), an optional quality calibration, and free-form training metadata.

:class:`ModelSpec` is the parsed ``model.json``; ``ModelSpec.from_json`` validates JSON types,
ranges and sizes (before anything is allocated) with :class:`ModelPackageError` naming the file
and the key. Reading and writing packages is :mod:`qualiface.package.io`; checking weights
against the rebuilt architecture is :mod:`qualiface.package.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qualiface.data.transforms import IMAGE_SIZE, INPUT_MEAN, INPUT_STD
from qualiface.errors import QualifaceError
from qualiface.package.calibration import CalibrationError, QualityCalibration

FORMAT_NAME = "qualiface-model"
FORMAT_VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS_FILE = "weights.safetensors"

# What a quality kind means, for model.json readers who never saw the training code, when the
# estimator does not say: a training method (``qualiface.methods``: QCFace's p, EQFace's s, ...)
# sets its score's ``meaning`` / ``value_range`` on the estimator it exports.
QUALITY_MEANINGS: dict[str, tuple[str, list[float | None]]] = {
    "norm": ("L2 norm of the unnormalised embedding; higher = more recognisable", [0.0, None]),
}


# Upper bounds on the architecture size a model.json may ask for, checked before anything is
# allocated: a hostile or corrupt file must not be able to request terabytes of weights. They
# are far above any face model (the largest standard ones: 512-d, 112 px, width 64).
MAX_EMBEDDING_SIZE = 4096
MAX_INPUT_SIZE = 1024
BACKBONE_KWARG_LIMITS: dict[str, float] = {
    "embedding_size": MAX_EMBEDDING_SIZE,
    "input_size": MAX_INPUT_SIZE,
    "base_width": 1024,
    "width_mult": 16.0,
}


# Input normalisation bounds. Pixels are scaled to [0, 1] before ``(x - mean) / std``, so a mean
# outside [0, 1] is a unit mistake (e.g. 127.5), and a std below 1e-3 (1/255 = 0.0039 is the
# smallest in use) or denormal turns ordinary pixels into Inf; both give NaN or identical
# embeddings rather than an error, so they are refused at load.
MEAN_RANGE = (0.0, 1.0)
STD_RANGE = (1e-3, 10.0)
# Smallest normal float32: model.json numbers end up in float32 tensors, where anything
# smaller in magnitude (but not 0) is denormal, slow, and a sign of a corrupt file.
_FLOAT32_TINY = 1.1754943508222875e-38
_MAX_JSON_INT = 2**64


#: Largest ``model.json`` read (a description: a few KB in practice).
MODEL_JSON_LIMIT = 4 * 2**20


class ModelPackageError(QualifaceError, ValueError):
    """A model package that cannot be read: missing files, bad JSON, wrong types or shapes."""


def _check_json_numbers(document: object, source: str) -> None:
    """Refuse NaN, Infinity (``1e999`` parses to it), denormal and out-of-range numbers anywhere.

    Python's ``json`` accepts ``NaN`` / ``Infinity``, and every number in ``model.json`` either
    sizes the network, normalises its input or scales its quality; one non-finite value makes
    every embedding NaN while the command still succeeds. Iterative, so a deep but parseable
    document cannot exhaust the stack.
    """
    stack: list[tuple[str, object]] = [("", document)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, bool):
            continue
        elif isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                raise ModelPackageError(f"{source}: '{path}' must be a finite number, got {value}")
            if 0.0 < abs(value) < _FLOAT32_TINY:
                raise ModelPackageError(f"{source}: '{path}' is a denormal number ({value!r}); "
                                        "the file is corrupt")
        elif isinstance(value, int) and not -_MAX_JSON_INT < value < _MAX_JSON_INT:
            raise ModelPackageError(f"{source}: '{path}' is out of range (more than 64 bits)")


@dataclass
class QualitySpec:
    """How the package's raw quality is computed and what it means."""

    kind: str
    config: dict
    meaning: str
    value_range: list[float | None]
    requires_features: bool


@dataclass
class ModelSpec:
    """The parsed, validated ``model.json``."""

    backbone_name: str
    backbone_kwargs: dict
    embedding_size: int
    feature_dim: int | None
    quality: QualitySpec
    head_name: str | None = None
    input_size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)
    channel_order: str = "RGB"
    mean: tuple[float, float, float] = (INPUT_MEAN,) * 3
    std: tuple[float, float, float] = (INPUT_STD,) * 3
    calibration: QualityCalibration | None = None
    metadata: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        """The JSON object written as ``model.json``."""
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "backbone": {
                "name": self.backbone_name,
                "kwargs": self.backbone_kwargs,
                "embedding_size": self.embedding_size,
                "feature_dim": self.feature_dim,
            },
            "head": self.head_name,
            "input": {
                "size": list(self.input_size),
                "layout": "NCHW",
                "channel_order": self.channel_order,
                "dtype": "uint8 0..255, scaled to [0, 1] then (x - mean) / std per channel",
                "mean": list(self.mean),
                "std": list(self.std),
            },
            "quality": {
                "kind": self.quality.kind,
                "config": self.quality.config,
                "meaning": self.quality.meaning,
                "range": self.quality.value_range,
                "requires_features": self.quality.requires_features,
            },
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "metadata": self.metadata,
        }

    @classmethod
    def from_json(cls, data: object, source: str = MODEL_JSON) -> ModelSpec:
        """Validate a loaded ``model.json`` object; ``ModelPackageError`` names file and key."""

        def bad(key: str, problem: str) -> ModelPackageError:
            return ModelPackageError(f"{source}: '{key}' {problem}")

        def get(obj: dict, key: str, types, path: str, optional: bool = False):
            if key not in obj:
                if optional:
                    return None
                raise bad(path, "is missing")
            value = obj[key]
            if optional and value is None:
                return None
            # bool is an int subclass in Python; a number field holding true/false is an error.
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
                names = "/".join(t.__name__ for t in _as_tuple(types))
                raise bad(path, f"must be {names}, got {type(value).__name__}")
            return value

        if not isinstance(data, dict):
            raise ModelPackageError(f"{source}: top level must be a JSON object")
        _check_json_numbers(data, source)
        if data.get("format") != FORMAT_NAME:
            raise bad("format", f"must be '{FORMAT_NAME}', got {data.get('format')!r}")
        version = get(data, "format_version", int, "format_version")
        if version < 1:  # versions start at 1: 0 or below is a hand edit, not an old package
            raise bad("format_version", f"is {version}; versions start at 1")
        if version > FORMAT_VERSION:
            raise bad("format_version", f"is {version}; this qualiface reads up to {FORMAT_VERSION} (upgrade)")
        backbone = get(data, "backbone", dict, "backbone")
        name = get(backbone, "name", str, "backbone.name")
        kwargs = get(backbone, "kwargs", dict, "backbone.kwargs")
        for key, limit in BACKBONE_KWARG_LIMITS.items():
            if key in kwargs:
                value = get(kwargs, key, (int, float), f"backbone.kwargs.{key}")
                if not 0 < value <= limit:
                    raise bad(f"backbone.kwargs.{key}", f"must be in (0, {limit:g}], got {value}")
        embedding_size = get(backbone, "embedding_size", int, "backbone.embedding_size")
        if not 0 < embedding_size <= MAX_EMBEDDING_SIZE:
            raise bad("backbone.embedding_size",
                      f"must be in 1..{MAX_EMBEDDING_SIZE}, got {embedding_size}")
        feature_dim = get(backbone, "feature_dim", int, "backbone.feature_dim", optional=True)
        head = get(data, "head", str, "head", optional=True)
        inp = get(data, "input", dict, "input")
        size = get(inp, "size", list, "input.size")
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                     and 0 < v <= MAX_INPUT_SIZE for v in size):
            raise bad("input.size", f"must be [height, width] integers in 1..{MAX_INPUT_SIZE}, "
                                    f"got {size}")
        order = get(inp, "channel_order", str, "input.channel_order")
        if order not in ("RGB", "BGR"):
            raise bad("input.channel_order", f"must be 'RGB' or 'BGR', got {order!r}")
        stats = {}
        for key in ("mean", "std"):
            values = get(inp, key, list, f"input.{key}")
            if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise bad(f"input.{key}", f"must be 3 numbers, got {values}")
            stats[key] = tuple(float(v) for v in values)
        for key, (low, high) in (("mean", MEAN_RANGE), ("std", STD_RANGE)):
            if not all(low <= v <= high for v in stats[key]):
                raise bad(f"input.{key}", f"must lie in [{low:g}, {high:g}] (pixels are scaled "
                                          f"to [0, 1] first), got {list(stats[key])}")
        quality = get(data, "quality", dict, "quality")
        kind = get(quality, "kind", str, "quality.kind")
        config = get(quality, "config", dict, "quality.config")
        if config.get("kind") != kind:  # the estimator is rebuilt from the config, not the kind
            raise bad("quality.kind", f"is {kind!r} but 'quality.config.kind' is "
                                      f"{config.get('kind')!r}: the package describes another quality")
        meaning = get(quality, "meaning", str, "quality.meaning")
        value_range = get(quality, "range", list, "quality.range")
        if len(value_range) != 2 or not all(v is None or isinstance(v, (int, float)) for v in value_range):
            raise bad("quality.range", f"must be [low, high] numbers or null, got {value_range}")
        if None not in value_range and value_range[0] > value_range[1]:
            raise bad("quality.range", f"must have low <= high, got {value_range}")
        requires_features = get(quality, "requires_features", bool, "quality.requires_features")
        calibration = data.get("calibration")
        if calibration is not None:
            try:
                calibration = QualityCalibration.from_dict(calibration)
            except CalibrationError as exc:
                raise ModelPackageError(f"{source}: {exc}") from None
        metadata = get(data, "metadata", dict, "metadata", optional=True) or {}
        return cls(
            backbone_name=name,
            backbone_kwargs=kwargs,
            embedding_size=embedding_size,
            feature_dim=feature_dim,
            quality=QualitySpec(kind, config, meaning, value_range, requires_features),
            head_name=head,
            input_size=(size[0], size[1]),
            channel_order=order,
            mean=stats["mean"],
            std=stats["std"],
            calibration=calibration,
            metadata=metadata,
            format_version=version,
        )


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)
