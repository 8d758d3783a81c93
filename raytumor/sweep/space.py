"""Search-space files: a validated schema, and the Optuna define-by-run function built from it.

A search space names parameters by their dotted config key (``train.margin``) with a
distribution (``uniform``, ``loguniform``, ``int``, ``choice``) or a fixed value; a
parameter with ``when`` is only suggested when other parameters have the given values
(``pretrain.epochs`` only when ``pretrain.enabled`` is true). ``search: grid`` instead lists
explicit ``configurations``. Everything else of a run comes from ``base`` (a run config
file, relative to the search-space file, or an inline mapping).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from raytumor.config import (DirectoryName, Integer, Real, RunConfig, build_config, describe_error, error_message, merge,
                             read_yaml_file)
from raytumor.errors import ConfigError

Scalar = Union[bool, int, float, str, None]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Strict):
    type: Literal["uniform", "loguniform", "int", "choice"]
    low: Optional[Real] = Field(None, allow_inf_nan=False)
    high: Optional[Real] = Field(None, allow_inf_nan=False)
    step: Optional[Integer] = None
    values: Optional[list[Scalar]] = None
    when: Optional[dict[str, Scalar]] = None

    @model_validator(mode="after")
    def _check(self):
        if self.type == "choice":
            if not self.values:
                raise ValueError("choice needs a non-empty 'values' list")
            if self.low is not None or self.high is not None or self.step is not None:
                raise ValueError("choice takes 'values' only, not low/high/step")
            return self
        if self.values is not None:
            raise ValueError(f"{self.type} takes low/high, not 'values'")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs 'low' and 'high'")
        if not self.low < self.high:
            raise ValueError(f"'low' ({self.low}) must be below 'high' ({self.high})")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError("loguniform needs 'low' > 0")
        if self.type == "int":
            if self.low != int(self.low) or self.high != int(self.high):
                raise ValueError("int needs integer 'low' and 'high'")
            if self.step is not None and self.step < 1:
                raise ValueError("'step' must be >= 1")
        elif self.step is not None:
            raise ValueError("'step' applies to int parameters only")
        return self


_UNION_TAGS = DISTRIBUTION, FIXED = "distribution", "fixed"


def _parameter_kind(value: Any) -> str:
    return DISTRIBUTION if isinstance(value, (dict, Distribution)) else FIXED


# A mapping is a distribution, anything else a fixed value: without the discriminator a bad
# distribution was reported against every member of the union ("Input should be a valid
# boolean; ... a valid integer; ...").
Parameter = Annotated[
    Union[Annotated[Distribution, Tag(DISTRIBUTION)], Annotated[Union[Scalar, list], Tag(FIXED)]],
    Discriminator(_parameter_kind),
]


# What the training loop (raytumor/train/loops.py) reports to Tune every epoch on the validation
# split: ``val_`` + the scores of ``eval_step``, and the best Recall_M so far.
OBJECTIVE_METRICS = ("val_recall_macro", "val_recall_micro", "val_recall_macro_rare", "val_rank5",
                     "best_val_recall_macro")


class Objective(_Strict):
    metric: str = "val_recall_macro"
    mode: Literal["max", "min"] = "max"

    @field_validator("metric")
    @classmethod
    def _reported(cls, value):
        if value not in OBJECTIVE_METRICS:
            raise ValueError(f"unknown metric {value!r}; the training loop reports {', '.join(OBJECTIVE_METRICS)}")
        return value


class Scheduler(_Strict):
    type: Literal["asha", "none"] = "asha"
    grace_period: Integer = Field(2, ge=1, description="Epochs every trial runs before it can be stopped.")
    reduction_factor: Real = Field(3.0, gt=1, allow_inf_nan=False)


class TrialResources(_Strict):
    num_workers: Integer = Field(1, ge=1)
    cpus_per_worker: Real = Field(1.0, gt=0, allow_inf_nan=False)
    gpus_per_worker: Real = Field(0.0, ge=0, allow_inf_nan=False)


class SearchSpace(_Strict):
    name: DirectoryName
    base: Union[str, dict, None] = None
    dataset: Optional[str] = None
    search: Literal["tpe", "random", "grid"] = "tpe"
    num_samples: Integer = Field(8, ge=1)
    max_concurrent_trials: Union[int, Literal["auto"]] = Field(
        "auto", description="Trials at once; 'auto': as many as the cluster holds (raytumor.sweep.run.trials_at_once).")
    seed: Integer = 0
    results_dir: str = "results"
    objective: Objective = Objective()
    scheduler: Scheduler = Scheduler()
    resources: TrialResources = TrialResources()
    final_train_epochs: Optional[Integer] = Field(None, ge=1, description="Epochs of `train --best` (default: the base's).")
    parameters: dict[str, Parameter] = Field(default_factory=dict)
    configurations: Optional[list[dict[str, Any]]] = None

    @field_validator("max_concurrent_trials", mode="before")
    @classmethod
    def _concurrency(cls, value):
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"must be a positive integer or 'auto', got {value!r}")

    @model_validator(mode="after")
    def _grid(self):
        if self.search == "grid":
            if not self.configurations:
                raise ValueError("search: grid needs a non-empty 'configurations' list")
        elif self.configurations:
            raise ValueError("'configurations' applies to search: grid only")
        return self

    def distributions(self) -> dict[str, Distribution]:
        return {k: v for k, v in self.parameters.items() if isinstance(v, Distribution)}

    def fixed(self) -> dict[str, Any]:
        return {k: v for k, v in self.parameters.items() if not isinstance(v, Distribution)}


def nest(flat: dict[str, Any]) -> dict:
    """``{"train.margin": 1}`` -> ``{"train": {"margin": 1}}``."""
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"margin": 1}}`` -> ``{"train.margin": 1}`` (the inverse of :func:`nest`)."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def _example(dist: Distribution) -> Any:
    if dist.type == "choice":
        return dist.values[0]
    if dist.type == "int":
        return int(dist.low)
    return float(dist.low)


def load_search_space(path: str | os.PathLike) -> tuple[SearchSpace, dict]:
    """Parse and validate a search-space file; returns it and the base config tree.

    Every parameter key is checked against the run config by building a config with each
    parameter's example values: an unknown key or a value of the wrong type is an error
    naming the file and the key.
    """
    path = Path(path)
    raw = read_yaml_file(path, "search-space")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        space = SearchSpace.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(p) for p in error["loc"] if str(p) not in _UNION_TAGS)
            problems.append(f"{key + ': ' if key else ''}{error_message(error)}")
        raise ConfigError(f"{path}: " + "; ".join(dict.fromkeys(problems))) from None

    base_tree = _base_tree(space, path)
    if space.dataset:
        base_tree = merge(base_tree, {"data": {"dataset": space.dataset}})
    if "resources" in raw:  # the space's trial resources override its base config's
        given = space.resources.model_dump(include=space.resources.model_fields_set)
        if "gpus_per_worker" in given:
            given["use_gpu"] = given.pop("gpus_per_worker") > 0  # Ray Train: one GPU per worker
        base_tree = merge(base_tree, {"resources": given})
    _check_keys(space, base_tree, path)
    return space, base_tree


def _base_tree(space: SearchSpace, path: Path) -> dict:
    if space.base is None:
        return {}
    if isinstance(space.base, dict):
        return space.base
    base_path = (path.parent / space.base) if not os.path.isabs(space.base) else Path(space.base)
    if not base_path.is_file():
        base_path = Path(space.base)
    try:
        loaded = read_yaml_file(base_path, "config") or {}
    except ConfigError as exc:
        raise ConfigError(f"{path}: base: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: base: {space.base}: expected a mapping")
    return loaded


def _check_keys(space: SearchSpace, base_tree: dict, path: Path) -> None:
    names = set(space.parameters)
    for key, dist in space.distributions().items():
        for condition in (dist.when or {}):
            if condition not in names:
                raise ConfigError(f"{path}: parameters.{key}.when: {condition} is not a parameter of this space")
    candidates = []
    example = {k: (_example(v) if isinstance(v, Distribution) else v) for k, v in space.parameters.items()}
    candidates.append(("parameters", example))
    for dist_key, dist in space.distributions().items():
        if dist.type == "choice":
            for value in dist.values:
                candidates.append((f"parameters.{dist_key}", {**example, dist_key: value}))
    for index, overrides in enumerate(space.configurations or []):
        candidates.append((f"configurations[{index}]", {**space.fixed(), **overrides}))
    base = f"base: {space.base}" if isinstance(space.base, str) else "base"
    for where, flat in candidates:
        try:
            RunConfig.model_validate(merge(base_tree, nest(flat)))
        except ValidationError as exc:
            problems = [describe_error(error, f"{path}: {where if _set_by(flat, error) else base}")
                        for error in exc.errors()]
            raise ConfigError("; ".join(problems)) from None


def _set_by(flat: dict[str, Any], error: dict) -> bool:
    """Whether the config key of a validation ``error`` is one of the dotted keys of ``flat``
    (or above or below one); if not, the error is the base config's."""
    key = ".".join(str(p) for p in error["loc"])
    return any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in flat)


def suggest(trial, distributions: dict[str, dict], fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Optuna define-by-run: suggest every active parameter; ``when`` conditions may name
    sampled or fixed parameters. Returns the sampled values only.

    Module-level (and used through ``functools.partial``) so ``Tuner.restore`` can find it.
    """
    fixed = dict(fixed or {})
    chosen: dict[str, Any] = dict(fixed)
    pending = dict(distributions)
    while pending:
        progressed = False
        for key, spec in list(pending.items()):
            when = spec.get("when") or {}
            if any(cond not in chosen and cond in pending for cond in when):
                continue
            del pending[key]
            progressed = True
            if any(chosen.get(cond) != value for cond, value in when.items()):
                continue
            kind = spec["type"]
            if kind == "choice":
                chosen[key] = trial.suggest_categorical(key, spec["values"])
            elif kind == "int":
                chosen[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), step=spec.get("step") or 1)
            else:
                chosen[key] = trial.suggest_float(key, spec["low"], spec["high"], log=kind == "loguniform")
        if not progressed:
            raise ConfigError(f"circular 'when' conditions among {', '.join(pending)}")
    return {key: value for key, value in chosen.items() if key not in fixed}


def trial_config(base_tree: dict, space: SearchSpace, sampled: dict[str, Any]) -> RunConfig:
    """The run config of one trial: base <- fixed parameters <- sampled values."""
    return build_config(merge(base_tree, nest({**space.fixed(), **sampled})), source=f"search space {space.name}")
