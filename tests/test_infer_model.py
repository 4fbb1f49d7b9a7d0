"""Model packages: save -> load (also in a fresh process) -> identical embeddings; clean errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from qualiface.backbones import build_backbone
from qualiface.heads.quality import EQFaceQuality, NormQuality
from qualiface.infer.model import Model, ModelPackageError, read_model_spec, save_model_package

TINY_KWARGS = {"embedding_size": 16, "input_size": 32, "base_width": 4}


def make_package(path, quality: str = "eqface", calibration=None, seed: int = 0):
    """A tiny iresnet-nano package (32x32 input) with random weights and non-trivial BN stats."""
    torch.manual_seed(seed)
    backbone = build_backbone("iresnet-nano", **TINY_KWARGS)
    estimator = EQFaceQuality(backbone.feature_dim, hidden=8) if quality == "eqface" else NormQuality()
    # One train-mode pass so BatchNorm running statistics differ from their defaults.
    backbone.train()
    with torch.no_grad():
        _, features = backbone(torch.randn(8, 3, 32, 32), return_features=True)
        if quality == "eqface":
            estimator.train()(None, features)
    backbone.eval(), estimator.eval()
    save_model_package(
        path, backbone=backbone, backbone_name="iresnet-nano", backbone_kwargs=TINY_KWARGS,
        quality_estimator=estimator, head_name=quality, calibration=calibration, metadata={"epochs": 1},
    )
    return backbone, estimator


def random_images(n: int, seed: int = 1, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_package_reloads_in_fresh_process_with_identical_embeddings(tmp_path):
    backbone, estimator = make_package(tmp_path / "pkg")
    images = random_images(5)
    torch.save(images, tmp_path / "images.pt")
    with torch.no_grad():
        x = (images.float() / 255 - 0.5) / 0.5
        embedding, features = backbone(x, return_features=True)
        expected_quality = estimator(embedding, features)
    script = (
        "import sys, torch, numpy as np\n"
        "torch.set_num_threads(1)\n"  # same reduction order as this process: bit-identical results
        "from qualiface.infer.model import Model\n"
        "m = Model.load(sys.argv[1])\n"
        "e, q = m.embed(torch.load(sys.argv[2]))\n"
        "np.save(sys.argv[3], e.numpy()); np.save(sys.argv[4], q.numpy())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "pkg"), str(tmp_path / "images.pt"),
         str(tmp_path / "e.npy"), str(tmp_path / "q.npy")],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    here_embedding, here_quality = Model.load(tmp_path / "pkg").embed(images)
    assert np.array_equal(np.load(tmp_path / "e.npy"), here_embedding.numpy())
    assert np.array_equal(np.load(tmp_path / "q.npy"), here_quality.numpy())
    # ... and both equal the modules that were saved (up to float rounding of the input scaling).
    np.testing.assert_allclose(here_embedding.numpy(), embedding.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(here_quality.numpy(), expected_quality.numpy(), rtol=1e-5, atol=1e-6)


def test_embed_accepts_tensor_numpy_and_paths_and_is_batch_invariant(tmp_path):
    import cv2

    make_package(tmp_path / "pkg")
    model = Model.load(tmp_path / "pkg")
    images = random_images(4)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(paths[-1]), image.permute(1, 2, 0).numpy()[:, :, ::-1])
    e_tensor, q_tensor = model.embed(images, batch_size=3)
    e_numpy, q_numpy = model.embed(images.permute(0, 2, 3, 1).numpy(), batch_size=1)
    e_paths, q_paths = model.embed(paths)
    assert e_tensor.dtype == torch.float32 and e_tensor.shape == (4, 16) and q_tensor.shape == (4,)
    for e, q in ((e_numpy, q_numpy), (e_paths, q_paths)):
        torch.testing.assert_close(e, e_tensor, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(q, q_tensor, rtol=1e-5, atol=1e-5)
    full = model.embed_full(images)
    torch.testing.assert_close(full.norms, e_tensor.norm(dim=1))
    torch.testing.assert_close(full.embeddings, e_tensor / e_tensor.norm(dim=1, keepdim=True))
    assert full.calibrated_quality is None


def test_norm_quality_package_reports_embedding_norm(tmp_path):
    make_package(tmp_path / "pkg", quality="norm")
    model = Model.load(tmp_path / "pkg")
    embeddings, quality = model.embed(random_images(3))
    torch.testing.assert_close(quality, embeddings.norm(dim=1))
    spec = read_model_spec(tmp_path / "pkg")
    assert spec.quality.kind == "norm" and spec.quality.value_range == [0.0, None]
    assert spec.metadata["epochs"] == 1 and spec.channel_order == "RGB" and spec.input_size == (32, 32)


def test_bgr_package_flips_channels(tmp_path):
    make_package(tmp_path / "pkg")
    spec_path = tmp_path / "pkg" / "model.json"
    rgb = Model.load(tmp_path / "pkg")
    data = json.loads(spec_path.read_text())
    data["input"]["channel_order"] = "BGR"
    spec_path.write_text(json.dumps(data))
    bgr = Model.load(tmp_path / "pkg")
    images = random_images(2)
    torch.testing.assert_close(bgr.embed(images)[0], rgb.embed(images.flip(1))[0])


def test_wrong_image_size_is_a_clear_error(tmp_path):
    make_package(tmp_path / "pkg")
    with pytest.raises(ValueError, match="expects 32x32"):
        Model.load(tmp_path / "pkg").embed(random_images(1, size=48))


def test_an_empty_batch_is_refused_like_an_empty_list(tmp_path):
    make_package(tmp_path / "pkg")
    model = Model.load(tmp_path / "pkg")
    for empty in ([], random_images(1, size=32)[:0], random_images(1, size=32)[:0].permute(0, 2, 3, 1).numpy()):
        with pytest.raises(ValueError, match="no images given"):  # was torch.cat's "non-empty list"
            model.embed(empty)


def test_a_batch_inside_an_image_sequence_is_refused_not_cut_to_its_first_image():
    from qualiface.infer.images import as_uint8_batch

    batch = random_images(2, size=4)
    # was a (2, 3, 4, 4) batch: the first image of each item, two of the four images lost
    with pytest.raises(ValueError, match="item 1: holds 2 images"):
        as_uint8_batch([batch[0], batch, batch])
    with pytest.raises(ValueError, match="item 0: holds 3 images"):
        as_uint8_batch([batch.permute(0, 2, 3, 1).numpy()[[0, 1, 0]]])
    one_each = as_uint8_batch([batch[:1], batch[1].permute(1, 2, 0).numpy()])  # (1, ...) items are one image
    assert torch.equal(one_each, batch)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("backbone"), "'backbone' is missing"),
        (lambda d: d["backbone"].update(embedding_size="16"), "'backbone.embedding_size' must be int"),
        (lambda d: d["input"].update(size=[32]), "'input.size'"),
        (lambda d: d["input"].update(channel_order="GBR"), "'input.channel_order'"),
        (lambda d: d.update(format_version=99), "'format_version' is 99"),
        (lambda d: d.update(format_version=0), "'format_version' is 0; versions start at 1"),
        (lambda d: d.update(calibration={"method": "magic"}), "calibration.method"),
        (lambda d: d["backbone"]["kwargs"].update(embedding_size=8), "backbone.fc.weight"),
        (lambda d: d["quality"]["config"].update(hidden=4), "quality estimator"),
        # descriptions that disagree with what is rebuilt (they loaded silently before)
        (lambda d: d["quality"].update(kind="norm"), "'quality.kind' is 'norm' but .*'eqface'"),
        (lambda d: d["quality"].update(requires_features=False), "'quality.requires_features' is false"),
        (lambda d: d["backbone"].update(feature_dim=7), "'backbone.feature_dim' is 7"),
    ],
)
def test_bad_model_json_names_file_and_key(tmp_path, edit, message):
    make_package(tmp_path / "pkg")
    spec_path = tmp_path / "pkg" / "model.json"
    data = json.loads(spec_path.read_text())
    edit(data)
    spec_path.write_text(json.dumps(data))
    with pytest.raises(ModelPackageError, match=message) as info:
        Model.load(tmp_path / "pkg")
    assert "pkg" in str(info.value)


def test_missing_or_corrupt_files(tmp_path):
    with pytest.raises(ModelPackageError, match="model.json: missing"):
        Model.load(tmp_path)
    make_package(tmp_path / "pkg")
    (tmp_path / "pkg" / "model.json").write_text("{not json")
    with pytest.raises(ModelPackageError, match="invalid JSON"):
        Model.load(tmp_path / "pkg")
    make_package(tmp_path / "pkg2")
    (tmp_path / "pkg2" / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelPackageError, match="safetensors"):
        Model.load(tmp_path / "pkg2")
