"""One sweep trial (``sweep_trial``) outside Ray: what it reports to Tune when it starts again."""

from __future__ import annotations

import json
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


def as_json(events: list) -> str:
    """Events compared as JSON text, where NaN is ``NaN`` (two NaN floats are never equal)."""
    return json.dumps(events)


def reported(rows: list[dict]) -> list:
    """What the live run reported: a NaN metric stays NaN (as None it became JSON null)."""
    return [("report", row) for row in rows]


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
    assert as_json(run()) == as_json([*reported(HISTORY), ("train", "t1", "auto")])


def test_a_finished_trial_replays_its_epochs_without_training(trial):
    run_dir, run = trial
    run_dir.mkdir(parents=True)
    pd.DataFrame(HISTORY).to_csv(run_dir / "metrics.csv", index=False)
    (run_dir / "summary.json").write_text("{}")
    assert as_json(run()) == as_json(reported(HISTORY))


def write_checkpoint(run_dir, stamp: str, history: list[dict], best_model: dict) -> None:
    """A training checkpoint as ``train_loop_per_worker`` writes it, with its best-model file."""
    checkpoint = run_dir / "train" / f"checkpoint_{stamp}"
    checkpoint.mkdir(parents=True)
    best_epoch = max(history, key=lambda row: row["val_recall_macro"])["epoch"]
    torch.save({"history": history, "epoch": len(history), "best_epoch": best_epoch, "restarts": 0,
                "config": best_model["config"], "pretrained_backbone": "/runs/pre/pretrain_backbone.pt"},
               checkpoint / CHECKPOINT_FILE)
    torch.save({**best_model, "epoch": best_epoch}, checkpoint / trainer.BEST_MODEL_FILE)


@pytest.fixture
def tiny_model(tmp_path) -> dict:
    from raytumor.config import DataConfig, ModelConfig, RunConfig
    from raytumor.models import build_model

    torch.manual_seed(0)
    model = build_model("paper_cnn", embedding_dim=6, normalize=True, width=0.25)
    config = RunConfig(name="t1", output_dir=str(tmp_path / "trials"), data=DataConfig(dataset=str(tmp_path), shape=(16, 16, 4)),
                       model=ModelConfig(width=0.25, embedding_dim=6))
    return {"model": model.state_dict(), "config": config.model_dump(mode="json"), "num_classes": 3}


def test_a_trial_stopped_early_is_exported_from_its_newest_whole_checkpoint(tmp_path, tiny_model, caplog):
    run_dir = tmp_path / "trials" / "t1"
    assert trainer.export_stopped_run(run_dir) is None  # nothing trained yet: nothing to export
    first = {"epoch": 1, "loss": 0.9, "val_recall_macro": 0.5, "val_recall_macro_rare": float("nan")}
    second = {"epoch": 2, "loss": 0.7, "val_recall_macro": 0.25, "val_recall_macro_rare": float("nan")}
    write_checkpoint(run_dir, "2026-01-01_00-00-00.0", [first], tiny_model)
    write_checkpoint(run_dir, "2026-01-01_00-00-05.0", [first, second], tiny_model)
    write_checkpoint(run_dir, "2026-01-01_00-00-09.0", [first, second, {**second, "epoch": 3}], tiny_model)
    newest = run_dir / "train" / "checkpoint_2026-01-01_00-00-09.0" / CHECKPOINT_FILE
    newest.write_bytes(newest.read_bytes()[:50])  # the stop cut the last one short

    result = trainer.export_stopped_run(run_dir)

    assert (result.best_epoch, result.best_metrics["val_recall_macro"]) == (1, 0.5)
    assert pd.read_csv(run_dir / "metrics.csv")["epoch"].tolist() == [1, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_early"] is True and summary["epochs"] == 2 and summary["best_epoch"] == 1
    assert summary["best_metrics"]["val_recall_macro_rare"] is None
    assert summary["pretrained_backbone"] == "/runs/pre/pretrain_backbone.pt"  # as the checkpoint recorded it
    model, config = trainer.load_best_model(run_dir)  # what `raytumor evaluate` reads
    assert config.name == "t1"
    assert all(torch.equal(value, tiny_model["model"][key]) for key, value in model.state_dict().items())
    assert trainer.export_stopped_run(run_dir) is None  # exported once; a finished run is left alone


def test_a_stopped_trial_whose_best_model_file_was_cut_short_is_not_exported(tmp_path, tiny_model, caplog):
    run_dir = tmp_path / "trials" / "t1"
    write_checkpoint(run_dir, "2026-01-01_00-00-00.0", HISTORY[:1], tiny_model)
    best = run_dir / "train" / "checkpoint_2026-01-01_00-00-00.0" / trainer.BEST_MODEL_FILE
    best.write_bytes(best.read_bytes()[:50])
    assert trainer.export_stopped_run(run_dir) is None
    assert not (run_dir / "summary.json").exists() and f"{best}: not exported" in caplog.text


def test_the_sweep_exports_the_trials_asha_stopped_and_leaves_failed_ones_to_resume(tmp_path, tiny_model):
    experiment = tmp_path
    for trial_id in ("stopped", "failed"):
        write_checkpoint(experiment / "trials" / trial_id, "2026-01-01_00-00-00.0", HISTORY[:1], tiny_model)
    (experiment / "trials" / "done").mkdir()
    (experiment / "trials" / "done" / "summary.json").write_text('{"best_epoch": 2}')
    history = pd.DataFrame(HISTORY[:1])
    results = [SimpleNamespace(metrics={"trial_id": trial_id}, path=str(experiment / "tune" / trial_id), config={},
                               metrics_dataframe=history, error=RuntimeError("worker died") if trial_id == "failed" else None)
               for trial_id in ("stopped", "failed", "done")]

    sweep_run.export_stopped_trials(experiment, results)
    space = SimpleNamespace(objective=SimpleNamespace(metric="val_recall_macro", mode="max"))
    rows = sweep_run._trial_rows(results, space, experiment / "trials")

    assert {row["trial_id"]: row["status"] for row in rows} == {"stopped": "stopped", "failed": "error", "done": "done"}
    assert (experiment / "trials" / "stopped" / trainer.BEST_MODEL_FILE).is_file()
    assert not (experiment / "trials" / "failed" / "summary.json").exists()
    assert json.loads((experiment / "trials" / "done" / "summary.json").read_text()) == {"best_epoch": 2}


def test_the_leaderboard_reads_a_null_metric_as_nan(tmp_path):
    """Trials replayed by earlier versions have JSON null for a NaN Recall_M* in Tune's results;
    the leaderboard row reads it as NaN instead of failing on ``float(None)``."""
    history = pd.DataFrame([{"epoch": 1, "val_recall_macro": 0.5, "val_recall_macro_rare": None, "val_rank5": 0.75},
                            {"epoch": 2, "val_recall_macro": 1.0, "val_recall_macro_rare": None, "val_rank5": 1.0}])
    assert history["val_recall_macro_rare"].dtype == object
    result = SimpleNamespace(metrics={"trial_id": "replayed"}, path=str(tmp_path / "tune" / "replayed"), config={},
                             metrics_dataframe=history, error=None)
    space = SimpleNamespace(objective=SimpleNamespace(metric="val_recall_macro", mode="max"))
    (row,) = sweep_run._trial_rows([result], space, tmp_path / "trials")
    assert (row["objective"], row["best_epoch"], row["val_rank5"]) == (1.0, 2, 1.0)
    assert math.isnan(row["val_recall_macro_rare"])
