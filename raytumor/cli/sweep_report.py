"""``raytumor sweep-report``: the objective against every swept parameter, as HTML and Markdown."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def resolve_experiment_dir(experiment: Path, results_dir: str = "results") -> Path:
    """``experiment`` as a path, else as a name under ``results_dir``."""
    from raytumor.errors import RaytumorError

    for candidate in (experiment, Path(results_dir) / experiment):
        if candidate.is_dir():
            return candidate
    raise RaytumorError(f"{experiment}: no such experiment directory (looked in . and {results_dir}/)")


def sweep_report(
    experiment: Path = typer.Argument(..., help="Experiment directory, or its name under --results-dir."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the report here (default: the experiment directory); not into a training run's directory."),
    results_dir: str = typer.Option("results", help="Where experiments live, for a name."),
) -> None:
    """Report a sweep: the objective against each swept parameter, per loss variant, and parameter importances.

    Writes report.html (self-contained), report.md and report_plots/ from the experiment's
    leaderboard and trial configs. All numbers are on the validation split.
    """
    from raytumor.sweep.report import write_sweep_report

    path = write_sweep_report(resolve_experiment_dir(experiment, results_dir), out=out)
    typer.echo(str(path))
