"""A tiny sweep end to end: killed mid-way, resumed, best.yaml by validation, train --best."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raytumor.config import load_config
from raytumor.sweep.run import BEST_FILE, LEADERBOARD_FILE, run_sweep
from tests.conftest import make_dataset

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def tiny_space(tmp_path: Path, dataset: Path) -> Path:
    space = {
        "name": "tiny",
        "dataset": str(dataset),
        "search": "tpe",
        "seed": 0,
        "num_samples": 3,
        "results_dir": str(tmp_path / "results"),
        "base": {"data": {"shape": [16, 16, 4]}, "model": {"width": 0.25},
                 "train": {"batch_size": 9, "lr": 0.003, "epochs": 2}, "pretrain": {"batch_size": 8, "epochs": 1},
                 "resources": {"num_workers": 1, "cpus_per_worker": 0.5}},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "final_train_epochs": 3,
        "parameters": {
            "train.loss": {"type": "choice", "values": ["batch_all", "batch_hard"]},
            "train.margin": {"type": "uniform", "low": 0.1, "high": 1.0},
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def finished_trials(experiment: Path) -> list[Path]:
    return sorted(p.parent for p in experiment.glob("trials/*/summary.json"))


@pytest.fixture(scope="module")
def resumed_sweep(ray_local, tmp_path_factory):
    """A sweep whose driver is SIGKILLed after its first finished trial, then resumed."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    dataset = make_dataset(tmp_path / "ds", n_per_class=(8, 8, 8))
    space_path = tiny_space(tmp_path, dataset)
    experiment = tmp_path / "results" / "tiny"

    # The sweep's driver runs in another process on the session's Ray; SIGKILL it after one trial.
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    driver = subprocess.Popen([sys.executable, "-m", "raytumor.cli", "sweep", str(space_path), "--mlflow",
                               "--mlflow-uri", mlflow_uri], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not finished_trials(experiment) and time.time() < deadline and driver.poll() is None:
        time.sleep(1)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    first = finished_trials(experiment)
    assert first, "no trial finished before the kill"
    assert not (experiment / BEST_FILE).exists()
    stamps = {p.name: (p / "summary.json").stat().st_mtime_ns for p in first}

    result = run_sweep(space_path, resume=True)
    return tmp_path, experiment, first, stamps, result


def test_sweep_killed_then_resumed_keeps_finished_trials(resumed_sweep):
    tmp_path, experiment, first, stamps, result = resumed_sweep
    board = pd.read_csv(experiment / LEADERBOARD_FILE)
    assert len(board) == 3 and board["objective"].notna().all()
    for trial in first:  # finished trials were kept, not re-run
        assert (trial / "summary.json").stat().st_mtime_ns == stamps[trial.name]
        assert trial.name in set(board["trial_id"])

    # best.yaml: the trial with the best validation Recall_M, its config, the final epoch budget.
    best_row = board.sort_values("objective", ascending=False).iloc[0]
    assert result.best_value == pytest.approx(best_row["objective"])
    best = load_config(experiment / BEST_FILE)
    trial_config = load_config(experiment / "trials" / best_row["trial_id"] / "config.yaml")
    assert best.train.loss == trial_config.train.loss and best.train.margin == trial_config.train.margin
    assert best.train.epochs == 3
    history = pd.read_csv(experiment / "trials" / best_row["trial_id"] / "metrics.csv")
    assert history["val_recall_macro"].max() == pytest.approx(best_row["objective"])
    assert not [c for c in history.columns if c.startswith("test")]

    # Every trial is a run directory `raytumor evaluate` reads, those ASHA stopped at epoch 1 too.
    for row in board.itertuples():
        run_dir = experiment / "trials" / row.trial_id
        summary = json.loads((run_dir / "summary.json").read_text())
        assert (row.status == "stopped") == summary.get("stopped_early", False) == (row.epochs_run < 2), row
        assert (run_dir / "best_model.pt").is_file() and len(pd.read_csv(run_dir / "metrics.csv")) == row.epochs_run



def test_trials_ran_two_at_a_time(resumed_sweep):
    """``max_concurrent_trials: auto`` gives 2 for 0.5-CPU workers on the tests' 2 CPUs, across
    the kill and the resume: the first two trials overlap, and no moment has three running.
    A trial's span runs from its first report's start to its last report."""
    _, experiment, *_ = resumed_sweep
    spans = []
    for path in (experiment / "tune").glob("*/result.json"):
        reports = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        spans.append((reports[0]["timestamp"] - reports[0]["time_this_iter_s"], reports[-1]["timestamp"]))
    spans.sort()
    assert len(spans) == 3
    (start_1, end_1), (start_2, end_2), (start_3, end_3) = spans
    assert min(end_1, end_2) - start_2 > 1, spans  # Tune's timestamps are whole seconds
    assert start_3 > min(end_1, end_2) - 1, spans


def test_sweep_logs_every_trial_to_mlflow_across_the_resume(resumed_sweep):
    from mlflow import MlflowClient

    tmp_path, experiment, _, _, _ = resumed_sweep
    board = pd.read_csv(experiment / LEADERBOARD_FILE)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    for row in board.to_dict("records"):
        finished = [r for r in runs if row["trial_id"] in r.info.run_name and r.info.status == "FINISHED"]
        assert finished, f"no finished MLflow run for trial {row['trial_id']}: {[r.info.run_name for r in runs]}"
        run = finished[-1]
        # The sampled parameters only, not the sweep's base config.
        assert set(run.data.params) == {"train.loss", "train.margin"}
        assert run.data.params["train.loss"] == row["param:train.loss"]
        recall = client.get_metric_history(run.info.run_id, "val_recall_macro")
        assert max(m.value for m in recall) == pytest.approx(row["objective"])


def test_train_best_trains_the_config_of_best_yaml(resumed_sweep, monkeypatch):
    from typer.testing import CliRunner

    from raytumor.cli import app

    tmp_path, _, _, _, result = resumed_sweep
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(app, ["train", "--best", "--results-dir", "results"])
    assert out.exit_code == 0, out.output
    best = load_config(result.best_config_path)
    run_dir = tmp_path / "runs" / "tiny-best"
    trained = load_config(run_dir / "config.yaml")
    assert trained.model_dump() == best.model_dump()
    assert (run_dir / "best_model.pt").is_file()
    assert (tmp_path / "results" / "latest-best-run.txt").read_text().strip() == str(run_dir.resolve())


class _TuneLikeTuner:
    """``fit`` catches SIGINT the way Ray Tune's ``_setup_signal_catching`` does: its handler puts
    back the handler it found, then ``fit`` returns as if the sweep had finished."""

    def __init__(self, signal_during_fit: bool):
        self.signal_during_fit = signal_during_fit

    def fit(self):
        found = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, lambda signum, frame: signal.signal(signal.SIGINT, found))
        if self.signal_during_fit:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        return "results"


@pytest.mark.parametrize("signal_during_fit", [False, True])
def test_a_sweep_ended_by_ctrl_c_is_told_from_a_finished_one(signal_during_fit):
    from raytumor.sweep.run import _fit_noting_interruption

    before = signal.getsignal(signal.SIGINT)
    assert _fit_noting_interruption(_TuneLikeTuner(signal_during_fit)) == ("results", signal_during_fit)
    assert signal.getsignal(signal.SIGINT) is before
