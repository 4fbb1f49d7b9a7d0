"""Process-group setup and autograd-aware collectives for multi-GPU / multi-node training.

``init_distributed`` reads the environment variables that ``torchrun`` sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and starts a process group:
NCCL when CUDA is available, gloo otherwise. Without those variables it returns a
single-process ``DistInfo`` and every helper below degrades to the identity, so the same
training code runs unchanged on a laptop and on a cluster.

The collectives come in two kinds:

* autograd-aware ones used *inside* the loss: ``all_gather_with_grad`` (the sharded classifier
  gathers every rank's embeddings) and ``DistributedReducer`` (the class-axis reductions of a
  head, see ``qualiface.heads.base``). Their backward passes are the exact adjoints of their
  forward passes, so the gradient that reaches each rank is the derivative of the *sum over
  ranks* of whatever each rank back-propagates (the usual PyTorch convention).
* plain ones for bookkeeping: ``all_reduce_mean`` (metrics), ``broadcast_object``, ``barrier``.

Fault handling: every collective is bounded by the process group's timeout (``timeout_s``).
With gloo, a peer that exits closes its sockets and the survivors' next collective fails at
once, and a peer that hangs makes them fail when the timeout expires; either way they raise
``DistributedError`` with the rank, the operation and the cause instead of blocking forever.
With NCCL, collectives run asynchronously on the GPU, so the per-process watchdog enforces the
timeout: we default ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` (abort the communicator and tear the
process down on error or timeout), after which ``torchrun`` stops the remaining workers.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from qualiface.errors import QualifaceError
from qualiface.heads.base import ClassReducer

_T = TypeVar("_T")

#: PyTorch's default process-group timeout (gloo); long enough for a slow first CUDA/NCCL
#: initialisation or a long checkpoint write on rank 0 while the others wait in a barrier.
DEFAULT_TIMEOUT_S = 1800.0

_REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(QualifaceError, RuntimeError):
    """A process group could not be started, or a collective failed (peer died or timed out)."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    rank:           global rank in [0, world_size).
    world_size:     number of processes in the job (1 without a process group).
    local_rank:     rank on this node; selects the GPU.
    device:         the device this process computes on (``cuda:<local_rank>`` or ``cpu``).
    is_distributed: a process group is running (collectives do real communication).
    is_main:        rank 0: the process that logs, evaluates and writes checkpoints.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_distributed: bool
    is_main: bool


def _env_int(name: str) -> int:
    raw = os.environ[name]
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def _single_process_info() -> DistInfo:
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return DistInfo(0, 1, 0, device, is_distributed=False, is_main=True)


def current_info() -> DistInfo:
    """The ``DistInfo`` of the running process group, or the single-process one."""
    if not (dist.is_available() and dist.is_initialized()):
        return _single_process_info()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world_size, local_rank, device, True, rank == 0)


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Start the process group described by torchrun's environment variables.

    backend:   ``"nccl"``, ``"gloo"`` or None (NCCL when CUDA is available, else gloo).
    timeout_s: seconds any collective (and the rendezvous) may wait for a peer before this
               process fails with an error instead of hanging.

    Without ``RANK``/``WORLD_SIZE`` in the environment no group is started and the returned
    info describes one process. Calling it again once a group is running returns that group.
    NCCL places this process on ``cuda:<LOCAL_RANK>``; gloo computes on the CPU.
    """
    if dist.is_available() and dist.is_initialized():
        return current_info()
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return _single_process_info()
    missing = [name for name in _REQUIRED_ENV if name not in os.environ]
    if missing:
        raise DistributedError(
            "incomplete distributed environment: missing " + ", ".join(missing)
            + " (launch with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR "
            "and MASTER_PORT)"
        )
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed support")
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    backend = backend.lower()
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise DistributedError("backend 'nccl' needs CUDA, which is not available here")
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible"
            )
        # Without async error handling a dead peer leaves NCCL kernels spinning forever;
        # 1 = abort the communicator and end this process when a collective errors or times out.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif backend == "gloo":
        device = torch.device("cpu")
    else:
        raise DistributedError(f"unknown backend {backend!r}; use 'nccl' or 'gloo'")

    try:
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    except Exception as error:  # rendezvous failures come as several exception types
        raise DistributedError(
            f"rank {rank}/{world_size} could not join the process group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout_s:g} s: "
            f"{error}"
        ) from error
    return DistInfo(rank, world_size, local_rank, device, True, rank == 0)


def cleanup() -> None:
    """Destroy the process group if one is running (safe to call more than once)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _multi_rank() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def guarded_collective(name: str, operation: Callable[[], _T]) -> _T:
    """Run ``operation`` (one collective called ``name``), turning backend errors (a dead peer,
    a timeout) into a ``DistributedError`` that names the rank and the operation."""
    try:
        return operation()
    except DistributedError:
        raise
    except RuntimeError as error:  # DistBackendError, gloo "Connection closed", timeouts
        rank = dist.get_rank() if dist.is_initialized() else "?"
        world = dist.get_world_size() if dist.is_initialized() else "?"
        raise DistributedError(
            f"{name} failed on rank {rank} of {world}: a peer rank probably exited or stopped "
            f"responding within the process-group timeout ({error.__class__.__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no message'})"
        ) from error


def _all_reduce_(tensor: torch.Tensor, op: Any, group: Any, name: str) -> None:
    """In-place all-reduce of ``tensor`` with ``op``, with errors turned into DistributedError."""
    guarded_collective(name, lambda: dist.all_reduce(tensor, op=op, group=group))


def _gather_list(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    guarded_collective("all_gather", lambda: dist.all_gather(parts, tensor, group=group))
    return parts


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate equal-sized tensors from all ranks along dim 0; backward keeps our slice.

    Every rank's loss depends on the gathered tensor, so the gradient of the (summed) objective
    w.r.t. this rank's input is the sum over ranks of the gradient of their copy, restricted to
    the rows this rank contributed: a reduce-scatter.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        ctx.rows = tensor.shape[0]
        return torch.cat(_gather_list(tensor.contiguous(), group), dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_output = grad_output.contiguous()
        group, rows = ctx.group, ctx.rows
        rank = dist.get_rank(group)
        if dist.get_backend(group) == "nccl":
            grad = grad_output.new_empty((rows, *grad_output.shape[1:]))
            guarded_collective(
                "reduce_scatter",
                lambda: dist.reduce_scatter_tensor(grad, grad_output, group=group),
            )
            return grad, None
        # gloo has no reduce-scatter: sum the whole gradient and keep our rows.
        summed = grad_output.clone()
        _all_reduce_(summed, dist.ReduceOp.SUM, group, "all_reduce (all_gather backward)")
        return summed[rank * rows : (rank + 1) * rows], None


def all_gather_with_grad(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Concatenate ``tensor`` (B, ...) from every rank in rank order: (W*B, ...).

    All ranks must pass the same shape. The backward pass returns, for this rank's input, the
    sum over ranks of the gradient of rows [rank*B, (rank+1)*B) (the same semantics as
    ``torch.distributed.nn.functional.all_gather``, with one reduce-scatter on NCCL and one
    all-reduce on gloo). Without a process group it returns ``tensor`` unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)


def all_gather_no_grad(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Concatenate ``tensor`` (B, ...) from every rank along dim 0, outside autograd."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return tensor
    return torch.cat(_gather_list(tensor.detach().contiguous(), group), dim=0)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the adjoint of a sum broadcast to every rank is again a sum over ranks."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        _all_reduce_(out, dist.ReduceOp.SUM, group, "all_reduce(sum)")
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = grad_output.clone()
        _all_reduce_(grad, dist.ReduceOp.SUM, ctx.group, "all_reduce(sum) backward")
        return grad, None


class DistributedReducer(ClassReducer):
    """Class-axis reductions across the ranks that each hold a shard of the class centres.

    ``sum`` is an all-reduce SUM whose backward is an all-reduce SUM of the incoming gradient
    (exact for the objective "sum over ranks of each rank's loss"); ``max`` is an all-reduce MAX
    of a detached copy (it only stabilises exponentials, so it carries no gradient). Every rank
    must call them in the same order with tensors of the same shape.
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group

    def _active(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self._active():
            return tensor
        return _AllReduceSum.apply(tensor, self.group)

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self._active():
            return tensor.detach()
        out = tensor.detach().clone()
        _all_reduce_(out, dist.ReduceOp.MAX, self.group, "all_reduce(max)")
        return out


def all_reduce_mean(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (a new, detached tensor; for logging metrics)."""
    out = tensor.detach().clone()
    if not _multi_rank():
        return out
    if not out.is_floating_point():
        out = out.double()
    _all_reduce_(out, dist.ReduceOp.SUM, group, "all_reduce(mean)")
    return out / dist.get_world_size(group)


def clip_grad_norm_(
    parameters, max_norm: float, *, sharded=(), norm_type: float = 2.0, group: Any = None
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a model whose parameters are partly sharded.

    parameters: every parameter being clipped (an iterable of tensors).
    sharded:    those among them that hold a *different slice* on each rank (e.g.
                ``ShardedHead.sharded_parameters()``); their contributions are combined over
                ranks (sum of squares for the 2-norm, max for ``inf``). All others are taken as
                replicated: identical on every rank, as DDP leaves the backbone's gradients.

    Returns the total norm (a 0-d tensor), the same on every rank, which is the norm of the
    whole unsharded model's gradient; every rank therefore applies the same clip coefficient.
    Without a process group this is ``torch.nn.utils.clip_grad_norm_``.
    """
    parameters = [p for p in parameters if p.grad is not None]
    sharded_ids = {id(p) for p in sharded}
    if not _multi_rank() or not sharded_ids:
        if not parameters:
            return torch.zeros(())
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type=norm_type)
    if norm_type not in (2.0, float("inf")):
        raise ValueError(f"sharded gradient clipping supports norm_type 2 or inf, got {norm_type}")
    device = parameters[0].grad.device if parameters else torch.device("cpu")
    local = [p.grad.detach() for p in parameters if id(p) in sharded_ids]
    replicated = [p.grad.detach() for p in parameters if id(p) not in sharded_ids]

    def norm_of(grads: list[torch.Tensor]) -> torch.Tensor:
        if not grads:
            return torch.zeros((), device=device, dtype=torch.float64)
        norms = torch.stack([torch.linalg.vector_norm(g, norm_type).double() for g in grads])
        return norms.max() if norm_type == float("inf") else norms.square().sum()

    # Ranks without sharded parameters with a gradient must still join the collective.
    shard_part = norm_of(local).to(device)
    if norm_type == float("inf"):
        _all_reduce_(shard_part, dist.ReduceOp.MAX, group, "all_reduce(grad norm)")
        total = torch.maximum(shard_part, norm_of(replicated).to(device))
    else:
        _all_reduce_(shard_part, dist.ReduceOp.SUM, group, "all_reduce(grad norm)")
        total = (shard_part + norm_of(replicated).to(device)).sqrt()
    coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in parameters:
        p.grad.detach().mul_(coefficient.to(p.grad.dtype))
    return total.float()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is set on any rank (all ranks must then act alike, e.g. on SIGTERM)."""
    if not _multi_rank():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    _all_reduce_(t, dist.ReduceOp.MAX, None, "all_reduce(any rank)")
    return bool(t.item() > 0)


def all_ranks_true(flags: torch.Tensor, device: torch.device) -> list[bool]:
    """Per entry of the bool vector ``flags``: True when it is True on every rank. Reads the
    device once (after one all-reduce when distributed): the training step's one host sync."""
    if _multi_rank():
        flags = flags.to(device=device, dtype=torch.float32)
        _all_reduce_(flags, dist.ReduceOp.MIN, None, "all_reduce(all ranks)")
    return [bool(v) for v in flags.tolist()]


def no_sync_unless(last: bool, model: torch.nn.Module):
    """DDP's ``no_sync`` (gradients accumulate locally) except on the ``last`` micro-batch of a
    step, whose backward all-reduces them; a plain context for a model that is not DDP."""
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def broadcast_object(obj: _T, src: int = 0, group: Any = None) -> _T:
    """Return ``src``'s ``obj`` on every rank (any picklable object; e.g. a run directory)."""
    if not _multi_rank():
        return obj
    holder = [obj]
    guarded_collective(
        "broadcast_object", lambda: dist.broadcast_object_list(holder, src=src, group=group)
    )
    return holder[0]


def barrier(group: Any = None) -> None:
    """Wait until every rank reaches this point (no-op in a single process)."""
    if _multi_rank():
        guarded_collective("barrier", lambda: dist.barrier(group=group))


#: The local multi-process launcher moved to ``qualiface.train.local_launch``; these names stay
#: importable from here. Loaded on first use: that module imports this one.
_MOVED_TO_LOCAL_LAUNCH = ("RankOutcome", "find_free_port", "launch_local")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_LOCAL_LAUNCH:
        from qualiface.train import local_launch  # lazy: local_launch imports this module (cycle)

        return getattr(local_launch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
