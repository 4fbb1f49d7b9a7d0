"""Image decoding: channel order, odd modes, both backends, clean errors, bomb guard."""

from __future__ import annotations

import io
import struct

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qualiface.data.decode import (
    DataError,
    DecodeError,
    decode_image,
    encode_jpeg,
    probe_image,
    read_image,
)

BACKENDS = ["auto", "cv2", "pil"]


def _pil_bytes(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt, **kwargs)
    return out.getvalue()


def _smooth_rgb(height: int = 24, width: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)],
                    axis=2).astype(np.uint8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_png_is_decoded_exactly_in_rgb_order(backend):
    image = np.zeros((4, 6, 3), np.uint8)
    image[:, :2, 0] = 255  # red stripe on the left
    image[:, 2:4, 1] = 200  # green in the middle
    image[:, 4:, 2] = 100  # blue on the right
    out = decode_image(_pil_bytes(image, "PNG"), backend=backend)
    assert out.dtype == torch.uint8 and out.shape == (3, 4, 6)
    assert torch.equal(out, torch.from_numpy(image.transpose(2, 0, 1)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_jpeg_matches_an_independent_pillow_decode(backend):
    data = _pil_bytes(_smooth_rgb(), "JPEG", quality=95)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)
    out = decode_image(data, backend=backend).numpy()
    assert out.shape == reference.shape
    assert np.abs(out.astype(int) - reference).mean() < 1.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_grayscale_is_expanded_and_alpha_dropped(backend):
    gray = np.arange(30, dtype=np.uint8).reshape(5, 6) * 8
    out = decode_image(_pil_bytes(gray, "PNG"), backend=backend)
    assert out.shape == (3, 5, 6)
    for channel in out:
        assert torch.equal(channel, torch.from_numpy(gray))
    rgba = np.dstack([_smooth_rgb(5, 6), np.full((5, 6), 7, np.uint8)])
    out = decode_image(_pil_bytes(rgba, "PNG"), backend=backend)
    assert torch.equal(out, torch.from_numpy(rgba[:, :, :3].transpose(2, 0, 1).copy()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_png_keeps_the_high_byte(backend, channels):
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 65536, (5, 7, channels)).astype(np.uint16)
    ok, encoded = cv2.imencode(".png", wide[:, :, ::-1] if channels == 3 else wide[:, :, 0])
    assert ok
    out = decode_image(encoded.tobytes(), backend=backend).numpy()
    expected = (wide >> 8).astype(np.uint8)
    if channels == 1:
        expected = np.repeat(expected, 3, axis=2)
    assert np.array_equal(out, expected.transpose(2, 0, 1))


def test_cmyk_jpeg_goes_through_pillow():
    rgb = _smooth_rgb()
    data = _cmyk_jpeg(rgb)
    assert probe_image(data).channels == 4
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)
    assert torch.equal(decode_image(data), torch.from_numpy(reference.copy()))


def test_rgba_tiff_drops_alpha_like_png():
    # OpenCV reads a 4-channel TIFF through libtiff's RGBA path, which multiplies the colour by
    # alpha (200 -> 100 at alpha 128): the default decode must drop alpha as it does for PNG.
    rgba = np.dstack([_smooth_rgb(5, 6), np.full((5, 6), 128, np.uint8)])
    data = _pil_bytes(rgba, "TIFF")
    assert probe_image(data).format == "tiff"
    expected = torch.from_numpy(rgba[:, :, :3].transpose(2, 0, 1).copy())
    assert torch.equal(decode_image(data), expected)
    assert torch.equal(decode_image(data), decode_image(_pil_bytes(rgba, "PNG")))


def _cmyk_jpeg(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(out, format="JPEG", quality=95)
    return out.getvalue()


def test_exif_orientation_is_applied_by_both_backends():
    image = np.zeros((20, 40, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", exif=exif.tobytes())
    for backend in BACKENDS:
        assert decode_image(out.getvalue(), backend=backend).shape == (3, 40, 20)


def _truncated_cases() -> dict[str, bytes]:
    jpeg = _pil_bytes(_smooth_rgb(), "JPEG", quality=95)
    png = _pil_bytes(_smooth_rgb(), "PNG")
    return {
        "empty": b"",
        "jpeg half": jpeg[: len(jpeg) // 2],
        "jpeg without end marker": jpeg[:-2],
        "jpeg signature only": jpeg[:3],
        "png half": png[: len(png) // 2],
        "png without IEND": png[:-12],
        "text": b"hello, this is not an image at all",
        "random": np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes(),
    }


@pytest.mark.parametrize("case", list(_truncated_cases()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_data_raises_decode_error_naming_the_source(case, backend):
    data = _truncated_cases()[case]
    with pytest.raises(DecodeError) as info:
        decode_image(data, name="faces/bad.jpg", backend=backend)
    assert "faces/bad.jpg" in str(info.value)
    assert isinstance(info.value, DataError) and isinstance(info.value, ValueError)


def test_read_image_names_the_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    with pytest.raises(DecodeError, match="broken.png"):
        read_image(path)
    good = tmp_path / "good.png"
    good.write_bytes(_pil_bytes(_smooth_rgb(), "PNG"))
    assert read_image(good).shape == (3, 24, 32)


def test_pixel_limit_refuses_large_images_before_decoding():
    png = _pil_bytes(_smooth_rgb(64, 64), "PNG")
    with pytest.raises(DecodeError, match="exceeds the limit"):
        decode_image(png, max_pixels=64 * 63)
    assert decode_image(png, max_pixels=64 * 64).shape == (3, 64, 64)
    # Headers claiming 50000 x 50000 are refused without touching the (bogus) pixel data.
    bomb_png = png[:16] + struct.pack(">II", 50000, 50000) + png[24:]
    with pytest.raises(DecodeError, match="decompression-bomb"):
        decode_image(bomb_png)
    jpeg = bytearray(_pil_bytes(_smooth_rgb(), "JPEG"))
    sof = jpeg.find(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 50000, 50000)
    with pytest.raises(DecodeError, match="decompression-bomb"):
        decode_image(bytes(jpeg))


def test_probe_reports_format_and_size_without_decoding():
    info = probe_image(_pil_bytes(_smooth_rgb(10, 12), "JPEG"))
    assert (info.format, info.width, info.height, info.channels) == ("jpeg", 12, 10, 3)
    assert info.extension == "jpg"
    info = probe_image(_pil_bytes(_smooth_rgb(10, 12), "BMP"))
    assert (info.format, info.width, info.height) == ("bmp", 12, 10)


def test_encode_jpeg_round_trip_and_argument_checks():
    image = torch.from_numpy(_smooth_rgb().transpose(2, 0, 1).copy())
    data = encode_jpeg(image, quality=95)
    assert data[:2] == b"\xff\xd8"
    decoded = decode_image(data)
    assert (decoded.int() - image.int()).abs().float().mean() < 2.0
    # Lower quality -> smaller file, same geometry.
    assert len(encode_jpeg(image, quality=30)) < len(data)
    with pytest.raises(TypeError):
        encode_jpeg(image.float())
    with pytest.raises(ValueError):
        encode_jpeg(image[:2])
    with pytest.raises(ValueError):
        encode_jpeg(image, quality=0)


_PREFIXES = [b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF89a", b"RIFF\0\0\0\0WEBPVP8 "]


@settings(max_examples=200, deadline=5000, derandomize=True)
@given(st.sampled_from(_PREFIXES), st.binary(max_size=200), st.sampled_from(BACKENDS))
def test_fuzz_arbitrary_bytes_decode_or_raise_decode_error(prefix, body, backend):
    try:
        image = decode_image(prefix + body, name="fuzz", backend=backend)
    except DecodeError as exc:
        assert "fuzz" in str(exc)
        return
    # Whatever decodes must honour the layout contract.
    assert image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3
