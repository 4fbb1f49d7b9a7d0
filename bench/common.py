"""Helpers shared by the benchmark scripts in ``bench/``: paths, run provenance, tables, JSON.

Every benchmark writes one JSON file under ``bench/results/`` that says what was measured, on
which machine, with which torch, when, and with which command line, so a number in the docs can
always be traced back to its run. The scripts are run as files (``python bench/x.py``); they put
this folder on ``sys.path`` themselves, so ``import common`` works without installing anything.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from qualiface.errors import QualifaceError
from qualiface.files import json_ready, write_text_atomic

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
SHARED_DATA = REPO.parent / "shared" / "data"


class BenchError(RuntimeError):
    """A benchmark that cannot run as asked (bad flag, missing data, no CUDA); printed cleanly."""


def command_line() -> str:
    """The command that started this process, shell-quoted, as a user would retype it."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def git_commit() -> str | None:
    """The repository's HEAD commit (read-only), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def cpu_model() -> str:
    """The CPU's marketing name (Linux ``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str | None = None) -> dict:
    """Where a benchmark ran: OS, CPU, cores, torch/CUDA versions and the GPU (when used)."""
    import torch

    info: dict = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
        explicit = device is not None and ":" in str(device)
        index = torch.device(device).index if explicit else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update({
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        })
    try:
        load = os.getloadavg()
        info["load_average_1m"] = round(load[0], 2)  # a loaded machine explains slow numbers
    except OSError:
        pass
    return info


def provenance(device: str | None = None) -> dict:
    """The header every results JSON starts with: machine, torch, date, command, commit."""
    import torch

    return {
        "machine": machine_info(device),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "git_commit": git_commit(),
    }


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` as strict, indented JSON atomically (``qualiface.files``)."""
    text = json.dumps(json_ready(payload), indent=2, allow_nan=False) + "\n"
    return write_text_atomic(path, text)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table (cells already formatted as strings)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print a table to stdout with rich (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[str(c) for c in row])
    Console(width=max(120, sum(len(h) + 3 for h in header))).print(table)


def fmt(value, digits: int = 3, *, percent: bool = False) -> str:
    """A number for a table cell: ``-`` for None/NaN, percentages with one decimal."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if percent:
        return f"{100 * value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def parse_list(text: str, cast=str, *, what: str) -> list:
    """``"a,b, c"`` -> ``[cast(a), cast(b), cast(c)]``; a clear ``BenchError`` on a bad item."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise BenchError(f"{what}: empty list")
    try:
        return [cast(t) for t in items]
    except ValueError:
        raise BenchError(f"{what}: cannot read {text!r} as a comma-separated list of "
                         f"{cast.__name__}") from None


def run_main(main, argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a ``BenchError`` or any qualiface error (``QualifaceError``: config,
    data, evaluation, training...) becomes one ``error: ...`` line on stderr and exit status 2
    instead of a traceback. A training stopped by SIGTERM/SIGINT (its checkpoint written) is
    one ``interrupted: ...`` line and exit status 128 + the signal, as a shell reports it."""
    from qualiface.train.loop import TrainingInterrupted

    try:
        main(argv)
    except TrainingInterrupted as exc:
        print(f"interrupted: {exc}; run the same command again to resume", file=sys.stderr)
        return 128 + int(exc.signum)
    except (BenchError, QualifaceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def method_sections(method: str) -> tuple[dict, float | None]:
    """The method-specific part of the shipped config ``configs/<method>_r50.yaml``.

    Returns ``({"head": ..., "pipeline": ..., "train": {"clip_grad_norm": ...}}, epochs)`` where
    ``epochs`` is the shipped ``train.epochs`` (so a benchmark can rescale the method's own
    phase lengths, e.g. EQFace's steps 2-3 or QCFace's warm-up, to its shorter schedule), or
    ``({"head": {"name": method}}, None)`` when no such config ships. Benchmarks take head
    constants from here so they measure the methods exactly as the project configures them.
    """
    import yaml

    path = REPO / "configs" / f"{method}_r50.yaml"
    if not path.is_file():
        return {"head": {"name": method}}, None
    data = yaml.safe_load(path.read_text()) or {}
    sections: dict = {"head": data.get("head", {"name": method})}
    if "pipeline" in data:
        sections["pipeline"] = data["pipeline"]
    clip = (data.get("train") or {}).get("clip_grad_norm")
    if clip is not None:
        sections["train"] = {"clip_grad_norm": clip}
    epochs = (data.get("train") or {}).get("epochs")
    return sections, float(epochs) if epochs is not None else None


def merge(base: dict, extra: dict) -> dict:
    """Recursive dict merge (``extra`` wins); neither input is modified."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def write_figures(json_path: str | os.PathLike, title: str, panels: Sequence[tuple],
                  table: str = "") -> tuple[Path, Path] | None:
    """The figures of a benchmark beside its JSON: ``<stem>.png`` and ``<stem>.md``.

    ``panels``: ``(panel title, values, log)`` each, drawn as one horizontal bar chart;
    ``values`` maps a row label to a number, or to ``{series: number}`` for grouped bars (one
    colour per series, e.g. vectorised vs naive); ``log`` puts the value axis on a log scale.
    Missing or non-finite numbers are left out, and so is a panel with none left. The Markdown
    file holds ``title``, the image and ``table`` (a ``markdown_table``). Returns the two paths,
    or None when no panel has a number (nothing is written then)."""
    cleaned = []
    for name, values, log in panels:
        rows = {}
        for label, value in values.items():
            series = value if isinstance(value, dict) else {"": value}
            series = {k: float(v) for k, v in series.items() if _finite(v) and (not log or v > 0)}
            if series:
                rows[str(label)] = series
        if rows:
            cleaned.append((name, rows, log))
    if not cleaned:
        return None
    import matplotlib

    matplotlib.use("Agg")  # file-only backend: no display on a server
    import matplotlib.pyplot as plt

    json_path = Path(json_path)
    png, md = json_path.with_suffix(".png"), json_path.with_suffix(".md")
    heights = [0.35 * sum(len(s) for s in rows.values()) + 1.2 for _, rows, _ in cleaned]
    fig, axes = plt.subplots(len(cleaned), 1, figsize=(8, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (name, rows, log) in zip(axes[:, 0], cleaned):
        series_names = list(dict.fromkeys(k for s in rows.values() for k in s))
        width = 0.8 / len(series_names)
        for j, series in enumerate(series_names):
            ys = [i + j * width for i, s in enumerate(rows.values()) if series in s]
            xs = [s[series] for s in rows.values() if series in s]
            bars = ax.barh(ys, xs, height=width, label=series or None)
            ax.bar_label(bars, labels=[f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}" for x in xs],
                         fontsize=7, padding=2)
        ax.set_yticks([i + 0.4 - width / 2 for i in range(len(rows))], list(rows))
        ax.invert_yaxis()
        ax.set_title(name, fontsize=10)
        if log:
            ax.set_xscale("log")
        if any(series_names):
            ax.legend(fontsize=8, loc="lower right")
        ax.margins(x=0.15)
    fig.suptitle(textwrap.fill(title, 100), fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    text = f"# {title}\n\n![{title}]({png.name})\n\n{table}"
    write_text_atomic(md, text if text.endswith("\n") else text + "\n")
    return png, md
