"""`qualiface export ...`: Export a model package to ONNX, or calibrate its quality on labelled pairs.

- ``qualiface export onnx --model M --out model.onnx [--fp16] [--opset 17]``: float NCHW
  normalised input, outputs ``embedding`` (unit norm, as ``embed`` writes), ``norm`` and
  ``quality``, dynamic batch; verified against PyTorch with onnxruntime (max abs diff printed).
  The input normalisation, channel order and output conventions are stored in the model's
  ``metadata_props`` and printed.
- ``qualiface export calibrate --model M --pairs pairs.txt --images ROOT``: fits raw quality ->
  P(pair verified correctly at the FMR threshold) and stores it in ``model.json``.

The library is imported lazily inside the commands so that ``qualiface --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path

import typer

from qualiface.cli.common import console, fail
from qualiface.errors import QualifaceError

app = typer.Typer(
    help="Export a model package to ONNX (dynamic batch, embedding + quality), or calibrate its quality.",
    no_args_is_help=True,
)


@app.command("onnx")
def onnx_command(
    model: Path = typer.Option(..., "--model", "-m", help="Model package directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .onnx file."),
    fp16: bool = typer.Option(False, "--fp16", help="float16 weights/compute (float32 input and outputs)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset version (11 up to the newest the installed torch writes)."),
    exporter: str = typer.Option("torchscript", "--exporter", help="torchscript (default) or dynamo."),
) -> None:
    """Export to ONNX and verify with onnxruntime against PyTorch on random inputs."""
    from qualiface.infer.export import export_onnx
    from qualiface.infer.model import Model

    try:
        report = export_onnx(Model.load(model), out, fp16=fp16, opset=opset, exporter=exporter)
    except QualifaceError as exc:
        raise fail(str(exc)) from None
    console.print(
        f"wrote {report.path} ({'fp16' if fp16 else 'fp32'}, opset {report.opset}, {report.exporter}); "
        f"onnxruntime vs PyTorch max abs diff: embedding {report.max_abs_diff_embedding:.2e}, "
        f"norm {report.max_abs_diff_norm:.2e}, quality {report.max_abs_diff_quality:.2e} "
        f"(tolerances {report.tolerance:.1e}, {report.tolerance_norm:.1e}, "
        f"{report.tolerance_quality:.1e}; "
        f"batch sizes {', '.join(map(str, report.batch_sizes))})"
    )
    console.print("metadata_props:", markup=False)
    for key, value in report.metadata.items():
        console.print(f"  {key}: {value}", markup=False, soft_wrap=True)


def _parse_folds(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise fail(f"folds must be comma-separated integers, got {text!r}") from None


def _embed_paths(loaded, paths: list[str], batch_size: int):
    import torch

    from qualiface.progress import make_progress

    embeddings, qualities = [], []
    with make_progress() as progress:
        task = progress.add_task("embedding", total=len(paths))
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            embedding, quality = loaded.embed(chunk, batch_size=batch_size)
            embeddings.append(embedding)
            qualities.append(quality)
            progress.advance(task, len(chunk))
    return torch.cat(embeddings).numpy(), torch.cat(qualities).numpy()


def _same_weights(folder: Path, model: Path) -> bool:
    """Whether ``folder`` holds byte-identical weights to the package ``model``."""
    import filecmp

    from qualiface.package.format import WEIGHTS_FILE

    mine, theirs = folder / WEIGHTS_FILE, model / WEIGHTS_FILE
    return mine.is_file() and theirs.is_file() and filecmp.cmp(mine, theirs, shallow=False)


def _out_problem(out: Path, model: Path, same_weights: bool) -> str | None:
    """Why ``export calibrate --out`` must not write to ``out``, or None when it may: a folder
    holding another model's package (its weights differ) would be overwritten; an earlier
    calibrated copy of this very model (``same_weights``: ``_same_weights(out, model)``) is
    recalibrated."""
    from qualiface.package.format import MODEL_JSON, WEIGHTS_FILE

    if not out.is_dir() or same_weights:
        return None
    held = [name for name in (MODEL_JSON, WEIGHTS_FILE) if (out / name).exists()]
    if held:
        return (f"{out}: holds another model package ({', '.join(held)}, weights not those of "
                f"{model}); write the calibrated copy to a new folder")
    return None


@app.command("calibrate")
def calibrate_command(
    model: Path = typer.Option(..., "--model", "-m", help="Model package directory."),
    pairs: Path = typer.Option(..., "--pairs", help="LFW-style pairs.txt."),
    images: Path = typer.Option(..., "--images", help="Folder the pair image paths are relative to."),
    folds: str | None = typer.Option(None, "--folds", help="Fit on these folds only, e.g. 1,2,3,4,5,6,7."),
    holdout_folds: str | None = typer.Option(
        None, "--holdout-folds",
        help="Report rejection thresholds on these folds (e.g. 8,9,10); never fitted on (without "
        "--folds the fit uses the other folds).",
    ),
    fmr: float = typer.Option(1e-2, "--fmr", help="Target false match rate fixing the operating threshold."),
    method: str = typer.Option("isotonic", "--method", help="isotonic or logistic."),
    out: Path | None = typer.Option(
        None, "--out", help="Write a calibrated copy here instead of updating in place (a new folder, "
        "or an earlier calibrated copy of this model; another model's package is refused)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Calibrate raw quality on labelled pairs and store it in the package's model.json."""
    import shutil

    import numpy as np

    from qualiface.data.lfw import read_pairs
    from qualiface.files import FileWriteError, describe_os_error, make_folder
    from qualiface.infer.calibrate import (
        calibrate_from_pairs,
        calibration_problem,
        rejection_threshold_for_fnmr,
    )
    from qualiface.infer.model import Model
    from qualiface.package.calibration import CalibrationError
    from qualiface.package.format import MODEL_JSON, WEIGHTS_FILE
    from qualiface.package.io import package_dir, write_model_spec
    from qualiface.scoring.similarity import cosine_scores

    # --out naming the package itself is the in-place update; a folder holding another
    # package must not have its weights and model.json replaced (checked before any work).
    model_dir = package_dir(model)
    if out is not None and Path(out).resolve() == model_dir.resolve():
        out = None
    # Compared once (byte by byte: the weights may be large), for both the check and the copy.
    same_weights = out is not None and _same_weights(Path(out), model_dir)
    if out is not None:
        problem = _out_problem(Path(out), model_dir, same_weights)
        if problem:
            raise fail(problem)
    try:
        loaded = Model.load(model, device=device)
        # Read without the image folder: only the used folds' images must exist (a folder
        # holding folds 1-7 is enough to fit on them).
        pair_set = read_pairs(pairs)
        fit_folds, report_folds = _parse_folds(folds), _parse_folds(holdout_folds)
        if report_folds:
            # Held-out pairs must stay out of the fit, or the rejection thresholds reported
            # "on" them are in-sample: without --folds the fit takes every other fold.
            if not fit_folds:
                fit_folds = [fold for fold in pair_set.folds if fold not in report_folds]
                if not fit_folds:
                    raise CalibrationError(f"--holdout-folds {holdout_folds} leaves no fold of {pairs} "
                                           "to fit on")
            shared = sorted(set(fit_folds) & set(report_folds))
            if shared:
                raise CalibrationError(f"--folds and --holdout-folds share fold(s) {shared}: held-out "
                                       "pairs must not be fitted on")
        fit_set = pair_set.select_folds(*fit_folds) if fit_folds else pair_set
        report_set = pair_set.select_folds(*report_folds) if report_folds else fit_set
        # A typo in --method, --fmr 2, or an FMR the fitting pairs cannot measure failed only
        # after every image was embedded: the labels alone decide these.
        problem = calibration_problem(fit_set.issame, fmr=fmr, method=method)
        if problem:
            raise CalibrationError(problem)
        # Only the images of the pairs fitted on and reported on: the other folds' are unused.
        used = pair_set.select_folds(*fit_folds, *report_folds) if fit_folds else pair_set
        paths, _, _ = used.unique_images()  # relative, as the subsets name them
        files, _, _ = used.resolve(images).unique_images()  # same order; every one checked to exist
        embeddings, quality = _embed_paths(loaded, files, batch_size)
        position = {path: i for i, path in enumerate(paths)}

        def gather(subset):
            i1 = np.array([position[p] for p in subset.paths1])
            i2 = np.array([position[p] for p in subset.paths2])
            return embeddings[i1], embeddings[i2], quality[i1], quality[i2], subset.issame

        calibration = calibrate_from_pairs(*gather(fit_set), fmr=fmr, method=method)
        e1, e2, q1, q2, issame = gather(report_set)
        scores = cosine_scores(e1, e2)
    except (QualifaceError, ValueError) as exc:
        raise fail(str(exc)) from None

    target = Path(out) if out else Path(model)
    loaded.spec.calibration = calibration
    try:
        if out:
            make_folder(target)
            if not same_weights:  # an earlier calibrated copy keeps its own
                shutil.copy2(model_dir / WEIGHTS_FILE, target / WEIGHTS_FILE)
        write_model_spec(target, loaded.spec)
    except FileWriteError as exc:  # --out below a file, a read-only folder, a full disk
        raise fail(str(exc)) from None
    except OSError as exc:  # the weights copy
        raise fail(f"{target / WEIGHTS_FILE}: could not write: {describe_os_error(exc)}") from None
    console.print(
        f"calibrated on {calibration.n_pairs} pairs: threshold {calibration.threshold:.4f} at FMR {fmr:g}, "
        f"pair accuracy {calibration.accuracy:.3f}; wrote {target / MODEL_JSON}"
    )
    where = f"folds {holdout_folds}" if report_folds else "the fitting pairs (in-sample; use --holdout-folds)"
    calibrated1, calibrated2 = calibration.apply(q1), calibration.apply(q2)
    start_fnmr = float((scores[issame] < calibration.threshold).mean()) if issame.any() else float("nan")
    console.print(f"rejection thresholds on {where}; FNMR without rejection {start_fnmr:.4f}:")
    for target_fnmr in (0.2, 0.1, 0.05, 0.02, 0.01):
        try:
            point = rejection_threshold_for_fnmr(
                calibrated1, calibrated2, scores, issame, calibration.threshold, target_fnmr
            )
        except CalibrationError:
            console.print(f"  FNMR <= {target_fnmr:g}: not reachable on these pairs")
            continue
        console.print(
            f"  FNMR <= {target_fnmr:g}: reject calibrated quality < {point.quality_threshold:.4f} "
            f"(FNMR {point.fnmr:.4f}, {100 * point.rejected_fraction:.1f}% of genuine pairs rejected)"
        )
