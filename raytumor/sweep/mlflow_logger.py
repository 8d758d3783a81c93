"""Ray Tune's MLflow logger for sweeps (``raytumor sweep --mlflow``).

A module of its own because importing Ray's MLflow integration imports MLflow (over a
second): only sweeps that log to MLflow pay it.
"""

from __future__ import annotations

from ray.air.integrations.mlflow import MLflowLoggerCallback

from raytumor.sweep.run import sampled_params
from raytumor.train.tracking import MLflowTarget, mlflow_experiment_id, require_mlflow


class SweepMLflowLogger(MLflowLoggerCallback):
    """Ray Tune's MLflow logger (one MLflow run per trial, metrics every epoch), logging each
    trial's sampled parameters flat: a grid's ``configuration`` dict becomes its keys (and
    sweeps started by older versions drop their context key)."""

    def log_trial_start(self, trial):
        config = trial.config
        trial.config = sampled_params(config)
        try:
            super().log_trial_start(trial)
        finally:
            trial.config = config


def sweep_mlflow_logger(target: MLflowTarget) -> SweepMLflowLogger:
    mlflow = require_mlflow()
    # Created here, so that its artifact location is raytumor's (Ray's logger reuses it).
    mlflow_experiment_id(mlflow.MlflowClient(tracking_uri=target.tracking_uri), target)
    return SweepMLflowLogger(tracking_uri=target.tracking_uri, experiment_name=target.experiment,
                             tags={"raytumor": "sweep"})
