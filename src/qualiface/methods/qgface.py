"""QGFace: joint training on a face and a degraded copy of it.

Every batch gets a low-quality view from the degradation preset ``pipeline.qgface.lq_preset``
(``qualiface.data.degrade``); the head receives its embeddings as ``second_view`` (the delayed
start of the contrastive term is the head's ``contrastive_start_step`` parameter). One phase.
Quality: the raw embedding norm of the first view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qualiface.methods import METHODS
from qualiface.methods.base import NORM_MEANING, Method, PipelineError

if TYPE_CHECKING:
    import torch


@dataclass
class QGFaceConfig:
    """QGFace joint training: the low-quality view comes from the degradation preset
    ``lq_preset`` (see ``qualiface.data.degrade``)."""

    lq_preset: str = "qgface"



@METHODS.register("qgface")
class QGFaceMethod(Method):
    """One phase; a degraded second view of every batch."""

    name = "qgface"
    heads = ("qgface",)
    Config = QGFaceConfig
    quality_meaning = NORM_MEANING
    quality_range = (0.0, None)

    def __init__(self, head_name: str, **kwargs) -> None:
        super().__init__(head_name, **kwargs)
        self._degrader = None

    def second_view(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A degraded uint8 copy of ``images`` (B, 3, H, W).

        Degradation runs on the CPU with the (CPU) augmentation generator: JPEG needs the CPU
        anyway, and one generator keeps the view reproducible on any device.
        """
        if self._degrader is None:
            from qualiface.data import degrade  # lazy: imports torch; the config parser reads this module and must not load torch

            name = self.options.lq_preset
            presets = {"qgface": degrade.qgface_lq_config}
            if name not in presets:
                raise PipelineError(f"unknown lq_preset '{name}' (known: {', '.join(presets)})")
            self._degrader = degrade.CompositeDegradation(presets[name]())
        degraded, _severity = self._degrader(images.cpu(), generator=generator)
        return degraded.to(images.device)
