"""Compatibility names: method schedules now live with their methods (``qualiface.methods``).

``PipelineError``, ``Phase``, ``inner_head``, ``set_frozen`` and ``warmup_length`` are
re-exported from ``qualiface.methods.base``; ``build_pipeline(cfg)`` is ``build_method(cfg)``.
"""

from __future__ import annotations

from qualiface.methods import build_method as build_pipeline
from qualiface.methods.base import Phase, PipelineError, inner_head, set_frozen, warmup_length

__all__ = ["Phase", "PipelineError", "build_pipeline", "inner_head", "set_frozen", "warmup_length"]
