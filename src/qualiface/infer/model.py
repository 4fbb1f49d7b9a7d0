"""The self-describing model package and the inference entry point.

A model package is a directory with two files:

- ``weights.safetensors``: the backbone tensors (prefix ``backbone.``) and the quality
  estimator tensors (prefix ``quality.``); safetensors, so loading never unpickles anything.
- ``model.json``: everything needed to rebuild and use the model without the training config:
  format version, backbone name + constructor kwargs, embedding size, head name, input size,
  normalisation mean/std, channel order, the quality definition (kind, estimator config,
  meaning, range), an optional quality calibration, and free-form training metadata.

``save_model_package(...)`` writes one (the trainer calls it); ``Model.load(path)`` reads it
back, validating JSON types and tensor shapes with errors that name the file and the key, and
``model.embed(images)`` returns raw embeddings and raw quality.

Depends on ``qualiface.backbones.build_backbone`` and
``qualiface.heads.quality.build_quality_estimator`` to rebuild the modules, and on
``qualiface.infer.calibrate`` for the stored calibration.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qualiface.data.transforms import IMAGE_SIZE, INPUT_MEAN, INPUT_STD
from qualiface.errors import QualifaceError
from qualiface.files import write_bytes_atomic, write_text_atomic
from qualiface.infer.calibrate import CalibrationError, QualityCalibration
from qualiface.infer.images import as_uint8_batch

FORMAT_NAME = "qualiface-model"
FORMAT_VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS_FILE = "weights.safetensors"

# What each quality kind means, for model.json readers who never saw the training code.
# An estimator may override these with ``meaning`` / ``value_range`` attributes.
QUALITY_MEANINGS: dict[str, tuple[str, list[float | None]]] = {
    "norm": ("L2 norm of the unnormalised embedding; higher = more recognisable", [0.0, None]),
    "qcface": (
        "QCFace recognizability p, recovered from the embedding norm by inverting the QCFace "
        "norm prior; higher = more recognisable",
        [0.0, 1.0],
    ),
    "eqface": (
        "EQFace quality branch output (sigmoid over backbone features); higher = more recognisable",
        [0.0, 1.0],
    ),
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


class NonFiniteOutputError(ModelPackageError):
    """The network produced NaN/Inf for an image: a broken package, never a result to write.

    ``index`` is the image's position in the ``embed`` call; ``problem`` the message without
    the image name, for callers that name the image themselves.
    """

    def __init__(self, what: str, index: int, problem: str) -> None:
        super().__init__(f"{what}: {problem}")
        self.index = index
        self.problem = problem


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


class InferenceModule(nn.Module):
    """Backbone + quality estimator on *normalised float* input: the exported computation.

    forward(x: float32 (B, 3, H, W), already ``(x/255 - mean)/std`` and channel-ordered)
    -> (embedding (B, D) raw unnormalised, quality (B,) raw).
    """

    def __init__(self, backbone: nn.Module, quality_estimator: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.quality_estimator = quality_estimator
        self.requires_features = bool(getattr(quality_estimator, "requires_features", False))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.requires_features:
            embedding, features = self.backbone(x, return_features=True)
            quality = self.quality_estimator(embedding, features)
        else:
            embedding = self.backbone(x)
            quality = self.quality_estimator(embedding)
        return embedding, quality.reshape(-1)


def normalise_embeddings(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (B, D) -> (L2-normalised (B, D), norms (B,)): what ``embed`` writes, and what the
    exported ONNX graph outputs."""
    norms = embeddings.norm(dim=1)
    return embeddings / norms.clamp_min(1e-12).unsqueeze(1), norms


@dataclass
class EmbedResult:
    """Everything ``Model.embed_full`` computes for a batch of B images (CPU tensors).

    embeddings:         (B, D) float32, L2-normalised (cosine similarity = dot product).
    norms:              (B,) float32 L2 norm of the raw embedding.
    quality:            (B,) float32 raw quality (see the package's ``quality.meaning``).
    calibrated_quality: (B,) float32 P(pair with this face verified correctly), or None when
                        the package has no calibration.
    """

    embeddings: torch.Tensor
    norms: torch.Tensor
    quality: torch.Tensor
    calibrated_quality: torch.Tensor | None


def _quality_spec(estimator: nn.Module) -> QualitySpec:
    if not hasattr(estimator, "config"):
        raise TypeError("the quality estimator must have .config() -> dict (with 'kind')")
    config = estimator.config()
    if not isinstance(config, dict) or not isinstance(config.get("kind"), str):
        raise TypeError(f"quality_estimator.config() must be a dict with a 'kind' string, got {config!r}")
    json.dumps(config)  # fail now, not at load time, when the config is not JSON-able
    kind = config["kind"]
    meaning, value_range = QUALITY_MEANINGS.get(kind, (f"quality of kind '{kind}'; higher = better", [None, None]))
    meaning = getattr(estimator, "meaning", meaning)
    value_range = list(getattr(estimator, "value_range", value_range))
    return QualitySpec(kind, config, meaning, value_range, bool(getattr(estimator, "requires_features", False)))


def _state_tensors(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    # Clone so tied / shared-storage tensors do not trip safetensors' aliasing check.
    return {f"{prefix}{k}": v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def save_model_package(
    out_dir: str | Path,
    *,
    backbone: nn.Module,
    backbone_name: str,
    backbone_kwargs: dict | None,
    quality_estimator: nn.Module,
    head_name: str | None = None,
    calibration: QualityCalibration | dict | None = None,
    metadata: dict | None = None,
    input_size: Sequence[int] | None = None,
    channel_order: str = "RGB",
    mean: Sequence[float] = (INPUT_MEAN,) * 3,
    std: Sequence[float] = (INPUT_STD,) * 3,
) -> Path:
    """Write a model package directory (``model.json`` + ``weights.safetensors``); returns it.

    ``backbone_kwargs`` must be what ``build_backbone(backbone_name, **kwargs)`` needs to
    rebuild the same architecture (JSON-able). ``quality_estimator`` is the module returned by
    the head's ``quality_estimator()``. ``channel_order`` / ``mean`` / ``std`` describe the
    input the weights were trained on (the project convention is RGB, 0.5, 0.5).
    ``input_size`` (H, W) defaults to the backbone's ``input_size`` kwarg, else 112x112.
    """
    from safetensors.torch import save

    from qualiface import __version__

    out_dir = Path(out_dir)
    if input_size is None:
        side = int((backbone_kwargs or {}).get("input_size", IMAGE_SIZE))
        input_size = (side, side)
    if isinstance(calibration, dict):
        calibration = QualityCalibration.from_dict(calibration)
    spec = ModelSpec(
        backbone_name=backbone_name,
        backbone_kwargs=dict(backbone_kwargs or {}),
        embedding_size=int(getattr(backbone, "embedding_size")),
        feature_dim=getattr(backbone, "feature_dim", None),
        quality=_quality_spec(quality_estimator),
        head_name=head_name,
        input_size=(int(input_size[0]), int(input_size[1])),
        channel_order=channel_order,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        calibration=calibration,
        metadata={"qualiface_version": __version__, **(metadata or {})},
    )
    document = spec.to_json()
    text = json.dumps(document, indent=2, allow_nan=False)  # strict JSON: a NaN would not reload elsewhere
    ModelSpec.from_json(json.loads(text), source=str(out_dir / MODEL_JSON))  # never write what we cannot read
    tensors = {**_state_tensors(backbone, "backbone."), **_state_tensors(quality_estimator, "quality.")}
    # Weights first: model.json, written last, is what makes the folder a package.
    write_bytes_atomic(out_dir / WEIGHTS_FILE, save(tensors, metadata={"format": FORMAT_NAME}))
    write_text_atomic(out_dir / MODEL_JSON, text + "\n")
    return out_dir


def read_model_spec(path: str | Path) -> ModelSpec:
    """Read and validate ``model.json`` of a package (``path``: the directory or the JSON file)."""
    from qualiface.files import FileReadError, read_small_text

    folder = _package_dir(path)
    if folder.is_file():  # e.g. --model given weights.safetensors or a checkpoint
        raise ModelPackageError(f"{folder}: is a file, not a model package folder (give the "
                                f"folder holding {MODEL_JSON} and {WEIGHTS_FILE})")
    json_path = folder / MODEL_JSON
    try:
        data = json.loads(read_small_text(json_path, limit=MODEL_JSON_LIMIT, what=MODEL_JSON))
    except FileNotFoundError:
        raise ModelPackageError(f"{json_path}: missing (is {json_path.parent} a qualiface model package?)") from None
    except FileReadError as exc:  # a device, a FIFO or a huge file: refused unread
        raise ModelPackageError(str(exc)) from None
    except OSError as exc:
        raise ModelPackageError(f"{json_path}: cannot read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise ModelPackageError(f"{json_path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise ModelPackageError(f"{json_path}: not UTF-8 text (byte {exc.start})") from None
    except RecursionError:  # the decoder recurses once per nesting level
        raise ModelPackageError(f"{json_path}: JSON nested too deeply to be a model "
                                "description") from None
    return ModelSpec.from_json(data, source=str(json_path))


def write_model_spec(path: str | Path, spec: ModelSpec) -> None:
    """Rewrite ``model.json`` of an existing package (e.g. after fitting a calibration)."""
    json_path = _package_dir(path) / MODEL_JSON
    write_text_atomic(json_path, json.dumps(spec.to_json(), indent=2, allow_nan=False) + "\n")


def _package_dir(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.name == MODEL_JSON else path


def _load_into(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, source: str) -> None:
    """Strict load with errors that say which tensor is missing, extra or mis-shaped."""
    expected = module.state_dict()
    given = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing or extra:
        details = []
        if missing:
            details.append(f"missing {len(missing)} (first: {prefix}{missing[0]})")
        if extra:
            details.append(f"unexpected {len(extra)} (first: {prefix}{extra[0]})")
        raise ModelPackageError(f"{source}: tensors do not match the architecture: {'; '.join(details)}")
    for key, value in expected.items():
        if tuple(given[key].shape) != tuple(value.shape):
            raise ModelPackageError(
                f"{source}: tensor '{prefix}{key}' has shape {tuple(given[key].shape)}, "
                f"the architecture expects {tuple(value.shape)}"
            )
    _check_dtypes(module, given, prefix, source)
    module.load_state_dict(given, strict=True)


def _check_dtypes(module: nn.Module, given: dict[str, torch.Tensor], prefix: str, source: str) -> None:
    """Each tensor's dtype must suit the architecture's: a float parameter needs float data.

    ``load_state_dict`` silently casts, so float32 bytes relabelled I32 in the safetensors
    header (same size, so the header still checks out) would load as huge integers and give
    NaN or identical embeddings. Float widths may differ (a float16 package loads into float32);
    integer buffers (BatchNorm's step counter) need integer data.
    """
    for key, value in module.state_dict().items():
        tensor = given.get(key)
        if tensor is None:
            continue
        if value.is_floating_point():
            fits = tensor.is_floating_point()
        else:
            fits = tensor.dtype == value.dtype or (
                not tensor.is_floating_point() and not tensor.is_complex()
                and tensor.dtype != torch.bool and value.dtype != torch.bool)
        if not fits:
            raise ModelPackageError(f"{source}: tensor '{prefix}{key}' has dtype "
                                    f"{str(tensor.dtype).removeprefix('torch.')}, the architecture "
                                    f"expects {str(value.dtype).removeprefix('torch.')}")


def _check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN/Inf (a flipped exponent bit, a diverged run), naming the tensor."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelPackageError(f"{source}: tensor '{key}' holds NaN or Inf values")


class Model:
    """A loaded model package, ready to embed images (eval mode, no grad, batched)."""

    def __init__(self, spec: ModelSpec, backbone: nn.Module, quality_estimator: nn.Module, device: str = "cpu",
                 source: str = "the model"):
        self.spec = spec
        self.source = source  # the package folder, for errors about what it computes
        self.device = torch.device(device)
        self.module = InferenceModule(backbone, quality_estimator).to(self.device).eval()
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        self._mean, self._std = mean.to(self.device), std.to(self.device)

    def to(self, device: str | torch.device) -> Model:
        """Move the network to ``device`` (in place); returns self."""
        self.device = torch.device(device)
        self.module.to(self.device)
        self._mean, self._std = self._mean.to(self.device), self._std.to(self.device)
        return self

    @property
    def calibration(self) -> QualityCalibration | None:
        return self.spec.calibration

    @property
    def embedding_size(self) -> int:
        return self.spec.embedding_size

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> Model:
        """Load a package directory (or its ``model.json``) onto ``device``.

        Needs only ``model.json`` and ``weights.safetensors``: no training config, no pickle.
        Raises :class:`ModelPackageError` naming the file and key on any inconsistency.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from qualiface.backbones import build_backbone
        from qualiface.heads.quality import build_quality_estimator

        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ModelPackageError(f"device '{device}' requested but CUDA is not available")
        folder = _package_dir(path)
        spec = read_model_spec(folder)
        weights_path = folder / WEIGHTS_FILE
        try:
            tensors = load_file(str(weights_path))
        except FileNotFoundError:
            raise ModelPackageError(f"{weights_path}: missing") from None
        except (SafetensorError, OSError) as exc:
            raise ModelPackageError(f"{weights_path}: not a readable safetensors file ({exc})") from None
        _check_finite(tensors, str(weights_path))
        try:
            backbone = build_backbone(spec.backbone_name, **spec.backbone_kwargs)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelPackageError(f"{folder / MODEL_JSON}: cannot build backbone '{spec.backbone_name}': {exc}") from None
        _load_into(backbone, tensors, "backbone.", str(weights_path))
        if getattr(backbone, "embedding_size", spec.embedding_size) != spec.embedding_size:
            raise ModelPackageError(
                f"{folder / MODEL_JSON}: 'backbone.embedding_size' is {spec.embedding_size} but the "
                f"rebuilt backbone produces {backbone.embedding_size}"
            )
        quality_state = {k[len("quality."):]: v for k, v in tensors.items() if k.startswith("quality.")}
        try:
            estimator = build_quality_estimator(spec.quality.config, state_dict=quality_state)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ModelPackageError(f"{weights_path}: cannot rebuild the '{spec.quality.kind}' quality estimator: {exc}") from None
        _check_dtypes(estimator, quality_state, "quality.", str(weights_path))
        return cls(spec, backbone, estimator, device=str(device), source=str(folder))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) RGB -> the float input the network was trained on (this device)."""
        x = images.to(self.device, non_blocking=True).float().div_(255.0)
        if self.spec.channel_order == "BGR":
            x = x.flip(1)
            # mean/std are stored in the network's own channel order, so no flip for them.
        return (x - self._mean) / self._std

    @torch.no_grad()
    def embed(self, images, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed images -> (raw unnormalised embeddings float32 (B, D), raw quality (B,)).

        ``images``: uint8 tensor (B, 3, H, W) RGB, uint8 numpy (B, H, W, 3) RGB, or a list of
        file paths; H, W must equal the package's input size. Results are CPU tensors.
        Raises :class:`NonFiniteOutputError` (naming the path, or the image's index) when the
        network returns NaN/Inf, so no caller ever writes or compares NaN embeddings.
        """
        batch = as_uint8_batch(images, self.spec.input_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        embeddings, qualities = [], []
        for start in range(0, batch.shape[0], batch_size):
            embedding, quality = self.module(self.preprocess(batch[start : start + batch_size]))
            embedding, quality = embedding.float().cpu(), quality.float().cpu()
            finite = torch.isfinite(embedding).all(dim=1) & torch.isfinite(quality)
            if not bool(finite.all()):
                index = start + int((~finite).nonzero()[0, 0])
                what = (str(images[index]) if isinstance(images, (list, tuple))
                        else f"image {index}")
                raise NonFiniteOutputError(what, index, (
                    f"model {self.source} produced a non-finite embedding or quality (NaN/Inf); "
                    "its weights or input.mean/std are broken"))
            embeddings.append(embedding)
            qualities.append(quality)
        return torch.cat(embeddings), torch.cat(qualities)

    def embed_full(self, images, batch_size: int = 64) -> EmbedResult:
        """Like :meth:`embed`, plus normalised embeddings, norms and calibrated quality."""
        embeddings, quality = self.embed(images, batch_size=batch_size)
        return self.finish(embeddings, quality)

    def finish(self, embeddings: torch.Tensor, quality: torch.Tensor) -> EmbedResult:
        """Raw (embeddings, quality) -> :class:`EmbedResult` (normalise, calibrate)."""
        normalised, norms = normalise_embeddings(embeddings)
        calibrated = None
        if self.spec.calibration is not None:
            calibrated = torch.from_numpy(self.spec.calibration.apply(quality))
        return EmbedResult(normalised, norms, quality, calibrated)



def package_identity(path: str | Path) -> str:
    """A content hash of a model package (its two files, ``model.json`` and the weights): the
    key under which evaluation caches a model's features.

    Only the package's own files: anything else in the folder (notes, a symlink to a 50 GB
    sparse file, a device) neither changes the key nor gets read. ``ModelPackageError`` when
    either file is missing or is not a regular file.
    """
    import hashlib

    from qualiface.files import FileReadError, open_regular

    folder = _package_dir(path)
    digest = hashlib.sha256()
    for name in (MODEL_JSON, WEIGHTS_FILE):
        digest.update(name.encode())
        try:
            with open_regular(folder / name, what="model package file") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except FileReadError as exc:  # its message names the file and the problem
            raise ModelPackageError(str(exc)) from None
        except OSError as exc:
            raise ModelPackageError(f"{folder / name}: cannot read ({exc.strerror or exc})") from None
    return digest.hexdigest()


def package_embed_fn(path: str | Path, device: str = "cpu"):
    """Load a model package -> ``(embed_fn, model_id)`` for ``eval.features.extract_features``
    (``embed_fn(uint8 images) -> (raw embeddings, quality)``)."""
    model = Model.load(path, device=device)

    def embed(images):
        try:
            return model.embed(images, batch_size=len(images))
        except NonFiniteOutputError as exc:  # batch positions mean nothing to the eval user
            raise ModelPackageError(exc.problem) from None
        except ValueError as exc:  # wrong image size or layout: one clear line, not a traceback
            raise ModelPackageError(f"{path}: cannot embed these images: {exc}") from None

    return embed, package_identity(path)
