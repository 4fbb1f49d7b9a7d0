"""Backbones, picked by name: ``build_backbone("iresnet50")``.

Contract: a backbone maps float input (B, 3, 112, 112) in [-1, 1] to a (B, embedding_size)
embedding; ``forward(x, return_features=True)`` returns ``(embedding, features)`` where
``features`` is the flattened pre-embedding feature map (B, feature_dim) that the EQFace quality
branch taps. Attributes: ``embedding_size``, ``feature_dim``, ``input_size``.

``build_backbone`` bounds the *total* size before allocating anything: each constructor argument
may be in range on its own (iresnet200, width 1024, input 1024) and still ask for hundreds of GB.
The network is first built on the ``meta`` device (shapes only, no memory) and one image is run
through it there; parameters and per-image activations above ``MAX_PARAMETERS`` /
``MAX_ACTIVATIONS`` raise :class:`BackboneSizeError`. Both limits are ~1 GiB in float32, above
every standard face backbone (iresnet200: 119M parameters, 49M activations per 112 px image).
"""

from __future__ import annotations

from qualiface.errors import QualifaceError
from qualiface.registry import Registry

BACKBONES: Registry = Registry("backbone")

#: Largest parameter count a backbone may have (float32 elements, 1 GiB).
MAX_PARAMETERS = 1 << 28
#: Largest sum of layer outputs for one image (float32 elements, 1 GiB).
MAX_ACTIVATIONS = 1 << 28


class BackboneSizeError(QualifaceError, ValueError):
    """A backbone whose parameters or activations exceed the limits (before it is built)."""


def backbone_size(name: str, **kwargs) -> tuple[int, int]:
    """``(parameters, activations per image)`` of ``build_backbone(name, **kwargs)``, measured on
    the ``meta`` device: exact, and nothing is allocated however large the request. Activations
are counted only for backbones with an ``input_size`` attribute (0 otherwise)."""
    import torch  # lazy: torch (~1 s); the config parser imports this registry and must not load torch

    _load_all()
    with torch.device("meta"):
        module = BACKBONES.build(name, **kwargs)
    parameters = sum(p.numel() for p in module.parameters())
    side = getattr(module, "input_size", None)
    if side is None:  # a backbone that does not say its input size: bound the parameters only
        return parameters, 0
    activations = 0

    def count(_module, _inputs, output) -> None:
        nonlocal activations
        activations += output.numel() if isinstance(output, torch.Tensor) else 0

    hooks = [m.register_forward_hook(count) for m in module.modules() if not list(m.children())]
    with torch.no_grad():
        module.eval()(torch.empty(1, 3, int(side), int(side), device="meta"))
    for hook in hooks:
        hook.remove()
    return parameters, activations


def build_backbone(name: str, **kwargs):
    """Build backbone ``name``; :class:`BackboneSizeError` first if it would be too large."""
    parameters, activations = backbone_size(name, **kwargs)
    if parameters > MAX_PARAMETERS or activations > MAX_ACTIVATIONS:
        given = ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items())) or "defaults"
        raise BackboneSizeError(
            f"backbone {name} ({given}) would have {parameters / 1e6:.0f}M parameters and "
            f"{activations / 1e6:.0f}M activations per image; the limits are "
            f"{MAX_PARAMETERS / 1e6:.0f}M each (~1 GiB in float32): lower base_width, "
            "width_mult or input_size"
        )
    return BACKBONES.build(name, **kwargs)


def _load_all() -> None:
    # Importing the modules registers them; done lazily so `import qualiface` stays cheap.
    from qualiface.backbones import iresnet, mobilefacenet  # noqa: F401  # lazy: the families import torch, and BACKBONES from here (cycle)
