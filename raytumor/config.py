"""Typed run configuration, loaded from YAML, validated, saved with every run.

Unknown keys and wrong types are errors naming the key. ``--set a.b=value`` overrides
take YAML values (``--set train.margin=0.5``, ``--set pretrain.enabled=true``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from raytumor.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    dataset: str = "demo/data"
    shape: tuple[int, int, int] = (32, 32, 8)
    augment_rare: bool = False
    augment_n: int = Field(5, ge=1, le=100)

    @field_validator("shape")
    @classmethod
    def _positive(cls, value):
        if min(value) < 1:
            raise ValueError("every axis must be >= 1")
        return value


class ModelConfig(_Strict):
    encoder: str = "paper_cnn"
    width: float = Field(0.25, gt=0, le=8, description="Channel multiplier of the encoder (1.0 = the paper's ~6.9M parameters).")
    embedding_dim: int = Field(6, ge=1, le=4096)

    @field_validator("encoder")
    @classmethod
    def _registered(cls, value):
        from raytumor.models import list_encoders

        if value not in list_encoders():
            raise ValueError(f"unknown encoder {value!r}; registered: {', '.join(list_encoders())}")
        return value


class PretrainConfig(_Strict):
    enabled: bool = False
    loss: Literal["ntxent", "batch_all", "batch_hard"] = "batch_hard"
    epochs: int = Field(20, ge=1, le=10_000)
    batch_size: int = Field(15, ge=2)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    temperature: float = Field(0.5, gt=0)
    margin: float = Field(1.0, ge=0)
    projection_dim: int = Field(64, ge=1)
    use_unlabelled: bool = True


class TrainConfig(_Strict):
    loss: Literal["batch_hard", "batch_all", "cross_entropy", "interval"] = "batch_hard"
    margin: float = Field(1.0, ge=0)
    epochs: int = Field(400, ge=1, le=100_000)
    batch_size: int = Field(30, ge=2)
    samples_per_class: int = Field(3, ge=2, description="K of the P x K class-balanced batches.")
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    knn_k: int = Field(7, ge=1)
    pretrained: Optional[str] = Field(None, description="Pre-training run directory or checkpoint to start from.")


class ResourcesConfig(_Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: Literal["auto", True, False] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(2, ge=0, description="Worker crashes tolerated; each restarts from the last checkpoint.")


class RunConfig(_Strict):
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    train: TrainConfig = TrainConfig()
    resources: ResourcesConfig = ResourcesConfig()


def error_message(error: dict) -> str:
    """A pydantic error's message as a user reads it: no "Value error, " prefix from our validators."""
    if error["type"] == "extra_forbidden":
        return "unknown key"
    return error["msg"].removeprefix("Value error, ")


def _describe(error: dict, source: str) -> str:
    key = ".".join(str(p) for p in error["loc"])
    got = "" if error["type"] == "extra_forbidden" else f" (got {error.get('input')!r})"
    return f"{source}: {key}: {error_message(error)}{got}"


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict:
    tree: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value, e.g. train.margin=0.5")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value, "--set")
    return tree


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_config(tree: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError("; ".join(_describe(e, source) for e in exc.errors())) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML file <- ``--set`` overrides, validated."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        tree = loaded or {}
    if overrides:
        tree = merge(tree, parse_overrides(overrides))
        source += " + --set"
    return build_config(tree, source)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
