"""The sweep's pre-training cache when trials that share a pre-training run at once (no Ray:
the Ray Train fit is replaced by a slow fake that counts its calls)."""

from __future__ import annotations

import io
import threading
import time

import torch

from raytumor.config import build_config
from raytumor.train import trainer
from raytumor.train.loops import BACKBONE_FILE, CHECKPOINT_FILE
from raytumor.train.run_dir import PRETRAINED_BACKBONE_FILE


def fake_pretraining(monkeypatch, seconds: float) -> list[str]:
    """Replace the pre-training fit with one that takes ``seconds``; returns the list of fits."""
    fits: list[str] = []
    checkpoint = io.BytesIO()
    torch.save({"history": [{"epoch": 1, "loss": 0.5}]}, checkpoint)

    def fit(run_dir):
        fits.append(run_dir.name)
        time.sleep(seconds)
        return {CHECKPOINT_FILE: checkpoint.getvalue(), BACKBONE_FILE: f"weights of {run_dir.name}".encode()}

    monkeypatch.setattr(trainer, "pretrain_key", lambda config: "same-pretraining")
    monkeypatch.setattr(trainer, "pretraining_inputs", lambda config, shared: None)
    monkeypatch.setattr(trainer, "build_trainer", lambda config, stage, run_dir, inputs, **kwargs: run_dir)
    monkeypatch.setattr(trainer, "_fit", fit)
    return fits


def test_trials_sharing_a_pretraining_at_once_compute_it_once(tmp_path, monkeypatch):
    fits = fake_pretraining(monkeypatch, seconds=1.0)
    config = build_config({})
    cache = tmp_path / "pretrain_cache"
    run_dirs = [tmp_path / "trials" / name for name in ("a", "b", "c")]
    errors = []

    def trial(run_dir):
        run_dir.mkdir(parents=True)
        try:
            trainer.run_pretraining(config, run_dir, cache_dir=cache)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=trial, args=(run_dir,)) for run_dir in run_dirs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors and len(fits) == 1, (errors, fits)
    (first,) = fits
    for run_dir in run_dirs:  # every trial got the one pre-trained backbone
        assert (run_dir / PRETRAINED_BACKBONE_FILE).read_bytes() == f"weights of {first}".encode()
    assert (cache / "same-pretraining" / PRETRAINED_BACKBONE_FILE).read_bytes() == f"weights of {first}".encode()


def test_without_a_cache_every_run_pretrains(tmp_path, monkeypatch):
    fits = fake_pretraining(monkeypatch, seconds=0.0)
    config = build_config({})
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        trainer.run_pretraining(config, tmp_path / name)
    assert fits == ["a", "b"]
    assert (tmp_path / "a" / "pretrain_metrics.csv").is_file()
