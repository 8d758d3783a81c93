"""The ``raytumor`` command: one typer sub-app per pipeline stage.

Heavy libraries (torch, ray, monai) are imported inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

import inspect
import sys

import typer

from raytumor.cli import data as data_cli
from raytumor.cli import evaluate as evaluate_cli
from raytumor.cli import masks as masks_cli
from raytumor.cli import pipeline
from raytumor.cli import sweep as sweep_cli
from raytumor.cli import sweep_report as sweep_report_cli
from raytumor.cli import train as train_cli

app = typer.Typer(
    name="raytumor",
    help="Triplet contrastive learning for brain-tumour MRI embeddings, on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # click's plain help: rich's panels printed <bool> beside every flag
)
app.add_typer(data_cli.app, name="data")
app.add_typer(masks_cli.app, name="masks")
app.command("demo")(pipeline.demo)
app.command("pretrain")(train_cli.pretrain)
app.command("train")(train_cli.train)
app.command("sweep")(sweep_cli.sweep)
app.command("sweep-report")(sweep_report_cli.sweep_report)
app.command("evaluate")(evaluate_cli.evaluate)
app.add_typer(evaluate_cli.index_app, name="index")
app.command("search")(evaluate_cli.search)


def _unwrap_help(typer_app: typer.Typer) -> None:
    """Join the hard-wrapped lines of every command's docstring into paragraphs, and list each
    command (and command group) by its whole first paragraph.

    Typer 0.29 keeps a docstring's line breaks after its first paragraph, so at 80 columns
    the help came out ragged ("... on the val split; the best" / "model by val Recall_M ...").
    Click cuts a command's summary in a list at about 45 characters unless it has its own.
    """
    for command in typer_app.registered_commands:
        text = inspect.cleandoc(command.help or command.callback.__doc__ or "")
        command.help = "\n\n".join(" ".join(p.split("\n")) for p in text.split("\n\n"))
        command.short_help = command.short_help or command.help.split("\n\n")[0]
    for group in typer_app.registered_groups:
        group.short_help = group.short_help or group.typer_instance.info.help
        _unwrap_help(group.typer_instance)


_unwrap_help(app)


def main() -> None:
    """Entry point: user-facing errors, and OS errors about a file (permission denied, a file
    where a directory should be), become one line on stderr and exit code 2."""
    from raytumor.errors import RaytumorError

    try:
        app()
    except RaytumorError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    except OSError as exc:
        if exc.filename is None:  # not about a path the user gave: a bug, keep its traceback
            raise
        where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        typer.secho(f"error: {where}: {exc.strerror or exc}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)
