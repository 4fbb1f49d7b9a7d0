"""`qualiface data ...`: pack an image folder into InsightFace RecordIO, unpack it, inspect data.

``pack`` copies each JPEG's bytes unchanged (so ``unpack`` gives byte-identical files back) and
re-encodes other formats as JPEG; identity names go to ``identities.txt`` beside the ``.rec``
because the RecordIO format stores only integer labels. ``unpack`` writes
``<identity>/<record>.jpg`` into a fresh folder (built under a temporary name, renamed at the
end). ``info`` recognises an image folder, a ``path label`` list, a ``.rec``, a ``.bin`` or a
``pairs.txt`` and prints its counts.

The library is imported lazily inside the commands so that ``qualiface --help`` stays instant.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from qualiface.cli.common import fail
from qualiface.errors import QualifaceError

app = typer.Typer(
    help="Data tools: pack an image folder into InsightFace RecordIO, unpack it, inspect "
         "datasets.",
    no_args_is_help=True,
)


def _progress():
    from qualiface.progress import make_progress

    return make_progress()


def _print_table(title: str, rows: list[tuple[str, object]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    for key, value in rows:
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    Console().print(table)


@app.command("pack")
def pack(
    src_folder: Annotated[Path, typer.Argument(help="Image folder: <identity>/<image>.")],
    out_prefix: Annotated[Path, typer.Argument(help="Output prefix: writes PREFIX.rec, PREFIX.idx, "
                                                    "property and identities.txt.")],
    quality: Annotated[int, typer.Option(min=1, max=100, help="JPEG quality for re-encoded "
                                                              "images.")] = 95,
    keep_bytes: Annotated[bool, typer.Option("--keep-bytes/--reencode",
                                             help="Copy JPEG bytes unchanged (default) or "
                                                  "re-encode every image.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace existing output files.")] = False,
) -> None:
    """Pack an image folder (<identity>/<image>) into InsightFace RecordIO (.rec/.idx/property)."""
    from qualiface.data.decode import decode_image, encode_jpeg, probe_image
    from qualiface.data.folder import ImageFolderDataset
    from qualiface.data.recordio import RecordIOWriter, identity_name_problem

    try:
        dataset = ImageFolderDataset(src_folder)
    except QualifaceError as exc:
        raise fail(str(exc)) from None
    # Checked before any work: the writer would refuse the name only at the very end.
    for name in dataset.identities:
        problem = identity_name_problem(name)
        if problem is not None:
            raise fail(f"{src_folder / name}: {problem}; rename the folder to pack it")
    writer_paths = RecordIOWriter.output_paths(out_prefix)
    # property and identities.txt are per folder: beside another pack's .rec they are (or would
    # be read as) that pack's, so writing them would silently give it this pack's names and
    # class count (with --overwrite, replacing its own).
    others = sorted(rec.name for rec in writer_paths[0].parent.glob("*.rec")
                    if rec.name != writer_paths[0].name)
    if others:
        raise fail(f"{writer_paths[0].parent} already holds {', '.join(others[:3])}: property "
                   f"and {writer_paths[3].name} are shared by the folder, so pack into a folder "
                   "of its own")
    existing = [str(p) for p in writer_paths if p.exists()]
    if existing and not overwrite:
        raise fail(f"{', '.join(existing)} already exist; pass --overwrite to replace them")
    started = time.perf_counter()
    reencoded = 0
    try:
        with RecordIOWriter(out_prefix, identity_names=dataset.identities) as writer, \
                _progress() as progress:
            task = progress.add_task("packing", total=len(dataset))
            for path, label in dataset.samples:
                data = path.read_bytes()
                info = probe_image(data, name=str(path))
                if not keep_bytes or info.format != "jpeg":
                    data = encode_jpeg(decode_image(data, name=str(path)), quality=quality)
                    reencoded += 1
                writer.add(data, label)
                progress.advance(task)
    except (QualifaceError, OSError) as exc:
        raise fail(f"{exc} (nothing was written)") from None
    elapsed = time.perf_counter() - started
    _print_table(f"packed {src_folder} -> {writer.rec_path}", [
        ("images", len(dataset)),
        ("identities", dataset.num_classes),
        ("skipped empty folders", len(dataset.skipped_identities)),
        ("re-encoded as JPEG", reencoded),
        (".rec size (MB)", f"{writer.rec_path.stat().st_size / 1e6:.1f}"),
        ("images/s", f"{len(dataset) / max(elapsed, 1e-9):,.0f}"),
    ])


def _inside(root: Path, name: str) -> Path:
    """``root / name``, refused (``OSError``) unless it resolves to a direct child of ``root``.

    ``read_identity_names`` already refuses names with separators or ``..``; this is a second
    line of defence so no future reader change can make ``unpack`` write outside its folder.
    """
    target = (root / name).resolve()
    if target.parent != root.resolve():
        raise OSError(f"identity name {name[:80]!r} would write outside the output folder")
    return target


def _not_unpacked(folder: Path) -> str | None:
    """The first entry of ``folder`` that ``unpack`` does not write, or None.

    ``unpack`` writes only ``<identity>/<8-digit record>.<image extension>``; anything else (the
    ``.rec`` being read, the user's own files) must survive ``--overwrite``.
    """
    for entry in folder.iterdir():
        if entry.is_symlink() or not entry.is_dir():
            return str(entry)
        for item in entry.iterdir():
            stem, dot, extension = item.name.partition(".")
            if (item.is_symlink() or not item.is_file() or not dot or len(stem) < 8
                    or not (stem + extension).isascii() or not stem.isdigit()
                    or not extension.isalnum() or extension != extension.lower()):
                return str(item)
    return None


@app.command("unpack")
def unpack(
    rec: Annotated[Path, typer.Argument(help="The .rec file, its prefix, or its folder.")],
    out_folder: Annotated[Path, typer.Argument(help="New folder to write <identity>/<record>.jpg "
                                                    "into.")],
    overwrite: Annotated[bool, typer.Option(help="Replace OUT_FOLDER if it holds an earlier "
                                                 "unpack (and nothing else).")] = False,
) -> None:
    """Unpack a RecordIO dataset into <identity>/<record>.<ext> (names from identities.txt)."""
    from qualiface.data.decode import probe_image
    from qualiface.data.recordio import RecordIODataset, read_identity_names
    from qualiface.files import FileWriteError, make_folder

    try:
        dataset = RecordIODataset(rec)
        names = read_identity_names(dataset.rec_path.parent)
    except QualifaceError as exc:
        raise fail(str(exc)) from None
    if names is not None and len(names) != dataset.num_classes:
        names = None  # identities.txt belongs to another pack: fall back to label numbers
    if out_folder.exists() and not out_folder.is_dir():  # --overwrite replaces folders only
        raise fail(f"{out_folder}: exists and is a file, not a folder; choose another output")
    if out_folder.exists() and any(out_folder.iterdir()):
        if not overwrite:
            raise fail(f"{out_folder} exists and is not empty; pass --overwrite to replace it")
        foreign = _not_unpacked(out_folder)
        if foreign is not None:  # --overwrite replaces an earlier unpack, nothing else
            raise fail(f"{out_folder}: --overwrite replaces only a folder that unpack wrote, and "
                       f"this one holds {foreign}; remove it yourself or choose another output")
    # Build under a temporary name next to the target so a failure leaves no half folder.
    try:
        make_folder(out_folder.parent, output=out_folder)
        staging = Path(tempfile.mkdtemp(dir=out_folder.parent, prefix=f".{out_folder.name}."))
    except OSError as exc:  # below a file, read-only: one "<out_folder>: could not write" line
        raise fail(str(exc if isinstance(exc, FileWriteError) else FileWriteError(out_folder, exc))) from None
    try:
        with _progress() as progress:
            task = progress.add_task("unpacking", total=len(dataset))
            for index in range(len(dataset)):
                data, label, header = dataset.read_raw(index)
                record = dataset.record_key(index)
                extension = probe_image(data, name=f"{dataset.rec_path} record {record}").extension
                folder = _inside(staging, names[label] if names is not None else str(label))
                folder.mkdir(exist_ok=True)
                (folder / f"{record:08d}.{extension}").write_bytes(data)
                progress.advance(task)
        if out_folder.exists():
            shutil.rmtree(out_folder)
        staging.rename(out_folder)
    except (QualifaceError, OSError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise fail(str(exc)) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _print_table(f"unpacked {dataset.rec_path} -> {out_folder}", [
        ("images", len(dataset)),
        ("identities", dataset.num_classes),
        ("identity names", "identities.txt" if names is not None else "label numbers"),
    ])


def _detect(path: Path) -> str:
    """One of folder, list, rec, bin, pairs (by suffix, then by the first line of text)."""
    if path.is_dir():
        return "rec" if any(path.glob("*.rec")) else "folder"
    suffix = path.suffix.lower()
    if suffix in (".rec", ".idx"):
        return "rec"
    if suffix == ".bin":
        return "bin"
    with open(path, "rb") as handle:
        head = handle.read(4096).decode("utf-8", errors="replace")
    for line in head.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) in (1, 2) and all(f.isdigit() for f in fields):
            return "pairs"  # a header: "10 300" (View 2) or "1100" (View 1)
        if len(fields) in (3, 4) and fields[1].isdigit():
            return "pairs"
        return "list"
    raise ValueError(f"{path}: empty file, cannot tell its format")


@app.command("info")
def info(
    path: Annotated[Path, typer.Argument(help="Image folder, list file, .rec, .bin or pairs.txt.")],
    image_root: Annotated[Path | None, typer.Option(help="For pairs files: image folder to check "
                                                         "that every image exists.")] = None,
) -> None:
    """Recognise a dataset (folder, list, .rec, .bin, pairs.txt) and print its counts."""
    if not path.exists():
        raise fail(f"{path}: no such file or folder")
    try:
        kind = _detect(path)
        rows = _INFO[kind](path, image_root)
    except (QualifaceError, ValueError, OSError) as exc:
        raise fail(str(exc)) from None
    _print_table(f"{path} ({kind})", rows)


def _class_sizes(labels) -> list[tuple[str, object]]:
    import numpy as np

    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    counts = counts[counts > 0]
    return [("images per identity (min/median/max)",
             f"{counts.min()} / {int(np.median(counts))} / {counts.max()}"),
            ("identities with >= 2 images", int((counts >= 2).sum()))]


def _folder_info(path: Path, _image_root) -> list[tuple[str, object]]:
    from qualiface.data.folder import ImageFolderDataset

    dataset = ImageFolderDataset(path)
    return [("images", len(dataset)), ("identities", dataset.num_classes),
            ("skipped empty folders", len(dataset.skipped_identities)),
            *_class_sizes([label for _, label in dataset.samples])]


def _list_info(path: Path, _image_root) -> list[tuple[str, object]]:
    from qualiface.data.folder import ListFileDataset

    dataset = ListFileDataset(path)
    return [("samples", len(dataset)), ("num_classes (max label + 1)", dataset.num_classes),
            ("distinct labels", len(set(dataset.labels))),
            ("missing image files", len(dataset.missing_files())),
            *_class_sizes(dataset.labels)]


def _rec_info(path: Path, _image_root) -> list[tuple[str, object]]:
    from qualiface.data.recordio import RecordIODataset, read_identity_names

    dataset = RecordIODataset(path)
    size = dataset.image_size
    names = read_identity_names(dataset.rec_path.parent)
    return [("images", len(dataset)), ("identities (num_classes)", dataset.num_classes),
            ("identity header block", "yes" if dataset.identity_block else "no"),
            ("image size (property)", f"{size[0]}x{size[1]}" if size else "no property file"),
            ("identity names", "identities.txt" if names else "none"),
            (".rec size (MB)", f"{dataset.rec_path.stat().st_size / 1e6:.1f}")]


def _bin_info(path: Path, _image_root) -> list[tuple[str, object]]:
    from qualiface.data.verification_bin import VerificationBinDataset

    dataset = VerificationBinDataset(path)
    first = dataset[0][0]
    matched = int(dataset.issame.sum())
    return [("pairs", dataset.num_classes), ("images", len(dataset)),
            ("matched pairs", matched), ("mismatched pairs", dataset.num_classes - matched),
            ("first image", f"{first.shape[1]}x{first.shape[2]}")]


def _pairs_info(path: Path, image_root) -> list[tuple[str, object]]:
    from qualiface.data.lfw import read_pairs

    pairs = read_pairs(path)
    images, _, _ = pairs.unique_images()
    rows: list[tuple[str, object]] = [
        ("pairs", len(pairs)), ("folds", len(pairs.folds)),
        ("matched pairs", int(pairs.issame.sum())),
        ("mismatched pairs", int((~pairs.issame).sum())),
        ("unique images", len(images)),
    ]
    if image_root is not None:
        pairs.resolve(image_root)  # raises, listing what is missing
        rows.append(("all images present under", str(image_root)))
    return rows


_INFO = {"folder": _folder_info, "list": _list_info, "rec": _rec_info, "bin": _bin_info,
         "pairs": _pairs_info}
