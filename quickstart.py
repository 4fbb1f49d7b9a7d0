#!/usr/bin/env python3
"""Set up a local environment and run the demo or the test suite: needs only Python 3.10+.

    python3 quickstart.py demo [demo options]   # train + evaluate QCFace on the synthetic set
    python3 quickstart.py test [pytest options] # the whole test suite (what CI runs)

The first call creates ``.venv`` with torch pinned to 2.13.0 and the package (editable) with
its test extras; later calls reuse it until ``pyproject.toml`` changes. Where no NVIDIA GPU is
present it installs the CPU build (``torch==2.13.0+cpu``, from PyTorch's CPU wheel index or a
local wheel pip already knows): a plain ``torch==2.13.0`` from PyPI is a multi-GB CUDA build.
``QUALIFACE_TORCH`` (e.g. ``torch==2.13.0`` or ``torch==2.13.0+cu126``) overrides the choice.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
TORCH_VERSION = "2.13.0"
CPU_WHEEL_INDEX = "https://download.pytorch.org/whl/cpu"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")


def _run(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def has_nvidia_gpu() -> bool:
    """True when an NVIDIA driver is visible (then the default, CUDA, torch build is wanted)."""
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia").exists()


def torch_requirement() -> tuple[str, list[str]]:
    """(requirement, extra pip arguments) for torch on this machine, and say which and why."""
    override = os.environ.get("QUALIFACE_TORCH")
    if override:
        print(f"torch: {override} (from QUALIFACE_TORCH)", flush=True)
        return override, []
    if has_nvidia_gpu():
        print(f"torch: NVIDIA GPU found, installing the CUDA build torch=={TORCH_VERSION}",
              flush=True)
        return f"torch=={TORCH_VERSION}", []
    print(f"torch: no NVIDIA GPU found, installing the CPU build torch=={TORCH_VERSION}+cpu "
          f"(set QUALIFACE_TORCH to choose another build)", flush=True)
    # One retry: where that index is unreachable (an offline mirror serves the wheel instead),
    # pip's default five retries with back-off would cost seconds for each of torch's deps.
    return f"torch=={TORCH_VERSION}+cpu", ["--extra-index-url", CPU_WHEEL_INDEX, "--retries", "1"]


def ensure_environment() -> Path:
    """Create or refresh .venv; return its python."""
    if sys.version_info < (3, 10):
        sys.exit(f"qualiface needs Python 3.10 or newer, this is {sys.version.split()[0]}")
    python = BIN / "python"
    torch_pin, torch_args = torch_requirement()
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + torch_pin.encode()).hexdigest()
    stamp = VENV / ".qualiface-installed"
    if python.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return python
    if not python.exists():
        _run(sys.executable, "-m", "venv", VENV)
    pip = (python, "-m", "pip", "install", "--disable-pip-version-check", "-q")
    _run(*pip, "--upgrade", "pip")
    # torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
    _run(*pip, *torch_args, torch_pin)
    _run(*pip, "-e", ".[test]")
    stamp.write_text(digest + "\n")
    return python


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "setup"}:
        print(__doc__)
        return 2
    python = ensure_environment()
    what, rest = argv[0], argv[1:]
    env = dict(os.environ)
    if what == "setup":
        return 0
    if what == "demo":
        cmd = [str(python), "-m", "qualiface", "demo", *rest]
    else:
        # Two workers for the two cores; tests that spawn processes pin their own threads.
        cmd = [str(python), "-m", "pytest", "-n", "2", "--dist", "loadfile", *rest]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
