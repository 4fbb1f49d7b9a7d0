"""The contract every head honours, and the class-axis reductions that make heads shardable.

A head sees *unnormalised* embeddings ``x`` (B x D) and integer labels. It owns a class-centre
matrix ``weight`` (C x D), but ``forward`` also accepts an explicit ``weight`` subset with labels
already mapped to rows of that subset (-1 when a sample's class is not in the subset). That is
how the sharded / sampled classifier of ``qualiface.train.sharded`` reuses every head unchanged:
it passes its local shard of centres, local labels, and a ``ClassReducer`` that all-reduces
over the class axis across ranks. With the default ``LocalReducer`` every reduction is the
identity, so single-process code pays nothing for this.

Every reduction over the class axis inside a head (max, sum of exp, gathering the target
cosine, counting hard negatives) must go through the reducer, never ``tensor.max(dim=1)``
directly; that single rule is what keeps the sharded result equal to the unsharded one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class ClassReducer:
    """Reductions across class shards. ``LocalReducer`` is the no-op for one process."""

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over all class shards (autograd flows through)."""
        raise NotImplementedError

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise max over all class shards (no gradient; used for stabilisation)."""
        raise NotImplementedError


class LocalReducer(ClassReducer):
    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


LOCAL = LocalReducer()


@dataclass
class HeadOutput:
    """What a head returns.

    loss:    scalar to minimise (identity loss plus any regulariser of the method).
    logits:  B x C(local) logits exactly as the cross-entropy saw them.
    quality: (B,) the head's documented quality score, detached.
    metrics: values for logging (mean norm, mean target cosine, regulariser value, ...): Python
             floats or detached 0-d tensors. Heads keep device values as tensors so a forward
             never waits for the GPU; consumers call ``float()`` when they log (one host read).
    extras:  per-sample tensors other code may want (e.g. ``norm``, ``p``, ``z``), detached.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    quality: torch.Tensor
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
