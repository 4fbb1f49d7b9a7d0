"""Process-group setup and the autograd-aware collectives of ``qualiface.train.distributed``.

Multi-rank tests run 2 CPU processes on gloo through ``launch_local``; the gradients they
report are checked against closed-form sums computed here in the parent process.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from qualiface.train import distributed as qd
from qualiface.train.distributed import DistributedError, DistributedReducer
from qualiface.train.local_launch import launch_local

WORLD = 2
ROWS, DIM = 3, 4


def _inputs(rank: int) -> torch.Tensor:
    # Rank-specific local rows, reproducible in the parent for the reference computation.
    return torch.arange(ROWS * DIM, dtype=torch.float64).reshape(ROWS, DIM) / 7.0 + 10.0 * rank


def _coefficients(rank: int) -> torch.Tensor:
    # A rank-dependent linear loss on the gathered (WORLD*ROWS, DIM) tensor.
    generator = torch.Generator().manual_seed(100 + rank)
    return torch.randn(WORLD * ROWS, DIM, generator=generator, dtype=torch.float64)


def _collectives_worker(info: qd.DistInfo) -> dict:
    """Everything the 2-rank collective test needs, in one process-group start."""
    import torch.distributed.nn.functional as torch_dist_fn

    out: dict = {"info": info, "current": qd.current_info()}
    x = _inputs(info.rank).requires_grad_(True)
    gathered = qd.all_gather_with_grad(x)
    out["gathered"] = gathered.detach().clone()
    (gathered * _coefficients(info.rank)).sum().backward()
    out["grad"] = x.grad.clone()

    # PyTorch's own autograd all_gather, for the same loss.
    y = _inputs(info.rank).requires_grad_(True)
    parts = torch_dist_fn.all_gather(y)
    (torch.cat(parts) * _coefficients(info.rank)).sum().backward()
    out["torch_grad"] = y.grad.clone()

    reducer = DistributedReducer()
    v = torch.full((2,), float(info.rank + 1), dtype=torch.float64, requires_grad=True)
    summed = reducer.sum(v)
    out["sum"] = summed.detach().clone()
    # d/dv_r of sum_ranks c_rank * (v_0 + v_1) is c_0 + c_1 on both ranks.
    (summed * float(info.rank + 2)).sum().backward()
    out["sum_grad"] = v.grad.clone()
    m = torch.tensor([float(info.rank), 5.0 - info.rank], requires_grad=True)
    maxed = reducer.max(m)
    out["max"] = maxed.clone()
    out["max_requires_grad"] = maxed.requires_grad

    out["mean"] = qd.all_reduce_mean(torch.tensor([float(info.rank), 2.0 * info.rank]))
    out["mean_int"] = qd.all_reduce_mean(torch.tensor(info.rank + 1))
    out["broadcast"] = qd.broadcast_object({"run": f"from-rank-{info.rank}"}, src=1)
    qd.barrier()
    return out


def _raising_worker(info: qd.DistInfo) -> None:
    if info.rank == 1:
        raise ValueError("worker failure on purpose")


def _dying_peer_worker(info: qd.DistInfo, flag_dir: str) -> dict:
    """Rank 1 vanishes without warning; rank 0 must fail its next collective, not hang."""
    qd.barrier()  # both ranks are up and connected
    if info.rank == 1:
        os._exit(3)
    time.sleep(0.5)  # let the peer's sockets close
    started = time.monotonic()
    try:
        qd.all_reduce_mean(torch.ones(4))
    except DistributedError as error:
        return {"message": str(error), "seconds": time.monotonic() - started}
    return {"message": None, "seconds": time.monotonic() - started}


def _hanging_peer_worker(info: qd.DistInfo, flag_dir: str) -> dict | None:
    """Rank 1 stays alive but never joins the collective: rank 0 fails at the timeout."""
    flag = Path(flag_dir) / "rank0-done"
    qd.barrier()
    if info.rank == 1:
        deadline = time.monotonic() + 30.0
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os._exit(0)  # leave without the goodbye collectives of a clean shutdown
    started = time.monotonic()
    try:
        summed = DistributedReducer().sum(torch.ones(3))
        result = {"message": None, "value": summed}
    except DistributedError as error:
        result = {"message": str(error)}
    result["seconds"] = time.monotonic() - started
    flag.touch()
    return result


# -- single process ------------------------------------------------------------------------


@pytest.fixture
def no_dist_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_without_env_vars(no_dist_env):
    info = qd.init_distributed()
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert not info.is_distributed and info.is_main
    assert info.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert qd.current_info() == info
    qd.cleanup()  # nothing to destroy: must not raise


def test_helpers_are_identities_in_one_process(no_dist_env):
    x = torch.randn(3, 2, requires_grad=True)
    assert qd.all_gather_with_grad(x) is x
    assert torch.equal(qd.all_gather_no_grad(x), x)
    reducer = DistributedReducer()
    assert torch.equal(reducer.sum(x), x)
    assert reducer.sum(x).requires_grad
    assert not reducer.max(x).requires_grad
    assert torch.equal(qd.all_reduce_mean(torch.tensor([1.0, 3.0])), torch.tensor([1.0, 3.0]))
    assert qd.broadcast_object({"a": 1}) == {"a": 1}
    qd.barrier()


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, "missing MASTER_ADDR, MASTER_PORT"),
        ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK='x'"),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "outside"),
    ],
)
def test_bad_environment_is_a_clear_error(no_dist_env, env, message):
    for name, value in env.items():
        no_dist_env.setenv(name, value)
    with pytest.raises(DistributedError, match=message):
        qd.init_distributed()


def test_bad_backend_is_a_clear_error(no_dist_env):
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "1"}.items():
        no_dist_env.setenv(name, value)
    with pytest.raises(DistributedError, match="unknown backend 'mpi2'"):
        qd.init_distributed(backend="mpi2")
    if not torch.cuda.is_available():
        with pytest.raises(DistributedError, match="needs CUDA"):
            qd.init_distributed(backend="nccl")


# -- two ranks -----------------------------------------------------------------------------


def test_collectives_on_two_ranks():
    outcomes = launch_local(_collectives_worker, WORLD, timeout_s=90, collective_timeout_s=30)
    results = [outcome.value for outcome in outcomes]
    everything = torch.cat([_inputs(rank) for rank in range(WORLD)])
    coefficient_sum = sum(_coefficients(rank) for rank in range(WORLD))
    for rank, out in enumerate(results):
        info = out["info"]
        assert (info.rank, info.world_size, info.is_distributed) == (rank, WORLD, True)
        assert info.is_main == (rank == 0) and info.device == torch.device("cpu")
        assert out["current"] == info
        assert torch.equal(out["gathered"], everything)
        # Gradient of sum_r <gathered, c_r> w.r.t. this rank's rows: the sum of the c_r slices.
        expected = coefficient_sum[rank * ROWS : (rank + 1) * ROWS]
        torch.testing.assert_close(out["grad"], expected)
        torch.testing.assert_close(out["torch_grad"], out["grad"])
        torch.testing.assert_close(out["sum"], torch.full((2,), 3.0, dtype=torch.float64))
        torch.testing.assert_close(out["sum_grad"], torch.full((2,), 5.0, dtype=torch.float64))
        assert torch.equal(out["max"], torch.tensor([1.0, 5.0]))
        assert not out["max_requires_grad"]
        torch.testing.assert_close(out["mean"], torch.tensor([0.5, 1.0]))
        torch.testing.assert_close(out["mean_int"], torch.tensor(1.5, dtype=torch.float64))
        assert out["broadcast"] == {"run": "from-rank-1"}


def test_launch_local_reports_a_failing_rank():
    with pytest.raises(DistributedError, match=r"rank 1:(.|\n)*ValueError: worker failure"):
        # timeout_s only guards a hang: 60 s was reached by process start-up alone on a loaded
        # 2-core machine (both ranks "timed out" before the failure could be reported).
        launch_local(_raising_worker, WORLD, timeout_s=240, collective_timeout_s=20)


def test_dead_peer_makes_the_survivor_fail_quickly(tmp_path):
    timeout = 10.0
    outcomes = launch_local(_dying_peer_worker, WORLD, (str(tmp_path),), timeout_s=60,
                            collective_timeout_s=timeout, raise_on_error=False)
    assert outcomes[1].exitcode == 3 and not outcomes[1].ok
    survivor = outcomes[0]
    assert survivor.ok, survivor.error
    assert survivor.value["message"] is not None, "the collective succeeded without its peer"
    assert "all_reduce(mean) failed on rank 0 of 2" in survivor.value["message"]
    assert survivor.value["seconds"] < timeout + 5.0


def test_silent_peer_makes_the_survivor_fail_at_the_timeout(tmp_path):
    timeout = 2.0
    outcomes = launch_local(_hanging_peer_worker, WORLD, (str(tmp_path),), timeout_s=60,
                            collective_timeout_s=timeout, raise_on_error=False)
    survivor = outcomes[0]
    assert survivor.ok, survivor.error
    assert survivor.value["message"] is not None, "the collective succeeded without its peer"
    assert "all_reduce(sum) failed on rank 0 of 2" in survivor.value["message"]
    assert survivor.value["seconds"] < timeout + 8.0


def test_clip_grad_norm_in_one_process_is_torchs(no_dist_env):
    torch.manual_seed(0)
    mine = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    for group in (mine, theirs):
        (sum((p * p).sum() for p in group) * 3.0).backward()
    norm = qd.clip_grad_norm_(mine, 1.0, sharded=[mine[0]])
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    torch.testing.assert_close(norm, expected)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a.grad, b.grad)


def test_the_launcher_is_still_importable_from_its_old_module():
    import qualiface.train.distributed as distributed
    import qualiface.train.local_launch as local_launch

    for name in ("launch_local", "RankOutcome", "find_free_port"):
        assert getattr(distributed, name) is getattr(local_launch, name)
    with pytest.raises(AttributeError):
        distributed.no_such_name  # noqa: B018
