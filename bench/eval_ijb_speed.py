#!/usr/bin/env python3
"""Time IJB-C-sized template pooling, pair scoring and ROC: vectorised vs the usual loops.

Random features with a fixed seed at IJB-C size (469,375 images, 23,124 templates, 15,658,489
pairs, 512-d). The pair structure mimics the IJB-C 1:1 protocol: every pair joins one of the
3,531 enrollment templates with one of the 19,593 verification templates (19,557 genuine
pairs). Media: templates hold 1-40 images in 1-6 media.

Vectorised path (``qualiface.eval``): ``aggregate_templates`` (one sparse product),
``score_pairs`` (auto strategy), ``roc_curve`` + ``tar_at_far``. With ``--structure random``
pairs are drawn uniformly over all templates instead (the sparse scoring path).

Naive baseline, as the common evaluation scripts do it: a Python loop over templates with
``np.where`` per template and per media; pair scores as ``np.sum(a * b, -1)`` over chunks of
100,000 gathered pairs; ``sklearn.metrics.roc_curve``. The template loop and the pair loop are
timed on a subset (``--naive-templates``, ``--naive-pairs``) and extrapolated linearly (both are
linear in their counts); the ROC is timed in full. Threads: torch and BLAS use every core
unless ``--threads`` says otherwise.

Writes ``bench/results/eval_ijb_speed.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

IMAGES, TEMPLATES, PAIRS, DIM = 469_375, 23_124, 15_658_489, 512
ENROLL, GENUINE = 3_531, 19_557


def make_protocol(seed: int, structure: str):
    rng = np.random.default_rng(seed)
    # Image counts per template summing to IMAGES: a multinomial over templates, at least 1.
    counts = 1 + rng.multinomial(IMAGES - TEMPLATES, np.full(TEMPLATES, 1 / TEMPLATES))
    template_ids = np.repeat(np.arange(TEMPLATES) * 3 + 1, counts)  # non-contiguous ids
    media_ids = rng.integers(0, 6, IMAGES) + 10 * np.repeat(np.arange(TEMPLATES), counts)
    features = rng.standard_normal((IMAGES, DIM), dtype=np.float32)
    features *= rng.uniform(0.5, 3.0, (IMAGES, 1)).astype(np.float32)
    if structure == "ijbc":
        first = rng.integers(0, ENROLL, PAIRS)
        second = rng.integers(ENROLL, TEMPLATES, PAIRS)
        first.sort()  # the protocol file is grouped by its first template
    else:
        first = rng.integers(0, TEMPLATES, PAIRS)
        second = rng.integers(0, TEMPLATES, PAIRS)
    labels = np.zeros(PAIRS, dtype=bool)
    labels[rng.choice(PAIRS, GENUINE, replace=False)] = True
    ids = np.arange(TEMPLATES) * 3 + 1
    return features, template_ids, media_ids, ids[first], ids[second], labels


def naive_pooling(features, template_ids, media_ids, templates):
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


def naive_scoring(templates, lookup, first, second, batch=100_000):
    scores = []
    for start in range(0, len(first), batch):
        a = templates[lookup[first[start:start + batch]]]
        b = templates[lookup[second[start:start + batch]]]
        scores.extend(np.sum(a * b, -1))
    return np.array(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--structure", choices=["ijbc", "random"], default="ijbc")
    parser.add_argument("--naive-templates", type=int, default=1000)
    parser.add_argument("--naive-pairs", type=int, default=1_000_000)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval_ijb_speed.json"))
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from qualiface.eval.aggregation import aggregate_templates
    from qualiface.eval.ijb import template_rows
    from qualiface.eval.similarity import score_pairs
    from qualiface.eval.verification import roc_curve, tar_at_far

    t0 = time.perf_counter()
    features, template_ids, media_ids, first_ids, second_ids, labels = make_protocol(
        args.seed, args.structure)
    print(f"generated inputs in {time.perf_counter() - t0:.1f} s")

    timings: dict[str, float] = {}
    t = time.perf_counter()
    pooled = aggregate_templates(features, template_ids, media_ids=media_ids, mode="norm")
    timings["pooling"] = time.perf_counter() - t
    t = time.perf_counter()
    first = template_rows(pooled, first_ids, "pairs")
    second = template_rows(pooled, second_ids, "pairs")
    scores = score_pairs(pooled.features, first, second)
    timings["scoring"] = time.perf_counter() - t
    t = time.perf_counter()
    roc = roc_curve(scores, labels)
    tar = tar_at_far(roc, [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    timings["roc"] = time.perf_counter() - t
    timings["total"] = timings["pooling"] + timings["scoring"] + timings["roc"]

    naive: dict[str, float] = {}
    if not args.skip_naive:
        from sklearn.metrics import roc_curve as sk_roc_curve

        subset = pooled.ids[: args.naive_templates]
        t = time.perf_counter()
        reference = naive_pooling(features, template_ids, media_ids, subset)
        naive["pooling"] = (time.perf_counter() - t) * TEMPLATES / len(subset)
        np.testing.assert_allclose(reference, pooled.features[: len(subset)], atol=1e-4)
        lookup = np.zeros(pooled.ids.max() + 1, dtype=np.int64)
        lookup[pooled.ids] = np.arange(len(pooled.ids))
        n = min(args.naive_pairs, PAIRS)
        t = time.perf_counter()
        reference_scores = naive_scoring(pooled.features, lookup, first_ids[:n], second_ids[:n])
        naive["scoring"] = (time.perf_counter() - t) * PAIRS / n
        np.testing.assert_allclose(reference_scores, scores[:n], atol=1e-5)
        t = time.perf_counter()
        sk_roc_curve(labels, scores)
        naive["roc"] = time.perf_counter() - t
        naive["total"] = naive["pooling"] + naive["scoring"] + naive["roc"]

    print(f"\nIJB-C size: {IMAGES:,} images, {TEMPLATES:,} templates, {PAIRS:,} pairs, {DIM}-d, "
          f"pair structure '{args.structure}', torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'stage':<10}{'vectorised (s)':>16}{'naive (s)':>12}{'speed-up':>10}")
    for stage in ("pooling", "scoring", "roc", "total"):
        base = naive.get(stage)
        ratio = f"{base / timings[stage]:>9.1f}x" if base else ""
        print(f"{stage:<10}{timings[stage]:>16.2f}{(f'{base:.2f}' if base else '-'):>12}{ratio}")
    print("TAR@FAR (random features, so near chance):",
          {f"{f:.0e}": round(v[0], 5) for f, v in tar.items()})
    result = {
        "images": IMAGES, "templates": TEMPLATES, "pairs": PAIRS, "dim": DIM,
        "structure": args.structure, "seed": args.seed,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
        "vectorised_s": timings, "naive_s": naive,
        "naive_extrapolated_from": {"templates": args.naive_templates, "pairs": args.naive_pairs},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
