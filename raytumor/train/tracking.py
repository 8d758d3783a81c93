"""Experiment tracking beside Ray's own: TensorBoard event files and MLflow runs.

Both are Ray Train ``UserCallback``s: they run on the Train controller, receive what rank 0
reports each epoch, and never touch the training loop. Sweeps use Ray Tune's own loggers
instead (TensorBoard per trial by default, ``raytumor.sweep.mlflow_logger`` with ``--mlflow``).

MLflow is an optional extra (``pip install 'raytumor[mlflow]'``). With no URI given, runs go
to MLflow's default local store, ``./mlflow.db`` (SQLite; MLflow >= 3.10 dropped the plain
``./mlruns`` folder store); view them with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
On a multi-node cluster give a tracking server (``--mlflow-uri http://...``): the controller
may run on any node.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.train.v2.api.callback import UserCallback

from raytumor.errors import ConfigError, RaytumorError

TENSORBOARD_DIR = "tensorboard"
DEFAULT_MLFLOW_URI = "sqlite:///mlflow.db"
# What a run reports besides metrics: bookkeeping that would only clutter the charts.
NOT_METRICS = {"epoch", "stage", "run", "trial_id", "checkpoint_path"}


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """The finite numbers of a report, without bookkeeping keys."""
    out = {}
    for key, value in metrics.items():
        if key in NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class TensorBoardCallback(UserCallback):
    """Writes each epoch's metrics as TensorBoard scalars to ``log_dir`` (``<stage>/<metric>``).

    tensorboardX's synchronous event writer: its ``SummaryWriter`` queues events for a
    background thread, so a flushed file could still miss the last epoch.
    """

    def __init__(self, log_dir: str | os.PathLike, stage: str):
        self.log_dir = str(Path(log_dir).resolve())
        self.stage = stage
        self._writer = None

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        if self._writer is None:
            Path(self.log_dir).mkdir(parents=True, exist_ok=True)
            self._writer = EventsWriter(os.path.join(self.log_dir, "events"), filename_suffix=f".{self.stage}")
        report = metrics[0]
        step = int(report.get("epoch", 0))
        for key, value in numeric_metrics(report).items():
            self._writer.write_event(Event(wall_time=time.time(), step=step, summary=scalar(f"{self.stage}/{key}", value)))
        self._writer.flush()

    def __getstate__(self):
        return {**self.__dict__, "_writer": None}


@dataclass(frozen=True)
class MLflowTarget:
    """Where MLflow runs go: a tracking URI (absolute) and an experiment name."""

    tracking_uri: str
    experiment: str


def require_mlflow():
    try:
        import mlflow
    except ImportError:
        raise RaytumorError("--mlflow needs MLflow: pip install 'raytumor[mlflow]' (or mlflow-skinny)") from None
    return mlflow


def mlflow_target(uri: str | None, experiment: str) -> MLflowTarget:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else MLflow's default ``./mlflow.db``. A local
    SQLite store is made absolute (Ray runs the callbacks in another working directory); a
    bare path must name a ``.db`` file, since MLflow >= 3.10 has no folder store."""
    require_mlflow()
    # MLflow's own default, spelled out: mlflow.get_tracking_uri() would return whatever an
    # earlier set_tracking_uri in this process chose (Ray's Tune logger sets it).
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_MLFLOW_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    elif ":" not in uri:
        if not uri.endswith(".db"):
            raise ConfigError(f"--mlflow-uri {uri}: a local store is a SQLite file ending in .db (MLflow >= 3.10 "
                              "has no folder store), or give a URI such as http://host:5000")
        uri = "sqlite:///" + os.path.abspath(uri)
    return MLflowTarget(uri, experiment)


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


def mlflow_experiment_id(client, target: MLflowTarget) -> str:
    """The id of ``target.experiment``, created if new. In a local SQLite store its artifacts
    go to ``mlruns/`` beside the database file; MLflow's default would be ``./mlruns`` in
    whatever directory the creating process happens to run in."""
    experiment = client.get_experiment_by_name(target.experiment)
    if experiment:
        return experiment.experiment_id
    location = None
    if target.tracking_uri.startswith("sqlite:///"):
        location = (Path(target.tracking_uri[len("sqlite:///"):]).parent / "mlruns").as_uri()
    return client.create_experiment(target.experiment, artifact_location=location)


def start_mlflow_run(target: MLflowTarget, run_name: str, params: dict, tags: dict) -> str:
    """Create an MLflow run with ``params`` (flattened) and ``tags``; its id."""
    mlflow = require_mlflow()
    from mlflow.entities import Param

    try:
        client = mlflow.MlflowClient(tracking_uri=target.tracking_uri)
        run = client.create_run(mlflow_experiment_id(client, target), run_name=run_name, tags={k: str(v) for k, v in tags.items()})
        client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in flatten(params).items()])
    except Exception as exc:  # noqa: BLE001 - an unreachable or broken store, in MLflow's words
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RaytumorError(f"MLflow at {target.tracking_uri}: {message}") from None
    return run.info.run_id


def end_mlflow_run(target: MLflowTarget, run_id: str, *, failed: bool, artifacts: list[Path] = ()) -> None:
    mlflow = require_mlflow()

    client = mlflow.MlflowClient(tracking_uri=target.tracking_uri)
    for path in artifacts:
        if Path(path).is_file():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


class MLflowCallback(UserCallback):
    """Logs each epoch's metrics to an existing MLflow run (``<stage>/<metric>``, step = epoch)."""

    def __init__(self, target: MLflowTarget, run_id: str, stage: str):
        self.target = target
        self.run_id = run_id
        self.stage = stage

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        mlflow = require_mlflow()
        from mlflow.entities import Metric

        report = metrics[0]
        step = int(report.get("epoch", 0))
        now = int(time.time() * 1000)
        batch = [Metric(f"{self.stage}/{key}", value, now, step) for key, value in numeric_metrics(report).items()]
        mlflow.MlflowClient(tracking_uri=self.target.tracking_uri).log_batch(self.run_id, metrics=batch)
