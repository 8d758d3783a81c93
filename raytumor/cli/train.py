"""``raytumor pretrain`` and ``raytumor train``: Ray Train runs from a typed YAML config."""

from __future__ import annotations

import contextlib
import json
import shlex
from pathlib import Path
from typing import List, Optional

import typer

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML run config (see configs/); defaults apply to missing keys.")
SetOpt = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", help="Override a config key, e.g. --set train.margin=0.5 (repeatable).")
NameOpt = typer.Option(None, "--name", help="Run name (directory under output_dir); overrides the config's name.")
ResumeOpt = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint.")
AddressOpt = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster address; default: an embedded Ray.")
CpusOpt = typer.Option(None, help="CPUs for the embedded Ray (default: all).")
DashboardOpt = typer.Option(True, "--dashboard/--no-dashboard", help="Ray dashboard on 127.0.0.1 (embedded Ray); "
                            "Ray Train needs it, so --no-dashboard works only with --address (a cluster's own).")
MlflowOpt = typer.Option(False, "--mlflow/--no-mlflow", help="Also log params, per-epoch metrics and result files to "
                         "MLflow (needs the 'mlflow' extra).")
MlflowUriOpt = typer.Option(None, "--mlflow-uri", envvar="MLFLOW_TRACKING_URI",
                            help="MLflow tracking URI (default: sqlite:///mlflow.db in this directory).")
MlflowExperimentOpt = typer.Option("raytumor", "--mlflow-experiment", help="MLflow experiment name.")


def mlflow_target(enabled: bool, uri: Optional[str], experiment: str):
    """The MLflow target of --mlflow, resolved before Ray starts (a missing extra fails fast)."""
    if not enabled:
        return None
    from raytumor.train.tracking import mlflow_target as resolve

    target = resolve(uri, experiment)
    typer.echo(f"MLflow: experiment {target.experiment!r} at {target.tracking_uri}")
    return target


def _load(config: Optional[Path], overrides: Optional[List[str]], name: Optional[str], extra: list[str]):
    from raytumor.config import load_config

    overrides = list(overrides or []) + extra
    if name is not None:
        overrides.append(f"name={json.dumps(name)}")  # a string even when it reads as a number or is empty
    return load_config(config, overrides)


@contextlib.contextmanager
def _resume_hint_on_interrupt(run_config, config_args: List[str], overrides: Optional[List[str]],
                              name: Optional[str], command: str = "train"):
    """After Ctrl-C, say how to continue the run: its checkpoints are kept. ``config_args``:
    the options that named its config (``-c FILE``, or ``--best`` and the sweep)."""
    try:
        yield
    except KeyboardInterrupt:
        again = [f"raytumor {command}", *config_args]
        again += [f"--set {shlex.quote(item)}" for item in overrides or []]
        again += [f"--name {shlex.quote(name)}"] if name is not None else []
        run_dir = Path(run_config.output_dir) / run_config.name
        # On a line of its own: a progress bar may have been left mid-line.
        typer.echo(f"\ntraining interrupted; {run_dir} keeps its checkpoints. Continue it with: "
                   f"{' '.join(again)} --resume", err=True)
        raise


def _config_args(config: Optional[Path], experiment: Optional[Path] = None, results_dir: str = "results") -> List[str]:
    if experiment is not None:  # --best: resumed the same way, so the run is recorded as the sweep's best again
        return ["--best", "--from", shlex.quote(str(experiment))] + (
            ["--results-dir", shlex.quote(results_dir)] if results_dir != "results" else [])
    return ["-c", shlex.quote(str(config))] if config else []


def _print_result(result, stage: str) -> None:
    typer.echo(f"{stage} finished: {result.run_dir}")
    if result.best_metrics:
        m = result.best_metrics
        typer.echo(
            f"best epoch {result.best_epoch}: val Recall_M {m.get('val_recall_macro', float('nan')):.3f}, "
            f"Recall_mu {m.get('val_recall_micro', float('nan')):.3f}, "
            f"Recall_M* {m.get('val_recall_macro_rare', float('nan')):.3f}, Rank-5 {m.get('val_rank5', float('nan')):.3f}"
        )


def note_pool_without_masks(run_config, *, pretraining: bool | None = None) -> None:
    """Say so when pre-training (``run_config``'s, or as ``pretraining`` says) will see unlabelled
    cases without a mask: they get an empty mask channel."""
    pretraining = run_config.pretrain.enabled if pretraining is None else pretraining
    if not (pretraining and run_config.pretrain.use_unlabelled):
        return
    from raytumor.data.manifest import read_manifest, unlabelled_without_masks

    missing, pool = unlabelled_without_masks(read_manifest(run_config.data.dataset))
    if missing:
        dataset = shlex.quote(str(run_config.data.dataset))
        typer.echo(f"note: {missing} of {pool} unlabelled case(s) have no mask, so pre-training gives them an empty "
                   f"mask channel; the paper pre-trains with pseudo masks: raytumor masks train {dataset} && "
                   f"raytumor masks predict {dataset}", err=True)


def _note_idle_cpus(run_config) -> None:
    import ray

    from raytumor.sweep.run import idle_cpus_note

    note = idle_cpus_note(run_config, ray.cluster_resources())
    if note:
        typer.echo(note, err=True)


def pretrain(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    name: Optional[str] = NameOpt,
    resume: bool = ResumeOpt,
    address: Optional[str] = AddressOpt,
    num_cpus: Optional[int] = CpusOpt,
    dashboard: bool = DashboardOpt,
    mlflow: bool = MlflowOpt,
    mlflow_uri: Optional[str] = MlflowUriOpt,
    mlflow_experiment: str = MlflowExperimentOpt,
) -> None:
    """Contrastive pre-training (NT-Xent, batch-all or batch-hard triplet) on labelled + unlabelled scans.

    TensorBoard scalars go to <run>/tensorboard (tensorboard --logdir runs).
    """
    from raytumor.runtime import check_dashboard_for_ray_train, ray_session
    from raytumor.train.run_dir import PRETRAINED_BACKBONE_FILE, check_run

    check_dashboard_for_ray_train(address, dashboard, "pre-training")

    run_config = _load(config, overrides, name, ["pretrain.enabled=true"])
    check_run(run_config, resume=resume)  # bad input fails before Ray (and torch) load
    note_pool_without_masks(run_config)

    from raytumor.train.trainer import run_training

    target = mlflow_target(mlflow, mlflow_uri, mlflow_experiment)
    with _resume_hint_on_interrupt(run_config, _config_args(config), overrides, name, command="pretrain"):
        with ray_session(address, num_cpus=num_cpus, dashboard=dashboard):
            result = run_training(run_config, resume=resume, stages=("pretrain",), mlflow=target)
    typer.echo(f"pre-training finished: backbone in {result.run_dir / PRETRAINED_BACKBONE_FILE}; "
               f"use it with --set train.pretrained={result.run_dir}")


def train(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    name: Optional[str] = NameOpt,
    resume: bool = ResumeOpt,
    best: bool = typer.Option(False, "--best", help="Train the best config of the latest (or --from) sweep."),
    from_experiment: Optional[str] = typer.Option(None, "--from", help="Sweep experiment (name under results/ or path)."),
    results_dir: str = typer.Option("results", help="Where sweeps live (for --best)."),
    address: Optional[str] = AddressOpt,
    num_cpus: Optional[int] = CpusOpt,
    dashboard: bool = DashboardOpt,
    mlflow: bool = MlflowOpt,
    mlflow_uri: Optional[str] = MlflowUriOpt,
    mlflow_experiment: str = MlflowExperimentOpt,
) -> None:
    """Final training (batch-hard/batch-all triplet, cross-entropy or interval loss), pre-training first if enabled.

    Each epoch is validated by K-nearest-neighbour macro recall on the val split; the best
    model by val Recall_M is kept in the run directory with metrics per epoch. TensorBoard
    scalars go to <run>/tensorboard (tensorboard --logdir runs); --mlflow logs to MLflow too.
    """
    from raytumor.runtime import check_dashboard_for_ray_train, ray_session
    from raytumor.train.run_dir import check_run

    check_dashboard_for_ray_train(address, dashboard, "training")
    experiment = None
    if best or from_experiment:
        from raytumor.errors import ConfigError
        from raytumor.sweep.run import BEST_FILE, resolve_experiment

        if config is not None:
            raise ConfigError("--best takes the config of the sweep's winner; do not pass --config too")
        experiment = resolve_experiment(from_experiment, results_dir)
        config = experiment / BEST_FILE
        typer.echo(f"training the best config of sweep {experiment.name}: {config}")
    run_config = _load(config, overrides, name, [])
    check_run(run_config, resume=resume)  # bad input fails before Ray (and torch) load
    note_pool_without_masks(run_config)

    from raytumor.train.trainer import run_training

    target = mlflow_target(mlflow, mlflow_uri, mlflow_experiment)
    with _resume_hint_on_interrupt(run_config, _config_args(config, experiment, results_dir), overrides, name):
        with ray_session(address, num_cpus=num_cpus, dashboard=dashboard):
            if experiment is not None:
                _note_idle_cpus(run_config)
            result = run_training(run_config, resume=resume, mlflow=target,
                                  pretrain_cache=(experiment / "pretrain_cache") if experiment else None)
    if experiment is not None:
        from raytumor.sweep.run import record_best_run

        record_best_run(results_dir, result.run_dir)
    _print_result(result, "training")
