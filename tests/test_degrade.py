"""Degradations: identity at severity 0, damage growing with severity, agreement with
independent OpenCV/PIL implementations, reproducibility, and the composite's recorded severity."""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

from qualiface.data.degrade import (
    DEFAULT_KINDS,
    CompositeConfig,
    CompositeDegradation,
    DegradationError,
    KindSpec,
    degrade,
    downup_severity_for_scale,
    jpeg_quality_for_severity,
    psnr,
    qgface_lq_config,
)
from qualiface.registry import RegistryError

RANDOM_KINDS = ("motion_blur", "noise", "lowlight", "occlusion")
DETERMINISTIC_KINDS = ("downup", "gaussian_blur", "jpeg")


def natural_image(seed: int, size: int = 112, batch: int | None = None) -> torch.Tensor:
    """A natural-looking uint8 image: 1/f ("pink") noise, the power spectrum of real photos,
    with correlated colour channels."""
    rng = np.random.default_rng(seed)
    n = batch or 1
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.fftfreq(size)[None, :]
    falloff = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / size)
    white = rng.standard_normal((n, 4, size, size))
    pink = np.fft.ifft2(np.fft.fft2(white) * falloff).real
    luminance, chroma = pink[:, :1], pink[:, 1:]
    img = luminance + 0.35 * chroma
    img = (img - img.mean(axis=(2, 3), keepdims=True)) / img.std(axis=(2, 3), keepdims=True)
    out = torch.from_numpy(np.clip(128 + 45 * img, 0, 255).astype(np.uint8))
    return out if batch else out[0]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", DEFAULT_KINDS)
def test_severity_zero_is_identity_and_dtype_shape_are_preserved(kind):
    single = natural_image(0)
    batch = natural_image(1, batch=3)
    assert torch.equal(degrade(single, kind, 0.0, _gen(0)), single)
    assert torch.equal(degrade(batch, kind, 0.0, _gen(0)), batch)
    out = degrade(batch, kind, torch.tensor([0.0, 0.6, 0.0]), _gen(0))
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    assert torch.equal(out[0], batch[0]) and torch.equal(out[2], batch[2])
    assert not torch.equal(out[1], batch[1])
    assert degrade(single, kind, 0.5, _gen(0)).shape == single.shape


@pytest.mark.parametrize("kind", DEFAULT_KINDS)
def test_psnr_decreases_monotonically_with_severity(kind):
    image = natural_image(2)
    levels = [0.1, 0.3, 0.5, 0.7, 0.9]
    scores = [float(psnr(image, degrade(image, kind, s, _gen(7)))) for s in levels]
    assert all(a > b for a, b in zip(scores, scores[1:])), (kind, scores)


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_random_kinds_are_reproducible_with_a_seed(kind):
    batch = natural_image(3, batch=2)
    first = degrade(batch, kind, 0.8, _gen(11))
    assert torch.equal(first, degrade(batch, kind, 0.8, _gen(11)))
    assert not torch.equal(first, degrade(batch, kind, 0.8, _gen(12)))


@pytest.mark.parametrize("kind", DETERMINISTIC_KINDS)
def test_batch_and_per_image_calls_agree(kind):
    batch = natural_image(4, batch=3)
    severities = torch.tensor([0.2, 0.55, 0.9])
    together = degrade(batch, kind, severities)
    for i in range(3):
        assert torch.equal(together[i], degrade(batch[i], kind, float(severities[i])))


def test_downup_matches_opencv_area_down_bilinear_up():
    image = natural_image(5)
    ours = degrade(image, "downup", downup_severity_for_scale(0.5)).permute(1, 2, 0).numpy()
    hwc = image.permute(1, 2, 0).numpy()
    small = cv2.resize(hwc, (56, 56), interpolation=cv2.INTER_AREA)
    reference = cv2.resize(small, (112, 112), interpolation=cv2.INTER_LINEAR)
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1


def test_gaussian_blur_matches_opencv():
    image = natural_image(6)
    severity = 0.5  # sigma 2 px at 112
    ours = degrade(image, "gaussian_blur", severity).permute(1, 2, 0).numpy()
    hwc = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    reference = cv2.GaussianBlur(hwc, (25, 25), sigmaX=2.0, borderType=cv2.BORDER_REPLICATE)
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1


def test_jpeg_matches_pil_at_the_same_quality():
    image = natural_image(8)
    severity = 0.6
    quality = jpeg_quality_for_severity(severity)
    assert quality == 43
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=quality)
    reference = torch.from_numpy(np.array(Image.open(buffer))).permute(2, 0, 1)
    ours = degrade(image, "jpeg", severity)
    assert float(psnr(reference, ours)) > 35.0
    assert float(psnr(image, ours)) < 35.0


def test_noise_std_follows_severity():
    flat = torch.full((3, 112, 112), 128, dtype=torch.uint8)
    noisy = degrade(flat, "noise", 0.5, _gen(0)).float() - 128
    assert abs(noisy.std().item() - 20.0) < 0.6 and abs(noisy.mean().item()) < 0.5


def test_occlusion_covers_the_documented_area_with_one_rectangle():
    image = natural_image(9)
    out = degrade(image, "occlusion", 1.0, _gen(3))
    changed = (out != image).any(dim=0)
    rows = torch.nonzero(changed.any(dim=1)).flatten()
    cols = torch.nonzero(changed.any(dim=0)).flatten()
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert abs(box.item() / (112 * 112) - 0.4) < 0.02
    # Inside the box every pixel has the same colour (a flat occluder).
    patch = out[:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert torch.equal(patch, patch[:, :1, :1].expand_as(patch))


def test_motion_blur_spreads_a_point_along_a_line_of_the_documented_length():
    point = torch.zeros(3, 112, 112, dtype=torch.uint8)
    point[:, 56, 56] = 255
    out = degrade(point, "motion_blur", 1.0, _gen(5)).float()
    ys, xs = torch.nonzero(out[0] > 0, as_tuple=True)
    extent = torch.sqrt((ys - 56.0) ** 2 + (xs - 56.0) ** 2).max().item()
    assert 9.0 <= extent <= 11.5  # half of the 20 px length, plus the anti-aliasing pixel
    # The kernel is normalised: total intensity is preserved up to rounding.
    assert abs(out[0].sum().item() - 255.0) < 0.5 * len(ys) + 1


def test_lowlight_darkens_by_the_documented_gamma_and_gain():
    image = natural_image(10)
    out = degrade(image, "lowlight", 1.0, _gen(0)).float()
    expected = 255.0 * 0.25 * (image.float() / 255.0) ** 2.5
    # The mean is unaffected by the zero-mean sensor noise except where clipping at 0 lifts it.
    assert abs(out.mean().item() - expected.mean().item()) < 3.0
    assert out.mean() < 0.5 * image.float().mean()


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), [0.2, 0.3]])
def test_invalid_severity_raises(bad):
    with pytest.raises(DegradationError, match="severity"):
        degrade(natural_image(0, batch=3), "noise", bad)


def test_invalid_images_and_kind_raise_clear_errors():
    with pytest.raises(DegradationError, match="uint8"):
        degrade(torch.zeros(3, 8, 8), "noise", 0.5)
    with pytest.raises(DegradationError, match="shape"):
        degrade(torch.zeros(8, 8, dtype=torch.uint8), "noise", 0.5)
    with pytest.raises(RegistryError, match="gaussian_blur"):
        degrade(natural_image(0), "sharpen", 0.5)


def test_composite_records_the_union_of_applied_severities_and_is_reproducible():
    config = CompositeConfig.uniform(probability=0.5, clean_probability=0.25)
    composite = CompositeDegradation(config)
    batch = natural_image(12, batch=24)
    out, severity = composite(batch, _gen(4))
    again, severity_again = composite(batch, _gen(4))
    assert torch.equal(out, again) and torch.equal(severity, severity_again)
    assert severity.shape == (24,) and severity.dtype == torch.float32
    assert 0.0 <= severity.min() and severity.max() <= 1.0

    plan = composite.sample_plan(24, _gen(4))
    manual = torch.tensor([1.0 - math.prod(1.0 - float(s) for s in row) for row in plan])
    torch.testing.assert_close(severity, manual)
    untouched = severity == 0
    assert untouched.any() and (~untouched).any()
    assert torch.equal(out[untouched], batch[untouched])
    assert all(not torch.equal(out[i], batch[i]) for i in torch.nonzero(~untouched).flatten())


def test_composite_severity_tracks_image_damage():
    # PSNR is a fair damage measure for blur/noise/resampling/compression; occlusion and low
    # light are calibrated for recognisability rather than PSNR, so they get a coarser check.
    pixel_kinds = ("gaussian_blur", "noise", "jpeg", "downup")
    batch = natural_image(13, batch=48)
    composite = CompositeDegradation(CompositeConfig.uniform(pixel_kinds, probability=0.5))
    out, severity = composite(batch, _gen(1))
    damage = -psnr(batch, out).clamp(max=60.0)  # identical images: cap the infinite PSNR
    rho = spearmanr(severity.numpy(), damage.numpy()).correlation
    assert rho > 0.6, rho

    out, severity = CompositeDegradation(CompositeConfig.uniform(probability=0.5))(batch, _gen(1))
    damage = -psnr(batch, out).clamp(max=60.0)
    mild = damage[(severity > 0) & (severity < 0.4)].mean()
    strong = damage[severity > 0.7].mean()
    assert strong > mild + 3.0, (mild, strong)


def test_composite_max_combination_and_single_image():
    specs = (KindSpec("noise", 1.0, (0.2, 0.4)), KindSpec("jpeg", 1.0, (0.5, 0.6)))
    config = CompositeConfig(specs=specs, combine="max")
    composite = CompositeDegradation(config)
    out, severity = composite(natural_image(14), _gen(0))
    assert out.shape == (3, 112, 112) and severity.shape == ()
    assert 0.5 <= float(severity) <= 0.6


def test_qgface_lq_preset_downsamples_to_a_tenth_to_half_and_compresses():
    config = qgface_lq_config()
    downup, jpeg = config.specs
    assert downup.kind == "downup" and downup.probability == 1.0
    assert downup.severity_range == pytest.approx((downup_severity_for_scale(0.5), 1.0))
    assert jpeg.kind == "jpeg" and jpeg.probability == 1.0
    assert jpeg_quality_for_severity(jpeg.severity_range[0]) == 90
    assert jpeg_quality_for_severity(jpeg.severity_range[1]) == 30
    out, severity = CompositeDegradation(config)(natural_image(15, batch=8), _gen(2))
    assert torch.all(severity > 0.55) and torch.all(severity <= 1.0)


@pytest.mark.parametrize(
    "config, message",
    [
        (CompositeConfig(specs=(KindSpec("noise", 1.5),)), "probability"),
        (CompositeConfig(specs=(KindSpec("noise", 0.5, (0.7, 0.2)),)), "severity_range"),
        (CompositeConfig(combine="mean"), "combine"),
        (CompositeConfig(specs=()), "at least one"),
    ],
)
def test_composite_rejects_bad_configs(config, message):
    with pytest.raises(DegradationError, match=message):
        CompositeDegradation(config)


def test_damage_grows_with_severity_on_a_real_face(shared_data):
    path = next(iter(sorted((shared_data / "lfw" / "aligned112").glob("*/*.jpg"))))
    face = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    for kind in ("downup", "gaussian_blur", "jpeg", "noise"):
        scores = [float(psnr(face, degrade(face, kind, s, _gen(0)))) for s in (0.2, 0.5, 0.9)]
        assert scores[0] > scores[1] > scores[2], (path, kind, scores)


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_per_image_generators_make_batch_and_single_calls_agree(kind):
    batch = natural_image(16, batch=3)
    severities = [0.3, 0.0, 0.8]
    together = degrade(batch, kind, severities, [_gen(i) for i in range(3)])
    for i in range(3):
        alone = degrade(batch[i], kind, severities[i], [_gen(i)])
        assert (together[i].int() - alone.int()).abs().max() <= 1
    with pytest.raises(DegradationError, match="one per image"):
        degrade(batch, kind, 0.5, [_gen(0)])


def test_degraded_copies_are_deterministic_and_differ_only_in_severity():
    from qualiface.data.degrade import DegradationError, degraded_copies, psnr

    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(3))
    first, kinds = degraded_copies(images, [0.25, 0.75], seed=2024)
    again, kinds_again = degraded_copies(images, [0.25, 0.75], seed=2024)
    assert kinds == kinds_again and len(kinds) == len(images) and set(first) == {0.25, 0.75}
    for severity in first:
        assert torch.equal(first[severity], again[severity])
        assert first[severity].shape == images.shape and first[severity].dtype == torch.uint8
    # The same kind at a higher severity damages the set more, on average.
    assert psnr(images, first[0.75]).mean() < psnr(images, first[0.25]).mean()
    _, other_kinds = degraded_copies(images, [0.5], seed=7)
    assert other_kinds != kinds  # the seed chooses the kinds
    with pytest.raises(DegradationError, match="severity"):
        degraded_copies(images, [1.5])
    with pytest.raises(DegradationError, match="uint8"):
        degraded_copies(images.float(), [0.5])
