"""The inference entry point: ``Model.load(path)`` and ``model.embed(images)``.

A model package (``model.json`` + ``weights.safetensors``) is described, validated, written and
read by :mod:`qualiface.package` (the low module both ``train`` and ``infer`` use);
``Model.load(path)`` reads one back, validating JSON types and tensor shapes with errors that
name the file and the key, rebuilds the network and ``model.embed(images)`` returns raw
embeddings and raw quality.

The package names (``ModelSpec``, ``QualitySpec``, ``ModelPackageError``, ``save_model_package``,
``read_model_spec``, ``write_model_spec``, ``package_identity``, the format constants) and the
stored calibration (``QualityCalibration``, ``CalibrationError``) are re-exported here, so
``from qualiface.infer.model import save_model_package`` keeps working.

Depends on ``qualiface.backbones.build_backbone`` and
``qualiface.heads.quality.build_quality_estimator`` to rebuild the modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from qualiface.backbones import build_backbone
from qualiface.devices import DeviceError, parse_device
from qualiface.heads.quality import build_quality_estimator
from qualiface.infer.images import as_uint8_batch
from qualiface.package.calibration import CalibrationError, QualityCalibration  # noqa: F401
from qualiface.package.format import (  # noqa: F401  (re-exported: the package format)
    BACKBONE_KWARG_LIMITS,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_EMBEDDING_SIZE,
    MAX_INPUT_SIZE,
    MEAN_RANGE,
    MODEL_JSON,
    MODEL_JSON_LIMIT,
    QUALITY_MEANINGS,
    STD_RANGE,
    WEIGHTS_FILE,
    ModelPackageError,
    ModelSpec,
    QualitySpec,
)
from qualiface.package.io import (  # noqa: F401  (re-exported: package I/O)
    package_dir,
    package_identity,
    read_model_spec,
    save_model_package,
    write_model_spec,
)
from qualiface.package.validate import check_dtypes, check_finite, input_size_problem, load_into


class NonFiniteOutputError(ModelPackageError):
    """The network produced NaN/Inf for an image: a broken package, never a result to write.

    ``index`` is the image's position in the ``embed`` call; ``problem`` the message without
    the image name, for callers that name the image themselves.
    """

    def __init__(self, what: str, index: int, problem: str) -> None:
        super().__init__(f"{what}: {problem}")
        self.index = index
        self.problem = problem


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


def _checked_device(device: str | torch.device) -> torch.device:
    try:
        return parse_device(device)
    except DeviceError as exc:
        raise ModelPackageError(f"device {exc}") from None


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
        self.device = _checked_device(device)
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
        device = _checked_device(device)  # before reading anything: a typo is the cheap error
        folder = package_dir(path)
        spec = read_model_spec(folder)
        weights_path = folder / WEIGHTS_FILE
        try:
            tensors = load_file(str(weights_path))
        except FileNotFoundError:
            raise ModelPackageError(f"{weights_path}: missing") from None
        except (SafetensorError, OSError) as exc:
            raise ModelPackageError(f"{weights_path}: not a readable safetensors file ({exc})") from None
        check_finite(tensors, str(weights_path))
        try:
            backbone = build_backbone(spec.backbone_name, **spec.backbone_kwargs)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelPackageError(f"{folder / MODEL_JSON}: cannot build backbone '{spec.backbone_name}': {exc}") from None
        load_into(backbone, tensors, "backbone.", str(weights_path))
        if getattr(backbone, "embedding_size", spec.embedding_size) != spec.embedding_size:
            raise ModelPackageError(
                f"{folder / MODEL_JSON}: 'backbone.embedding_size' is {spec.embedding_size} but the "
                f"rebuilt backbone produces {backbone.embedding_size}"
            )
        built_feature_dim = getattr(backbone, "feature_dim", None)
        if spec.feature_dim is not None and built_feature_dim not in (None, spec.feature_dim):
            raise ModelPackageError(
                f"{folder / MODEL_JSON}: 'backbone.feature_dim' is {spec.feature_dim} but the "
                f"rebuilt backbone has {built_feature_dim}"
            )
        problem = input_size_problem(backbone, spec.input_size)
        if problem is not None:
            raise ModelPackageError(f"{folder / MODEL_JSON}: 'input.size': {problem} "
                                    "('backbone.kwargs.input_size')")
        quality_state = {k[len("quality."):]: v for k, v in tensors.items() if k.startswith("quality.")}
        try:
            estimator = build_quality_estimator(spec.quality.config, state_dict=quality_state)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ModelPackageError(f"{weights_path}: cannot rebuild the '{spec.quality.kind}' quality estimator: {exc}") from None
        check_dtypes(estimator, quality_state, "quality.", str(weights_path))
        built_requires = bool(getattr(estimator, "requires_features", False))
        if built_requires != spec.quality.requires_features:
            raise ModelPackageError(
                f"{folder / MODEL_JSON}: 'quality.requires_features' is "
                f"{str(spec.quality.requires_features).lower()} but the rebuilt "
                f"'{spec.quality.kind}' estimator {'needs' if built_requires else 'does not use'} "
                "the backbone features"
            )
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

