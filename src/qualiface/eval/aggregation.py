"""Template aggregation: lives in :mod:`qualiface.scoring.aggregation` (shared with ``infer``).

Re-exported here so ``from qualiface.eval.aggregation import aggregate_templates`` keeps
working; see that module for the modes and ``ProgressiveTemplate``.
"""

from __future__ import annotations

from qualiface.scoring.aggregation import (
    AGGREGATION_MODES,
    ProgressiveTemplate,
    Templates,
    aggregate,
    aggregate_templates,
    pooling_weights,
)

__all__ = [
    "AGGREGATION_MODES",
    "ProgressiveTemplate",
    "Templates",
    "aggregate",
    "aggregate_templates",
    "pooling_weights",
]
