"""Five-point alignment geometry: the 112x112 template and the similarity warp onto it.

Every face is warped so that its eye centres, nose tip and mouth corners land as close as
possible (least squares) to ``TEMPLATE_112``: a similarity (rotation, uniform scale,
translation) estimated with Umeyama's closed form and applied with ``cv2.warpAffine``.
Coordinates are in pixels with OpenCV's convention (pixel centres at integer positions).

This is data preparation and lives at the bottom layer so that evaluation (IJB loose crops),
inference (``qualiface align``) and the synthetic faces share one definition.
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np
import torch

TEMPLATE_SIZE = 112
TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],  # image-left eye centre (the subject's right eye)
        [73.5318, 51.5014],  # image-right eye centre
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # image-left mouth corner
        [70.7299, 92.2041],  # image-right mouth corner
    ],
    dtype=np.float64,
)

#: Landmarks whose RMS distance from their centroid is below this (pixels) give no usable crop:
#: the warp would blow a few pixels up to the whole 112x112 face (template spread: ~23 px).
MIN_LANDMARK_SPREAD = 1.0
#: A landmark set whose best fit is a mirror image by more than this (smaller over larger
#: singular value of the cross-covariance with the template) is refused: see landmark_problem.
MIRROR_RATIO = 0.25


def landmark_problem(landmarks, template: np.ndarray = TEMPLATE_112) -> str | None:
    """Why ``landmarks`` (K, 2) cannot be aligned onto ``template[:K]`` (None when they can).

    A similarity fit returns *some* matrix for almost any points, so garbage in would be a
    garbage crop, silently: refused are non-finite values (a missing point written as NaN),
    points (nearly) at one spot (a missing face written as ``-1 -1 ...``, or coordinates
    normalised to 0..1 instead of pixels), and points that are a mirror image of the template:
    ``(row, col)`` given instead of ``(x, y)``, or image-left and image-right swapped. A real
    face, rotated or photographed mirrored, keeps the template's handedness.
    """
    points = np.asarray(landmarks, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or not 2 <= points.shape[0] <= len(template):
        return f"expected (K, 2) landmarks with 2 <= K <= {len(template)}, got shape {points.shape}"
    problem = landmark_problems(points[None], template).get(0)
    return None if problem is None else problem.message


class LandmarkProblem(NamedTuple):
    """What is wrong with one face's landmarks: ``kind`` is ``"non-finite"``, ``"collapsed"``
    (no usable warp exists: all points at about one spot) or ``"mirrored"`` (a warp exists but
    the points are probably mislabelled); ``message`` says it in words."""

    kind: str
    message: str


def landmark_problems(landmarks, template: np.ndarray = TEMPLATE_112) -> dict[int, LandmarkProblem]:
    """``landmark_problem`` for many faces at once: (N, K, 2) -> {index: problem} of the faces
    that have one (vectorised: a protocol's half a million detections in about a second)."""
    points = np.asarray(landmarks, dtype=np.float64)
    if points.ndim != 3 or points.shape[2] != 2 or not 2 <= points.shape[1] <= len(template):
        raise ValueError(f"expected (N, K, 2) landmarks with 2 <= K <= {len(template)}, got shape {points.shape}")
    problems: dict[int, LandmarkProblem] = {}
    finite = np.isfinite(points).all(axis=(1, 2))
    for index in np.flatnonzero(~finite):
        problems[int(index)] = LandmarkProblem("non-finite", "landmarks are not all finite numbers (a missing point?)")
    points = np.where(finite[:, None, None], points, 0.0)
    centred = points - points.mean(axis=1, keepdims=True)
    spread = np.sqrt((centred**2).sum(axis=2).mean(axis=1))
    for index in np.flatnonzero(finite & (spread < MIN_LANDMARK_SPREAD)):
        problems[int(index)] = LandmarkProblem("collapsed", (
            f"landmarks lie within {spread[index]:.3g} pixels of one point (missing landmarks, or "
            "coordinates not in pixels?)"))
    target = template[: points.shape[1]]
    covariance = np.einsum("kd,nke->nde", target - target.mean(axis=0), centred)
    # Singular values of each 2x2 in closed form (s0^2 + s1^2 = |C|_F^2, s0 s1 = |det C|): a
    # batched SVD is ~10x slower on a protocol's half a million faces.
    determinant = covariance[:, 0, 0] * covariance[:, 1, 1] - covariance[:, 0, 1] * covariance[:, 1, 0]
    frobenius = (covariance**2).sum(axis=(1, 2))
    root = np.sqrt(np.maximum(frobenius**2 - 4 * determinant**2, 0.0))
    larger, smaller = np.sqrt((frobenius + root) / 2), np.sqrt(np.maximum(frobenius - root, 0.0) / 2)
    mirrored = (determinant < 0) & (smaller > MIRROR_RATIO * larger)
    for index in np.flatnonzero(finite & (spread >= MIN_LANDMARK_SPREAD) & mirrored):
        problems[int(index)] = LandmarkProblem("mirrored", (
            "landmarks are a mirror image of the template: (row, col) instead of (x, y), "
            "or image-left and image-right points swapped"))
    return dict(sorted(problems.items()))


def estimate_similarity(src, dst) -> np.ndarray:
    """Least-squares similarity (Umeyama 1991) mapping points ``src`` (N, 2) onto ``dst`` (N, 2).

    Returns the 2x3 matrix ``M`` with ``dst ~= M[:, :2] @ src + M[:, 2]`` (rotation times a
    uniform scale, plus translation; reflections excluded). Needs N >= 2 distinct points.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need two (N, 2) point sets with N >= 2, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / src.shape[0]
    if src_var < 1e-12:
        raise ValueError("landmarks are all at one point; cannot estimate a transform")
    covariance = dst_c.T @ src_c / src.shape[0]
    u, singular, vt = np.linalg.svd(covariance)
    # Force a proper rotation: flip the last axis when the best orthogonal map is a reflection.
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rotation = u @ np.diag(sign) @ vt
    scale = float((singular * sign).sum() / src_var)
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


def transform_points(matrix: np.ndarray, points) -> np.ndarray:
    """Apply a 2x3 affine matrix to (N, 2) points -> (N, 2)."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def as_hwc(image) -> np.ndarray:
    """uint8 (3, H, W) tensor or (H, W, 3) array -> contiguous uint8 (H, W, 3) array."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 (3, H, W) tensor, got {image.dtype} {tuple(image.shape)}")
        return np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) array, got {image.dtype} {image.shape}")
    return image


def warp_to_template(image, landmarks, *, template: np.ndarray = TEMPLATE_112, size: int = TEMPLATE_SIZE):
    """Warp ``image`` so ``landmarks`` (K, 2) match the first K points of ``template``.

    ``image``: uint8 (H, W, 3) array or (3, H, W) tensor. Returns (aligned uint8 (size, size, 3)
    array, the 2x3 matrix used). Raises ``ValueError`` for non-finite landmarks or landmarks
    all at one point; callers that take landmarks from users (``qualiface align``) also refuse
    the other sets ``landmark_problem`` names.
    """
    hwc = as_hwc(image)
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if not np.isfinite(landmarks).all():  # numpy's SVD would fail with "did not converge"
        raise ValueError("landmarks are not all finite numbers (a missing point?)")
    matrix = estimate_similarity(landmarks, template[: landmarks.shape[0]])
    aligned = cv2.warpAffine(hwc, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return aligned, matrix


def align_face(image, landmarks5) -> torch.Tensor:
    """Align one face: image uint8 (H, W, 3) RGB array or (3, H, W) tensor, landmarks (5, 2)
    in template order -> uint8 (3, 112, 112) RGB tensor (what the models take)."""
    landmarks5 = np.asarray(landmarks5, dtype=np.float64)
    if landmarks5.shape != (5, 2):
        raise ValueError(f"expected five (x, y) landmarks, got shape {landmarks5.shape}")
    aligned, _ = warp_to_template(image, landmarks5)
    return torch.from_numpy(np.ascontiguousarray(aligned)).permute(2, 0, 1).contiguous()
