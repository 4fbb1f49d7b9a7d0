"""Typed training configuration: YAML in, ``key=value`` overrides, validated, saved with every run.

A config is a tree of dataclasses (``TrainingConfig`` at the root). It is read with
``yaml.safe_load``; every key must name a field (an unknown key is a ``ConfigError`` naming the
key and the file), and every value is checked against the field's annotated type. Command-line
overrides use dotted paths (``optim.lr=0.05``, ``head.params.lambda_g=2``); the value text is
parsed as YAML (so ``true``, ``2``, ``[1, 2]`` work) and then type-checked the same way.

Numbers: ``1e-3`` is a float and ``010`` is ten (as in YAML 1.2; PyYAML's YAML 1.1 would read
them as text and as octal 8), and a float field also takes a numeric string. ``config.yaml`` is
written with the same rules, so a string such as ``"08"`` is quoted and reads back as text.
NaN and Inf (``.nan``, ``.inf``, ``nan``) are refused in every float field and anywhere in the
free-form sections, naming the key: a NaN learning rate passes every range check and
turns the weights into NaN after one step.

Free-form sections (``model.params``, ``head.params``, ``data.params``) are plain dicts passed
as keyword arguments to the component's constructor; ``validate_components`` checks their keys
against the constructor signature so a typo fails before training starts, not hours in.

A YAML document is bounded before it is constructed (at most ``MAX_YAML_NODES`` values after
alias expansion, ``MAX_YAML_DEPTH`` levels, no self-referencing aliases), so a small hostile
file cannot expand into gigabytes when the config is copied or saved.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qualiface.backbones import BACKBONES
from qualiface.backbones import _load_all as load_backbones
from qualiface.data import DATASETS
from qualiface.data import _load_all as load_datasets
from qualiface.errors import QualifaceError
from qualiface.files import read_small_text_as
from qualiface.heads import HEADS
from qualiface.heads import _load_all as load_heads
from qualiface.methods import PipelineError, build_method, method_options
from qualiface.registry import RegistryError


class ConfigError(QualifaceError, ValueError):
    """A config file or override that cannot be used (unknown key, wrong type, bad value)."""


# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    """The backbone: registry name plus constructor keyword arguments."""

    backbone: str = "iresnet50"
    params: dict = field(default_factory=dict)


@dataclass
class HeadConfig:
    """The head (loss + quality score): registry name plus constructor keyword arguments."""

    name: str = "arcface"
    params: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    """Training data: a dataset registry name and its constructor keyword arguments.

    ``cache``: ``auto`` decodes the whole set once into one uint8 tensor when it fits in
    ``cache_max_gb`` (kept on the GPU when it also fits there), ``always``/``never`` force it.
    """

    name: str = "synthetic"
    params: dict = field(default_factory=dict)
    cache: str = "auto"
    cache_max_gb: float = 8.0
    num_workers: int = 4
    flip: bool = True


@dataclass
class ValidationConfig:
    """Held-out verification during training.

    ``kind``: ``none``; ``synthetic`` (pairs from held-out synthetic identities, built with
    ``params``); ``pairs`` (an LFW-style folder ``root`` with a ``pairs.txt`` (``pairs``), using
    the folds listed in ``folds``, empty = all).
    """

    kind: str = "none"
    params: dict = field(default_factory=dict)
    num_pairs: int = 1000
    root: str = ""
    pairs: str = ""
    folds: list[int] = field(default_factory=list)  # 1-based; checked element by element
    batch_size: int = 128
    seed: int = 12345


@dataclass
class OptimConfig:
    """Optimizer. SGD uses ``momentum``; AdamW uses ``betas``/``eps``. Weight decay is applied
    to weight matrices/kernels only (never to BN, biases or PReLU slopes)."""

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    nesterov: bool = False


@dataclass
class ScheduleConfig:
    """Learning rate as a pure function of the optimizer step (see ``train.schedule``).

    ``kind``: ``poly`` | ``cosine`` | ``step`` | ``constant``. Warm-up is linear from 0 over
    ``warmup_epochs`` (or ``warmup_steps`` when > 0). ``milestones`` are in epochs (``step``).
    """

    kind: str = "poly"
    warmup_epochs: float = 0.0
    warmup_steps: int = 0
    power: float = 2.0
    min_lr: float = 0.0
    milestones: list[float] = field(default_factory=list)  # epochs; checked element by element
    gamma: float = 0.1


@dataclass
class TrainConfig:
    """The loop itself. ``batch_size`` is the micro-batch per process; one optimizer step sees
    ``batch_size * grad_accum * world_size`` images. ``steps > 0`` overrides ``epochs``."""

    epochs: float = 20.0
    steps: int = 0
    batch_size: int = 128
    grad_accum: int = 1
    precision: str = "auto"
    channels_last: bool = False
    compile: bool = False
    clip_grad_norm: float = 0.0
    seed: int = 0
    device: str = "auto"
    output_dir: str = "runs/train"
    checkpoint_every: int = 1000
    eval_every: int = 0
    log_every: int = 50
    resume: bool = False
    max_nonfinite_steps: int = 20
    progress: bool = True
    # Bitwise-repeatable GPU runs at some speed cost (deterministic kernels, no cuDNN autotuning);
    # off: cuDNN picks the fastest kernels. CPU runs are deterministic either way.
    deterministic: bool = False


class PipelineConfig:
    """Method schedule and options: ``name`` is ``none`` (one plain phase) or the method whose
    own schedule runs (``qcface``, ``eqface``, ``qgface``: it must be the method of
    ``head.name``); one section per method with options, read into that method's ``Config``
    dataclass (``qualiface.methods``, one file per method), e.g. ``pipeline.qcface.warmup_epochs``.
    A section left out takes the method's defaults; ``to_dict`` writes every section.
    """

    def __init__(self, name: str = "none", **sections: Any) -> None:
        options = method_options()
        unknown = sorted(set(sections) - set(options))
        if unknown:
            known = ", ".join(["name", *options])
            raise ConfigError(f"unknown key 'pipeline.{unknown[0]}' (known in this section: {known})")
        self.name = name
        for section, cls in options.items():
            setattr(self, section, sections.get(section) or cls())

    @classmethod
    def from_mapping(cls, data: Any, where: str) -> PipelineConfig:
        """Build from the YAML mapping ``{name: ..., <method>: {...}}`` (``where``: its key)."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {data!r}")
        options = method_options()
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            path = f"{where}.{key}"
            if key == "name":
                kwargs[key] = _coerce(value, str, path)
            elif key in options:
                kwargs[key] = _build(options[key], value, path)
            else:
                known = ", ".join(sorted(["name", *options]))
                raise ConfigError(f"unknown key '{path}' (known in this section: {known})")
        return cls(**kwargs)

    def sections(self) -> dict[str, Any]:
        """``{method name: its options}``."""
        return {section: getattr(self, section) for section in method_options() if hasattr(self, section)}

    def to_dict(self) -> dict:
        return {"name": self.name, **{k: dataclasses.asdict(v) for k, v in self.sections().items()}}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PipelineConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in (("name", self.name), *self.sections().items()))
        return f"PipelineConfig({inner})"


@dataclass
class DistributedConfig:
    """Multi-process options. ``sample_rate < 1`` samples negative class centres (Partial FC),
    in one process as well as under ``torchrun``."""

    sample_rate: float = 1.0
    backend: str = "auto"
    # Seconds a collective may wait for a peer before the run fails with a clear error.
    timeout_s: float = 1800.0


@dataclass
class TrainingConfig:
    """The whole training configuration (root of ``configs/*.yaml``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    val: ValidationConfig = field(default_factory=ValidationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


#: Largest seed accepted (numpy's ``np.random.seed`` takes 0 .. 2**32 - 1).
MAX_SEED = 2**32 - 1

CHOICES: dict[str, tuple[str, ...]] = {
    "data.cache": ("auto", "always", "never"),
    "val.kind": ("none", "synthetic", "pairs"),
    "optim.name": ("sgd", "adamw"),
    "schedule.kind": ("poly", "cosine", "step", "constant"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "distributed.backend": ("auto", "nccl", "gloo"),
}


# --------------------------------------------------------------------------- type checking


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotated type ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} does not match {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        number = _number_from_text(value) if isinstance(value, str) else value
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            # NaN passes every "> 0" check and Inf every "< limit" check: refuse both here,
            # before any range check can be fooled (NaN weights after one step otherwise).
            if not math.isfinite(number):
                raise ConfigError(f"{where}: {value!r} is not a finite number")
            return float(number)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a numeric folder name
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            args = typing.get_args(tp)
            if args:
                return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
            _refuse_non_finite(value, where)
            return list(value)
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            _refuse_non_finite(value, where)
            return dict(value)
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")  # pragma: no cover


def _number_from_text(text: str) -> float | str:
    """``'1e-3'`` -> ``0.001``; text that is not a number comes back unchanged.

    YAML 1.1 (PyYAML) reads ``1e-3`` as a string (its floats need a dot and a signed exponent),
    so a quoted or hand-built value may still arrive as text. YAML's ``.inf``/``.nan`` spellings
    are understood so that they are refused as non-finite, not as "not a number".
    """
    candidate = text.strip()
    if candidate.lstrip("+-").lower() in (".inf", ".nan"):
        candidate = candidate.replace(".", "", 1)
    try:
        return float(candidate)
    except ValueError:
        return text


def _refuse_non_finite(value: Any, where: str) -> None:
    """``ConfigError`` for a NaN/Inf anywhere in a free-form section or untyped list."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_non_finite(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _refuse_non_finite(item, f"{where}[{i}]")


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, recursing into nested sections."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown key '{path}' (known in this section: {known})")
        tp = hints[key]
        if tp is PipelineConfig:  # its sections are the methods' own option dataclasses
            kwargs[key] = PipelineConfig.from_mapping(value, path)
        elif dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path)
        else:
            kwargs[key] = _coerce(value, tp, path)
    return cls(**kwargs)


def _check_choices(cfg: TrainingConfig) -> None:
    for path, allowed in CHOICES.items():
        value = get_value(cfg, path)
        if value not in allowed:
            raise ConfigError(f"{path}: '{value}' is not one of {', '.join(allowed)}")
    schedules = ("none", *method_options())
    if cfg.pipeline.name not in schedules:
        raise ConfigError(f"pipeline.name: '{cfg.pipeline.name}' is not one of {', '.join(schedules)}")
    t = cfg.train
    positive = {
        "train.batch_size": t.batch_size,
        "train.grad_accum": t.grad_accum,
        "train.log_every": t.log_every,
        "train.max_nonfinite_steps": t.max_nonfinite_steps,
    }
    for path, value in positive.items():
        if value < 1:
            raise ConfigError(f"{path} must be >= 1, got {value}")
    if t.steps < 0 or t.epochs < 0 or (t.steps == 0 and t.epochs <= 0):
        raise ConfigError("train: set epochs > 0 or steps > 0")
    if not 0.0 < cfg.distributed.sample_rate <= 1.0:
        raise ConfigError(f"distributed.sample_rate must be in (0, 1], got {cfg.distributed.sample_rate}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    _check_ranges(cfg)
    for path in ("train.seed", "val.seed"):
        seed = get_value(cfg, path)
        if not 0 <= seed <= MAX_SEED:
            # numpy's legacy seeding takes 0 .. 2**32 - 1; larger ints overflow torch/numpy.
            raise ConfigError(f"{path}: {seed} is outside 0 .. 2**32 - 1 (what numpy and torch "
                              f"accept as a seed)")


def _check_ranges(cfg: TrainingConfig) -> None:
    """Numbers the optimizer and schedule would take without complaint and train wrongly with:
    ``clip_grad_norm=-1`` switched clipping off quietly, ``momentum=1.5`` diverges,
    ``gamma=5`` makes a step decay a step growth, a negative warm-up failed only when the phase
    started, with a bare ValueError."""
    o, sc = cfg.optim, cfg.schedule
    intervals = {  # path: (value, lowest, highest, whether the highest is allowed)
        "optim.momentum": (o.momentum, 0.0, 1.0, False),
        "optim.weight_decay": (o.weight_decay, 0.0, math.inf, False),
        "optim.eps": (o.eps, 0.0, math.inf, False),
        "schedule.warmup_epochs": (sc.warmup_epochs, 0.0, math.inf, False),
        "schedule.warmup_steps": (sc.warmup_steps, 0, math.inf, False),
        "schedule.min_lr": (sc.min_lr, 0.0, math.inf, False),
        "train.clip_grad_norm": (cfg.train.clip_grad_norm, 0.0, math.inf, False),
    }
    for path, (value, low, high, high_ok) in intervals.items():
        if not (low <= value < high or (high_ok and value == high)):
            raise ConfigError(f"{path} must be in [{low:g}, {high:g}), got {value:g}"
                              + (" (0 switches clipping off)" if path == "train.clip_grad_norm" else ""))
    if sc.power <= 0:
        raise ConfigError(f"schedule.power must be > 0, got {sc.power:g}")
    if not 0.0 < sc.gamma <= 1.0:
        raise ConfigError(f"schedule.gamma must be in (0, 1] (the factor at each milestone), got {sc.gamma:g}")
    for k, milestone in enumerate(sc.milestones):
        if milestone < 0:
            raise ConfigError(f"schedule.milestones[{k}] must be >= 0 (an epoch), got {milestone:g}")
    if sc.kind != "constant" and sc.min_lr > o.lr:
        raise ConfigError(f"schedule.min_lr ({sc.min_lr:g}) is above optim.lr ({o.lr:g}): the "
                          "decay would never decay")
    if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas!r}")


# --------------------------------------------------------------------------- public API


def from_dict(data: dict, *, source: str = "config") -> TrainingConfig:
    """Build and check a config from a plain dict; errors name ``source`` (usually the file)."""
    try:
        cfg = _build(TrainingConfig, data, "")
        _check_choices(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


def to_dict(cfg: TrainingConfig) -> dict:
    """The config as plain dicts/lists/scalars (what ``save_config`` and checkpoints store)."""
    data = dataclasses.asdict(cfg)
    data["pipeline"] = cfg.pipeline.to_dict()
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``'optim.lr=0.05'`` -> ``('optim.lr', 0.05)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    shown = text if len(text) <= 120 else text[:117] + "..."
    value = _load_yaml(raw, f"override '{shown}'") if raw.strip() else ""
    return key, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted ``key=value`` overrides to a raw config dict (returns a new dict).

    Validation happens when the result is built with ``from_dict``; a path through a typed
    section that does not exist is reported there with the full dotted key.
    """
    data = copy.deepcopy(data) if data else {}
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


# Bounds on a YAML document *after* alias expansion. A real config has a few hundred nodes;
# an "alias bomb" (anchors whose aliases nest: a: &a [x, x], b: &b [*a, *a], ...) is tiny on
# disk but expands to billions of nodes when the config is copied or saved.
MAX_YAML_NODES = 100_000
#: Largest config file read: a real one is a few KB.
MAX_CONFIG_BYTES = 4 * 2**20
MAX_YAML_DEPTH = 64


def _yaml_children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_yaml_size(root: yaml.Node) -> None:
    """Raise ``ValueError`` when ``root`` expands past the bounds or refers to itself.

    Iterative and memoised per node, so a shared (aliased) node is measured once however often
    it is used: the cost is linear in the document, not in its expansion.
    """
    open_marker = object()
    measured: dict[int, Any] = {}  # id(node) -> open_marker while inside it, then (size, depth)
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, closing = stack.pop()
        children = _yaml_children(node)
        if closing:
            size = 1 + sum(measured[id(c)][0] for c in children)
            depth = 1 + max((measured[id(c)][1] for c in children), default=0)
            if size > MAX_YAML_NODES:
                raise ValueError(f"expands to more than {MAX_YAML_NODES:,} values (through "
                                 f"aliases); a config is never that large")
            if depth > MAX_YAML_DEPTH:
                raise ValueError(f"nested more than {MAX_YAML_DEPTH} levels deep")
            measured[id(node)] = (size, depth)
            continue
        state = measured.get(id(node))
        if state is open_marker:  # reached again before it was closed: it contains itself
            raise ValueError("an alias refers to a node that contains it (a recursive structure)")
        if state is not None:
            continue
        measured[id(node)] = open_marker
        stack.append((node, True))
        stack.extend((child, False) for child in children)


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads exponent floats without a dot (``1e-3``, ``5E4``).

    YAML 1.1 resolves those to strings, so ``optim.lr: 1e-3`` would be refused as "expected a
    number" and a free-form ``head.params`` value would reach the constructor as text. YAML 1.2
    reads them as floats, as users expect; plain integers stay integers.
    """


_INT_TAG = "tag:yaml.org,2002:int"
# Integers as in YAML 1.2: ``010`` is ten, not YAML 1.1's octal eight (``train.seed=010`` was
# seed 8, ``val.folds: [08, 09, 010]`` read as ``["08", "09", 8]``), and ``1:30`` is text, not
# the sexagesimal 90. ``0o17``, ``0x1f`` (and ``0b101``, ``1_000``) still read as integers.
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _INT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(
    _INT_TAG,
    re.compile(r"^[-+]?(?:[0-9][0-9_]*|0x[0-9a-fA-F_]+|0o[0-7_]+|0b[01_]+)$"),
    list("-+0123456789"),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node)).replace("_", "")
    sign = -1 if text.startswith("-") else 1
    digits = text.lstrip("+-")
    for prefix, base in (("0x", 16), ("0o", 8), ("0b", 2)):
        if digits.startswith(prefix):
            return sign * int(digits[2:], base)
    try:
        return sign * int(digits, 10)
    except ValueError:
        raise yaml.constructor.ConstructorError(
            None, None, f"invalid integer {text!r}", node.start_mark) from None


_ConfigLoader.add_constructor(_INT_TAG, _construct_int)
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


class _ConfigDumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes exactly the text ``_ConfigLoader`` would read as a number.

    The plain dumper follows YAML 1.1, so the string ``"1e-3"`` or ``"08"`` was written
    unquoted and came back from ``config.yaml`` as the number 0.001 or 8.
    """


_ConfigDumper.yaml_implicit_resolvers = copy.deepcopy(_ConfigLoader.yaml_implicit_resolvers)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: the problem and where it is ("line 3, column 7").

    PyYAML's own text spans several lines, quotes the source as ``"<unicode string>"`` (the
    text was read first, through the bounded reader) and repeats the offending line.
    """
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    text = f"{context}, {problem}" if context else problem
    if mark is not None:
        return f"{text} (line {mark.line + 1}, column {mark.column + 1})"
    return text


def _load_yaml(text: str, where: str) -> Any:
    """Safe-load ``text`` (``_ConfigLoader``) with the size and depth bounds; ``ConfigError``
    names ``where``."""
    loader = _ConfigLoader(text)
    try:
        # Composing first gives the node graph with aliases still shared, so the bounds are
        # checked before anything is expanded; the checked graph is then constructed.
        root = loader.get_single_node()
        if root is None:
            return None
        _check_yaml_size(root)
        return loader.construct_document(root)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML: {_yaml_problem(exc)}") from None
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except RecursionError:  # the parser recurses once per nesting level
        raise ConfigError(f"{where}: YAML nested too deeply to be a config") from None
    finally:
        loader.dispose()


#: The configs shipped with the package (``configs/`` in the source tree links here).
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """``path`` itself when it exists, else a shipped config of that name (``qcface_r50`` or
    ``qcface_r50.yaml``), so ``qualiface train qcface_r50`` works from any directory."""
    path = Path(path)
    if path.exists() or path.parent != Path("."):
        return path
    shipped = SHIPPED_CONFIGS / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    return shipped if shipped.is_file() else path


def shipped_config_names() -> list[str]:
    """Names of the configs shipped with the package (for help texts and errors)."""
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


#: Keys naming input files or folders. A relative one is relative to the current directory,
#: except in a shipped config run from a project checkout (``project_root``): there it is
#: relative to the checkout, so ``qualiface train qcface_r50`` finds ``../shared/data`` from
#: any folder. ``check_data_paths`` checks that they exist before training starts.
DATA_PATH_KEYS = tuple(f"{section}.{key}" for section in ("data.params", "data.params.params")
                       for key in ("list_file", "root", "path")) + ("val.root", "val.pairs")


def project_root() -> Path | None:
    """The source checkout holding the shipped configs (``<root>/src/qualiface/configs``, with
    ``<root>/pyproject.toml``); None for an installed package."""
    root = SHIPPED_CONFIGS.parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def _data_paths(data: dict) -> list[tuple[dict, str, str]]:
    """``(section, key, dotted key)`` of every non-empty ``DATA_PATH_KEYS`` value in ``data``."""
    found = []
    for dotted in DATA_PATH_KEYS:
        *parents, key = dotted.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(key), str) and node[key]:
            found.append((node, key, dotted))
    return found


def check_data_paths(cfg: TrainingConfig, *, source: str = "config") -> None:
    """Raise ``ConfigError`` for a data path (``DATA_PATH_KEYS``) that does not exist, saying
    what a relative path was resolved against and which override fixes it."""
    data = to_dict(cfg)
    if cfg.val.kind != "pairs":
        data.pop("val")
    for node, key, dotted in _data_paths(data):
        path = Path(node[key])
        if path.exists() or path.with_name(path.name + ".rec").exists():  # RecordIO: a prefix
            continue
        where = "" if path.is_absolute() else f" (relative to the current directory, {Path.cwd()})"
        raise ConfigError(f"{source}: {dotted}: {path} not found{where}; point it at your data, "
                          f"e.g. {dotted}=/path/to/{path.name}")


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainingConfig:
    """Read a YAML config file (a path, or the name of a shipped config), apply ``key=value``
    overrides, validate types and choices."""
    path = resolve_config_path(path)
    # A device, a FIFO or a huge file is refused unread; every failure is a ConfigError.
    text = read_small_text_as(path, ConfigError, what="config", limit=MAX_CONFIG_BYTES,
                              missing=f"no such config file (shipped configs: "
                                      f"{', '.join(shipped_config_names())})")
    data = _load_yaml(text, str(path))
    if data is None:  # an empty or truncated file would silently train every default (IResNet-50)
        raise ConfigError(f"{path}: empty config (no keys); start from a shipped one, e.g. "
                          "configs/demo_nano.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    root = project_root()
    if root is not None and path.resolve().is_relative_to(SHIPPED_CONFIGS):
        for node, key, _dotted in _data_paths(data):  # shipped: relative to the checkout
            node[key] = os.path.normpath(root / node[key])
    source = str(path)
    if overrides:
        source += " (with overrides " + " ".join(overrides) + ")"
        data = apply_overrides(data, overrides)
    return from_dict(data, source=source)


def save_config(cfg: TrainingConfig, path: str | Path) -> None:
    """Write the config as YAML (every field, defaults included) so a run is reproducible."""
    Path(path).write_text(yaml.dump(to_dict(cfg), Dumper=_ConfigDumper, sort_keys=False))


def get_value(cfg: Any, dotted: str) -> Any:
    """``get_value(cfg, 'optim.lr')``."""
    node = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def check_params(factory: Any, params: dict, *, what: str, reserved: tuple[str, ...] = ()) -> None:
    """Check ``params`` keys against ``factory``'s signature (``reserved`` are set by the trainer).

    Raises ``ConfigError`` naming the first unknown or reserved key and listing the valid ones.
    """
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: nothing to check
        return
    parameters = signature.parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    valid = [
        name
        for name, p in parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and name not in reserved
        and name != "self"
    ]
    for key in params:
        if key in reserved:
            raise ConfigError(f"{what}: '{key}' is set by the trainer; remove it from the config")
        if key not in valid and not accepts_any:
            raise ConfigError(
                f"{what}: unknown parameter '{key}' (valid: {', '.join(valid) or 'none'})"
            )


def validate_components(cfg: TrainingConfig, *, source: str = "config") -> None:
    """Check registry names and free-form params against the real constructors.

    Imports the backbone, head and dataset families (torch), so it is separate from parsing.
    """
    load_backbones()
    load_heads()
    load_datasets()
    try:
        check_params(BACKBONES.get(cfg.model.backbone), cfg.model.params, what="model.params")
        check_params(
            HEADS.get(cfg.head.name),
            cfg.head.params,
            what=f"head.params ({cfg.head.name})",
            reserved=("embedding_size", "num_classes"),
        )
        check_params(DATASETS.get(cfg.data.name), cfg.data.params, what="data.params")
        build_method(cfg)  # pipeline.name must be "none" or the method of head.name
        _check_backbone_params(BACKBONES.get(cfg.model.backbone), cfg.model)
        _check_output_dir(cfg.train.output_dir)
    except (ConfigError, RegistryError, PipelineError) as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _check_backbone_params(factory: Any, model: ModelConfig) -> None:
    """Build the backbone on the meta device (no memory, milliseconds) and push one input of
    ``input_size`` through it, so a bad value fails here naming its key, not as a traceback
    from inside the constructor or the first forward pass.

    Only the constructor's own argument errors (``ValueError``/``TypeError``) and shape errors
    of the forward pass are reported; anything the meta device itself cannot do is left to the
    real build.
    """
    import torch  # lazy: torch (~1 s); parsing a config must not load it

    params = model.params

    def key_for(exc: Exception) -> str:
        named = [name for name in params if name in str(exc)]
        return f"model.params.{named[0]}" if named else "model.params"

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "initializing zero-element tensors"
            backbone = factory(**params)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key_for(exc)}: {exc} (backbone {model.backbone})") from None
    except Exception:  # the meta device cannot build it: the real build reports the problem
        return
    size = params.get("input_size")
    if not isinstance(size, int) or isinstance(size, bool):
        return
    try:
        with torch.device("meta"), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            backbone.eval()(torch.empty(2, 3, size, size))
    except NotImplementedError:  # an operator without a meta kernel: nothing learned
        return
    except (RuntimeError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model.params.input_size: {size} does not fit backbone "
                          f"{model.backbone} ({first_line})") from None


def _check_output_dir(output_dir: str) -> None:
    """``train.output_dir`` must be (or become) a folder: refuse a file such as ``/dev/null``
    or a path under one, before any training time is spent. An empty or blank value (an
    override ``train.output_dir=$OUT`` with ``OUT`` unset) is refused too: ``Path("")`` is the
    current folder, so the run's checkpoints, weights and report landed among whatever it
    holds (a source checkout)."""
    if not str(output_dir).strip():
        raise ConfigError("train.output_dir: is empty; name the folder the run writes to "
                          "(an empty value would write into the current folder)")
    path = Path(output_dir)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                what = ("exists and is not a directory" if candidate == path
                        else f"is under {candidate}, which is not a directory")
                raise ConfigError(f"train.output_dir: '{output_dir}' {what}")
            return
