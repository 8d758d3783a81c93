"""``raytumor sweep``: Ray Tune + Optuna (TPE, seeded) + ASHA over the shared trainer builder.

Experiment directory ``<results_dir>/<name>/``::

    space.yaml        the search space as given, base.yaml its base config
    tune/             Ray Tune's experiment state (what --resume restores)
    trials/<id>/      each trial's run directory (the same layout as `raytumor train`)
    pretrain_cache/   pre-trained backbones shared by trials with the same pre-training
    leaderboard.csv   trials by validation objective; best.yaml: the winning config
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import pandas as pd
import yaml

from raytumor.config import RunConfig, build_config, check_directory_name, dump_config, merge, read_yaml_file
from raytumor.errors import ConfigError, RaytumorError
from raytumor.storage import atomic_write_text
from raytumor.sweep.space import Distribution, SearchSpace, flatten, load_search_space, nest, suggest

if TYPE_CHECKING:
    from raytumor.train.tracking import MLflowTarget

BEST_FILE = "best.yaml"
LEADERBOARD_FILE = "leaderboard.csv"
# Sweeps started before the context moved out of the trial config carry it under this key.
SWEEP_KEY = "__sweep__"
# CPUs that `max_concurrent_trials: auto` leaves free: Ray Data reads inside a trial hang when
# the trials' workers hold every CPU.
RAY_DATA_CPUS = 1


@dataclass(frozen=True)
class SweepResult:
    experiment_dir: Path
    leaderboard: pd.DataFrame
    best_config_path: Path
    best_value: float


def sampled_params(trial_params: dict) -> dict:
    """What Tune or the grid chose for a trial, without the sweep's shared context."""
    sampled = {k: v for k, v in trial_params.items() if k not in (SWEEP_KEY, "configuration")}
    sampled.update(trial_params.get("configuration") or {})
    return sampled


def sweep_trial(trial_params: dict, context: dict, shared_datasets: dict | None = None) -> None:
    """The Tune trainable: one trial = (pre-training +) training through ``run_training``.

    ``trial_params`` is what Tune sampled (all Tune shows and logs); ``context`` is the same for
    every trial of the sweep: base config, fixed parameters, directories.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raytumor.train.trainer import checkpointed_history, run_training

    sampled = sampled_params(trial_params)
    trial_id = ray.tune.get_context().get_trial_id()
    tree = merge(context["base"], nest({**context["fixed"], **sampled}))
    tree = merge(tree, {"name": trial_id, "output_dir": context["trials_dir"]})
    config = build_config(tree, source=f"trial {trial_id}")
    run_dir = Path(config.output_dir) / config.name
    if (run_dir / "summary.json").is_file():
        # Finished before the sweep was interrupted: replay its epochs to Tune, do not re-run.
        _report_epochs(pd.read_csv(run_dir / "metrics.csv").to_dict("records"))
        return
    # Interrupted mid-run (the sweep's driver died, or Tune retries the trial): the run resumes
    # from its last checkpoint and reports only the epochs after it. Tune restarts the trial's
    # results, so it gets the checkpointed ones first; a run checkpointed at its last epoch
    # reports nothing itself, and its trial would otherwise end without the metric.
    _report_epochs(checkpointed_history(run_dir))
    # TensorBoard logs come from Tune's own logger (one event file per trial under tune/).
    run_training(config, resume="auto", callbacks=[TuneReportCallback()], tensorboard=False,
                 pretrain_cache=Path(context["pretrain_cache"]), shared_datasets=shared_datasets)


def _report_epochs(rows: list[dict]) -> None:
    """Each epoch's metrics as the live run reported them: a NaN (Recall_M* with no rare class
    among the validation cases) stays NaN. As None, it became JSON null in Tune's results, and a
    sweep whose best trial was replayed failed while writing its leaderboard."""
    import ray.tune

    for row in rows:
        ray.tune.report(dict(row))


def _experiment_dir(space: SearchSpace, name: str | None, results_dir: str | None) -> Path:
    if name is not None:
        try:
            check_directory_name(name)
        except ValueError as exc:
            raise ConfigError(f"--name {name!r}: {exc}") from None
    return Path(results_dir or space.results_dir).resolve() / (space.name if name is None else name)


def _trainable(shared_datasets: dict, context: dict):
    from ray import tune

    # The trial driver only waits on its Train workers: it reserves no CPU (a 1-CPU driver
    # plus 1-CPU workers cannot run on 2 cores); the workers and Ray Data get the CPUs.
    trainable = tune.with_parameters(sweep_trial, context=context, shared_datasets=shared_datasets)
    return tune.with_resources(trainable, {"cpu": 0, "memory": 2**20})


def trials_at_once(space: SearchSpace, config: RunConfig, cluster: Mapping[str, float]) -> int:
    """``max_concurrent_trials``, or for ``auto`` as many trials as ``cluster`` (Ray's resources)
    holds: ``RAY_DATA_CPUS`` left free, no more torch threads than CPUs (a worker of under one
    CPU still runs one), and a GPU per worker when the trials use GPUs. At least one.

    On 2 CPUs, 1-CPU workers give one trial at a time and 0.5-CPU workers two, which ran the
    demo sweep 1.8x faster (docs/benchmarks.md, figure 6).
    """
    if space.max_concurrent_trials != "auto":
        return space.max_concurrent_trials
    workers, cpus_per_worker = config.resources.num_workers, config.resources.cpus_per_worker
    cpus = cluster.get("CPU", 0.0)
    limits = [(cpus - RAY_DATA_CPUS) // (workers * cpus_per_worker),
              cpus // (workers * max(1, math.floor(cpus_per_worker)))]
    gpus = cluster.get("GPU", 0.0)
    if config.resources.use_gpu is True or (config.resources.use_gpu == "auto" and gpus > 0):
        limits.append(gpus // workers)
    return max(1, int(min(limits)))


def idle_cpus_note(config: RunConfig, cluster: Mapping[str, float]) -> str | None:
    """A line for ``train --best`` when the winner's resources, sized for trials at once, leave
    most of ``cluster``'s CPUs idle in a run of its own (a 0.5-CPU worker runs one torch thread,
    on 2 cores or on 64); None when they use at least half of what is free, or GPUs train."""
    resources = config.resources
    if resources.use_gpu is True or (resources.use_gpu == "auto" and cluster.get("GPU", 0.0) > 0):
        return None
    workers = resources.num_workers
    free = cluster.get("CPU", 0.0) - RAY_DATA_CPUS
    threads = workers * max(1, math.floor(resources.cpus_per_worker))
    per_worker = math.floor(free / workers)
    if free < 2 * max(threads, workers * resources.cpus_per_worker) or per_worker < 2:
        return None
    return (f"note: the best config trains {workers} worker(s) x {resources.cpus_per_worker:g} CPU "
            f"({threads} torch thread(s)), as its trial did beside the others; this Ray has "
            f"{cluster.get('CPU', 0.0):g} CPUs: add --set resources.cpus_per_worker={per_worker} to use "
            f"{workers * per_worker} of them (one is left for Ray Data)")


def _search_alg(space: SearchSpace):
    import optuna

    from raytumor.sweep.searcher import ResumableOptunaSearch

    if space.search == "grid":
        return None
    sampler = (optuna.samplers.TPESampler(seed=space.seed, n_startup_trials=min(4, space.num_samples))
               if space.search == "tpe" else optuna.samplers.RandomSampler(seed=space.seed))
    distributions = {k: v.model_dump(exclude_none=True) for k, v in space.distributions().items()}
    define_by_run = functools.partial(suggest, distributions=distributions, fixed=space.fixed())
    # Tune wraps it in a ConcurrencyLimiter of TuneConfig(max_concurrent_trials). Creating the
    # study logs "A new study created in memory" at INFO in the middle of the sweep's console;
    # Tune saves the searcher with the sweep, so that note says nothing a user can act on.
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return ResumableOptunaSearch(space=define_by_run, metric=space.objective.metric,
                                     mode=space.objective.mode, sampler=sampler)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _scheduler(space: SearchSpace, max_epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if space.scheduler.type == "none":
        return FIFOScheduler()
    # max_t one past the epoch budget: a trial that survives every rung ends on its own and
    # exports its run directory instead of being stopped at the last epoch.
    return ASHAScheduler(time_attr="epoch", max_t=max_epochs + 1, grace_period=min(space.scheduler.grace_period, max_epochs),
                         reduction_factor=space.scheduler.reduction_factor)


def _context(space: SearchSpace, base_tree: dict, experiment_dir: Path) -> dict:
    return {
        "base": base_tree,
        "fixed": space.fixed(),
        "trials_dir": str(experiment_dir / "trials"),
        "pretrain_cache": str(experiment_dir / "pretrain_cache"),
    }


def _param_space(space: SearchSpace) -> dict:
    from ray import tune

    params: dict[str, Any] = {}
    if space.search == "grid":
        params["configuration"] = tune.grid_search(space.configurations)
    return params


def _absolute_paths(base_tree: dict, space: SearchSpace) -> dict:
    """Trials run in their own working directories: make the base's paths absolute."""
    config = build_config(merge(base_tree, nest(space.fixed())), source=space.name)
    paths = {"data": {"dataset": str(Path(config.data.dataset).resolve())}}
    if config.train.pretrained:
        paths["train"] = {"pretrained": str(Path(config.train.pretrained).resolve())}
    return merge(base_tree, paths)


def may_be_set(space: SearchSpace, base_value: Any, key: str) -> bool:
    """Whether any trial of the space can run with ``key`` true."""
    value = space.parameters.get(key, base_value)
    if hasattr(value, "values") and value.values is not None:
        return any(bool(v) for v in value.values)
    return bool(value) or any(bool(c.get(key)) for c in space.configurations or [])


def _shared_inputs(space: SearchSpace, config: RunConfig) -> dict:
    """Read the cached rows once in the driver; every trial trains from these datasets.

    ``config``: the base with the space's fixed parameters. Data shape and dataset are
    therefore fixed for a sweep (not sweepable).
    """
    from raytumor.train.datasets import read_stage_datasets

    return read_stage_datasets(
        config,
        augmented=may_be_set(space, config.data.augment_rare, "data.augment_rare"),
        pretraining=may_be_set(space, config.pretrain.enabled, "pretrain.enabled"),
    )


def check_sweep(
    space_path: str | os.PathLike, *, name: str | None = None, results_dir: str | None = None, resume: bool = False
) -> tuple[SearchSpace, dict, Path]:
    """The search space, its base config tree (absolute paths) and the experiment directory,
    checked without Ray: the space and its fixed config load, the directory fits ``resume``,
    the dataset has a readable manifest."""
    from raytumor.data.manifest import read_manifest

    space, base_tree = load_search_space(space_path)
    base_tree = _absolute_paths(base_tree, space)
    experiment_dir = _experiment_dir(space, name, results_dir)
    if resume:
        from ray import tune

        if not tune.Tuner.can_restore(str(experiment_dir / "tune")):
            raise RaytumorError(f"{experiment_dir}: no sweep to resume")
        _check_unchanged(space_path, space, base_tree, experiment_dir)
    elif experiment_dir.exists():
        raise RaytumorError(f"{experiment_dir}: sweep exists; use --resume to continue it or --name for a new one")
    read_manifest(base_tree["data"]["dataset"])  # made absolute above, from the fixed config
    _check_backbone(space, base_tree)
    return space, base_tree, experiment_dir


def _check_backbone(space: SearchSpace, base_tree: dict) -> None:
    """A ``train.pretrained`` backbone every trial uses is loaded once here, as ``raytumor
    train`` does, unless trials vary what it must fit (encoder, width) or the backbone itself."""
    from raytumor.train.run_dir import check_pretrained_backbone

    config = build_config(merge(base_tree, nest(space.fixed())), source=space.name)
    varied = {key for key, value in space.parameters.items() if isinstance(value, Distribution)}
    varied |= {key for overrides in space.configurations or [] for key in overrides}
    if config.train.pretrained and not varied & {"model.encoder", "model.width", "train.pretrained"}:
        check_pretrained_backbone(config)


def _check_unchanged(space_path, space: SearchSpace, base_tree: dict, experiment_dir: Path) -> None:
    """Refuse to resume a sweep with a search space or base config other than those it started
    with (its ``space.yaml`` and ``base.yaml``): Tune restores its own trials, sampler and
    scheduler, while the trials' base config and context come from the files given now, so a
    changed file mixed two sweeps in one leaderboard. Its name and results_dir may differ."""
    try:
        started = SearchSpace.model_validate(read_yaml_file(experiment_dir / "space.yaml", "search space"))
        started_base = read_yaml_file(experiment_dir / "base.yaml", "base config")
    except (ConfigError, ValueError):  # an older sweep's record, or none: nothing to compare
        return
    ignored = {"name", "results_dir", "base", "dataset"}  # the base config and dataset are compared below
    before, now = flatten(started.model_dump(exclude=ignored)), flatten(space.model_dump(exclude=ignored))
    changed = [key for key in dict.fromkeys([*before, *now]) if before.get(key) != now.get(key)]
    before, now = flatten(started_base), flatten(base_tree)
    changed += [f"base: {key}" for key in dict.fromkeys([*before, *now]) if before.get(key) != now.get(key)]
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise ConfigError(f"{space_path}: not the search space {experiment_dir.name} started with ({shown} changed; "
                          f"it started with {experiment_dir / 'space.yaml'}); put them back to resume, or start "
                          "a new sweep with --name")


def run_sweep(
    space_path: str | os.PathLike,
    *,
    name: str | None = None,
    results_dir: str | None = None,
    resume: bool = False,
    verbose: int = 1,
    mlflow: MLflowTarget | None = None,
) -> SweepResult:
    """Run (or resume) a sweep; write the leaderboard and ``best.yaml``. Needs a running Ray.

    ``mlflow``: one MLflow run per trial through Ray Tune's MLflow logger. A resumed sweep
    keeps the loggers it was started with (Tune restores them with its state).
    """
    import ray
    from ray import tune

    from raytumor.runtime import on_embedded_ray
    from raytumor.sweep.progress import CloseEndedTrialBars, close_worker_bars
    from raytumor.train.trainer import check_workers_fit

    callbacks = [CloseEndedTrialBars()]
    if mlflow is not None:
        from raytumor.sweep.mlflow_logger import sweep_mlflow_logger

        callbacks.append(sweep_mlflow_logger(mlflow))
    space, base_tree, experiment_dir = check_sweep(space_path, name=name, results_dir=results_dir, resume=resume)
    fixed_config = build_config(merge(base_tree, nest(space.fixed())), source=space.name)
    if on_embedded_ray():
        check_workers_fit(fixed_config, ray.cluster_resources())
    tune_dir = experiment_dir / "tune"
    experiment_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        atomic_write_text(experiment_dir / "space.yaml", Path(space_path).read_text())
        atomic_write_text(experiment_dir / "base.yaml", yaml.safe_dump(base_tree, sort_keys=False))
    shared = _shared_inputs(space, fixed_config)
    context = _context(space, base_tree, experiment_dir)
    max_epochs = fixed_config.train.epochs
    if resume:
        tuner = tune.Tuner.restore(str(tune_dir), trainable=_trainable(shared, context), resume_errored=True,
                                   param_space=_param_space(space))
    else:
        at_once = trials_at_once(space, fixed_config, ray.cluster_resources())
        if verbose:
            trials = len(space.configurations) if space.search == "grid" else space.num_samples
            why = "auto: what the cluster holds" if space.max_concurrent_trials == "auto" else "max_concurrent_trials"
            print(f"{space.name}: {trials} trials, at most {at_once} at once ({why})", flush=True)
        tuner = tune.Tuner(
            _trainable(shared, context),
            param_space=_param_space(space),
            tune_config=tune.TuneConfig(
                metric=space.objective.metric,
                mode=space.objective.mode,
                search_alg=_search_alg(space),
                scheduler=_scheduler(space, max_epochs),
                num_samples=1 if space.search == "grid" else space.num_samples,
                max_concurrent_trials=at_once,
                trial_dirname_creator=lambda trial: trial.trial_id,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str(experiment_dir),
                failure_config=tune.FailureConfig(max_failures=1),
                verbose=verbose,
                callbacks=callbacks,
            ),
        )
    results, interrupted = _fit_noting_interruption(tuner)
    close_worker_bars()  # the sweep's workers are gone: bars still open would print under the leaderboard
    if interrupted:
        raise SweepInterrupted(experiment_dir)
    return summarise(experiment_dir, results, space, base_tree)


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C ended the sweep early: its state is saved and no best config was chosen."""

    def __init__(self, experiment_dir: Path):
        super().__init__(f"sweep interrupted; its state is saved in {experiment_dir / 'tune'}")
        self.experiment_dir = experiment_dir


def _fit_noting_interruption(tuner) -> tuple[Any, bool]:
    """``tuner.fit()``, and whether Ctrl-C (SIGINT) ended it early.

    On SIGINT Tune stops the trials, saves its state and returns as if the sweep had finished
    (a best config from half-run trials, exit code 0). Its handler puts back the SIGINT handler
    it found when it started, so finding ours still installed afterwards means it was called.
    """
    import signal
    import threading

    tune_catches_sigint = (threading.current_thread() is threading.main_thread()
                           and os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") == "0")
    if not tune_catches_sigint:
        return tuner.fit(), False

    def raise_keyboard_interrupt(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGINT, raise_keyboard_interrupt)
    try:
        results = tuner.fit()
        return results, signal.getsignal(signal.SIGINT) is raise_keyboard_interrupt
    finally:
        signal.signal(signal.SIGINT, before)


def _trial_id(result) -> str:
    return (result.metrics or {}).get("trial_id") or Path(result.path).name


def export_stopped_trials(experiment_dir: Path, results) -> None:
    """Export the run directory of each trial the scheduler stopped early (only a trial that
    trains to its last epoch exports its own) from its newest checkpoint. A failed trial is
    left as it is: ``--resume`` retries it from that checkpoint."""
    from raytumor.train.trainer import export_stopped_run

    for result in results:
        if not result.error:
            export_stopped_run(experiment_dir / "trials" / _trial_id(result))


def _stopped_early(run_dir: Path) -> bool:
    try:
        return bool(json.loads((run_dir / "summary.json").read_text()).get("stopped_early"))
    except (OSError, ValueError, AttributeError):
        return False


def _trial_rows(results, space: SearchSpace, trials_dir: Path) -> list[dict]:
    rows = []
    metric, mode = space.objective.metric, space.objective.mode
    for result in results:
        history = result.metrics_dataframe
        params = sampled_params(result.config or {})
        row: dict[str, Any] = {"trial_id": _trial_id(result)}
        row.update({f"param:{k}": v for k, v in params.items()})
        if history is not None and metric in history.columns and history[metric].notna().any():
            best_index = history[metric].idxmax() if mode == "max" else history[metric].idxmin()
            best = history.loc[best_index]
            row["objective"] = float(best[metric])
            row["best_epoch"] = int(best.get("epoch", 0))
            row["epochs_run"] = int(history["epoch"].max()) if "epoch" in history else len(history)
            for key in ("val_recall_micro", "val_recall_macro", "val_recall_macro_rare", "val_rank5"):
                if key in best:  # null in the results of sweeps replayed before the fix above: NaN
                    row[key] = float(pd.to_numeric(best[key], errors="coerce"))
        else:
            row["objective"] = math.nan
        row["status"] = ("error" if result.error else "stopped" if _stopped_early(trials_dir / row["trial_id"])
                         else "done")
        rows.append(row)
    return rows


def summarise(experiment_dir: Path, results, space: SearchSpace, base_tree: dict) -> SweepResult:
    """Leaderboard by the validation objective and ``best.yaml``: the test split is never read."""
    export_stopped_trials(experiment_dir, results)
    rows = _trial_rows(results, space, experiment_dir / "trials")
    board = pd.DataFrame(rows)
    ascending = space.objective.mode == "min"
    board = board.sort_values("objective", ascending=ascending, na_position="last").reset_index(drop=True)
    atomic_write_text(experiment_dir / LEADERBOARD_FILE, board.to_csv(index=False))
    finished = board[board["objective"].notna()]
    if finished.empty:
        raise RaytumorError(f"{experiment_dir}: no trial reported {space.objective.metric}; see the trial logs under tune/")
    best_id = finished.iloc[0]["trial_id"]
    best_config_file = experiment_dir / "trials" / best_id / "config.yaml"
    best_tree = read_yaml_file(best_config_file, "trial config")
    best_tree["name"] = f"{experiment_dir.name}-best"
    best_tree["output_dir"] = "runs"
    if space.final_train_epochs:
        best_tree["train"]["epochs"] = space.final_train_epochs
    best = build_config(best_tree, source=str(best_config_file))
    header = (f"# Best trial {best_id} of sweep {experiment_dir.name}: "
              f"{space.objective.metric} = {finished.iloc[0]['objective']:.4f} (validation split)\n")
    atomic_write_text(experiment_dir / BEST_FILE, header + dump_config(best))
    meta = {"best_trial": best_id, "objective": space.objective.model_dump(), "value": float(finished.iloc[0]["objective"])}
    atomic_write_text(experiment_dir / "best.json", json.dumps(meta, indent=2))
    return SweepResult(experiment_dir, board, experiment_dir / BEST_FILE, float(finished.iloc[0]["objective"]))


def latest_experiment(results_dir: str = "results") -> Path:
    """The most recently modified experiment holding a ``best.yaml``."""
    root = Path(results_dir)
    candidates = sorted(root.glob(f"*/{BEST_FILE}"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not candidates:
        raise RaytumorError(f"{root}: no finished sweep (no */{BEST_FILE}); run `raytumor sweep SPACE.yaml` first")
    return candidates[-1].parent


BEST_RUN_POINTER = "latest-best-run.txt"


def resolve_experiment(name_or_path: str | None, results_dir: str = "results") -> Path:
    """An experiment directory from a path, a name under ``results_dir``, or the latest one."""
    if name_or_path is None:
        return latest_experiment(results_dir)
    for candidate in (Path(name_or_path), Path(results_dir) / name_or_path):
        if (candidate / BEST_FILE).is_file():
            return candidate
    raise RaytumorError(f"{name_or_path}: not a finished sweep (no {BEST_FILE}; looked in . and {results_dir}/)")


def record_best_run(results_dir: str, run_dir: Path) -> None:
    atomic_write_text(Path(results_dir) / BEST_RUN_POINTER, str(run_dir.resolve()) + "\n")


def latest_best_run(results_dir: str = "results") -> Path:
    pointer = Path(results_dir) / BEST_RUN_POINTER
    if not pointer.is_file():
        raise RaytumorError(f"no run given and no `raytumor train --best` run recorded in {pointer.parent} "
                            "(--results-dir); pass RUN directories")
    run = Path(pointer.read_text().strip())
    if not run.is_dir():
        raise RaytumorError(f"{pointer}: the recorded best run {run} no longer exists")
    return run
