"""Machinery shared by every head: class subsets, cosines, reducer-safe cross-entropy, margins.

Every head is a cosine classifier: it normalises the embeddings and the class centres, takes the
cosine matrix, edits the target column (a margin) and sometimes the negatives, multiplies by a
scale and applies a cross-entropy. This module holds those pieces once:

* ``CosineHead`` - the ``nn.Module`` base: owns the centre matrix, validates the ``forward``
  arguments (subset of centres, local labels, class ids) and builds a ``ClassBatch``.
* ``ClassBatch`` - the per-call view of the classification problem (cosines, norms, target
  column mask, target cosine gathered through the reducer).
* ``reduced_logsumexp`` / ``reduced_cross_entropy`` - the log-sum-exp over the class axis
  assembled through a ``ClassReducer`` so that a sharded classifier gets the unsharded value.
* ``arc_margin`` - ``cos(theta + m)`` with the standard fallback past ``theta + m > pi``.
* ``map_to_rows`` - global class ids -> row index in a (possibly unsorted) subset of classes.

Nothing here reads a tensor back to the host during a forward: metrics are detached 0-d tensors
(``HeadOutput``), margins given as Python floats stay Python floats (a scalar tensor built on the
host would be a blocking copy to the GPU), and the label-range checks avoid the host on
accelerators after the first call (``CosineHead.check_index_range``). A training step then
queues its GPU work without waiting for it.

Margin maths runs in float32 (or float64 if the head is float64) even under bfloat16 autocast:
the cosines are cast up right after the matrix product because ``1 - 1e-6`` does not exist in
bfloat16 and the margin formulas need it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qualiface.heads.base import LOCAL, ClassReducer, HeadOutput
from qualiface.heads.quality import NormQuality

# Cosines are kept this far away from +-1 before acos / sqrt(1 - c^2): both have unbounded
# derivatives at the ends.
COS_EPS = 1e-6


class HeadInputError(ValueError):
    """A head was called with inconsistent tensors (shapes, label ranges, missing inputs)."""


@dataclass
class ClassBatch:
    """One forward call's view of the classification problem (C = classes in this subset).

    cos:          (B, C) cosine between normalised embeddings and normalised centres, float32+.
    norm:         (B,) embedding norm ``a`` (differentiable).
    unit:         (B, D) normalised embeddings (differentiable).
    labels:       (B,) global class ids.
    local_labels: (B,) row of each sample's class in this subset, -1 if not here.
    class_ids:    (C,) global id of each row of the subset.
    target_mask:  (B, C) True at (i, local_labels[i]).
    target_cos:   (B,) cos t_y, assembled across shards through the reducer.
    weight:       (C, D) the (unnormalised) centres used.
    reducer:      the class-axis reducer.
    extras:       per-sample detached tensors a head computes on the way (e.g. AdaFace z);
                  copied into ``HeadOutput.extras``.
    """

    cos: torch.Tensor
    norm: torch.Tensor
    unit: torch.Tensor
    labels: torch.Tensor
    local_labels: torch.Tensor
    class_ids: torch.Tensor
    target_mask: torch.Tensor
    target_cos: torch.Tensor
    weight: torch.Tensor
    reducer: ClassReducer
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def map_to_rows(global_ids: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    """Row index of each global id inside ``class_ids`` (any order), -1 where absent.

    global_ids: (N,) int64; class_ids: (C,) int64 distinct. Returns (N,) int64. Uses a sort +
    binary search, so memory is O(N + C) even for very many classes.
    """
    if class_ids.numel() == 0:
        return torch.full_like(global_ids, -1)
    sorted_ids, order = torch.sort(class_ids)
    position = torch.searchsorted(sorted_ids, global_ids).clamp(max=sorted_ids.numel() - 1)
    found = sorted_ids[position] == global_ids
    return torch.where(found, order[position], torch.full_like(global_ids, -1))


def gather_target(values: torch.Tensor, target_mask: torch.Tensor, reducer: ClassReducer):
    """(B, C) values -> (B,) value at each row's target column, summed over shards.

    Rows whose class lives on another shard contribute 0 here and the real value there.
    """
    local = torch.where(target_mask, values, torch.zeros_like(values)).sum(dim=1)
    return reducer.sum(local)


def reduced_logsumexp(logits: torch.Tensor, reducer: ClassReducer) -> torch.Tensor:
    """log sum_j exp(logits[i, j]) over *all* shards' classes; (B, C) -> (B,).

    The stabilising maximum is detached (its gradient cancels exactly), then only sums cross
    shards, so a reducer with autograd gives the unsharded value and gradient.
    """
    if logits.shape[1] == 0:
        local_max = logits.new_full(logits.shape[:1], -torch.inf)
    else:
        local_max = logits.detach().amax(dim=1)
    row_max = reducer.max(local_max)
    sum_exp = reducer.sum(torch.exp(logits - row_max[:, None]).sum(dim=1))
    return row_max + torch.log(sum_exp)


def reduced_cross_entropy(
    logits: torch.Tensor, target_logit: torch.Tensor, reducer: ClassReducer
) -> torch.Tensor:
    """Per-sample cross-entropy (B,): logsumexp over all classes minus the target logit.

    ``target_logit`` must be the value that sits in the target column of ``logits`` (on the
    shard that owns it); it is passed separately because other shards do not hold it.
    """
    return reduced_logsumexp(logits, reducer) - target_logit


def arc_margin(cos: torch.Tensor, margin: float | torch.Tensor,
               easy_margin: bool = False) -> torch.Tensor:
    """cos(theta + m) for cos = cos(theta), elementwise; m a float or a tensor like ``cos``.

    Past ``theta + m > pi`` (cos theta < cos(pi - m)) cos(theta + m) would start increasing again
    and reward pushing the sample further away, so the standard ArcFace fallback
    ``cos theta - sin(pi - m) * m`` (monotone, continuous at the switch) is used instead.
    ``easy_margin=True`` instead applies no margin at all where ``cos theta <= 0`` (the target
    is plain ``cos theta`` there): the variant of the QCFace and MagFace authors' code, which
    spares samples that are still far from their centre early in training.
    ``cos`` is clamped to [-1 + eps, 1 - eps] so sqrt(1 - c^2) has a finite derivative.
    """
    cos = cos.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS)
    sin = torch.sqrt(1.0 - cos * cos)
    if isinstance(margin, torch.Tensor):
        margin_t = margin.to(cos.dtype)
        cos_m, sin_m = torch.cos(margin_t), torch.sin(margin_t)
        threshold = torch.cos(math.pi - margin_t)
        fallback_shift = torch.sin(math.pi - margin_t) * margin_t
    else:
        # Python scalars: torch.as_tensor(margin, device=cuda) would be a blocking host->GPU
        # copy on every forward.
        margin = float(margin)
        cos_m, sin_m = math.cos(margin), math.sin(margin)
        threshold = math.cos(math.pi - margin)
        fallback_shift = math.sin(math.pi - margin) * margin
    shifted = cos * cos_m - sin * sin_m
    if easy_margin:
        return torch.where(cos > 0, shifted, cos)
    fallback = cos - fallback_shift
    return torch.where(cos > threshold, shifted, fallback)


def replace_target(cos_logits: torch.Tensor, target_mask: torch.Tensor, target: torch.Tensor):
    """(B, C) with column local_labels[i] of row i set to target[i] (rows not here unchanged)."""
    return torch.where(target_mask, target[:, None].to(cos_logits.dtype), cos_logits)


def hard_negative_mask(batch: ClassBatch, target: torch.Tensor) -> torch.Tensor:
    """(B, C) True for non-target classes whose cosine exceeds the row's margined target (B,)."""
    return (batch.cos > target.detach()[:, None]) & ~batch.target_mask


def hard_negative_metrics(batch: ClassBatch, hard: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean number of hard negatives per sample (0-d tensor), counted over all shards."""
    count = batch.reducer.sum(hard.float().sum(dim=1))
    return {"hard_negatives_per_sample": count.mean().detach()}


def check_positive(name: str, value: float) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a finite number > 0."""
    if isinstance(value, bool) or not (
        isinstance(value, (int, float)) and math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def check_range(name: str, value: float, low: float, high: float, *, closed_high=False) -> None:
    """Raise ValueError naming ``name`` unless low <= value < high (<= high if closed_high)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = ok and math.isfinite(value) and low <= value
    ok = ok and (value <= high if closed_high else value < high)
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")


class CosineHead(nn.Module):
    """Base of every head: a (num_classes, embedding_size) centre matrix and a scaled cosine CE.

    Subclasses implement ``compute(batch, features=..., second_view=...) -> HeadOutput``; the
    base handles argument checking and the subset / shard plumbing.
    """

    requires_features = False
    requires_second_view = False
    #: Whether a forward on an accelerator has already had its label ranges checked on the
    #: host (see ``check_index_range``); per instance once set.
    _host_checked_on_device = False

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0) -> None:
        super().__init__()
        if not (isinstance(embedding_size, int) and embedding_size > 0):
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        if not (isinstance(num_classes, int) and num_classes > 0):
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        check_positive("scale", scale)
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    # -- public --------------------------------------------------------------------------
    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        *,
        weight: torch.Tensor | None = None,
        local_labels: torch.Tensor | None = None,
        class_ids: torch.Tensor | None = None,
        reducer: ClassReducer = LOCAL,
        features: torch.Tensor | None = None,
        second_view: torch.Tensor | None = None,
    ) -> HeadOutput:
        """Loss, logits and quality for a batch; the argument contract is in ``qualiface.heads``."""
        batch = self.prepare_batch(embeddings, labels, weight, local_labels, class_ids, reducer)
        if self.requires_features and features is None:
            raise HeadInputError(f"{type(self).__name__} needs the backbone features (features=)")
        if features is not None and features.shape[0] != embeddings.shape[0]:
            raise HeadInputError(
                f"features has {features.shape[0]} rows but embeddings has {embeddings.shape[0]}"
            )
        return self.compute(batch, features=features, second_view=second_view)

    def compute(self, batch: ClassBatch, *, features=None, second_view=None) -> HeadOutput:
        raise NotImplementedError

    def quality_estimator(self) -> nn.Module:
        """Inference-time quality module (no labels, no centres); raw norm by default."""
        return NormQuality()

    # -- shared plumbing -----------------------------------------------------------------
    def prepare_batch(self, embeddings, labels, weight, local_labels, class_ids, reducer):
        """Validate the forward arguments and compute cosines / norms / target cosine."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise HeadInputError(
                f"embeddings must be (B, {self.embedding_size}), got {tuple(embeddings.shape)}"
            )
        batch_size = embeddings.shape[0]
        if labels.dim() != 1 or labels.shape[0] != batch_size:
            raise HeadInputError(f"labels must be ({batch_size},), got {tuple(labels.shape)}")
        if labels.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise HeadInputError(f"labels must be integer class ids, got {labels.dtype}")
        labels = labels.long()
        on_host = labels.device.type == "cpu" or not self._host_checked_on_device
        self.check_index_range(labels, 0, self.num_classes, "labels", on_host=on_host)
        if weight is None:
            weight = self.weight
            if class_ids is None:
                class_ids = torch.arange(self.num_classes, device=weight.device)
            if local_labels is None:
                local_labels = labels
        else:
            if weight.dim() != 2 or weight.shape[1] != self.embedding_size:
                raise HeadInputError(
                    f"weight must be (C_sub, {self.embedding_size}), got {tuple(weight.shape)}"
                )
            if class_ids is None:
                if weight.shape[0] != self.num_classes:
                    raise HeadInputError(
                        "a subset weight needs class_ids (the global id of each of its rows)"
                    )
                class_ids = torch.arange(self.num_classes, device=weight.device)
        class_ids = class_ids.long()
        if class_ids.shape != (weight.shape[0],):
            raise HeadInputError(
                f"class_ids must be ({weight.shape[0]},), got {tuple(class_ids.shape)}"
            )
        if local_labels is None:
            local_labels = map_to_rows(labels, class_ids)
        local_labels = local_labels.long()
        if local_labels.shape != (batch_size,):
            raise HeadInputError(
                f"local_labels must be ({batch_size},), got {tuple(local_labels.shape)}"
            )
        self.check_index_range(local_labels, -1, weight.shape[0],
                               f"local_labels (rows of a {weight.shape[0]}-row weight)",
                               on_host=on_host)
        if on_host and labels.device.type != "cpu":
            self._host_checked_on_device = True

        unit = F.normalize(embeddings, dim=1)
        cos = F.linear(unit, F.normalize(weight, dim=1))
        # Margin maths in at least float32 (see module docstring).
        work_dtype = torch.promote_types(embeddings.dtype, torch.float32)
        cos = cos.to(work_dtype).clamp(-1.0, 1.0)
        norm = torch.linalg.vector_norm(embeddings.to(work_dtype), dim=1)
        rows = torch.arange(weight.shape[0], device=cos.device)
        target_mask = rows[None, :] == local_labels[:, None]
        target_cos = gather_target(cos, target_mask, reducer)
        return ClassBatch(
            cos=cos,
            norm=norm,
            unit=unit,
            labels=labels,
            local_labels=local_labels,
            class_ids=class_ids,
            target_mask=target_mask,
            target_cos=target_cos,
            weight=weight,
            reducer=reducer,
        )

    @staticmethod
    def check_index_range(values: torch.Tensor, low: int, high: int, what: str, *,
                          on_host: bool) -> None:
        """Ensure every entry of ``values`` (N,) int lies in [low, high).

        ``on_host``: read min/max and raise ``HeadInputError`` naming ``what`` and the range
        found. That read waits for the device to finish all queued work, which on a GPU would
        stall every training step; so heads do it on CPU tensors and on the first forward of an
        accelerator tensor (where a wrong ``num_classes`` or label mapping shows up at once),
        and afterwards use ``torch._assert_async``: a device-side check that costs no sync and,
        when violated, aborts the process at the next CUDA call with a device assertion
        (not a clean message, but never silent training against a missing target column).
        """
        if values.numel() == 0:
            return
        if on_host:
            smallest, largest = int(values.min()), int(values.max())
            if smallest < low or largest >= high:
                raise HeadInputError(
                    f"{what} must be in [{low}, {high}), got range [{smallest}, {largest}]"
                )
        else:
            torch._assert_async(((values >= low) & (values < high)).all())

    def base_metrics(self, batch: ClassBatch) -> dict[str, torch.Tensor]:
        """Mean norm, mean target cosine and top-1 accuracy of the plain cosines (reducer-safe);
        detached 0-d tensors (no host sync here; call ``float()`` when logging)."""
        with torch.no_grad():
            cos = batch.cos.detach()
            local_max = (
                cos.amax(dim=1) if cos.shape[1] else cos.new_full(cos.shape[:1], -torch.inf)
            )
            best = batch.reducer.max(local_max)
            correct = (batch.target_cos.detach() >= best).float()
            return {
                "mean_norm": batch.norm.detach().mean(),
                "mean_target_cos": batch.target_cos.detach().mean(),
                "accuracy": correct.mean(),
            }


class MarginHead(CosineHead):
    """A cosine head whose loss is the scaled cross-entropy of edited cosines.

    Subclasses implement ``margin_target(batch) -> (B,)`` (the target's cosine after the margin)
    and may override ``adjust_negatives`` (hard-negative re-weighting), ``row_scale`` (per-sample
    scale) and ``regularise`` (extra loss terms, quality score).
    """

    def margin_target(self, batch: ClassBatch) -> torch.Tensor:
        raise NotImplementedError

    def adjust_negatives(
        self, batch: ClassBatch, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, C) cosine-space logits before the target column is replaced, and metrics.

        Default: the plain cosines. ``target`` is the margined target cosine (B,).
        """
        return batch.cos, {}

    def row_scale(self, batch: ClassBatch, features) -> torch.Tensor | float:
        """Scale multiplying row i's cosine logits: a float or a (B,) tensor."""
        return self.scale

    def regularise(self, batch: ClassBatch, output: HeadOutput, *, features, second_view) -> None:
        """Hook: add regulariser terms to ``output.loss`` / metrics; set quality. Default: none."""

    def compute(self, batch: ClassBatch, *, features=None, second_view=None) -> HeadOutput:
        target = self.margin_target(batch)
        negatives, negative_metrics = self.adjust_negatives(batch, target)
        cos_logits = replace_target(negatives, batch.target_mask, target)
        scale = self.row_scale(batch, features)
        logits = cos_logits * (scale[:, None] if isinstance(scale, torch.Tensor) else scale)
        target_logit = target * scale
        per_sample = reduced_cross_entropy(logits, target_logit, batch.reducer)
        loss = per_sample.mean()
        metrics = self.base_metrics(batch)
        metrics.update(negative_metrics)
        metrics["identity_loss"] = loss.detach()
        output = HeadOutput(
            loss=loss,
            logits=logits,
            quality=batch.norm.detach(),
            metrics=metrics,
            extras={"norm": batch.norm.detach(), **batch.extras},
        )
        self.regularise(batch, output, features=features, second_view=second_view)
        output.metrics["loss"] = output.loss.detach()
        return output
