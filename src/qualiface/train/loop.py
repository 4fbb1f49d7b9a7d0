"""The training loop: one loop for every head and method, readable top to bottom.

``train(cfg)`` builds everything from a ``TrainingConfig`` and runs the method's phases
(``qualiface.methods``). Each optimizer step:

1. asks the method for per-step switches, sets the learning rate from the pure schedule;
2. for each of ``grad_accum`` micro-batches: random flip, (second view when the method gives
   one; both views go through the backbone as one batch), forward under autocast, head
   in fp32, ``loss / grad_accum`` backward (DDP's ``no_sync`` on all but the last micro-batch);
3. unscales, clips (or just measures the gradient norm), then skips the step when any
   micro-batch loss or that norm is NaN/Inf, else steps the optimizer; ``max_nonfinite_steps``
   skipped steps in a row stop the run;
4. logs, evaluates and checkpoints on their intervals; on SIGTERM/SIGINT writes a checkpoint
   and raises ``TrainingInterrupted``.

Host syncs. A GPU step must not wait for the GPU: everything a step measures (loss, embedding
norm, accuracy, the heads' metrics) stays a device tensor, summed over the micro-batches, and is
read back only when a record is logged (every ``log_every`` steps, one transfer for all values).
The single read per optimizer step is the skip decision: one device-side ``isfinite`` flag of
all micro-batch losses and the gradient norm (all-reduced across ranks), which the host must see
before it may call ``optimizer.step()``. Consequence: a micro-batch with a NaN loss no longer
cuts the step short; all micro-batches run forward and backward, then the whole step is skipped
(weights, optimizer and loss scale untouched, exactly as before).

The per-step pieces are public for benchmarks and custom loops: ``plan()``,
``prepare_phase(phase)`` and ``train_step(micro_batches)``.

Single process: the plain head. Under ``torchrun``: DDP backbone plus the sharded head of
``train.sharded``. The loop never looks at the method's name and never asks a head or a method
what it can do: it calls the ``Method`` interface (``methods.base``) and hands the method a
``MethodContext`` (``TrainerContext`` below), not itself.
"""

from __future__ import annotations

import contextlib
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qualiface.config import ConfigError, TrainingConfig, save_config, to_dict
from qualiface.data.transforms import to_model_input
from qualiface.errors import QualifaceError
from qualiface.methods import build_method
from qualiface.methods.base import Phase, inner_head
from qualiface.threads import available_cpus, data_workers
from qualiface.train import checkpoint as ckpt
from qualiface.train.data import BatchPlan, BatchSource, DataError, cached_size_bytes, decode_all, random_flip
from qualiface.train.logging import MetricsLogger, console, training_progress
from qualiface.train.optim import build_optimizer, set_lr
from qualiface.train.precision import autocast, configure_kernels, make_scaler, resolve_precision
from qualiface.train.schedule import build_schedule


class TrainingError(QualifaceError, RuntimeError):
    """Training cannot go on (diverged, bad setup); the message says why and what to do."""


@dataclass(frozen=True)
class SkippedStep:
    """A step skipped without touching the weights: ``what`` was NaN/Inf (loss or gradient)."""

    what: str


def gradient_norm(parameters: list[nn.Parameter]) -> torch.Tensor:
    """The 2-norm of all gradients together (0-d tensor); 0 when none has a gradient."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: fused per-device norms
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _add(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """Running device-side sum that starts from the first value (no host scalar involved)."""
    return value if total is None else total + value


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


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint was written so ``resume=true`` continues."""

    def __init__(self, signum: int, step: int, path: Path) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: checkpoint written at step {step} to {path}; "
                         f"continue with resume=true")
        self.signum = signum
        self.step = step


@dataclass
class TrainResult:
    """What a finished run produced."""

    out_dir: Path
    global_step: int
    final_weights: Path
    model_package: Path | None
    last_metrics: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(requested: str, dist_device: torch.device) -> torch.device:
    """``auto`` -> the process group's device (cuda:<local_rank> or cpu); else as given."""
    if requested == "auto":
        return dist_device
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={requested} but CUDA is not available")
    return device


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class Trainer:
    """Holds the run's state; ``run()`` executes every phase (resuming when asked)."""

    def __init__(self, cfg: TrainingConfig, *, out_dir: str | Path | None = None) -> None:
        from qualiface.backbones import BackboneSizeError, build_backbone
        from qualiface.data import build_dataset
        from qualiface.data.robust import require_image_size
        from qualiface.train.distributed import init_distributed

        self.cfg = cfg
        t = cfg.train
        backend = None if cfg.distributed.backend == "auto" else cfg.distributed.backend
        self.dist = init_distributed(backend=backend, timeout_s=cfg.distributed.timeout_s)
        self.device = resolve_device(t.device, self.dist.device)
        self.precision = resolve_precision(t.precision, self.device)
        self.out_dir = Path(out_dir or t.output_dir)
        self.is_main = self.dist.rank == 0
        self.checkpoint_path = self.out_dir / ckpt.CHECKPOINT_NAME

        configure_kernels(self.device, t.deterministic)
        seed_everything(t.seed)  # same model init on every rank (DDP also broadcasts rank 0's)
        try:
            self.dataset = build_dataset(cfg.data.name, **cfg.data.params)
            self.backbone = build_backbone(cfg.model.backbone, **cfg.model.params)
        except (TypeError, BackboneSizeError) as exc:  # a bad keyword or size in the params
            raise ConfigError(f"{exc}") from None
        if getattr(self.backbone, "input_size", None) is not None:
            # A wrong-size image is skipped and reported, not a torch.stack traceback later.
            side = int(self.backbone.input_size)
            self.dataset = require_image_size(self.dataset, (side, side))
        self.num_classes = int(self.dataset.num_classes)
        self.backbone.to(self.device)
        if t.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.method = build_method(cfg)
        self.sharded = self.dist.world_size > 1  # the head is a ShardedHead
        self.head = self._build_head().to(self.device)
        self.context = TrainerContext(self)

        # Augmentation randomness (flips, degraded views) has its own generator so it is
        # checkpointed explicitly; per rank, so ranks augment differently.
        self.augment_generator = torch.Generator().manual_seed(t.seed * 7919 + self.dist.rank + 1)
        self.indices = torch.arange(len(self.dataset))
        self.num_workers = data_workers(cfg.data.num_workers)  # at most one per available CPU
        self.cache = self._build_cache()
        self.scaler = make_scaler(self.device, self.precision)
        self.logger = MetricsLogger(self.out_dir, enabled=self.is_main)
        self.validator = None
        self.phase_index = 0
        self.phase_step = 0
        self.global_step = 0
        self.nonfinite_streak = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.model: nn.Module = self.backbone
        self._stop_signal: int | None = None
        self._resume_state: dict | None = None
        self.trainable: list[nn.Parameter] = []
        # The last completed step's metrics: device tensors until someone reads last_metrics.
        self._step_metrics: dict | None = None
        self._last_metrics: dict = {}

    # ------------------------------------------------------------------ construction helpers

    def _build_head(self) -> nn.Module:
        cfg = self.cfg
        embedding_size = int(self.backbone.embedding_size)
        feature_dim = int(self.backbone.feature_dim)
        if self.sharded:
            from qualiface.train.sharded import ShardedHead

            params = self.method.head_params(dict(cfg.head.params), feature_dim=feature_dim)
            return ShardedHead(
                self.method.head_name, embedding_size, self.num_classes, params,
                rank=self.dist.rank, world_size=self.dist.world_size,
                sample_rate=cfg.distributed.sample_rate, seed=cfg.train.seed,
            )
        try:
            return self.method.build_head(embedding_size, self.num_classes, feature_dim, **cfg.head.params)
        except ValueError as exc:
            raise ConfigError(f"head '{cfg.head.name}': {exc}") from None

    def _build_cache(self):
        """Decode the whole training set once when it fits (see ``DataConfig.cache``)."""
        d = self.cfg.data
        if d.cache == "never":
            return None
        size = cached_size_bytes(self.dataset)
        if d.cache == "auto" and size > d.cache_max_gb * 2**30:
            return None
        images, labels = decode_all(self.dataset, num_workers=self.num_workers if len(self.dataset) > 2048 else 0,
                                    progress=self.cfg.train.progress and self.is_main)
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            if size < 0.5 * free:  # keep half the GPU for the model
                images, labels = images.to(self.device), labels.to(self.device)
        return images, labels

    def plan(self) -> BatchPlan:
        """The batch plan over the current training subset (step size, steps per epoch)."""
        t = self.cfg.train
        return BatchPlan(self.indices, t.batch_size, t.grad_accum, self.dist.world_size, t.seed)

    @property
    def samples_per_step(self) -> int:
        """Images one optimizer step consumes across all ranks."""
        return self.plan().step_size

    @property
    def last_metrics(self) -> dict:
        """The last completed (not skipped) step's metrics as Python values.

        Reading it transfers pending device values to the host (one sync), so the loop reads it
        only when it logs.
        """
        if self._step_metrics is not None:
            self._last_metrics = metrics_to_host(self._step_metrics)
            self._step_metrics = None
        return self._last_metrics

    def set_training_subset(self, indices: torch.Tensor) -> None:
        """Train on ``indices`` (dataset positions) from the next phase on (QWDF filtering)."""
        self.indices = indices.to(torch.int64).cpu()

    # ------------------------------------------------------------------ checkpoints

    def _head_state(self) -> dict:
        return self.head.full_state_dict() if self.sharded else self.head.state_dict()

    def save_checkpoint(self) -> None:
        """Write the one resumable checkpoint (every rank calls: the head gather is collective)."""
        head_state = self._head_state()
        state = {
            "phase_index": self.phase_index,
            "phase_step": self.phase_step,
            "global_step": self.global_step,
            "nonfinite_streak": self.nonfinite_streak,
            "world_size": self.dist.world_size,
            "backbone": self.backbone.state_dict(),
            "head": head_state,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            "scaler": self.scaler.state_dict(),
            # The sharded head's centre-sampling counter, so resumed runs draw the same negatives.
            "sampling_step": int(self.head.step) if self.sharded else 0,
            "rng": ckpt.capture_rng_state({"augment": self.augment_generator}),
            "data": {"seed": self.cfg.train.seed, "indices": self.indices,
                     "epoch_and_position": list(divmod(self.phase_step, max(1, self.plan().steps_per_epoch)))},
            "config": to_dict(self.cfg),
        }
        if self.is_main:
            ckpt.save_checkpoint(self.checkpoint_path, state)
            weights = {**ckpt.prefixed("backbone", state["backbone"]), **ckpt.prefixed("head", head_state)}
            ckpt.export_safetensors(self.out_dir / "weights.safetensors", weights, {"global_step": self.global_step})
        elif self.dist.world_size > 1:
            # Ranks > 0 own their head shard's optimizer moments and their RNG streams.
            rank_state = {k: state[k] for k in ("global_step", "optimizer", "rng")}
            ckpt.save_checkpoint(self.out_dir / f"checkpoint-rank{self.dist.rank}.pt", rank_state)
        self._barrier()

    def load_checkpoint(self) -> Path:
        """Restore model, head, counters and data position; optimizer/RNG on phase entry.

        Returns the file resumed from: the latest checkpoint, or the previous one when the
        latest is corrupt or missing (``ckpt.load_for_resume``; a warning says so). A checkpoint
        of another config or architecture, or with keys missing, is refused in one line.
        """
        point = ckpt.load_for_resume(self.checkpoint_path)
        state, source = point.state, point.path
        ckpt.require_keys(state, ckpt.RESUME_KEYS, source)
        step = state["global_step"] if isinstance(state["global_step"], int) else 0
        for warning in point.warnings:
            self.logger.note(step, f"warning: {warning}")
        ckpt.check_resume_config(source, state["config"], to_dict(self.cfg))
        if self.dist.rank > 0 and state["world_size"] == self.dist.world_size:
            # Per-rank files exist only for the world size that wrote them; on another world
            # size the head re-shards and the optimizer moments are reset below.
            rank_path = self.out_dir / f"checkpoint-rank{self.dist.rank}.pt"
            if source != self.checkpoint_path:  # fell back: the ranks' files fall back too
                rank_path = ckpt.previous_path(rank_path)
            rank_state = ckpt.load_checkpoint(rank_path)
            if rank_state["global_step"] != state["global_step"]:
                raise ckpt.CheckpointError(
                    f"{self.out_dir}: rank {self.dist.rank}'s checkpoint is from step "
                    f"{rank_state['global_step']}, the main one from {state['global_step']}"
                )
            state.update({k: rank_state[k] for k in ("optimizer", "rng")})
        if state["world_size"] != self.dist.world_size:
            # The head re-shards from its full state, but per-shard optimizer moments cannot.
            state["optimizer"] = {}
            self.logger.note(state["global_step"], f"world size changed {state['world_size']} -> "
                             f"{self.dist.world_size}: optimizer moments reset")
        ckpt.load_module_state(self.backbone, state["backbone"], what="backbone", path=source)
        if self.sharded:
            self.head.load_full_state_dict(state["head"])
            self.head.step = int(state.get("sampling_step", 0))
        else:
            ckpt.load_module_state(self.head, state["head"], what="head", path=source)
        self.scaler.load_state_dict(state["scaler"])
        self.phase_index = int(state["phase_index"])
        self.phase_step = int(state["phase_step"])
        self.global_step = int(state["global_step"])
        self.nonfinite_streak = int(state["nonfinite_streak"])
        self.indices = state["data"]["indices"]
        self._resume_state = state
        return source

    # ------------------------------------------------------------------ distributed helpers

    def _barrier(self) -> None:
        if self.dist.is_distributed:
            from qualiface.train.distributed import barrier

            barrier()

    def _any_rank(self, flag: bool) -> bool:
        """True when ``flag`` is set on any rank (all ranks must then act alike)."""
        if not self.dist.is_distributed:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _wrap_model(self) -> None:
        """DDP around the backbone when distributed (rebuilt per phase: frozen sets change)."""
        self.model = self.backbone
        if self.dist.is_distributed and any(p.requires_grad for p in self.backbone.parameters()):
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.backbone, device_ids=ids)
        if self.cfg.train.compile:
            self.model = torch.compile(self.model)

    # ------------------------------------------------------------------ one step

    def _forward(self, images: torch.Tensor, labels: torch.Tensor):
        """Forward one micro-batch: returns the head's output and the embeddings."""
        wants_features = self.method.needs_features
        batch = images.shape[0]
        lq = self.method.second_view(images, self.augment_generator)
        wants_view = lq is not None
        if wants_view:
            images = torch.cat([images, lq.to(images.device)])  # one pass: DDP sees one forward
        x = to_model_input(images)
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            if wants_features:
                embeddings, features = self.model(x, return_features=True)
            else:
                embeddings, features = self.model(x), None
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
        return self.head(embeddings, labels, **kwargs), embeddings

    def train_step(self, micro_batches) -> dict | SkippedStep:
        """One optimizer step over ``micro_batches`` (list of (uint8 images (B, 3, H, W), labels
        (B,)) on the device) with the phase's optimizer (``prepare_phase`` first).

        Returns the step's metrics ``{name: 0-d tensor | float}`` (``loss``, ``norm`` = mean
        embedding norm, ``acc`` when unsharded, the head's metrics averaged over micro-batches;
        device tensors, read them with ``metrics_to_host``), or ``SkippedStep`` when a loss or
        the (unscaled) gradient was NaN/Inf on any rank and no weight was changed. Exactly one
        host sync: the skip decision.
        """
        accum = len(micro_batches)
        loss_sum = norm_sum = correct = None
        losses_finite = None
        seen = 0
        metrics: dict = {}
        self.optimizer.zero_grad(set_to_none=True)
        for k, (images, labels) in enumerate(micro_batches):
            if self.cfg.data.flip:
                images = random_flip(images, self.augment_generator)
            last = k == accum - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                out, embeddings = self._forward(images, labels)
                # A NaN/Inf loss poisons the gradients, but the step is skipped as a whole below,
                # so backward runs anyway: stopping here would need the host to read the loss.
                self.scaler.scale(out.loss / accum).backward()
            loss = out.loss.detach()
            finite = torch.isfinite(loss)
            losses_finite = finite if losses_finite is None else losses_finite & finite
            loss_sum = _add(loss_sum, loss / accum)
            norm_sum = _add(norm_sum, embeddings.detach().norm(dim=1).sum())
            if out.logits.shape[1] == self.num_classes:  # argmax is meaningful only unsharded
                # Margin heads lower the target logit, so prefer the head's own (margin-free)
                # accuracy when it reports one.
                if "accuracy" in out.metrics:
                    hits = out.metrics["accuracy"] * labels.shape[0]
                else:
                    hits = (out.logits.detach().argmax(dim=1) == labels).sum()
                correct = _add(correct, hits)
            seen += labels.shape[0]
            for key, value in out.metrics.items():
                metrics[key] = metrics.get(key, 0.0) + value / accum
        self.scaler.unscale_(self.optimizer)  # a no-op unless fp16
        clip = self.cfg.train.clip_grad_norm
        if clip > 0:
            # Each rank holds a different centre shard: the norm must be the global one, or the
            # ranks clip by different factors and their backbone replicas drift apart.
            from qualiface.train.distributed import clip_grad_norm_

            sharded = self.head.sharded_parameters() if self.sharded else []
            total_norm = clip_grad_norm_(self.trainable, clip, sharded=sharded)
        else:
            total_norm = gradient_norm(self.trainable)
        # A finite loss can still give a NaN/Inf gradient (e.g. 0/0 in a backward formula); in
        # fp32 nothing else would stop it, and one such step makes every weight NaN.
        flags = torch.stack([losses_finite, torch.isfinite(total_norm).to(losses_finite.device)])
        loss_ok, gradient_ok = self._all_ranks_true(flags)  # the step's one host sync
        if not (loss_ok and gradient_ok):
            if self.scaler.is_enabled():
                if loss_ok:
                    # The same back-off on every rank keeps their loss scales equal (a rank's
                    # own found-inf flag may differ when the head is sharded).
                    new_scale = self.scaler.get_scale() * self.scaler.get_backoff_factor()
                else:
                    new_scale = self.scaler.get_scale()  # a bad loss is no overflow: keep it
                # update() also clears the scaler's per-step "already unscaled" state.
                self.scaler.update(new_scale)
            self.optimizer.zero_grad(set_to_none=True)
            return SkippedStep("gradient" if loss_ok else "loss")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        metrics.update(loss=loss_sum, norm=norm_sum / seen)
        if self.dist.world_size == 1 and correct is not None:
            metrics["acc"] = correct / seen
        return metrics

    def _all_ranks_true(self, flags: torch.Tensor) -> list[bool]:
        """Per entry of the bool vector ``flags``: True when it is True on every rank. Reads
        the device once (after one all-reduce when distributed)."""
        if self.dist.is_distributed:
            import torch.distributed as dist

            flags = flags.to(device=self.device, dtype=torch.float32)
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        return [bool(v) for v in flags.tolist()]

    # ------------------------------------------------------------------ phases

    def prepare_phase(self, phase: Phase, steps_per_epoch: int | None = None) -> list[nn.Parameter]:
        """Enter ``phase``: the method's hooks (freezing, head stage), a fresh optimizer over the
        phase's trainable parameters, the DDP / compile wrapper. Sets and returns
        ``self.trainable``. ``steps_per_epoch`` defaults to the current plan's."""
        if steps_per_epoch is None:
            steps_per_epoch = self.plan().steps_per_epoch
        self.method.enter_phase(phase, self.backbone, self.head, steps_per_epoch)
        named = self.method.trainable(phase, self.backbone, self.head)
        self.optimizer = build_optimizer(named, self.cfg.optim, lr=phase.lr)
        self._wrap_model()
        self.trainable = [p for _, p in named]
        return self.trainable

    def _run_phase(self, phase: Phase, progress, task) -> None:
        plan = self.plan()
        steps_per_epoch = plan.steps_per_epoch
        if steps_per_epoch < 1:
            raise DataError(f"{len(plan.indices)} training samples are fewer than one step of {plan.step_size}")
        total = phase.total_steps(steps_per_epoch)
        self.prepare_phase(phase, steps_per_epoch)
        if self._resume_state is not None:  # resuming into this very phase
            if self._resume_state["optimizer"]:
                self.optimizer.load_state_dict(self._resume_state["optimizer"])
            ckpt.restore_rng_state(self._resume_state["rng"], {"augment": self.augment_generator})
            self._resume_state = None
        schedule = build_schedule(self.cfg.schedule, base_lr=phase.lr, total_steps=total,
                                  steps_per_epoch=steps_per_epoch)
        source = BatchSource(self.dataset, plan, rank=self.dist.rank, cache=self.cache, device=self.device,
                             num_workers=self.num_workers)
        t = self.cfg.train
        progress.update(task, description=phase.name, total=total, completed=self.phase_step)
        window_start, window_images = time.perf_counter(), 0
        while self.phase_step < total:
            epoch, position = divmod(self.phase_step, steps_per_epoch)
            self.method.before_step(phase, self.phase_step, self.head)
            lr = schedule(self.phase_step)
            set_lr(self.optimizer, lr)
            metrics = self.train_step(source.step(epoch, position))
            self.phase_step += 1
            self.global_step += 1
            window_images += plan.step_size
            if isinstance(metrics, SkippedStep):
                self.nonfinite_streak += 1
                self.logger.note(self.global_step, f"non-finite {metrics.what}: step skipped "
                                 f"({self.nonfinite_streak} in a row)")
                if self.nonfinite_streak >= t.max_nonfinite_steps:
                    raise TrainingError(
                        f"{self.nonfinite_streak} consecutive steps had a NaN/Inf loss or "
                        f"gradient (phase {phase.name}, step {self.phase_step}); lower "
                        f"optim.lr, set train.clip_grad_norm, or use precision=fp32"
                    )
            else:
                self.nonfinite_streak = 0
                metrics.update(lr=lr, epoch=epoch, phase=phase.name)
                self._step_metrics = metrics  # still on the device; read when logged
            if self.phase_step % t.log_every == 0 or self.phase_step == total:
                elapsed = time.perf_counter() - window_start
                ips = window_images / elapsed if elapsed > 0 else 0.0
                window_start, window_images = time.perf_counter(), 0
                record = dict(self.last_metrics, images_per_s=ips)
                self.logger.log(self.global_step, record)
                progress.update(task, loss=f"{record.get('loss', float('nan')):.3f}",
                                acc=f"{record['acc']:.3f}" if "acc" in record else "-",
                                norm=f"{record.get('norm', float('nan')):.1f}", ips=f"{ips:.0f}")
            progress.update(task, completed=self.phase_step)
            if t.eval_every > 0 and self.global_step % t.eval_every == 0:
                self.validate()
            if t.checkpoint_every > 0 and self.phase_step % t.checkpoint_every == 0 and self.phase_step < total:
                self.save_checkpoint()
            if self._any_rank(self._stop_signal is not None):
                self.save_checkpoint()
                raise TrainingInterrupted(self._stop_signal or signal.SIGTERM, self.global_step, self.checkpoint_path)

    # ------------------------------------------------------------------ evaluation

    def validate(self) -> dict:
        """Held-out verification (rank 0 computes; the others wait)."""
        from qualiface.train.validate import build_validator

        if self.cfg.val.kind == "none":
            return {}
        result = {}
        if self.is_main:
            if self.validator is None:
                self.validator = build_validator(self.cfg.val)
            was_training = self.backbone.training
            self.backbone.eval()
            result = self.validator(self.backbone, inner_head(self.head), self.device, self.precision)
            self.backbone.train(was_training)
            self.logger.log(self.global_step, result, kind="val")
            console.print(f"[green]validation[/] step {self.global_step}: "
                          + ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
        self._barrier()
        return result

    @torch.no_grad()
    def score_training_set(self, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Quality of every current training sample (no flip): ``(indices (N,), quality (N,))``.

        The method's quality estimator; the service behind ``MethodContext.score_samples``
        (EQFace's QWDF filter and collapse check). ``limit``: only that many samples, evenly
        spread over the set. Every rank scores the same samples.
        """
        from qualiface.progress import make_progress

        estimator = self.method.quality_estimator(self.head).to(self.device).eval()
        was_training = self.backbone.training
        self.backbone.eval()
        scores = []
        bs = self.cfg.train.batch_size
        chosen = self.indices
        if limit is not None and len(chosen) > limit:
            chosen = chosen[torch.linspace(0, len(chosen) - 1, limit).round().long()]
        with make_progress(enabled=self.cfg.train.progress and self.is_main) as bar:
            task = bar.add_task("scoring training set", total=len(chosen))
            for start in range(0, len(chosen), bs):
                idx = chosen[start : start + bs]
                if self.cache is not None:
                    images = self.cache[0][idx.to(self.cache[0].device)].to(self.device)
                else:
                    images = torch.stack([self.dataset[int(i)][0] for i in idx]).to(self.device)
                x = to_model_input(images)
                with autocast(self.device, self.precision):
                    emb, feats = self.backbone(x, return_features=True)
                if self.method.needs_features:
                    q = estimator(emb.float(), feats.float())
                else:
                    q = estimator(emb.float())
                scores.append(q.float().cpu())
                bar.advance(task, len(idx))
        self.backbone.train(was_training)
        return chosen.clone(), torch.cat(scores)

    # ------------------------------------------------------------------ the run

    def summary(self) -> list[tuple[str, str]]:
        """What this run is about to do, epochs and warm-ups converted to optimizer steps, as
        ``(label, text)`` rows (``print_summary`` shows them before training starts)."""
        cfg, t, plan = self.cfg, self.cfg.train, self.plan()
        per_epoch = plan.steps_per_epoch
        source = ("decoded once into memory" if self.cache is not None
                  else f"read per step by {self.num_workers} data workers")
        workers = f"{self.num_workers} data workers"
        if self.num_workers != cfg.data.num_workers:
            workers += f" (data.num_workers={cfg.data.num_workers}; {available_cpus()} CPUs available)"
        rows = [
            ("model", f"{cfg.model.backbone}, head {cfg.head.name}, pipeline {cfg.pipeline.name}"),
            ("data", f"{cfg.data.name}: {len(self.indices):,} images, {self.num_classes:,} classes, {source}"),
            ("steps/epoch", f"{per_epoch:,} of {plan.step_size:,} images (batch_size {t.batch_size} x "
                            f"grad_accum {t.grad_accum} x {self.dist.world_size} process(es))"),
        ]
        total = 0
        phases = self.method.phases()
        for number, phase in enumerate(phases, 1):
            steps = phase.total_steps(per_epoch)
            total += steps
            warmup = build_schedule(cfg.schedule, base_lr=phase.lr, total_steps=steps,
                                    steps_per_epoch=per_epoch).warmup_steps
            length = f"{steps:,} steps" + (f" ({phase.epochs:g} epochs)" if phase.steps <= 0 else "")
            notes = [length, f"lr {phase.lr:g}", f"lr warm-up {warmup:,} steps",
                     *self.method.describe(phase, per_epoch, steps)]
            rows.append((f"phase {number}/{len(phases)}", f"{phase.name}: " + ", ".join(notes)))
        rows += [
            ("total steps", f"{total:,}"),
            ("threads", f"{torch.get_num_threads()} torch intra-op, {workers}"),
            ("device", f"{self.device}, precision {self.precision}"),
            ("output", str(self.out_dir)),
        ]
        return rows

    def print_summary(self) -> None:
        """Print ``summary()`` on stderr (``run()`` does, on rank 0, before the first step)."""
        console.print("[bold]training run[/]")
        for label, text in self.summary():
            console.print(f"  {label:<13} {text}", markup=False, highlight=False)

    def _install_signal_handlers(self):
        def handler(signum, _frame):
            self._stop_signal = signum

        previous = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. inside a test runner thread)
            pass
        return previous

    def run(self) -> TrainResult:
        """Run (or resume) every phase, then write final weights and the model package."""
        t = self.cfg.train
        if t.resume:
            if ckpt.has_checkpoint(self.checkpoint_path):
                source = self.load_checkpoint()
                console.print(f"resuming from {source} at step {self.global_step}")
            else:
                console.print(f"[yellow]resume=true but no checkpoint in {self.out_dir}; starting fresh[/]")
        if self.is_main:
            self.print_summary()
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out_dir / "config.yaml")
        phases = self.method.phases()
        previous = self._install_signal_handlers()
        try:
            with training_progress(enabled=t.progress and self.is_main, every=t.log_every) as progress:
                task = progress.add_task("train", total=None, loss="-", acc="-", norm="-", ips="-")
                while self.phase_index < len(phases):
                    phase = phases[self.phase_index]
                    self._run_phase(phase, progress, task)
                    self.method.after_phase(phase, self.context)
                    self.phase_index += 1
                    self.phase_step = 0
                    if self.phase_index < len(phases):
                        self.optimizer = None
                        self.save_checkpoint()  # stage marker: resume starts the next phase
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
        self.save_checkpoint()
        validation = self.validate()
        result = self._finish(validation)
        self.logger.close()
        return result

    def _finish(self, validation: dict) -> TrainResult:
        final = self.out_dir / "final.safetensors"
        package = None
        if self.is_main:
            weights = {**ckpt.prefixed("backbone", self.backbone.state_dict()),
                       **ckpt.prefixed("head", self._head_state_for_export())}
            ckpt.export_safetensors(final, weights, {"global_step": self.global_step,
                                                     "backbone": self.cfg.model.backbone,
                                                     "head": self.cfg.head.name})
            package = self._save_package()
            self._write_report(validation)
        else:
            self._head_state_for_export()
        return TrainResult(self.out_dir, self.global_step, final, package, self.last_metrics, validation)

    def _write_report(self, validation: dict) -> None:
        """``report/report.html``: the run's curves (loss, accuracy, norm, lr, validation)."""
        from qualiface.train.report import write_training_report

        summary = {"backbone": self.cfg.model.backbone, "head": self.cfg.head.name,
                   "pipeline": self.cfg.pipeline.name, "steps": self.global_step,
                   "final": {k: v for k, v in self.last_metrics.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)},
                   "validation": validation}
        path = write_training_report(self.out_dir, title=f"training: {self.cfg.head.name} on "
                                     f"{self.cfg.model.backbone}", summary=summary)
        console.print(f"training report: {path}")

    def _head_state_for_export(self) -> dict:
        return self._head_state()

    def _save_package(self) -> Path | None:
        try:
            from qualiface.package.io import save_model_package
        except ImportError:
            self.logger.note(self.global_step, "model package skipped: qualiface.package.io is not available")
            return None
        out = self.out_dir / "model"
        self.backbone.eval()
        save_model_package(
            out,
            backbone=self.backbone,
            backbone_name=self.cfg.model.backbone,
            backbone_kwargs=dict(self.cfg.model.params),
            quality_estimator=self.method.quality_estimator(self.head),
            head_name=self.cfg.head.name,
            metadata={"global_step": self.global_step, "config": to_dict(self.cfg),
                      "last_metrics": {k: v for k, v in self.last_metrics.items() if isinstance(v, (int, float, str))}},
        )
        console.print(f"model package written to {out}")
        return out


class TrainerContext:
    """The ``MethodContext`` a trainer hands its method: a few services, not the trainer."""

    def __init__(self, trainer: Trainer) -> None:
        self._trainer = trainer

    @property
    def steps_per_epoch(self) -> int:
        return self._trainer.plan().steps_per_epoch

    @property
    def samples_per_step(self) -> int:
        return self._trainer.samples_per_step

    def score_samples(self, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self._trainer.score_training_set(limit=limit)

    def set_training_subset(self, indices: torch.Tensor) -> None:
        self._trainer.set_training_subset(indices)

    def note(self, message: str) -> None:
        self._trainer.logger.note(self._trainer.global_step, message)


def train(cfg: TrainingConfig, *, out_dir: str | Path | None = None) -> TrainResult:
    """Train from a config (see ``qualiface.config``); returns where everything was written."""
    return Trainer(cfg, out_dir=out_dir).run()
