"""Device names from the command line and the config: one check, one-line errors."""

from __future__ import annotations

import pytest
import torch

from qualiface.devices import DeviceError, parse_device


def test_valid_names_become_torch_devices():
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu", "cuda0", "", "cpu:x"])
def test_a_typo_names_itself_and_the_valid_forms(name):
    with pytest.raises(DeviceError, match=f"'{name}' is not a device name \\(use cpu, cuda or cuda:<index>\\)"):
        parse_device(name)


def test_cuda_without_cuda_is_refused_before_any_work(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="'cuda:0' requested but CUDA is not available"):
        parse_device("cuda:0")


def test_a_cuda_index_past_the_last_device_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_device("cuda:1") == torch.device("cuda", 1)
    assert parse_device("cuda") == torch.device("cuda")
    with pytest.raises(DeviceError, match=r"'cuda:2' requested but this machine has 2 CUDA devices \(cuda:0 to cuda:1\)"):
        parse_device("cuda:2")


def test_a_model_package_and_a_training_config_report_it_under_their_own_name(monkeypatch):
    from qualiface.config import ConfigError
    from qualiface.infer.model import Model, ModelPackageError
    from qualiface.train.build import resolve_device

    with pytest.raises(ModelPackageError, match="^device 'gpu' is not a device name"):
        Model.load("/nonexistent/package", device="gpu")  # the device is checked before the files
    with pytest.raises(ConfigError, match="^train.device: 'gpu' is not a device name .*; or auto$"):
        resolve_device("gpu", torch.device("cpu"))
    assert resolve_device("auto", torch.device("cpu")) == torch.device("cpu")
