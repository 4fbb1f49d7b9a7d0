"""The one interface between the training loop and a method, and the context the loop hands it.

A *method* (ArcFace, QCFace, EQFace, ...) is one class in one file of ``qualiface.methods``. It
owns everything about the method except the loss maths, which stays in its head
(``qualiface.heads``):

* ``name`` and ``heads``: the registry name(s) it answers to; the first head name is the
  default, and the method is picked by the config's ``head.name``;
* ``Config``: its own options dataclass (or ``None``), read from the config section
  ``pipeline.<name>`` (``pipeline.qcface.warmup_fraction``); ``scheduled`` says whether
  ``pipeline.name`` switched the method's own schedule on (``none``: one plain phase);
* ``build_head(embedding_size, num_classes, feature_dim, **params)`` (``head_params`` adds what
  the method's head needs from the backbone, e.g. EQFace's ``feature_dim``);
* ``phases()`` (``Phase`` list), ``enter_phase`` / ``trainable`` (what trains in a phase),
  ``before_step(phase, step, head)`` (per-step switches), ``after_phase(phase, ctx)`` (work
  between phases, through the narrow ``MethodContext``; it may ask for the phase again),
  ``describe`` (start-up summary), ``state_dict`` / ``load_state_dict`` (the method's own
  progress, kept in the checkpoint);
* its extra inputs: ``needs_features`` (the backbone's pre-embedding features go to the head)
  and ``second_view(images, generator)`` (a second input view, or ``None``);
* ``quality_estimator(head)`` and the score's ``quality_meaning`` / ``quality_range`` (what a
  model package's ``model.json`` says about the score).

The trainer never asks a method or a head what it can do (no ``hasattr``); it calls these.
This module imports nothing heavy (no torch at import), so the config parser can read the
methods' option dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

from qualiface.errors import QualifaceError
from qualiface.heads import build_head as build_named_head

if TYPE_CHECKING:
    import torch
    from torch import nn


class PipelineError(QualifaceError, ValueError):
    """A method schedule that cannot run (e.g. ``pipeline.name=eqface`` with an ArcFace head)."""


@dataclass(frozen=True)
class Phase:
    """One stretch of training with a fixed set of trainable parameters.

    ``steps > 0`` fixes the length; otherwise ``epochs`` of the (current) training set.
    ``stage`` is the method's own label for the phase (EQFace's step 1/2/3). ``warmup``: the
    phase's learning rate starts with the schedule's warm-up (off for a phase that continues
    from trained weights at its own small lr, where a warm-up would only eat its steps).
    """

    name: str
    epochs: float
    steps: int
    lr: float
    stage: int | None = None
    freeze_backbone: bool = False
    warmup: bool = True

    def total_steps(self, steps_per_epoch: int) -> int:
        if self.steps > 0:
            return self.steps
        return max(1, round(self.epochs * steps_per_epoch))


def warmup_length(steps: int, fraction: float, epochs: float, steps_per_epoch: int,
                  total_steps: int) -> int:
    """A warm-up in optimizer steps: ``steps`` when > 0, else ``fraction`` of ``total_steps``
    when > 0, else ``epochs`` of ``steps_per_epoch``."""
    if steps > 0:
        return int(steps)
    if fraction > 0:
        return int(round(fraction * total_steps))
    return int(round(epochs * steps_per_epoch))


def inner_head(head: nn.Module) -> nn.Module:
    """The method head itself (unwraps a ``ShardedHead``, which keeps it as ``.head``)."""
    return getattr(head, "head", head)


def set_frozen(module: nn.Module, frozen: bool) -> None:
    """Freeze all parameters of ``module``, or restore their original ``requires_grad``.

    Some backbones keep parameters frozen by design (e.g. the embedding BN's scale), so
    unfreezing restores the flags recorded the first time instead of thawing everything.
    """
    if not hasattr(module, "_qualiface_trainable"):
        module._qualiface_trainable = {n: p.requires_grad for n, p in module.named_parameters()}
    for name, param in module.named_parameters():
        param.requires_grad_(False if frozen else module._qualiface_trainable.get(name, True))


#: The raw embedding norm as the quality score (``heads.quality.NormQuality``): its meaning.
NORM_MEANING = "L2 norm of the unnormalised embedding; higher = more recognisable"


class MethodContext(Protocol):
    """What the trainer offers a method between phases (instead of the trainer itself)."""

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch of the current training subset."""

    @property
    def samples_per_step(self) -> int:
        """Images one optimizer step consumes across all ranks."""

    def score_samples(self, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices (N,), quality (N,))``: the method's quality estimator over the current
        training samples (no flip); ``limit``: at most that many, evenly spread."""

    def set_training_subset(self, indices: torch.Tensor) -> None:
        """Train on ``indices`` (dataset positions) from the next phase on."""

    def note(self, message: str) -> None:
        """Record an event line in the run's log (``metrics.jsonl``) at the current step."""


class Method:
    """One phase, backbone and head trained together, the head's own quality estimator: what
    every method does unless it overrides it (also how a head without a method trains)."""

    #: The registry name; also the config section (``pipeline.<name>``) of ``Config``.
    name: ClassVar[str] = "none"
    #: Head names this method trains (``head.name`` values); registered under each.
    heads: ClassVar[tuple[str, ...]] = ()
    #: The method's options dataclass (``pipeline.<name>``), or ``None`` when it has none.
    Config: ClassVar[type | None] = None
    #: The head's backbone features go to the head (and to the quality estimator).
    needs_features: ClassVar[bool] = False
    #: What the quality score means, for ``model.json`` readers, and its range (None: open
    #: bound). ``quality_meaning=None``: the estimator's kind says (a head without a method).
    quality_meaning: ClassVar[str | None] = None
    quality_range: ClassVar[tuple[float | None, float | None]] = (None, None)

    def __init__(self, head_name: str, *, base: Phase, options: object | None = None,
                 scheduled: bool = False) -> None:
        """``base``: the run's main phase (``train.epochs``/``steps``, ``optim.lr``);
        ``options``: a ``Config`` instance (defaults when None); ``scheduled``: whether
        ``pipeline.name`` names this method (its own schedule runs)."""
        self.head_name = head_name
        self.base = base
        if options is None and self.Config is not None:
            options = self.Config()
        self.options = options
        self.scheduled = scheduled

    # ------------------------------------------------------------------ the head

    def head_params(self, params: dict, *, feature_dim: int) -> dict:
        """The head's constructor parameters: ``head.params`` plus what the method supplies."""
        return dict(params)

    def build_head(self, embedding_size: int, num_classes: int, feature_dim: int, **params) -> nn.Module:
        """The method's head for ``num_classes`` classes (``ValueError`` for bad parameters)."""
        return build_named_head(self.head_name, embedding_size, num_classes,
                                **self.head_params(params, feature_dim=feature_dim))

    # ------------------------------------------------------------------ phases and hooks

    def phases(self) -> list[Phase]:
        return [self.base]

    def enter_phase(self, phase: Phase, backbone: nn.Module, head: nn.Module,
                    steps_per_epoch: int) -> None:
        """Start ``phase``: freeze what must not train, set the head's switches."""
        set_frozen(backbone, phase.freeze_backbone)
        # A frozen backbone also runs in eval mode so its BN running statistics stay fixed.
        backbone.train(not phase.freeze_backbone)
        head.train()

    def trainable(self, phase: Phase, backbone: nn.Module, head: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The ``(name, parameter)`` pairs the optimizer updates during ``phase``."""
        named = [(f"backbone.{n}", p) for n, p in backbone.named_parameters()]
        named += [(f"head.{n}", p) for n, p in head.named_parameters()]
        return [(n, p) for n, p in named if p.requires_grad]

    def before_step(self, phase: Phase, step: int, head: nn.Module) -> None:
        """Called before every optimizer step (``step`` counts within the phase)."""

    def after_phase(self, phase: Phase, ctx: MethodContext) -> bool:
        """Called once a phase has finished (not on resume into a later phase). True: run the
        same phase again (the method changed its state, so ``phases()`` may now give it other
        settings), e.g. EQFace's step 2 restarted after a collapse; False: go on."""
        return False

    def state_dict(self) -> dict:
        """The method's own progress that ``phases()`` or the hooks depend on (JSON-able
        values), saved in every checkpoint; empty for a method without any."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` on resume (an empty dict: a checkpoint from before the
        method had state, or a fresh run)."""

    def describe(self, phase: Phase, steps_per_epoch: int, total_steps: int) -> list[str]:
        """What the method switches during ``phase``, in steps, for the start-up summary."""
        return []

    # ------------------------------------------------------------------ inputs and quality

    def second_view(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        """A second (uint8) view of ``images`` for the head, or None when the method has none."""
        return None

    def quality_estimator(self, head: nn.Module) -> nn.Module:
        """The inference-time quality module, carrying the score's ``meaning``/``value_range``."""
        estimator = inner_head(head).quality_estimator()
        if self.quality_meaning is not None:
            estimator.meaning = self.quality_meaning
            estimator.value_range = list(self.quality_range)
        return estimator
