"""``raytumor demo``: the main job on the embedded default, end to end on demo data.

demo dataset -> validate -> prepare (Ray Data) -> rare-case rows -> sweep
search_spaces/demo.yaml (Ray Tune + Optuna + ASHA over Ray Train) -> train --best ->
evaluate on the test split -> HTML report. Each step is skipped when its output exists,
so a second run (or a run after Ctrl-C) continues where the first stopped.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from raytumor.cli.progress import progress_bar
from raytumor.cli.train import MlflowUriOpt, mlflow_target

DEFAULT_SPACE = Path(__file__).resolve().parents[2] / "search_spaces" / "demo.yaml"


def demo(
    directory: Path = typer.Option(Path("demo"), "--dir", help="Working directory: data/, results/, runs/ go here."),
    space: Path = typer.Option(DEFAULT_SPACE, "--space", help="Search space of the sweep step."),
    scale: float = typer.Option(0.1, help="Scale of the paper's Table 1 class counts."),
    unlabelled: int = typer.Option(100, help="Unlabelled cases for contrastive pre-training."),
    seed: int = typer.Option(0, help="Seed of the demo data."),
    data_only: bool = typer.Option(False, "--data-only", help="Stop after preprocessing and augmentation."),
    address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster address; default: embedded Ray."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs for the embedded Ray (default: all)."),
    dashboard: bool = typer.Option(True, "--dashboard/--no-dashboard", help="Ray dashboard on 127.0.0.1 (embedded "
                                   "Ray); the sweep needs it, so --no-dashboard goes with --data-only only."),
    mlflow: bool = typer.Option(False, "--mlflow/--no-mlflow", help="Log the sweep's trials and the final training "
                                "to MLflow (needs the 'mlflow' extra)."),
    mlflow_uri: Optional[str] = MlflowUriOpt,
) -> None:
    """The main job on demo data: generate, validate, prepare, sweep, train the best, evaluate on test.

    TensorBoard: tensorboard --logdir demo (sweep trials and the final run).
    """
    from rich.console import Console

    from raytumor.config import build_config, merge
    from raytumor.data.demo import make_demo_dataset
    from raytumor.data.manifest import MANIFEST_FILE, rare_labels, read_classes, read_manifest
    from raytumor.data.preprocess import PrepareSettings, prepare_dataset
    from raytumor.data.rare_cases import augment_rare_cases
    from raytumor.data.validate import validate_dataset
    from raytumor.runtime import check_dashboard_for_ray_train, ray_session
    from raytumor.sweep.space import load_search_space, nest

    if not data_only:
        check_dashboard_for_ray_train(address, dashboard, "a sweep")
    console = Console()
    target = mlflow_target(mlflow, mlflow_uri, "raytumor-demo")
    dataset = directory / "data"
    results = (directory / "results").resolve()
    space_def, base_tree = load_search_space(space)
    # The demo's own paths replace the space's: the sweep reads demo/data, writes demo/results.
    base_tree = merge(base_tree, {"data": {"dataset": str(dataset)}, "output_dir": str(directory / "runs")})
    base = build_config(merge(base_tree, nest(space_def.fixed())), source=str(space))

    with _rerun_hint_on_interrupt():
        if (dataset / MANIFEST_FILE).is_file():
            console.print(f"[1/7] demo dataset exists: {dataset}")
        else:
            with progress_bar("[1/7] generating demo dataset") as update:
                make_demo_dataset(dataset, scale=scale, seed=seed, unlabelled=unlabelled, progress=update)
        with progress_bar("[2/7] validating") as update:
            report = validate_dataset(dataset, progress=update)
        console.print(f"      {report.summary()}")

        with ray_session(address, num_cpus=num_cpus, dashboard=dashboard):
            console.print(f"[3/7] preprocessing on Ray Data to {'x'.join(map(str, base.data.shape))}")
            prepared = prepare_dataset(dataset, PrepareSettings(shape=tuple(base.data.shape)))
            console.print(f"      {prepared.n_cases} cases, {prepared.n_quarantined} quarantined: {prepared.path}")
            rare = rare_labels(read_classes(dataset))
            augmented = augment_rare_cases(prepared, rare, n=base.data.augment_n, seed=base.seed)
            console.print(f"[4/7] rare-case augmentation: {augmented.n_rows} rows from "
                          f"{augmented.n_source_cases} rare training cases")
            manifest = read_manifest(dataset)
            console.print(f"      labelled {int(manifest['label'].notna().sum())}, "
                          f"unlabelled {int((manifest['split'] == 'unlabelled').sum())}, classes {len(read_classes(dataset))}, "
                          f"rare {len(rare)}")
            if data_only:
                return
            experiment = _sweep(console, space, base_tree, results, target)
            run_dir = _train_best(console, experiment, results, target)
        _evaluate(console, run_dir)


@contextlib.contextmanager
def _rerun_hint_on_interrupt():
    """After Ctrl-C, say that the same command continues: every finished step is kept."""
    try:
        yield
    except KeyboardInterrupt:
        typer.echo(f"\ndemo interrupted; its finished steps are kept. Continue it with the same command: "
                   f"{shlex.join(['raytumor', *sys.argv[1:]])}", err=True)
        raise


def _sweep(console, space: Path, base_tree: dict, results: Path, mlflow) -> Path:
    import yaml

    from raytumor.config import read_yaml_file
    from raytumor.storage import atomic_write_text
    from raytumor.sweep.run import BEST_FILE, run_sweep

    space_def = read_yaml_file(space, "search space")
    experiment = results / space_def["name"]
    if (experiment / BEST_FILE).is_file():
        console.print(f"[5/7] sweep done: {experiment / BEST_FILE}")
        return experiment
    # The demo's copy of the space, pointing at the demo's data and directories.
    local_space = results / f"{space_def['name']}.space.yaml"
    space_def.update({"base": base_tree, "dataset": base_tree["data"]["dataset"], "results_dir": str(results)})
    atomic_write_text(local_space, yaml.safe_dump(space_def, sort_keys=False))
    console.print(f"[5/7] sweep {space} on Ray Tune + Optuna + ASHA")
    from ray import tune

    resume = tune.Tuner.can_restore(str(experiment / "tune"))
    result = run_sweep(local_space, resume=resume, mlflow=mlflow)
    console.print(f"      best trial: val Recall_M {result.best_value:.3f} -> {result.best_config_path}")
    from raytumor.sweep.report import write_sweep_report

    console.print(f"      sweep report: {write_sweep_report(experiment)}")
    return experiment


def _train_best(console, experiment: Path, results: Path, mlflow) -> Path:
    from raytumor.config import load_config
    from raytumor.sweep.run import BEST_FILE, record_best_run
    from raytumor.train.trainer import run_training

    config = load_config(experiment / BEST_FILE, [f"output_dir={experiment.parent.parent / 'runs'}"])
    run_dir = Path(config.output_dir) / config.name
    if (run_dir / "summary.json").is_file():
        console.print(f"[6/7] best config trained: {run_dir}")
    else:
        console.print(f"[6/7] training the best config for {config.train.epochs} epochs")
        run_training(config, resume="auto", pretrain_cache=experiment / "pretrain_cache", mlflow=mlflow)
    record_best_run(str(results), run_dir)
    return run_dir


def _evaluate(console, run_dir: Path) -> None:
    from raytumor.evaluate.embeddings import embed_run
    from raytumor.evaluate.report import default_report_dir, evaluate_run, write_report

    console.print("[7/7] evaluating on the test split (K = 7, reference train + val)")
    with progress_bar("      embedding") as update:
        embedded = embed_run(run_dir, progress=update)
    evaluation = evaluate_run(embedded, k=7)
    path = write_report([evaluation], default_report_dir(run_dir))
    scores = evaluation.scores
    console.print(
        f"test: Recall_mu {scores['recall_micro']:.3f}, Recall_M {scores['recall_macro']:.3f} "
        f"(chance 1/27 = 0.037), Recall_M* {scores['recall_macro_rare']:.3f}, Rank-5 {scores['rank5']:.3f}"
    )
    console.print(f"report: {Path(path) / 'report.html' if Path(path).is_dir() else path}")
