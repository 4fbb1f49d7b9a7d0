"""Image degradations with a ground-truth severity in [0, 1] (0 = untouched, 1 = worst).

Every degradation works on uint8 RGB tensors, one image (3, H, W) or a batch (B, 3, H, W), on
any device (JPEG round-trips through the CPU because it uses the OpenCV codec). A severity is a
float for the whole call or a (B,) tensor, one per image; samples at severity 0 are returned
bit-exactly unchanged. Randomness (noise, motion direction, occluder placement) comes from an
optional ``torch.Generator``, so a seeded call is reproducible.

Kinds (``DEGRADATIONS`` registry; constants are for 112x112 crops and scale with image size):

===============  =====================================================================
``downup``       area-downsample to scale ``1 - 0.9 s`` (1x ... 0.1x), bilinear back up
``gaussian_blur`` Gaussian blur, sigma ``4 s`` px (at 112 px)
``motion_blur``  linear motion blur of length ``20 s`` px at a uniformly random angle
``noise``        additive Gaussian noise, std ``40 s`` grey levels
``jpeg``         JPEG encode/decode at quality ``round(100 - 95 s)`` (100 ... 5)
``lowlight``     gamma ``1 + 1.5 s`` and gain ``1 - 0.75 s``, plus sensor noise std ``12 s``
``occlusion``    a random-colour rectangle covering ``40 s`` % of the image, random aspect
===============  =====================================================================

``CompositeDegradation`` applies several kinds, each with its own probability and severity
range, and records one severity per sample. Severities of the kinds applied to a sample are
combined as a probabilistic union, ``1 - prod_k (1 - s_k)`` (or ``max`` on request): it equals
the single severity when one kind is applied, grows with every extra damage, and stays in
[0, 1]. ``qgface_lq_config()`` is the preset for QGFace's low-quality view.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from qualiface.errors import QualifaceError
from qualiface.registry import Registry

# Every degradation maps (float32 images (B, 3, H, W) in [0, 255], severities (B,) in (0, 1],
# generator) -> float32 images. ``degrade`` handles validation, dtype and the severity-0 skip.
DEGRADATIONS: Registry = Registry("degradation")

REFERENCE_SIZE = 112  # pixel constants below are for 112-px crops and scale with the image
MIN_DOWNUP_SCALE = 0.1
MAX_GAUSSIAN_SIGMA = 4.0
MAX_MOTION_LENGTH = 20.0
MAX_NOISE_STD = 40.0
MIN_JPEG_QUALITY = 5
LOWLIGHT_MAX_GAMMA_INCREASE = 1.5
LOWLIGHT_MAX_GAIN_DROP = 0.75
LOWLIGHT_MAX_NOISE_STD = 12.0
MAX_OCCLUSION_AREA = 0.4

# Physical order: things in the scene, then the optics, then the sensor, then the encoder.
DEFAULT_KINDS: tuple[str, ...] = (
    "occlusion",
    "motion_blur",
    "gaussian_blur",
    "lowlight",
    "noise",
    "downup",
    "jpeg",
)


class DegradationError(QualifaceError, ValueError):
    """Invalid input to a degradation (bad severity, image dtype/shape, or config)."""


# ----------------------------------------------------------------------------- helpers


def _draw(sampler, shape: Sequence[int], generator, device) -> torch.Tensor:
    """Random tensor of ``shape`` (first axis = samples) from one generator, or from one
    generator per sample (row i from generator i, so a sample's draws do not depend on the
    rest of its batch). Drawn on the generator's device, then moved to ``device``."""
    shape = tuple(shape)
    if generator is None:
        return sampler(shape, device=device)
    if isinstance(generator, torch.Generator):
        return sampler(shape, generator=generator, device=generator.device).to(device)
    rows = [sampler(shape[1:], generator=g, device=g.device).to(device) for g in generator]
    return torch.stack(rows) if rows else torch.empty(shape, device=device)


def _uniform(shape: Sequence[int], generator, device) -> torch.Tensor:
    return _draw(torch.rand, shape, generator, device)


def _normal(shape: Sequence[int], generator, device) -> torch.Tensor:
    return _draw(torch.randn, shape, generator, device)


def _pixel_scale(images: torch.Tensor) -> float:
    """How much larger than a 112-px crop the images are (pixel constants scale with this)."""
    return min(images.shape[-2:]) / REFERENCE_SIZE


def _depthwise(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Filter each image with its own kernel: images (B, C, H, W), kernels (B, kh, kw).

    Border pixels are replicated so a blur does not darken the edges.
    """
    b, c, h, w = images.shape
    kh, kw = kernels.shape[-2:]
    padded = F.pad(images.reshape(1, b * c, h, w), (kw // 2, kw // 2, kh // 2, kh // 2),
                   mode="replicate")
    weight = kernels.to(images.dtype).repeat_interleave(c, dim=0).unsqueeze(1)
    return F.conv2d(padded, weight, groups=b * c).reshape(b, c, h, w)


def psnr(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB between uint8 images, per image.

    reference, other: (3, H, W) or (B, 3, H, W) -> () or (B,) float64; ``inf`` when identical.
    """
    if reference.shape != other.shape:
        raise DegradationError(f"psnr needs equal shapes, got {tuple(reference.shape)} "
                               f"and {tuple(other.shape)}")
    diff = reference.double() - other.double()
    mse = diff.pow(2).flatten(-3).mean(-1)
    return 10.0 * torch.log10(255.0**2 / mse)


# ------------------------------------------------------------------------ degradations


@DEGRADATIONS.register("downup", "resize", "downsample")
def _downup(images: torch.Tensor, severity: torch.Tensor, generator) -> torch.Tensor:
    h, w = images.shape[-2:]
    scale = 1.0 - (1.0 - MIN_DOWNUP_SCALE) * severity
    small_h = (h * scale).round().clamp(min=1).long().tolist()
    small_w = (w * scale).round().clamp(min=1).long().tolist()
    out = images.clone()
    # Images sharing a target size are resized together.
    for size in set(zip(small_h, small_w)):
        index = [i for i, s in enumerate(zip(small_h, small_w)) if s == size]
        if size == (h, w):
            continue
        small = F.interpolate(images[index], size=size, mode="area")
        out[index] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return out


@DEGRADATIONS.register("gaussian_blur", "blur")
def _gaussian_blur(images: torch.Tensor, severity: torch.Tensor, generator) -> torch.Tensor:
    max_sigma = MAX_GAUSSIAN_SIGMA * _pixel_scale(images)
    # A fixed radius (3 sigma of the worst case) so an image's result never depends on what
    # else is in its batch.
    radius = int(math.ceil(3.0 * max_sigma))
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    sigma = (max_sigma * severity).unsqueeze(1)
    kernel = torch.exp(-0.5 * (taps.unsqueeze(0) / sigma) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, 2R+1)
    blurred = _depthwise(images, kernel.unsqueeze(2))  # vertical pass
    return _depthwise(blurred, kernel.unsqueeze(1))  # horizontal pass


@DEGRADATIONS.register("motion_blur", "motion")
def _motion_blur(images: torch.Tensor, severity: torch.Tensor, generator) -> torch.Tensor:
    length = MAX_MOTION_LENGTH * _pixel_scale(images) * severity  # (B,)
    angle = _uniform((len(severity),), generator, images.device) * math.pi
    # Kernel weights fall off linearly with distance to the motion segment (an anti-aliased
    # line). Weights are exactly zero beyond half-length + 1, so sizing the kernel by the
    # batch's longest segment does not change any image's result.
    radius = int(math.ceil(float(length.max()) / 2.0 + 1.0))
    grid = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    v, u = torch.meshgrid(grid, grid, indexing="ij")  # v: rows (y), u: columns (x)
    dx, dy = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    half = (length / 2.0).view(-1, 1, 1)
    along = (u * dx + v * dy).clamp(min=-half, max=half)
    distance = torch.sqrt((u - along * dx) ** 2 + (v - along * dy) ** 2)
    kernel = (1.0 - distance).clamp(min=0.0)
    kernel = kernel / kernel.sum(dim=(1, 2), keepdim=True)
    return _depthwise(images, kernel)


@DEGRADATIONS.register("noise", "gaussian_noise")
def _noise(images: torch.Tensor, severity: torch.Tensor, generator) -> torch.Tensor:
    std = (MAX_NOISE_STD * severity).view(-1, 1, 1, 1)
    return images + std * _normal(images.shape, generator, images.device)


def jpeg_quality_for_severity(severity: float) -> int:
    """JPEG quality (5 ... 100) used at a severity in [0, 1]."""
    return int(round(100.0 - (100.0 - MIN_JPEG_QUALITY) * float(severity)))


def jpeg_severity_for_quality(quality: float) -> float:
    """Inverse of ``jpeg_quality_for_severity``: quality 100 -> 0, quality 5 -> 1."""
    return float(np.clip((100.0 - quality) / (100.0 - MIN_JPEG_QUALITY), 0.0, 1.0))


@DEGRADATIONS.register("jpeg", "compression")
def _jpeg(images: torch.Tensor, severity: torch.Tensor, generator) -> torch.Tensor:
    pixels = images.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    decoded = np.empty_like(pixels)
    for i, s in enumerate(severity.tolist()):
        # OpenCV's codec expects BGR; flipping keeps the chroma subsampling on true chroma.
        params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality_for_severity(s)]
        ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(pixels[i, :, :, ::-1]), params)
        if not ok:
            raise DegradationError("OpenCV failed to JPEG-encode an image")
        decoded[i] = cv2.imdecode(encoded, cv2.IMREAD_COLOR)[:, :, ::-1]
    return torch.from_numpy(decoded).to(images.device).permute(0, 3, 1, 2).float()


@DEGRADATIONS.register("lowlight", "low_light", "dark")
def _lowlight(images: torch.Tensor, severity: torch.Tensor, generator) -> torch.Tensor:
    s = severity.view(-1, 1, 1, 1)
    gamma = 1.0 + LOWLIGHT_MAX_GAMMA_INCREASE * s
    gain = 1.0 - LOWLIGHT_MAX_GAIN_DROP * s
    dark = 255.0 * gain * (images / 255.0).clamp(min=0.0) ** gamma
    # Sensor noise: with little light the relative noise grows, which is what hurts recognition.
    noise = LOWLIGHT_MAX_NOISE_STD * s * _normal(images.shape, generator, images.device)
    return dark + noise


@DEGRADATIONS.register("occlusion", "occlude")
def _occlusion(images: torch.Tensor, severity: torch.Tensor, generator) -> torch.Tensor:
    b, _, h, w = images.shape
    draws = _uniform((b, 6), generator, images.device)  # aspect, top, left, r, g, b
    area = MAX_OCCLUSION_AREA * severity * h * w
    aspect = torch.exp((draws[:, 0] * 2.0 - 1.0) * math.log(2.0))  # height/width in [1/2, 2]
    box_h = torch.sqrt(area * aspect).round().clamp(0, h)
    box_w = (area / box_h.clamp(min=1.0)).round().clamp(0, w)
    top = torch.floor(draws[:, 1] * (h - box_h + 1))
    left = torch.floor(draws[:, 2] * (w - box_w + 1))
    rows = torch.arange(h, device=images.device, dtype=torch.float32).view(1, h, 1)
    cols = torch.arange(w, device=images.device, dtype=torch.float32).view(1, 1, w)
    inside = (
        (rows >= top.view(-1, 1, 1)) & (rows < (top + box_h).view(-1, 1, 1))
        & (cols >= left.view(-1, 1, 1)) & (cols < (left + box_w).view(-1, 1, 1))
    ).unsqueeze(1)
    colour = (draws[:, 3:6] * 255.0).view(b, 3, 1, 1)
    return torch.where(inside, colour.expand_as(images), images)


# --------------------------------------------------------------------------- public API


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise DegradationError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise DegradationError(f"images must be uint8, got {images.dtype}")
    if images.ndim not in (3, 4) or images.shape[-3] != 3:
        raise DegradationError(
            f"images must be (3, H, W) or (B, 3, H, W) RGB, got shape {tuple(images.shape)}"
        )


def _check_severity(severity, batch: int, device) -> torch.Tensor:
    """float or (B,) severities -> (B,) float32 tensor on ``device``; raises if outside [0, 1]."""
    values = torch.as_tensor(severity, dtype=torch.float32)
    if values.ndim == 0:
        values = values.expand(batch)
    if values.shape != (batch,):
        raise DegradationError(
            f"severity must be a float or one value per image ({batch}), got shape "
            f"{tuple(values.shape)}"
        )
    if values.numel() and (not torch.isfinite(values).all() or values.min() < 0.0
                           or values.max() > 1.0):
        raise DegradationError(f"severity must be in [0, 1], got {values.tolist()}")
    return values.to(device)


def _check_generators(generator, batch: int):
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    generators = list(generator)
    if len(generators) != batch or not all(isinstance(g, torch.Generator) for g in generators):
        raise DegradationError(
            f"generator must be a torch.Generator or one per image ({batch}), got "
            f"{len(generators)} items"
        )
    return generators


def degrade(
    images: torch.Tensor,
    kind: str,
    severity: float | Sequence[float] | torch.Tensor,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Apply one named degradation.

    Args:
        images: uint8 RGB, (3, H, W) or (B, 3, H, W), any device.
        kind: a name in ``DEGRADATIONS`` (see the module docstring).
        severity: in [0, 1]; a float for every image or a (B,) tensor/sequence.
        generator: randomness for the random kinds (reproducible when seeded): one generator
            for the call, or a sequence of B generators, one per image, which makes each
            image's result independent of the batch it is in.

    Returns:
        uint8 tensor of the same shape and device; images at severity 0 are unchanged.
    """
    fn = DEGRADATIONS.get(kind)
    _check_images(images)
    single = images.ndim == 3
    batch = images.unsqueeze(0) if single else images
    values = _check_severity(severity, batch.shape[0], batch.device)
    generator = _check_generators(generator, batch.shape[0])
    active = torch.nonzero(values > 0).flatten()
    if active.numel() == 0:
        return images.clone()
    if active.numel() == batch.shape[0]:  # common case: no gather/scatter needed
        out = fn(batch.float(), values, generator).round_().clamp_(0, 255).to(torch.uint8)
        return out[0] if single else out
    if isinstance(generator, list):
        generator = [generator[i] for i in active.tolist()]
    out = batch.clone()
    damaged = fn(batch[active].float(), values[active], generator)
    out[active] = damaged.round_().clamp_(0, 255).to(torch.uint8)
    return out[0] if single else out


@dataclass(frozen=True)
class KindSpec:
    """One ingredient of a composite: apply ``kind`` with ``probability``, severity uniform in
    ``severity_range``."""

    kind: str
    probability: float = 0.5
    severity_range: tuple[float, float] = (0.0, 1.0)


@dataclass
class CompositeConfig:
    """Which degradations a ``CompositeDegradation`` applies, in order.

    specs: the kinds with their probability and severity range, applied in this order.
    clean_probability: chance that a sample gets no degradation at all.
    combine: "union" (``1 - prod(1 - s_k)``) or "max" for the recorded per-sample severity.
    """

    specs: tuple[KindSpec, ...] = field(
        default_factory=lambda: tuple(KindSpec(kind, 0.3) for kind in DEFAULT_KINDS)
    )
    clean_probability: float = 0.0
    combine: str = "union"

    @classmethod
    def uniform(
        cls,
        kinds: Sequence[str] = DEFAULT_KINDS,
        probability: float = 0.3,
        severity_range: tuple[float, float] = (0.0, 1.0),
        clean_probability: float = 0.0,
        combine: str = "union",
    ) -> CompositeConfig:
        """The same probability and severity range for every kind."""
        specs = tuple(KindSpec(k, probability, tuple(severity_range)) for k in kinds)
        return cls(specs=specs, clean_probability=clean_probability, combine=combine)


def downup_severity_for_scale(scale: float) -> float:
    """Severity of ``downup`` that resizes to ``scale`` (1.0 -> 0, 0.1 -> 1)."""
    return float(np.clip((1.0 - scale) / (1.0 - MIN_DOWNUP_SCALE), 0.0, 1.0))


def qgface_lq_config(
    scale_range: tuple[float, float] = (0.1, 0.5),
    jpeg_quality_range: tuple[int, int] = (30, 90),
) -> CompositeConfig:
    """QGFace's low-quality view: always down-up sample to 0.1-0.5x, then always JPEG.

    The recorded severity (union of the two) ranges from about 0.6 to 1.
    """
    lo_scale, hi_scale = sorted(scale_range)
    lo_q, hi_q = sorted(jpeg_quality_range)
    return CompositeConfig(
        specs=(
            KindSpec("downup", 1.0,
                     (downup_severity_for_scale(hi_scale), downup_severity_for_scale(lo_scale))),
            KindSpec("jpeg", 1.0,
                     (jpeg_severity_for_quality(hi_q), jpeg_severity_for_quality(lo_q))),
        ),
    )


class CompositeDegradation:
    """Random mix of degradations with one recorded severity per sample.

    ``__call__(images, generator) -> (degraded, severity)``; ``sample_plan`` and ``apply_plan``
    split the two steps so a dataset can know every sample's severity without rendering.
    """

    def __init__(self, config: CompositeConfig | None = None) -> None:
        config = config or CompositeConfig()
        if not config.specs:
            raise DegradationError("a composite degradation needs at least one kind")
        for spec in config.specs:
            DEGRADATIONS.get(spec.kind)  # unknown kind: RegistryError listing the known ones
            lo, hi = spec.severity_range
            if not (0.0 <= lo <= hi <= 1.0):
                raise DegradationError(
                    f"severity_range of '{spec.kind}' must satisfy 0 <= lo <= hi <= 1, "
                    f"got {spec.severity_range}"
                )
            if not 0.0 <= spec.probability <= 1.0:
                raise DegradationError(
                    f"probability of '{spec.kind}' must be in [0, 1], got {spec.probability}"
                )
        if not 0.0 <= config.clean_probability <= 1.0:
            raise DegradationError(
                f"clean_probability must be in [0, 1], got {config.clean_probability}"
            )
        if config.combine not in ("union", "max"):
            raise DegradationError(f"combine must be 'union' or 'max', got '{config.combine}'")
        self.config = config
        self.kinds = tuple(spec.kind for spec in config.specs)
        self._probability = torch.tensor([s.probability for s in config.specs])
        self._low = torch.tensor([s.severity_range[0] for s in config.specs])
        self._high = torch.tensor([s.severity_range[1] for s in config.specs])

    def sample_plan(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Per-sample, per-kind severities (batch_size, K) on the CPU; 0 = kind not applied."""
        draws = _uniform((batch_size, 2 * len(self.kinds) + 1), generator, "cpu")
        k = len(self.kinds)
        applied = draws[:, :k] < self._probability
        severity = self._low + (self._high - self._low) * draws[:, k : 2 * k]
        clean = draws[:, 2 * k] < self.config.clean_probability
        return torch.where(applied & ~clean.unsqueeze(1), severity, torch.zeros(()))

    def combine(self, plan: torch.Tensor) -> torch.Tensor:
        """(B, K) per-kind severities -> (B,) recorded severity in [0, 1]."""
        if self.config.combine == "max":
            return plan.max(dim=1).values
        return 1.0 - torch.prod(1.0 - plan, dim=1)

    def apply_plan(
        self,
        images: torch.Tensor,
        plan: torch.Tensor,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Apply a plan from ``sample_plan`` to uint8 images (B, 3, H, W) or (3, H, W).

        ``generator`` may be one per image (see ``degrade``)."""
        _check_images(images)
        single = images.ndim == 3
        out = images.unsqueeze(0) if single else images
        plan = torch.as_tensor(plan, dtype=torch.float32).reshape(-1, len(self.kinds))
        if plan.shape[0] != out.shape[0]:
            raise DegradationError(
                f"plan has {plan.shape[0]} rows for {out.shape[0]} images"
            )
        for k, kind in enumerate(self.kinds):
            if bool((plan[:, k] > 0).any()):
                out = degrade(out, kind, plan[:, k], generator)
        return out[0] if single else out

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images -> (degraded uint8 images, severity per sample float32 (B,) or ())."""
        _check_images(images)
        batch = 1 if images.ndim == 3 else images.shape[0]
        plan = self.sample_plan(batch, generator)
        degraded = self.apply_plan(images, plan, generator)
        severity = self.combine(plan).to(images.device)
        return degraded, (severity[0] if images.ndim == 3 else severity)


def degraded_copies(images: torch.Tensor, severities, *, seed: int = 0, chunk: int = 256,
                    shared_draws: bool = True, progress: bool = False
                    ) -> tuple[dict[float, torch.Tensor], list[str]]:
    """Degraded copies of a test set, one per severity level, for quality evaluation.

    images: uint8 (N, 3, H, W). Each image gets one degradation kind, drawn uniformly from
    ``DEFAULT_KINDS`` with ``seed`` and kept the same at every level. With ``shared_draws``
    (the default) every level also reuses the same random draws (occluder colour and place,
    noise pattern, motion direction), so an image's copies differ only in severity and a more
    severe copy is more damaged. ``shared_draws=False`` seeds each level's draws with the
    severity as well (``seed * 1000 + round(1000 * severity)``): levels are more damaged on
    average but not image by image (one occlusion measured 13.6 dB PSNR at 0.4, 17.7 dB at 0.8);
    kept only because the real-face benchmark's test set was built that way
    (``bench/real_faces.py``). Returns ``({severity: uint8 (N, 3, H, W)}, kind name per
    image)``; deterministic for a given seed (an integer >= 0). ``progress``: a bar over the
    image copies made (images x levels; about 1.7 ms each on a CPU core at 112 px).
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise DegradationError(f"expected uint8 (N, 3, H, W) images, got {images.dtype} "
                               f"{tuple(images.shape)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DegradationError(f"the degradation seed must be an integer >= 0, got {seed!r}")
    from qualiface.progress import make_progress  # lazy: rich only when copies are made

    kinds = np.random.default_rng(seed).integers(len(DEFAULT_KINDS), size=len(images))
    severities = list(severities)
    copies = {}
    with make_progress(enabled=progress) as bar:
        task = bar.add_task("degrading", total=len(images) * len(severities))
        for severity in severities:
            severity = float(severity)
            if not 0.0 <= severity <= 1.0:
                raise DegradationError(f"severity must be in [0, 1], got {severity}")
            out = images.clone()
            generator = torch.Generator().manual_seed(
                seed if shared_draws else seed * 1000 + round(1000 * severity))
            for k, kind in enumerate(DEFAULT_KINDS):
                rows = torch.from_numpy(np.flatnonzero(kinds == k))
                for start in range(0, len(rows), chunk):
                    part = rows[start:start + chunk]
                    out[part] = degrade(images[part], kind, severity, generator)
                    bar.advance(task, len(part))
            copies[severity] = out
    return copies, [DEFAULT_KINDS[k] for k in kinds]
