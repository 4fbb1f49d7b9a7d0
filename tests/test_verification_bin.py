"""Verification .bin files and the restricted unpickler (hostile pickles must never run)."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import pickletools

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.model_selection import KFold

from qualiface.data import DATASETS
from qualiface.data.safe_pickle import PickleFormatError, UnsafePickleError, safe_load, safe_loads
from qualiface.data.verification_bin import (
    VerificationBinDataset,
    VerificationBinError,
    load_verification_bin,
    write_verification_bin,
)
from qualiface.eval.benchmarks import bin_benchmark, evaluate_pairs
from qualiface.eval.features import FeatureSet
from qualiface.eval.verification import kfold_accuracy


def _png(value: int) -> bytes:
    out = io.BytesIO()
    pixels = np.full((6, 5, 3), value, np.uint8)
    pixels[0, 0] = (1, 2, 3)
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_round_trip_with_encoded_bytes_is_exact(tmp_path):
    blobs = [_png(v) for v in (10, 20, 30, 40)]
    path = write_verification_bin(tmp_path / "set.bin", blobs, [True, False])
    loaded = load_verification_bin(path)
    assert loaded.images.shape == (4, 3, 6, 5) and loaded.images.dtype == torch.uint8
    assert loaded.issame.tolist() == [True, False] and loaded.num_pairs == 2
    for index, value in enumerate((10, 20, 30, 40)):
        assert int(loaded.images[index, 0, 3, 3]) == value
        assert loaded.images[index, :, 0, 0].tolist() == [1, 2, 3]  # RGB order kept
    # The file is the InsightFace layout: a plain pickle of (list of bytes, list of bools).
    assert pickle.loads(path.read_bytes()) == (blobs, [True, False])


def test_round_trip_from_tensor_images_and_progress_callback(tmp_path):
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    images[:] = images[:, :, :1, :1]  # flat colour survives JPEG almost exactly
    path = write_verification_bin(tmp_path / "t.bin", images, torch.tensor([True]))
    calls = []
    loaded = load_verification_bin(path, on_progress=lambda: calls.append(1))
    assert len(calls) == 2
    assert (loaded.images.int() - images.int()).abs().max() <= 3


def test_python2_style_pickle_loads(tmp_path):
    # Protocol 2 as Python 2 writes it: str values are SHORT_BINSTRING, bools NEWTRUE/NEWFALSE.
    def short_binstring(data: bytes) -> bytes:
        return b"U" + bytes([len(data)]) + data

    blobs = [_png(50), _png(60)]
    assert all(len(b) < 256 for b in blobs)
    body = (b"\x80\x02" + b"(" + b"]" + b"(" + b"".join(short_binstring(b) for b in blobs) + b"e"
            + b"]" + b"\x88" + b"a" + b"t" + b".")
    # '(' MARK, ']' EMPTY_LIST, 'e' APPENDS, '\x88' NEWTRUE, 'a' APPEND, 't' TUPLE, '.' STOP
    pickletools.dis(body, out=io.StringIO())  # well-formed by the stdlib's own reader
    path = tmp_path / "py2.bin"
    path.write_bytes(body)
    dataset = DATASETS.get("verification_bin")(path=path)
    assert len(dataset) == 2 and dataset.issame.tolist() == [True]
    image, pair = dataset[1]
    assert pair == 0 and int(image[0, 3, 3]) == 60
    assert dataset.meta(1) == {"pair": 0, "side": 1, "issame": True}


class _SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Eval:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


class _GetAttr:
    def __reduce__(self):
        return builtins.getattr, ("text", "upper")


def test_reduce_to_os_system_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([b"x", b"y"], [_SystemCall(marker)])))
    with pytest.raises(UnsafePickleError) as info:
        load_verification_bin(path)
    assert str(path) in str(info.value) and "system" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("payload, refused", [
    (_Eval(), "builtins.eval"),
    (_GetAttr(), "builtins.getattr"),
    ([[1, (2, [_Eval()])]], "builtins.eval"),  # a global nested deep inside plain data
    (np.bool_(True), "numpy"),
    ({"a": 1}, "dict"),
    ({1, 2}, "set"),
    (1 + 2j, "builtins.complex"),
])
def test_refused_content_names_what_was_refused(payload, refused):
    with pytest.raises(UnsafePickleError, match=refused.replace(".", r"\.")) as info:
        safe_loads(pickle.dumps(payload), source="hostile.bin")
    assert "hostile.bin" in str(info.value)
    assert isinstance(info.value, pickle.UnpicklingError) and isinstance(info.value, ValueError)


def test_protocol_2_bytes_from_python3_are_refused_with_a_reason():
    with pytest.raises(UnsafePickleError, match="_codecs.encode"):
        safe_loads(pickle.dumps([b"jpeg"], protocol=2))


def test_persistent_ids_and_garbage():
    data = io.BytesIO()

    class WithPersistentId(pickle.Pickler):
        def persistent_id(self, obj):
            return "secret" if obj == "x" else None

    WithPersistentId(data, protocol=4).dump(["x"])
    with pytest.raises(UnsafePickleError, match="persistent id"):
        safe_loads(data.getvalue())
    for garbage in (b"", b"not a pickle", pickle.dumps([b"abc"] * 3)[:-5]):
        with pytest.raises(PickleFormatError):
            safe_loads(garbage)


def test_allowed_plain_values_load():
    value = ([b"a", bytearray(b"b"), "s", 1, 2.5, True, None], (1, (2,)))
    assert safe_loads(pickle.dumps(value, protocol=5)) == value


@pytest.mark.parametrize("content, message", [
    (([b"a", b"b", b"c"], [True]), "3 images for 1 pairs"),
    (([b"a", b"b"], [np.True_]), "numpy"),
    (([b"a", b"b"], ["yes"]), "is not a bool"),
    (([b"a", "text"], [True]), "image 1 is str"),
    ([b"a"], "expected a pickled \\(images, issame\\) pair"),
    (([], []), "no pairs"),
])
def test_bad_bin_structure(tmp_path, content, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(content, protocol=4))
    with pytest.raises((VerificationBinError, UnsafePickleError), match=message):
        VerificationBinDataset(path)


def test_mixed_image_sizes_are_reported(tmp_path):
    small = io.BytesIO()
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(small, format="PNG")
    path = write_verification_bin(tmp_path / "m.bin", [_png(1), small.getvalue()], [False])
    with pytest.raises(VerificationBinError, match="image 1"):
        load_verification_bin(path)


def test_safe_load_reads_files(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    assert safe_load(path) == [1, 2, 3]


def test_a_bin_is_scored_on_the_conventional_ten_folds(tmp_path):
    # A .bin carries no folds: 203 pairs must split as sklearn's unshuffled KFold (and
    # InsightFace) split them, 21 pairs in each of the first 3 folds and 20 in the other 7.
    rng = np.random.default_rng(0)
    issame = (rng.random(203) < 0.5).tolist()
    path = write_verification_bin(tmp_path / "odd.bin", [_png(7)] * 406, issame)
    bench = bin_benchmark(path)
    assert bench.folds is None  # the default split applies
    first = rng.standard_normal((203, 16))
    second = np.where(np.array(issame)[:, None], first, 0) + rng.standard_normal((203, 16))
    features = np.empty((406, 16))
    features[bench.first], features[bench.second] = first, second
    result = evaluate_pairs(bench, FeatureSet(bench.ids, features, rng.uniform(0.1, 1.0, 406)))
    folds = np.empty(203, np.int64)
    for fold, (_, test) in enumerate(KFold(n_splits=10, shuffle=False).split(np.zeros(203))):
        folds[test] = fold
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    scores = np.sum(unit[bench.first] * unit[bench.second], axis=1)
    expected = kfold_accuracy(scores, np.array(issame), folds)
    np.testing.assert_allclose(result.metrics["verification"]["fold_accuracies"],
                               expected.accuracies)
