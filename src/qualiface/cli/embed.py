r"""`qualiface embed`: Embed images with a model package: embeddings, raw and calibrated quality.

Writes one table (``qualiface.infer.io``): ``ids`` (image path relative to the folder given;
with several folders prefixed by the folder's name, ``alice/1.jpg``, so two folders' ``1.jpg``
stay two ids; a file given by itself as given), ``embeddings`` (N, D) L2-normalised, ``norms``, ``quality`` (raw) and,
when the package is calibrated, ``quality_calibrated``. ``--min-quality`` drops faces below a
threshold; rejected images are listed in ``<out>.rejected.tsv`` (name, reason: ``low-quality``,
``unreadable`` or ``wrong size``, details; a run that rejects none removes an earlier one). Fields are escaped (``cli.common.tsv_field``):
backslash, tab, newline and carriage return appear as ``\\``, ``\t``, ``\n``, ``\r`` and other
control characters as ``\xNN``, so a file name cannot forge columns or rows.

The library is imported lazily inside the commands so that ``qualiface --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path

import typer

from qualiface.cli.common import console, fail, tsv_field
from qualiface.errors import QualifaceError


def command(
    inputs: list[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    model: Path = typer.Option(..., "--model", "-m", help="Model package directory (model.json + weights)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output: .npz, .parquet, or a folder of .npy files."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per forward pass."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    min_quality: float | None = typer.Option(
        None, "--min-quality", help="Reject faces whose quality is below this (raw, or calibrated with --calibrated)."
    ),
    calibrated: bool = typer.Option(
        False, "--calibrated", help="Apply --min-quality to calibrated quality (needs a calibrated package)."
    ),
    workers: int = typer.Option(
        0, "--workers", min=0, help="Processes decoding images while the model runs (0: decode inline)."
    ),
) -> None:
    """Embed images with a model package: embeddings, raw and calibrated quality."""
    import numpy as np
    import torch

    from qualiface.files import FileWriteError, describe_os_error, write_text_atomic
    from qualiface.infer.images import ImageFileBatches, list_images
    from qualiface.infer.io import table_destination_problem, write_table
    from qualiface.infer.model import Model, NonFiniteOutputError
    from qualiface.progress import make_progress

    if min_quality is not None and not np.isfinite(min_quality):
        # "quality >= nan" is False for every face: all would be rejected, after embedding them.
        raise fail(f"--min-quality must be a finite number, got {min_quality}")
    try:
        loaded = Model.load(model, device=device)
    except QualifaceError as exc:
        raise fail(str(exc)) from None
    if calibrated and loaded.calibration is None:
        raise fail(f"{model}: --calibrated given but the package has no calibration (run 'qualiface export calibrate')")
    # One list names the table's columns for the early destination check and for the table itself.
    columns = ["ids", "embeddings", "norms", "quality"] + (["quality_calibrated"] if loaded.calibration else [])
    problem = table_destination_problem(out, columns)  # before the embedding, not after it
    if problem:
        raise fail(problem)
    log = out.with_name(out.name.rstrip("/") + ".rejected.tsv")
    if log.exists() and not log.is_file():  # the log is written (or removed) after every image is embedded
        raise fail(f"{log}: the rejection log's place holds a folder or special file; move it or choose another --out")
    try:
        paths = list_images(inputs)
    except FileNotFoundError as exc:
        raise fail(str(exc)) from None
    if not paths:
        raise fail(f"no images found in {', '.join(map(str, inputs))}")

    folders = [root for root in inputs if root.is_dir()]

    def display_name(path: Path) -> str:
        for root in folders:
            if path.is_relative_to(root):
                relative = path.relative_to(root)
                # Several folders: each one's name keeps their images apart (alice/1.jpg and
                # bob/1.jpg would both be "1.jpg", one id for two people's faces).
                return str(Path(root.resolve().name) / relative) if len(folders) > 1 else str(relative)
        return str(path)

    seen: dict[str, Path] = {}
    for path in paths:  # before any embedding: a table with one id twice is useless downstream
        name = display_name(path)
        first = seen.setdefault(name, path)
        if first != path:
            raise fail(f"{first} and {path} would both get the id {name!r}; "
                       "give the folders distinct names, or embed them separately")

    ids, embeddings, qualities, rejected = [], [], [], []
    loader = torch.utils.data.DataLoader(
        ImageFileBatches(paths, loaded.spec.input_size), batch_size=batch_size, shuffle=False,
        num_workers=workers, collate_fn=ImageFileBatches.collate)
    with make_progress() as progress:
        task = progress.add_task("embedding", total=len(paths))
        for start, (images, good, errors) in zip(range(0, len(paths), batch_size), loader):
            batch_paths = paths[start : start + batch_size]
            for k, (reason, error) in errors.items():
                rejected.append((display_name(batch_paths[k]), reason, error))
            if images is not None:
                try:
                    embedding, quality = loaded.embed(images, batch_size=batch_size)
                except NonFiniteOutputError as exc:  # NaN rows must never reach the table
                    raise fail(f"{display_name(batch_paths[good[exc.index]])}: {exc.problem}") from None
                ids += [display_name(batch_paths[k]) for k in good]
                embeddings.append(embedding)
                qualities.append(quality)
            progress.advance(task, len(batch_paths))
    if not ids:
        name, _, reason = rejected[0]
        raise fail(f"none of the {len(paths)} images could be embedded; the first, {name}: {reason}")
    result = loaded.finish(torch.cat(embeddings), torch.cat(qualities))
    keep = np.ones(len(ids), dtype=bool)
    if min_quality is not None:
        score = (result.calibrated_quality if calibrated else result.quality).numpy()
        keep = score >= min_quality
        kind = "calibrated" if calibrated else "raw"
        for i in np.flatnonzero(~keep):
            rejected.append((ids[i], "low-quality", f"{kind} quality {score[i]:.4g} < {min_quality:g}"))
    computed = {
        "ids": np.array(ids),
        "embeddings": result.embeddings.numpy(),
        "norms": result.norms.numpy(),
        "quality": result.quality.numpy(),
        "quality_calibrated": None if result.calibrated_quality is None else result.calibrated_quality.numpy(),
    }
    table = {name: computed[name][keep] for name in columns}
    try:
        write_table(out, table)
    except FileWriteError as exc:  # already "<out>: could not write: <problem>"
        raise fail(str(exc)) from None
    except (QualifaceError, OSError) as exc:
        raise fail(f"{out}: cannot write ({exc})") from None
    console.print(f"wrote {int(keep.sum())} embeddings (D={loaded.embedding_size}) to {out}")
    try:
        if not rejected:
            # An earlier run's log beside this table would list faces the table now holds.
            log.unlink(missing_ok=True)
        else:
            write_text_atomic(log, "".join("\t".join(map(tsv_field, row)) + "\n" for row in rejected))
    except OSError as exc:  # FileWriteError included
        # The table is written and stays; only the list of rejected names is lost.
        what = "write" if rejected else "remove the earlier"
        problem = exc.problem if isinstance(exc, FileWriteError) else describe_os_error(exc)
        raise fail(f"{log}: could not {what} the rejection log ({problem}); the table {out} was written") from None
    if rejected:
        count = {reason: sum(1 for r in rejected if r[1] == reason) for reason in ("unreadable", "wrong size")}
        console.print(
            f"rejected {len(rejected)} of {len(paths)} images: {len(rejected) - sum(count.values())} below the "
            f"quality threshold, {count['unreadable']} unreadable, {count['wrong size']} of the wrong size "
            f"(align them first: qualiface align); names and reasons in {log}"
        )
