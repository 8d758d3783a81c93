"""Ray Train runs on tiny data: 2 CPU workers, crash recovery, pre-training -> training."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from raytumor.config import load_config
from raytumor.train.tracking import TENSORBOARD_DIR, MLflowTarget
from raytumor.train.trainer import BEST_MODEL_FILE, PRETRAINED_BACKBONE_FILE, load_best_model, run_training
from tests.conftest import make_dataset
from tests.train.test_tracking import read_scalars

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("train") / "ds", n_per_class=(10, 10, 10), unlabelled=6)


def config_for(dataset, output_dir, name, *extra):
    return load_config(overrides=[
        f"data.dataset={dataset}", "data.shape=[16,16,4]", f"output_dir={output_dir}", f"name={name}",
        "model.width=0.25", "train.batch_size=9", "train.loss=batch_all", "train.margin=0.5", "train.lr=0.003",
        "pretrain.batch_size=8", *extra,
    ])


def worker_log_lines(pids: set[int] | None = None) -> list[str]:
    """Every line the session's Ray workers (those with ``pids``) wrote to stdout or stderr (Ray
    forwards both to the console)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    for _ in range(5):  # Ray moves the files of exited workers into old/ while we read
        try:
            paths = [*logs.glob("worker-*.out"), *logs.glob("worker-*.err"), *logs.glob("old/worker-*.out"),
                     *logs.glob("old/worker-*.err")]
            return [line for path in paths if pids is None or int(path.stem.rsplit("-", 1)[1]) in pids
                    for line in path.read_text(errors="replace").splitlines()]
        except FileNotFoundError:
            continue
    raise AssertionError(f"could not read the worker logs in {logs}")


def progress_states(name: str) -> Counter:
    """How often each progress-bar state of run ``name`` (``ray.experimental.tqdm_ray``, a JSON
    line) reached a Ray worker's stdout or stderr."""
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    return Counter(line for line in worker_log_lines()
                   if RAY_TQDM_MAGIC in line and json.loads(line)["desc"].split()[1:2] == [name])


def test_two_worker_run_learns_and_survives_a_worker_crash(ray_local, tiny_dataset, tmp_path):
    config = config_for(tiny_dataset, tmp_path, "two", "train.epochs=6", "resources.num_workers=2",
                        "resources.cpus_per_worker=0.5")
    marker = tmp_path / "crashed"
    mlflow = MLflowTarget(f"sqlite:///{tmp_path / 'mlflow.db'}", "tests")
    result = run_training(config, extra_loop_config={"crash_once": {"rank": 1, "epoch": 3, "marker": str(marker)}},
                          mlflow=mlflow)
    assert marker.exists()  # the worker really died once
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["restarts_from_checkpoint"] == 1 and summary["epochs"] == 6
    history = pd.read_csv(result.run_dir / "metrics.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4, 5, 6]  # resumed after epoch 3, nothing repeated or lost
    assert history["loss"].iloc[-2:].min() < history["loss"].iloc[0]
    assert history["val_recall_macro"].max() > 0.5  # three blob sizes: chance is 1/3
    # The P x K batches survived Ray's sharding: every class in every batch had K = 3 rows.
    assert (history["min_rows_per_class_in_batch"] == 3).all()
    # Time to first batch: once per start of the workers, at epoch 1 and at the first epoch after
    # the restart (which checkpoint Ray Train restarts from depends on timing, so not a fixed epoch).
    first_batch = history.set_index("epoch")["first_batch_s"].dropna()
    assert first_batch.index[0] == 1 and len(first_batch) == 2 and 1 < first_batch.index[1] <= 4, history.to_string()
    assert ((first_batch > 0) & (first_batch < 120)).all()
    model, saved = load_best_model(result.run_dir)
    assert saved.resources.num_workers == 2
    best_epoch = int(history["val_recall_macro"].idxmax()) + 1
    assert summary["best_epoch"] == best_epoch

    # Every epoch reached TensorBoard and MLflow once, with the values of metrics.csv, across the restart.
    scalars = read_scalars(result.run_dir / TENSORBOARD_DIR)
    assert scalars["train/val_recall_macro"] == pytest.approx(dict(zip(history["epoch"], history["val_recall_macro"])))
    assert sorted(scalars["train/loss"]) == [1, 2, 3, 4, 5, 6]
    client = MlflowClient(tracking_uri=mlflow.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "two"
    assert run.data.params["train.loss"] == "batch_all" and run.data.params["resources.num_workers"] == "2"
    logged = client.get_metric_history(run.info.run_id, "train/val_recall_macro")
    assert {m.step: m.value for m in logged} == pytest.approx(dict(zip(history["epoch"], history["val_recall_macro"])))
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "metrics.csv", "summary.json"}


def test_pretraining_weights_reach_training(ray_local, tiny_dataset, tmp_path):
    pre = config_for(tiny_dataset, tmp_path, "pre", "pretrain.enabled=true", "pretrain.epochs=1",
                     "pretrain.loss=ntxent")
    run_training(pre, stages=("pretrain",))
    pretrain_history = pd.read_csv(tmp_path / "pre" / "pretrain_metrics.csv")
    assert pretrain_history["first_batch_s"].iloc[0] > 0
    backbone = torch.load(tmp_path / "pre" / PRETRAINED_BACKBONE_FILE, weights_only=True)
    assert list(read_scalars(tmp_path / "pre" / TENSORBOARD_DIR)["pretrain/pretrain_loss"]) == [1]

    # Adam with a vanishing learning rate: after one epoch the weights are still the pre-trained ones.
    tuned = config_for(tiny_dataset, tmp_path, "tuned", "train.epochs=1", "train.lr=1e-12",
                       f"train.pretrained={tmp_path / 'pre'}")
    run_training(tuned)
    model, _ = load_best_model(tmp_path / "tuned")
    conv = [k for k in backbone if k.endswith("weight") and backbone[k].dim() == 5][0]
    torch.testing.assert_close(model.backbone.state_dict()[conv], backbone[conv], atol=1e-6, rtol=0)

    # Without the backbone, the same run would start (and, at this learning rate, stay) at the
    # seeded initialisation of rank 0, which pre-training moved away from.
    from raytumor.models import build_model

    torch.manual_seed(tuned.seed * 1000)
    fresh = build_model(tuned.model.encoder, in_channels=2, embedding_dim=tuned.model.embedding_dim, normalize=True,
                        width=tuned.model.width)
    assert not torch.allclose(fresh.backbone.state_dict()[conv], backbone[conv])
    head = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    assert head  # the head got no pre-trained weights: the run's init is this one
    for name, value in head.items():
        torch.testing.assert_close(value, fresh.state_dict()[name], atol=1e-6, rtol=0)
    assert (tmp_path / "tuned" / BEST_MODEL_FILE).is_file()

    # Each state of a run's progress bars reached the console once: a state written twice
    # re-opened the bar when its last state came again, and the finished bar stayed on screen.
    for name in ("pre", "tuned"):
        states = progress_states(name)
        assert states and max(states.values()) == 1, states
        assert any(json.loads(line)["closed"] for line in states)
    # No preemption watcher on this (embedded) Ray: it has nothing to watch there.
    from ray.util.state import list_actors

    session = ray_local.get_runtime_context().gcs_address  # not auto-detected: other Rays may run here
    assert not list_actors(address=session, filters=[("class_name", "=", "PreemptionWatcher")], limit=1000)
    # No fit's DatasetManager warned that Ray Train's default options set a deprecated field.
    assert not [line for line in worker_log_lines() if "exclude_resources` is deprecated" in line]
    # Nor did a Train worker repeat that raytumor turned Ray Data's progress bars off for it.
    train_workers = {actor.pid for actor in
                     list_actors(address=session, filters=[("class_name", "=", "RayTrainWorker")], limit=1000)}
    assert train_workers
    assert not [line for line in worker_log_lines(pids=train_workers) if "Progress bars disabled" in line]
    # Nor Ray Train's two INFO lines per report (one is the whole metrics dict): the progress
    # bar shows the epoch. Ray Train's own log files still have them.
    per_report = ("Reporting training result", "Checkpoint successfully created at")
    assert not [line for line in worker_log_lines(pids=train_workers) if any(m in line for m in per_report)]
    train_logs = Path(ray_local._private.worker._global_node.get_logs_dir_path()) / "train"
    assert any("Reporting training result" in path.read_text(errors="replace")
               for path in train_logs.glob("ray-train-*-worker-*.log"))


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def test_interrupted_run_resumes_with_resume(ray_local, tiny_dataset, tmp_path):
    from raytumor.errors import RaytumorError

    config = config_for(tiny_dataset, tmp_path, "stop", "train.epochs=3", "resources.max_failures=0")
    marker = tmp_path / "crashed"
    with pytest.raises(RaytumorError, match="training failed"):
        run_training(config, extra_loop_config={"crash_once": {"rank": 0, "epoch": 2, "marker": str(marker)}})
    assert not (tmp_path / "stop" / "summary.json").exists()
    # A checkpoint the killed driver uploaded but Ray Train never registered: no one else deletes it.
    orphan = tmp_path / "stop" / "train" / "checkpoint_2000-01-01_00-00-00.000000"
    orphan.mkdir()
    (orphan / "checkpoint.pt").write_bytes(b"cut short")
    result = run_training(config, resume=True)
    kept = sorted(p.name for p in (tmp_path / "stop" / "train").glob("checkpoint_*") if p.is_dir())
    assert len(kept) == 2 and orphan.name not in kept, kept  # Ray Train's num_to_keep=2, and no orphan
    summary = json.loads((result.run_dir / "summary.json").read_text(), parse_constant=_not_json)
    assert summary["restarts_from_checkpoint"] == 1
    # Three classes of 10 cases: none is rare, so Recall_M* has no value; null, not NaN.
    assert summary["best_metrics"]["val_recall_macro_rare"] is None and summary["best_metrics"]["val_recall_macro"] >= 0
    assert pd.read_csv(result.run_dir / "metrics.csv")["epoch"].tolist() == [1, 2, 3]


def test_existing_run_needs_resume(ray_local, tiny_dataset, tmp_path):
    from raytumor.errors import RaytumorError

    (tmp_path / "taken").mkdir()
    with pytest.raises(RaytumorError, match="--resume"):
        run_training(config_for(tiny_dataset, tmp_path, "taken"))
    with pytest.raises(RaytumorError, match="no run to resume"):
        run_training(config_for(tiny_dataset, tmp_path, "absent"), resume=True)


def test_workers_the_embedded_ray_can_never_place_are_refused_before_a_run_starts(ray_local, tiny_dataset, tmp_path):
    from raytumor.errors import ConfigError
    from raytumor.runtime import on_embedded_ray
    from raytumor.train.trainer import check_workers_fit

    assert on_embedded_ray()  # the session's Ray is started the way raytumor starts its own
    with pytest.raises(ConfigError, match=r"2 worker\(s\) x 1.5 CPU need 3 CPUs; this Ray has 2"):
        run_training(config_for(tiny_dataset, tmp_path, "big", "resources.num_workers=2",
                                "resources.cpus_per_worker=1.5"))
    assert not (tmp_path / "big").exists()  # Ray would have waited for them forever
    with pytest.raises(ConfigError, match=r"use_gpu: true needs 2 GPU\(s\) \(one per worker\); this Ray has 1"):
        check_workers_fit(config_for(tiny_dataset, tmp_path, "gpu", "resources.num_workers=2",
                                     "resources.use_gpu=true"), {"CPU": 8.0, "GPU": 1.0})
    check_workers_fit(config_for(tiny_dataset, tmp_path, "fits", "resources.num_workers=2"), {"CPU": 2.0})
    check_workers_fit(config_for(tiny_dataset, tmp_path, "auto"), {"CPU": 2.0})  # use_gpu auto: CPU here


class _RayTrainLikeTrainer:
    """``fit`` binds its own SIGINT handler and, on Ctrl-C, aborts and calls ``sys.exit(0)``
    the way Ray Train 2.60's controller does."""

    def fit(self):
        import signal
        import sys

        signal.signal(signal.SIGINT, lambda signum, frame: None)
        sys.exit(0)


def test_ray_train_exiting_on_ctrl_c_is_an_interruption_and_its_handler_is_unbound():
    import signal

    from raytumor.train.trainer import _fit

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        _fit(_RayTrainLikeTrainer())
    assert signal.getsignal(signal.SIGINT) is before


def test_resume_skips_a_newest_checkpoint_cut_short_for_the_one_before(tmp_path, caplog):
    from raytumor.errors import RaytumorError
    from raytumor.train.loops import CHECKPOINT_FILE
    from raytumor.train.trainer import _latest_checkpoint, checkpointed_history

    stage = tmp_path / "run" / "train"
    for index, epochs in enumerate(([{"epoch": 1}], [{"epoch": 1}, {"epoch": 2}])):
        (stage / f"checkpoint_2026-12-02_0{index}").mkdir(parents=True)
        torch.save({"epoch": len(epochs), "history": epochs}, stage / f"checkpoint_2026-12-02_0{index}" / CHECKPOINT_FILE)
    assert _latest_checkpoint(stage) == str((stage / "checkpoint_2026-12-02_01").resolve())

    newest = stage / "checkpoint_2026-12-02_01" / CHECKPOINT_FILE
    newest.write_bytes(newest.read_bytes()[:100])  # the driver killed while Ray copied it into the run
    assert _latest_checkpoint(stage) == str((stage / "checkpoint_2026-12-02_00").resolve())
    assert f"{newest}: unreadable" in caplog.text
    assert checkpointed_history(tmp_path / "run") == [{"epoch": 1}]

    (stage / "checkpoint_2026-12-02_00" / CHECKPOINT_FILE).write_bytes(b"")
    with pytest.raises(RaytumorError, match="no checkpoint there loads"):
        _latest_checkpoint(stage)
