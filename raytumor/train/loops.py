"""The Ray Train per-worker loops: the only training code that touches ``ray.train``.

Each epoch ends with one ``ray.train.report`` carrying a checkpoint (model, optimiser,
epoch, sampler RNG state, history, best model so far), so a crash costs at most one epoch.
The first epoch a loop runs (a fresh start or a restart) also reports ``first_batch_s``,
the slowest worker's time to its first batch of input: from the loop's start until its
``train`` shard is in memory, plus assembling the first batch (building the model and rank
0's reading of the validation sets are not counted).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from raytumor.train.telemetry import EpochMetrics

CHECKPOINT_FILE = "checkpoint.pt"
BEST_MODEL_FILE = "best_model.pt"
BACKBONE_FILE = "backbone.pt"
SELECTION_METRIC = "val_recall_macro"


def _context():
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _load_state(checkpoint, resume_from: str | None = None) -> dict | None:
    """The training state to continue from: Ray's restored checkpoint (after a worker crash),
    else the run's latest checkpoint on ``--resume`` (Ray does not restore a failed run)."""
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    if resume_from:
        return torch.load(Path(resume_from) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    return None


def _report(metrics: dict, rank: int, files: dict[str, dict]) -> None:
    """Report from every rank (a barrier); rank 0 attaches a checkpoint holding ``files``."""
    import ray.train

    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            for name, payload in files.items():
                torch.save(payload, Path(directory) / name)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)


def _maybe_crash(loop_config: dict, epoch: int, rank: int) -> None:
    """Fault injection for the recovery test: hard-exit one worker once at a given epoch."""
    crash = loop_config.get("crash_once")
    if crash and rank == crash["rank"] and epoch == crash["epoch"]:
        marker = Path(crash["marker"])
        if not marker.exists():
            marker.write_text("crashed")
            os._exit(1)


def _progress(rank: int, total: int, start: int, description: str):
    if rank != 0:
        return None
    from ray.experimental.tqdm_ray import tqdm

    # Flushed at every call (an epoch's end): at tqdm_ray's default of once a second, the update
    # right after the description was dropped, and every bar showed one epoch fewer than done.
    bar = tqdm(total=total, desc=description, unit="epoch", flush_interval_s=0)
    # Shown from the loop's start: the driver draws a bar from its first state and times it from
    # then, so a bar first sent after epoch 1 read "0/12" for no time and then "17.4k epoch/s".
    if start:
        bar.update(start)
    else:
        bar.refresh()
    return bar


def _epoch_done(bar, description: str) -> None:
    """Advance the bar one epoch with its new description, as one state: the driver draws each
    state it gets, so a description and an update sent apart drew 4 lines an epoch in a log, not 3."""
    if bar is None:
        return
    bar.n += 1  # tqdm_ray's setter sends nothing; set_description sends both
    bar.set_description(description)


def _not_progress_bars_disabled(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Progress bars disabled")


# Ray Train's worker logs these at INFO for every report: two console lines per epoch per
# trial, the second the whole metrics dict (136 in one `raytumor demo`), beside the progress
# bar and Tune's table that show the same. They still reach Ray Train's log files (logs/train/).
_PER_REPORT_MESSAGES = ("Reporting training result", "Checkpoint successfully created at")


def _not_per_report(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_PER_REPORT_MESSAGES)


def _quiet_console() -> None:
    """Drop the two per-report messages above from this worker's console, and Ray Data's notice
    that the datasets a worker reads have progress bars off (raytumor.train.datasets), which it
    gives at WARNING in every process that iterates one."""
    progress_logger = logging.getLogger("ray.data._internal.progress")
    if _not_progress_bars_disabled not in progress_logger.filters:
        progress_logger.addFilter(_not_progress_bars_disabled)
    # The console handler Ray Train gives its logger in each worker; its file handlers keep all.
    for handler in logging.getLogger("ray.train").handlers:
        if isinstance(handler, logging.StreamHandler) and _not_per_report not in handler.filters:
            handler.addFilter(_not_per_report)


def _start(loop_config: dict):
    """The loop's config, this worker's rank / world size / device, seeded per rank."""
    from raytumor.config import RunConfig
    from raytumor.runtime import reuse_freed_memory

    reuse_freed_memory()
    _quiet_console()
    config = RunConfig.model_validate(loop_config["config"])
    rank, world, device = _context()
    torch.manual_seed(config.seed * 1000 + rank)
    return config, rank, world, device


def _slowest_worker(seconds: float, device) -> float:
    """The largest of every worker's ``seconds``: one all-reduce, which every rank must reach."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


def _prepare_model(model, device):
    import ray.train.torch

    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    return ray.train.torch.prepare_model(model)


def _restore_training_state(state: dict, model, optimizer, sampler, rank: int) -> None:
    """Model, optimizer and this rank's sampler position from a checkpoint of the loop."""
    _unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    sampler.load_state(state["sampler"][rank] if rank < len(state["sampler"]) else state["sampler"][0])


def train_loop_per_worker(loop_config: dict) -> None:
    """Final training: class-balanced P x K batches, triplet / CE / interval loss, KNN validation."""
    loop_started = time.perf_counter()
    import ray.train

    from raytumor.losses import get_loss
    from raytumor.models import build_model, load_backbone_weights
    from raytumor.train.datasets import load_arrays
    from raytumor.train.sampler import PKBatchSampler
    from raytumor.train.steps import eval_step, to_device, train_step

    config, rank, world, device = _start(loop_config)
    train_cfg = config.train
    volumes, labels = load_arrays(ray.train.get_dataset_shard("train"))
    shard_loaded_s = time.perf_counter() - loop_started
    if rank == 0:
        reference = load_arrays(ray.train.get_dataset_shard("reference"))
        val = load_arrays(ray.train.get_dataset_shard("val"))

    is_triplet = train_cfg.loss in ("batch_hard", "batch_all")
    model = build_model(
        config.model.encoder,
        in_channels=2,
        embedding_dim=config.model.embedding_dim if is_triplet else loop_config["num_classes"],
        normalize=is_triplet,
        width=config.model.width,
    )
    if loop_config.get("pretrained_backbone"):
        state = torch.load(loop_config["pretrained_backbone"], map_location="cpu", weights_only=True)
        load_backbone_weights(model, state)
    model = _prepare_model(model, device)
    if train_cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=train_cfg.lr, momentum=0.9, weight_decay=train_cfg.weight_decay)
    loss_kwargs = {"margin": train_cfg.margin} if train_cfg.loss != "cross_entropy" else {}
    loss_fn = get_loss(train_cfg.loss, **loss_kwargs)
    sampler = PKBatchSampler(labels, train_cfg.batch_size, train_cfg.samples_per_class,
                             seed=config.seed * 1000 + rank, steps=loop_config["steps_per_epoch"])

    start_epoch, best, best_epoch, history, best_model, restarts = 0, -math.inf, 0, [], None, 0
    state = _load_state(ray.train.get_checkpoint(), loop_config.get("resume_from"))
    if state is not None:
        _restore_training_state(state, model, optimizer, sampler, rank)
        start_epoch, best, best_epoch, history = state["epoch"], state["best"], state["best_epoch"], state["history"]
        best_model, restarts = state["best_model"], state["restarts"] + 1

    bar = _progress(rank, train_cfg.epochs, start_epoch, f"train {config.name}")
    telemetry = EpochMetrics(config.name, "train") if rank == 0 else None
    first_batch_s = None
    for epoch in range(start_epoch, train_cfg.epochs):
        _maybe_crash(loop_config, epoch, rank)
        started, waited = time.perf_counter(), 0.0
        total = torch.zeros((), device=device)
        fewest_per_class = len(labels)
        for indices in sampler:
            tick = time.perf_counter()
            batch_labels = labels[indices]
            counts = np.bincount(batch_labels)
            fewest_per_class = min(fewest_per_class, int(counts[counts > 0].min()))
            x = to_device(volumes[indices], device)
            y = torch.from_numpy(batch_labels).to(device)
            waited += time.perf_counter() - tick
            if first_batch_s is None:
                first_batch_s = shard_loaded_s + time.perf_counter() - tick
            total += train_step(model, x, y, loss_fn, optimizer)
        seconds = time.perf_counter() - started
        metrics = {
            "epoch": epoch + 1,
            "loss": float(total.item()) / len(sampler),
            "samples_per_s": len(sampler) * len(indices) * world / seconds,
            "data_wait_fraction": waited / seconds,
            # P x K on this worker's shard: every class in every batch had at least this many rows.
            "min_rows_per_class_in_batch": fewest_per_class,
        }
        if epoch == start_epoch:
            metrics["first_batch_s"] = _slowest_worker(first_batch_s, device)
        if rank == 0:
            scores = eval_step(model, reference, val, device, k=train_cfg.knn_k, rare_classes=loop_config["rare_classes"])
            metrics.update({f"val_{key}": value for key, value in scores.items()})
            if metrics[SELECTION_METRIC] > best:
                best, best_epoch = metrics[SELECTION_METRIC], epoch + 1
                best_model = {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()}
            metrics.update({"best_" + SELECTION_METRIC: best, "best_epoch": best_epoch})
            history.append(metrics)
            telemetry.record(metrics)
            _epoch_done(bar, f"train {config.name} loss {metrics['loss']:.4f} "
                             f"val Recall_M {metrics[SELECTION_METRIC]:.3f} {metrics['samples_per_s']:.0f} samples/s")
        files = {}
        if rank == 0:
            files[CHECKPOINT_FILE] = {
                "model": _unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "sampler": [sampler.state()],
                "epoch": epoch + 1,
                "best": best,
                "best_epoch": best_epoch,
                "history": history,
                "best_model": best_model,
                "restarts": restarts,
                "config": loop_config["config"],
                "pretrained_backbone": loop_config["pretrained_backbone"],
            }
            files[BEST_MODEL_FILE] = {"model": best_model, "config": loop_config["config"], "epoch": best_epoch,
                                      "num_classes": loop_config["num_classes"], SELECTION_METRIC: best}
        _report(metrics, rank, files)
    if bar is not None:
        bar.close()


def pretrain_loop_per_worker(loop_config: dict) -> None:
    """Contrastive pre-training: two augmented views per volume, NT-Xent or triplet loss, SGD."""
    loop_started = time.perf_counter()
    import ray.train

    from raytumor.data.augment import two_view_batch
    from raytumor.losses import get_contrastive_loss
    from raytumor.models import build_contrastive_model
    from raytumor.train.datasets import load_arrays
    from raytumor.train.sampler import ShuffledBatchSampler
    from raytumor.train.steps import pretrain_step, to_device

    config, rank, world, device = _start(loop_config)
    pre = config.pretrain
    volumes, _ = load_arrays(ray.train.get_dataset_shard("train"))
    shard_loaded_s = time.perf_counter() - loop_started

    model = _prepare_model(build_contrastive_model(config.model.encoder, in_channels=2, width=config.model.width,
                                                   projection_dim=pre.projection_dim), device)
    optimizer = torch.optim.SGD(model.parameters(), lr=pre.lr, momentum=pre.momentum)
    loss_kwargs = {"temperature": pre.temperature} if pre.loss == "ntxent" else {"margin": pre.margin}
    loss_fn = get_contrastive_loss(pre.loss, **loss_kwargs)
    sampler = ShuffledBatchSampler(len(volumes), pre.batch_size, seed=config.seed * 1000 + rank,
                                   steps=loop_config["steps_per_epoch"])
    view_rng = np.random.default_rng([config.seed, rank, 7])

    start_epoch, history, restarts = 0, [], 0
    state = _load_state(ray.train.get_checkpoint(), loop_config.get("resume_from"))
    if state is not None:
        _restore_training_state(state, model, optimizer, sampler, rank)
        view_rng.bit_generator.state = state["view_rng"]
        start_epoch, history, restarts = state["epoch"], state["history"], state["restarts"] + 1

    bar = _progress(rank, pre.epochs, start_epoch, f"pretrain {config.name}")
    telemetry = EpochMetrics(config.name, "pretrain") if rank == 0 else None
    first_batch_s = None
    for epoch in range(start_epoch, pre.epochs):
        _maybe_crash(loop_config, epoch, rank)
        started, waited = time.perf_counter(), 0.0
        total = torch.zeros((), device=device)
        for indices in sampler:
            tick = time.perf_counter()
            view1, view2 = two_view_batch(volumes[indices], int(view_rng.integers(2**31)))
            x1, x2 = to_device(view1, device), to_device(view2, device)
            waited += time.perf_counter() - tick
            if first_batch_s is None:
                first_batch_s = shard_loaded_s + time.perf_counter() - tick
            total += pretrain_step(model, x1, x2, loss_fn, optimizer)
        seconds = time.perf_counter() - started
        metrics = {
            "epoch": epoch + 1,
            "pretrain_loss": float(total.item()) / len(sampler),
            "samples_per_s": len(sampler) * len(indices) * world / seconds,
            "data_wait_fraction": waited / seconds,
        }
        if epoch == start_epoch:
            metrics["first_batch_s"] = _slowest_worker(first_batch_s, device)
        history.append(metrics)
        if telemetry is not None:
            telemetry.record(metrics)
        _epoch_done(bar, f"pretrain {config.name} loss {metrics['pretrain_loss']:.4f} "
                         f"{metrics['samples_per_s']:.0f} samples/s")
        files = {}
        if rank == 0:
            backbone = {k: v.detach().cpu() for k, v in _unwrap(model).backbone.state_dict().items()}
            files[CHECKPOINT_FILE] = {
                "model": _unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "sampler": [sampler.state()],
                "view_rng": view_rng.bit_generator.state,
                "epoch": epoch + 1,
                "history": history,
                "restarts": restarts,
                "config": loop_config["config"],
            }
            files[BACKBONE_FILE] = backbone
        _report(metrics, rank, files)
    if bar is not None:
        bar.close()
