"""An embedded, procedural face-like dataset for CPU demos and tests (registered as ``synthetic``).

- ``render``: the OpenCV face renderer (identity parameters, one sample from its random draws,
  its five landmarks).
- ``dataset``: ``SyntheticFaces`` / ``SyntheticConfig``: identities and per-sample draws from a
  seed, recorded degradations, disjoint train/test identities.

Every name is importable from ``qualiface.data.synthetic`` as before, ``make_pairs`` included
(it works on any labelled dataset and lives in ``qualiface.data.pairs``).
"""

from __future__ import annotations

from qualiface.data.pairs import make_pairs
from qualiface.data.synthetic.dataset import (
    SPLITS,
    TEST_IDENTITY_OFFSET,
    SyntheticConfig,
    SyntheticDataError,
    SyntheticFaces,
    synthetic,
)
from qualiface.data.synthetic.render import (
    SAMPLE_DRAWS,
    TEMPLATE,
    FaceIdentity,
    face_landmarks,
    make_identity,
    render_face,
)

__all__ = [
    "SAMPLE_DRAWS", "SPLITS", "TEMPLATE", "TEST_IDENTITY_OFFSET", "FaceIdentity",
    "SyntheticConfig", "SyntheticDataError", "SyntheticFaces", "face_landmarks", "make_identity",
    "make_pairs", "render_face", "synthetic",
]
