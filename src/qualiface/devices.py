"""A user's device name (a CLI ``--device``, the ``train.device`` key) as a ``torch.device``.

One check for every entry point, because torch's own errors are poor at the edges a user hits:
``torch.device("gpu")`` raises a RuntimeError listing twenty device types, ``cuda`` on a machine
without CUDA fails only at the first ``.to()`` deep inside a command, and ``cuda:3`` on a
one-GPU machine fails there with "invalid device ordinal". Callers prefix the message with the
option or key it came from and raise their own family's error.
"""

from __future__ import annotations

import torch

from qualiface.errors import QualifaceError


class DeviceError(QualifaceError, ValueError):
    """A device name that is not one, or names hardware this machine does not have; ``str`` is
    the problem without the option's name (``'gpu' is not a device name (...)``)."""


def parse_device(name: str | torch.device) -> torch.device:
    """``name`` as a ``torch.device`` that exists here; ``DeviceError`` otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"'{name}' is not a device name (use cpu, cuda or cuda:<index>)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"'{name}' requested but CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"'{name}' requested but this machine has {count} CUDA device"
                              f"{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})")
    return device
