"""Writing and reading model packages: ``save_model_package``, ``read_model_spec``,
``write_model_spec`` and ``package_identity`` (the content hash evaluation caches under).

``save_model_package`` (the trainer calls it) writes ``weights.safetensors`` then
``model.json``, each with the one atomic write (``qualiface.files``), and never writes a
``model.json`` it could not read back. Loading a package for inference (``Model.load``) is
``qualiface.infer.model``; this module needs no backbone or head code, only the modules given.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from qualiface import __version__
from qualiface.data.transforms import IMAGE_SIZE, INPUT_MEAN, INPUT_STD
from qualiface.files import (
    FileReadError,
    atomic_write,
    open_regular,
    read_small_text_as,
    write_text_atomic,
)
from qualiface.package.calibration import QualityCalibration
from qualiface.package.format import (
    FORMAT_NAME,
    MODEL_JSON,
    MODEL_JSON_LIMIT,
    QUALITY_MEANINGS,
    WEIGHTS_FILE,
    ModelPackageError,
    ModelSpec,
    QualitySpec,
)
from qualiface.package.validate import input_size_problem


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
    out_dir = Path(out_dir)
    if input_size is None:
        side = int((backbone_kwargs or {}).get("input_size", IMAGE_SIZE))
        input_size = (side, side)
    problem = input_size_problem(backbone, input_size)
    if problem is not None:
        raise ValueError(f"{out_dir}: {problem}")
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
    # Weights first: model.json, written last, is what makes the folder a package. An earlier
    # model.json goes just before the new weights replace the old ones, so a failure between
    # the two writes leaves no package rather than new weights under the old description
    # (its calibration, normalisation and metadata) that would load without complaint.
    weights = safetensors.torch.save(tensors, metadata={"format": FORMAT_NAME})
    atomic_write(out_dir / WEIGHTS_FILE, lambda handle: handle.write(weights),
                 before_replace=lambda _: (out_dir / MODEL_JSON).unlink(missing_ok=True))
    write_text_atomic(out_dir / MODEL_JSON, text + "\n")
    return out_dir


def read_model_spec(path: str | Path) -> ModelSpec:
    """Read and validate ``model.json`` of a package (``path``: the directory or the JSON file)."""
    folder = package_dir(path)
    if folder.is_file():  # e.g. --model given weights.safetensors or a checkpoint
        raise ModelPackageError(f"{folder}: is a file, not a model package folder (give the "
                                f"folder holding {MODEL_JSON} and {WEIGHTS_FILE})")
    json_path = folder / MODEL_JSON
    text = read_small_text_as(json_path, ModelPackageError, what=MODEL_JSON,
                              limit=MODEL_JSON_LIMIT,
                              missing=f"missing (is {folder} a qualiface model package?)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelPackageError(f"{json_path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except RecursionError:  # the decoder recurses once per nesting level
        raise ModelPackageError(f"{json_path}: JSON nested too deeply to be a model "
                                "description") from None
    return ModelSpec.from_json(data, source=str(json_path))


def write_model_spec(path: str | Path, spec: ModelSpec) -> None:
    """Rewrite ``model.json`` of an existing package (e.g. after fitting a calibration)."""
    json_path = package_dir(path) / MODEL_JSON
    text = json.dumps(spec.to_json(), indent=2, allow_nan=False)
    ModelSpec.from_json(json.loads(text), source=str(json_path))  # never replace it by one we cannot read
    write_text_atomic(json_path, text + "\n")


def package_dir(path: str | Path) -> Path:
    """The package folder for ``path`` (the folder itself, or its ``model.json``)."""
    path = Path(path)
    return path.parent if path.name == MODEL_JSON else path


def package_identity(path: str | Path) -> str:
    """A content hash of a model package (its two files, ``model.json`` and the weights): the
    key under which evaluation caches a model's features.

    Only the package's own files: anything else in the folder (notes, a symlink to a 50 GB
    sparse file, a device) neither changes the key nor gets read. ``ModelPackageError`` when
    either file is missing or is not a regular file.
    """
    folder = package_dir(path)
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
