"""The one-phase methods: ArcFace, CosFace, combined margins, CurricularFace, MV-Softmax,
MagFace and AdaFace.

Their differences are all loss maths (their heads in ``qualiface.heads``); as methods they are
alike: one phase training backbone and head together, and the raw embedding norm as the quality
score (trained to mean recognisability by MagFace and AdaFace, a by-product for the others).
"""

from __future__ import annotations

from qualiface.methods import METHODS
from qualiface.methods.base import NORM_MEANING, Method

PLAIN_HEADS = ("arcface", "cosface", "combined", "curricular", "mv-softmax", "magface", "adaface")


@METHODS.register(*PLAIN_HEADS)
class PlainMethod(Method):
    """One phase; quality = the embedding norm a = ||x|| >= 0."""

    name = "plain"
    heads = PLAIN_HEADS
    quality_meaning = NORM_MEANING
    quality_range = (0.0, None)
