"""Reliability round 6, training side: the held-out validation during training.

A validation set that could not be built, or whose images did not fit the backbone, stopped the
run only at its first validation -- with ``eval_every=0`` after all of training, before the
final weights and the model package were written -- and one of them as a traceback. One selected
LFW fold (``val.folds: [1]``) failed the same way. The validation numbers are checked against an
independent k-fold computation. Tiny IResNet on CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from qualiface.cli import app
from qualiface.config import from_dict
from qualiface.data.decode import read_image
from qualiface.data.transforms import to_model_input
from qualiface.errors import QualifaceError
from qualiface.train.loop import Trainer

runner = CliRunner()
NAMES = [f"p{i}" for i in range(8)]


@pytest.fixture(scope="module")
def lfw(tmp_path_factory):
    """An LFW-style folder (32x32 images) and a pairs file of 2 folds x (4 genuine + 4 impostor)."""
    root = tmp_path_factory.mktemp("lfw")
    rng = np.random.default_rng(0)
    for name in NAMES:
        (root / "lfw" / name).mkdir(parents=True)
        for k in (1, 2, 3):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "lfw" / name / f"{name}_{k:04d}.jpg")
    lines, pairs = ["2\t4"], []
    for fold in range(2):
        people = NAMES[4 * fold : 4 * fold + 4]
        for name in people:
            lines.append(f"{name}\t1\t2")
            pairs.append((f"{name}/{name}_0001.jpg", f"{name}/{name}_0002.jpg", True, fold))
        for i, name in enumerate(people):
            other = people[(i + 1) % 4]
            lines.append(f"{name}\t3\t{other}\t3")
            pairs.append((f"{name}/{name}_0003.jpg", f"{other}/{other}_0003.jpg", False, fold))
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    return root, pairs


def settings(out, **val) -> dict:
    return {
        "model": {"backbone": "iresnet-nano",
                  "params": {"input_size": 32, "base_width": 4, "embedding_size": 16}},
        "head": {"name": "arcface", "params": {}},
        "data": {"name": "synthetic", "num_workers": 0,
                 "params": {"num_identities": 4, "images_per_identity": 8, "image_size": 32, "seed": 1}},
        "optim": {"lr": 0.05},
        "train": {"steps": 2, "batch_size": 16, "device": "cpu", "output_dir": str(out), "log_every": 1,
                  "checkpoint_every": 0, "eval_every": 0, "progress": False, "seed": 0},
        "val": val,
    }


SYNTHETIC_VAL = {"split": "test", "num_identities": 4, "images_per_identity": 4, "image_size": 32, "seed": 0}


@pytest.mark.parametrize("val, needle", [
    ({"kind": "synthetic", "params": {**SYNTHETIC_VAL, "bogus": 3}, "num_pairs": 20}, "val.params"),
    ({"kind": "synthetic", "params": SYNTHETIC_VAL, "num_pairs": 1}, "num_pairs"),
    ({"kind": "synthetic", "params": {**SYNTHETIC_VAL, "image_size": 64}, "num_pairs": 20},
     "val.params.image_size"),
    ({"kind": "pairs", "folds": [3]}, "val.folds"),
], ids=["unknown-param", "one-pair", "other-image-size", "absent-fold"])
def test_a_validation_set_that_cannot_be_used_stops_the_run_before_training(tmp_path, lfw, val, needle):
    # Was: 2 steps trained, a checkpoint written, then (at the final validation) the run died
    # without final.safetensors or a model package; 'unknown-param' and 'other-image-size' as
    # TypeError / RuntimeError tracebacks ("mat1 and mat2 shapes cannot be multiplied").
    root, _ = lfw
    if val["kind"] == "pairs":
        val = {**val, "root": str(root / "lfw"), "pairs": str(root / "pairs.txt")}
    with pytest.raises(QualifaceError, match=needle):
        Trainer(from_dict(settings(tmp_path / "run", **val))).run()
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # nothing trained

    config = tmp_path / "train.yaml"  # and through the CLI: one line, no traceback
    config.write_text(yaml.safe_dump(settings(tmp_path / "cli", **val)))
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output


def test_validation_images_of_mixed_sizes_name_the_file(tmp_path, lfw):
    root, _ = lfw
    odd = tmp_path / "lfw"
    import shutil

    shutil.copytree(root / "lfw", odd)
    Image.new("RGB", (40, 40)).save(odd / "p5" / "p5_0003.jpg")  # an unaligned crop
    val = {"kind": "pairs", "root": str(odd), "pairs": str(root / "pairs.txt")}
    with pytest.raises(QualifaceError, match="p5_0003.jpg: image is 40x40"):
        Trainer(from_dict(settings(tmp_path / "run", **val)))


def _independent_kfold(scores: np.ndarray, issame: np.ndarray, folds: np.ndarray) -> float:
    """Mean held-out accuracy; per fold the highest threshold (a midpoint between adjacent
    distinct scores, or +inf) with the best accuracy on the other folds, by brute force."""
    accuracies = []
    for fold in np.unique(folds):
        train, test = folds != fold, folds == fold
        distinct = np.unique(scores[train].astype(np.float64))
        candidates = [np.inf] + [(a + b) / 2 for a, b in zip(distinct[1:][::-1], distinct[:-1][::-1])]
        candidates.append(-np.inf)
        accs = [np.mean((scores[train] >= t) == issame[train]) for t in candidates]
        threshold = candidates[int(np.argmax(accs))]
        accuracies.append(np.mean((scores[test].astype(np.float64) >= threshold) == issame[test]))
    return float(np.mean(accuracies))


@pytest.mark.parametrize("folds", [[], [1]], ids=["both-folds", "one-fold"])
def test_validation_accuracy_equals_an_independent_kfold(tmp_path, lfw, folds):
    # Was ("one-fold"): EvaluationError "k-fold accuracy needs at least 2 folds, got 1" at the
    # final validation, after training; `qualiface eval lfw --folds 1` scores that fold's pairs
    # over contiguous sub-folds, and so does the validation now.
    root, pairs = lfw
    val = {"kind": "pairs", "root": str(root / "lfw"), "pairs": str(root / "pairs.txt"), "folds": folds}
    trainer = Trainer(from_dict(settings(tmp_path / "run", **val)))
    result = trainer.run()
    assert (tmp_path / "run" / "model" / "model.json").is_file()

    chosen = [p for p in pairs if not folds or p[3] + 1 in folds]
    backbone = trainer.backbone.eval()
    with torch.no_grad():
        def embed(name):
            x = to_model_input(read_image(root / "lfw" / name)[None])
            return torch.nn.functional.normalize(backbone(x).float(), dim=1)[0]
        scores = np.array([float(embed(a) @ embed(b)) for a, b, _, _ in chosen], dtype=np.float32)
    issame = np.array([same for _, _, same, _ in chosen])
    if folds:  # one fold: 10 contiguous sub-folds of its 8 pairs (KFold(10): 8 folds of one)
        fold_ids = np.arange(len(chosen))
    else:
        fold_ids = np.array([fold for *_, fold in chosen])
    assert result.validation["val_accuracy"] == pytest.approx(_independent_kfold(scores, issame, fold_ids),
                                                              abs=1e-12)
