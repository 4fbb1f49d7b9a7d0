"""Time IJB-C-sized 1:1 and 1:N evaluation: ``qualiface.eval`` (vectorised) vs the usual loops.

Random features with a fixed seed, same inputs for both paths, results checked equal, the
speed-up (naive time / vectorised time) reported per stage.

**1:1** at IJB-C size: 469,375 images, 23,124 templates, 15,658,489 pairs, 512-d. The pair
structure mimics the IJB-C 1:1 protocol: every pair joins one of the 3,531 enrollment templates
with one of the 19,593 verification templates (19,557 genuine pairs); templates hold 1-40 images
in 1-6 media. Vectorised: ``aggregate_templates`` (one sparse product), ``score_pairs`` (auto
strategy), ``roc_curve`` + ``tar_at_far``. With ``--structure random`` pairs are drawn uniformly
over all templates instead (the sparse scoring path). Naive, as the common evaluation scripts do
it: a Python loop over templates with ``np.where`` per template and per media; pair scores as
``np.sum(a * b, -1)`` over chunks of 100,000 gathered pairs; ``sklearn.metrics.roc_curve``.

**1:N** at IJB-C size: galleries G1 (1,772 templates) and G2 (1,759), one template per subject
(3,531 subjects, disjoint between the galleries), 19,593 probe templates of those subjects (so
against each gallery about half the probes are mated, half are not: open-set search), 512-d.
Each probe is its subject's centre plus noise of a random strength, so rank-k and TPIR land in
an informative range. Features are unit vectors rounded to a 2^-10 grid: every dot product is
then exact in float32 whatever the summation order, so the BLAS of numpy and of torch give
bit-identical scores and the two paths can be compared for exact equality. Vectorised, over each
gallery as ``eval.ijb`` does it: ``template_rows`` + ``identification.search`` (chunked probe x
gallery products and masked reductions) + ``rank_accuracy`` (1/5/10) + ``tpir_at_fpir`` (1e-2,
1e-1), the mean over both galleries reported. Naive: per chunk of 1,000 probes one ``np.dot``,
then a Python loop over the probes that sorts each score row (non-mates first among equal
scores, so ties count against the probe as in the library) and finds the first mate; rank-k and
TPIR from those per-probe values.

Subsets: the naive template loop (``--naive-templates``), pair loop (``--naive-pairs``) and probe
loop (``--naive-probes``) are timed on the first items and extrapolated linearly (all are linear
in their counts); the naive ROC is timed in full. With a 1:N subset the equality check covers the
subset's per-probe ranks and scores, and the naive metrics are compared with the library's
metrics over the same probes.

``--device cpu|cuda``: stages whose ``qualiface.eval`` function takes a ``device`` argument run
there; a stage whose library function is CPU-only (numpy/scipy, or torch on CPU tensors) is
timed on the CPU and marked so in the table and in ``stage_devices`` of the JSON. The naive
loops always run on the CPU. Threads: torch and BLAS use every core unless ``--threads`` says
otherwise.

Writes ``bench/results/eval_ijb_speed.json`` and prints the table; beside the JSON, the seconds per
stage as a bar chart (``.png``, same stem) and a Markdown file with the chart and the table.

    python bench/eval_ijb_speed.py                     # CPU, IJB-C size, about a minute
    python bench/eval_ijb_speed.py --device cuda --out bench/results/eval_ijb_speed_cuda.json
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS_DIR, BenchError, fmt, markdown_table, print_table, provenance, run_main, write_figures,
    write_json)


@dataclass(frozen=True)
class Sizes:
    """Problem size. 1:1: images, templates (the first ``enroll`` are enrollment), pairs,
    genuine pairs. 1:N: gallery G1 / G2 templates (one per subject), probe templates. ``dim``:
    feature dimension of both."""

    images: int = 469_375
    templates: int = 23_124
    pairs: int = 15_658_489
    enroll: int = 3_531
    genuine: int = 19_557
    gallery1: int = 1_772
    gallery2: int = 1_759
    probes: int = 19_593
    dim: int = 512


IJBC = Sizes()
TINY = Sizes(images=400, templates=60, pairs=3000, enroll=12, genuine=60, gallery1=20,
             gallery2=17, probes=300, dim=32)  # for the tests
RANKS = (1, 5, 10)
FPIRS = (1e-2, 1e-1)
FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
GRID = 2.0 ** -10  # feature grid of the 1:N data (see the module docstring)


# --------------------------------------------------------------------------------------- 1:1


@dataclass
class VerificationInputs:
    """Image features (N, D) float32 with template_ids / media_ids (N,), and the pairs as
    template ids first_ids / second_ids (P,) with labels (P,) bool."""

    features: np.ndarray
    template_ids: np.ndarray
    media_ids: np.ndarray
    first_ids: np.ndarray
    second_ids: np.ndarray
    labels: np.ndarray


def make_verification(sizes: Sizes, seed: int, structure: str) -> VerificationInputs:
    """Random IJB-C-like 1:1 inputs (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    # Image counts per template summing to `images`: a multinomial over templates, at least 1.
    counts = 1 + rng.multinomial(sizes.images - sizes.templates,
                                 np.full(sizes.templates, 1 / sizes.templates))
    ids = np.arange(sizes.templates) * 3 + 1  # non-contiguous ids, as real protocols have
    template_ids = np.repeat(ids, counts)
    media_ids = rng.integers(0, 6, sizes.images) + 10 * np.repeat(np.arange(sizes.templates), counts)
    features = rng.standard_normal((sizes.images, sizes.dim), dtype=np.float32)
    features *= rng.uniform(0.5, 3.0, (sizes.images, 1)).astype(np.float32)
    if structure == "ijbc":
        first = rng.integers(0, sizes.enroll, sizes.pairs)
        second = rng.integers(sizes.enroll, sizes.templates, sizes.pairs)
        first.sort()  # the protocol file is grouped by its first template
    else:
        first = rng.integers(0, sizes.templates, sizes.pairs)
        second = rng.integers(0, sizes.templates, sizes.pairs)
    labels = np.zeros(sizes.pairs, dtype=bool)
    labels[rng.choice(sizes.pairs, sizes.genuine, replace=False)] = True
    return VerificationInputs(features, template_ids, media_ids, ids[first], ids[second], labels)


def naive_pooling(features, template_ids, media_ids, templates) -> np.ndarray:
    """Per-template loop: mean within each media, sum over media, L2 norm -> (T, D)."""
    out = np.zeros((len(templates), features.shape[1]))
    for k, t in enumerate(templates):
        (idx,) = np.where(template_ids == t)
        f, m = features[idx], media_ids[idx]
        per_media = []
        for u in np.unique(m):
            (j,) = np.where(m == u)
            per_media.append(f[j].mean(0) if len(j) > 1 else f[j][0])
        out[k] = np.sum(per_media, 0)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def naive_scoring(templates, lookup, first, second, batch: int = 100_000) -> np.ndarray:
    """Gather both sides of each chunk of pairs and ``np.sum(a * b, -1)`` -> (P,)."""
    scores = []
    for start in range(0, len(first), batch):
        a = templates[lookup[first[start:start + batch]]]
        b = templates[lookup[second[start:start + batch]]]
        scores.extend(np.sum(a * b, -1))
    return np.array(scores)


def _takes_device(function: Callable) -> bool:
    return "device" in inspect.signature(function).parameters


def _call(function: Callable, device: str, *args, **kwargs):
    """Call a library function on ``device`` when it accepts one (else it runs on the CPU)."""
    if _takes_device(function):
        kwargs["device"] = device
    return function(*args, **kwargs)


def stage_devices(device: str) -> dict[str, str]:
    """Where each vectorised stage runs for ``--device``: the device, or ``cpu`` plus why."""
    from qualiface.eval.aggregation import aggregate_templates
    from qualiface.eval.identification import search
    from qualiface.eval.similarity import score_pairs
    from qualiface.eval.verification import roc_curve

    functions = {"pooling": aggregate_templates, "scoring": score_pairs, "roc": roc_curve,
                 "search": search}
    out = {}
    for stage, function in functions.items():
        if device == "cpu" or _takes_device(function):
            out[stage] = device
        else:
            out[stage] = f"cpu ({function.__name__} is CPU-only)"
    out["rank/tpir"] = "cpu" if device == "cpu" else "cpu (numpy on the search results)"
    return out


def time_verification(inputs: VerificationInputs, sizes: Sizes, *, device: str = "cpu",
                      naive_templates: int | None = 1000, naive_pairs: int | None = 1_000_000,
                      skip_naive: bool = False) -> dict:
    """Time 1:1 pooling, pair scoring and ROC both ways and check they agree.

    Returns ``{"vectorised_s": {stage: s}, "naive_s": {stage: s}, "tar_at_far": {far: tar}}``
    (stages: pooling, scoring, roc, total; naive times extrapolated from the subsets, ``None``
    = all). Raises ``AssertionError`` when the two paths disagree.
    """
    from qualiface.eval.aggregation import aggregate_templates
    from qualiface.eval.ijb import template_rows
    from qualiface.eval.similarity import score_pairs
    from qualiface.eval.verification import far_key, roc_curve, tar_at_far

    timings: dict[str, float] = {}
    t = time.perf_counter()
    pooled = _call(aggregate_templates, device, inputs.features, inputs.template_ids,
                   media_ids=inputs.media_ids, mode="norm")
    timings["pooling"] = time.perf_counter() - t
    t = time.perf_counter()
    first = template_rows(pooled, inputs.first_ids, "pairs")
    second = template_rows(pooled, inputs.second_ids, "pairs")
    scores = _call(score_pairs, device, pooled.features, first, second)
    timings["scoring"] = time.perf_counter() - t
    t = time.perf_counter()
    roc = _call(roc_curve, device, scores, inputs.labels)
    tar = tar_at_far(roc, FARS)
    timings["roc"] = time.perf_counter() - t
    timings["total"] = timings["pooling"] + timings["scoring"] + timings["roc"]

    naive: dict[str, float] = {}
    if not skip_naive:
        from sklearn.metrics import roc_curve as sk_roc_curve

        subset = pooled.ids[:naive_templates]
        t = time.perf_counter()
        reference = naive_pooling(inputs.features, inputs.template_ids, inputs.media_ids, subset)
        naive["pooling"] = (time.perf_counter() - t) * len(pooled.ids) / len(subset)
        np.testing.assert_allclose(reference, pooled.features[:len(subset)], atol=1e-4)
        lookup = np.zeros(pooled.ids.max() + 1, dtype=np.int64)
        lookup[pooled.ids] = np.arange(len(pooled.ids))
        n = len(scores) if naive_pairs is None else min(naive_pairs, len(scores))
        t = time.perf_counter()
        reference_scores = naive_scoring(pooled.features, lookup, inputs.first_ids[:n],
                                         inputs.second_ids[:n])
        naive["scoring"] = (time.perf_counter() - t) * len(scores) / n
        np.testing.assert_allclose(reference_scores, scores[:n], atol=1e-5)
        t = time.perf_counter()
        sk_far, sk_tar, _ = sk_roc_curve(inputs.labels, scores)
        naive["roc"] = time.perf_counter() - t
        for far, (value, _) in tar.items():  # same operating points from scikit-learn's curve
            reachable = sk_far <= far
            if far * roc.num_impostor >= 1:
                assert value == sk_tar[reachable].max(), f"TAR@FAR {far}: {value} vs sklearn"
        naive["total"] = naive["pooling"] + naive["scoring"] + naive["roc"]
    return {"vectorised_s": timings, "naive_s": naive,
            "tar_at_far": {far_key(f): v[0] for f, v in tar.items()}}


# --------------------------------------------------------------------------------------- 1:N


@dataclass
class IdentificationInputs:
    """Template features (T, D) float32 on the 2^-10 grid with template ``ids`` (T,); galleries
    ``{"G1": (template ids, subject ids), "G2": ...}`` and the probe (template ids, subject
    ids), as ``qualiface.data.ijb.IJBProtocol`` holds them."""

    ids: np.ndarray
    features: np.ndarray
    galleries: dict[str, tuple[np.ndarray, np.ndarray]]
    probe: tuple[np.ndarray, np.ndarray]


def _on_grid(features: np.ndarray) -> np.ndarray:
    """Unit rows rounded to the 2^-10 grid (float32, integer multiples of GRID)."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    return (np.round(unit / GRID) * GRID).astype(np.float32)


def make_identification(sizes: Sizes, seed: int) -> IdentificationInputs:
    """Random IJB-C-like 1:N inputs (deterministic in ``seed``): gallery templates first, then
    probes; subject s has gallery template s in G1 (s < gallery1) or G2 (otherwise)."""
    rng = np.random.default_rng(seed + 1)  # not the 1:1 stream
    subjects = sizes.gallery1 + sizes.gallery2
    centres = rng.standard_normal((subjects, sizes.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    per_dim = 1 / np.sqrt(sizes.dim)  # noise of norm ~1 per unit of strength
    gallery = centres + rng.standard_normal((subjects, sizes.dim), dtype=np.float32) * (0.5 * per_dim)
    probe_subjects = rng.integers(0, subjects, sizes.probes)
    # Probe difficulty varies (media, pose, resolution): noise norm between 1 and 10 times the
    # signal, so at 512-d rank-1 and TPIR are far from both 0 and 1.
    strength = rng.uniform(1.0, 10.0, (sizes.probes, 1)).astype(np.float32) * per_dim
    probes = centres[probe_subjects] + rng.standard_normal((sizes.probes, sizes.dim),
                                                           dtype=np.float32) * strength
    features = _on_grid(np.concatenate([gallery, probes]))
    ids = np.arange(subjects + sizes.probes, dtype=np.int64) * 2 + 7
    subject_ids = np.arange(subjects, dtype=np.int64) + 1000
    in_g1 = np.arange(subjects) < sizes.gallery1
    galleries = {"G1": (ids[:subjects][in_g1], subject_ids[in_g1]),
                 "G2": (ids[:subjects][~in_g1], subject_ids[~in_g1])}
    return IdentificationInputs(ids, features, galleries,
                                (ids[subjects:], subject_ids[probe_subjects]))


def _templates(inputs: IdentificationInputs):
    from qualiface.eval.aggregation import Templates

    return Templates(inputs.ids, inputs.features, np.ones(len(inputs.ids), dtype=np.float32))


def library_identification(inputs: IdentificationInputs, *, device: str = "cpu",
                           probe_limit: int | None = None,
                           timings: dict[str, float] | None = None) -> tuple[dict, dict]:
    """The vectorised path over every gallery -> (metrics, per-gallery ``SearchResult``).

    ``timings``, when given, receives the seconds spent in ``search`` and in ``metrics``, each
    timed around its own calls with the monotonic ``perf_counter`` (so neither can be negative).

    metrics: ``{"galleries": {label: {"rank1": ..., "tpir_at_fpir": {...}}}, "rank1": mean,
    ..., "tpir_at_fpir": {key: mean}}`` as ``eval.ijb`` reports it. ``probe_limit`` restricts the
    metrics (not the search) to the first probes, for comparison with a naive subset.
    """
    from qualiface.eval.identification import SearchResult, rank_accuracy, search, tpir_at_fpir
    from qualiface.eval.ijb import template_rows
    from qualiface.eval.verification import far_key

    templates = _templates(inputs)
    probe_ids, probe_subjects = inputs.probe
    probes = templates.features[template_rows(templates, probe_ids, "1:N probe")]
    per_gallery, results = {}, {}
    spent = {"search": 0.0, "metrics": 0.0}
    for label, (gallery_ids, gallery_subjects) in inputs.galleries.items():
        gallery = templates.features[template_rows(templates, gallery_ids, f"gallery {label}")]
        t = time.perf_counter()
        result = _call(search, device, probes, probe_subjects, gallery, gallery_subjects)
        spent["search"] += time.perf_counter() - t
        results[label] = result
        if probe_limit is not None:
            result = SearchResult(result.ranks[:probe_limit], result.mated_scores[:probe_limit],
                                  result.top_scores[:probe_limit])
        t = time.perf_counter()
        entry = {f"rank{k}": v for k, v in rank_accuracy(result, RANKS).items()}
        entry["tpir_at_fpir"] = {far_key(f): v[0] for f, v in tpir_at_fpir(result, FPIRS).items()}
        spent["metrics"] += time.perf_counter() - t
        per_gallery[label] = entry
    if timings is not None:
        timings.update(spent)
    return _mean_over_galleries(per_gallery), results


def _mean_over_galleries(per_gallery: dict) -> dict:
    """Published IJB 1:N tables give the mean over the two galleries."""
    summary: dict = {"galleries": per_gallery}
    for k in RANKS:
        summary[f"rank{k}"] = float(np.mean([g[f"rank{k}"] for g in per_gallery.values()]))
    keys = next(iter(per_gallery.values()))["tpir_at_fpir"]
    summary["tpir_at_fpir"] = {key: float(np.mean([g["tpir_at_fpir"][key]
                                                   for g in per_gallery.values()]))
                               for key in keys}
    return summary


def naive_search(probes, probe_subjects, gallery, gallery_subjects,
                 chunk: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-probe loop -> (ranks (P,) 0 = no mate, best mated score (P,), top score (P,)).

    Each score row is sorted descending with non-mates before mates among equal scores (a tie
    is not a success); the rank is the position of the first mate.
    """
    ranks = np.zeros(len(probes), dtype=np.int64)
    mated = np.full(len(probes), -np.inf, dtype=np.float32)
    top = np.zeros(len(probes), dtype=np.float32)
    for start in range(0, len(probes), chunk):
        sims = np.dot(probes[start:start + chunk], gallery.T)
        for i, row in enumerate(sims):
            is_mate = gallery_subjects == probe_subjects[start + i]
            order = np.lexsort((is_mate, -row))  # last key is primary: score desc, then mates
            top[start + i] = row[order[0]]
            hits = np.flatnonzero(is_mate[order])
            if len(hits):
                ranks[start + i] = hits[0] + 1
                mated[start + i] = row[order[hits[0]]]
    return ranks, mated, top


def naive_metrics(ranks, mated, top) -> dict:
    """Rank-k over mated probes; TPIR at FPIR f: the threshold is the (floor(f * N) + 1)-th
    highest non-mated top score (N non-mated probes), a hit scores above it at rank 1."""
    from qualiface.eval.verification import far_key

    has_mate = ranks > 0
    entry: dict = {f"rank{k}": float(np.mean(ranks[has_mate] <= k)) for k in RANKS}
    nonmated = np.sort(top[~has_mate])[::-1]
    entry["tpir_at_fpir"] = {}
    for fpir in FPIRS:
        allowed = int(np.floor(fpir * len(nonmated) + 1e-9))  # guard 0.1 * 9800 = 979.99...
        if allowed < 1:
            value = float("nan")
        else:
            hits = ranks[has_mate] == 1
            if allowed < len(nonmated):
                hits &= mated[has_mate] > nonmated[allowed]
            value = float(np.mean(hits))
        entry["tpir_at_fpir"][far_key(fpir)] = value
    return entry


def time_identification(inputs: IdentificationInputs, *, device: str = "cpu",
                        naive_probes: int | None = None, skip_naive: bool = False) -> dict:
    """Time 1:N search + metrics both ways over every gallery and check they are equal.

    Returns ``{"vectorised_s": {"search", "metrics", "total"}, "naive_s": {...}, "metrics":
    library metrics over all probes, "naive_checked_probes": n}``. Naive times are
    extrapolated from the first ``naive_probes`` probes (``None`` = all).
    """

    timings: dict[str, float] = {}
    t = time.perf_counter()
    metrics, results = library_identification(inputs, device=device, timings=timings)
    timings["total"] = time.perf_counter() - t

    naive: dict[str, float] = {}
    checked = 0
    if not skip_naive:
        templates = _templates(inputs)
        row = {int(i): k for k, i in enumerate(templates.ids)}  # the script's dict lookup
        probe_ids, probe_subjects = inputs.probe
        total = len(probe_ids)
        checked = total if naive_probes is None else min(naive_probes, total)
        probes = templates.features[[row[int(i)] for i in probe_ids[:checked]]]
        search_s = metrics_s = 0.0
        per_gallery = {}
        for label, (gallery_ids, gallery_subjects) in inputs.galleries.items():
            gallery = templates.features[[row[int(i)] for i in gallery_ids]]
            t = time.perf_counter()
            ranks, mated, top = naive_search(probes, probe_subjects[:checked], gallery,
                                             gallery_subjects)
            search_s += time.perf_counter() - t
            t = time.perf_counter()
            per_gallery[label] = naive_metrics(ranks, mated, top)
            metrics_s += time.perf_counter() - t
            library = results[label]
            np.testing.assert_array_equal(ranks, library.ranks[:checked], err_msg=f"{label} ranks")
            np.testing.assert_array_equal(mated, library.mated_scores[:checked])
            np.testing.assert_array_equal(top, library.top_scores[:checked])
        naive["search"] = search_s * total / checked
        naive["metrics"] = metrics_s
        naive["total"] = naive["search"] + naive["metrics"]
        expected = metrics if checked == total else library_identification(
            inputs, device=device, probe_limit=checked)[0]
        reference = _mean_over_galleries(per_gallery)
        assert _equal(reference, expected), f"1:N metrics differ: {reference} vs {expected}"
    return {"vectorised_s": timings, "naive_s": naive, "metrics": metrics,
            "naive_checked_probes": checked}


def _equal(a, b) -> bool:
    """Exact equality of nested metric dicts, NaN equal to NaN."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b or (np.isnan(a) and np.isnan(b))


# -------------------------------------------------------------------------------------- main


def stage_seconds(verification: dict, identification: dict) -> dict[str, dict[str, float]]:
    """``{"1:1 pooling": {"vectorised": s, "naive": s}, ...}`` for the figure (naive left out
    where it was skipped)."""
    rows = {}
    for task, part, stages in (("1:1", verification, ("pooling", "scoring", "roc", "total")),
                               ("1:N", identification, ("search", "metrics", "total"))):
        for stage in stages:
            rows[f"{task} {stage}"] = {"vectorised": part["vectorised_s"][stage],
                                       "naive": part["naive_s"].get(stage)}
    return rows


def table_rows(verification: dict, identification: dict, devices: dict[str, str]) -> list[list[str]]:
    """Rows: task, stage, where the vectorised stage ran, vectorised s, naive s, speed-up."""
    rows = []
    for task, part, stages in (("1:1", verification, ("pooling", "scoring", "roc", "total")),
                               ("1:N", identification, ("search", "metrics", "total"))):
        for stage in stages:
            fast, slow = part["vectorised_s"][stage], part["naive_s"].get(stage)
            where = devices.get("rank/tpir" if stage == "metrics" else stage, "")
            ratio = f"{slow / fast:.1f}x" if slow and fast > 0 else "-"
            rows.append([task, stage, where, fmt(fast, 2), fmt(slow, 2), ratio])
    return rows


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--structure", choices=["ijbc", "random"], default="ijbc",
                        help="1:1 pair structure (enrollment x verification, or uniform)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="device of the vectorised stages the library supports it for")
    parser.add_argument("--naive-templates", type=int, default=1000)
    parser.add_argument("--naive-pairs", type=int, default=1_000_000)
    parser.add_argument("--naive-probes", type=int, default=None,
                        help="probes the naive 1:N loop runs and is extrapolated from (default: "
                             "all, about 6 s at IJB-C size)")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests only
    parser.add_argument("--out", default=str(RESULTS_DIR / "eval_ijb_speed.json"))
    args = parser.parse_args(argv)
    for name in ("naive_templates", "naive_pairs", "naive_probes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: this machine has no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = TINY if args.tiny else IJBC
    devices = stage_devices(args.device)

    t0 = time.perf_counter()
    verification_inputs = make_verification(sizes, args.seed, args.structure)
    identification_inputs = make_identification(sizes, args.seed)
    print(f"generated inputs in {time.perf_counter() - t0:.1f} s")
    verification = time_verification(verification_inputs, sizes, device=args.device,
                                      naive_templates=args.naive_templates,
                                      naive_pairs=args.naive_pairs, skip_naive=args.skip_naive)
    del verification_inputs
    identification = time_identification(identification_inputs, device=args.device,
                                         naive_probes=args.naive_probes,
                                         skip_naive=args.skip_naive)

    scale = "IJB-C" if sizes == IJBC else "tiny"
    title = (f"{scale} size, random {sizes.dim}-d features: 1:1 {sizes.images:,} images / "
             f"{sizes.templates:,} templates / {sizes.pairs:,} pairs ('{args.structure}'); 1:N "
             f"G1 {sizes.gallery1:,} + G2 {sizes.gallery2:,} gallery, {sizes.probes:,} probes; "
             f"torch threads {torch.get_num_threads()}")
    print_table(title, ["task", "stage", "vectorised on", "vectorised (s)", "naive (s)",
                        "speed-up"], table_rows(verification, identification, devices))
    if not args.skip_naive:
        checked = identification["naive_checked_probes"]
        probes = "all probes" if checked == sizes.probes else f"{checked:,} probes"
        print(f"naive loops on the CPU, timed on {min(args.naive_templates, sizes.templates):,} "
              f"templates, {min(args.naive_pairs, sizes.pairs):,} pairs and {probes} and "
              "extrapolated linearly (ROC in full); vectorised and naive results are equal.")
    metrics = identification["metrics"]
    print("1:1 TAR@FAR (random features, so near chance):", verification["tar_at_far"])
    print("1:N mean over G1/G2:", {k: round(metrics[f"rank{k}"], 4) for k in RANKS},
          "TPIR@FPIR", {k: round(v, 4) for k, v in metrics["tpir_at_fpir"].items()})
    result = {
        **provenance(args.device),
        "settings": {"sizes": asdict(sizes), "seed": args.seed, "structure": args.structure,
                     "device": args.device, "skip_naive": args.skip_naive},
        "device": args.device,
        "stage_devices": devices,
        "naive_device": "cpu",
        "naive_extrapolated_from": {"templates": args.naive_templates, "pairs": args.naive_pairs,
                                    "probes": identification["naive_checked_probes"]},
        "verification": verification,
        "identification": identification,
    }
    out = write_json(args.out, result)
    print(f"wrote {out}")
    figures = write_figures(out, title, [("seconds per stage (log scale)", stage_seconds(
        verification, identification), True)], markdown_table(
            ["task", "stage", "vectorised on", "vectorised (s)", "naive (s)", "speed-up"],
            table_rows(verification, identification, devices)))
    if figures:
        print(f"wrote {figures[0]} and {figures[1]}")
    return result



if __name__ == "__main__":
    sys.exit(run_main(main))
