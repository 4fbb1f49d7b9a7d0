"""Evaluation: recognition benchmarks, face image quality assessment, quality-aware scoring, reports.

The sub-modules are imported on demand (``from qualiface.eval.verification import roc_curve``);
importing ``qualiface.eval`` itself loads only numpy-free definitions.

- ``verification``: ROC (exact with ties), TAR at FAR, EER, AUC, k-fold accuracy for pair sets.
- ``similarity``: cosine / Euclidean pair scores, the fast chunked pair scorer, QMagFace.
- ``aggregation``: template pooling (mean, norm-weighted, QWFA, QWFAF) as one sparse matrix
  product, and the streaming ``ProgressiveTemplate`` (EQFace).
- ``identification``: rank-k (CMC) and TPIR at FPIR for open- and closed-set search.
- ``quality``: Error-versus-Discard Characteristic (EDC), its pAUC, rank correlations.
- ``features``: batched, cached feature extraction with flip-test fusion.
- ``benchmarks``: end-to-end runs for pair sets (``pairs.txt`` over a folder, ``.bin``).
- ``ijb`` / ``tinyface``: IJB-B/C 1:1 and 1:N, TinyFace rank-k.
- ``report``: ``metrics.json`` plus a Markdown/HTML report with PNG plots, and run comparison.

What ``infer`` shares with evaluation (``check_pairs``, ``threshold_at_fmr``, the plain similarity
functions, the whole of ``aggregation``, ``SearchResult`` and ``rank_accuracy``) lives in
``qualiface.scoring``; the modules above re-export it, so the old import paths keep working.
"""

from __future__ import annotations

from qualiface.errors import EvaluationError

__all__ = ["EvaluationError"]
