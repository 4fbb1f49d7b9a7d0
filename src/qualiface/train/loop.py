"""The training loop: one loop for every head and method, readable top to bottom.

``train(cfg)`` builds a ``Trainer`` from a ``TrainingConfig`` and runs the method's phases
(``qualiface.methods``). Two functions hold the whole loop:

* ``Trainer._run_phase``, the step loop of a phase: the method's per-step hook, the learning
  rate from the pure schedule, the step's micro-batches, ``train_step``, the non-finite count
  (``max_nonfinite_steps`` skipped steps in a row stop the run), logging, validation and
  checkpoints on their intervals; on SIGTERM/SIGINT a checkpoint and ``TrainingInterrupted``;
* ``Trainer.train_step``, one optimizer step: per micro-batch random flip, forward (the
  method's second view in the same backbone pass, autocast, head in fp32), ``loss / accum``
  backward (DDP's ``no_sync`` on all but the last); then unscale and clip (or measure) the
  gradient norm, skip the step when any micro-batch loss or that norm is NaN/Inf on any rank,
  else step the optimizer.

What they call lives in small modules named for what it does: ``build`` (device, data,
backbone, head, cache, DDP/compile wrapper), ``step`` (forward, device-side sums, clipping,
the skip), ``distributed`` (process group, rank agreement, ``no_sync``), ``checkpoint`` (the
run's checkpoint files, resume), ``validate``, ``export`` (final weights, model package,
report), ``schedule``, ``optim``, ``precision``, ``data``, ``logging``.

Host syncs. Everything a step measures stays a device tensor until a record is logged; the one
read per optimizer step is the skip decision (see ``train.step``). A micro-batch with a NaN
loss therefore does not cut the step short: all micro-batches run, then the whole step is
skipped (weights, running statistics, optimizer and loss scale untouched).

The per-step pieces are public for benchmarks and custom loops: ``plan()``,
``prepare_phase(phase)`` and ``train_step(micro_batches)``. Single process: the plain head;
under ``torchrun``: DDP backbone plus the sharded head of ``train.sharded``. The loop never
looks at the method's name and never asks a head or a method what it can do: it calls the
``Method`` interface (``methods.base``) and hands the method a ``MethodContext``
(``TrainerContext`` below), not itself.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from qualiface.config import ConfigError, TrainingConfig, save_config, to_dict
from qualiface.data.transforms import to_model_input
from qualiface.errors import QualifaceError
from qualiface.methods import build_method
from qualiface.methods.base import Phase, inner_head
from qualiface.progress import make_progress
from qualiface.threads import available_cpus, data_workers
from qualiface.train import checkpoint as ckpt
from qualiface.train import export
from qualiface.train.build import (build_cache, build_dataset_and_backbone, build_head, resolve_device,
                                   seed_everything, wrap_model)
from qualiface.train.data import BatchPlan, BatchSource, DataError, data_changes, data_fingerprint, random_flip
from qualiface.train.distributed import (all_ranks_true, any_rank, barrier, broadcast_object, init_distributed,
                                         no_sync_unless)
from qualiface.train.logging import MetricsLogger, Throughput, console, training_progress
from qualiface.train.optim import build_optimizer, set_lr
from qualiface.train.precision import autocast, configure_kernels, make_scaler, resolve_precision
from qualiface.train.schedule import build_schedule
from qualiface.train.sharded import ShardedHead
from qualiface.train.step import (SkippedStep, StepSums, forward, metrics_to_host, restore_buffers, skip_step,
                                  snapshot_buffers, unscale_and_clip)
from qualiface.train.validate import build_validator

__all__ = ["Trainer", "TrainerContext", "TrainResult", "TrainingError", "TrainingInterrupted",
           "SkippedStep", "metrics_to_host", "seed_everything", "resolve_device", "train"]


class TrainingError(QualifaceError, RuntimeError):
    """Training cannot go on (diverged, bad setup); the message says why and what to do."""


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
    final_weights: Path | None  # None on ranks > 0: rank 0 writes what a run leaves
    model_package: Path | None
    last_metrics: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)


def augment_seed(seed: int, rank: int, step: int = 0) -> int:
    """Seed of a rank's augmentation generator: distinct per rank (ranks must not flip and degrade
    their batches alike) and, for a stream started mid-run, per step (not a replay of step 0's)."""
    return seed * 7919 + rank + 1 + step * 104_729


class Trainer:
    """Holds the run's state; ``run()`` executes every phase (resuming when asked)."""

    def __init__(self, cfg: TrainingConfig, *, out_dir: str | Path | None = None) -> None:
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
        self.dataset, self.backbone = build_dataset_and_backbone(cfg, self.device)
        self.num_classes = int(self.dataset.num_classes)
        self.method = build_method(cfg)
        self.head = build_head(cfg, self.method, self.backbone, self.num_classes, self.dist).to(self.device)
        self.sharded = isinstance(self.head, ShardedHead)  # several ranks, or centre sampling
        self.context = TrainerContext(self)
        # Built now, not at the first validation: a validation set that cannot be built or does
        # not fit the backbone would otherwise stop the run after all of its training (the final
        # validation comes before the weights and the model package are written).
        self.validator = None
        failure: Exception | None = None
        if self.is_main and cfg.val.kind != "none":
            try:
                self.validator = build_validator(cfg.val, self._input_size)
            except Exception as exc:  # raised below, once every rank knows
                failure = exc
        # Rank 0 alone builds it; the other ranks must stop too, with rank 0's reason, rather
        # than go on decoding their data and fail at the first collective with "peer exited".
        reason = broadcast_object(None if failure is None else f"{failure}")
        if failure is not None:
            raise failure
        if reason is not None:
            raise ConfigError(f"rank 0 could not build the validation set: {reason}")

        # Augmentation randomness (flips, degraded views) has its own generator so it is
        # checkpointed explicitly; per rank, so ranks augment differently.
        self.augment_generator = torch.Generator().manual_seed(augment_seed(t.seed, self.dist.rank))
        self.indices = torch.arange(len(self.dataset))
        self.num_workers = data_workers(cfg.data.num_workers)  # at most one per available CPU
        self.cache = build_cache(self.dataset, cfg, self.device, self.num_workers, progress=t.progress and self.is_main)
        self.scaler = make_scaler(self.device, self.precision)
        self.logger = MetricsLogger(self.out_dir, enabled=self.is_main)
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

    # ------------------------------------------------------------------ the run

    def run(self) -> TrainResult:
        """Run (or resume) every phase, then write final weights and the model package."""
        t = self.cfg.train
        if t.resume:
            if ckpt.has_checkpoint(self.checkpoint_path):
                source = self.load_checkpoint()
                console.print(f"resuming from {source} at step {self.global_step}")
            else:
                console.print(f"[yellow]resume=true but no checkpoint in {self.out_dir}; starting fresh[/]")
                # records of a run killed before its first checkpoint: all redone
                self.logger.resume(0, step=-1, elapsed=0.0)
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
                    if not self.method.after_phase(phase, self.context):
                        self.phase_index += 1
                    self.phase_step = 0
                    phases = self.method.phases()  # a repeated phase may come with new settings
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

    def _run_phase(self, phase: Phase, progress, task) -> None:
        """The step loop of one phase, top to bottom."""
        t = self.cfg.train
        plan, total, schedule, source = self._enter_phase(phase)
        progress.update(task, description=phase.name, total=total, completed=self.phase_step)
        throughput = Throughput()
        while self.phase_step < total:
            epoch, position = divmod(self.phase_step, plan.steps_per_epoch)
            self.method.before_step(phase, self.phase_step, self.head)
            lr = schedule(self.phase_step)
            set_lr(self.optimizer, lr)
            metrics = self.train_step(source.step(epoch, position))
            self.phase_step += 1
            self.global_step += 1
            throughput.add(plan.step_size)
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
                self._log_step(progress, task, throughput.rate())
            progress.update(task, completed=self.phase_step)
            with throughput.paused():  # images/s measures training, not these
                if t.eval_every > 0 and self.global_step % t.eval_every == 0:
                    self.validate()
                if t.checkpoint_every > 0 and self.phase_step % t.checkpoint_every == 0 and self.phase_step < total:
                    self.save_checkpoint()
            if any_rank(self._stop_signal is not None, self.device):
                self.save_checkpoint()
                raise TrainingInterrupted(self._stop_signal or signal.SIGTERM, self.global_step, self.checkpoint_path)

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
        sums = StepSums(accum, self.num_classes)
        # The forward moves running statistics (BatchNorm, the heads' EMAs, QGFace's queue): a
        # skipped step puts them back, or the one overflowing batch that made it non-finite
        # would leave NaN in them for good (a head's EMA: every later step NaN too).
        buffers = snapshot_buffers(self.backbone, self.head)
        self.optimizer.zero_grad(set_to_none=True)
        for k, (images, labels) in enumerate(micro_batches):
            if self.cfg.data.flip:
                images = random_flip(images, self.augment_generator)
            with no_sync_unless(k == accum - 1, self.model):
                out, embeddings = forward(self.model, self.head, self.method, images, labels,
                                          generator=self.augment_generator, device=self.device,
                                          precision=self.precision, channels_last=self.cfg.train.channels_last)
                # A NaN/Inf loss poisons the gradients, but the step is skipped as a whole below,
                # so backward runs anyway: stopping here would need the host to read the loss.
                self.scaler.scale(out.loss / accum).backward()
            sums.add(out, embeddings, labels)
        sharded = self.head.sharded_parameters() if self.sharded else []
        total_norm = unscale_and_clip(self.scaler, self.optimizer, self.trainable, self.cfg.train.clip_grad_norm, sharded)
        # A finite loss can still give a NaN/Inf gradient (e.g. 0/0 in a backward formula); in
        # fp32 nothing else would stop it, and one such step makes every weight NaN.
        flags = torch.stack([sums.finite, torch.isfinite(total_norm).to(sums.finite.device)])
        loss_ok, gradient_ok = all_ranks_true(flags, self.device)  # the step's one host sync
        if not (loss_ok and gradient_ok):
            restore_buffers(buffers)
            return skip_step(self.scaler, self.optimizer, loss_ok)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return sums.metrics(with_accuracy=self.dist.world_size == 1)

    # ------------------------------------------------------------------ phases

    def _enter_phase(self, phase: Phase):
        """``prepare_phase`` plus what the step loop reads: ``(plan, total steps, lr schedule,
        batch source)``; resuming into this very phase restores its optimizer and RNG."""
        plan = self.plan()
        steps_per_epoch = plan.steps_per_epoch
        if steps_per_epoch < 1:
            raise DataError(f"{len(plan.indices)} training samples are fewer than one step of {plan.step_size}")
        total = phase.total_steps(steps_per_epoch)
        self.prepare_phase(phase, steps_per_epoch)
        if self._resume_state is not None:
            if self._resume_state["optimizer"]:
                self.optimizer.load_state_dict(self._resume_state["optimizer"])
            if self._resume_state["rng"] is not None:
                ckpt.restore_rng_state(self._resume_state["rng"], {"augment": self.augment_generator})
            else:  # a rank > 0 resuming on another world size: no saved streams of its own
                self.augment_generator.manual_seed(augment_seed(self.cfg.train.seed, self.dist.rank,
                                                                self.global_step))
            self._resume_state = None
        schedule = build_schedule(self.cfg.schedule, base_lr=phase.lr, total_steps=total,
                                  steps_per_epoch=steps_per_epoch, warmup=phase.warmup)
        source = BatchSource(self.dataset, plan, rank=self.dist.rank, cache=self.cache, device=self.device,
                             num_workers=self.num_workers)
        return plan, total, schedule, source

    def prepare_phase(self, phase: Phase, steps_per_epoch: int | None = None) -> list[nn.Parameter]:
        """Enter ``phase``: the method's hooks (freezing, head stage), a fresh optimizer over the
        phase's trainable parameters, the DDP / compile wrapper. Sets and returns
        ``self.trainable``. ``steps_per_epoch`` defaults to the current plan's."""
        if steps_per_epoch is None:
            steps_per_epoch = self.plan().steps_per_epoch
        self.method.enter_phase(phase, self.backbone, self.head, steps_per_epoch)
        named = self.method.trainable(phase, self.backbone, self.head)
        self.optimizer = build_optimizer(named, self.cfg.optim, lr=phase.lr)
        self.model = wrap_model(self.backbone, self.dist, self.device, self.cfg.train.compile)
        self.trainable = [p for _, p in named]
        return self.trainable

    @property
    def _input_size(self) -> int | None:
        """The side of the square images the backbone takes (None: any size)."""
        return getattr(self.backbone, "input_size", None)

    @cached_property
    def data_fingerprint(self) -> dict:
        """The training data's fingerprint, saved in every checkpoint and compared on resume.

        Computed on first use (the first checkpoint or a resume), not at start-up: it hashes
        every sample's name and label, seconds for millions of files, which a run that never
        checkpoints (or a rank that never reads it) should not pay before its first step.
        """
        return data_fingerprint(self.dataset)

    def plan(self) -> BatchPlan:
        """The batch plan over the current training subset (step size, steps per epoch)."""
        t = self.cfg.train
        return BatchPlan(self.indices, t.batch_size, t.grad_accum, self.dist.world_size, t.seed)

    @property
    def samples_per_step(self) -> int:
        """Images one optimizer step consumes across all ranks."""
        return self.plan().step_size

    def set_training_subset(self, indices: torch.Tensor) -> None:
        """Train on ``indices`` (dataset positions) from the next phase on (QWDF filtering)."""
        self.indices = indices.to(torch.int64).cpu()

    # ------------------------------------------------------------------ logging

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

    def _log_step(self, progress, task, images_per_s: float) -> None:
        """One ``metrics.jsonl`` record of the last step, and its numbers on the progress bar."""
        record = dict(self.last_metrics, images_per_s=images_per_s)
        self.logger.log(self.global_step, record)
        progress.update(task, loss=f"{record.get('loss', float('nan')):.3f}",
                        acc=f"{record['acc']:.3f}" if "acc" in record else "-",
                        norm=f"{record.get('norm', float('nan')):.1f}", ips=f"{images_per_s:.0f}")

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
        ]
        if self.sharded:
            head = self.head
            sampled = (f", {head.num_sampled:,} of {head.num_local:,} centres per step on each rank "
                       f"(sample_rate {head.sample_rate:g})" if head.num_sampled < head.num_local else "")
            rows.append(("classifier", f"sharded over {self.dist.world_size} process(es){sampled}"))
        rows += [
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
                                    steps_per_epoch=per_epoch, warmup=phase.warmup).warmup_steps
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

    # ------------------------------------------------------------------ checkpoints

    def _head_state(self) -> dict:
        """The full head state (sharded: gathered from every rank, so every rank must call)."""
        return self.head.full_state_dict() if self.sharded else self.head.state_dict()

    def save_checkpoint(self) -> None:
        """Write the one resumable checkpoint (every rank calls: the head gather is collective)."""
        state = {
            "phase_index": self.phase_index,
            "phase_step": self.phase_step,
            "global_step": self.global_step,
            "nonfinite_streak": self.nonfinite_streak,
            "world_size": self.dist.world_size,
            "backbone": self.backbone.state_dict(),
            "head": self._head_state(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            "scaler": self.scaler.state_dict(),
            # The sharded head's centre-sampling counter, so resumed runs draw the same negatives.
            "sampling_step": int(self.head.step) if self.sharded else 0,
            "rng": ckpt.capture_rng_state({"augment": self.augment_generator}),
            "data": {"seed": self.cfg.train.seed, "indices": self.indices, "fingerprint": self.data_fingerprint,
                     "epoch_and_position": list(divmod(self.phase_step, max(1, self.plan().steps_per_epoch)))},
            "config": to_dict(self.cfg),
            # The log as of this checkpoint (a resume drops what was written after it, since it
            # redoes those steps) and the last step's metrics (the model package and report of a
            # run resumed after its last step report them).
            "metrics_offset": self.logger.offset(),
            "last_metrics": self.last_metrics,
            # The log's clock, so the ``time`` of a resumed run's records goes on from here.
            "elapsed_s": self.logger.elapsed(),
            "method": self.method.state_dict(),
        }
        ckpt.save_run_checkpoint(self.out_dir, state, rank=self.dist.rank, world_size=self.dist.world_size)
        barrier()

    def load_checkpoint(self) -> Path:
        """Restore model, head, counters and data position; optimizer/RNG on phase entry
        (``_enter_phase``). Returns the file resumed from (``ckpt.load_run_checkpoint``)."""
        notes: list[tuple[int, str]] = []  # logged after the rewind below, not cut by it
        try:
            state, source = ckpt.load_run_checkpoint(self.out_dir, to_dict(self.cfg), rank=self.dist.rank,
                                                     world_size=self.dist.world_size,
                                                     note=lambda step, message: notes.append((step, message)))
        except Exception:
            for step, message in notes:  # refused: its warnings still reach the log
                self.logger.note(step, message)
            raise
        saved_data = state["data"].get("fingerprint")  # absent in checkpoints older than it
        changes = data_changes(saved_data, self.data_fingerprint) if isinstance(saved_data, dict) else []
        if changes:
            raise ckpt.CheckpointError(
                f"{source}: the training data changed since this checkpoint ({'; '.join(changes)}); "
                f"resuming would train its classifier on other labels. Restore the data "
                f"({self.cfg.data.name}: {self.cfg.data.params}), or start afresh with --overwrite")
        # Checkpoints written before a key existed lack it: resume() then keeps the whole log
        # (no metrics_offset) or goes on from its last record's time (no elapsed_s).
        offset, elapsed = state.get("metrics_offset"), state.get("elapsed_s")
        self.logger.resume(offset if isinstance(offset, int) else None,
                           step=int(state["global_step"]),
                           elapsed=float(elapsed) if isinstance(elapsed, (int, float)) else None)
        for step, message in notes:
            self.logger.note(step, message)
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
        self.method.load_state_dict(state.get("method") or {})  # before phases() is asked
        last = state.get("last_metrics")
        self._last_metrics, self._step_metrics = (dict(last) if isinstance(last, dict) else {}), None
        self._resume_state = state
        return source

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

    # ------------------------------------------------------------------ evaluation and export

    def validate(self) -> dict:
        """Held-out verification (rank 0 computes; the others wait)."""
        if self.cfg.val.kind == "none":
            return {}
        result = {}
        if self.is_main:
            if self.validator is None:  # cfg.val was changed after start-up
                self.validator = build_validator(self.cfg.val, self._input_size)
            was_training = self.backbone.training
            self.backbone.eval()
            result = self.validator(self.backbone, inner_head(self.head), self.device, self.precision)
            self.backbone.train(was_training)
            self.logger.log(self.global_step, result, kind="val")
            console.print(f"[green]validation[/] step {self.global_step}: "
                          + ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
        barrier()
        return result

    @torch.no_grad()
    def score_training_set(self, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Quality of every current training sample (no flip): ``(indices (N,), quality (N,))``.

        The method's quality estimator; the service behind ``MethodContext.score_samples``
        (EQFace's QWDF filter and collapse check). ``limit``: only that many samples, evenly
        spread over the set. Every rank scores the same samples.
        """
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

    def _finish(self, validation: dict) -> TrainResult:
        """``final.safetensors``, the model package and the report (rank 0; every rank joins
        the sharded head's gather)."""
        final = self.out_dir / "final.safetensors"
        head_state = self._head_state()
        package = None
        if self.is_main:
            export.export_final_weights(final, self.backbone, head_state, self.cfg, self.global_step)
            package = export.save_package(self.out_dir / "model", self.backbone,
                                          self.method.quality_estimator(self.head), self.cfg,
                                          self.global_step, self.last_metrics)
            export.write_report(self.out_dir, self.cfg, self.global_step, self.last_metrics, validation)
        return TrainResult(self.out_dir, self.global_step, final if self.is_main else None, package,
                           self.last_metrics, validation)


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
