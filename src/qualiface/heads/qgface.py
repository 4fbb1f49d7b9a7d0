"""QGFace: quality-guided joint training - AdaFace classification for high-quality faces and a
queue-based contrastive loss between two views for low-quality ones.

Quality split. z is AdaFace's EMA-normalised norm (``adaface.NormStatistic``: EMAs updated
first in training mode, then z computed), q = (z + 1) / 2 in [0, 1]; a sample is high quality
(HQ) when q >= tau (tau = 0.5), low quality (LQ) otherwise.

Classification (L_cls). AdaFace logits (margin m = 0.4, h = 0.333) where row i is multiplied by
the gate ``g_i = sigmoid(gate_scale * (z_i + 2 (0.5 - tau)))`` = sigmoid(2 gate_scale (q_i - tau)):
``logits_i = g_i * s * adaface_cos_logits_i`` and L_cls is the mean cross-entropy over all rows.
HQ rows get g ~ 1 (plain AdaFace); LQ rows are pulled towards all-zero logits, a flat softmax
with ~no gradient, so identity learning comes from HQ faces. z uses the detached norm, so the gate
carries no gradient itself.

Contrastive (L_con), LQ rows only, needs ``second_view`` (B, D): embeddings of a degraded view of
the same images. Query u_i = x_i/||x_i||, positive key k_i = second_view_i/||.||, logits
``s_c (cos(u_i, k_i) - m_c)`` for the positive and ``s_c cos(u_i, e'_j)`` for queue entries j
whose label differs from y_i (same-label entries are not negatives; empty slots are ignored);
loss = -log softmax at the positive, averaged over LQ rows (0 without LQ rows). Gradients reach
both views. Queue entries are corrected for centre drift since they were stored:
``e' = e + (||e|| / ||W_y_old||) (W_y_now - W_y_old)``; W_y_now comes from whichever shard owns y
(zero-padded rows summed through the reducer); entries whose class is on no shard stay as stored.

Queue. A FIFO of ``queue_size`` (4096) past first-view embeddings (detached, unnormalised) with
their labels and class centre at enqueue time; the batch is enqueued after the loss is computed,
in training mode only. Buffers (saved in ``state_dict``): ``queue_embeddings``, ``queue_labels``
(-1 = empty), ``queue_proxies``, ``queue_ptr``, ``queue_filled``, ``step``.

Total: ``L = L_cls + w L_con`` (w = 1.0), with L_con added from training step
``contrastive_start_step`` on (default 0; raise it to let the queue fill / centres settle).

Quality: the raw feature norm a >= 0 (larger = better; z and q in extras).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qualiface.heads import HEADS
from qualiface.heads.adaface import NormStatistic, adaface_target
from qualiface.heads.base import ClassReducer, HeadOutput
from qualiface.heads.common import (
    ClassBatch,
    CosineHead,
    HeadInputError,
    check_positive,
    check_range,
    map_to_rows,
    reduced_cross_entropy,
    replace_target,
)


def rows_or_zero(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(C, D) weight, (N,) rows with -1 for 'not here' -> (N, D), zero where absent."""
    present = rows >= 0
    picked = weight[rows.clamp(min=0)]
    return torch.where(present[:, None], picked, torch.zeros_like(picked))


def current_proxies(
    labels: torch.Tensor, weight: torch.Tensor, class_ids: torch.Tensor, reducer: ClassReducer
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres of global ``labels`` (N,) gathered across shards: ((N, D), (N,) bool present)."""
    rows = map_to_rows(labels, class_ids)
    proxies = reducer.sum(rows_or_zero(weight.detach(), rows))
    present = reducer.sum((rows >= 0).to(weight.dtype)) > 0
    return proxies, present


def correct_queue(
    embeddings: torch.Tensor, old_proxies: torch.Tensor, new_proxies: torch.Tensor,
    present: torch.Tensor,
) -> torch.Tensor:
    """e' = e + (||e|| / ||W_old||) (W_now - W_old) where ``present``; e unchanged elsewhere.

    embeddings, old_proxies, new_proxies: (Q, D); present: (Q,) bool.
    """
    ratio = torch.linalg.vector_norm(embeddings, dim=1) / torch.linalg.vector_norm(
        old_proxies, dim=1
    ).clamp_min(1e-12)
    corrected = embeddings + ratio[:, None] * (new_proxies - old_proxies)
    return torch.where(present[:, None], corrected, embeddings)


@HEADS.register("qgface")
class QGFace(CosineHead):
    """QGFace; quality = raw feature norm a >= 0, larger = better (z, q in extras)."""

    requires_second_view = True

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin: float = 0.4,
        h: float = 0.333,
        momentum: float = 0.01,
        eps: float = 1e-3,
        scale: float = 64.0,
        tau: float = 0.5,
        gate_scale: float = 64.0,
        queue_size: int = 4096,
        contrastive_weight: float = 1.0,
        contrastive_margin: float = 0.0,
        contrastive_scale: float = 64.0,
        contrastive_start_step: int = 0,
    ) -> None:
        super().__init__(embedding_size, num_classes, scale)
        check_range("margin", margin, 0.0, math.pi)
        check_range("eps", eps, 0.0, 0.5)
        check_range("tau", tau, 0.0, 1.0, closed_high=True)
        check_positive("gate_scale", gate_scale)
        if not (isinstance(queue_size, int) and queue_size > 0):
            raise ValueError(f"queue_size must be a positive int, got {queue_size!r}")
        check_range("contrastive_weight", contrastive_weight, 0.0, math.inf)
        check_range("contrastive_margin", contrastive_margin, -1.0, 1.0)
        check_positive("contrastive_scale", contrastive_scale)
        if not (isinstance(contrastive_start_step, int) and contrastive_start_step >= 0):
            raise ValueError(
                f"contrastive_start_step must be an int >= 0, got {contrastive_start_step!r}"
            )
        self.margin = float(margin)
        self.eps = float(eps)
        self.tau = float(tau)
        self.gate_scale = float(gate_scale)
        self.queue_size = queue_size
        self.contrastive_weight = float(contrastive_weight)
        self.contrastive_margin = float(contrastive_margin)
        self.contrastive_scale = float(contrastive_scale)
        self.contrastive_start_step = contrastive_start_step
        self.norm_statistic = NormStatistic(h=h, momentum=momentum)
        self.register_buffer("queue_embeddings", torch.zeros(queue_size, embedding_size))
        self.register_buffer("queue_labels", torch.full((queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_proxies", torch.zeros(queue_size, embedding_size))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    # -- queue -----------------------------------------------------------------------------
    def corrected_queue(self, batch: ClassBatch) -> torch.Tensor:
        """(Q, D) queue embeddings corrected for the drift of their class centres."""
        new_proxies, present = current_proxies(
            self.queue_labels.clamp(min=0), batch.weight, batch.class_ids, batch.reducer
        )
        present = present & (self.queue_labels >= 0)
        return correct_queue(
            self.queue_embeddings, self.queue_proxies, new_proxies.to(self.queue_proxies.dtype),
            present,
        )

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor):
        """FIFO-insert (N, D) embeddings, (N,) labels, (N, D) centres; keeps the newest Q."""
        count = min(embeddings.shape[0], self.queue_size)
        if count == 0:
            return
        embeddings, labels, proxies = embeddings[-count:], labels[-count:], proxies[-count:]
        slots = (self.queue_ptr + torch.arange(count, device=labels.device)) % self.queue_size
        self.queue_embeddings[slots] = embeddings.to(self.queue_embeddings.dtype)
        self.queue_labels[slots] = labels.long()
        self.queue_proxies[slots] = proxies.to(self.queue_proxies.dtype)
        self.queue_ptr.copy_((self.queue_ptr + count) % self.queue_size)
        self.queue_filled.copy_((self.queue_filled + count).clamp(max=self.queue_size))

    # -- losses ----------------------------------------------------------------------------
    def contrastive_loss(self, batch: ClassBatch, second_view: torch.Tensor,
                         low_quality: torch.Tensor) -> torch.Tensor:
        """Mean over LQ rows of -log softmax(positive) against corrected, other-label entries.

        Every row is computed and the HQ rows are masked out of the mean (0 without LQ rows),
        rather than selecting the LQ rows with a boolean index: the selection has a
        data-dependent size, which would make every forward wait for the GPU. The extra rows
        cost one (B, Q) product instead of (B_LQ, Q).
        """
        work_dtype = batch.cos.dtype
        query = batch.unit.to(work_dtype)
        key = F.normalize(second_view.to(work_dtype), dim=1)
        positive = self.contrastive_scale * (
            (query * key).sum(dim=1) - self.contrastive_margin
        )
        queue = F.normalize(self.corrected_queue(batch).to(work_dtype), dim=1)
        negatives = self.contrastive_scale * (query @ queue.T).to(work_dtype)
        usable = (self.queue_labels[None, :] >= 0) & (
            self.queue_labels[None, :] != batch.labels[:, None]
        )
        negatives = negatives.masked_fill(~usable, -math.inf)
        all_logits = torch.cat([positive[:, None], negatives], dim=1)
        # The positive is always in the row, so every row's value is finite.
        per_row = torch.logsumexp(all_logits, dim=1) - positive
        per_row = torch.where(low_quality, per_row, torch.zeros_like(per_row))
        count = low_quality.sum().clamp(min=1).to(work_dtype)
        return per_row.sum() / count

    def compute(self, batch: ClassBatch, *, features=None, second_view=None) -> HeadOutput:
        if second_view is not None and second_view.shape != batch.unit.shape:
            raise HeadInputError(
                f"second_view must be {tuple(batch.unit.shape)}, got {tuple(second_view.shape)}"
            )
        if self.training and second_view is None:
            raise HeadInputError(
                "QGFace training needs second_view (embeddings of a degraded view)"
            )
        z = self.norm_statistic(batch.norm)
        q = (z + 1.0) / 2.0
        low_quality = q < self.tau
        gate = torch.sigmoid(self.gate_scale * (z + 2.0 * (0.5 - self.tau)))

        target = adaface_target(batch.target_cos, z, self.margin, self.eps)
        row_scale = self.scale * gate
        logits = replace_target(batch.cos, batch.target_mask, target) * row_scale[:, None]
        classification = reduced_cross_entropy(logits, target * row_scale, batch.reducer).mean()

        # With the default start step 0 the (device) step counter need not be read at all.
        active = second_view is not None and (
            self.contrastive_start_step == 0 or int(self.step) >= self.contrastive_start_step
        )
        contrastive = (
            self.contrastive_loss(batch, second_view, low_quality)
            if active
            else batch.norm.new_zeros(())
        )
        loss = classification + self.contrastive_weight * contrastive

        if self.training:
            proxies, _ = current_proxies(batch.labels, batch.weight, batch.class_ids,
                                         batch.reducer)
            self.enqueue((batch.unit * batch.norm[:, None]).detach(), batch.labels, proxies)
            self.step.add_(1)

        metrics = self.base_metrics(batch)
        metrics.update(
            loss=loss.detach(),
            classification_loss=classification.detach(),
            contrastive_loss=contrastive.detach(),
            contrastive_active=float(active),
            fraction_low_quality=low_quality.float().mean(),
            mean_z=z.mean(),
            queue_filled=self.queue_filled.detach().float(),  # a copy: the buffer changes in place
        )
        return HeadOutput(
            loss=loss,
            logits=logits,
            quality=batch.norm.detach(),
            metrics=metrics,
            extras={"norm": batch.norm.detach(), "z": z, "q": q, "gate": gate},
        )
