"""Experiment tracking helpers: metric filtering, MLflow URIs, TensorBoard event files."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from raytumor.errors import ConfigError, RaytumorError
from raytumor.train.tracking import (
    MLflowTarget,
    TensorBoardCallback,
    flatten,
    mlflow_target,
    numeric_metrics,
    start_mlflow_run,
)


def read_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the TensorBoard event files under ``log_dir``: tag -> {step: value}."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_numeric_metrics_keeps_finite_numbers_only():
    report = {"epoch": 3, "loss": 0.5, "val_recall_macro": float("nan"), "stage": "train", "ok": True,
              "samples_per_s": 12, "checkpoint_path": "/x", "inf": float("inf")}
    assert numeric_metrics(report) == {"loss": 0.5, "samples_per_s": 12.0}


def test_flatten_nests_with_dots():
    assert flatten({"train": {"loss": "batch_all", "margin": 0.5}, "seed": 0}) == {
        "train.loss": "batch_all", "train.margin": "0.5", "seed": "0"}


def test_mlflow_target_makes_local_stores_absolute(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_target(None, "e").tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert mlflow_target("sqlite:///sub/t.db", "e").tracking_uri == f"sqlite:///{tmp_path / 'sub' / 't.db'}"
    assert mlflow_target("store.db", "e").tracking_uri == f"sqlite:///{tmp_path / 'store.db'}"
    with pytest.raises(ConfigError, match="mlruns: a local store is a SQLite file"):
        mlflow_target("mlruns", "e")
    assert mlflow_target("http://mlflow.internal:5000", "e").tracking_uri == "http://mlflow.internal:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert mlflow_target(None, "e").tracking_uri == "http://from-env:5000"


def test_local_store_keeps_artifacts_beside_its_database(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from raytumor.train.tracking import end_mlflow_run, start_mlflow_run

    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    target = MLflowTarget(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}", "e")
    (tmp_path / "store").mkdir()
    summary = tmp_path / "summary.json"
    summary.write_text("{}")
    run_id = start_mlflow_run(target, "r", {"seed": 0}, {})
    end_mlflow_run(target, run_id, failed=False, artifacts=[summary])
    assert list((tmp_path / "store" / "mlruns").rglob("summary.json"))
    assert not (workdir / "mlruns").exists()


def test_tensorboard_callback_writes_scalars_per_epoch(tmp_path):
    callback = TensorBoardCallback(tmp_path / "tb", "train")
    for epoch, loss in ((1, 0.9), (2, 0.4)):
        callback.after_report(None, [{"epoch": epoch, "loss": loss, "stage": "train"}, {"epoch": epoch, "loss": 7.0}],
                              None)
    scalars = read_scalars(tmp_path / "tb")
    assert scalars == {"train/loss": {1: pytest.approx(0.9), 2: pytest.approx(0.4)}}


def test_mlflow_flag_without_mlflow_installed_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    with pytest.raises(RaytumorError, match=r"pip install 'raytumor\[mlflow\]'"):
        mlflow_target(None, "e")


def test_unreachable_mlflow_store_is_one_line_error(tmp_path):
    pytest.importorskip("mlflow")
    (tmp_path / "a-file").write_text("not a directory")
    target = MLflowTarget(f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}", "e")
    with pytest.raises(RaytumorError, match=r"^MLflow at sqlite:///.*a-file.*: ") as info:
        start_mlflow_run(target, "run", {"a": 1}, {})
    assert "\n" not in str(info.value)
