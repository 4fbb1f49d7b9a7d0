"""Run a function on several local CPU ranks joined by a gloo group (multi-rank tests, CPU
debugging).

``launch_local(fn, world_size, args)`` starts ``world_size`` fresh (spawned) processes, gives each
the environment variables ``torchrun`` would, lets ``qualiface.train.distributed`` start the
process group and calls ``fn(info, *args)``. Every rank's return value (plain data, read back
with ``weights_only=True``) or its traceback comes back as a ``RankOutcome``; a rank that raises,
dies or hangs past ``timeout_s`` fails the run with ``DistributedError`` instead of a hang.
Training itself never uses this module (``torchrun`` launches real jobs).
"""

from __future__ import annotations

import io
import os
import pickle  # only for the error type of a refused payload; nothing is unpickled here
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as mp

from qualiface.train.distributed import DistInfo, DistributedError, cleanup, init_distributed


@dataclass
class RankOutcome:
    """How one rank of ``launch_local`` ended.

    ok: the function returned; value: what it returned (None unless ok); error: the formatted
    exception when it raised; exitcode: the process's exit code (None if it had to be killed).
    """

    rank: int
    ok: bool
    value: Any = None
    error: str | None = None
    exitcode: int | None = None


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _local_worker(fn, rank, world_size, port, args, results, collective_timeout_s) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        info = init_distributed(backend="gloo", timeout_s=collective_timeout_s)
        value = fn(info, *args)
        buffer = io.BytesIO()
        # torch.save rather than the queue's pickler: tensors sent through a multiprocessing
        # queue are shared by reference and vanish when this process exits.
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException as error:  # report everything, including SystemExit from the worker
        results.put((rank, False, "".join(traceback.format_exception(error)).rstrip()))
    finally:
        cleanup()


def _load_rank_result(payload: bytes) -> Any:
    """A rank's ``torch.save``d return value, read with ``weights_only=True``.

    The ranks are our own processes, but the weights-only reader keeps "nothing here unpickles
    code" true without exceptions; ``DistInfo`` is the one non-builtin type allowed in.
    """
    allowed = [DistInfo]
    if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5: scoped to this call
        with torch.serialization.safe_globals(allowed):
            return torch.load(io.BytesIO(payload), weights_only=True)
    torch.serialization.add_safe_globals(allowed)  # torch 2.4: process-wide, same harmless type
    return torch.load(io.BytesIO(payload), weights_only=True)


def launch_local(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    *,
    timeout_s: float = 120.0,
    collective_timeout_s: float = 60.0,
    raise_on_error: bool = True,
) -> list[RankOutcome]:
    """Run ``fn(info, *args)`` in ``world_size`` fresh CPU processes joined by a gloo group.

    Each process gets torchrun-style environment variables and calls ``init_distributed``
    (gloo, ``collective_timeout_s``); ``fn`` must be importable by module path (spawned
    processes re-import it) and return plain data that loads with ``weights_only=True``
    (tensors, numbers, strings, lists/tuples/dicts of them, ``DistInfo``); a rank returning
    anything else counts as failed. The whole run is
    bounded by ``timeout_s``: ranks still running then are terminated. Returns one
    ``RankOutcome`` per rank in rank order; with ``raise_on_error`` a rank that raised, crashed
    or timed out raises ``DistributedError`` carrying every failing rank's error.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    port = find_free_port()
    processes = [
        context.Process(
            target=_local_worker,
            args=(fn, rank, world_size, port, args, results, collective_timeout_s),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    reported: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout_s
    grace_until = None  # once every silent rank is dead, drain the queue a little longer
    while len(reported) < world_size and time.monotonic() < deadline:
        try:
            rank, ok, payload = results.get(timeout=0.2)
            reported[rank] = (ok, payload)
            continue
        except queue_module.Empty:
            pass
        # A rank that died without reporting (os._exit, segfault, OOM kill) never will.
        if all(rank in reported or not p.is_alive() for rank, p in enumerate(processes)):
            grace_until = grace_until or time.monotonic() + 1.0
            if time.monotonic() > grace_until:
                break
    outcomes = []
    for rank, process in enumerate(processes):
        process.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
        if process.is_alive():
            process.terminate()
            process.join(5.0)
            exitcode = None
        else:
            exitcode = process.exitcode
        if rank in reported:
            ok, payload = reported[rank]
            if ok:
                try:
                    value = _load_rank_result(payload)
                except pickle.UnpicklingError as error:
                    # torch's message is a page of advice to load with weights_only=False;
                    # keep only the line that names the refused type.
                    text = str(error)
                    reason = next((line.strip() for line in text.splitlines()
                                   if "WeightsUnpickler error" in line), text)
                    message = (f"returned a value that is not plain data (tensors, numbers, "
                               f"strings, containers, DistInfo): {reason.split('. Please')[0]}")
                    outcomes.append(RankOutcome(rank, False, None, message, exitcode))
                else:
                    outcomes.append(RankOutcome(rank, True, value, None, exitcode))
            else:
                outcomes.append(RankOutcome(rank, False, None, payload, exitcode))
        elif exitcode is None:
            outcomes.append(RankOutcome(rank, False, None, f"timed out after {timeout_s:g} s"))
        else:
            message = f"exited with code {exitcode} without a result"
            outcomes.append(RankOutcome(rank, False, None, message, exitcode))
    failed = [outcome for outcome in outcomes if not outcome.ok]
    if failed and raise_on_error:
        details = "\n".join(f"--- rank {o.rank}: {o.error}" for o in failed)
        raise DistributedError(f"{len(failed)} of {world_size} local rank(s) failed:\n{details}")
    return outcomes
