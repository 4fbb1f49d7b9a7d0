"""The sharded classifier (Partial FC style): each rank holds only its slice of class centres.

With C identities and W ranks, rank r owns the contiguous classes ``[r*C//W, (r+1)*C//W)``, so
the centre matrix, its gradient and its optimizer state cost C/W x D per rank instead of C x D.
Every step:

1. the ranks all-gather their embeddings and labels (and backbone ``features`` /
   ``second_view`` when given): every rank sees the global batch of N = W*B samples;
2. each rank maps the global labels to rows of its shard (-1 for classes it does not own) and,
   with ``sample_rate < 1``, keeps only a subset of its centres (below);
3. each rank calls the ordinary head (``qualiface.heads``) on the global batch with its subset
   of centres and a ``DistributedReducer``: the class-axis reductions (log-sum-exp, target
   cosine, hard-negative counts) are summed across ranks, so every rank computes the *same*
   global loss, equal to the unsharded head's loss on the concatenated batch.

Gradient scaling (why the centres' gradients are divided by W). Every rank back-propagates the
same value L, and the collectives' backward passes are exact adjoints, so autograd computes the
gradient of ``sum over ranks of L = W*L``. This rank's embeddings therefore receive
``W * dL/dx_r``; after DDP averages the backbone's gradients over the W ranks, the backbone
gradient is ``dL/dtheta``, exactly single-process training on the concatenated batch. The shard
of centres is not replicated (DDP does not average it), so its gradient is divided by W on the
way in, giving exactly ``dL/dW_r``. Any other trainable parameter of the head is replicated
and is averaged over ranks by a gradient hook, which likewise gives ``dL/dp``. The returned
``loss`` is L itself (the value single-process training reports).

Class sampling (``sample_rate < 1``, training mode only). A rank keeps every centre whose class
occurs in the global batch (the positives) plus uniformly drawn negatives, up to
``max(int(sample_rate * C_local), #positives)`` rows; the draw is a function of
(``seed``, step, rank) only, so a rerun reproduces it. Unsampled centres take no part in the
loss, so their gradient is exactly zero; they are still one dense parameter, so an SGD
optimizer keeps applying weight decay and the decaying momentum of earlier steps to them (as
Partial FC v2 does); with sampling the loss is the softmax over the sampled classes only and
therefore differs from the full-softmax loss.

In one process (``world_size == 1``) no collective runs and, with ``sample_rate == 1``, the
forward is exactly the plain head's forward.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from qualiface.errors import QualifaceError
from qualiface.heads import build_head
from qualiface.heads.base import LOCAL, HeadOutput
from qualiface.heads.common import map_to_rows
from qualiface.train.distributed import (
    DistributedReducer,
    all_gather_no_grad,
    all_gather_with_grad,
    guarded_collective,
)

#: State-dict keys of a head that have one row per class (sharded); every other entry (EMA
#: statistics, the curriculum parameter, ...) is replicated. A head with more per-class state
#: declares it in a ``per_class_keys`` attribute.
DEFAULT_PER_CLASS_KEYS = ("weight",)


class ShardingError(QualifaceError, ValueError):
    """Inconsistent sharding: bad ranks, a state dict of the wrong shape, unequal batches."""


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Classes ``[start, stop)`` owned by ``rank``: ``[r*C//W, (r+1)*C//W)``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ShardingError(f"rank {rank} is outside [0, world_size={world_size})")
    if num_classes < world_size:
        raise ShardingError(
            f"{num_classes} classes cannot be sharded over {world_size} ranks (each rank needs "
            "at least one class)"
        )
    return rank * num_classes // world_size, (rank + 1) * num_classes // world_size


class _ScaleGradient(torch.autograd.Function):
    """Identity in the forward pass, gradient multiplied by ``factor`` in the backward pass."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output * ctx.factor, None


def _sampling_seed(seed: int, step: int, rank: int) -> int:
    # A fixed mixing of the three integers; masked to the generator's 63-bit seed range.
    mixed = (seed * 1_000_003 + step) * 1_000_033 + rank * 7919
    return mixed & ((1 << 63) - 1)


class ShardedHead(nn.Module):
    """A head whose class centres are split over ``world_size`` ranks; see the module docstring.

    head_name / embedding_size / num_classes / head_params: as ``qualiface.heads.build_head``
    (``num_classes`` is the global count; this rank builds ``stop - start`` centres).
    rank, world_size: this process's place; a process group of that size must be running
    before ``forward`` / ``full_state_dict`` when ``world_size > 1``.
    sample_rate: fraction of this shard's centres used per training step, in (0, 1].
    seed: drives the negative sampling and, when ``world_size > 1``, the centres' initialisation
    (each rank uses its own derived seed so that shards do not start as copies of each other).
    """

    def __init__(
        self,
        head_name: str,
        embedding_size: int,
        num_classes: int,
        head_params: Mapping[str, object] | None = None,
        rank: int = 0,
        world_size: int = 1,
        sample_rate: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not (isinstance(sample_rate, (int, float)) and 0.0 < sample_rate <= 1.0):
            raise ShardingError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        self.start, self.stop = shard_range(num_classes, rank, world_size)
        self.head_name = head_name
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.rank = rank
        self.world_size = world_size
        self.sample_rate = float(sample_rate)
        self.seed = int(seed)
        self.step = 0  # advanced by each training forward; pass step= to override
        self.num_local = self.stop - self.start
        self.num_sampled = max(1, int(self.sample_rate * self.num_local))
        params = dict(head_params or {})
        if world_size == 1:
            self.head = build_head(head_name, embedding_size, num_classes, **params)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_sampling_seed(self.seed, -1, rank))
                self.head = build_head(head_name, embedding_size, self.num_local, **params)
            # The head validates labels against num_classes; it receives *global* labels
            # together with explicit class_ids, so the global count is the right bound.
            self.head.num_classes = num_classes
        self.per_class_keys = tuple(getattr(self.head, "per_class_keys", DEFAULT_PER_CLASS_KEYS))
        self.reducer = DistributedReducer() if world_size > 1 else LOCAL
        if world_size > 1:
            for name, parameter in self.head.named_parameters():
                if name not in self.per_class_keys:
                    parameter.register_hook(self._average_over_ranks)

    # -- forward -------------------------------------------------------------------------
    def forward(
        self,
        local_embeddings: torch.Tensor,
        local_labels: torch.Tensor,
        features: torch.Tensor | None = None,
        second_view: torch.Tensor | None = None,
        *,
        step: int | None = None,
    ) -> HeadOutput:
        """Global loss over all ranks' samples; quality and extras for this rank's samples.

        local_embeddings: (B, D) this rank's embeddings (B equal on every rank).
        local_labels:     (B,) global class ids in [0, num_classes).
        features / second_view: (B, ...) optional per-sample inputs of the head, gathered too.
        step: sampling step (default: the internal counter, advanced per training forward).

        Returns a HeadOutput with ``loss`` the global scalar (same on all ranks), ``logits``
        (W*B, C_sub) for this rank's (sampled) classes, ``quality`` (B,) and per-sample
        ``extras`` (B, ...) of the local samples, ``metrics`` over the global batch.
        """
        if local_embeddings.dim() != 2:
            raise ShardingError(
                f"local_embeddings must be (B, D), got shape {tuple(local_embeddings.shape)}"
            )
        batch_size = local_embeddings.shape[0]
        if local_labels.shape != (batch_size,):
            raise ShardingError(
                f"local_labels must be ({batch_size},), got {tuple(local_labels.shape)}"
            )
        if self.world_size > 1:
            self._check_group()
            self._check_equal_batches(batch_size, local_embeddings.device)
            embeddings = all_gather_with_grad(local_embeddings)
            labels = all_gather_no_grad(local_labels.to(local_embeddings.device))
            if features is not None:
                features = all_gather_with_grad(features)
            if second_view is not None:
                second_view = all_gather_with_grad(second_view)
        else:
            embeddings, labels = local_embeddings, local_labels

        if self.training and step is None:
            step = self.step
            self.step += 1
        if self.world_size == 1 and not self._sampling_active():
            # Exactly the plain head: the default (full) weight, no reducer traffic.
            return self.head(embeddings, labels, features=features, second_view=second_view)

        weight, class_ids = self._select_centres(labels.long(), step or 0)
        rows = map_to_rows(labels.long(), class_ids)
        output = self.head(
            embeddings,
            labels,
            weight=weight,
            local_labels=rows,
            class_ids=class_ids,
            reducer=self.reducer,
            features=features,
            second_view=second_view,
        )
        if self.world_size == 1:
            return output
        total = embeddings.shape[0]
        mine = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
        extras = {
            key: value[mine] if value.dim() > 0 and value.shape[0] == total else value
            for key, value in output.extras.items()
        }
        return HeadOutput(
            loss=output.loss,
            logits=output.logits,
            quality=output.quality[mine],
            metrics=output.metrics,
            extras=extras,
        )

    def _sampling_active(self) -> bool:
        return self.training and self.num_sampled < self.num_local

    def _select_centres(self, labels: torch.Tensor, step: int):
        """(C_sub, D) centres this step uses (grad scaled by 1/W) and their global ids (C_sub,)."""
        full = self.head.weight
        if self._sampling_active():
            index = self.sample_rows(labels, step)
            weight = full[index]
            class_ids = index + self.start
        else:
            weight = full
            class_ids = torch.arange(self.start, self.stop, device=full.device)
        if self.world_size > 1:
            weight = _ScaleGradient.apply(weight, 1.0 / self.world_size)
        return weight, class_ids

    @torch.no_grad()
    def sample_rows(self, labels: torch.Tensor, step: int) -> torch.Tensor:
        """Sorted local rows (K,) kept at ``step``: every positive class in ``labels`` (global
        ids of the whole batch) that this shard owns, plus uniform random negatives, with
        K = max(int(sample_rate * C_local), #positives)."""
        device = self.head.weight.device
        labels = labels.to(device)
        owned = (labels >= self.start) & (labels < self.stop)
        positives = torch.unique(labels[owned] - self.start)
        keep = max(self.num_sampled, positives.numel())
        generator = torch.Generator(device=device)
        generator.manual_seed(_sampling_seed(self.seed, step, self.rank))
        # Random scores in [0, 1); positives get 2 so top-k always keeps them.
        scores = torch.rand(self.num_local, generator=generator, device=device)
        scores[positives] = 2.0
        return torch.topk(scores, keep, sorted=False).indices.sort().values

    def sharded_parameters(self) -> list[nn.Parameter]:
        """The parameters that hold a different slice on each rank (the class centres); pass
        them to ``qualiface.train.distributed.clip_grad_norm_`` as ``sharded``."""
        if self.world_size == 1:
            return []
        named = dict(self.head.named_parameters())
        return [named[key] for key in self.per_class_keys if key in named]

    # -- distributed plumbing ------------------------------------------------------------
    def _check_group(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ShardingError(
                f"ShardedHead(world_size={self.world_size}) needs a running process group; "
                "call qualiface.train.distributed.init_distributed() first"
            )
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise ShardingError(
                f"ShardedHead was built for rank {self.rank} of {self.world_size} but the process "
                f"group says rank {dist.get_rank()} of {dist.get_world_size()}"
            )

    def _check_equal_batches(self, batch_size: int, device: torch.device) -> None:
        sizes = all_gather_no_grad(torch.tensor([batch_size], device=device))
        if bool((sizes != batch_size).any()):
            raise ShardingError(
                f"every rank must pass the same local batch size, got {sizes.tolist()} "
                "(use drop_last=True in the data loader)"
            )

    def _average_over_ranks(self, grad: torch.Tensor) -> torch.Tensor:
        averaged = grad.clone()
        guarded_collective("all_reduce(head gradient)", lambda: dist.all_reduce(averaged))
        return averaged / self.world_size

    # -- checkpoints ---------------------------------------------------------------------
    def full_state_dict(self, rank0_only: bool = False) -> dict[str, torch.Tensor]:
        """The unsharded head's state dict, on CPU; a collective (every rank must call it).

        Per-class entries (``weight``: (C, D)) are assembled from all shards in class order;
        replicated entries (buffers such as EMA statistics) are taken from this rank, where they
        are identical on all ranks. The result loads into a plain ``build_head(name, D, C)`` head.
        With ``rank0_only`` the shards are gathered to rank 0 only (no C x D copy on the other
        ranks) and the other ranks get an empty dict.
        """
        local = self.head.state_dict()
        if self.world_size == 1:
            return {key: value.detach().cpu().clone() for key, value in local.items()}
        self._check_group()
        full: dict[str, torch.Tensor] = {}
        for key, value in local.items():
            if key in self.per_class_keys:
                assembled = self._gather_rows(value.detach(), rank0_only)
                if assembled is not None:
                    full[key] = assembled.cpu()
            elif not rank0_only or self.rank == 0:
                full[key] = value.detach().cpu().clone()
        return full

    def _gather_rows(self, shard: torch.Tensor, rank0_only: bool) -> torch.Tensor | None:
        """Concatenate every rank's (C_r, ...) shard into (C, ...); shards may differ by a row."""
        counts = [
            shard_range(self.num_classes, r, self.world_size)[1]
            - shard_range(self.num_classes, r, self.world_size)[0]
            for r in range(self.world_size)
        ]
        longest = max(counts)
        padded = shard.new_zeros((longest, *shard.shape[1:]))
        padded[: shard.shape[0]] = shard
        if rank0_only:
            parts = [torch.empty_like(padded) for _ in counts] if self.rank == 0 else None
            guarded_collective("gather(shards)", lambda: dist.gather(padded, parts, dst=0))
            if parts is None:
                return None
        else:
            parts = [torch.empty_like(padded) for _ in counts]
            guarded_collective("all_gather(shards)", lambda: dist.all_gather(parts, padded))
        return torch.cat([part[:count] for part, count in zip(parts, counts)], dim=0)

    def load_full_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load an unsharded state dict (e.g. from ``full_state_dict`` at any world size, or a
        plain head's ``state_dict()``), keeping this rank's rows of the per-class entries."""
        own = self.head.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ShardingError(
                f"state dict does not fit head '{self.head_name}': missing {missing}, "
                f"unexpected {unexpected}"
            )
        local: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key in self.per_class_keys:
                if value.dim() < 1 or value.shape[0] != self.num_classes:
                    raise ShardingError(
                        f"state entry '{key}' has shape {tuple(value.shape)}; expected "
                        f"{self.num_classes} rows (one per class)"
                    )
                value = value[self.start : self.stop]
            if value.shape != own[key].shape:
                raise ShardingError(
                    f"state entry '{key}' has shape {tuple(value.shape)} for this shard; "
                    f"expected {tuple(own[key].shape)}"
                )
            local[key] = value
        self.head.load_state_dict(local)

    def extra_repr(self) -> str:
        return (
            f"head={self.head_name}, classes [{self.start}, {self.stop}) of {self.num_classes}, "
            f"rank {self.rank}/{self.world_size}, sample_rate={self.sample_rate}"
        )
