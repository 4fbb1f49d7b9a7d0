"""Determinism on CPU: the same seed and config give bitwise-identical weights, through the
in-memory cache and through DataLoader workers, and with bad samples replaced by the robust
wrapper; a different seed gives different weights (so the comparison can fail)."""

from __future__ import annotations

import pytest
import torch
from test_bad_data import record_counts
from test_resume import assert_bitwise_equal, make_folder

from qualiface.config import from_dict
from qualiface.train.loop import Trainer


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("det") / "faces", identities=4, per_identity=6)


def config(data_section: dict, out, seed: int = 3):
    return from_dict({
        "model": {"backbone": "iresnet-nano",
                  "params": {"input_size": 16, "base_width": 4, "embedding_size": 8}},
        "head": {"name": "adaface"},  # EMA buffers and margins: more state that must agree
        "data": data_section,  # flips on (default): the augmentation generator is exercised
        "optim": {"lr": 0.05},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
        "train": {"steps": 5, "batch_size": 8, "device": "cpu", "output_dir": str(out),
                  "checkpoint_every": 0, "log_every": 1, "progress": False, "seed": seed},
    })


def run_weights(cfg) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Trainer(cfg).run().final_weights)


@pytest.mark.parametrize("cache, workers", [("always", 0), ("never", 2)],
                         ids=["cached", "dataloader-workers"])
def test_same_seed_same_config_gives_bitwise_identical_weights(faces, tmp_path, cache, workers,
                                                               request):
    data = {"name": "folder", "params": {"root": str(faces)}, "cache": cache,
            "num_workers": workers}
    first = run_weights(config(data, tmp_path / "a"))
    second = run_weights(config(data, tmp_path / "b"))
    assert_bitwise_equal(first, second)
    other = run_weights(config(data, tmp_path / "c", seed=4))
    assert any(not torch.equal(first[k], other[k]) for k in first), "seed has no effect"
    record_counts(request, runs_compared=1)


def test_bad_samples_are_replaced_identically_in_every_run(faces, tmp_path, request):
    # Two broken files in the training folder: the robust wrapper substitutes the same
    # samples in both runs, so training stays bitwise reproducible.
    broken = tmp_path / "faces"
    for source in faces.rglob("*.png"):
        target = broken / source.relative_to(faces)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    (broken / "id00" / "truncated.png").write_bytes((faces / "id00" / "0.png").read_bytes()[:40])
    (broken / "id02" / "empty.png").write_bytes(b"")
    data = {"name": "robust", "cache": "never", "num_workers": 0,
            "params": {"dataset": "folder", "params": {"root": str(broken)},
                       "max_bad_fraction": 0.2, "min_samples": 5}}
    import qualiface.data.robust  # noqa: F401  (registers "robust" until data/__init__ does)

    from safetensors.torch import load_file

    trainers = [Trainer(config(data, tmp_path / name)) for name in ("a", "b")]
    first, second = (load_file(t.run().final_weights) for t in trainers)
    assert_bitwise_equal(first, second)
    for trainer in trainers:  # the broken files were really met, counted and replaced
        stats = trainer.dataset.stats()
        assert stats.bad >= 2 and stats.replaced >= 2
        assert {line.split(":")[0].rsplit("/", 1)[1] for line in stats.first_bad} == {
            "truncated.png", "empty.png"}
    record_counts(request, runs_compared=1, files_tried=2)
