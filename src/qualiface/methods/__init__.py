"""Training methods, one file each (``plain``, ``qcface``, ``eqface``, ``qgface``), picked by name.

A method class (``methods.base.Method``) registers itself under every head name it trains::

    @METHODS.register("qcface", "qcface-cur", "qcface-mv")
    class QCFaceMethod(Method): ...

``build_method(cfg)`` picks the method of ``cfg.head.name`` (a head with no method of its own
trains as the plain one-phase method) and checks ``cfg.pipeline.name`` against it.
``method_options()`` maps each method's config section name to its options dataclass; the
config parser uses it to read ``pipeline.<name>`` sections.

Adding a method: one module in this package (it is imported by ``_load_all``, which loads every
module here), plus its head in ``qualiface.heads`` when it brings new loss maths.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from qualiface.methods.base import Method, MethodContext, Phase, PipelineError
from qualiface.registry import Registry

METHODS: Registry = Registry("method")

__all__ = ["METHODS", "Method", "MethodContext", "Phase", "PipelineError", "build_method",
           "method_options", "options_section"]


def _load_all() -> None:
    # Importing a module registers its methods; every module of this package is a method file.
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


def method_classes() -> dict[str, type[Method]]:
    """``{method name: class}`` of every registered method (aliases folded)."""
    _load_all()
    classes: dict[str, type[Method]] = {}
    for key in METHODS.names():
        cls = METHODS.get(key)
        classes.setdefault(cls.name, cls)
    return classes


def options_section(head_name: str) -> str | None:
    """The ``pipeline.<name>`` section the method of head ``head_name`` reads its options from
    (whether or not its schedule runs: QGFace's degradation preset applies either way); None
    for a head whose method has no options."""
    _load_all()
    cls = METHODS.get(head_name) if head_name in METHODS else Method
    return cls.name if cls.Config is not None else None


def method_options() -> dict[str, type]:
    """``{section name: options dataclass}`` for every method that has options, by name."""
    return {name: cls.Config for name, cls in sorted(method_classes().items()) if cls.Config is not None}


def build_method(cfg) -> Method:
    """The method for ``cfg.head.name`` with its options from ``cfg.pipeline.<name>``.

    ``PipelineError`` when ``cfg.pipeline.name`` names another method's schedule.
    """
    _load_all()
    head = cfg.head.name
    cls = METHODS.get(head) if head in METHODS else Method
    wanted = cfg.pipeline.name
    if wanted not in ("none", cls.name):
        family = method_classes().get(wanted)
        heads = ", ".join(family.heads) if family is not None else "(none)"
        raise PipelineError(f"pipeline {wanted} needs the {wanted} head ({heads}), not {head}")
    read = cls.name if cls.Config is not None else None  # the section options_section names
    _refuse_unread_options(cfg.pipeline, read, head)
    base = Phase("train", cfg.train.epochs, cfg.train.steps, cfg.optim.lr)
    options = getattr(cfg.pipeline, read, None) if read else None
    return cls(head, base=base, options=options, scheduled=wanted == cls.name)


def _refuse_unread_options(pipeline, read: str | None, head: str) -> None:
    """``PipelineError`` for an option set (away from its default) in a ``pipeline.<section>``
    that the method of ``head`` does not read: ``pipeline.eqface.branch_epochs=8`` beside
    ``head.name=arcface`` would otherwise be accepted and have no effect at all."""
    for section, options in pipeline.sections().items():
        if section == read:
            continue
        defaults = type(options)()
        for option in dataclasses.fields(options):
            value = getattr(options, option.name)
            if value != getattr(defaults, option.name):
                readers = ", ".join(method_classes()[section].heads)
                raise PipelineError(
                    f"pipeline.{section}.{option.name} is set ({value!r}) but head {head} does not read "
                    f"the {section} options (heads that do: {readers}); remove it, or pick one of those heads")
