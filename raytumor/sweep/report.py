"""The sweep report: the objective against every swept parameter, per loss variant.

``raytumor sweep-report EXPERIMENT`` (also written at the end of each sweep) reads an
experiment directory and writes, next to it (or into ``--out``)::

    report.html     self-contained: plots embedded as base64 PNG, no external links or scripts
    report.md       the same text, linking report_plots/*.png
    report_plots/   one PNG per swept parameter, per-configuration comparison, importances

Per swept parameter the objective (and Recall_mu, Recall_M, Recall_M* where recorded) is
plotted against the parameter, one series per training loss (``train.loss``), or per
contrastive loss (``pretrain.loss``) for pre-training parameters. That is how the paper's
figures come out of the search spaces: Figs. 2-3 (Recall_M, Recall_M* against pre-train
epochs per contrastive loss) from ``pretrain_epochs.yaml``, Fig. A.1 (Recall_M against the
embedding dimension) from ``embedding_dim.yaml`` and Fig. A.2 (Recall_mu, Recall_M against
the margin, batch-hard vs batch-all) from ``margin.yaml``. Grid sweeps are compared per
configuration under the paper's Table-2 names. Parameter importances come from Optuna's
PED-ANOVA evaluator on a study rebuilt from the trials.

Every number is a validation-split number: the test split is never read by a sweep.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from raytumor.config import read_yaml_file
from raytumor.errors import RaytumorError
from raytumor.reporting import PRETRAIN_NAMES, TRAIN_NAMES, ReportDoc, new_figure, png_bytes, table2_row_name
from raytumor.storage import atomic_path, atomic_write_text
from raytumor.sweep.run import LEADERBOARD_FILE
from raytumor.sweep.space import Distribution, Objective, SearchSpace, flatten

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
PLOTS_DIR = "report_plots"
LEADERBOARD_ROWS = 20
METRICS = ("val_recall_micro", "val_recall_macro", "val_recall_macro_rare", "val_rank5")
METRIC_LABELS = {"val_recall_micro": "Recall_μ", "val_recall_macro": "Recall_M",
                 "val_recall_macro_rare": "Recall_M*", "val_rank5": "Rank-5"}
PANEL_METRICS = ("val_recall_micro", "val_recall_macro", "val_recall_macro_rare")
NAME_KEYS = ("pretrain.enabled", "pretrain.loss", "data.augment_rare", "train.loss")
# Per trial, besides the swept parameters: what names its loss variant.
VARIANT_KEYS = ("train.loss", "pretrain.enabled", "pretrain.loss", "data.augment_rare", "train.pretrained")


# ---------------------------------------------------------------- reading an experiment


@dataclass(frozen=True)
class SweepSpace:
    """What the report needs of ``space.yaml``: objective, swept parameters, fixed values."""

    name: str
    metric: str
    mode: str
    search: str
    distributions: dict[str, Distribution]  # the swept parameters of a tpe/random sweep
    grid_keys: tuple[str, ...] = ()  # keys set by the configurations of a grid sweep
    fixed: dict[str, Any] = field(default_factory=dict)

    @property
    def swept(self) -> list[str]:
        return list(self.distributions) if self.distributions else list(self.grid_keys)


# What `raytumor train` and `pretrain` write into a run directory (train/loops.py, train/run_dir.py).
TRAINING_RUN_FILES = ("best_model.pt", "config.yaml")


def _check_out_dir(out_dir: Path) -> None:
    """A report must not land among a training run's files, where it would pass for the run's own report."""
    found = [name for name in TRAINING_RUN_FILES if (out_dir / name).exists()]
    if found:
        raise RaytumorError(f"{out_dir}: holds a training run ({', '.join(found)}); "
                            "give --out a directory of its own for the sweep report")


def _check_experiment(experiment_dir: Path) -> None:
    if not experiment_dir.is_dir():
        raise RaytumorError(f"{experiment_dir}: experiment directory does not exist")
    if not (experiment_dir / LEADERBOARD_FILE).is_file():
        raise RaytumorError(f"{experiment_dir}: no {LEADERBOARD_FILE}; the sweep has not finished "
                            "(`raytumor sweep SPACE.yaml --resume` completes it)")


def read_space(experiment_dir: str | os.PathLike) -> SweepSpace:
    """The experiment's ``space.yaml`` (parsed, not re-validated against a base config, whose
    relative path pointed next to the original file); without one, the objective comes from
    ``best.json`` and the swept parameters from the leaderboard's ``param:`` columns."""
    experiment_dir = Path(experiment_dir)
    path = experiment_dir / "space.yaml"
    if path.is_file():
        try:
            space = SearchSpace.model_validate(read_yaml_file(path, "search space"))
        except ValueError as exc:
            raise RaytumorError(f"{path}: not a valid search space ({str(exc).splitlines()[0]})") from None
        grid_keys: list[str] = []
        for configuration in space.configurations or []:
            grid_keys += [k for k in configuration if k not in grid_keys]
        return SweepSpace(space.name, space.objective.metric, space.objective.mode, space.search,
                          space.distributions(), tuple(grid_keys), space.fixed())
    objective = Objective()
    if (experiment_dir / "best.json").is_file():
        with _suppress_bad_file():
            objective = Objective.model_validate(json.loads((experiment_dir / "best.json").read_text())["objective"])
    board = _read_leaderboard(experiment_dir)
    keys = tuple(c[len("param:"):] for c in board.columns if c.startswith("param:"))
    return SweepSpace(experiment_dir.name, objective.metric, objective.mode, "unknown", {}, keys, {})


def _suppress_bad_file():
    """A damaged per-trial file costs that trial's detail, not the report."""
    return contextlib.suppress(ValueError, KeyError, TypeError, OSError, RaytumorError)


def _read_leaderboard(experiment_dir: Path) -> pd.DataFrame:
    path = experiment_dir / LEADERBOARD_FILE
    try:
        board = pd.read_csv(path, dtype={"trial_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise RaytumorError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    if "trial_id" not in board.columns:
        raise RaytumorError(f"{path}: no trial_id column")
    return board


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _coerce(value: Any, dist: Distribution | None) -> Any:
    """A value read back from CSV (``"False"``, ``2.0``) as the type the space gives it."""
    if _missing(value):
        return None
    if hasattr(value, "item"):  # numpy scalar
        value = value.item()
    if dist is None:
        if isinstance(value, str) and value in ("True", "False"):
            return value == "True"
        return value
    if dist.type == "choice":
        for choice in dist.values:
            if choice == value and type(choice) is type(value):
                return choice
        for choice in dist.values:
            if str(choice) == str(value) or (not isinstance(choice, (bool, str)) and _as_float(value) == choice):
                return choice
        return value
    if dist.type == "int":
        number = _as_float(value)
        return None if number is None else int(round(number))
    return _as_float(value)


def _as_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _active(dist: Distribution | None, values: dict[str, Any]) -> bool:
    """Whether a parameter was suggested in a trial: its ``when`` conditions hold."""
    if dist is None or not dist.when:
        return True
    return all(values.get(key) == wanted for key, wanted in dist.when.items())


def _history(experiment_dir: Path, trial_id: str) -> pd.DataFrame | None:
    """A trial's per-epoch metrics: ``metrics.csv``, else Tune's ``result.json`` lines."""
    metrics_csv = experiment_dir / "trials" / trial_id / "metrics.csv"
    if metrics_csv.is_file():
        with _suppress_bad_file():
            frame = pd.read_csv(metrics_csv)
            if not frame.empty:
                return frame
    result_json = experiment_dir / "tune" / trial_id / "result.json"
    if result_json.is_file():
        rows = []
        for line in result_json.read_text().splitlines():
            with _suppress_bad_file():
                row = json.loads(line)
                rows.append({k: v for k, v in row.items() if not isinstance(v, (dict, list))})
        if rows:
            return pd.DataFrame(rows)
    return None


def _best_of_history(history: pd.DataFrame | None, metric: str, mode: str) -> dict[str, float]:
    if history is None or metric not in history.columns:
        return {}
    values = pd.to_numeric(history[metric], errors="coerce")
    if not values.notna().any():
        return {}
    best = history.loc[values.idxmax() if mode == "max" else values.idxmin()]
    out = {"objective": float(values.loc[best.name])}
    if "epoch" in history.columns:
        out["best_epoch"] = float(best["epoch"])
        out["epochs_run"] = float(pd.to_numeric(history["epoch"], errors="coerce").max())
    else:
        out["best_epoch"], out["epochs_run"] = float(best.name) + 1, float(len(history))
    for key in METRICS:
        if key in history.columns:
            out[key] = _as_float(best[key])
    return out


def paper_name(values: dict[str, Any]) -> str:
    """The paper's Table-2 row name ``ContrastivePretrain-Augment-Loss`` of a trial's config."""
    return table2_row_name(pretrain_enabled=bool(values.get("pretrain.enabled")),
                           pretrain_loss=values.get("pretrain.loss"),
                           augment_rare=bool(values.get("data.augment_rare")),
                           train_loss=values.get("train.loss"),
                           pretrained=bool(values.get("train.pretrained")))


def load_trials(experiment_dir: str | os.PathLike, space: SweepSpace | None = None) -> pd.DataFrame:
    """One row per trial of a finished sweep, best objective first (errored trials last).

    Columns: ``trial_id``; ``param:<key>`` per swept parameter (from the trial's
    ``config.yaml``; None where a conditional parameter was inactive, known from its
    ``when``); the loss-variant keys ``train.loss``, ``pretrain.enabled``, ``pretrain.loss``
    (None without pre-training), ``data.augment_rare``, ``train.pretrained``; ``name`` (the
    paper's ContrastivePretrain-Augment-Loss); ``objective``, ``best_epoch``, ``epochs_run``
    and the four validation metrics at the best epoch (from ``leaderboard.csv``, recomputed
    from ``metrics.csv`` or Tune's ``result.json`` where missing); ``status``.
    """
    experiment_dir = Path(experiment_dir)
    _check_experiment(experiment_dir)
    space = space or read_space(experiment_dir)
    board = _read_leaderboard(experiment_dir)
    rows = []
    for record in board.to_dict("records"):
        trial_id = str(record["trial_id"])
        config_file = experiment_dir / "trials" / trial_id / "config.yaml"
        config: dict[str, Any] = {}
        if config_file.is_file():
            with _suppress_bad_file():
                config = flatten(read_yaml_file(config_file, "trial config") or {})
        values = {**space.fixed, **config}
        for key in space.swept:  # no config: the sampled values the leaderboard recorded
            if key not in config and f"param:{key}" in record:
                values[key] = _coerce(record[f"param:{key}"], space.distributions.get(key))
        row: dict[str, Any] = {"trial_id": trial_id}
        for key in space.swept:
            dist = space.distributions.get(key)
            if space.distributions:
                active = _active(dist, values)
            else:  # grid: a key is set where its configuration names it (the leaderboard says which)
                column = f"param:{key}"
                active = column not in record or not _missing(record[column]) or not config
            row[f"param:{key}"] = _coerce(values.get(key), dist) if active else None
        for key in VARIANT_KEYS:
            row[key] = _coerce(values.get(key), None)
        if not row["pretrain.enabled"]:
            row["pretrain.loss"] = None
        row["name"] = paper_name(values)
        measured = {k: _as_float(record.get(k)) for k in ("objective", "best_epoch", "epochs_run", *METRICS)}
        if _missing(measured["objective"]) or _missing(measured["best_epoch"]) or any(k not in record for k in METRICS):
            recomputed = _best_of_history(_history(experiment_dir, trial_id), space.metric, space.mode)
            for key, value in recomputed.items():
                if _missing(measured.get(key)):
                    measured[key] = value
        row.update({k: (math.nan if v is None else v) for k, v in measured.items()})
        status = record.get("status")
        row["status"] = "unknown" if _missing(status) else str(status)
        rows.append(row)
    columns = ["trial_id", *(f"param:{k}" for k in space.swept), *VARIANT_KEYS, "name",
               "objective", "best_epoch", "epochs_run", *METRICS, "status"]
    frame = pd.DataFrame(rows, columns=columns)
    for key in ("objective", "best_epoch", "epochs_run", *METRICS):
        frame[key] = pd.to_numeric(frame[key], errors="coerce")
    frame = frame.sort_values("objective", ascending=space.mode == "min", na_position="last", kind="mergesort")
    return frame.reset_index(drop=True)


def best_trial(trials: pd.DataFrame) -> pd.Series | None:
    """The first trial with an objective (``trials`` comes sorted by :func:`load_trials`)."""
    finished = trials[trials["objective"].notna()]
    return None if finished.empty else finished.iloc[0]


# ---------------------------------------------------------------- plot data


@dataclass(frozen=True)
class ParamPlot:
    """What one figure shows: the objective (and the recall metrics) against one parameter.

    ``kind`` is ``numeric`` (scatter, a line through the per-value means of discrete
    parameters), ``categorical`` (points and means per value) or ``configuration`` (one row
    per paper-named configuration). ``series`` maps a legend label (a loss variant, e.g.
    ``BHTriplet``) to its trials with columns ``x``, ``trial_id`` and the panel metrics.
    """

    param: str
    kind: str
    panels: tuple[tuple[str, str], ...]  # (column, axis label), the objective first
    series_key: str | None
    series: dict[str, pd.DataFrame]
    categories: tuple[Any, ...] = ()
    log_x: float | None = None  # the log base of the x axis, None for linear
    discrete: bool = False
    hidden: int = 0  # trials not shown: parameter inactive, or no objective
    best_trial_id: str | None = None


def _label(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "none" if value is None else str(value)


def _panels(trials: pd.DataFrame, metric: str) -> tuple[tuple[str, str], ...]:
    objective_label = f"{METRIC_LABELS.get(metric, metric)} (objective)"
    panels = [("objective", objective_label)]
    for key in PANEL_METRICS:
        if key != metric and key in trials.columns and trials[key].notna().any():
            panels.append((key, METRIC_LABELS[key]))
    return tuple(panels)


def series_key_for(param: str) -> str:
    """Series per contrastive loss for pre-training parameters, else per training loss."""
    return "pretrain.loss" if param.startswith("pretrain.") else "train.loss"


def _series_label(key: str, value: Any) -> str:
    if key == "pretrain.loss":
        return "None" if value is None else PRETRAIN_NAMES.get(value, str(value))
    return TRAIN_NAMES.get(value, _label(value))


def _numeric(values: Sequence[Any]) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)


def param_plot(trials: pd.DataFrame, space: SweepSpace, param: str) -> ParamPlot:
    """The data of the figure for one swept parameter (see :class:`ParamPlot`)."""
    column = f"param:{param}"
    dist = space.distributions.get(param)
    panels = _panels(trials, space.metric)
    shown = trials[trials[column].map(lambda v: not _missing(v)) & trials["objective"].notna()]
    observed = list(shown[column])
    if dist is not None and dist.type in ("uniform", "loguniform", "int"):
        kind = "numeric"
    elif dist is not None:
        kind = "numeric" if _numeric(dist.values) else "categorical"
    else:
        kind = "numeric" if _numeric(observed) else "categorical"
    categories: tuple[Any, ...] = ()
    if kind == "categorical":
        order = list(dist.values) if dist is not None else []
        order += [v for v in dict.fromkeys(observed) if v not in order]
        categories = tuple(order)
    log_x = None
    discrete = dist is None or dist.type in ("int", "choice")
    if kind == "numeric":
        if dist is not None and dist.type == "loguniform":
            log_x = 10.0
        else:
            candidates = [float(v) for v in (dist.values if dist is not None and dist.type == "choice" else observed)]
            if candidates and min(candidates) > 0 and max(candidates) / min(candidates) >= 8 and discrete:
                log_x = 2.0
    series_key = series_key_for(param)
    if series_key == param:
        series_key = None
    series: dict[str, pd.DataFrame] = {}
    frame = shown.assign(x=shown[column])
    keep = ["x", "trial_id", *(p for p, _ in panels)]
    if series_key is None:
        if not frame.empty:
            series["all trials"] = frame[keep].reset_index(drop=True)
    else:
        labels = frame[series_key].map(lambda v: _series_label(series_key, None if _missing(v) else v))
        for label in sorted(set(labels)):
            series[label] = frame.loc[labels == label, keep].reset_index(drop=True)
    best = best_trial(trials)
    return ParamPlot(param, kind, panels, series_key, series, categories, log_x, discrete,
                     hidden=len(trials) - len(shown),
                     best_trial_id=None if best is None else str(best["trial_id"]))


def configuration_plot(trials: pd.DataFrame, space: SweepSpace) -> ParamPlot:
    """The objective per configuration, named as in the paper's Table 2 (plus any other
    configuration key that varies, e.g. ``BHTriplet-None-BHTriplet (train.margin=0.5)``)."""
    labels = configuration_labels(trials, space)
    frame = trials.assign(x=labels)
    shown = frame[frame["objective"].notna()]
    ascending = space.mode == "min"
    order = shown.groupby("x", sort=False)["objective"].mean().sort_values(ascending=ascending).index.tolist()
    panels = _panels(trials, space.metric)
    keep = ["x", "trial_id", *(p for p, _ in panels)]
    series = {"all trials": shown[keep].reset_index(drop=True)} if not shown.empty else {}
    best = best_trial(trials)
    return ParamPlot("configuration", "configuration", panels, None, series, tuple(order),
                     hidden=len(trials) - len(shown), best_trial_id=None if best is None else str(best["trial_id"]))


def configuration_labels(trials: pd.DataFrame, space: SweepSpace) -> list[str]:
    """Per trial: its paper name, plus (for a grid) the other configuration keys that vary."""
    extra = [] if space.distributions else [k for k in space.swept if k not in NAME_KEYS
                                            and trials[f"param:{k}"].map(_label).nunique() > 1]
    labels = []
    for row in trials.to_dict("records"):
        parts = [f"{k}={_label(row[f'param:{k}'])}" for k in extra]
        labels.append(row["name"] + (f" ({', '.join(parts)})" if parts else ""))
    return labels


# ---------------------------------------------------------------- importances


@dataclass(frozen=True)
class Importances:
    """Parameter importances (normalised to sum 1, largest first) or why there are none."""

    values: dict[str, float]
    note: str
    n_trials: int = 0


def _optuna_distribution(dist: Distribution | None, observed: Sequence[Any]):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if dist is None:  # a grid key: the values its configurations take
        choices = list(dict.fromkeys(v for v in observed if not _missing(v)))
        return CategoricalDistribution(choices) if choices else None
    if dist.type == "choice":
        return CategoricalDistribution(list(dist.values))
    if dist.type == "int":
        return IntDistribution(int(dist.low), int(dist.high), step=dist.step or 1)
    return FloatDistribution(float(dist.low), float(dist.high), log=dist.type == "loguniform")


def param_importances(trials: pd.DataFrame, space: SweepSpace) -> Importances:
    """Optuna's PED-ANOVA importances on a study rebuilt from the trials.

    PED-ANOVA (Optuna's default evaluator) copes with conditional parameters: each is
    assessed where it was active. Skipped, with the reason as ``note``, for fewer than 3
    trials with an objective, a single swept parameter, or objectives that are all equal.
    """
    swept = space.swept
    finished = trials[trials["objective"].map(math.isfinite)]
    if len(swept) < 2:
        return Importances({}, "Parameter importances skipped: a single swept parameter"
                           + (f" ({swept[0]}); see its plot." if swept else "."), len(finished))
    if len(finished) < 3:
        return Importances({}, f"Parameter importances skipped: {len(finished)} trial(s) with an objective; "
                           "at least 3 are needed.", len(finished))
    if finished["objective"].nunique() < 2:
        return Importances({}, "Parameter importances skipped: every trial has the same objective.", len(finished))

    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator

    distributions = {key: _optuna_distribution(space.distributions.get(key), list(trials[f"param:{key}"]))
                     for key in swept}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study = optuna.create_study(direction="maximize" if space.mode == "max" else "minimize")
            added = 0
            for row in finished.to_dict("records"):
                params = {k: _coerce(row[f"param:{k}"], space.distributions.get(k)) for k in swept
                          if distributions[k] is not None and not _missing(row[f"param:{k}"])}
                try:
                    trial = optuna.trial.create_trial(params=params, value=float(row["objective"]),
                                                      distributions={k: distributions[k] for k in params})
                except ValueError:  # a value outside the space (the space was edited): leave it out
                    continue
                study.add_trial(trial)
                added += 1
            if added < 3:
                return Importances({}, f"Parameter importances skipped: {added} trial(s) fit the search space; "
                                   "at least 3 are needed.", added)
            # PED-ANOVA compares the top trials with all of them: at least two in the top.
            quantile = min(0.5, max(0.1, 2 / added))
            evaluator = PedAnovaImportanceEvaluator(target_quantile=quantile)
            raw = optuna.importance.get_param_importances(study, evaluator=evaluator, normalize=False)
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        return Importances({}, f"Parameter importances skipped: Optuna could not assess them ({exc}).", len(finished))
    finally:
        optuna.logging.set_verbosity(verbosity)
    total = sum(v for v in raw.values() if math.isfinite(v))
    if total <= 0:
        return Importances({}, "Parameter importances skipped: no parameter separates the top trials from the rest.",
                           added)
    values = {k: (v / total if math.isfinite(v) else 0.0) for k, v in raw.items()}
    values = dict(sorted(values.items(), key=lambda kv: -kv[1]))
    conditional = [k for k in swept if k in space.distributions and space.distributions[k].when]
    note = (f"PED-ANOVA (Optuna) over {added} trials: how much each parameter matters for reaching the top "
            f"{quantile:.0%} of trials by {space.metric}.")
    if conditional:
        note += f" Conditional parameters ({', '.join(conditional)}) are assessed where active."
    return Importances(values, note, added)


# ---------------------------------------------------------------- figures


def _colours(n: int) -> list:
    import matplotlib

    palette = list(matplotlib.colormaps["tab10"].colors)
    return [palette[i % len(palette)] for i in range(n)]


def plot_param(plot: ParamPlot) -> bytes | None:
    """The PNG of a :class:`ParamPlot`: one panel per metric, one colour per series."""
    if not plot.series:
        return None
    n = len(plot.panels)
    if plot.kind == "configuration":
        height = max(2.5, 0.35 * len(plot.categories) + 1.2)
        fig = new_figure(3.8 * n + 2.5, height)
    else:
        fig = new_figure(4.2 * n, 3.4)
    axes = fig.subplots(1, n, squeeze=False)[0]
    colours = dict(zip(plot.series, _colours(len(plot.series))))
    position = {c: i for i, c in enumerate(plot.categories)}
    width = 0.6 / max(1, len(plot.series))
    for ax, (column, label) in zip(axes, plot.panels):
        for s, (name, rows) in enumerate(plot.series.items()):
            rows = rows[rows[column].notna()]
            if rows.empty:
                continue
            colour = colours[name]
            if plot.kind == "numeric":
                x = rows["x"].astype(float)
                ax.scatter(x, rows[column], color=colour, label=name, s=28, alpha=0.8)
                if plot.discrete:
                    means = rows.assign(x=x).groupby("x")[column].mean().sort_index()
                    ax.plot(means.index, means.values, color=colour, alpha=0.7)
                best = rows[rows["trial_id"] == plot.best_trial_id]
                if not best.empty:
                    ax.scatter(best["x"].astype(float), best[column], marker="*", s=160, color=colour,
                               edgecolors="black", zorder=3)
            elif plot.kind == "categorical":
                offset = (s - (len(plot.series) - 1) / 2) * width
                x = rows["x"].map(position).astype(float) + offset
                ax.scatter(x, rows[column], color=colour, label=name, s=28, alpha=0.8)
                means = rows.assign(pos=x).groupby("pos")[column].mean()
                ax.hlines(means.values, means.index - width / 2.2, means.index + width / 2.2, color=colour, lw=2)
            else:  # configuration: one row per configuration, best at the top
                y = rows["x"].map(position).astype(float)
                means = rows.assign(y=y).groupby("y")[column].mean()
                ax.barh(means.index, means.values, color=colour, alpha=0.35, height=0.7)
                ax.scatter(rows[column], y, color=colour, s=20, zorder=3)
        if plot.kind == "numeric":
            if plot.log_x:
                ax.set_xscale("log", base=plot.log_x)
            ax.set_xlabel(plot.param)
        elif plot.kind == "categorical":
            ax.set_xticks(range(len(plot.categories)), [_label(c) for c in plot.categories])
            ax.set_xlabel(plot.param)
        else:
            ax.set_yticks(range(len(plot.categories)))
            if ax is axes[0]:
                ax.set_yticklabels([str(c) for c in plot.categories])
            else:
                ax.tick_params(labelleft=False)
            ax.invert_yaxis()
        if plot.kind == "configuration":
            ax.set_xlabel(label)
        else:
            ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if plot.series_key is not None:
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            axes[-1].legend(handles, labels, title=plot.series_key, fontsize=8, title_fontsize=8, loc="best")
    fig.suptitle(f"{plot.panels[0][1]} against {plot.param} (validation split)", fontsize=10)
    fig.tight_layout()
    return png_bytes(fig)


def plot_importances(importances: Importances) -> bytes | None:
    if not importances.values:
        return None
    names = list(importances.values)[::-1]
    values = [importances.values[k] for k in names]
    fig = new_figure(6.0, max(1.8, 0.45 * len(names) + 1.0))
    ax = fig.subplots()
    ax.barh(range(len(names)), values, color=_colours(1)[0])
    ax.set_yticks(range(len(names)), names)
    for i, value in enumerate(values):
        ax.text(value, i, f" {value:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, max(values) * 1.2)
    ax.set_xlabel("importance (PED-ANOVA, normalised)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return png_bytes(fig)


# ---------------------------------------------------------------- the document


def _cell(value: Any, whole: bool = False) -> str:
    """A metric cell: 4 decimals (``whole``: an epoch count), ``-`` when missing."""
    if _missing(value):
        return "-"
    value = float(value)
    return str(int(value)) if whole and value.is_integer() else f"{value:.4f}"


def _param_cell(value: Any) -> str:
    return "-" if _missing(value) else _label(value.item() if hasattr(value, "item") else value)


def headline(trials: pd.DataFrame, space: SweepSpace) -> str:
    """``Best trial <id>: <metric> = <value .4f> (validation split)``, or why there is none."""
    best = best_trial(trials)
    if best is None:
        return f"No trial reported {space.metric}: see the trial logs under tune/."
    return f"Best trial {best['trial_id']}: {space.metric} = {best['objective']:.4f} (validation split)"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _plot_section(doc: ReportDoc, plot: ParamPlot, png_name: str, title: str) -> None:
    doc.heading(3, title, anchor=f"plot-{_slug(plot.param)}")
    if not plot.series:
        doc.para(f"No trial with {plot.param} set reported an objective: nothing to plot.", note=True)
        return
    doc.image(png_name, plot_param(plot), f"Objective against {plot.param}")
    listing = ", ".join(f"{name} ({len(rows)} trials)" for name, rows in plot.series.items())
    facts = [f"Series ({plot.series_key}): {listing}" if plot.series_key else f"Trials: {listing}"]
    if plot.kind == "numeric" and plot.log_x:
        facts.append(f"x axis: log{'10' if plot.log_x == 10 else '2'} scale")
    if plot.hidden:
        facts.append(f"{plot.hidden} trial(s) not shown (parameter inactive, or no objective)")
    doc.bullets(facts)


def build_report(trials: pd.DataFrame, space: SweepSpace, experiment_name: str) -> ReportDoc:
    """The report's text and figures (nothing written)."""
    doc = ReportDoc(PLOTS_DIR)
    doc.heading(1, f"Sweep report: {experiment_name}")
    errored = int((trials["status"] == "error").sum())
    stopped = int((trials["status"] == "stopped").sum())
    no_objective = int(trials["objective"].isna().sum())
    doc.para(headline(trials, space))
    facts = [f"Objective: {space.metric} ({space.mode}imise), {METRIC_LABELS.get(space.metric, space.metric)}",
             f"Search: {space.search}; {len(trials)} trial(s), {len(trials) - no_objective} with an objective"
             + (f", {stopped} stopped early by the scheduler" if stopped else "")
             + (f", {errored} errored" if errored else ""),
             "Swept: " + (", ".join(space.swept) if space.swept else "nothing (fixed parameters only)")]
    best = best_trial(trials)
    if best is not None:
        params = ", ".join(f"{k} = {_param_cell(best[f'param:{k}'])}" for k in space.swept) or "-"
        facts.append(f"Best trial parameters: {params}; configuration {best['name']}")
        metrics = ", ".join(f"{METRIC_LABELS[k]} = {_cell(best[k])}" for k in METRICS)
        facts.append(f"Best trial metrics at epoch {_cell(best['best_epoch'], whole=True)}: {metrics}")
    doc.bullets(facts)
    doc.para("Selection is on the validation split; the test split is never read by a sweep. "
             "`raytumor train --best` retrains the best configuration, `raytumor evaluate` reports on test.", note=True)

    doc.heading(2, f"Leaderboard (top {min(LEADERBOARD_ROWS, len(trials))} of {len(trials)})")
    header = ["trial", *space.swept, "configuration", "objective", *(METRIC_LABELS[k] for k in METRICS),
              "best epoch", "epochs", "status"]
    rows = []
    for row in trials.head(LEADERBOARD_ROWS).to_dict("records"):
        rows.append([row["trial_id"], *(_param_cell(row[f"param:{k}"]) for k in space.swept), row["name"],
                     _cell(row["objective"]), *(_cell(row[k]) for k in METRICS),
                     _cell(row["best_epoch"], whole=True), _cell(row["epochs_run"], whole=True), row["status"]])
    doc.table(header, rows)

    if space.distributions:
        doc.heading(2, "Objective against each swept parameter")
        doc.para("One series per training loss (train.loss), or per contrastive loss (pretrain.loss) for "
                 "pre-training parameters; a star marks the best trial.", note=True)
        for param in space.swept:
            _plot_section(doc, param_plot(trials, space, param), f"param-{_slug(param)}.png", param)
    if not space.distributions or trials["name"].nunique() > 1:
        doc.heading(2, "Objective per configuration")
        doc.para("Configurations named as in the paper's Table 2: ContrastivePretrain-Augment-Loss.", note=True)
        _plot_section(doc, configuration_plot(trials, space), "configurations.png", "configuration")

    doc.heading(2, "Parameter importances")
    importances = param_importances(trials, space)
    doc.para(importances.note, note=not importances.values)
    if importances.values:
        doc.image("importances.png", plot_importances(importances), "Parameter importances")
        doc.table(["parameter", "importance"], [[k, f"{v:.3f}"] for k, v in importances.values.items()])
    return doc


def write_sweep_report(experiment_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write ``report.html`` (self-contained), ``report.md`` and ``report_plots/`` into ``out``
    (default: the experiment directory; never a training run's directory); returns the path of
    ``report.html``.

    Each file is replaced in one rename, so a reader never sees half a report.
    """
    experiment_dir = Path(experiment_dir)
    _check_experiment(experiment_dir)
    out_dir = Path(out) if out is not None else experiment_dir
    _check_out_dir(out_dir)
    space = read_space(experiment_dir)
    trials = load_trials(experiment_dir, space)
    doc = build_report(trials, space, experiment_dir.resolve().name)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / PLOTS_DIR) as plots_tmp:
        plots_tmp.mkdir()
        for name, png in doc.plots.items():
            (plots_tmp / name).write_bytes(png)
    atomic_write_text(out_dir / REPORT_MD, doc.markdown())
    target = out_dir / REPORT_HTML
    atomic_write_text(target, doc.html_page(f"Sweep report: {experiment_dir.resolve().name}"))
    return target
