"""Numeric precision: which dtype the forward pass runs in, and the fp16 gradient scaler.

``auto`` means bf16 autocast on a CUDA device that supports it (no loss scaling needed: bf16
has fp32's exponent range), fp32 elsewhere. fp16 autocast is available on CUDA with a
``GradScaler``. On CPU, fp32 is the default; bf16 may be asked for explicitly.
"""

from __future__ import annotations

import contextlib
import os

import torch

from qualiface.errors import QualifaceError


class PrecisionError(QualifaceError, ValueError):
    """A precision that the device cannot run."""


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto|fp32|bf16|fp16`` -> the concrete ``fp32|bf16|fp16`` for ``device``."""
    if requested == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise PrecisionError("precision fp16 needs a CUDA device (use fp32 or bf16 on CPU)")
    if requested not in ("fp32", "bf16", "fp16"):
        raise PrecisionError(f"unknown precision '{requested}' (auto, fp32, bf16, fp16)")
    return requested


def autocast(device: torch.device, precision: str):
    """Context manager for the forward pass (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (its state is checkpointed either way)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def configure_kernels(device: torch.device, deterministic: bool) -> None:
    """Choose between repeatable and fastest GPU kernels (process-wide torch settings).

    deterministic: ``torch.use_deterministic_algorithms`` (ops without a deterministic kernel
    raise instead of silently varying), cuDNN deterministic without autotuning, and the cuBLAS
    workspace setting that makes its reductions repeatable. Otherwise, on CUDA, cuDNN autotunes
    (``benchmark``): the fixed 112x112 input makes the one-off search pay for itself.
    TF32 matmuls are allowed unless deterministic runs ask for full fp32.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return
    torch.use_deterministic_algorithms(False)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
