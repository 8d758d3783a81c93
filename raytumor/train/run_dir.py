"""A run's directory and inputs, checked before Ray starts. This module imports neither torch
nor Ray (torch only to check a pre-trained backbone), so a bad ``raytumor train`` fails before
their imports and Ray's start (seconds)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from raytumor.config import RunConfig, dump_config
from raytumor.data.manifest import read_manifest
from raytumor.errors import ConfigError, RaytumorError, short_reason
from raytumor.storage import atomic_write_text

PRETRAINED_BACKBONE_FILE = "pretrain_backbone.pt"


def _checked_run_dir(config: RunConfig, resume: bool | str) -> tuple[Path, bool]:
    run_dir = Path(config.output_dir) / config.name
    if resume == "auto":
        resume = run_dir.exists()
    if run_dir.exists() and not resume:
        raise RaytumorError(f"{run_dir}: run exists; use --resume to continue it or --name for a new run")
    if resume and not run_dir.exists():
        raise RaytumorError(f"{run_dir}: no run to resume")
    saved = run_dir / "config.yaml"
    if resume and saved.is_file() and saved.read_text() != dump_config(config):
        raise RaytumorError(f"{saved}: the run was started with a different config; resume with the same one")
    return run_dir, bool(resume)


def check_run(config: RunConfig, *, resume: bool | str) -> None:
    """Fail now, without Ray, on what would stop the run before its first step: the run
    directory against ``resume``, the dataset's manifest, the pre-trained backbone."""
    run_dir, _ = _checked_run_dir(config, resume)
    if resume is True and (run_dir / "summary.json").is_file():
        # Its config cannot change on resume, so there is no epoch left to train; Ray's start
        # and the workers' imports came first, then an error about a missing checkpoint.
        raise RaytumorError(f"{run_dir}: the run has finished (summary.json); nothing to resume. Evaluate it with "
                            f"`raytumor evaluate {run_dir}`, or train again under another --name")
    read_manifest(config.data.dataset)
    if config.train.pretrained:
        check_pretrained_backbone(config)


def prepare_run_dir(config: RunConfig, *, resume: bool | str) -> tuple[Path, bool]:
    """The run directory, and whether an existing run is being resumed."""
    run_dir, resuming = _checked_run_dir(config, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_config(config))
    return run_dir, resuming


def resolve_pretrained(path: str) -> str:
    """A pre-training run directory or a backbone file -> the backbone weights file."""
    candidate = Path(path)
    if candidate.is_dir():
        candidate = candidate / PRETRAINED_BACKBONE_FILE
    if not candidate.is_file():
        raise ConfigError(f"train.pretrained: {path}: no pre-trained backbone found (expected {PRETRAINED_BACKBONE_FILE})")
    return str(candidate.resolve())


def check_pretrained_backbone(config: RunConfig) -> None:
    """Load ``train.pretrained`` as every training worker will, into the config's encoder: a
    damaged file or one of another encoder or width fails here once, not in each worker's retries."""
    import torch

    from raytumor.models import build_model, load_backbone_weights

    path = resolve_pretrained(config.train.pretrained)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file: RuntimeError, UnpicklingError, EOFError, ... by how it is damaged
        raise ConfigError(f"train.pretrained: {path}: not a loadable weights file ({short_reason(exc)})") from None
    if not isinstance(state, Mapping):
        raise ConfigError(f"train.pretrained: {path}: expected a state dict of weights, got a {type(state).__name__}")
    model = build_model(config.model.encoder, in_channels=2, width=config.model.width)
    try:
        load_backbone_weights(model, state)
    except ValueError as exc:
        raise ConfigError(f"train.pretrained: {path}: {exc}; this run has model.encoder {config.model.encoder!r}, "
                          f"model.width {config.model.width}") from None
