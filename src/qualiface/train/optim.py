"""Optimizers with the usual face-recognition weight-decay split.

Weight decay is applied to weight matrices and conv kernels only. One-dimensional parameters
(BatchNorm scales and shifts, biases, PReLU slopes) get none: decaying them only fights the
normalisation and shrinks activations without regularising anything useful.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def split_decay(parameters: Iterable[tuple[str, nn.Parameter]]) -> tuple[list, list]:
    """Split named parameters into (decay, no_decay); frozen parameters are left out."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for _, param in parameters:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if param.ndim <= 1 else decay).append(param)
    return decay, no_decay


def build_optimizer(
    modules: Iterable[nn.Module] | Iterable[tuple[str, nn.Parameter]], cfg, *, lr: float | None = None
) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW over the trainable parameters of ``modules``.

    ``modules``: modules, or ``(name, parameter)`` pairs when only some parameters train.
    ``cfg``: an ``OptimConfig``. ``lr`` overrides ``cfg.lr`` (the schedule sets it every step).
    Group 0 carries ``cfg.weight_decay``, group 1 none.
    """
    named: list[tuple[str, nn.Parameter]] = []
    for item in modules:
        if isinstance(item, nn.Module):
            named.extend(item.named_parameters())
        else:
            named.append(item)
    decay, no_decay = split_decay(named)
    if not decay and not no_decay:
        raise ValueError("nothing to optimise: every parameter is frozen")
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    lr = cfg.lr if lr is None else lr
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
    raise ValueError(f"unknown optimizer '{cfg.name}' (known: sgd, adamw)")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
