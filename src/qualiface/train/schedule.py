"""Learning-rate schedules as pure functions of the optimizer step.

Being a pure function of the step (not a stateful scheduler object) makes exact resume trivial:
the checkpoint only stores the step. Steps count *optimizer* steps, so gradient accumulation
does not stretch the schedule.

Shape of every schedule: linear warm-up from 0 to ``base_lr`` over ``warmup_steps`` (the lr at
step ``s < warmup_steps`` is ``base_lr * (s + 1) / warmup_steps``, so the first step already
moves), then the decay measured over the remaining ``total_steps - warmup_steps`` steps:

- ``poly``:     ``min_lr + (base_lr - min_lr) * (1 - t) ** power``
- ``cosine``:   ``min_lr + (base_lr - min_lr) * (1 + cos(pi t)) / 2``
- ``step``:     ``base_lr * gamma ** (number of milestones <= step)`` (milestones in steps)
- ``constant``: ``base_lr``

with ``t = (step - warmup_steps) / (total_steps - warmup_steps)`` in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

KINDS = ("poly", "cosine", "step", "constant")


@dataclass(frozen=True)
class Schedule:
    """A resolved schedule: everything in optimizer steps."""

    base_lr: float
    total_steps: int
    kind: str = "poly"
    warmup_steps: int = 0
    power: float = 2.0
    min_lr: float = 0.0
    milestones: tuple[int, ...] = field(default_factory=tuple)
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown schedule kind '{self.kind}' (known: {', '.join(KINDS)})")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}"
            )

    def __call__(self, step: int) -> float:
        return lr_at(step, self)


def lr_at(step: int, schedule: Schedule) -> float:
    """Learning rate for optimizer step ``step`` (0-based) under ``schedule``."""
    s = schedule
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < s.warmup_steps:
        return s.base_lr * (step + 1) / s.warmup_steps
    if s.kind == "constant":
        return s.base_lr
    if s.kind == "step":
        drops = sum(1 for m in s.milestones if step >= m)
        return s.base_lr * s.gamma**drops
    decay_steps = s.total_steps - s.warmup_steps
    t = min(1.0, (step - s.warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
    if s.kind == "poly":
        factor = (1.0 - t) ** s.power
    else:  # cosine
        factor = 0.5 * (1.0 + math.cos(math.pi * t))
    return s.min_lr + (s.base_lr - s.min_lr) * factor


def build_schedule(cfg, *, base_lr: float, total_steps: int, steps_per_epoch: int,
                   warmup: bool = True) -> Schedule:
    """Resolve a ``ScheduleConfig`` (epochs where it says epochs) into a ``Schedule`` in steps;
    ``warmup=False`` drops the warm-up (a phase that continues from trained weights).

    ``min_lr`` is a floor the decay goes down to, never up to: a phase whose own ``base_lr``
    is below it (EQFace's steps 2-3 at 0.01, a collapse retry at a tenth of that) keeps its
    ``base_lr`` instead of rising to ``min_lr``."""
    warmup_steps = cfg.warmup_steps if cfg.warmup_steps > 0 else round(cfg.warmup_epochs * steps_per_epoch)
    warmup_steps = min(warmup_steps, total_steps) if warmup else 0
    milestones = tuple(sorted(round(float(m) * steps_per_epoch) for m in cfg.milestones))
    return Schedule(
        base_lr=base_lr,
        total_steps=total_steps,
        kind=cfg.kind,
        warmup_steps=warmup_steps,
        power=cfg.power,
        min_lr=min(cfg.min_lr, base_lr),
        milestones=milestones,
        gamma=cfg.gamma,
    )
