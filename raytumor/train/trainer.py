"""One function builds a Ray ``TorchTrainer`` from a config; ``train``, ``train --best`` and
every sweep trial call it. ``run_training`` runs pre-training (when enabled) then training,
and exports the run directory ``raytumor evaluate`` reads.

Run directory ``<output_dir>/<name>/``::

    config.yaml          the resolved config
    pretrain/, train/    Ray Train storage (checkpoints per epoch)
    pretrain_backbone.pt pre-trained backbone weights (when pre-training ran)
    best_model.pt        weights with the best validation Recall_M, with its config
    metrics.csv          one row per epoch
    summary.json         best epoch and its validation metrics
    tensorboard/         TensorBoard scalars per stage and epoch
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pickle
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import pandas as pd
import ray.train
import torch
from filelock import FileLock

from raytumor.config import RunConfig
from raytumor.errors import RaytumorError, short_reason
from raytumor.storage import atomic_path, atomic_write_text
from raytumor.train.data_config import ShardedTrainConfig
from raytumor.train.datasets import StageInputs, pretraining_inputs, training_inputs
from raytumor.train.loops import (
    BACKBONE_FILE,
    BEST_MODEL_FILE,
    CHECKPOINT_FILE,
    SELECTION_METRIC,
    pretrain_loop_per_worker,
    train_loop_per_worker,
)
from raytumor.train.run_dir import PRETRAINED_BACKBONE_FILE, prepare_run_dir, resolve_pretrained
from raytumor.train.tracking import (
    TENSORBOARD_DIR,
    MLflowCallback,
    MLflowTarget,
    TensorBoardCallback,
    end_mlflow_run,
    start_mlflow_run,
)

Stage = Literal["pretrain", "train"]
# Copied to the MLflow run at the end (small files; the weights stay in the run directory).
RUN_ARTIFACTS = ("config.yaml", "metrics.csv", "pretrain_metrics.csv", "summary.json")


@dataclass(frozen=True)
class TrainingResult:
    run_dir: Path
    best_epoch: int
    best_metrics: dict


def use_gpu(config: RunConfig) -> bool:
    if config.resources.use_gpu == "auto":
        import ray

        return torch.cuda.is_available() or ray.cluster_resources().get("GPU", 0) > 0
    return bool(config.resources.use_gpu)


def check_workers_fit(config: RunConfig, cluster: dict) -> None:
    """Refuse workers that ``cluster`` (Ray's resources; a fixed-size Ray's) can never place:
    Ray would wait for them forever, printing only autoscaler errors."""
    from raytumor.errors import ConfigError

    resources = config.resources
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if resources.use_gpu is True and gpus < resources.num_workers:
        raise ConfigError(f"resources.use_gpu: true needs {resources.num_workers} GPU(s) (one per worker); this Ray has "
                          f"{gpus:g}; set it to auto or false, or run on a cluster with GPUs (--address)")
    if resources.num_workers * resources.cpus_per_worker > cpus:
        raise ConfigError(f"resources: {resources.num_workers} worker(s) x {resources.cpus_per_worker:g} CPU need "
                          f"{resources.num_workers * resources.cpus_per_worker:g} CPUs; this Ray has {cpus:g} "
                          "(fewer resources.num_workers or cpus_per_worker, or --num-cpus / a cluster)")


def build_trainer(
    config: RunConfig,
    stage: Stage,
    run_dir: Path,
    inputs: StageInputs,
    *,
    pretrained_backbone: str | None = None,
    callbacks: Sequence = (),
    extra_loop_config: dict | None = None,
    resume: bool = False,
):
    """A ``TorchTrainer`` for ``stage`` of ``config``; its storage is ``run_dir/<stage>``.

    ``resume``: start from the stage's latest checkpoint in ``run_dir`` (Ray Train does not
    restore a run that ended in an error by itself).
    """
    from ray.train.torch import TorchTrainer

    workers = config.resources.num_workers
    batch = config.pretrain.batch_size if stage == "pretrain" else config.train.batch_size
    rows_per_worker = inputs.n_train_rows / workers
    steps = max(1, math.ceil(rows_per_worker / batch))
    loop_config = {
        "config": config.model_dump(mode="json"),
        "num_classes": inputs.num_classes,
        "rare_classes": list(inputs.rare_classes),
        "steps_per_epoch": steps,
        "pretrained_backbone": pretrained_backbone,
        "resume_from": _latest_checkpoint(run_dir / stage) if resume else None,
        **(extra_loop_config or {}),
    }
    gpu = use_gpu(config)
    return TorchTrainer(
        pretrain_loop_per_worker if stage == "pretrain" else train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=gpu, resources_per_worker={"CPU": config.resources.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=stage,
            storage_path=str(run_dir.resolve()),
            failure_config=ray.train.FailureConfig(max_failures=config.resources.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
        datasets=inputs.datasets,
        dataset_config=ShardedTrainConfig(inputs.train_shards),
    )


def _latest_checkpoint(stage_dir: Path) -> str | None:
    """The newest checkpoint of a stage that loads (see :func:`_latest_checkpoint_state`)."""
    latest = _latest_checkpoint_state(stage_dir)
    return None if latest is None else str(latest[0].resolve())


def _latest_checkpoint_state(stage_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint of a stage that loads, and its state, skipping (with a warning)
    newer ones that do not: a driver killed while Ray copied a checkpoint into the run
    directory left it cut short, and ``--resume`` then failed in every worker although the one
    before it was whole."""
    # Ray names checkpoint directories checkpoint_<timestamp>: the last in sort order is the newest.
    found = sorted(p for p in stage_dir.glob("checkpoint_*") if (p / CHECKPOINT_FILE).is_file())
    for directory in reversed(found):
        try:
            state = torch.load(directory / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "history" not in state:
                raise ValueError("not a raytumor training checkpoint")
        except Exception as exc:  # noqa: BLE001 - truncated, empty or not a checkpoint
            logging.getLogger(__name__).warning("%s: unreadable (%s); resuming from an older checkpoint",
                                                directory / CHECKPOINT_FILE, short_reason(exc))
            continue
        return directory, state
    if found:
        raise RaytumorError(f"{stage_dir}: no checkpoint there loads; start the run afresh under another --name")
    return None


def checkpointed_history(run_dir: str | Path) -> list[dict]:
    """The epochs of ``run_dir``'s training stage in its latest checkpoint, oldest first ([] if none):
    what a resumed run will not train, and so not report, again."""
    latest = _latest_checkpoint_state(Path(run_dir) / "train")
    return [] if latest is None else list(latest[1]["history"])


def _fit(trainer) -> dict:
    in_main_thread = threading.current_thread() is threading.main_thread()
    sigint_handler = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    except SystemExit:
        # Ray Train's Ctrl-C handler aborts the run, then calls sys.exit(0) from inside fit():
        # the CLI exited 1 without a word. It is an interruption; the checkpoints are kept.
        raise KeyboardInterrupt from None
    except Exception as exc:  # noqa: BLE001 - Ray has printed the worker traceback already
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise RaytumorError(f"training failed: {lines[-1] if lines else type(exc).__name__}") from None
    finally:
        if in_main_thread and sigint_handler is not None:
            signal.signal(signal.SIGINT, sigint_handler)  # Ray's stays bound to this run's controller
    if result.checkpoint is None:
        raise RaytumorError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        files = {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.suffix == ".pt"}
    _drop_unregistered_checkpoints(result)
    return files


def _drop_unregistered_checkpoints(result) -> None:
    """Delete the checkpoint directories of a finished stage that Ray Train does not keep. Its
    checkpoint manager deletes those past ``num_to_keep`` that it registered; a driver killed
    between a checkpoint's upload and its registration left one it never will (a whole
    checkpoint's size, for every kill). Storage the driver cannot see as directories is left."""
    kept = [Path(checkpoint.path) for checkpoint, _ in (result.best_checkpoints or [])]
    if result.checkpoint is not None:
        kept.append(Path(result.checkpoint.path))
    if not kept or not all(path.is_dir() for path in kept):
        return
    kept_resolved = {path.resolve() for path in kept}
    for stage_dir in {path.parent for path in kept}:
        for directory in stage_dir.glob("checkpoint_*"):
            if directory.is_dir() and directory.resolve() not in kept_resolved:
                shutil.rmtree(directory, ignore_errors=True)


def _copy_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def pretrain_key(config: RunConfig) -> str:
    """What makes two pre-trainings identical: data (by cache fingerprint), encoder, settings, seed."""
    import hashlib

    from raytumor.train.datasets import ensure_prepared

    pretrain = config.pretrain.model_dump(mode="json")
    pretrain.pop("enabled")
    facts = {
        "data": ensure_prepared(config).fingerprint,
        "shape": list(config.data.shape),
        "encoder": config.model.encoder,
        "width": config.model.width,
        "pretrain": pretrain,
        "seed": config.seed,
        "workers": config.resources.num_workers,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def run_pretraining(
    config: RunConfig,
    run_dir: Path,
    *,
    cache_dir: Path | None = None,
    callbacks: Sequence = (),
    extra_loop_config=None,
    shared_datasets: dict | None = None,
    resume: bool = False,
) -> Path:
    """Contrastive pre-training into ``run_dir``; returns the backbone weights file.

    Reused when the run already has one, or when ``cache_dir`` holds a pre-training with the
    same :func:`pretrain_key` (sweep trials that differ only in their final training).
    """
    target = run_dir / PRETRAINED_BACKBONE_FILE
    if target.is_file():
        return target
    cached = cache_dir / pretrain_key(config) / PRETRAINED_BACKBONE_FILE if cache_dir else None
    with _one_pretraining_at_a_time(cached):
        if cached is not None and cached.is_file():
            _copy_bytes(target, cached.read_bytes())
            return target
        inputs = pretraining_inputs(config, shared_datasets)
        files = _fit(build_trainer(config, "pretrain", run_dir, inputs, callbacks=callbacks,
                                   extra_loop_config=extra_loop_config, resume=resume))
        state = torch.load(_tmp_file(files[CHECKPOINT_FILE]), weights_only=True)
        atomic_write_text(run_dir / "pretrain_metrics.csv", pd.DataFrame(state["history"]).to_csv(index=False))
        _copy_bytes(target, files[BACKBONE_FILE])
        if cached is not None:
            _copy_bytes(cached, files[BACKBONE_FILE])
    return target


def _one_pretraining_at_a_time(cached: Path | None):
    """A lock on a cached pre-training: of the sweep trials that run at once and share it, the
    first computes it and the others wait for its backbone instead of computing it again. An OS
    file lock, so a trial killed while it holds the lock releases it."""
    if cached is None:
        return contextlib.nullcontext()
    cached.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(cached.parent / ".lock")


def _tmp_file(data: bytes):
    import io

    return io.BytesIO(data)


def run_training(
    config: RunConfig,
    *,
    resume: bool | str = False,
    stages: Sequence[Stage] = ("pretrain", "train"),
    callbacks: Sequence = (),
    extra_loop_config: dict | None = None,
    pretrain_cache: Path | None = None,
    shared_datasets: dict | None = None,
    tensorboard: bool = True,
    mlflow: MLflowTarget | None = None,
) -> TrainingResult:
    """Pre-train (when ``config.pretrain.enabled``), then train; export the run directory.

    ``resume``: True continues an existing run, False needs a new one, "auto" does either.
    ``shared_datasets``: datasets from :func:`read_stage_datasets`, read once for many runs.
    ``tensorboard``: event files in ``<run>/tensorboard``; ``mlflow``: one MLflow run for
    both stages (metrics ``pretrain/...`` and ``train/...``, the config as parameters).
    """
    from raytumor.runtime import on_embedded_ray

    if on_embedded_ray():
        check_workers_fit(config, ray.cluster_resources())
    run_dir, resuming = prepare_run_dir(config, resume=resume)
    mlflow_run = None
    if mlflow is not None:
        mlflow_run = start_mlflow_run(mlflow, config.name, config.model_dump(mode="json"),
                                      {"raytumor_run_dir": str(run_dir.resolve()), "resumed": resuming})

    def stage_callbacks(stage: Stage) -> list:
        extra = [TensorBoardCallback(run_dir / TENSORBOARD_DIR, stage)] if tensorboard else []
        extra += [MLflowCallback(mlflow, mlflow_run, stage)] if mlflow_run else []
        return [*(callbacks if stage == "train" else ()), *extra]

    try:
        result = _run_stages(config, run_dir, resuming, stages, stage_callbacks, extra_loop_config, pretrain_cache,
                             shared_datasets)
    except BaseException:
        if mlflow_run:
            end_mlflow_run(mlflow, mlflow_run, failed=True)
        raise
    if mlflow_run:
        end_mlflow_run(mlflow, mlflow_run, failed=False, artifacts=[run_dir / name for name in RUN_ARTIFACTS])
    return result


def _run_stages(config, run_dir, resuming, stages, stage_callbacks, extra_loop_config, pretrain_cache,
                shared_datasets) -> TrainingResult:
    backbone = resolve_pretrained(config.train.pretrained) if config.train.pretrained else None
    if config.pretrain.enabled and "pretrain" in stages:
        backbone = str(run_pretraining(config, run_dir, cache_dir=pretrain_cache, extra_loop_config=extra_loop_config,
                                       callbacks=stage_callbacks("pretrain"), shared_datasets=shared_datasets,
                                       resume=resuming).resolve())
    if "train" not in stages:
        return TrainingResult(run_dir, 0, {})
    inputs = training_inputs(config, shared_datasets)
    files = _fit(build_trainer(config, "train", run_dir, inputs, pretrained_backbone=backbone,
                               callbacks=stage_callbacks("train"), extra_loop_config=extra_loop_config,
                               resume=resuming))
    state = torch.load(_tmp_file(files[CHECKPOINT_FILE]), weights_only=True)
    return _export_run(run_dir, state, files[BEST_MODEL_FILE], backbone)


def _export_run(run_dir: Path, state: dict, best_model: bytes, backbone: str | None, *,
                stopped_early: bool = False) -> TrainingResult:
    """``metrics.csv``, ``best_model.pt`` and ``summary.json`` (written last: it marks the run
    finished) from a training checkpoint's state and best-model file."""
    history = pd.DataFrame(state["history"])
    atomic_write_text(run_dir / "metrics.csv", history.to_csv(index=False))
    _copy_bytes(run_dir / BEST_MODEL_FILE, best_model)
    best_row = history.loc[history["epoch"] == state["best_epoch"]].iloc[0].to_dict() if len(history) else {}
    best_metrics = {k: float(v) for k, v in best_row.items()}
    # A metric without a value (Recall_M* on a split without rare cases) is null: NaN is not JSON.
    summary = {"best_epoch": int(state["best_epoch"]), "selection_metric": SELECTION_METRIC,
               "epochs": int(state["epoch"]), "restarts_from_checkpoint": int(state["restarts"]),
               "best_metrics": {k: v if math.isfinite(v) else None for k, v in best_metrics.items()},
               "pretrained_backbone": backbone}
    if stopped_early:
        summary["stopped_early"] = True
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False))
    return TrainingResult(run_dir, int(state["best_epoch"]), best_metrics)


def export_stopped_run(run_dir: str | Path) -> TrainingResult | None:
    """Export a run whose training was stopped before its last epoch (a sweep trial ASHA
    stopped) from its newest whole checkpoint, so ``raytumor evaluate`` reads it as any other
    run; ``summary.json`` says ``stopped_early``. None when the run has finished already or
    has no loadable checkpoint."""
    run_dir = Path(run_dir)
    if (run_dir / "summary.json").is_file():
        return None
    try:
        latest = _latest_checkpoint_state(run_dir / "train")
    except RaytumorError:
        return None
    if latest is None or not latest[1]["history"]:
        return None
    directory, state = latest
    try:
        best_model = (directory / BEST_MODEL_FILE).read_bytes()
        torch.load(_tmp_file(best_model), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - missing or cut short by the stop
        logging.getLogger(__name__).warning("%s: not exported (%s)", directory / BEST_MODEL_FILE, short_reason(exc))
        return None
    return _export_run(run_dir, state, best_model, state.get("pretrained_backbone"), stopped_early=True)


def best_model_path(run_dir: str | Path) -> Path:
    """``RUN/best_model.pt``; a one-line error when ``run_dir`` is not a finished training run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RaytumorError(f"{run_dir}: no such run directory")
    path = run_dir / BEST_MODEL_FILE
    if not path.is_file():
        raise RaytumorError(f"{path}: missing; is {run_dir} a finished training run?")
    return path


def load_best_model(run_dir: str | Path):
    """The best model of a run (weights loaded with ``weights_only=True``) and its config."""
    from raytumor.models import build_model

    path = best_model_path(run_dir)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():
            raise RaytumorError(f"{path}: holds objects other than tensors and plain values; refused "
                                "(checkpoints load with weights_only=True)") from None
        raise RaytumorError(f"{path}: not a readable raytumor model (not a PyTorch checkpoint)") from None
    except Exception as exc:  # noqa: BLE001 - truncated, empty or not a checkpoint
        raise RaytumorError(f"{path}: not a readable raytumor model ({short_reason(exc)})") from None
    missing = [key for key in ("config", "model") if not isinstance(payload, dict) or key not in payload]
    if missing:
        raise RaytumorError(f"{path}: not a raytumor model (no {', '.join(missing)})")
    try:
        config = RunConfig.model_validate(payload["config"])
        triplet = config.train.loss in ("batch_hard", "batch_all")
        model = build_model(config.model.encoder, in_channels=2,
                            embedding_dim=config.model.embedding_dim if triplet else payload["num_classes"],
                            normalize=triplet, width=config.model.width)
        model.load_state_dict(payload["model"])
    except (ValueError, KeyError, RuntimeError) as exc:  # a config or weights that do not fit this version
        raise RaytumorError(f"{path}: its weights do not fit its config ({short_reason(exc)})") from None
    model.eval()
    return model, config


__all__ = ["build_trainer", "run_training", "run_pretraining", "export_stopped_run", "best_model_path", "load_best_model",
           "TrainingResult"]
