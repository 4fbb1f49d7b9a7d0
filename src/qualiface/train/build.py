"""What a run is built from: seeds, device, dataset and backbone, head, the decoded-image cache,
and the per-phase model wrapper (DDP, ``torch.compile``).

Every function takes what it needs explicitly; ``Trainer.__init__`` and ``prepare_phase`` call
them in order. Single process: the method's plain head (or, with ``distributed.sample_rate < 1``,
a one-shard ``ShardedHead`` that samples centres). Under ``torchrun``: the sharded head of
``train.sharded`` (each rank holds a slice of the class centres).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from qualiface.backbones import BackboneSizeError, build_backbone
from qualiface.config import ConfigError, TrainingConfig
from qualiface.data import build_dataset
from qualiface.data.robust import require_image_size
from qualiface.devices import DeviceError, parse_device
from qualiface.train.data import cached_size_bytes, decode_all
from qualiface.train.distributed import DistInfo
from qualiface.train.sharded import ShardedHead


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(requested: str, dist_device: torch.device) -> torch.device:
    """``auto`` -> the process group's device (cuda:<local_rank> or cpu); else as given."""
    if requested == "auto":
        return dist_device
    try:
        return parse_device(requested)
    except DeviceError as exc:
        raise ConfigError(f"train.device: {exc}; or auto") from None


def build_dataset_and_backbone(cfg: TrainingConfig, device: torch.device):
    """The training set and the backbone (on ``device``) from the config; a bad keyword or size
    in their params is a ``ConfigError``. A backbone with a fixed input size gets a dataset that
    skips (and reports) wrong-size images instead of failing in ``torch.stack`` later."""
    try:
        dataset = build_dataset(cfg.data.name, **cfg.data.params)
        backbone = build_backbone(cfg.model.backbone, **cfg.model.params)
    except (TypeError, BackboneSizeError) as exc:
        raise ConfigError(f"{exc}") from None
    if getattr(backbone, "input_size", None) is not None:
        side = int(backbone.input_size)
        dataset = require_image_size(dataset, (side, side))
    backbone.to(device)
    if cfg.train.channels_last:
        backbone.to(memory_format=torch.channels_last)
    return dataset, backbone


def build_head(cfg: TrainingConfig, method, backbone: nn.Module, num_classes: int, dist: DistInfo) -> nn.Module:
    """The method's head, or a ``ShardedHead`` around it: under more than one process (each rank
    holds a slice of the centres), and in one process when ``distributed.sample_rate < 1``
    (Partial FC's centre sampling on one device, which a plain head cannot do; a silently
    ignored ``sample_rate`` would train the full softmax the user asked to avoid)."""
    embedding_size = int(backbone.embedding_size)
    feature_dim = int(backbone.feature_dim)
    try:
        if dist.world_size > 1 or cfg.distributed.sample_rate < 1.0:
            params = method.head_params(dict(cfg.head.params), feature_dim=feature_dim)
            return ShardedHead(
                method.head_name, embedding_size, num_classes, params,
                rank=dist.rank, world_size=dist.world_size,
                sample_rate=cfg.distributed.sample_rate, seed=cfg.train.seed,
            )
        return method.build_head(embedding_size, num_classes, feature_dim, **cfg.head.params)
    except ValueError as exc:
        raise ConfigError(f"head '{cfg.head.name}': {exc}") from None


def build_cache(dataset, cfg: TrainingConfig, device: torch.device, num_workers: int, progress: bool):
    """``(images, labels)``: the whole training set decoded once, when it fits (see
    ``DataConfig.cache``); on the GPU when it takes under half its free memory. Else None."""
    d = cfg.data
    if d.cache == "never":
        return None
    size = cached_size_bytes(dataset)
    if d.cache == "auto" and size > d.cache_max_gb * 2**30:
        return None
    images, labels = decode_all(dataset, num_workers=num_workers if len(dataset) > 2048 else 0,
                                progress=progress)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        if size < 0.5 * free:  # keep half the GPU for the model
            images, labels = images.to(device), labels.to(device)
    return images, labels


def wrap_model(backbone: nn.Module, dist: DistInfo, device: torch.device, compile: bool) -> nn.Module:
    """The module the step calls: DDP around the backbone when distributed and anything in it
    trains (rebuilt per phase: frozen sets change), then ``torch.compile`` when asked."""
    model = backbone
    if dist.is_distributed and any(p.requires_grad for p in backbone.parameters()):
        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(backbone, device_ids=ids)
    if compile:
        model = torch.compile(model)
    return model
