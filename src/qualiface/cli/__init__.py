"""The ``qualiface`` command line: one typer app, each sub-command a thin call into the library.

Every sub-command lives in its own module here (``cli/<name>.py``) and imports torch and the
heavy parts lazily inside the command, so ``qualiface --help`` stays instant.
"""

from __future__ import annotations

import typer

from qualiface.cli import align, data, demo, embed, eval, export, search, train

app = typer.Typer(
    name="qualiface",
    help=(
        "Quality-aware face recognition: every face image gets an identity embedding and an "
        "explicit recognizability score. Train (QCFace, EQFace, QGFace and baselines), evaluate "
        "recognition and quality, and deploy (embed, export, search)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("demo")(demo.command)
app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
    train.command
)
app.add_typer(eval.app, name="eval")
app.command("embed")(embed.command)
app.add_typer(export.app, name="export")
app.command("align")(align.command)
app.add_typer(search.app, name="search")
app.add_typer(data.app, name="data")


def main() -> None:
    app()
