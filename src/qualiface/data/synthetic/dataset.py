"""The ``synthetic`` dataset: procedural faces for CPU demos and tests, nothing downloaded or
stored.

Every image is drawn on the fly by ``render`` from a seed; then a random
``degrade.CompositeDegradation`` is applied (a share of samples stays clean) and its severity
recorded.

**Splits**: the ``train`` split uses global identity ids ``[0, num_identities)``, the ``test``
split ids ``[TEST_IDENTITY_OFFSET, TEST_IDENTITY_OFFSET + num_identities)``, so for one seed the
two never share an identity. Sample ``i`` of a given config is always the same image: pose,
expression and degradation plans are precomputed per split at construction and per-sample
randomness comes from a generator seeded with ``(seed, split, i)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qualiface.data import DATASETS
from qualiface.data.alignment import TEMPLATE_SIZE
from qualiface.data.degrade import DEFAULT_KINDS, CompositeConfig, CompositeDegradation
from qualiface.data.synthetic.render import (
    SAMPLE_DRAWS,
    face_landmarks,
    make_identity,
    render_face,
)
from qualiface.errors import QualifaceError

TEST_IDENTITY_OFFSET = 1_000_000
SPLITS = ("train", "test")


class SyntheticDataError(QualifaceError, ValueError):
    """Invalid configuration or index for the synthetic dataset."""


@dataclass
class SyntheticConfig:
    """Settings of a ``SyntheticFaces`` dataset.

    num_identities, images_per_identity: dataset size (sample i shows identity
        ``i // images_per_identity``, which is also its label).
    seed: everything (identities, poses, degradations) follows from it.
    split: "train" or "test"; the two splits have disjoint identities (see module docstring).
    degradation_probability: share of samples that go through the degradation mix; the rest
        are clean (severity 0).
    kind_probability: chance of each degradation kind for a degraded sample.
    max_severity: severities of each kind are uniform in [0, max_severity].
    degradation_kinds: which ``degrade`` kinds the mix uses.
    image_size: side of the square crops (112 for the standard alignment).
    """

    num_identities: int = 100
    images_per_identity: int = 20
    seed: int = 0
    split: str = "train"
    degradation_probability: float = 0.6
    kind_probability: float = 0.25
    max_severity: float = 1.0
    degradation_kinds: tuple[str, ...] = DEFAULT_KINDS
    image_size: int = TEMPLATE_SIZE

    def validate(self) -> None:
        if self.num_identities < 1 or self.images_per_identity < 1:
            raise SyntheticDataError(
                "num_identities and images_per_identity must be >= 1, got "
                f"{self.num_identities}, {self.images_per_identity}"
            )
        if self.num_identities > TEST_IDENTITY_OFFSET:
            raise SyntheticDataError(
                f"at most {TEST_IDENTITY_OFFSET} identities per split, got {self.num_identities}"
            )
        if self.split not in SPLITS:
            raise SyntheticDataError(f"split must be one of {SPLITS}, got '{self.split}'")
        if not 0.0 <= self.degradation_probability <= 1.0:
            raise SyntheticDataError(
                f"degradation_probability must be in [0, 1], got {self.degradation_probability}"
            )
        if not 0.0 <= self.kind_probability <= 1.0:
            raise SyntheticDataError(
                f"kind_probability must be in [0, 1], got {self.kind_probability}"
            )
        if not 0.0 <= self.max_severity <= 1.0:
            raise SyntheticDataError(f"max_severity must be in [0, 1], got {self.max_severity}")
        if self.image_size < 32:
            raise SyntheticDataError(f"image_size must be >= 32, got {self.image_size}")
        if self.seed < 0:
            raise SyntheticDataError(f"seed must be >= 0, got {self.seed}")


def _sample_seed(seed: int, split: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample ``index`` (SplitMix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + split * 0xBF58476D1CE4E5B9 + index + 1) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) >> 1


class SyntheticFaces:
    """Procedural face dataset: ``ds[i] -> (uint8 (3, S, S) RGB tensor, label)``.

    See ``render``'s docstring for what varies per identity and per sample, and this module's
    for the split rule. ``severities()`` returns every sample's recorded degradation severity
    without rendering anything.
    """

    def __init__(self, config: SyntheticConfig | None = None, **overrides) -> None:
        if config is None:
            config = SyntheticConfig(**overrides)
        elif overrides:
            raise SyntheticDataError("pass either a SyntheticConfig or keyword settings, not both")
        config.validate()
        self.config = config
        self.num_classes = config.num_identities
        self._split_code = SPLITS.index(config.split)
        first_id = TEST_IDENTITY_OFFSET if config.split == "test" else 0
        self.identity_ids = np.arange(first_id, first_id + config.num_identities)
        self.identities = [make_identity(config.seed, int(g)) for g in self.identity_ids]

        n = len(self)
        rng = np.random.default_rng([config.seed, self._split_code, 0x5A])
        self._draws = rng.random((n, SAMPLE_DRAWS), dtype=np.float64).astype(np.float32)
        self.degradation = CompositeDegradation(
            CompositeConfig.uniform(
                kinds=config.degradation_kinds,
                probability=config.kind_probability,
                severity_range=(0.0, config.max_severity),
                clean_probability=1.0 - config.degradation_probability,
            )
        )
        plan_generator = torch.Generator().manual_seed(
            _sample_seed(config.seed, self._split_code, -1)
        )
        self._plan = self.degradation.sample_plan(n, plan_generator)  # (N, K)
        self._severity = self.degradation.combine(self._plan).numpy().astype(np.float32)

    def __len__(self) -> int:
        return self.config.num_identities * self.config.images_per_identity

    def _check_index(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"synthetic sample {index} out of range for {n} samples")
        return index % n

    def label(self, index: int) -> int:
        """Identity label in [0, num_classes) of sample ``index``."""
        return self._check_index(index) // self.config.images_per_identity

    def labels(self) -> np.ndarray:
        """(N,) int64 labels of all samples, without rendering."""
        return np.arange(len(self), dtype=np.int64) // self.config.images_per_identity

    def severities(self) -> np.ndarray:
        """(N,) float32 recorded degradation severity of every sample in [0, 1] (0 = clean)."""
        return self._severity.copy()

    def meta(self, index: int) -> dict:
        """Per-sample metadata: severity, identity, global identity id, per-kind severities."""
        index = self._check_index(index)
        label = index // self.config.images_per_identity
        kinds = {
            kind: float(s) for kind, s in zip(self.degradation.kinds, self._plan[index].tolist())
            if s > 0
        }
        return {
            "severity": float(self._severity[index]),
            "identity": label,
            "global_identity": int(self.identity_ids[label]),
            "split": self.config.split,
            "degradations": kinds,
        }

    def landmarks(self, index: int) -> np.ndarray:
        """Five landmarks of sample ``index`` (5, 2) float32 pixels, ``TEMPLATE`` order."""
        index = self._check_index(index)
        person = self.identities[index // self.config.images_per_identity]
        return face_landmarks(person, self._draws[index], self.config.image_size)

    def _generator(self, index: int) -> torch.Generator:
        seed = _sample_seed(self.config.seed, self._split_code, index)
        return torch.Generator().manual_seed(seed)

    def _render_clean(self, index: int) -> np.ndarray:
        person = self.identities[index // self.config.images_per_identity]
        return render_face(person, self._draws[index], self.config.image_size)

    def image(self, index: int, degraded: bool = True) -> torch.Tensor:
        """Render sample ``index`` as uint8 (3, S, S) RGB; ``degraded=False`` gives the clean
        image the degradation was applied to."""
        index = self._check_index(index)
        # The HWC -> CHW copy is done by numpy: torch's parallel copy of a tiny tensor is slow
        # on a busy CPU.
        image = torch.from_numpy(np.ascontiguousarray(self._render_clean(index).transpose(2, 0, 1)))
        plan = self._plan[index : index + 1]
        if degraded and bool((plan > 0).any()):
            image = self.degradation.apply_plan(image, plan, [self._generator(index)])
        return image

    def render_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Render many samples at once: (uint8 (B, 3, S, S), int64 labels (B,)).

        Same pixels as ``ds[i]`` for each index (each sample keeps its own random stream), but
        the degradations run once per batch instead of once per image, which is much faster
        in a process with several torch threads (e.g. to pre-render a demo set).
        """
        index = [self._check_index(int(i)) for i in np.asarray(indices).reshape(-1)]
        size = self.config.image_size
        pixels = np.empty((len(index), 3, size, size), dtype=np.uint8)
        for row, i in enumerate(index):
            pixels[row] = self._render_clean(i).transpose(2, 0, 1)
        images = torch.from_numpy(pixels)
        plan = self._plan[index]
        if bool((plan > 0).any()):
            images = self.degradation.apply_plan(images, plan, [self._generator(i) for i in index])
        labels = torch.as_tensor(index, dtype=torch.int64) // self.config.images_per_identity
        return images, labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.image(index), self.label(index)

    def held_out(self, num_identities: int | None = None,
                 images_per_identity: int | None = None) -> SyntheticFaces:
        """The test split for the same seed and settings (identities disjoint from train)."""
        if self.config.split == "test":
            raise SyntheticDataError("this dataset is already the held-out (test) split")
        cfg = self.config
        return SyntheticFaces(SyntheticConfig(
            **{**cfg.__dict__, "split": "test",
               "num_identities": num_identities or cfg.num_identities,
               "images_per_identity": images_per_identity or cfg.images_per_identity}
        ))


@DATASETS.register("synthetic")
def synthetic(**kwargs) -> SyntheticFaces:
    """``build_dataset("synthetic", num_identities=..., split="test")``; see SyntheticConfig."""
    return SyntheticFaces(SyntheticConfig(**kwargs))
