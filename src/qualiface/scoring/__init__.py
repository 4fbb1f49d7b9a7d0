"""Shared scoring: the numbers both ``eval`` (benchmarks) and ``infer`` (deployment) compute.

A low module: it imports only ``qualiface.errors`` (and numpy / scipy / torch), so the two wings
use one definition without ``infer`` depending on benchmark code. The sub-modules are imported on
demand (``from qualiface.scoring.thresholds import threshold_at_fmr``).

- ``thresholds``: pair-set validation (``check_pairs``), the threshold at a target FMR, and
  ``count_within``, the one exact rule for how many items a target rate (FMR, FAR, FPIR) allows.
- ``similarity``: row norms, L2 normalisation, cosine and Euclidean pair scores.
- ``aggregation``: template pooling (mean, media, norm-weighted, QWFA, QWFAF) and EQFace's
  streaming ``ProgressiveTemplate``.
- ``identification``: the per-probe outcome of a 1:N search and rank-k accuracy.

Errors are :class:`qualiface.errors.EvaluationError` (also importable as
``qualiface.eval.EvaluationError``).
"""
