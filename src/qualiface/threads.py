"""Torch intra-op thread control (the trainer's data decoding, the demo, ``--threads``) and the
number of data-loading processes a machine can use.

Kept in its own tiny module (torch only) so low-level code such as ``qualiface.train.data`` can
use it without importing the demo job.
"""

from __future__ import annotations

import contextlib
import os
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


def thread_option(count: int) -> contextlib.AbstractContextManager:
    """The ``--threads`` option of ``train`` and ``eval``: ``count`` torch intra-op threads for
    the block, or torch's own default (one per core) when ``count`` is 0."""
    return torch_threads(count) if count > 0 else contextlib.nullcontext()


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one (containers, taskset),
    else the machine's CPU count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def data_workers(requested: int) -> int:
    """Data-loading processes to start for ``requested``: at most one per available CPU (more
    only compete for the same cores, and torch's DataLoader warns about them)."""
    return max(0, min(requested, available_cpus()))
