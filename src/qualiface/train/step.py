"""The pieces of one optimizer step, in the order ``Trainer.train_step`` calls them.

``forward`` runs one micro-batch through backbone and head; ``StepSums`` keeps the step's
running sums (loss, finite flag, embedding norm, accuracy, the heads' metrics) as device
tensors; ``unscale_and_clip`` unscales fp16 gradients and clips (or only measures) their norm;
``skip_step`` undoes a step whose loss or gradient was NaN/Inf without touching the weights
(``snapshot_buffers`` / ``restore_buffers``: nor the running statistics its forward moved);
``metrics_to_host`` reads a step's metrics back in one transfer when the loop logs them.

Host syncs. A GPU step must not wait for the GPU: everything a step measures stays a device
tensor, summed over the micro-batches, and is read back only when a record is logged. The
single read per optimizer step is the skip decision (``distributed.all_ranks_true`` on the
finite flags), which the host must see before it may call ``optimizer.step()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qualiface.data.transforms import to_model_input
from qualiface.train.distributed import clip_grad_norm_
from qualiface.train.precision import autocast


@dataclass(frozen=True)
class SkippedStep:
    """A step skipped without touching the weights: ``what`` was NaN/Inf (loss or gradient)."""

    what: str


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _add(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """Running device-side sum that starts from the first value (no host scalar involved)."""
    return value if total is None else total + value


def forward(model: nn.Module, head: nn.Module, method, images: torch.Tensor, labels: torch.Tensor, *,
            generator: torch.Generator, device: torch.device, precision: str, channels_last: bool):
    """Forward one micro-batch: returns the head's output and the embeddings.

    The method's second view (when it gives one) goes through the backbone in the same batch
    (one pass: DDP sees one forward); the backbone runs under autocast, the head in at least fp32.
    """
    batch = images.shape[0]
    lq = method.second_view(images, generator)
    wants_view = lq is not None
    if wants_view:
        images = torch.cat([images, lq.to(images.device)])
    x = to_model_input(images)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, precision):
        if method.needs_features:
            embeddings, features = model(x, return_features=True)
        else:
            embeddings, features = model(x), None
    # Heads run in at least fp32: margins use acos/sqrt near +-1 where bf16 rounding hurts
    # (a float64 model stays float64, which the exactness tests rely on).
    embeddings = embeddings.to(_at_least_fp32(embeddings.dtype))
    second = None
    if wants_view:
        embeddings, second = embeddings[:batch], embeddings[batch:]
        features = features[:batch] if features is not None else None
    kwargs = {}
    if features is not None:
        kwargs["features"] = features.to(_at_least_fp32(features.dtype))
    if second is not None:
        kwargs["second_view"] = second
    return head(embeddings, labels, **kwargs), embeddings


@dataclass
class StepSums:
    """Device-side sums over one step's ``accum`` micro-batches (no host read)."""

    accum: int
    num_classes: int
    loss: torch.Tensor | None = None  # mean loss over the micro-batches
    finite: torch.Tensor | None = None  # every micro-batch loss finite (bool tensor)
    norm: torch.Tensor | None = None  # summed embedding norms
    correct: torch.Tensor | None = None
    seen: int = 0
    head_metrics: dict = field(default_factory=dict)

    def add(self, out, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one micro-batch's head output (after its backward)."""
        loss = out.loss.detach()
        finite = torch.isfinite(loss)
        self.finite = finite if self.finite is None else self.finite & finite
        self.loss = _add(self.loss, loss / self.accum)
        self.norm = _add(self.norm, embeddings.detach().norm(dim=1).sum())
        if out.logits.shape[1] == self.num_classes:  # argmax is meaningful only unsharded
            # Margin heads lower the target logit, so prefer the head's own (margin-free)
            # accuracy when it reports one.
            if "accuracy" in out.metrics:
                hits = out.metrics["accuracy"] * labels.shape[0]
            else:
                hits = (out.logits.detach().argmax(dim=1) == labels).sum()
            self.correct = _add(self.correct, hits)
        self.seen += labels.shape[0]
        for key, value in out.metrics.items():
            self.head_metrics[key] = self.head_metrics.get(key, 0.0) + value / self.accum

    def metrics(self, *, with_accuracy: bool) -> dict:
        """The head's metrics (averaged), ``loss``, ``norm`` (mean embedding norm) and, when
        asked and measurable, ``acc``; all still on the device."""
        metrics = dict(self.head_metrics)
        metrics.update(loss=self.loss, norm=self.norm / self.seen)
        if with_accuracy and self.correct is not None:
            metrics["acc"] = self.correct / self.seen
        return metrics


def gradient_norm(parameters: list[nn.Parameter]) -> torch.Tensor:
    """The 2-norm of all gradients together (0-d tensor); 0 when none has a gradient."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: fused per-device norms
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def unscale_and_clip(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer,
                     trainable: list[nn.Parameter], clip: float, sharded: list[nn.Parameter]) -> torch.Tensor:
    """Unscale the gradients (a no-op unless fp16), clip them to ``clip`` when > 0 (else only
    measure), and return their global norm. ``sharded``: the parameters holding a different
    slice per rank, so every rank clips by the norm of the whole model, not of its shard (or
    the ranks' backbone replicas drift apart)."""
    scaler.unscale_(optimizer)
    if clip > 0:
        return clip_grad_norm_(trainable, clip, sharded=sharded)
    return gradient_norm(trainable)


def snapshot_buffers(*modules: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(buffer, copy)`` for every buffer of ``modules`` (BatchNorm running statistics, the
    heads' EMAs, QGFace's queue): they change inside the forward, so a skipped step puts them
    back with ``restore_buffers``. Device-side copies, no host sync."""
    seen: set[int] = set()
    pairs = []
    for module in modules:
        for buffer in module.buffers():
            if id(buffer) not in seen:
                seen.add(id(buffer))
                pairs.append((buffer, buffer.detach().clone()))
    return pairs


@torch.no_grad()
def restore_buffers(snapshot: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put the buffers of ``snapshot_buffers`` back as they were before the step."""
    for buffer, saved in snapshot:
        buffer.copy_(saved)


def skip_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, loss_ok: bool) -> SkippedStep:
    """Drop the step's gradients, weights untouched; with fp16, back the loss scale off the
    same way on every rank (a bad loss is no overflow: the scale stays)."""
    if scaler.is_enabled():
        if loss_ok:
            # The same back-off on every rank keeps their loss scales equal (a rank's own
            # found-inf flag may differ when the head is sharded).
            new_scale = scaler.get_scale() * scaler.get_backoff_factor()
        else:
            new_scale = scaler.get_scale()
        # update() also clears the scaler's per-step "already unscaled" state.
        scaler.update(new_scale)
    optimizer.zero_grad(set_to_none=True)
    return SkippedStep("gradient" if loss_ok else "loss")


def metrics_to_host(metrics: dict) -> dict:
    """``{name: 0-d tensor | Python value}`` -> Python values, with one device read in all.

    Tensors become floats (``float(t)``'s value: float32 widens exactly to float64); the
    tensors of one device are stacked so the transfer is one sync per device, not one per key.
    """
    tensor_keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    host = {k: v for k, v in metrics.items() if k not in tensor_keys}
    by_device: dict[torch.device, list[str]] = {}
    for key in tensor_keys:
        by_device.setdefault(metrics[key].device, []).append(key)
    for device, keys in by_device.items():
        wide = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        stacked = torch.stack([metrics[k].detach().reshape(()).to(wide) for k in keys])
        host.update(zip(keys, stacked.tolist()))
    return {k: host[k] for k in metrics}  # keep the original key order
