"""`qualiface train`: Train a model from a YAML config with key=value overrides.

The library is imported lazily inside the commands so that ``qualiface --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path

import typer

from qualiface.cli.common import console, fail
from qualiface.errors import QualifaceError


def command(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="YAML config file, or the name of a shipped one (e.g. qcface_r50; see configs/)."),
    overwrite: bool = typer.Option(
        False, "--overwrite",
        help="Start afresh in a train.output_dir that holds a previous run: its checkpoints, metrics and weights are deleted."),
    threads: int = typer.Option(0, "--threads", min=0, help="torch intra-op threads (0: torch's default, one per core)"),
) -> None:
    """Train a model from a YAML config with key=value overrides.

    Overrides follow the config file as dotted key=value pairs, e.g.
    `qualiface train configs/qcface_r50.yaml optim.lr=0.05 head.params.lambda_g=2 resume=true`
    (`resume=true` is short for `train.resume=true`). Under torchrun every process runs this
    same command; the classifier is then sharded across processes. An output folder that holds
    a previous run is refused unless `resume=true` continues it or `--overwrite` replaces it.
    """
    from qualiface.config import check_data_paths, load_config, validate_components
    from qualiface.threads import thread_option
    from qualiface.train.checkpoint import existing_run_files, remove_run_files
    from qualiface.train.loop import TrainingInterrupted, train

    overrides = [_expand_shortcut(arg) for arg in ctx.args]
    for arg in overrides:
        if "=" not in arg:
            raise fail(f"unexpected argument '{arg}': overrides must look like key=value")
    try:
        cfg = load_config(config, overrides)
        validate_components(cfg, source=str(config))
        check_data_paths(cfg, source=str(config))
        previous_run = [] if cfg.train.resume else existing_run_files(cfg.train.output_dir)
        if previous_run and not overwrite:
            raise fail(f"{cfg.train.output_dir}: holds a previous run ({', '.join(p.name for p in previous_run)}); "
                       f"continue it with resume=true, or replace it with --overwrite")
        if previous_run:
            removed = remove_run_files(cfg.train.output_dir)
            console.print(f"--overwrite: removed {len(removed)} file(s) of the previous run in {cfg.train.output_dir}")
        with thread_option(threads):
            result = train(cfg)
    except TrainingInterrupted as exc:
        console.print(f"[yellow]{exc}[/]")
        raise typer.Exit(128 + int(exc.signum)) from None
    except QualifaceError as exc:  # config, data, checkpoint, training, export: the message says it
        raise fail(str(exc)) from None
    if result.final_weights is None:  # a rank > 0 under torchrun: rank 0 wrote (and reports) the outputs
        return
    console.print(f"[bold green]done[/]: {result.global_step} steps; weights {result.final_weights}"
                  + (f"; model package {result.model_package}" if result.model_package else ""))


SHORTCUTS = ("resume", "steps", "epochs", "device", "precision", "output_dir", "seed", "batch_size")


def _expand_shortcut(arg: str) -> str:
    """``resume=true`` -> ``train.resume=true`` for the handful of everyday train keys."""
    key, sep, value = arg.partition("=")
    if sep and key in SHORTCUTS:
        return f"train.{key}={value}"
    return arg
