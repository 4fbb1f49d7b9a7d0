"""Exact resume: a run killed mid-training (SIGKILL) and resumed ends bitwise identical to an
uninterrupted one; SIGTERM writes a final checkpoint and exits cleanly. Runs the real CLI in
subprocesses (tiny IResNet, a small image folder, CPU, one thread)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

TOTAL_STEPS = 16
CHECKPOINT_EVERY = 4


def make_folder(root: Path, identities: int = 6, per_identity: int = 8, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for ident in range(identities):
        proto = rng.integers(0, 256, (size, size, 3))
        folder = root / f"id{ident:02d}"
        folder.mkdir(parents=True)
        for k in range(per_identity):
            noisy = np.clip(proto + rng.integers(-30, 31, proto.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(folder / f"{k}.png")
    return root


def write_config(tmp_path: Path, data_root: Path, out: Path, **data) -> Path:
    cfg = {
        "model": {"backbone": "iresnet-nano", "params": {"input_size": 16, "base_width": 4, "embedding_size": 16}},
        "head": {"name": "adaface"},  # has EMA buffers, which must survive the restart
        "data": {"name": "folder", "params": {"root": str(data_root)}, "num_workers": 0, **data},
        "optim": {"lr": 0.05},
        "schedule": {"kind": "cosine", "warmup_steps": 3},
        "train": {"steps": TOTAL_STEPS, "batch_size": 8, "grad_accum": 2, "device": "cpu",
                  "output_dir": str(out), "checkpoint_every": CHECKPOINT_EVERY, "log_every": 1,
                  "progress": False, "seed": 5},
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(config: Path, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "qualiface", "train", str(config), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    # The trainer may be mid-way through writing the last line: count complete lines only.
    complete = path.read_text().split("\n")[:-1]
    steps = [json.loads(line)["step"] for line in complete if line.strip()]
    return max(steps, default=0)


def wait_until(proc: subprocess.Popen, condition, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training ended early (rc {proc.returncode}):\n{proc.stdout.read()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the training subprocess")
        time.sleep(0.02)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "final.safetensors")


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"


def uninterrupted_run(tmp):
    """One uninterrupted CLI run in ``tmp``: (tmp folder, data folder, its final weights)."""
    data = make_folder(tmp / "faces")
    out = tmp / "straight"
    proc = launch(write_config(tmp, data, out))
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    return tmp, data, final_weights(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return uninterrupted_run(tmp_path_factory.mktemp("resume"))


@pytest.mark.slow
def test_sigkill_at_random_step_then_resume_is_bitwise_identical(reference):
    tmp, data, expected = reference
    out = tmp / "killed"
    config = write_config(tmp, data, out)
    kill_after = random.Random(1234).randint(CHECKPOINT_EVERY + 1, TOTAL_STEPS - 3)
    proc = launch(config)
    wait_until(proc, lambda: (out / "checkpoint.pt").exists() and logged_steps(out) >= kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 0 < saved["global_step"] < TOTAL_STEPS  # really killed mid-run, after a checkpoint

    resumed = launch(config, "resume=true")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert f"resuming from {out / 'checkpoint.pt'} at step {saved['global_step']}" in " ".join(output.split())
    assert_bitwise_equal(final_weights(out), expected)


@pytest.mark.slow
def test_sigterm_writes_checkpoint_and_exits_cleanly(reference):
    tmp, data, expected = reference
    out = tmp / "terminated"
    config = write_config(tmp, data, out, cache="never")  # also covers the DataLoader path
    proc = launch(config)
    wait_until(proc, lambda: logged_steps(out) >= CHECKPOINT_EVERY + 2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output and "resume=true" in output
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["global_step"] >= CHECKPOINT_EVERY + 2  # the final checkpoint, not the periodic one
    resumed = launch(config, "resume=true")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert_bitwise_equal(final_weights(out), expected)
