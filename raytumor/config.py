"""Typed run configuration, loaded from YAML, validated, saved with every run.

Unknown keys, wrong types (a boolean is not a number), numbers that are not finite and keys
given twice are errors naming the key. ``--set a.b=value`` overrides take YAML values
(``--set train.margin=0.5``, ``--set pretrain.enabled=true``).
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from raytumor.errors import ConfigError


def _not_a_boolean(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


# Pydantic takes true as 1 for numbers; a YAML boolean in a numeric field is a mistake.
Integer = Annotated[int, BeforeValidator(_not_a_boolean)]
Real = Annotated[float, BeforeValidator(_not_a_boolean)]


def check_directory_name(value: str) -> str:
    if value in ("", ".", "..") or any(c in value for c in "/\\\0"):
        raise ValueError("must be one directory name: not empty, '.' or '..', no '/' or '\\'")
    return value


# A run's or an experiment's name: one directory inside its output directory, never outside it.
DirectoryName = Annotated[str, AfterValidator(check_directory_name)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Strict):
    dataset: str = "demo/data"
    shape: tuple[Integer, Integer, Integer] = (32, 32, 8)
    augment_rare: bool = False
    augment_n: Integer = Field(5, ge=1, le=100)

    @field_validator("shape")
    @classmethod
    def _positive(cls, value):
        if min(value) < 1:
            raise ValueError("every axis must be >= 1")
        return value


class ModelConfig(_Strict):
    encoder: str = "paper_cnn"
    width: Real = Field(0.25, gt=0, le=8, description="Channel multiplier of the encoder (1.0 = the paper's ~6.9M parameters).")
    embedding_dim: Integer = Field(6, ge=1, le=4096)

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
    epochs: Integer = Field(20, ge=1, le=10_000)
    batch_size: Integer = Field(15, ge=2)
    lr: Real = Field(0.05, gt=0)
    momentum: Real = Field(0.9, ge=0, lt=1)
    temperature: Real = Field(0.5, gt=0)
    margin: Real = Field(1.0, ge=0)
    projection_dim: Integer = Field(64, ge=1)
    use_unlabelled: bool = True


class TrainConfig(_Strict):
    loss: Literal["batch_hard", "batch_all", "cross_entropy", "interval"] = "batch_hard"
    margin: Real = Field(1.0, ge=0)
    epochs: Integer = Field(400, ge=1, le=100_000)
    batch_size: Integer = Field(30, ge=2)
    samples_per_class: Integer = Field(3, ge=2, validate_default=True, description="K of the P x K class-balanced batches.")
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: Real = Field(1e-3, gt=0)
    weight_decay: Real = Field(0.0, ge=0)
    knn_k: Integer = Field(7, ge=1)
    pretrained: Optional[str] = Field(None, description="Pre-training run directory or checkpoint to start from.")

    @field_validator("samples_per_class")
    @classmethod
    def _two_classes_per_batch(cls, value, info):
        # The sampler draws at least 2 classes (every anchor needs a negative); with fewer rows
        # than 2 x K its batches came out larger than batch_size, unannounced.
        batch_size = info.data.get("batch_size")
        if batch_size is not None and 2 * value > batch_size:
            raise ValueError(f"must be at most half of train.batch_size ({batch_size}): a batch holds K rows "
                             "of each of at least 2 classes")
        return value


class ResourcesConfig(_Strict):
    num_workers: Integer = Field(1, ge=1)
    use_gpu: Literal["auto", True, False] = "auto"
    cpus_per_worker: Real = Field(1.0, gt=0)
    max_failures: Integer = Field(2, ge=0, description="Worker crashes tolerated; each restarts from the last checkpoint.")


class RunConfig(_Strict):
    name: DirectoryName = "run"
    seed: Integer = 0
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


def describe_error(error: dict, source: str) -> str:
    """One pydantic error as ``source: key: message (got value)``; an error of a whole model has no key."""
    key = ".".join(str(p) for p in error["loc"])
    got = "" if error["type"] == "extra_forbidden" else f" (got {error.get('input')!r})"
    return f"{source}: {key + ': ' if key else ''}{error_message(error)}{got}"


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int):
        super().__init__(f"duplicate key {key!r} (line {line})")


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (``SafeLoader`` keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *defaults`` keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable):
                if key in seen:
                    raise DuplicateKeyError(key, key_node.start_mark.line + 1)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml_file(path: str | os.PathLike, kind: str) -> Any:
    """The YAML document in ``path`` (a ``kind`` file); a missing, non-UTF-8 or malformed file, or a
    key given twice, is a one-line ConfigError naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: {kind} file does not exist") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None


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
        key, equals, raw = item.partition("=")
        key = key.strip()
        if not equals or "" in key.split("."):
            raise ConfigError(f"--set {item}: expected key=value with a config key, e.g. train.margin=0.5")
        try:
            value = yaml.load(raw, Loader=UniqueKeyLoader)
        except DuplicateKeyError as exc:
            raise ConfigError(f"--set {item}: {exc}") from None
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value, "--set")
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
        raise ConfigError("; ".join(describe_error(e, source) for e in exc.errors())) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML file <- ``--set`` overrides, validated."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        loaded = read_yaml_file(path, "config")
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        tree = loaded or {}
    if overrides:
        tree = merge(tree, parse_overrides(overrides))
        source += " + --set"
    return build_config(tree, source)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
