"""``raytumor sweep``: a YAML search space on Ray Tune + Optuna + ASHA."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer

from raytumor.cli.train import MlflowUriOpt, mlflow_target


def _cell(value) -> str:
    if isinstance(value, float):
        return "-" if value != value else (f"{value:.4f}" if not value.is_integer() else str(int(value)))
    return "-" if value is None else str(value)


def _note_pool_without_masks(search_space, base_tree: dict) -> None:
    """The note of ``raytumor pretrain``, when some trial may pre-train."""
    from raytumor.cli.train import note_pool_without_masks
    from raytumor.config import build_config, merge
    from raytumor.sweep.run import may_be_set
    from raytumor.sweep.space import nest

    fixed = build_config(merge(base_tree, nest(search_space.fixed())), source=search_space.name)
    note_pool_without_masks(fixed, pretraining=may_be_set(search_space, fixed.pretrain.enabled, "pretrain.enabled"))


def sweep(
    space: Path = typer.Argument(..., help="Search-space YAML (see search_spaces/)."),
    name: Optional[str] = typer.Option(None, "--name", help="Experiment name (default: the space's name)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted sweep; finished trials are kept."),
    results_dir: Optional[str] = typer.Option(None, help="Where experiments live (default: the space's results_dir, "
                                              "'results'); a shared path on a cluster."),
    address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster address; default: embedded Ray."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs for the embedded Ray (default: all)."),
    dashboard: bool = typer.Option(True, "--dashboard/--no-dashboard", help="Ray dashboard on 127.0.0.1 (embedded "
                                   "Ray); a sweep needs it (Ray Train frees stopped trials' workers through it)."),
    mlflow: bool = typer.Option(False, "--mlflow/--no-mlflow", help="Also log every trial to MLflow through Ray Tune's "
                                "MLflow logger (needs the 'mlflow' extra); fixed when the sweep starts."),
    mlflow_uri: Optional[str] = MlflowUriOpt,
    mlflow_experiment: Optional[str] = typer.Option(None, "--mlflow-experiment",
                                                    help="MLflow experiment name (default: the sweep's name)."),
) -> None:
    """Sweep a search space with Ray Tune + Optuna (TPE, seeded) and ASHA, selecting by validation Recall_M.

    Each trial pre-trains (when asked) and trains through the same trainer builder as
    `raytumor train`; the test split is never read. Writes the leaderboard and best.yaml into
    the experiment directory; `raytumor train --best` then trains the winner. Every trial's
    run directory, <experiment>/trials/<id>, is one `raytumor evaluate` reads, those ASHA
    stopped early too (from their last checkpoint). TensorBoard logs of every trial:
    tensorboard --logdir <experiment>/tune.
    """
    from rich.console import Console
    from rich.table import Table

    from raytumor.runtime import check_dashboard_for_ray_train, ray_session
    from raytumor.sweep.run import SweepInterrupted, check_sweep, run_sweep

    check_dashboard_for_ray_train(address, dashboard, "a sweep")
    search_space, base_tree, _ = check_sweep(space, name=name, results_dir=results_dir, resume=resume)  # before Ray
    _note_pool_without_masks(search_space, base_tree)
    target = None
    if mlflow:
        target = mlflow_target(True, mlflow_uri, mlflow_experiment or name or search_space.name)
    try:
        with ray_session(address, num_cpus=num_cpus, dashboard=dashboard):
            result = run_sweep(space, name=name, results_dir=results_dir, resume=resume, mlflow=target)
    except SweepInterrupted as interrupted:
        again = f"raytumor sweep {shlex.quote(str(space))} --resume"
        again += f" --name {shlex.quote(name)}" if name is not None else ""
        again += f" --results-dir {shlex.quote(results_dir)}" if results_dir else ""
        typer.echo(f"{interrupted}; no best config chosen. Continue it with: {again}", err=True)
        raise
    board = result.leaderboard
    table = Table(title=f"Leaderboard: {result.experiment_dir.name} (validation split)")
    params = [c for c in board.columns if c.startswith("param:")]
    for column in ["trial_id", *[p[6:] for p in params], "objective", "best_epoch", "epochs_run", "status"]:
        table.add_column(column)
    for values in board.head(10).to_dict("records"):
        cells = [str(values["trial_id"]), *(_cell(values.get(p)) for p in params)]
        cells += [_cell(values.get("objective")), _cell(values.get("best_epoch")),
                  _cell(values.get("epochs_run")), str(values.get("status", ""))]
        table.add_row(*cells)
    Console().print(table)
    typer.echo(f"best config: {result.best_config_path} (val Recall_M {result.best_value:.4f})")
    from raytumor.errors import RaytumorError
    from raytumor.sweep.report import write_sweep_report

    try:
        typer.echo(f"sweep report: {write_sweep_report(result.experiment_dir)}")
    except RaytumorError as exc:  # the sweep itself finished; say why there is no report
        typer.echo(f"no sweep report: {exc}")
    typer.echo("next: raytumor train --best && raytumor evaluate")
