"""QGFace (Song & Wang 2023): quality-guided joint training - AdaFace classification for
high-quality faces and a queue-based contrastive loss between two views for low-quality ones.

The defaults follow the authors' published training code (github.com/IsidoreSong/QGFace,
``framework.py`` / ``head.py``); each point where an earlier version of this head differed is a
constructor option, so the old behaviour stays reachable and measurable
(``bench/qgface_options.py``, docs/BENCHMARKS.md).

Views. ``embeddings`` x (B, D) are the first (clean) view, ``second_view`` x' (B, D) the
embeddings of a degraded view of the same images (the trainer's low-quality view).

Quality split. z is AdaFace's EMA-normalised norm (``adaface.NormStatistic``: EMAs updated
first in training mode, then z computed), q = (z + 1) / 2 in [0, 1]. The EMAs see the norms of
every classified row (both views with ``classify_both_views``). A pair i is low quality (LQ)
when ``split_by``-combined quality < tau (tau = 0.5): ``"min"`` (default, the authors'
``quality_select_method="low"``): min(q_i, q'_i); ``"mean"``, ``"max"``; ``"first"``: q_i alone
(the old behaviour; q' is then not needed). Otherwise high quality (HQ). Without a second view
(evaluation) the split uses q_i.
``initial_statistics``: ``"adaface"`` (default; mu0 = 20, sigma0 = 100, NormStatistic's own
defaults, as AdaFace) or ``"zero"`` (mu0 = sigma0 = 0, what the authors' ``SoftmaxFace`` buffers
actually start from: z saturates at +1 until the EMAs catch up, so early batches are all HQ).

Classification (L_cls). AdaFace logits (margin m = 0.4, h = 0.333) where row r is multiplied by
the gate ``g_r = sigmoid(gate_scale * (z_r + 2 (0.5 - tau)))`` = sigmoid(2 gate_scale (q_r - tau)):
``logits_r = g_r * s * adaface_cos_logits_r``; L_cls is the mean cross-entropy over the rows:
both views, 2B rows (``classify_both_views=True``, default, as the authors), or the first view
only (B rows). Each row is gated by its own z. HQ rows get g ~ 1 (plain AdaFace); LQ rows are
pulled towards all-zero logits, a flat softmax with ~no gradient. z uses the detached norm, so
the gate carries no gradient itself. ``HeadOutput.logits`` are the first view's (B, C).

Contrastive (L_con), LQ pairs only, needs ``second_view``. Query u = x/||x||, positive key
k = x'/||x'||, logits ``s_c (cos(u, k) - m_c)`` for the positive and ``s_c cos(u, e'_j)`` for queue
entries j whose label differs from y (same-label entries are not negatives; empty slots are
ignored); per row -log softmax at the positive. ``symmetric=True`` (default, the authors'
``pair_coupling="D2N"``) adds the rows with the views swapped (query x', key x) against the same
queue; L_con is the mean over all LQ rows (0 without LQ rows). Gradients reach both views. Queue
entries are corrected for centre drift since they were stored:
``e' = e + (||e|| / ||W_y_old||) (W_y_now - W_y_old)``; W_y_now comes from whichever shard owns y
(zero-padded rows summed through the reducer); entries whose class is on no shard stay as stored.

Queue. A FIFO of ``queue_size`` (4096) past embeddings (detached, unnormalised) of every
classified view (2B rows per step with ``classify_both_views``, else the first view's B) with
their labels and class centre at enqueue time, in training mode only. ``enqueue_first=True``
(default, as the authors) stores the batch before L_con, so the other-label samples of the
current batch are negatives too (its same-label entries, the positive among them, are masked);
``False`` stores it after the loss. Buffers (saved in ``state_dict``): ``queue_embeddings``,
``queue_labels`` (-1 = empty), ``queue_proxies``, ``queue_ptr``, ``queue_filled``, ``step``.

Total: ``L = L_cls + w L_con`` (w = 1.0), with L_con added from training step
``contrastive_start_step`` on (default 0; raise it to let the queue fill / centres settle).

Remaining differences from the authors' code (not options here; see docs/BENCHMARKS.md):
same-label queue entries get logit 0 there (kept in the denominator), here they are dropped;
there L_con is averaged over all 2B rows (HQ rows add the constant log(K+1)) and rescaled by
log(129) / log(K+1), here it is averaged over LQ rows; there norms are clipped to [1e-3, 100]
before the statistics; their optional dynamic contrastive margin is not offered.

Quality: the raw feature norm a >= 0 of the first view (larger = better; z, q in extras).
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


SPLITS = {
    "first": lambda q, q_second: q,
    "min": torch.minimum,
    "mean": lambda q, q_second: (q + q_second) / 2.0,
    "max": torch.maximum,
}
#: NormStatistic keyword overrides; "adaface" keeps its defaults (AdaFace's mu0 = 20, sigma0 = 100).
INITIAL_STATISTICS = {"adaface": {}, "zero": {"initial_mean": 0.0, "initial_std": 0.0}}


def stack_views(first: ClassBatch, second: ClassBatch) -> ClassBatch:
    """The two views' batches (same labels, centres, reducer) as one batch of 2B rows."""
    return ClassBatch(
        cos=torch.cat([first.cos, second.cos]),
        norm=torch.cat([first.norm, second.norm]),
        unit=torch.cat([first.unit, second.unit]),
        labels=torch.cat([first.labels, second.labels]),
        local_labels=torch.cat([first.local_labels, second.local_labels]),
        class_ids=first.class_ids,
        target_mask=torch.cat([first.target_mask, second.target_mask]),
        target_cos=torch.cat([first.target_cos, second.target_cos]),
        weight=first.weight,
        reducer=first.reducer,
    )


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
        enqueue_first: bool = True,
        classify_both_views: bool = True,
        split_by: str = "min",
        symmetric: bool = True,
        initial_statistics: str = "adaface",
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
        for name, value in (("enqueue_first", enqueue_first),
                            ("classify_both_views", classify_both_views),
                            ("symmetric", symmetric)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        if split_by not in SPLITS:
            raise ValueError(f"split_by must be one of {', '.join(SPLITS)}, got {split_by!r}")
        if initial_statistics not in INITIAL_STATISTICS:
            raise ValueError(f"initial_statistics must be one of "
                             f"{', '.join(INITIAL_STATISTICS)}, got {initial_statistics!r}")
        self.margin = float(margin)
        self.eps = float(eps)
        self.tau = float(tau)
        self.gate_scale = float(gate_scale)
        self.queue_size = queue_size
        self.contrastive_weight = float(contrastive_weight)
        self.contrastive_margin = float(contrastive_margin)
        self.contrastive_scale = float(contrastive_scale)
        self.contrastive_start_step = contrastive_start_step
        self.enqueue_first = enqueue_first
        self.classify_both_views = classify_both_views
        self.split_by = split_by
        self.symmetric = symmetric
        self.initial_statistics = initial_statistics
        self.norm_statistic = NormStatistic(h=h, momentum=momentum,
                                            **INITIAL_STATISTICS[initial_statistics])
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

    def enqueue_batch(self, views: ClassBatch) -> None:
        """Store every classified row of ``views`` with its label and current centre."""
        proxies, _ = current_proxies(views.labels, views.weight, views.class_ids, views.reducer)
        self.enqueue((views.unit * views.norm[:, None]).detach(), views.labels, proxies)

    # -- losses ----------------------------------------------------------------------------
    def contrastive_loss(self, batch: ClassBatch, queries: torch.Tensor, keys: torch.Tensor,
                         labels: torch.Tensor, low_quality: torch.Tensor) -> torch.Tensor:
        """Mean over LQ rows of -log softmax(positive) against corrected, other-label entries.

        queries, keys: (R, D) unit vectors (row r's positive is keys[r]); labels, low_quality:
        (R,). Every row is computed and the HQ rows are masked out of the mean (0 without LQ
        rows), rather than selecting the LQ rows with a boolean index: the selection has a
        data-dependent size, which would make every forward wait for the GPU. The extra rows
        cost one (R, Q) product instead of (R_LQ, Q).
        """
        work_dtype = batch.cos.dtype
        queries, keys = queries.to(work_dtype), keys.to(work_dtype)
        positive = self.contrastive_scale * (
            (queries * keys).sum(dim=1) - self.contrastive_margin
        )
        queue = F.normalize(self.corrected_queue(batch).to(work_dtype), dim=1)
        negatives = self.contrastive_scale * (queries @ queue.T).to(work_dtype)
        usable = (self.queue_labels[None, :] >= 0) & (
            self.queue_labels[None, :] != labels[:, None]
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
        size = batch.labels.shape[0]
        second = None
        if second_view is not None:
            second = self.prepare_batch(second_view, batch.labels, batch.weight,
                                        batch.local_labels, batch.class_ids, batch.reducer)
        # ``views``: the classified rows (and what the queue stores): B or 2B.
        views = (stack_views(batch, second) if self.classify_both_views and second is not None
                 else batch)
        z_views = self.norm_statistic(views.norm)
        z = z_views[:size]
        q = (z + 1.0) / 2.0
        pair_quality = q
        if second is not None and self.split_by != "first":
            z_second = (z_views[size:] if views is not batch
                        else self.norm_statistic.normalise(second.norm))
            pair_quality = SPLITS[self.split_by](q, (z_second + 1.0) / 2.0)
        low_quality = pair_quality < self.tau
        gate = torch.sigmoid(self.gate_scale * (z_views + 2.0 * (0.5 - self.tau)))

        target = adaface_target(views.target_cos, z_views, self.margin, self.eps)
        row_scale = self.scale * gate
        logits = replace_target(views.cos, views.target_mask, target) * row_scale[:, None]
        classification = reduced_cross_entropy(logits, target * row_scale, views.reducer).mean()

        if self.training and self.enqueue_first:
            self.enqueue_batch(views)
        # With the default start step 0 the (device) step counter need not be read at all.
        active = second is not None and (
            self.contrastive_start_step == 0 or int(self.step) >= self.contrastive_start_step
        )
        if active:
            queries, keys = batch.unit, second.unit
            labels, rows_low = batch.labels, low_quality
            if self.symmetric:
                queries, keys = torch.cat([queries, keys]), torch.cat([keys, queries])
                labels, rows_low = labels.repeat(2), low_quality.repeat(2)
            contrastive = self.contrastive_loss(batch, queries, keys, labels, rows_low)
        else:
            contrastive = batch.norm.new_zeros(())
        loss = classification + self.contrastive_weight * contrastive

        if self.training:
            if not self.enqueue_first:
                self.enqueue_batch(views)
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
            logits=logits[:size],
            quality=batch.norm.detach(),
            metrics=metrics,
            extras={"norm": batch.norm.detach(), "z": z, "q": q, "gate": gate[:size]},
        )
