"""`qualiface eval ...`: evaluate recognition (LFW, .bin sets, IJB-B/C, TinyFace) and quality (EDC), write reports.

Every command writes ``metrics.json``, ``curves.json``, PNG plots, ``report.md`` and
``report.html`` into ``--out``, plus the extracted features (``features-*.safetensors``, reused
on the next run with the same model, options and data content, which the run then says, and
readable by ``eval features``).

The library is imported lazily inside the commands so that ``qualiface --help`` stays instant.
"""

from __future__ import annotations

import functools
from pathlib import Path

import typer

from qualiface.cli.common import console, fail
from qualiface.errors import QualifaceError

app = typer.Typer(help="Evaluate recognition (LFW, .bin sets, IJB-B/C, TinyFace) and quality "
                       "(EDC), write reports.", no_args_is_help=True)

FLIP_HELP = "flip test: none, sum (f + f'), or norm (norm-preserving fusion)"
DEGRADE_HELP = ("also evaluate copies of the test images degraded at these severities, e.g. "
                "0.25,0.5,0.75 (one of seven kinds per image, fixed by --degrade-seed): "
                "accuracy per level and Spearman/Kendall of quality against severity")


THREADS_HELP = "torch intra-op threads (0: torch's default, one per core)"


def _threaded(command):
    """Run an eval command under its ``--threads`` (torch's intra-op thread count)."""
    @functools.wraps(command)  # typer reads the wrapped signature, ``threads`` included
    def run(*args, **kwargs):
        from qualiface.threads import thread_option

        with thread_option(kwargs["threads"]):
            return command(*args, **kwargs)
    return run


def _load_embed_fn(model: Path, device: str):
    """(embed_fn, model_id) for a model package (tests replace this with a fake)."""
    from qualiface.infer.model import package_embed_fn

    return package_embed_fn(model, device=device)


def _parse_folds(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise fail(f"--folds must be comma-separated integers, got {text!r}") from None


def _features(out: Path, name: str, model: Path, device: str, dataset, ids, flip: str,
              batch_size: int, workers: int, files=(), arrays=()):
    """``eval.features.benchmark_features`` with the model package at ``model``, cached in
    ``out``."""
    from qualiface.eval.features import benchmark_features

    if not model.exists():
        raise fail(f"{model}: model package not found")
    embed_fn, model_id = _load_embed_fn(model, device)
    return benchmark_features(
        dataset, embed_fn, model_id, name, ids, cache_dir=out, flip=flip, batch_size=batch_size,
        num_workers=workers, files=files, arrays=arrays,
        meta={"benchmark": name, "model": str(model)},
        on_reuse=lambda path: console.print(f"reusing cached features {path} (same model, "
                                            "options and data content)"))


def _parse_severities(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        levels = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise fail(f"--degrade must be comma-separated numbers in (0, 1], got {text!r}") from None
    if not levels or any(not 0.0 < level <= 1.0 for level in levels):
        raise fail(f"--degrade severities must lie in (0, 1], got {text!r}")
    # Results and caches are keyed by the level written with :g (6 digits): two levels that
    # print the same would overwrite each other's results in one key.
    by_key: dict[str, float] = {}
    for level in sorted(set(levels)):
        if f"{level:g}" in by_key:
            raise fail(f"--degrade: {by_key[f'{level:g}']!r} and {level!r} are the same level to 6 digits; "
                       "give distinct levels")
        by_key[f"{level:g}"] = level
    return list(by_key.values())


def _degraded(out: Path, bench, features, model: Path, device: str, flip: str, batch_size: int,
              severities: list[float], seed: int):
    """Embed degraded copies of the benchmark's images and score them -> (metrics, box plots)
    (``eval.degraded``); each level's features are cached in ``out`` like the clean ones."""
    from qualiface.eval.degraded import degraded_images, evaluate_degraded

    copies, kinds = degraded_images(bench, severities, seed, progress=True)
    levels = {
        # "-shared": copies with the same draws at every level; features cached from the
        # earlier per-level draws (no suffix) are other images and must not be reused.
        severity: _features(out, f"{bench.name.lower()}-degraded-s{severity:g}-seed{seed}-shared", model,
                            device, copy, bench.ids, flip, batch_size, 0)
        for severity, copy in copies.items()
    }
    return evaluate_degraded(bench, features, levels, seed=seed, kinds=kinds)


def _qmagface(path: Path | None):
    if path is None:
        return None
    from qualiface.eval.similarity import QMagFace

    return QMagFace.load(path)


def _finish_pairs(bench, features, out: Path, params, fit_qmagface: Path | None,
                  degraded: tuple[dict, dict] | None = None) -> None:
    """Score a pair benchmark and write its report; ``params``: QMagFace parameters
    (``_qmagface``, read by the caller before any embedding) or None."""
    from qualiface.eval.benchmarks import evaluate_pairs
    from qualiface.eval.report import SEVERITY_CAPTION, EvalReport

    if fit_qmagface is not None:
        from qualiface.eval.similarity import QMagFace, pair_scores_and_quality

        rows = features.rows(bench.ids)
        scores, quality = pair_scores_and_quality(features.features[rows], bench.first,
                                                  bench.second)
        params = QMagFace.fit(scores, quality, bench.labels)
        params.save(fit_qmagface)
        console.print(f"QMagFace fitted on {bench.name}: alpha={params.alpha:.4f} "
                      f"beta={params.beta:.4f} -> {fit_qmagface} (scores on the same pairs "
                      "are optimistic; apply the file to another set)")
    result = evaluate_pairs(bench, features, qmagface=params)
    boxes = {}
    if degraded is not None:
        result.metrics["degraded"], boxes = degraded
    _write_report(EvalReport(f"{bench.name} verification", result.metrics, result.rocs,
                             result.edcs, result.histograms, boxes=boxes,
                             captions={title: SEVERITY_CAPTION for title in boxes}), out)
    _summary(result.metrics, out)


def _write_report(report, out: Path) -> None:
    """``write_report``, with a failing write (a full disk) as one line naming ``out``."""
    from qualiface.eval.report import write_report
    from qualiface.files import describe_os_error

    try:
        write_report(report, out)
    except OSError as exc:
        where = exc.filename or out
        raise fail(f"{where}: cannot write the report: {describe_os_error(exc)}") from None


def _summary(metrics: dict, out: Path) -> None:
    v = metrics.get("verification", {})
    parts = []
    if "accuracy" in v:
        parts.append(f"accuracy {100 * v['accuracy']:.2f} ± {100 * v['accuracy_std']:.2f} %")
    tar = v.get("tar_at_far", {})
    for key in ("1e-04", "1e-03", "1e-02"):
        if tar.get(key) is not None and tar.get(key) == tar.get(key):
            parts.append(f"TAR@FAR={key} {100 * tar[key]:.2f} %")
    if "auc" in v:
        parts.append(f"AUC {v['auc']:.4f}")
    ident = metrics.get("identification") or metrics
    for key in ("rank1", "rank5"):
        if key in ident:
            parts.append(f"{key} {100 * ident[key]:.2f} %")
    console.print(", ".join(parts) or "done")
    if "accuracy_note" in v:
        console.print(f"note: {v['accuracy_note']}")
    if "tpir_note" in ident:  # a TPIR mean that leaves out a gallery which cannot measure it
        console.print(f"note: {ident['tpir_note']}")
    degraded = metrics.get("degraded")
    if degraded:
        levels = ", ".join(f"s={s} {100 * m['accuracy']:.1f} %" for s, m in degraded["levels"].items())
        rho = degraded["rank_correlation"]["model quality"]["spearman"]
        console.print(f"degraded accuracy: {levels}; Spearman(quality, severity) {rho:.3f}")
    console.print(f"report: {out / 'report.html'}")


#: The exception types that become one clean error line.
_ERRORS = (QualifaceError, FileNotFoundError)


@app.command("lfw")
@_threaded
def lfw(
    model: Path = typer.Option(..., "--model", help="model package folder"),
    data: Path = typer.Option(..., "--data", help="LFW folder (aligned images, or with aligned112/)"),
    pairs: Path = typer.Option(None, "--pairs", help="pairs file (default DATA/pairs.txt)"),
    folds: str = typer.Option(None, "--folds", help="protocol folds to use, e.g. 8,9,10"),
    out: Path = typer.Option(..., "--out", help="output folder"),
    flip: str = typer.Option("norm", "--flip", help=FLIP_HELP),
    qmagface: Path = typer.Option(None, "--qmagface", help="QMagFace parameters (JSON) to apply"),
    fit_qmagface: Path = typer.Option(None, "--fit-qmagface", help="fit QMagFace here, save JSON"),
    degrade: str = typer.Option(None, "--degrade", help=DEGRADE_HELP),
    degrade_seed: int = typer.Option(2024, "--degrade-seed", min=0, help="which kind each image gets"),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    workers: int = typer.Option(0, "--workers", min=0, help="decoding processes"),
    threads: int = typer.Option(0, "--threads", min=0, help=THREADS_HELP),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """LFW-style pairs over an image folder: k-fold accuracy, ROC, TAR@FAR, EDC, report."""
    from qualiface.eval.benchmarks import lfw_benchmark

    severities = _parse_severities(degrade)
    try:
        params = _qmagface(qmagface)  # a bad file is refused before the embedding, not after
        bench = lfw_benchmark(data, pairs, folds=_parse_folds(folds))
        features = _features(out, "lfw", model, device, bench.images, bench.ids, flip,
                             batch_size, workers, files=[bench.source])
        degraded = (_degraded(out, bench, features, model, device, flip, batch_size, severities,
                              degrade_seed) if severities else None)
        _finish_pairs(bench, features, out, params, fit_qmagface, degraded)
    except _ERRORS as exc:
        raise fail(str(exc)) from None


@app.command("bin")
@_threaded
def bin_(
    file: Path = typer.Argument(..., help="verification .bin (lfw.bin, cfp_fp.bin, agedb_30.bin ...)"),
    model: Path = typer.Option(..., "--model", help="model package folder"),
    out: Path = typer.Option(None, "--out", help="output folder (default eval-<name>)"),
    flip: str = typer.Option("norm", "--flip", help=FLIP_HELP),
    qmagface: Path = typer.Option(None, "--qmagface", help="QMagFace parameters (JSON) to apply"),
    degrade: str = typer.Option(None, "--degrade", help=DEGRADE_HELP),
    degrade_seed: int = typer.Option(2024, "--degrade-seed", min=0, help="which kind each image gets"),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    workers: int = typer.Option(0, "--workers", min=0, help="decoding processes"),
    threads: int = typer.Option(0, "--threads", min=0, help=THREADS_HELP),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """An InsightFace .bin pair set: 10-fold accuracy, ROC, TAR@FAR, EDC, report."""
    from qualiface.eval.benchmarks import bin_benchmark

    out = out or Path(f"eval-{file.stem}")
    severities = _parse_severities(degrade)
    try:
        params = _qmagface(qmagface)  # a bad file is refused before the embedding, not after
        bench = bin_benchmark(file)
        features = _features(out, bench.name, model, device, bench.images, bench.ids, flip,
                             batch_size, workers)
        degraded = (_degraded(out, bench, features, model, device, flip, batch_size, severities,
                              degrade_seed) if severities else None)
        _finish_pairs(bench, features, out, params, None, degraded)
    except _ERRORS as exc:
        raise fail(str(exc)) from None


def _check_ijb_options(aggregation: str, quality_threshold) -> None:
    """Refuse template options that would fail or be ignored, before any image is embedded."""
    from qualiface.scoring.aggregation import AGGREGATION_MODES

    if aggregation not in AGGREGATION_MODES:
        raise fail(f"--aggregation {aggregation!r}: use one of {', '.join(AGGREGATION_MODES)}")
    if aggregation == "qwfaf" and quality_threshold is None:
        raise fail("--aggregation qwfaf needs --quality-threshold (s_th)")
    if aggregation != "qwfaf" and quality_threshold is not None:
        # Only qwfaf filters by quality: the threshold would be ignored.
        raise fail(f"--quality-threshold applies to --aggregation qwfaf only, not {aggregation}")


def _finish_ijb(protocol, features, out: Path, aggregation: str, quality_threshold,
                detector_score: bool, device: str = "cpu") -> None:
    from qualiface.eval.ijb import IJBOptions, evaluate_ijb
    from qualiface.eval.report import EvalReport

    result = evaluate_ijb(protocol, features, IJBOptions(
        aggregation=aggregation, quality_threshold=quality_threshold,
        detector_score_weight=detector_score, device=device))
    _write_report(EvalReport(f"{protocol.name} ({aggregation})", result.metrics,
                             {"cosine": result.roc}, result.edc_curves,
                             {"pair template quality": {
                                 "genuine": result.pair_qualities[result.labels],
                                 "impostor": result.pair_qualities[~result.labels]}}), out)
    _summary(result.metrics, out)


@app.command("ijb")
@_threaded
def ijb(
    model: Path = typer.Option(..., "--model", help="model package folder"),
    root: Path = typer.Option(..., "--root", help="IJB release folder (holding NAME/meta, NAME/loose_crop)"),
    name: str = typer.Option("IJBC", "--name", help="IJBB or IJBC"),
    out: Path = typer.Option(..., "--out", help="output folder"),
    aggregation: str = typer.Option("norm", "--aggregation", help="mean, media, norm, qwfa, qwfaf"),
    quality_threshold: float = typer.Option(None, "--quality-threshold", help="s_th for qwfaf"),
    detector_score: bool = typer.Option(False, "--detector-score", help="weight by detector score"),
    flip: str = typer.Option("norm", "--flip", help=FLIP_HELP),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    workers: int = typer.Option(0, "--workers", min=0, help="decoding processes"),
    threads: int = typer.Option(0, "--threads", min=0, help=THREADS_HELP),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """IJB-B/C: 1:1 TAR@FAR over template pairs, 1:N rank-k and TPIR@FPIR, report."""
    from qualiface.data.ijb import load_ijb
    from qualiface.eval.ijb import ijb_images, landmark_summary

    _check_ijb_options(aggregation, quality_threshold)
    try:
        protocol = load_ijb(root, name)
        odd = landmark_summary(protocol)
        if odd["odd"]:  # said before the hours of feature extraction, and kept in the report
            console.print(f"[yellow]warning:[/] {odd['odd']} face(s) have odd 5-point landmarks "
                          f"({odd['resized_unaligned']} resized from the loose crop instead of aligned); "
                          f"first: {odd['examples'][0]}")
        features = _features(out, name.lower(), model, device, ijb_images(protocol),
                             protocol.images, flip, batch_size, workers,
                             arrays=[protocol.landmarks])
        _finish_ijb(protocol, features, out, aggregation, quality_threshold, detector_score,
                    device)
    except _ERRORS as exc:
        raise fail(str(exc)) from None


@app.command("tinyface")
@_threaded
def tinyface(
    model: Path = typer.Option(..., "--model", help="model package folder"),
    root: Path = typer.Option(..., "--root", help="TinyFace folder (Testing_Set or its parent)"),
    out: Path = typer.Option(..., "--out", help="output folder"),
    flip: str = typer.Option("norm", "--flip", help=FLIP_HELP),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    workers: int = typer.Option(0, "--workers", min=0, help="decoding processes"),
    threads: int = typer.Option(0, "--threads", min=0, help=THREADS_HELP),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """TinyFace rank-1/5/10/20 (AdaFace protocol: probes vs gallery match + distractors)."""
    from qualiface.data.tinyface import load_tinyface
    from qualiface.eval.tinyface import tinyface_images

    try:
        protocol = load_tinyface(root)
        features = _features(out, "tinyface", model, device, tinyface_images(protocol),
                             protocol.all_paths, flip, batch_size, workers)
        _finish_tinyface(protocol, features, out)
    except _ERRORS as exc:
        raise fail(str(exc)) from None


def _finish_tinyface(protocol, features, out: Path) -> None:
    from qualiface.eval.report import EvalReport
    from qualiface.eval.tinyface import evaluate_tinyface

    metrics = evaluate_tinyface(protocol, features)
    _write_report(EvalReport("TinyFace identification", metrics), out)
    _summary(metrics, out)


@app.command("features")
def features_(
    file: Path = typer.Argument(..., help="features file written by an eval run (.safetensors)"),
    protocol: str = typer.Option(..., "--protocol", help="lfw, bin, ijb or tinyface"),
    source: Path = typer.Option(..., "--source", help="protocol source: LFW folder, .bin, IJB root or TinyFace root"),
    out: Path = typer.Option(..., "--out", help="output folder"),
    pairs: Path = typer.Option(None, "--pairs", help="lfw: pairs file"),
    folds: str = typer.Option(None, "--folds", help="lfw: protocol folds, e.g. 8,9,10"),
    name: str = typer.Option("IJBC", "--name", help="ijb: IJBB or IJBC"),
    aggregation: str = typer.Option("norm", "--aggregation", help="ijb: template aggregation"),
    qmagface: Path = typer.Option(None, "--qmagface", help="lfw, bin: QMagFace parameters (JSON) to apply"),
) -> None:
    """Evaluate precomputed per-image features (ids must match the protocol's images)."""
    from qualiface.eval.features import FeatureSet

    # Options of another protocol would be accepted and silently ignored.
    ignored = [flag for flag, given, used_by in (
        ("--qmagface", qmagface is not None, ("lfw", "bin")),
        ("--pairs", pairs is not None, ("lfw",)),
        ("--folds", folds is not None, ("lfw",))) if given and protocol not in used_by]
    if ignored:
        raise fail(f"{', '.join(ignored)}: not used by --protocol {protocol}")
    try:
        features = FeatureSet.load(file)
        if protocol == "lfw":
            from qualiface.eval.benchmarks import lfw_benchmark

            _finish_pairs(lfw_benchmark(source, pairs, folds=_parse_folds(folds)), features,
                          out, _qmagface(qmagface), None)
        elif protocol == "bin":
            from qualiface.eval.benchmarks import bin_benchmark

            _finish_pairs(bin_benchmark(source), features, out, _qmagface(qmagface), None)
        elif protocol == "ijb":
            from qualiface.data.ijb import load_ijb

            _finish_ijb(load_ijb(source, name), features, out, aggregation, None, False)
        elif protocol == "tinyface":
            from qualiface.data.tinyface import load_tinyface

            _finish_tinyface(load_tinyface(source), features, out)
        else:
            raise fail(f"unknown --protocol {protocol!r}; use lfw, bin, ijb or tinyface")
    except _ERRORS as exc:
        raise fail(str(exc)) from None


@app.command("compare")
def compare(
    runs: list[Path] = typer.Argument(..., help="eval output folders"),
    out: Path = typer.Option(..., "--out", help="output folder"),
) -> None:
    """Put eval runs side by side: metric table and overlaid ROC / EDC curves."""
    from qualiface.eval.report import compare_runs

    try:
        compare_runs(runs, out)
    except _ERRORS as exc:
        raise fail(str(exc)) from None
    console.print(f"comparison: {out / 'report.html'}")
