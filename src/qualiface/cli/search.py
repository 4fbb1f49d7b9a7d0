"""`qualiface search ...`: 1:N gallery search: enrol templates, query top-k (exact or faiss).

- ``enrol EMB --gallery DIR``: add the templates of an embed output to a gallery (images of one
  identity pooled into one template by quality-weighted aggregation). An existing gallery is
  extended, never silently replaced (``--replace`` starts it afresh); concurrent enrolments into
  one folder serialise on its lock and all land.
- ``query EMB --gallery DIR --k 5 --out FILE``: top-k template ids and cosine scores per row;
  when the probes carry labels (a ``labels`` column, or ``--identity`` / the gallery's own rule
  applied to their ids) and some are enrolled, also rank-1 and rank-5.
- ``info --gallery DIR``: what a gallery holds.

Every command that reads or writes a gallery takes it as ``--gallery/-g DIR``; the positional
argument is always the input table.
- ``aggregate FRAMES --out FILE``: per-track (video) templates from a per-frame table with
  ``track_ids``, ``embeddings`` and ``quality`` (EQFace progressive update or QWFA / QWFAF);
  the output is itself a table that ``enrol`` and ``query`` read.

The library is imported lazily inside the commands so that ``qualiface --help`` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from qualiface.cli.common import console, fail
from qualiface.errors import QualifaceError

app = typer.Typer(help="1:N gallery search: enrol templates, query top-k (exact or faiss).", no_args_is_help=True)

IDENTITY_RULES = ("id", "parent", "stem")


def _identity(ids, rule: str):
    import numpy as np

    if rule == "id":
        return np.asarray(ids).astype(str)
    if rule == "parent":
        return np.array([Path(i).parent.name or Path(i).stem for i in ids])
    if rule == "stem":
        return np.array([Path(i).stem for i in ids])
    raise fail(f"--identity must be one of {', '.join(IDENTITY_RULES)}, got {rule!r}")


def _refuse_out_over_input(out: Path | None, table: Path, what: str) -> None:
    """Fail before any work when ``--out`` names the input table itself: the results (ids,
    match ids and scores; templates) would replace the embeddings they were computed from,
    exit 0, with nothing left to recompute them from but the images."""
    if out is None:
        return
    try:
        same = out.resolve() == table.resolve() or (out.exists() and out.samefile(table))
    except OSError:
        same = False
    if same:
        raise fail(f"{out}: is the {what} being read; writing there would replace it "
                   "(name another --out)")


@app.command("enrol")
def enrol_command(
    embeddings: Path = typer.Argument(..., help="Output of 'qualiface embed' (or 'search aggregate')."),
    gallery: Path = typer.Option(..., "--gallery", "-g", help="Gallery folder to write."),
    identity: str = typer.Option(
        "parent", "--identity", help="Template id from each row id: parent (folder name), stem, or id."
    ),
    mode: str = typer.Option("qwfa", "--mode", help="Pooling of several images per identity: qwfa, mean, norm."),
    backend: str = typer.Option("auto", "--backend", help="auto, exact, flat (faiss) or ivf (faiss)."),
    nlist: int | None = typer.Option(None, "--nlist", help="IVF cells (default ~4 sqrt(N))."),
    nprobe: int | None = typer.Option(
        None, "--nprobe", min=1,
        help="IVF cells visited per query (nlist = exact; default 8, or the setting of the "
        "gallery being extended).",
    ),
    replace: bool = typer.Option(
        False, "--replace", help="Replace an existing gallery instead of adding to it."
    ),
) -> None:
    """Enrol templates from an embedding table into a gallery (added to an existing one)."""
    import numpy as np

    from qualiface.infer.io import read_table
    from qualiface.infer.search import GalleryError, enrol
    from qualiface.scoring.aggregation import aggregate_templates

    try:
        table = read_table(embeddings, required=("ids", "embeddings"))
        names = _identity(table["ids"], identity)
        raw = table["embeddings"] * table["norms"][:, None] if "norms" in table else table["embeddings"]
        quality = table.get("quality")
        if mode in ("qwfa", "qwfaf") and quality is None:
            raise GalleryError(f"{embeddings}: --mode {mode} needs a 'quality' column")
        pooled = aggregate_templates(raw, names, quality=quality, mode=mode)
        template_quality = None
        if quality is not None:
            _, row = np.unique(names, return_inverse=True)
            template_quality = np.bincount(row.ravel(), weights=quality).astype(np.float32)
        result, before = enrol(
            gallery, pooled.ids, pooled.features, replace=replace, backend=backend, nlist=nlist,
            nprobe=nprobe, quality=template_quality,
            metadata={"source": str(embeddings), "identity": identity, "mode": mode, "images": int(len(names))},
        )
    except QualifaceError as exc:
        raise fail(str(exc)) from None
    added = f" (added to {before}: {result.size} in all)" if before else ""
    console.print(
        f"enrolled {result.size - before} templates from {len(names)} images into {gallery}{added} "
        f"(backend {result.backend})"
    )


@app.command("query")
def query_command(
    embeddings: Path = typer.Argument(..., help="Probe embeddings (output of 'qualiface embed')."),
    gallery: Path = typer.Option(..., "--gallery", "-g", help="Gallery folder made by 'search enrol'."),
    k: int = typer.Option(5, "--k", "-k", min=1, help="Results per probe."),
    nprobe: int | None = typer.Option(None, "--nprobe", min=1, help="IVF cells to visit (overrides the stored value)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write ids, match_ids (Q,k), scores (Q,k) here."),
    show: int = typer.Option(5, "--show", help="Print the results of this many probes."),
    identity: str | None = typer.Option(
        None, "--identity", help="Probe labels from each row id, as in enrol: parent, stem or id "
        "(default: a 'labels' column, else the rule the gallery was enrolled with). Rank-1/rank-5 "
        "are printed when some labels are enrolled ids.",
    ),
) -> None:
    """Top-k gallery templates for every probe embedding, with cosine scores (and rank-1/5)."""
    from qualiface.infer.io import read_table, write_table
    from qualiface.infer.search import Gallery, GalleryError, SearchResult, rank_rates

    _refuse_out_over_input(out, embeddings, "probe table")
    try:
        probes = read_table(embeddings, required=("ids", "embeddings"))
        loaded = Gallery.load(gallery)
        if nprobe is not None:
            loaded.set_nprobe(nprobe)
        rule = loaded.metadata.get("identity")
        if identity is not None:
            labels, source = _identity(probes["ids"], identity), f"--identity {identity}"
        elif "labels" in probes:
            labels, source = probes["labels"], "the 'labels' column"
        elif rule in IDENTITY_RULES:
            labels, source = _identity(probes["ids"], rule), f"the ids, by the gallery's rule '{rule}'"
        else:
            labels = source = None
        # one column past rank 5: a tie with the mate running past it counts against the probe
        try:
            ranked = loaded.search(probes["embeddings"], k=max(k, 6) if labels is not None else k,
                                   progress=True)
        except GalleryError as exc:  # a bad probe row: say which table holds it
            raise GalleryError(f"{embeddings}: {exc}") from None
        rates, counted = rank_rates(ranked, labels, loaded.ids) if labels is not None else ({}, 0)
        result = SearchResult(ranked.scores[:, :k], ranked.indices[:, :k], ranked.ids[:, :k])
        if out is not None:
            write_table(out, {"ids": probes["ids"], "match_ids": result.ids, "scores": result.scores})
    except QualifaceError as exc:
        raise fail(str(exc)) from None
    for row in range(min(show, len(probes["ids"]))):
        matches = ", ".join(f"{i} ({s:.3f})" for i, s in zip(result.ids[row], result.scores[row]) if i)
        console.print(f"{probes['ids'][row]}: {matches}")
    if counted:
        console.print(
            f"rank-1 {rates[1]:.3f}, rank-5 {rates[5]:.3f} over the {counted} of {len(labels)} probes whose "
            f"identity is enrolled (labels: {source})"
        )
    if out is not None:
        console.print(f"wrote top-{result.ids.shape[1]} results of {len(probes['ids'])} probes to {out}")


@app.command("info")
def info_command(gallery: Path = typer.Option(..., "--gallery", "-g", help="Gallery folder.")) -> None:
    """Print what a gallery holds (backend, size, dimension, parameters)."""
    from qualiface.infer.search import Gallery

    try:
        loaded = Gallery.load(gallery)
    except QualifaceError as exc:
        raise fail(str(exc)) from None
    typer.echo(json.dumps(loaded.info(), indent=2))


@app.command("aggregate")
def aggregate_command(
    frames: Path = typer.Argument(..., help="Per-frame table with track_ids, embeddings, quality (in frame order)."),
    out: Path = typer.Option(..., "--out", "-o", help="Template table to write (ids, embeddings, quality, ...)."),
    mode: str = typer.Option("progressive", "--mode", help="progressive (EQFace, streaming), qwfa, qwfaf or mean."),
    feature_threshold: float = typer.Option(-1.0, "--f-th", help="progressive: min cosine frame vs template."),
    quality_threshold: float = typer.Option(0.0, "--s-th", help="progressive/qwfaf: quality threshold."),
    track_column: str = typer.Option("track_ids", "--track-column", help="Column holding the track id."),
) -> None:
    """Video templates: one per track, streaming (progressive) or whole-video (QWFA/QWFAF)."""
    import numpy as np

    from qualiface.infer.io import TableError, read_table, write_table
    from qualiface.infer.stream import FrameError, aggregate_tracks

    _refuse_out_over_input(out, frames, "per-frame table")
    try:
        table = read_table(frames, required=(track_column, "embeddings", "quality"))
        raw = table["embeddings"] * table["norms"][:, None] if "norms" in table else table["embeddings"]
        try:
            templates = aggregate_tracks(
                table[track_column], raw, table["quality"], mode=mode,
                feature_threshold=feature_threshold, quality_threshold=quality_threshold,
                progress=True,
            )
        except FrameError as exc:  # names the frame (row); the file is said here
            raise TableError(f"{frames}: {exc}") from None
        if not templates:
            raise TableError(f"{frames}: no track has an accepted frame (lower --s-th / --f-th?)")
        write_table(
            out,
            {
                "ids": np.array([str(t.track_id) for t in templates]),
                "embeddings": np.stack([t.embedding for t in templates]),
                "quality": np.array([t.quality for t in templates], dtype=np.float32),
                "frames_seen": np.array([t.frames_seen for t in templates]),
                "frames_used": np.array([t.frames_used for t in templates]),
            },
        )
    except (QualifaceError, ValueError) as exc:
        raise fail(str(exc)) from None
    tracks = len(np.unique(table[track_column]))
    console.print(f"wrote {len(templates)} templates ({mode}) for {tracks} tracks to {out}")
