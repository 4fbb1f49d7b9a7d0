"""1:N identification: rank-k (CMC) and TPIR at FPIR, for IJB-B/C 1:N and TinyFace.

A probe is *mated* when its subject has at least one gallery entry. Its rank is 1 + the number
of non-mated gallery entries scoring at least as high as its best mated entry (ties count
against the probe: a tie is not a success). Rank-k accuracy is the fraction of mated probes with
rank <= k (closed-set CMC over mated probes; TinyFace's distractors simply make that harder).

Open-set TPIR at FPIR ``f`` (IJB 1:N, NIST FRVT style): the threshold is the lowest one at which
at most a fraction ``f`` of the *non-mated* probes have a top gallery score >= threshold; TPIR
is the fraction of mated probes whose best mated entry is at rank 1 and scores >= threshold.
NaN when there are fewer than ``1 / f`` non-mated probes (exactly: when ``1 / N > f`` as float64
division computes it; ``scoring.thresholds.count_within``).

Scores are float32: the float32 rounding of the float64 sum of the D products in a fixed pairwise
tree, a function of the two feature rows alone (``scoring.similarity.similarity_blocks``), so identical entries tie
wherever they stand in the gallery and whatever the chunk size or device.

``SearchResult`` and ``rank_accuracy`` live in :mod:`qualiface.scoring.identification` (the
gallery in ``infer.search`` uses them too) and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qualiface.eval import EvaluationError
# The search outcome and rank-k accuracy live in the shared scoring module (the gallery
# uses them too); still importable from here.
from qualiface.scoring.identification import SearchResult, rank_accuracy  # noqa: F401
from qualiface.scoring.similarity import similarity_blocks
from qualiface.scoring.thresholds import count_within


def search(probe_features, probe_labels, gallery_features, gallery_labels,
           *, chunk: int = 512, device="cpu") -> SearchResult:
    """Score unit probes (P, D) against a unit gallery (G, D) in probe chunks -> ``SearchResult``.

    Labels are subject ids (any integers); a gallery label never used by a probe (e.g. -1 for
    TinyFace distractors) is never a mate. ``device``: where the similarity matrices and the
    rank counting run (e.g. ``"cuda"``); the result is numpy either way.

    Each score is a function of its probe and gallery rows alone
    (``scoring.similarity.similarity_blocks``), so an entry and an identical copy of it score
    exactly the same wherever they stand in the gallery, whatever ``chunk`` (probes per block)
    and device: a tie between a mate and a non-mate is a tie, and counts against the probe.
    """
    import torch  # lazy: torch (~1 s): eval's scoring modules import without it

    def on_device(array, dtype):
        return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype)).to(device)

    probes = on_device(probe_features, np.float32)
    gallery = on_device(gallery_features, np.float32)
    probe_labels = on_device(_subject_ids(probe_labels, "probe"), np.int64)
    gallery_labels = on_device(_subject_ids(gallery_labels, "gallery"), np.int64)
    if probes.ndim != 2 or gallery.ndim != 2 or probes.shape[1] != gallery.shape[1]:
        raise EvaluationError(f"search: probe features {tuple(probes.shape)} and gallery "
                              f"features {tuple(gallery.shape)} do not match")
    if len(probe_labels) != len(probes) or len(gallery_labels) != len(gallery):
        raise EvaluationError("search: one label per probe and per gallery entry is needed")
    if len(gallery) == 0:
        raise EvaluationError("search: the gallery is empty")
    # A NaN row compares false with everything: a NaN probe's best mate is NaN, no entry
    # scores ">=" it, and it counted as a rank-1 hit; a NaN gallery entry could never beat one.
    for what, rows in (("probe", probes), ("gallery entry", gallery)):
        finite = torch.isfinite(rows).all(dim=1)
        if not bool(finite.all()):
            first = int(torch.nonzero(~finite)[0, 0])
            raise EvaluationError(f"search: {what} {first} has a NaN or infinite feature "
                                  f"({int((~finite).sum())} such rows)")
    if torch.device(device).type == "mps":  # no float64 there; see similarity_blocks
        probes, gallery = probes.cpu(), gallery.cpu()
        probe_labels, gallery_labels = probe_labels.cpu(), gallery_labels.cpu()
    ranks, mated, top = [], [], []
    for block, sims in similarity_blocks(probes, gallery, chunk):
        is_mate = probe_labels[block, None] == gallery_labels[None, :]
        best_mated = sims.masked_fill(~is_mate, float("-inf")).max(dim=1).values
        beaten_by = ((sims >= best_mated[:, None]) & ~is_mate).sum(dim=1)
        has_mate = is_mate.any(dim=1)
        ranks.append(torch.where(has_mate, beaten_by + 1, torch.zeros_like(beaten_by)))
        mated.append(best_mated)
        top.append(sims.max(dim=1).values)
    return SearchResult(torch.cat(ranks).cpu().numpy(), torch.cat(mated).cpu().numpy(),
                        torch.cat(top).cpu().numpy())


def _subject_ids(labels, what: str) -> np.ndarray:
    """Subject ids; floats must be whole numbers (the int64 cast truncated 1.5 to subject 1,
    a "mate" for subject 1's gallery entries, and turned NaN into an arbitrary integer)."""
    labels = np.asarray(labels)
    if labels.dtype.kind == "f":
        bad = labels[~(np.isfinite(labels) & (labels == np.round(labels)))]
        if len(bad):
            raise EvaluationError(f"search: {what} subject ids must be whole numbers, got "
                                  f"{bad[0]} ({len(bad)} such)")
    return labels


def tpir_at_fpir(result: SearchResult, fpirs: Sequence[float] = (1e-2, 1e-1)) -> dict[float, tuple[float, float]]:
    """``{fpir: (tpir, threshold)}`` for open-set search (see the module docstring).

    With ``k = count_within(fpir, non-mated probes)`` (the largest ``k`` with ``k / N <=
    fpir``), the threshold is the next value above the (k+1)-th highest non-mated top score in
    the scores' own precision (float32 for ``search``), so it is exact in float32 and in
    float64: comparing the float32 scores with it (NumPy rounds a Python float to the array's
    dtype) gives the FPIR and the TPIR reported here.
    """
    mated = result.has_mate
    if mated.sum() == 0 or (~mated).sum() == 0:
        raise EvaluationError("TPIR at FPIR needs both mated and non-mated probes")
    # The scores' dtype: the float64 step above a float32 score that this used to return
    # (0.5 -> 0.5000000000000001) rounds back onto that score in a float32 comparison, which
    # then accepts the cut non-mated probe and every mated score tied with it (FPIR 0.2 at a
    # target of 0.1, and a TPIR above the one reported).
    dtype = np.result_type(result.top_scores, result.mated_scores)
    if not np.issubdtype(dtype, np.floating):
        dtype = np.dtype(np.float64)
    nonmated_top = np.sort(result.top_scores[~mated].astype(dtype))[::-1]
    hits = result.mated_scores[mated].astype(dtype)
    at_rank_one = result.ranks[mated] == 1
    out = {}
    for fpir in fpirs:
        # As tar_at_far: an FPIR above 1 gave the rank-1 rate, one at or below 0 a NaN read
        # as "not measurable", NaN a bare ValueError.
        if not 0 < fpir <= 1:
            raise EvaluationError(f"FPIR must be in (0, 1], got {fpir}")
        allowed = count_within(fpir, len(nonmated_top))  # exact count rule, no 1e-9 fudge
        if allowed < 1:
            out[fpir] = (float("nan"), float("nan"))
            continue
        if allowed >= len(nonmated_top):
            threshold = dtype.type(-np.inf)
        else:
            # Lowest threshold with at most `allowed` non-mated top scores >= it.
            threshold = np.nextafter(nonmated_top[allowed], dtype.type(np.inf))
        out[fpir] = (float(np.mean(at_rank_one & (hits >= threshold))), float(threshold))
    return out
