"""`qualiface demo`: Train QCFace on the embedded synthetic set (or --data), evaluate it and write an HTML report.

The library is imported lazily inside the commands so that ``qualiface --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path

import typer

from qualiface.cli.common import fail
from qualiface.errors import QualifaceError


def command(
    data: Path = typer.Option(None, "--data", help="Image folder root/<identity>/<image> or an "
                              "InsightFace .rec to use instead of the synthetic faces (split "
                              "by identity: the held-out identities are evaluated)."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output folder (report.html, "
                             "metrics.json, PNG plots, train/ with the model package)."),
    steps: int = typer.Option(0, "--steps", help="Training steps (overrides the config)."),
    epochs: float = typer.Option(0.0, "--epochs", help="Training epochs (overrides the config)."),
    seed: int = typer.Option(None, "--seed", help="Seed for the model, data, split and pairs."),
    config: Path = typer.Option(None, "--config", help="Training config (default "
                                "configs/demo_nano.yaml)."),
    overrides: list[str] = typer.Option(None, "--set", help="Config override key=value "
                                        "(repeatable), e.g. --set optim.lr=0.05."),
    num_pairs: int = typer.Option(0, "--num-pairs", help="Evaluation pairs, half genuine "
                                  "(default: the config's val.num_pairs)."),
    threads: int = typer.Option(0, "--threads", help="Torch CPU threads (0: the idle cores)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
) -> None:
    """Train QCFace on the embedded synthetic set (or --data), evaluate it and write an HTML report.

    Needs no data, no GPU and no download: `qualiface demo` trains a tiny IResNet with the
    QCFace head on procedural faces, evaluates verification (k-fold accuracy, ROC, TAR@FAR) and
    the quality score (EDC, pAUC, Spearman against the recorded degradation severity) on
    held-out identities, and writes runs/demo/report.html.
    """
    from qualiface.demo import DemoOptions, run_demo

    for arg in overrides or []:
        if "=" not in arg:
            raise fail(f"--set '{arg}': overrides must look like key=value")
    options = DemoOptions(out_dir=out, data=data, config=config, overrides=list(overrides or []),
                          steps=steps, epochs=epochs, seed=seed, threads=threads,
                          num_pairs=num_pairs, progress=progress)
    try:
        run_demo(options)
    except (QualifaceError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None
