"""What a finished run leaves for use (rank 0 writes): ``final.safetensors`` (backbone and head
weights), the self-describing model package ``model/`` (``qualiface.package``: backbone,
the method's quality estimator and its meaning) and the run's report ``report/``.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from qualiface.config import TrainingConfig, to_dict
from qualiface.package.io import save_model_package
from qualiface.train import checkpoint as ckpt
from qualiface.train.logging import console
from qualiface.train.report import write_training_report


def export_final_weights(path: Path, backbone: nn.Module, head_state: dict, cfg: TrainingConfig,
                         global_step: int) -> Path:
    """``backbone.*`` and ``head.*`` tensors as one safetensors file, tagged with the step and
    the architecture names."""
    weights = {**ckpt.prefixed("backbone", backbone.state_dict()), **ckpt.prefixed("head", head_state)}
    ckpt.export_safetensors(path, weights, {"global_step": global_step, "backbone": cfg.model.backbone,
                                            "head": cfg.head.name})
    return path


def save_package(out: Path, backbone: nn.Module, quality_estimator: nn.Module, cfg: TrainingConfig,
                 global_step: int, last_metrics: dict) -> Path:
    """The model package at ``out`` (the backbone is left in eval mode)."""
    backbone.eval()
    save_model_package(
        out,
        backbone=backbone,
        backbone_name=cfg.model.backbone,
        backbone_kwargs=dict(cfg.model.params),
        quality_estimator=quality_estimator,
        head_name=cfg.head.name,
        metadata={"global_step": global_step, "config": to_dict(cfg),
                  "last_metrics": {k: v for k, v in last_metrics.items() if isinstance(v, (int, float, str))}},
    )
    console.print(f"model package written to {out}")
    return out


def write_report(out_dir: Path, cfg: TrainingConfig, global_step: int, last_metrics: dict,
                 validation: dict) -> Path:
    """``report/report.html``: the run's curves (loss, accuracy, norm, lr, validation)."""
    summary = {"backbone": cfg.model.backbone, "head": cfg.head.name,
               "pipeline": cfg.pipeline.name, "steps": global_step,
               "final": {k: v for k, v in last_metrics.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)},
               "validation": validation}
    path = write_training_report(out_dir, title=f"training: {cfg.head.name} on {cfg.model.backbone}",
                                 summary=summary)
    console.print(f"training report: {path}")
    return path
