"""Torch intra-op thread control shared by the trainer's data decoding and the demo.

Kept in its own tiny module (torch only) so low-level code such as ``qualiface.train.data`` can
use it without importing the demo job.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Set torch's intra-op thread count to ``count`` (>= 1) for the block, then restore it.

    Used for work made of many tiny tensor ops (per-image decoding, rendering, a nano network
    on a busy CPU), where OpenMP threads spin-waiting at barriers cost far more than they give.
    """
    if count < 1:
        raise ValueError(f"torch thread count must be >= 1, got {count}")
    previous = torch.get_num_threads()
    if count == previous:  # nothing to change, nothing to restore
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
