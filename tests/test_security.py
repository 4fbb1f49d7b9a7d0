"""Untrusted files run nothing and write nothing outside the output folder.

A static scan of ``src/`` refuses every unpickling / code-evaluating call; then a suite of
hostile files (pickles whose ``__reduce__`` calls ``os.system`` or ``eval``, safetensors
headers that lie, wrongly typed model JSON and training YAML, path traversal in list files,
pairs files and RecordIO identity names) goes through every loader and CLI entry point that
accepts them. Each must be refused with a clear error naming the file, no marker file may
appear (nothing ran), and nothing may be written outside the output folder.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_bad_data import record_counts
from typer.testing import CliRunner

from qualiface.cli import app
from qualiface.data.decode import DataError, encode_jpeg

SRC = Path(__file__).resolve().parents[1] / "src" / "qualiface"
runner = CliRunner()


# ----------------------------------------------------------------------------- static scan

#: Calls that are refused wherever they appear (module, attribute) -> why.
ALWAYS_REFUSED = {
    ("pickle", "load"): "pickle.load runs code from the file",
    ("pickle", "loads"): "pickle.loads runs code from the data",
    ("pickle", "Unpickler"): "a plain Unpickler runs code (subclass with find_class instead)",
    ("marshal", "load"): "marshal.load", ("marshal", "loads"): "marshal.loads",
    ("shelve", "open"): "shelve unpickles", ("dill", "load"): "dill.load",
    ("dill", "loads"): "dill.loads", ("joblib", "load"): "joblib.load unpickles",
    ("yaml", "unsafe_load"): "yaml.unsafe_load", ("yaml", "full_load"): "yaml.full_load",
    ("yaml", "load_all"): "yaml.load_all without SafeLoader",
    ("os", "system"): "os.system", ("os", "popen"): "os.popen",
    ("shutil", "unpack_archive"): "archive extraction without a traversal check",
}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader"}

#: Reviewed exceptions: (file relative to src/qualiface, call text) -> why it is safe.
#: Empty: train/local_launch.py now reads its ranks' results with weights_only=True as well.
ALLOWED: dict[tuple[str, str], str] = {}


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted origin (``import numpy as np`` -> np: numpy, ``from pickle import
    load`` -> load: pickle.load)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(path: Path) -> list[tuple[int, str, str]]:
    """``(line, call text, why)`` for every refused call in one source file."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases) or ""
        module, _, attribute = name.rpartition(".")
        if not name and isinstance(node.func, ast.Attribute):  # e.g. tarfile.open(p).extractall
            attribute = node.func.attr
        module = module.split(".")[0]
        why = None
        if (module, attribute) in ALWAYS_REFUSED:
            why = ALWAYS_REFUSED[(module, attribute)]
        elif name in ("eval", "exec") or name in ("builtins.eval", "builtins.exec"):
            why = f"{name}() evaluates code"
        elif module == "torch" and attribute == "load":
            if not _is_true(_keyword(node, "weights_only")):
                why = "torch.load without weights_only=True unpickles arbitrary objects"
        elif module == "numpy" and attribute == "load":
            flag = _keyword(node, "allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                why = "np.load with allow_pickle (object arrays are pickles)"
        elif module == "yaml" and attribute == "load":
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            loader_name = (_dotted(loader, aliases) or "").rpartition(".")[2] if loader else ""
            if loader_name not in SAFE_YAML_LOADERS:
                why = "yaml.load without SafeLoader constructs arbitrary objects"
        elif attribute in ("extractall", "extract") and _keyword(node, "filter") is None:
            why = "archive extraction without filter='data' can write outside the target"
        elif module == "subprocess" and _is_true(_keyword(node, "shell")):
            why = "subprocess with shell=True"
        if why:
            found.append((node.lineno, ast.get_source_segment(source, node) or name, why))
    return found


def test_no_code_path_unpickles_or_evaluates_untrusted_input(request):
    files = sorted(SRC.rglob("*.py"))
    offenders = []
    for path in files:
        relative = path.relative_to(SRC).as_posix()
        for line, text, why in unsafe_calls(path):
            if (relative, " ".join(text.split())) not in ALLOWED:
                offenders.append(f"src/qualiface/{relative}:{line}: {text[:90]} -- {why}")
    assert not offenders, "unsafe loading calls:\n" + "\n".join(offenders)
    record_counts(request, files_tried=len(files))


def test_the_scanner_catches_each_pattern(tmp_path):
    # Guard against a scanner that passes everything: every line here must be reported.
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle, torch, yaml, tarfile, subprocess\n"
        "import numpy as np\n"
        "from pickle import loads as pl\n"
        "pickle.load(f)\n"
        "pl(b'')\n"
        "torch.load(p)\n"
        "torch.load(p, weights_only=False)\n"
        "np.load(p, allow_pickle=True)\n"
        "yaml.load(text, Loader=yaml.Loader)\n"
        "yaml.load(text)\n"
        "eval('1')\n"
        "exec('x = 1')\n"
        "tarfile.open(p).extractall('out')\n"
        "subprocess.run('ls', shell=True)\n"
    )
    assert [line for line, _, _ in unsafe_calls(bad)] == list(range(4, 15))
    good = tmp_path / "good.py"
    good.write_text(
        "import torch, yaml\nimport numpy as np\n"
        "torch.load(p, weights_only=True)\nnp.load(p)\nnp.load(p, allow_pickle=False)\n"
        "yaml.safe_load(t)\nyaml.load(t, Loader=yaml.SafeLoader)\nmodel.eval()\n"
        "tarfile.open(p).extractall('out', filter='data')\n"
    )
    assert unsafe_calls(good) == []


# ----------------------------------------------------------------------------- payloads


class RunsShell:
    """Unpickling this calls os.system (what a hostile .bin / .pt would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class RunsEval:
    """Unpickling this calls eval on a string that writes the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return eval, (f"__import__('pathlib').Path({str(self.marker)!r}).write_text('ran')",)


PAYLOADS = {"os.system": RunsShell, "eval": RunsEval}


def outside_writes(tmp_path: Path, allowed: Path, before: set[Path]) -> list[Path]:
    """Files that appeared under ``tmp_path`` but not under ``allowed``."""
    now = {p for p in tmp_path.rglob("*") if p.is_file()}
    return sorted(p for p in now - before if allowed not in p.parents)


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a hostile file ran code"


def _jpeg(side: int = 8) -> bytes:
    return encode_jpeg(torch.full((3, side, side), 100, dtype=torch.uint8))


@pytest.mark.parametrize("payload", PAYLOADS)
def test_hostile_bin_runs_nothing_in_loader_dataset_or_cli(tmp_path, marker, payload, request):
    from qualiface.data.verification_bin import VerificationBinDataset, load_verification_bin

    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps(([_jpeg(), _jpeg()], [PAYLOADS[payload](marker)]), protocol=2))
    for load in (load_verification_bin, VerificationBinDataset):
        with pytest.raises(DataError, match="refused to unpickle") as caught:
            load(path)
        assert str(path) in str(caught.value)
    result = runner.invoke(app, ["data", "info", str(path)])
    assert result.exit_code == 1 and "refused to unpickle" in result.output
    assert "Traceback" not in result.output
    record_counts(request, files_tried=1)


def _hostile_checkpoint(path: Path, marker: Path, payload: str, zipped: bool) -> None:
    state = {"format_version": 1, "global_step": 3, "evil": PAYLOADS[payload](marker)}
    if zipped:
        torch.save(state, path)  # torch's zip format with a pickle inside
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))  # legacy raw pickle


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "raw-pickle"])
@pytest.mark.parametrize("payload", PAYLOADS)
def test_hostile_checkpoint_runs_nothing(tmp_path, marker, payload, zipped, request):
    from qualiface.train.checkpoint import CheckpointError, load_checkpoint

    path = tmp_path / "checkpoint.pt"
    _hostile_checkpoint(path, marker, payload, zipped)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert str(path) in str(caught.value)
    record_counts(request, files_tried=1)


def test_hostile_checkpoint_in_a_resumed_run_is_refused_by_the_cli(tmp_path, marker, request):
    faces = tmp_path / "faces"
    for ident in range(2):
        (faces / f"id{ident}").mkdir(parents=True)
        for k in range(4):
            # The model's input size: wrong-size images would be skipped as bad samples.
            (faces / f"id{ident}" / f"{k}.jpg").write_bytes(_jpeg(16))
    out = tmp_path / "run"
    out.mkdir()
    _hostile_checkpoint(out / "checkpoint.pt", marker, "os.system", zipped=True)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"backbone": "iresnet-nano",
                  "params": {"input_size": 16, "base_width": 2, "embedding_size": 4}},
        "head": {"name": "arcface"},
        "data": {"name": "folder", "params": {"root": str(faces)}, "num_workers": 0},
        "train": {"steps": 2, "batch_size": 4, "device": "cpu", "output_dir": str(out),
                  "progress": False, "resume": True},
    }))
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 1, result.output
    assert "checkpoint.pt" in result.output and "Traceback" not in result.output
    assert not (out / "final.safetensors").exists()  # refused before any training
    record_counts(request, files_tried=1)


def test_pickled_object_arrays_in_tables_are_refused(tmp_path, marker):
    from qualiface.infer.io import TableError, read_table

    path = tmp_path / "features.npz"
    evil = np.empty(1, dtype=object)
    evil[0] = RunsShell(marker)
    np.savez(path, ids=evil)  # numpy pickles object arrays
    with pytest.raises(TableError, match="features.npz"):
        read_table(path)


# ----------------------------------------------------------------------------- safetensors


def _tiny_package(folder: Path) -> Path:
    from qualiface.backbones import build_backbone
    from qualiface.heads.quality import NormQuality
    from qualiface.infer.model import save_model_package

    kwargs = {"embedding_size": 4, "input_size": 16, "base_width": 2}
    torch.manual_seed(0)
    save_model_package(folder, backbone=build_backbone("iresnet-nano", **kwargs),
                       backbone_name="iresnet-nano", backbone_kwargs=kwargs,
                       quality_estimator=NormQuality(), head_name="arcface")
    return folder


def _rewrite_header(weights: Path, edit) -> None:
    blob = weights.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    weights.write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + length:])


def _first_tensor(header: dict) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


SAFETENSORS_LIES = {
    "offsets past the end": lambda h: _first_tensor(h).update(data_offsets=[0, 10**12]),
    "shape larger than its bytes": lambda h: _first_tensor(h).update(shape=[10**6, 10**6]),
    "negative-looking offsets": lambda h: _first_tensor(h).update(data_offsets=[50, 10]),
    "unknown dtype": lambda h: _first_tensor(h).update(dtype="Q128"),
    "offset not a number": lambda h: _first_tensor(h).update(data_offsets=["a", "b"]),
}


@pytest.mark.parametrize("lie", SAFETENSORS_LIES)
def test_safetensors_header_that_lies_is_refused(tmp_path, lie, request):
    from qualiface.infer.model import Model, ModelPackageError

    package = _tiny_package(tmp_path / "pkg")
    _rewrite_header(package / "weights.safetensors", SAFETENSORS_LIES[lie])
    with pytest.raises(ModelPackageError, match="weights.safetensors"):
        Model.load(package)
    record_counts(request, files_tried=1)


def test_safetensors_header_length_beyond_the_file_is_refused(tmp_path):
    from qualiface.infer.model import Model, ModelPackageError

    package = _tiny_package(tmp_path / "pkg")
    weights = package / "weights.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", 2**62) + blob[8:])  # claims a 4 EB header
    with pytest.raises(ModelPackageError, match="weights.safetensors"):
        Model.load(package)


MODEL_JSON_EDITS = {
    "kwargs value of the wrong type": lambda d: d["backbone"]["kwargs"].update(base_width="two"),
    "unknown backbone kwarg": lambda d: d["backbone"]["kwargs"].update(run="rm -rf /"),
    "backbone name that is code": lambda d: d["backbone"].update(name="os.system"),
    "kwargs not a mapping": lambda d: d["backbone"].update(kwargs=["iresnet"]),
    "quality kind unknown": lambda d: d["quality"]["config"].update(kind="__import__"),
    "quality config wrong type": lambda d: d["quality"].update(config="norm"),
    "top level a list": lambda d: (d.clear(), d.update({"format": ["qualiface-model"]})),
    "mean of strings": lambda d: d["input"].update(mean=["0.5", "0.5", "0.5"]),
}


@pytest.mark.parametrize("edit", MODEL_JSON_EDITS)
def test_model_json_with_unexpected_types_is_refused(tmp_path, edit, request):
    from qualiface.infer.model import Model, ModelPackageError

    package = _tiny_package(tmp_path / "pkg")
    spec = package / "model.json"
    data = json.loads(spec.read_text())
    MODEL_JSON_EDITS[edit](data)
    spec.write_text(json.dumps(data))
    with pytest.raises(ModelPackageError) as caught:
        Model.load(package)
    assert "pkg" in str(caught.value)
    record_counts(request, files_tried=1)


def test_deeply_nested_model_json_is_a_clean_error(tmp_path):
    from qualiface.infer.model import Model, ModelPackageError

    package = _tiny_package(tmp_path / "pkg")
    (package / "model.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelPackageError, match="model.json"):
        Model.load(package)


# ----------------------------------------------------------------------------- configs


YAML_ATTACKS = {
    "python object tag": "train: !!python/object/apply:os.system ['touch {marker}']\n",
    "python name tag": "model: {backbone: !!python/name:os.system ''}\n",
    "steps as text": "train: {steps: ten}\n",
    "section as a list": "optim: [0.1, 0.9]\n",
    "params as a string": "model: {params: 'input_size=8'}\n",
    "unknown key": "train: {__class__: 1}\n",
    "boolean for a number": "optim: {lr: yes}\n",
}


@pytest.mark.parametrize("attack", YAML_ATTACKS)
def test_training_yaml_with_hostile_or_mistyped_values_is_refused(tmp_path, marker, attack,
                                                                  request):
    from qualiface.config import ConfigError, load_config

    path = tmp_path / "train.yaml"
    path.write_text(YAML_ATTACKS[attack].replace("{marker}", str(marker)))
    with pytest.raises(ConfigError, match="train.yaml"):
        load_config(path)
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 1 and "train.yaml" in result.output, result.output
    assert "Traceback" not in result.output
    record_counts(request, files_tried=1)


def test_deeply_nested_training_yaml_is_a_clean_error(tmp_path):
    from qualiface.config import ConfigError, load_config

    path = tmp_path / "train.yaml"
    path.write_text("model: {params: {x: " + "[" * 50_000 + "]" * 50_000 + "}}\n")
    with pytest.raises(ConfigError, match="train.yaml"):
        load_config(path)


def test_dataset_params_of_the_wrong_type_fail_before_training(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"name": "folder", "params": {"root": {"nested": 1}}},
        "model": {"backbone": "iresnet-nano", "params": {"input_size": 16}},
        "train": {"steps": 1, "device": "cpu", "output_dir": str(tmp_path / "out"),
                  "progress": False},
    }))
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


# ----------------------------------------------------------------------------- traversal


@pytest.mark.parametrize("line", ["../../etc/passwd 0", "/etc/passwd 0",
                                  "faces/../../../etc/passwd 1", "..\\..\\secret.jpg 0"])
def test_list_file_paths_cannot_leave_the_root(tmp_path, line):
    from qualiface.data.folder import DatasetError, ListFileDataset

    root = tmp_path / "data"
    root.mkdir()
    manifest = root / "train.txt"
    manifest.write_text(f"ok.jpg 0\n{line}\n")
    if "\\" in line:  # a backslash is an ordinary file-name character on POSIX
        dataset = ListFileDataset(manifest)
        assert all(Path(p).parent == root for p in dataset.paths)
        return
    with pytest.raises(DatasetError, match=r"train.txt:2"):
        ListFileDataset(manifest)


@pytest.mark.parametrize("line", ["../../etc 1 2", "a 1 ../x 2", ".. 1 2", "a/b 1 2"])
def test_pairs_file_names_cannot_leave_the_image_folder(tmp_path, line):
    from qualiface.data.lfw import PairsFormatError, read_pairs

    path = tmp_path / "pairs.txt"
    path.write_text(line + "\n")
    with pytest.raises(PairsFormatError, match="pairs.txt:1"):
        read_pairs(path)


@pytest.mark.parametrize("name", ["../../escaped", "<absolute>", ".."])
def test_unpack_cannot_write_outside_the_output_folder(tmp_path, name, request):
    from qualiface.data.recordio import IDENTITIES_FILE, RecordIOWriter

    if name == "<absolute>":
        name = str(tmp_path / "absolute-escape")
    source = tmp_path / "packed"
    with RecordIOWriter(source / "train", identity_names=["alice", "bob"]) as writer:
        writer.add(_jpeg(), 0)
        writer.add(_jpeg(), 1)
    # A hostile identities.txt next to an otherwise valid .rec
    (source / IDENTITIES_FILE).write_text(f"0\talice\n1\t{name}\n")
    out = tmp_path / "deep" / "er" / "out"
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    result = runner.invoke(app, ["data", "unpack", str(source / "train.rec"), str(out)])
    record_counts(request, files_tried=1)
    escaped = outside_writes(tmp_path, out, before)
    assert not escaped, f"unpack wrote outside {out}: {escaped}"
    assert result.exit_code == 1 and "identities.txt" in result.output, result.output


def test_no_module_extracts_archives():
    # If archive extraction is ever added it needs a traversal test here (and filter='data',
    # which the static scan enforces).
    users = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
             if any(word in p.read_text(encoding="utf-8")
                    for word in ("import tarfile", "import zipfile", "unpack_archive"))]
    assert users == []
