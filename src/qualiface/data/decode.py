"""Decode image bytes or files into the project's one image layout: uint8 (3, H, W), **RGB**.

OpenCV (``cv2.imdecode`` with ``IMREAD_COLOR``, then BGR -> RGB) is the fast default; Pillow
is the fallback when OpenCV is missing or refuses the data, and the path for CMYK JPEGs (Adobe
inverted CMYK is only handled correctly there) and 4-channel TIFFs (OpenCV's TIFF reader
multiplies the colour by alpha). Both paths agree on every case a face dataset meets: grayscale
is expanded to three channels, an alpha channel is dropped, 16-bit PNG is scaled to 8 bits (high
byte), and EXIF orientation is applied (OpenCV does it by default, the
Pillow path calls ``exif_transpose``).

Before any pixel is decoded the header is probed (pure Python for JPEG/PNG, Pillow's lazy
``open`` otherwise): that rejects empty, truncated and non-image data with a ``DecodeError``
naming the source (a decoder handed a truncated JPEG may return a grey-filled image instead of
failing, and we never want to return garbage), and refuses images above a pixel limit
(decompression-bomb guard) before the decoder allocates them.

RGB is the only channel order inside qualiface. Models trained on BGR input are served by the
``bgr`` flag of ``qualiface.data.transforms.to_model_input``, never by decoding differently.

Also here: ``DataError``, the base class of every data-format error in ``qualiface.data``
(all are ``ValueError``s, so callers can catch one family), and ``encode_jpeg``.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from qualiface.errors import DataError  # the one data error; importable from here as before

#: Default decompression-bomb limit: 64 Mpixel (a 8192 x 8192 image). Face crops are ~0.01 Mpx.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) share the
# 0xC0-0xCF range but are not frames.
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers with no length field: TEM and the restart markers RST0-7 (SOI/EOI handled apart).
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})


class DecodeError(DataError):
    """Image bytes that cannot be decoded: empty, truncated, not an image, or too large.

    ``source`` names the file (or the record / member the bytes came from), ``reason`` says why.
    """

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(source, reason)
        self.source = source
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.source}: cannot decode image: {self.reason}"


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, read without decoding pixels.

    format:   ``"jpeg"``, ``"png"`` or Pillow's lower-case format name (``"bmp"``, ``"webp"``...).
    width, height: pixels as stored (before EXIF orientation).
    channels: colour components as stored (1 gray, 3 colour, 4 CMYK/RGBA), 0 when unknown.
    """

    format: str
    width: int
    height: int
    channels: int

    @property
    def extension(self) -> str:
        """The usual file extension for this format, without the dot (``jpg`` for JPEG)."""
        return {"jpeg": "jpg", "tiff": "tif"}.get(self.format, self.format)


def _as_buffer(data: bytes | bytearray | memoryview | np.ndarray, source: str) -> bytes:
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise TypeError(f"{source}: expected a 1-D uint8 array of encoded bytes, got "
                            f"{data.dtype} with shape {data.shape}")
        return data.tobytes()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"{source}: expected encoded image bytes, got {type(data).__name__}")


def _probe_jpeg(data: bytes, source: str) -> ImageInfo:
    size = len(data)
    pos = 2  # after SOI
    frame: tuple[int, int, int] | None = None
    while True:
        if pos >= size:
            raise DecodeError(source, "truncated JPEG (header ends before the image data)")
        if data[pos] != 0xFF:
            raise DecodeError(source, f"corrupt JPEG: expected a marker at byte {pos}")
        while pos < size and data[pos] == 0xFF:  # any number of fill bytes may precede a marker
            pos += 1
        if pos >= size:
            raise DecodeError(source, "truncated JPEG (header ends before the image data)")
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE_MARKERS:
            continue
        if marker == 0xD9:
            raise DecodeError(source, "JPEG ends (EOI) before any image data")
        if pos + 2 > size:
            raise DecodeError(source, "truncated JPEG header")
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2 or pos + length > size:
            raise DecodeError(source, f"truncated JPEG header (segment 0x{marker:02X} at "
                                      f"byte {pos - 2} runs past the end)")
        if marker in _JPEG_SOF_MARKERS:
            if length < 8:
                raise DecodeError(source, "corrupt JPEG frame header")
            height, width = struct.unpack_from(">HH", data, pos + 3)
            frame = (width, height, data[pos + 7])
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            if frame is None:
                raise DecodeError(source, "corrupt JPEG: scan data before any frame header")
            # Inside entropy-coded data every 0xFF byte is followed by 0x00 or a restart
            # marker, so FF D9 can only be the real end-of-image marker: its absence means
            # the file was cut short (decoders would otherwise pad it with grey).
            if data.find(b"\xff\xd9", pos + length) < 0:
                raise DecodeError(source, "truncated JPEG (no end-of-image marker)")
            width, height, channels = frame
            return ImageInfo("jpeg", width, height, channels)
        pos += length


_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


def _probe_png(data: bytes, source: str) -> ImageInfo:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise DecodeError(source, "truncated or corrupt PNG header")
    width, height, bit_depth, colour_type = struct.unpack_from(">IIBB", data, 16)
    if colour_type not in _PNG_CHANNELS or bit_depth not in (1, 2, 4, 8, 16):
        raise DecodeError(source, f"corrupt PNG header (colour type {colour_type}, "
                                  f"bit depth {bit_depth})")
    # A complete PNG ends with the IEND chunk (trailing junk after it is tolerated).
    if data.rfind(b"IEND", 33) < 0:
        raise DecodeError(source, "truncated PNG (no IEND chunk)")
    return ImageInfo("png", width, height, _PNG_CHANNELS[colour_type])


def _probe_with_pillow(data: bytes, source: str) -> ImageInfo:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's own bomb warning; our limit applies below
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                fmt = (image.format or "unknown").lower()
                channels = len(image.getbands())
    except UnidentifiedImageError:
        raise DecodeError(source, "not an image (unrecognised format)") from None
    except Exception as exc:  # Pillow's format plugins raise many types on hostile bytes
        raise DecodeError(source, f"corrupt image header ({type(exc).__name__}: {exc})") from None
    return ImageInfo(fmt, width, height, channels)


def probe_image(
    data: bytes | bytearray | memoryview | np.ndarray,
    *,
    name: str = "<bytes>",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> ImageInfo:
    """Read format and size from the header; raise ``DecodeError`` for bad or oversized data.

    Cheap (no pixel decoding): JPEG and PNG are parsed here, including a check that the data is
    complete (JPEG end-of-image marker, PNG IEND chunk); other formats use Pillow's lazy open.
    ``max_pixels``: refuse ``width * height`` above this (``None`` disables the guard).
    """
    buffer = _as_buffer(data, name)
    if not buffer:
        raise DecodeError(name, "empty data (zero bytes)")
    if buffer[:3] == b"\xff\xd8\xff":
        info = _probe_jpeg(buffer, name)
    elif buffer[:8] == _PNG_SIGNATURE:
        info = _probe_png(buffer, name)
    else:
        info = _probe_with_pillow(buffer, name)
    if info.width <= 0 or (info.height <= 0 and info.format != "jpeg"):
        raise DecodeError(name, f"invalid image size {info.width}x{info.height}")
    if max_pixels is not None and info.width * info.height > max_pixels:
        raise DecodeError(name, f"image of {info.width}x{info.height} = "
                                f"{info.width * info.height} pixels exceeds the limit of "
                                f"{max_pixels} (decompression-bomb guard; raise max_pixels "
                                "if the image is trusted)")
    return info


def _decode_with_cv2(buffer: bytes) -> np.ndarray | None:
    """HWC uint8 RGB, or None when OpenCV is missing or rejects the data."""
    try:
        import cv2  # lazy: OpenCV may be absent (broken wheel); Pillow covers it
    except ImportError:  # pragma: no cover - opencv is a dependency, Pillow covers its absence
        return None
    try:
        bgr = cv2.imdecode(np.frombuffer(buffer, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
        return None
    return bgr[:, :, ::-1]


def _decode_with_pillow(buffer: bytes, source: str) -> np.ndarray:
    """HWC uint8 RGB via Pillow (handles CMYK, 16-bit, palette, alpha); raises DecodeError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-transparency and bomb warnings
            with Image.open(io.BytesIO(buffer)) as opened:
                image = ImageOps.exif_transpose(opened)
                image.load()
                if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                    # 16-bit gray: keep the high byte, as OpenCV does (convert() would clip).
                    wide = np.asarray(image).astype(np.int64)
                    gray = np.clip(wide >> 8, 0, 255).astype(np.uint8)
                    return np.repeat(gray[:, :, None], 3, axis=2)
                if image.mode != "RGB":
                    image = image.convert("RGB")
                return np.asarray(image, dtype=np.uint8)
    except UnidentifiedImageError:
        raise DecodeError(source, "not an image (unrecognised format)") from None
    except Exception as exc:  # Pillow's format plugins raise many types on hostile bytes
        raise DecodeError(source, f"corrupt or truncated image data "
                                  f"({type(exc).__name__}: {exc})") from None


def decode_image(
    data: bytes | bytearray | memoryview | np.ndarray,
    *,
    name: str = "<bytes>",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    backend: str = "auto",
) -> torch.Tensor:
    """Encoded image bytes -> uint8 tensor (3, H, W), RGB.

    ``name`` is used in error messages (pass the file or record the bytes came from).
    ``backend``: ``"auto"`` (OpenCV, Pillow as fallback and for CMYK), ``"cv2"`` or ``"pil"``.
    Raises ``DecodeError`` for empty, truncated, corrupt, non-image or oversized data.
    """
    if backend not in ("auto", "cv2", "pil"):
        raise ValueError(f"unknown decode backend {backend!r}; use 'auto', 'cv2' or 'pil'")
    buffer = _as_buffer(data, name)
    info = probe_image(buffer, name=name, max_pixels=max_pixels)
    rgb = None
    cmyk_jpeg = info.format == "jpeg" and info.channels == 4
    # OpenCV reads a 4-channel TIFF (RGBA) through libtiff's RGBA interface, which multiplies
    # the colour by the alpha channel instead of dropping it: Pillow drops it, as everywhere else.
    four_channel_tiff = info.format == "tiff" and info.channels == 4
    if backend == "cv2" or (backend == "auto" and not (cmyk_jpeg or four_channel_tiff)):
        rgb = _decode_with_cv2(buffer)
        if rgb is None and backend == "cv2":
            raise DecodeError(name, "OpenCV could not decode the data")
    if rgb is None:
        rgb = _decode_with_pillow(buffer, name)
    if max_pixels is not None and rgb.shape[0] * rgb.shape[1] > max_pixels:
        # Only reachable when the header did not state the size (JPEG with a DNL marker).
        raise DecodeError(name, f"decoded image exceeds the limit of {max_pixels} pixels")
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def read_image(
    path: str | os.PathLike,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    backend: str = "auto",
) -> torch.Tensor:
    """Decode an image file -> uint8 tensor (3, H, W), RGB. Errors name the file: a missing or
    unreadable file is a ``DecodeError`` too, so every caller handles one error family."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DecodeError(str(path), f"cannot read file ({exc.strerror or exc})") from None
    return decode_image(data, name=str(path), max_pixels=max_pixels, backend=backend)


def encode_jpeg(image: torch.Tensor | np.ndarray, quality: int = 95) -> bytes:
    """uint8 RGB (3, H, W) (or gray (1, H, W) / (H, W)) -> JPEG bytes at ``quality`` (1-100)."""
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"encode_jpeg expects uint8 pixels, got {array.dtype}")
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[0] == 3:
        hwc = np.ascontiguousarray(array.transpose(1, 2, 0))
    elif array.ndim == 2:
        hwc = np.ascontiguousarray(array)
    else:
        raise ValueError(f"encode_jpeg expects a (3, H, W), (1, H, W) or (H, W) image, got "
                         f"shape {tuple(array.shape)}")
    try:
        import cv2  # lazy: OpenCV may be absent (broken wheel); Pillow covers it
    except ImportError:  # pragma: no cover - Pillow fallback
        cv2 = None
    if cv2 is not None:
        pixels = hwc[:, :, ::-1] if hwc.ndim == 3 else hwc  # OpenCV writes BGR
        ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(pixels),
                                   [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if ok:
            return encoded.tobytes()

    out = io.BytesIO()
    Image.fromarray(hwc).save(out, format="JPEG", quality=int(quality))
    return out.getvalue()
