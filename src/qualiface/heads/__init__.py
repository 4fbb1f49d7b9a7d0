"""Classification heads (identity losses + quality scores), picked by name.

``build_head("qcface", embedding_size=512, num_classes=10575, lambda_g=1.0)`` builds a head;
every constant of a method is a constructor parameter with the paper's default.

Forward contract (all heads)::

    head(embeddings, labels, *, weight=None, local_labels=None, class_ids=None,
         reducer=LOCAL, features=None, second_view=None) -> HeadOutput

* ``embeddings`` (B, D) unnormalised, ``labels`` (B,) global int64 class ids.
* ``weight`` (C_sub, D) optional subset of centres (a shard); ``local_labels`` (B,) row of each
  label in it or -1; ``class_ids`` (C_sub,) global id per row. Defaults: all classes.
* ``reducer`` sums / maxes over class shards (see ``heads.base``).
* ``features`` (B, F) backbone features, needed when ``head.requires_features`` (EQFace).
* ``second_view`` (B, D) embeddings of a degraded view, needed when
  ``head.requires_second_view`` (QGFace).

``head.quality_estimator()`` returns the inference-time quality module (``heads.quality``).
"""

from __future__ import annotations

import inspect

from qualiface.registry import Registry

HEADS: Registry = Registry("head")


def build_head(name: str, embedding_size: int, num_classes: int, **params):
    """Build head ``name`` for ``num_classes`` classes of ``embedding_size``-d embeddings.

    Unknown parameter names raise ValueError listing the head's parameters.
    """
    _load_all()
    factory = HEADS.get(name)
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        known = ", ".join(p for p in accepted if p not in ("embedding_size", "num_classes"))
        raise ValueError(f"head '{name}' has no parameter(s) {', '.join(unknown)}; "
                         f"its parameters are: {known}")
    missing = [
        p.name for p in accepted.values()
        if p.default is inspect.Parameter.empty
        and p.name not in ("embedding_size", "num_classes", *params)
    ]
    if missing:
        raise ValueError(f"head '{name}' needs parameter(s) {', '.join(missing)}")
    return factory(embedding_size=embedding_size, num_classes=num_classes, **params)


def _load_all() -> None:
    # Importing the modules registers them; lazy so `import qualiface.heads` stays cheap.
    from qualiface.heads import (  # noqa: F401  # lazy: head modules import torch, and HEADS from here (cycle)
        adaface,
        curricular,
        eqface,
        magface,
        margins,
        mv_softmax,
        qcface,
        qgface,
    )
