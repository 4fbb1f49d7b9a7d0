"""Config loading: YAML + dotted overrides, type checks, unknown keys, shipped configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from qualiface.config import (
    ConfigError,
    TrainingConfig,
    apply_overrides,
    check_params,
    load_config,
    save_config,
    to_dict,
    validate_components,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def write(tmp_path, data) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_yaml_values(tmp_path):
    path = write(tmp_path, {"optim": {"lr": 0.2}, "train": {"batch_size": 64, "epochs": 3}})
    cfg = load_config(path)
    assert isinstance(cfg, TrainingConfig)
    assert cfg.optim.lr == 0.2 and cfg.train.batch_size == 64 and cfg.train.epochs == 3.0
    assert isinstance(cfg.train.epochs, float)  # int widened to the field's float type
    assert cfg.optim.momentum == 0.9  # untouched default


def test_dotted_overrides_parse_values_and_reach_free_form_params(tmp_path):
    path = write(tmp_path, {"head": {"name": "magface", "params": {"lambda_g": 35}}})
    cfg = load_config(path, ["optim.lr=0.05", "head.params.lambda_g=2", "train.resume=true",
                             "schedule.milestones=[8, 14]", "train.output_dir=runs/x"])
    assert cfg.optim.lr == 0.05
    assert cfg.head.params == {"lambda_g": 2}
    assert cfg.train.resume is True
    assert cfg.schedule.milestones == [8, 14]
    assert cfg.train.output_dir == "runs/x"


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, {"optim": {"learning_rate": 0.1}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "optim.learning_rate" in str(err.value) and str(path) in str(err.value)
    with pytest.raises(ConfigError, match="train.bogus"):
        load_config(write(tmp_path, {}), ["train.bogus=1"])
    with pytest.raises(ConfigError, match="nosuchsection"):
        load_config(write(tmp_path, {}), ["nosuchsection.x=1"])


@pytest.mark.parametrize(
    "override, field",
    [("optim.lr=fast", "optim.lr"), ("train.batch_size=1.5", "train.batch_size"),
     ("train.resume=3", "train.resume"), ("train.batch_size=true", "train.batch_size"),
     ("schedule.milestones=4", "schedule.milestones"),
     ("schedule.milestones=[8, a]", "schedule.milestones")],  # each element is checked
)
def test_type_errors_name_the_field(tmp_path, override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(write(tmp_path, {}), [override])


def test_choices_and_ranges_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(write(tmp_path, {}), ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="pipeline.name"):
        load_config(write(tmp_path, {}), ["pipeline.name=magic"])
    with pytest.raises(ConfigError, match="grad_accum"):
        load_config(write(tmp_path, {}), ["train.grad_accum=0"])


@pytest.mark.parametrize("override, needle", [
    ("train.clip_grad_norm=-1", r"train\.clip_grad_norm must be in \[0, inf\), got -1 \(0 switches clipping off\)"),
    ("optim.momentum=1.5", r"optim\.momentum must be in \[0, 1\), got 1\.5"),
    ("optim.weight_decay=-0.1", r"optim\.weight_decay must be in"),
    ("schedule.power=-2", r"schedule\.power must be > 0"),
    ("schedule.gamma=5", r"schedule\.gamma must be in \(0, 1\]"),
    ("schedule.milestones=[4, -3]", r"schedule\.milestones\[1\] must be >= 0"),
    ("schedule.min_lr=0.5", r"schedule\.min_lr \(0\.5\) is above optim\.lr \(0\.1\)"),
    ("schedule.warmup_epochs=-1", r"schedule\.warmup_epochs must be in"),
    ("optim.betas=[0.9, 1.5]", r"optim\.betas must be two numbers in \[0, 1\)"),
])
def test_numbers_the_optimizer_would_take_and_train_wrongly_with_are_refused(tmp_path, override, needle):
    # Each used to pass the config check: clipping silently off, a diverging momentum, a step
    # "decay" that grows, a schedule whose floor is above its start.
    with pytest.raises(ConfigError, match=needle):
        load_config(write(tmp_path, {}), [override])
    load_config(write(tmp_path, {}), ["train.clip_grad_norm=0", "schedule.gamma=1", "optim.momentum=0"])


def test_malformed_override_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["optim.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml") as caught:
        load_config(bad)
    # One line that says where, not PyYAML's several lines quoting "<unicode string>".
    assert "\n" not in str(caught.value) and "unicode string" not in str(caught.value)
    assert str(caught.value).endswith("(line 2, column 1)")
    bad.write_text("train:\n  epochs: 1\n  batch_size: 8: 9\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML: mapping values are not "
                                          r"allowed here \(line 3, column 16\)$"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_save_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, {}), ["optim.lr=0.01", "head.params.margin=0.4"])
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert to_dict(again) == to_dict(cfg)


def test_check_params_against_signature():
    def factory(embedding_size, num_classes, margin=0.5, scale=64.0):
        return None

    check_params(factory, {"margin": 0.3}, what="head.params", reserved=("embedding_size", "num_classes"))
    with pytest.raises(ConfigError, match="unknown parameter 'marg'.*margin, scale"):
        check_params(factory, {"marg": 0.3}, what="head.params", reserved=("embedding_size", "num_classes"))
    with pytest.raises(ConfigError, match="num_classes"):
        check_params(factory, {"num_classes": 3}, what="head.params", reserved=("embedding_size", "num_classes"))


def test_validate_components_names_bad_head_param(tmp_path):
    cfg = load_config(write(tmp_path, {"head": {"name": "arcface", "params": {"lambda_g": 1}}}))
    with pytest.raises(ConfigError, match="lambda_g"):
        validate_components(cfg)
    cfg = load_config(write(tmp_path, {"head": {"name": "arcfaze"}}))
    with pytest.raises(ConfigError, match="arcfaze"):
        validate_components(cfg)


@pytest.mark.parametrize("backbone", ["iresnet-nano", "iresnet50", "mobilefacenet"])
def test_validate_components_names_bad_backbone_param_before_building(tmp_path, backbone):
    cfg = load_config(write(tmp_path, {"model": {"backbone": backbone, "params": {"embeding_size": 8}}}))
    with pytest.raises(ConfigError, match="embeding_size.*valid: .*embedding_size"):
        validate_components(cfg)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_parse_and_validate(path):
    cfg = load_config(path)
    validate_components(cfg, source=str(path))


# Heads whose loss sets the norm itself (MagFace's a in [10, 110], QCFace's targets in [1, 100]):
# with the embedding BN's scale frozen at 1 the batch's mean squared norm is pinned at >= D
# (tests/test_backbones.py), so their shipped configs must let that scale learn.
NORM_SETTING_HEADS = {"magface", "qcface", "qcface-cur", "qcface-mv"}


def test_heads_that_set_the_norm_ship_a_learnable_embedding_scale():
    shipped = [(p, load_config(p)) for p in CONFIGS]
    chosen = [(p, c) for p, c in shipped if c.head.name in NORM_SETTING_HEADS]
    assert {c.head.name for _, c in chosen} >= {"magface", "qcface", "qcface-cur"}
    for path, cfg in chosen:
        assert cfg.model.params.get("learnable_embedding_scale") is True, path.name


def test_expected_configs_are_shipped():
    names = {p.stem for p in CONFIGS}
    for method in ("arcface", "cosface", "magface", "adaface", "qcface", "qcface-cur", "eqface",
                   "qgface", "curricular", "mv-softmax"):
        assert f"{method}_r50" in names
    assert "demo_nano" in names
    assert any(n.endswith("_r100") for n in names)


def test_shipped_config_resolves_by_name_from_any_directory(tmp_path, monkeypatch):
    from qualiface.config import resolve_config_path, shipped_config_names

    monkeypatch.chdir(tmp_path)
    assert "qcface_r50" in shipped_config_names()
    assert load_config("qcface_r50").head.name == "qcface"
    assert resolve_config_path("demo_nano.yaml").is_file()
    local = tmp_path / "qcface_r50.yaml"  # a file in the working directory wins over the shipped one
    local.write_text("head: {name: arcface}\n")
    assert load_config("qcface_r50.yaml").head.name == "arcface"
    with pytest.raises(ConfigError, match="no such config file.*qcface_r50"):
        load_config("no_such_config")


def test_exponent_floats_parse_in_files_overrides_and_free_form_params(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  eps: 1E-8\nhead:\n  params: {margin: 5e-1}\n")
    cfg = load_config(path, ["optim.weight_decay=5e-4", "schedule.min_lr='1e-6'"])
    assert cfg.optim.lr == 0.001 and cfg.optim.eps == 1e-8 and cfg.optim.weight_decay == 5e-4
    assert cfg.schedule.min_lr == 1e-6  # a numeric string in a float field is read as a number
    assert cfg.head.params == {"margin": 0.5}  # a float for the constructor, not the text "5e-1"
    assert load_config(path, ["train.steps=12"]).train.steps == 12  # integers stay integers


@pytest.mark.parametrize("override, key", [
    ("optim.lr=.nan", "optim.lr"), ("optim.lr=.inf", "optim.lr"), ("optim.lr=nan", "optim.lr"),
    ("optim.lr=-.inf", "optim.lr"), ("train.epochs=.nan", "train.epochs"),
    ("schedule.min_lr=inf", "schedule.min_lr"), ("distributed.timeout_s=.inf", "distributed.timeout_s"),
    ("data.cache_max_gb=.nan", "data.cache_max_gb"), ("optim.betas=[.nan, 0.999]", "optim.betas[0]"),
    ("head.params.margin=.inf", "head.params.margin"),
])
def test_non_finite_numbers_are_refused_naming_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=re.escape(key) + r": .* is not a finite number"):
        load_config(write(tmp_path, {}), [override])


@pytest.mark.parametrize("override, key", [
    (f"train.seed={2**70}", "train.seed"), ("train.seed=-1", "train.seed"),
    (f"val.seed={2**32}", "val.seed"), ("train.seed=2**70", "train.seed"),
])
def test_seeds_outside_what_numpy_and_torch_accept_are_refused(tmp_path, override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(write(tmp_path, {}), [override])
    assert load_config(write(tmp_path, {}), [f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1


@pytest.mark.parametrize("params, key", [
    ({"input_size": 8}, "model.params.input_size"), ({"input_size": 0}, "model.params.input_size"),
    ({"embedding_size": 0}, "model.params.embedding_size"),
])
def test_backbone_params_the_backbone_cannot_take_name_the_key(tmp_path, params, key):
    cfg = load_config(write(tmp_path, {"model": {"backbone": "iresnet50", "params": params}}))
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate_components(cfg)


def test_output_dir_that_is_not_a_directory_names_the_key(tmp_path):
    for output_dir in ("/dev/null", "/dev/null/run", str(write(tmp_path, {}))):
        cfg = load_config(write(tmp_path, {}), [f"train.output_dir={output_dir}"])
        with pytest.raises(ConfigError, match="train.output_dir: .*not a directory"):
            validate_components(cfg)


def test_integers_read_as_yaml_1_2_decimal_not_1_1_octal(tmp_path):
    # PyYAML's YAML 1.1 read 010 as octal 8 (seed 8, fold 8) and 08 as the text "08".
    path = tmp_path / "cfg.yaml"
    path.write_text("val:\n  folds: [08, 09, 010]\ntrain:\n  seed: 010\n")
    cfg = load_config(path, ["val.seed=0100"])
    assert cfg.val.folds == [8, 9, 10] and cfg.train.seed == 10 and cfg.val.seed == 100
    assert load_config(path, ["train.seed=0x10"]).train.seed == 16
    assert load_config(path, ["train.output_dir=1:30"]).train.output_dir == "1:30"  # not 90


@pytest.mark.parametrize("folds", ["[8.7]", "[true]", "['x']"])
def test_val_folds_are_checked_as_integers(tmp_path, folds):
    # validate.py takes int(f) of each: 8.7 was fold 8 and true was fold 1, silently.
    with pytest.raises(ConfigError, match=r"val\.folds\[0\]: expected an integer"):
        load_config(write(tmp_path, {}), [f"val.folds={folds}"])


def test_save_round_trip_keeps_strings_that_look_like_numbers(tmp_path):
    overrides = ["train.output_dir='1e-3'", "data.params.list_file='08'",
                 "head.params.tag='1e5'", "train.device='0x10'"]
    cfg = load_config(write(tmp_path, {}), overrides)
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert again.data.params == {"list_file": "08"} and again.train.output_dir == "1e-3"
