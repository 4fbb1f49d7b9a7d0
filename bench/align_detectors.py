"""Face detectors of ``qualiface align`` on raw photos, against the shared aligned crops (CPU).

    python bench/align_detectors.py

Aligns the 60 raw 250x250 LFW photos of ``../shared/data/lfw/raw-sample`` with YuNet (as is,
resized to 640 px, resized + mirror-averaged: the default) and with dlib when the ``align``
extra is installed, and compares each crop with ``../shared/data/lfw/aligned112`` (made with
dlib's 68 points): mean absolute difference in grey levels, and the residual landmark offset
(the affine that best maps one crop onto the other, found with ``cv2.findTransformECC``, as the
mean displacement of the five template points in the 112x112 frame).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHARED_DATA, BenchError, print_table, run_main  # noqa: E402


def landmark_offset(aligned: np.ndarray, reference: np.ndarray) -> float:
    """Mean displacement (px) of the template points under the affine from one crop to the other."""
    from qualiface.infer.align import TEMPLATE_112, transform_points

    def gray(image):
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)

    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 200, 1e-6)
    _, warp = cv2.findTransformECC(gray(reference), gray(aligned), np.eye(2, 3, dtype=np.float32),
                                   cv2.MOTION_AFFINE, criteria, None, 5)
    moved = transform_points(warp.astype(np.float64), TEMPLATE_112)
    return float(np.linalg.norm(moved - TEMPLATE_112, axis=1).mean())


def main(argv=None) -> None:
    from qualiface.infer.align import DetectorUnavailableError, DlibDetector, YunetDetector, iter_align
    from qualiface.infer.images import read_image

    lfw = SHARED_DATA / "lfw"
    if not (lfw / "raw-sample").is_dir():
        raise BenchError(f"{lfw / 'raw-sample'}: not present (needs ../shared/data)")
    detectors = {
        "yunet, 250 px as is": lambda: YunetDetector(side=250, flip=False),
        "yunet, 640 px": lambda: YunetDetector(flip=False),
        "yunet, 640 px + mirror (default)": YunetDetector,
        "dlib 68 (--detector dlib)": DlibDetector,
    }
    rows = []
    for label, make in detectors.items():
        try:
            detector = make()
        except DetectorUnavailableError as exc:
            rows.append([label, "-", "-", "-", "-", f"not installed: {exc}"[:60]])
            continue
        start = time.perf_counter()
        results = list(iter_align(lfw / "raw-sample", detector=detector))
        per_image = (time.perf_counter() - start) / len(results) * 1000
        grey, offset = [], []
        for name, _, aligned in results:
            if aligned is not None:
                reference = read_image(lfw / "aligned112" / name).permute(1, 2, 0).numpy()
                grey.append(np.abs(aligned.astype(float) - reference).mean())
                offset.append(landmark_offset(aligned, reference))
        rows.append([label, f"{len(grey)}/{len(results)}", f"{np.median(grey):.2f} ({np.percentile(grey, 90):.2f})",
                     f"{np.median(offset):.2f} ({np.percentile(offset, 90):.2f})", f"{per_image:.1f}", ""])
    print_table("align: raw LFW sample vs the shared dlib-68 crops",
                ["detector", "faces", "grey diff median (p90)", "landmark px median (p90)", "ms/image", "note"],
                rows)


if __name__ == "__main__":
    sys.exit(run_main(main))
