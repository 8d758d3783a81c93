"""One sweep trial (``sweep_trial``) outside Ray: what it reports to Tune when it starts again."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from raytumor.sweep import run as sweep_run
from raytumor.train import trainer
from raytumor.train.loops import CHECKPOINT_FILE

HISTORY = [{"epoch": 1, "loss": 0.5, "val_recall_macro": 0.4},
           {"epoch": 2, "loss": 0.3, "val_recall_macro": float("nan")}]


@pytest.fixture
def trial(tmp_path, monkeypatch):
    """Runs ``sweep_trial`` as trial ``t1`` with Tune and training replaced by recorders."""
    import ray.tune
    import ray.tune.integration.ray_train as ray_train_integration

    events = []
    monkeypatch.setattr(ray.tune, "report", lambda metrics: events.append(("report", metrics)))
    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t1"))
    monkeypatch.setattr(ray_train_integration, "TuneReportCallback", lambda: "tune callback")
    monkeypatch.setattr(trainer, "run_training",
                        lambda config, **kwargs: events.append(("train", config.name, kwargs["resume"])))
    context = {"base": {}, "fixed": {}, "trials_dir": str(tmp_path / "trials"),
               "pretrain_cache": str(tmp_path / "pretrain_cache")}

    def run() -> list:
        sweep_run.sweep_trial({"train.margin": 0.5}, context)
        return events

    return tmp_path / "trials" / "t1", run


def reported(rows: list[dict]) -> list:
    return [("report", {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()})
            for row in rows]


def test_a_new_trial_trains_and_reports_through_ray_train(trial):
    run_dir, run = trial
    assert run() == [("train", "t1", "auto")]


def test_a_trial_interrupted_after_a_checkpoint_reports_the_checkpointed_epochs_first(trial):
    # The sweep's driver died after epoch 2's checkpoint: the resumed run trains from epoch 3
    # (here: nothing, 2 was the last), so the trial must hand Tune epochs 1-2 itself.
    run_dir, run = trial
    for stamp, rows in (("2026-01-01_00-00-00.0", HISTORY[:1]), ("2026-01-01_00-00-05.0", HISTORY)):
        checkpoint = run_dir / "train" / f"checkpoint_{stamp}"
        checkpoint.mkdir(parents=True)
        torch.save({"history": rows, "epoch": len(rows)}, checkpoint / CHECKPOINT_FILE)
    assert trainer.checkpointed_history(run_dir)[-1]["epoch"] == 2
    assert run() == [*reported(HISTORY), ("train", "t1", "auto")]


def test_a_finished_trial_replays_its_epochs_without_training(trial):
    run_dir, run = trial
    run_dir.mkdir(parents=True)
    pd.DataFrame(HISTORY).to_csv(run_dir / "metrics.csv", index=False)
    (run_dir / "summary.json").write_text("{}")
    assert run() == reported(HISTORY)
