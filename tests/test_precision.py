"""Kernel selection: deterministic versus fastest (train.precision.configure_kernels)."""

from __future__ import annotations


def test_configure_kernels_switches_deterministic_mode_both_ways(monkeypatch):
    import torch

    from qualiface.train.precision import configure_kernels

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        configure_kernels(torch.device("cpu"), deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        configure_kernels(torch.device("cpu"), deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
