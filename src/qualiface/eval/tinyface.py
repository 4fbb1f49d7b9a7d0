"""TinyFace rank-1/5/10/20 under the AdaFace protocol (which reports ranks 1, 5 and 20).

Every probe image is searched (cosine of flip-fused features, image level, no templates)
against the gallery of all Gallery_Match and Gallery_Distractor images; rank-k is the fraction
of probes whose first same-subject gallery image is among the k best (ties count against the
probe). Images are resized to 112 x 112 before embedding, as AdaFace does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qualiface.data.tinyface import TinyFaceProtocol
from qualiface.eval.features import FeatureSet, ImageFiles, resize_to
from qualiface.eval.identification import search
from qualiface.scoring.identification import rank_accuracy
from qualiface.scoring.similarity import l2_normalize


def tinyface_images(protocol: TinyFaceProtocol, size: int = 112) -> ImageFiles:
    """Probe then gallery images as a dataset of uint8 (3, size, size); ids = ``all_paths``."""
    return ImageFiles([str(protocol.root / p) for p in protocol.all_paths], resize_to(size))


def evaluate_tinyface(protocol: TinyFaceProtocol, features: FeatureSet,
                      ranks: Sequence[int] = (1, 5, 10, 20)) -> dict:
    """Rank-k accuracy of the probes from per-image features (ids = relative paths)."""
    probes, _ = l2_normalize(features.features[features.rows(protocol.probe_paths)])
    gallery, _ = l2_normalize(features.features[features.rows(protocol.gallery_paths)])
    result = search(probes, protocol.probe_subjects, gallery, protocol.gallery_subjects)
    accuracy = rank_accuracy(result, ranks)
    return {
        "benchmark": "TinyFace",
        "num_probes": len(protocol.probe_paths),
        "num_gallery": len(protocol.gallery_paths),
        "num_distractors": int(np.sum(protocol.gallery_subjects < 0)),
        **{f"rank{k}": v for k, v in accuracy.items()},
    }
