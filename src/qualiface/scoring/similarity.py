"""Similarity of feature vectors: row norms, L2 normalisation, cosine and Euclidean pair scores.

All scores are similarities (higher = more alike): the Euclidean score is the *negative*
distance between L2-normalised features, so every metric uses one convention. Shared by
``qualiface.eval`` (benchmarks, QMagFace, template pooling, 1:N search) and ``qualiface.infer``
(calibration, the exact gallery); the chunked pair scorer for millions of pairs stays in
``eval.similarity``. ``similarity_blocks`` scores probes against a gallery so that each score
depends on its two rows alone (ties do not depend on position).
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-12


def row_norms(features: np.ndarray) -> np.ndarray:
    """L2 norm of each row (N,), without the (N, D) temporary ``np.linalg.norm`` allocates
    (that temporary costs seconds at IJB-C size)."""
    return np.sqrt(np.einsum("ij,ij->i", features, features))


def l2_normalize(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> (unit features (N, D) float32, norms (N,) float32); zero rows stay zero."""
    features = np.asarray(features, dtype=np.float32)
    norms = row_norms(features)
    return features / np.maximum(norms, _EPS)[:, None], norms


def cosine_scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of raw features a (N, D) and b (N, D) -> (N,) float32.

    A zero row stays zero when normalised (``l2_normalize``), so its cosine with anything, a
    zero row included, is 0: the score of orthogonal features, neither alike nor unlike.
    """
    ua, _ = l2_normalize(a)
    ub, _ = l2_normalize(b)
    return np.einsum("ij,ij->i", ua, ub)


def euclidean_scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Negative Euclidean distance of the L2-normalised rows (N,) (in [-2, 0], higher = closer).

    A monotone function of the cosine (``d^2 = 2 - 2 cos``): same ROC, different thresholds.
    That holds for zero rows too: a pair with a zero row has cosine 0 (``cosine_scores``), so
    its score is ``-sqrt(2)``, that of orthogonal features (the plain distance of the
    normalised rows would be -1 against a unit row, a cosine of 0.5, and 0, a perfect match,
    for two zero rows).
    """
    ua, norms_a = l2_normalize(a)
    ub, norms_b = l2_normalize(b)
    distance = np.linalg.norm(ua - ub, axis=1)
    degenerate = (norms_a < _EPS) | (norms_b < _EPS)  # rows l2_normalize could not make unit
    if degenerate.any():
        cosine = np.einsum("ij,ij->i", ua[degenerate], ub[degenerate])
        distance[degenerate] = np.sqrt(np.maximum(2 - 2 * cosine, 0))
    return -distance


SIMILARITIES = {"cosine": cosine_scores, "euclidean": euclidean_scores}


#: Scores computed per probe block (probes x gallery entries); see ``similarity_blocks``.
_BLOCK_ENTRIES = 1 << 22
#: Entries whose products ``_tree_dots`` holds at once (N x D float64).
_RESCORED_AT_ONCE = 1 << 13


def _similarity_block(probes, gallery64, gallery_norms):
    """Scores (B, G) float32 of float32 probe rows (B, D) against the gallery (``gallery64``:
    its float32 rows as float64 (G, D), with their norms ``gallery_norms`` (G,)), each
    entry a function of its two feature rows alone: the float32 rounding of the float64 sum of
    the D exact products in a fixed pairwise tree (``_tree_dots``).

    A float32 matrix product does not give that: BLAS sums each entry in an order that depends
    on where it falls in the blocking (edge tiles, matrix-vector for a one-probe chunk), so a
    gallery row and an identical copy of it at another position, or the same probe in another
    chunk, scored 1 float32 step apart (1.0 and 1.0000001 for a self-match; 0.0156657249 and
    0.0156657342), and a tie between a mate and a non-mate, which counts against the probe, was
    decided by position. Here one float64 matrix product gives every entry within ``bound`` of
    the tree sum: both are float64 sums of the same exact products (float32 x float32 fits in
    float64), each within ``gamma_D * sum_k |p_k g_k| <= gamma_D * |p| |g|`` of the exact dot
    product whatever the order, ``gamma_D = D u / (1 - D u)``, ``u = 2**-53``. Where the float32
    rounding is the same at both ends of that interval it is the tree sum's rounding (rounding
    is monotone); the few entries where it is not (a float32 rounding boundary within about
    1e-13 of the score, ~0.1 % of random 512-d pairs, mostly scores near 0) are summed by the
    tree itself. Cost: about 3x the former float32 search on one CPU thread (a 512 x 1,800
    block of 512-d features, best of 15: 16 ms before, 44-50 ms now), mostly the float64
    product; on a GPU with full-rate float64 it is small.
    """
    import torch  # lazy: torch (~1 s): eval's scoring modules import without it

    probes64 = probes.double()
    product = probes64 @ gallery64.T
    dim = probes.shape[1]
    gamma = dim * 2.0 ** -53 / (1 - dim * 2.0 ** -53)
    # 2 gamma covers both sums; doubled again for the norms' and the +- below's own roundings.
    probe_bounds = (4 * gamma) * torch.linalg.vector_norm(probes64, dim=1)
    bound = probe_bounds[:, None] * gallery_norms[None, :]
    sims = product.float()
    lowest = (product - bound).float()
    product += bound  # now the highest the tree sum can be
    rows, cols = torch.nonzero(lowest != product.float()).unbind(1)
    del product, bound, lowest
    if len(rows):
        sims[rows, cols] = _tree_dots(probes64, gallery64, rows, cols)
    return sims


def _tree_dots(left64, right64, rows, cols):
    """Dot products of ``left64[rows[i]]`` and ``right64[cols[i]]`` (float64 tensors holding
    float32 values, so each product is exact) -> (N,) float32: the D products, zero-padded to a
    power of two, summed in a fixed pairwise tree (``(p0 + p1) + (p2 + p3)``, ...; each level
    one rounded float64 addition per pair, the same for any N, position or device), rounded to
    float32 once."""
    import torch  # lazy: torch (~1 s): eval's scoring modules import without it

    dim = left64.shape[1]
    width = 1 if dim <= 1 else 1 << (dim - 1).bit_length()
    out = torch.empty(len(rows), dtype=torch.float32, device=left64.device)
    for start in range(0, len(rows), _RESCORED_AT_ONCE):
        piece = slice(start, start + _RESCORED_AT_ONCE)
        level = left64[rows[piece]] * right64[cols[piece]]
        if width != dim:
            level = torch.nn.functional.pad(level, (0, width - dim))  # + 0.0 is exact
        while level.shape[1] > 1:
            level = level[:, 0::2] + level[:, 1::2]
        out[piece] = level[:, 0].float()
    return out


def similarity_blocks(probes, gallery, chunk: int = 1024):
    """Yield ``(rows, scores)`` for consecutive blocks of probe rows: ``rows`` a slice of
    ``probes``, ``scores`` (B, G) float32 torch scores of those probes against every gallery
    row, on the tensors' device (one that has float64; ``probes`` (Q, D) and ``gallery`` (G, D)
    float32 torch tensors, unit rows for cosines).

    Each score is a function of its two feature rows alone (``_similarity_block``): an entry
    and an identical copy of it score exactly the same wherever they stand in the gallery and
    whatever the block size (at most ``chunk`` probes, and at most ``_BLOCK_ENTRIES`` scores, which
    bounds the float64 temporaries), so a tie stays a tie. 1:N evaluation
    (``eval.identification.search``) and the exact gallery (``infer.search``) both score this
    way.
    """
    import torch  # lazy: the scoring modules import without torch

    gallery64 = gallery.double()
    gallery_norms = torch.linalg.vector_norm(gallery64, dim=1)
    block_rows = max(1, min(int(chunk), _BLOCK_ENTRIES // max(1, len(gallery))))
    for start in range(0, len(probes), block_rows):
        rows = slice(start, start + block_rows)
        yield rows, _similarity_block(probes[rows], gallery64, gallery_norms)
