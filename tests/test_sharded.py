"""The sharded (Partial FC style) classifier against the plain head on the concatenated batch.

One 2-rank gloo run (module fixture) trains every registered head for two SGD steps with its
centres split over the ranks; the parent process repeats the same steps with the plain,
unsharded head on the concatenated batch and compares losses, gradients (embeddings, centres
slice by slice, replicated head parameters), buffers and final weights. The same run checks a
DDP-wrapped backbone, class sampling, unequal batches and the state-dict round trips.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from qualiface.heads import build_head
from qualiface.train.distributed import DistInfo, clip_grad_norm_
from qualiface.train.local_launch import launch_local
from qualiface.train.sharded import ShardedHead, ShardingError, shard_range
from stand_ins import LinearBackbone  # noqa: F401  (registers test-linear / test-blobs)

WORLD = 2
LOCAL_BATCH = 3
EMBED = 8
CLASSES = 11  # odd on purpose: shards of 5 and 6 classes
FEATURES = 6
STEPS = 2
CLIP = 0.05  # max gradient norm in the DDP test; well below the actual norm

# (registry name, head parameters); every registered head, in float64 so that the only
# difference between sharded and plain is the order of floating-point sums.
CASES = [
    ("arcface", {}),
    ("cosface", {}),
    ("combined", {}),
    ("adaface", {}),
    ("qcface", {}),
    ("qcface-cur", {}),
    ("qcface-mv", {}),
    ("curricular", {}),
    ("magface", {}),
    ("mv-softmax", {}),
    ("eqface", {"feature_dim": FEATURES, "hidden": 4, "stage": 1}),
    ("eqface", {"feature_dim": FEATURES, "hidden": 4, "stage": 2}),
    ("eqface", {"feature_dim": FEATURES, "hidden": 4, "stage": 3}),
    ("qgface", {"queue_size": 8}),
]


def _case_id(case) -> str:
    name, params = case
    return f"{name}-stage{params['stage']}" if "stage" in params else name


def _global_batch(step: int) -> dict[str, torch.Tensor]:
    """The concatenated batch of step ``step`` (WORLD * LOCAL_BATCH samples), reproducible."""
    generator = torch.Generator().manual_seed(1000 + step)
    total = WORLD * LOCAL_BATCH
    # Norms from ~3 to ~60 so that norm-aware heads (AdaFace, QGFace, MagFace, QCFace) see
    # samples on both sides of their thresholds.
    order = torch.randperm(total, generator=generator)
    norms = torch.linspace(3.0, 60.0, total, dtype=torch.float64)[order]
    directions = torch.randn(total, EMBED, generator=generator, dtype=torch.float64)
    embeddings = directions / directions.norm(dim=1, keepdim=True) * norms[:, None]
    return {
        "embeddings": embeddings,
        "labels": torch.randint(0, CLASSES, (total,), generator=generator),
        "features": torch.randn(total, FEATURES, generator=generator, dtype=torch.float64),
        # A loosely related second view, so that QGFace's contrastive term is far from zero.
        "second_view": 0.5 * embeddings + 10.0 * torch.randn(total, EMBED, generator=generator,
                                                             dtype=torch.float64),
    }


def _uses(name: str, params: dict) -> tuple[bool, bool]:
    return name == "eqface", name == "qgface"


def _reference_head(name: str, params: dict) -> nn.Module:
    torch.manual_seed(7)
    return build_head(name, EMBED, CLASSES, **params).double()


def _run_steps(head_call, parameters, batch_slice, with_features, with_second_view):
    """Two SGD steps; per step the loss, input gradients and parameter gradients."""
    optimizer = torch.optim.SGD(parameters, lr=0.05, momentum=0.9, weight_decay=5e-4)
    records = []
    for step in range(STEPS):
        batch = {key: value[batch_slice] for key, value in _global_batch(step).items()}
        embeddings = batch["embeddings"].clone().requires_grad_(True)
        features = batch["features"].clone().requires_grad_(True) if with_features else None
        second = batch["second_view"].clone().requires_grad_(True) if with_second_view else None
        output, grads_of = head_call(embeddings, batch["labels"], features, second)
        output.loss.backward()
        records.append({
            "loss": output.loss.detach().clone(),
            "quality": output.quality.detach().clone(),
            "extras": {k: v.detach().clone() for k, v in output.extras.items()},
            "embeddings_grad": _grad_of(embeddings),
            "features_grad": _grad_of(features),
            "second_grad": _grad_of(second),
            "param_grads": grads_of(),
        })
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return records


def _grad_of(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None or tensor.grad is None else tensor.grad.clone()


def _param_grads(module: nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        name: None if p.grad is None else p.grad.detach().clone()
        for name, p in module.named_parameters()
    }


def _distributed_worker(info: DistInfo) -> dict:
    """Runs in each of the 2 ranks; returns everything the parent compares."""
    rank = info.rank
    mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    out: dict = {"cases": {}}
    for name, params in CASES:
        with_features, with_second = _uses(name, params)
        reference = _reference_head(name, params)
        sharded = ShardedHead(name, EMBED, CLASSES, params, rank=rank, world_size=WORLD).double()
        out.setdefault("initial_local_weight", sharded.head.weight.detach().clone())
        sharded.load_full_state_dict(reference.state_dict())
        sharded.train()

        def call(embeddings, labels, features, second, sharded=sharded):
            return sharded(embeddings, labels, features, second), lambda: _param_grads(sharded.head)

        records = _run_steps(call, sharded.parameters(), mine, with_features, with_second)
        out["cases"][_case_id((name, params))] = {
            "records": records,
            "full_state": sharded.full_state_dict(),
            "full_state_rank0": sharded.full_state_dict(rank0_only=True),
            "local_state": {k: v.clone() for k, v in sharded.head.state_dict().items()},
        }

    # A DDP backbone in front of the sharded head: after DDP's averaging the backbone gradient
    # must equal single-process training on the concatenated batch.
    torch.manual_seed(3)
    backbone = nn.Linear(FEATURES, EMBED).double()
    ddp = nn.parallel.DistributedDataParallel(backbone)
    head = ShardedHead("arcface", EMBED, CLASSES, {}, rank=rank, world_size=WORLD).double()
    head.load_full_state_dict(_reference_head("arcface", {}).state_dict())
    optimizer = torch.optim.SGD(list(ddp.parameters()) + list(head.parameters()), lr=0.1,
                                momentum=0.9)
    batch = _global_batch(0)
    output = head(ddp(batch["features"][mine]), batch["labels"][mine])
    output.loss.backward()
    out["ddp"] = {
        "loss": output.loss.detach().clone(),
        "backbone_grads": _param_grads(backbone),
    }
    # Clipping must use the norm of the whole (unsharded) gradient on every rank.
    out["ddp"]["grad_norm"] = clip_grad_norm_(
        list(ddp.parameters()) + list(head.parameters()), CLIP, sharded=head.sharded_parameters()
    )
    optimizer.step()
    out["ddp"]["backbone_after_step"] = {k: v.clone() for k, v in backbone.state_dict().items()}
    out["ddp"]["head_after_step"] = head.full_state_dict()

    # Class sampling across ranks: the loss is the softmax over the union of sampled classes.
    sampled = ShardedHead("arcface", EMBED, CLASSES, {}, rank=rank, world_size=WORLD,
                          sample_rate=0.4, seed=5).double()
    sampled.load_full_state_dict(_reference_head("arcface", {}).state_dict())
    batch = _global_batch(1)
    embeddings = batch["embeddings"][mine].clone().requires_grad_(True)
    output = sampled(embeddings, batch["labels"][mine], step=4)
    output.loss.backward()
    rows = sampled.sample_rows(batch["labels"], 4)
    out["sampled"] = {
        "loss": output.loss.detach().clone(),
        "class_ids": rows + sampled.start,
        "embeddings_grad": embeddings.grad.clone(),
        "weight_grad": sampled.head.weight.grad.clone(),
        "logits_shape": tuple(output.logits.shape),
    }

    # Unequal local batches are refused with a clear error on every rank.
    try:
        size = LOCAL_BATCH + rank
        sampled(torch.randn(size, EMBED, dtype=torch.float64), torch.zeros(size, dtype=torch.long))
        out["unequal_error"] = None
    except ShardingError as error:
        out["unequal_error"] = str(error)
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    outcomes = launch_local(_distributed_worker, WORLD, timeout_s=240, collective_timeout_s=60)
    return [outcome.value for outcome in outcomes]


def _reference_records(name: str, params: dict):
    with_features, with_second = _uses(name, params)
    head = _reference_head(name, params).train()

    def call(embeddings, labels, features, second):
        output = head(embeddings, labels, features=features, second_view=second)
        return output, lambda: _param_grads(head)

    return head, _run_steps(call, head.parameters(), slice(None), with_features, with_second)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_sharded_head_matches_plain_head_on_concatenated_batch(ranks, case):
    name, params = case
    head, reference = _reference_records(name, params)
    case_id = _case_id(case)
    for rank, result in enumerate(ranks):
        start, stop = shard_range(CLASSES, rank, WORLD)
        mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        for step, (got, want) in enumerate(zip(result["cases"][case_id]["records"], reference)):
            where = f"{case_id} rank {rank} step {step}"
            torch.testing.assert_close(got["loss"], want["loss"], msg=where)
            torch.testing.assert_close(got["quality"], want["quality"][mine], msg=where)
            for key, value in got["extras"].items():
                torch.testing.assert_close(value, want["extras"][key][mine], msg=f"{where} {key}")
            # Embedding-side gradients carry the factor W that DDP's averaging removes.
            for key in ("embeddings_grad", "features_grad", "second_grad"):
                assert (got[key] is None) == (want[key] is None), f"{where} {key}"
                if want[key] is not None:
                    torch.testing.assert_close(got[key], WORLD * want[key][mine], msg=where)
            for pname, want_grad in want["param_grads"].items():
                got_grad = got["param_grads"][pname]
                assert (got_grad is None) == (want_grad is None), f"{where} {pname}"
                if want_grad is None:
                    continue
                if pname == "weight":  # the shard's rows, exactly the single-process gradient
                    want_grad = want_grad[start:stop]
                torch.testing.assert_close(got_grad, want_grad, msg=f"{where} {pname}")
        # After two SGD steps: the same centres, replicated buffers (EMAs, queues), params.
        full = result["cases"][case_id]["full_state"]
        expected = head.state_dict()
        assert set(full) == set(expected)
        for key, value in expected.items():
            torch.testing.assert_close(full[key], value, msg=f"{case_id} rank {rank} {key}")


def test_ddp_backbone_gradient_and_clipping_equal_single_process(ranks):
    torch.manual_seed(3)
    backbone = nn.Linear(FEATURES, EMBED).double()
    head = _reference_head("arcface", {})
    optimizer = torch.optim.SGD(list(backbone.parameters()) + list(head.parameters()), lr=0.1,
                                momentum=0.9)
    batch = _global_batch(0)
    output = head(backbone(batch["features"]), batch["labels"])
    output.loss.backward()
    reference_grads = _param_grads(backbone)
    norm = torch.nn.utils.clip_grad_norm_(list(backbone.parameters()) + list(head.parameters()),
                                          CLIP)
    assert norm > CLIP  # the clip is active
    optimizer.step()
    for result in ranks:
        ddp = result["ddp"]
        torch.testing.assert_close(ddp["loss"], output.loss.detach())
        for name, grad in reference_grads.items():
            torch.testing.assert_close(ddp["backbone_grads"][name], grad)
        torch.testing.assert_close(ddp["grad_norm"], norm.float())
        for name, value in backbone.state_dict().items():
            torch.testing.assert_close(ddp["backbone_after_step"][name], value)
        torch.testing.assert_close(ddp["head_after_step"]["weight"], head.weight.detach())


def test_sampled_classes_keep_positives_and_match_a_softmax_over_them(ranks):
    batch = _global_batch(1)
    labels = batch["labels"]
    kept = [result["sampled"]["class_ids"] for result in ranks]
    for rank, ids in enumerate(kept):
        start, stop = shard_range(CLASSES, rank, WORLD)
        positives = set(labels[(labels >= start) & (labels < stop)].tolist())
        assert positives <= set(ids.tolist()), "a positive class was not sampled"
        assert len(ids) == max(int(0.4 * (stop - start)), len(positives))
        assert ids.tolist() == sorted(set(ids.tolist()))
        assert ranks[rank]["sampled"]["logits_shape"] == (WORLD * LOCAL_BATCH, len(ids))
    # Independent computation: a plain ArcFace over only the sampled classes.
    class_ids = torch.cat(kept)
    full = _reference_head("arcface", {})
    subset = build_head("arcface", EMBED, len(class_ids)).double()
    with torch.no_grad():
        subset.weight.copy_(full.weight[class_ids])
    remapped = torch.tensor([class_ids.tolist().index(int(y)) for y in labels])
    embeddings = batch["embeddings"].clone().requires_grad_(True)
    output = subset(embeddings, remapped)
    output.loss.backward()
    offset = 0
    for rank, result in enumerate(ranks):
        sampled = result["sampled"]
        start, stop = shard_range(CLASSES, rank, WORLD)
        mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        torch.testing.assert_close(sampled["loss"], output.loss.detach())
        torch.testing.assert_close(sampled["embeddings_grad"], WORLD * embeddings.grad[mine])
        rows = kept[rank] - start
        weight_grad = sampled["weight_grad"]
        torch.testing.assert_close(weight_grad[rows],
                                   subset.weight.grad[offset: offset + len(rows)])
        unsampled = torch.ones(stop - start, dtype=torch.bool)
        unsampled[rows] = False
        assert torch.count_nonzero(weight_grad[unsampled]) == 0
        offset += len(rows)


def test_unequal_local_batches_are_refused(ranks):
    for result in ranks:
        assert result["unequal_error"] is not None
        assert "same local batch size, got [3, 4]" in result["unequal_error"]


def test_shards_start_different_and_full_state_reassembles(ranks):
    first, second = (result["initial_local_weight"] for result in ranks)
    rows = min(len(first), len(second))
    assert not torch.allclose(first[:rows], second[:rows]), "shards initialised as copies"
    full_0 = ranks[0]["cases"]["arcface"]["full_state"]
    full_1 = ranks[1]["cases"]["arcface"]["full_state"]
    assert full_0["weight"].shape == (CLASSES, EMBED)
    for key in full_0:
        assert torch.equal(full_0[key], full_1[key])
        assert torch.equal(ranks[0]["cases"]["arcface"]["full_state_rank0"][key], full_0[key])
    assert ranks[1]["cases"]["arcface"]["full_state_rank0"] == {}
    # The assembled matrix is the two local shards stacked in class order.
    stacked = torch.cat([r["cases"]["arcface"]["local_state"]["weight"] for r in ranks])
    assert torch.equal(full_0["weight"], stacked)


@pytest.mark.parametrize("case_id", ["arcface", "adaface", "qgface"])
def test_reshard_from_two_ranks_to_one(ranks, case_id):
    name = case_id
    params = dict(CASES)[name]
    full = ranks[0]["cases"][case_id]["full_state"]
    single = ShardedHead(name, EMBED, CLASSES, params).double()
    single.load_full_state_dict(full)
    for key, value in single.head.state_dict().items():
        assert torch.equal(value, full[key]), key
    # A plain head loads the same dict and computes the same loss.
    plain = build_head(name, EMBED, CLASSES, **params).double()
    plain.load_state_dict(full)
    plain.eval()
    single.eval()
    batch = _global_batch(5)
    inputs = (batch["embeddings"], batch["labels"])
    extra = {"second_view": batch["second_view"]} if name == "qgface" else {}
    torch.testing.assert_close(single(*inputs, **extra).loss, plain(*inputs, **extra).loss)


def test_load_into_one_of_three_shards_takes_its_rows():
    torch.manual_seed(0)
    plain = build_head("arcface", EMBED, 10)
    shard = ShardedHead("arcface", EMBED, 10, {}, rank=1, world_size=3)
    shard.load_full_state_dict(plain.state_dict())
    assert (shard.start, shard.stop) == (3, 6)
    assert torch.equal(shard.head.weight, plain.weight[3:6])


# -- one process ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["arcface", "adaface", "qcface"])
def test_world_size_one_is_exactly_the_plain_head(name):
    torch.manual_seed(11)
    plain = build_head(name, EMBED, CLASSES)
    torch.manual_seed(11)
    sharded = ShardedHead(name, EMBED, CLASSES)
    assert torch.equal(plain.weight, sharded.head.weight)
    batch = _global_batch(0)
    x_plain = batch["embeddings"].float().requires_grad_(True)
    x_sharded = batch["embeddings"].float().requires_grad_(True)
    out_plain = plain(x_plain, batch["labels"])
    out_sharded = sharded(x_sharded, batch["labels"])
    out_plain.loss.backward()
    out_sharded.loss.backward()
    assert torch.equal(out_plain.loss, out_sharded.loss)
    assert torch.equal(out_plain.quality, out_sharded.quality)
    assert torch.equal(x_plain.grad, x_sharded.grad)
    assert torch.equal(plain.weight.grad, sharded.head.weight.grad)
    assert out_plain.metrics == out_sharded.metrics


def test_sampling_keeps_positives_and_is_deterministic():
    head = ShardedHead("arcface", EMBED, 40, sample_rate=0.25, seed=3)
    labels = torch.tensor([1, 1, 7, 30, 39, 12])
    rows = head.sample_rows(labels, step=2)
    assert len(rows) == 10  # int(0.25 * 40)
    assert set(labels.tolist()) <= set(rows.tolist())
    assert torch.equal(rows, head.sample_rows(labels, step=2))
    assert not torch.equal(rows, head.sample_rows(labels, step=3))
    other_seed = ShardedHead("arcface", EMBED, 40, sample_rate=0.25, seed=4)
    assert not torch.equal(rows, other_seed.sample_rows(labels, step=2))
    # More positives than the sampling budget: all positives, nothing else.
    many = torch.arange(0, 40, 3)
    assert torch.equal(head.sample_rows(many, step=0), many)


def test_sampling_counter_and_eval_mode():
    head = ShardedHead("arcface", EMBED, 40, sample_rate=0.25, seed=3)
    x, labels = torch.randn(4, EMBED), torch.tensor([0, 5, 9, 33])
    head.train()
    assert head(x, labels).logits.shape == (4, 10)
    assert head.step == 1
    explicit = head(x, labels, step=0)
    assert head.step == 1  # an explicit step does not advance the counter
    torch.testing.assert_close(explicit.logits, head(x, labels, step=0).logits)
    head.eval()
    assert head(x, labels).logits.shape == (4, 40)  # evaluation uses every class


def test_sampled_loss_in_one_process_is_a_softmax_over_the_sample():
    torch.manual_seed(2)
    head = ShardedHead("cosface", EMBED, 30, sample_rate=0.3, seed=1)
    x, labels = torch.randn(5, EMBED), torch.tensor([3, 3, 17, 29, 8])
    rows = head.sample_rows(labels, step=6)
    subset = build_head("cosface", EMBED, len(rows))
    with torch.no_grad():
        subset.weight.copy_(head.head.weight[rows])
    remapped = torch.tensor([rows.tolist().index(int(y)) for y in labels])
    torch.testing.assert_close(head(x, labels, step=6).loss, subset(x, remapped).loss)


def test_bad_configuration_errors():
    with pytest.raises(ShardingError, match="sample_rate must be in"):
        ShardedHead("arcface", EMBED, 10, sample_rate=0.0)
    with pytest.raises(ShardingError, match="3 classes cannot be sharded over 4 ranks"):
        ShardedHead("arcface", EMBED, 3, rank=0, world_size=4)
    with pytest.raises(ShardingError, match="rank 2 is outside"):
        ShardedHead("arcface", EMBED, 10, rank=2, world_size=2)
    shard = ShardedHead("arcface", EMBED, 10, rank=0, world_size=2)
    with pytest.raises(ShardingError, match="needs a running process group"):
        shard(torch.randn(2, EMBED), torch.tensor([0, 1]))
    with pytest.raises(ShardingError, match="local_labels must be"):
        shard(torch.randn(2, EMBED), torch.tensor([0, 1, 2]))


def test_bad_state_dict_errors():
    shard = ShardedHead("arcface", EMBED, 10, rank=1, world_size=2)
    with pytest.raises(ShardingError, match="expected 10 rows"):
        shard.load_full_state_dict({"weight": torch.zeros(5, EMBED)})
    with pytest.raises(ShardingError, match=r"missing \['weight'\]"):
        shard.load_full_state_dict({})
    with pytest.raises(ShardingError, match=r"unexpected \['t'\]"):
        shard.load_full_state_dict({"weight": torch.zeros(10, EMBED), "t": torch.zeros(())})
    with pytest.raises(ShardingError, match=r"shape \(5, 3\) for this shard"):
        shard.load_full_state_dict({"weight": torch.zeros(10, 3)})


# -- the real trainer on two ranks ---------------------------------------------------------


def _trainer_config(out_dir: str, steps: int, resume: bool = False):
    from qualiface.config import from_dict

    return from_dict({
        "model": {"backbone": "test-linear", "params": {"embedding_size": EMBED}},
        "head": {"name": "arcface", "params": {}},
        "data": {"name": "test-blobs", "params": {"num": 48, "classes": CLASSES}, "flip": False,
                 "num_workers": 0},
        "optim": {"lr": 0.2},
        "schedule": {"kind": "constant"},
        "train": {"steps": steps, "batch_size": 4, "device": "cpu", "output_dir": out_dir,
                  "log_every": 1, "checkpoint_every": 0, "progress": False, "seed": 3,
                  "resume": resume},
    })


def _trainer_worker(info: DistInfo, out_dir: str) -> dict:
    import signal

    from qualiface.train.loop import Trainer, TrainingInterrupted

    trainer = Trainer(_trainer_config(str(Path(out_dir) / "complete"), steps=3))
    result = trainer.run()
    out = {
        "global_step": result.global_step,
        "loss": result.last_metrics.get("loss"),
        "final_weights": None if result.final_weights is None else str(result.final_weights),
        "backbone": {k: v.clone() for k, v in trainer.backbone.state_dict().items()},
        "head_shard": trainer.head.head.weight.detach().clone(),
    }
    # A second run interrupted after its first step, as SIGTERM would (the flag the trainer's
    # signal handler sets): every rank writes its part of a mid-run checkpoint.
    interrupted = Trainer(_trainer_config(str(Path(out_dir) / "interrupted"), steps=3))
    interrupted._stop_signal = signal.SIGTERM
    try:
        interrupted.run()
        out["interrupted_at"] = None
    except TrainingInterrupted as stop:
        out["interrupted_at"] = stop.step
    return out


@pytest.mark.slow
def test_trainer_on_two_ranks_keeps_backbones_identical_and_resumes_on_one(tmp_path):
    from qualiface.train import checkpoint as ckpt
    from qualiface.train.loop import Trainer

    outcomes = launch_local(_trainer_worker, WORLD, (str(tmp_path),), timeout_s=240,
                            collective_timeout_s=60)
    first, second = (outcome.value for outcome in outcomes)
    assert first["global_step"] == second["global_step"] == 3
    assert first["loss"] == pytest.approx(second["loss"])  # the global loss, same everywhere
    # Rank 0 writes (and `qualiface train` reports) the final weights; rank 1 names none (it
    # printed a second "done: ... weights final.safetensors" line for a file it never wrote).
    assert Path(first["final_weights"]).is_file() and second["final_weights"] is None
    for key, value in first["backbone"].items():
        assert torch.equal(value, second["backbone"][key]), key
    # The checkpoint holds the full (C, D) centre matrix: both shards, in class order.
    state = ckpt.load_checkpoint(tmp_path / "complete" / ckpt.CHECKPOINT_NAME)
    assert torch.equal(state["head"]["weight"],
                       torch.cat([first["head_shard"], second["head_shard"]]))
    for key, value in first["backbone"].items():
        assert torch.equal(state["backbone"][key], value), key
    # Re-sharding through the trainer: one process resumes the interrupted 2-rank run.
    assert first["interrupted_at"] == second["interrupted_at"] == 1
    out_dir = str(tmp_path / "interrupted")
    saved = ckpt.load_checkpoint(Path(out_dir) / ckpt.CHECKPOINT_NAME)
    assert saved["head"]["weight"].shape == (CLASSES, EMBED)
    resumed = Trainer(_trainer_config(out_dir, steps=3, resume=True))
    result = resumed.run()
    assert result.global_step == 3
    assert torch.isfinite(torch.tensor(result.last_metrics["loss"]))
