"""Five-point alignment geometry: the 112x112 template and the similarity warp onto it.

Every face is warped so that its eye centres, nose tip and mouth corners land as close as
possible (least squares) to ``TEMPLATE_112``: a similarity (rotation, uniform scale,
translation) estimated with Umeyama's closed form and applied with ``cv2.warpAffine``.
Coordinates are in pixels with OpenCV's convention (pixel centres at integer positions).

This is data preparation and lives at the bottom layer so that evaluation (IJB loose crops),
inference (``qualiface align``) and the synthetic faces share one definition.
"""

from __future__ import annotations

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
    array, the 2x3 matrix used).
    """
    hwc = as_hwc(image)
    landmarks = np.asarray(landmarks, dtype=np.float64)
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
