"""Weights against the architecture: names, shapes, dtypes and finiteness of package tensors.

Used when a package is loaded (``qualiface.infer.model.Model.load``): every check raises
:class:`~qualiface.package.format.ModelPackageError` naming the file and the tensor, before a
broken tensor can turn into NaN or identical embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

from qualiface.package.format import ModelPackageError


def input_size_problem(backbone: nn.Module, input_size) -> str | None:
    """Why ``input_size`` (H, W) does not suit ``backbone``, or None when it does.

    Backbones that end in a fixed-size FC layer say the square side they are built for
    (``backbone.input_size``). Stride-2 convolutions round, so a smaller input can still reach
    that layer with the right shape: the network would run, silently, on images it was never
    built for. Both the package writer and the loader refuse such a pair, each with its error.
    """
    side = getattr(backbone, "input_size", None)
    if isinstance(side, int) and (int(input_size[0]), int(input_size[1])) != (side, side):
        return (f"input size {[int(input_size[0]), int(input_size[1])]} disagrees with the "
                f"backbone, which is built for {side}x{side} input")
    return None


def load_into(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, source: str) -> None:
    """Strict load with errors that say which tensor is missing, extra or mis-shaped."""
    expected = module.state_dict()
    given = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing or extra:
        details = []
        if missing:
            details.append(f"missing {len(missing)} (first: {prefix}{missing[0]})")
        if extra:
            details.append(f"unexpected {len(extra)} (first: {prefix}{extra[0]})")
        raise ModelPackageError(f"{source}: tensors do not match the architecture: {'; '.join(details)}")
    for key, value in expected.items():
        if tuple(given[key].shape) != tuple(value.shape):
            raise ModelPackageError(
                f"{source}: tensor '{prefix}{key}' has shape {tuple(given[key].shape)}, "
                f"the architecture expects {tuple(value.shape)}"
            )
    check_dtypes(module, given, prefix, source)
    module.load_state_dict(given, strict=True)


def check_dtypes(module: nn.Module, given: dict[str, torch.Tensor], prefix: str, source: str) -> None:
    """Each tensor's dtype must suit the architecture's: a float parameter needs float data.

    ``load_state_dict`` silently casts, so float32 bytes relabelled I32 in the safetensors
    header (same size, so the header still checks out) would load as huge integers and give
    NaN or identical embeddings. Float widths may differ (a float16 package loads into float32);
    integer buffers (BatchNorm's step counter) need integer data.
    """
    for key, value in module.state_dict().items():
        tensor = given.get(key)
        if tensor is None:
            continue
        if value.is_floating_point():
            fits = tensor.is_floating_point()
        else:
            fits = tensor.dtype == value.dtype or (
                not tensor.is_floating_point() and not tensor.is_complex()
                and tensor.dtype != torch.bool and value.dtype != torch.bool)
        if not fits:
            raise ModelPackageError(f"{source}: tensor '{prefix}{key}' has dtype "
                                    f"{str(tensor.dtype).removeprefix('torch.')}, the architecture "
                                    f"expects {str(value.dtype).removeprefix('torch.')}")


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN/Inf (a flipped exponent bit, a diverged run), naming the tensor."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelPackageError(f"{source}: tensor '{key}' holds NaN or Inf values")
