"""The sweep report on synthetic experiment directories: tables, plots per parameter and loss
variant, importances, grid naming, errored trials, the CLI."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import typer
import yaml
from typer.testing import CliRunner

from raytumor.cli.sweep_report import sweep_report
from raytumor.errors import RaytumorError
from raytumor.sweep.report import (
    SweepSpace,
    configuration_labels,
    load_trials,
    param_importances,
    param_plot,
    read_space,
    write_sweep_report,
)
from raytumor.sweep.space import nest

runner = CliRunner()
app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
app.command("sweep-report")(sweep_report)
app.command("noop", hidden=True)(lambda: None)  # keeps sweep-report a named sub-command

DEFAULTS = {"train.loss": "batch_hard", "train.margin": 1.0, "train.lr": 0.003, "train.epochs": 6,
            "model.embedding_dim": 6, "pretrain.enabled": False, "pretrain.loss": "ntxent",
            "pretrain.epochs": 5, "data.augment_rare": False}


def make_experiment(root: Path, space: dict, trials: list[dict], *, leaderboard_metrics: bool = True) -> Path:
    """Write an experiment directory as `raytumor sweep` leaves it.

    Each trial: ``id``, ``params`` (the sampled values, as the leaderboard records them),
    ``config`` (extra resolved config values), ``history`` (per-epoch metric dicts; the
    objective is the best val_recall_macro), ``status``, ``files`` (which of metrics.csv /
    result.json to write).
    """
    exp = root / space["name"]
    (exp / "trials").mkdir(parents=True)
    (exp / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    (exp / "base.yaml").write_text("{}\n")
    rows = []
    for trial in trials:
        trial_dir = exp / "trials" / trial["id"]
        trial_dir.mkdir()
        fixed = {k: v for k, v in space.get("parameters", {}).items() if not isinstance(v, dict)}
        flat = {**DEFAULTS, **fixed, **trial.get("config", {}), **trial["params"]}
        (trial_dir / "config.yaml").write_text(yaml.safe_dump(nest({"name": trial["id"], **flat}), sort_keys=False))
        history = pd.DataFrame(trial.get("history", []))
        files = trial.get("files", ("metrics.csv",))
        if not history.empty and "metrics.csv" in files:
            history.to_csv(trial_dir / "metrics.csv", index=False)
        if not history.empty and "result.json" in files:
            (exp / "tune" / trial["id"]).mkdir(parents=True)
            (exp / "tune" / trial["id"] / "result.json").write_text(
                "".join(json.dumps({**r, "trial_id": trial["id"], "config": {}}) + "\n" for r in history.to_dict("records")))
        row = {"trial_id": trial["id"], **{f"param:{k}": v for k, v in trial["params"].items()}}
        if not history.empty and leaderboard_metrics:
            best = history.loc[history["val_recall_macro"].idxmax()]
            row.update(objective=best["val_recall_macro"], best_epoch=int(best["epoch"]), epochs_run=len(history),
                       **{k: best[k] for k in ("val_recall_micro", "val_recall_macro", "val_recall_macro_rare", "val_rank5")})
        else:
            row["objective"] = math.nan
        row["status"] = trial.get("status", "done")
        rows.append(row)
    board = pd.DataFrame(rows).sort_values("objective", ascending=False, na_position="last")
    board.to_csv(exp / "leaderboard.csv", index=False)
    return exp


def history(best: float, epochs: int = 3, micro: float | None = None, rare: float | None = None) -> list[dict]:
    """Per-epoch metrics rising to ``best`` (val_recall_macro) at the last epoch."""
    rows = []
    for epoch in range(1, epochs + 1):
        scale = epoch / epochs
        rows.append({"epoch": epoch, "loss": 1.0 / epoch, "val_recall_micro": round((micro or best + 0.05) * scale, 4),
                     "val_recall_macro": round(best * scale, 4),
                     "val_recall_macro_rare": round((rare if rare is not None else best / 2) * scale, 4),
                     "val_rank5": round(min(1.0, best + 0.2) * scale, 4)})
    return rows


MARGIN_SPACE = {"name": "margin", "search": "tpe", "objective": {"metric": "val_recall_macro", "mode": "max"},
                "parameters": {"train.loss": {"type": "choice", "values": ["batch_hard", "batch_all"]},
                               "train.margin": {"type": "uniform", "low": 0.05, "high": 2.0}}}


@pytest.fixture(scope="module")
def margin_experiment(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sweeps")
    trials = []
    for i, margin in enumerate([0.1, 0.3, 0.6, 0.9, 1.2, 1.5, 1.8, 0.45]):
        loss = "batch_hard" if i % 2 == 0 else "batch_all"
        best = 0.4 + 0.15 * margin + (0.1 if loss == "batch_hard" else 0.0)
        trials.append({"id": f"m{i:02d}", "params": {"train.loss": loss, "train.margin": margin},
                       "history": history(round(best, 4)), "status": "stopped" if i == 7 else "done"})
    # An errored trial: no metrics at all, NaN objective.
    trials.append({"id": "m99", "params": {"train.loss": "batch_all", "train.margin": 0.7}, "status": "error"})
    return make_experiment(tmp_path, MARGIN_SPACE, trials)


@pytest.fixture(scope="module")
def margin_report(margin_experiment):
    return write_sweep_report(margin_experiment)


def _img_alts(page: str) -> list[str]:
    return re.findall(r'<img alt="([^"]*)"', page)


def test_margin_report_is_self_contained_with_best_trial_and_one_plot_per_parameter(margin_experiment, margin_report):
    path = margin_report
    assert path == margin_experiment / "report.html"
    page = path.read_text()
    assert not re.search(r'(src|href)\s*=\s*["\']?https?://', page)
    assert "<script" not in page
    assert "data:image/png;base64," in page

    trials = load_trials(margin_experiment)
    best = trials.iloc[0]
    assert best["trial_id"] == "m06"  # margin 1.8 with batch-hard: the synthetic optimum
    assert f"Best trial m06: val_recall_macro = {best['objective']:.4f} (validation split)" in page
    assert "validation split" in page

    alts = _img_alts(page)
    assert [a for a in alts if a.startswith("Objective against")] == [
        "Objective against train.loss", "Objective against train.margin", "Objective against configuration"]
    plots = sorted(p.name for p in (margin_experiment / "report_plots").iterdir())
    assert plots == ["configurations.png", "importances.png", "param-train.loss.png", "param-train.margin.png"]
    assert 'alt="Parameter importances"' in page
    assert all((margin_experiment / "report_plots" / p).read_bytes()[:4] == b"\x89PNG" for p in plots)
    md = (margin_experiment / "report.md").read_text()
    assert "![Objective against train.margin](report_plots/param-train.margin.png)" in md
    # Fig. A.2: batch-hard vs batch-all against the margin.
    assert "Series (train.loss): BATriplet (4 trials), BHTriplet (4 trials)" in md
    assert "1 trial(s) not shown" in md  # the errored one
    assert "9 trial(s), 8 with an objective, 1 stopped early by the scheduler, 1 errored" in md
    # The leaderboard lists every trial, the errored one last.
    assert md.index("| m06 |") < md.index("| m99 |")
    assert "| error |" in md


def test_margin_plot_data_has_a_series_per_training_loss_and_recall_panels(margin_experiment):
    space = read_space(margin_experiment)
    trials = load_trials(margin_experiment, space)
    plot = param_plot(trials, space, "train.margin")
    assert plot.kind == "numeric" and plot.log_x is None and not plot.discrete
    assert set(plot.series) == {"BHTriplet", "BATriplet"}
    assert plot.series_key == "train.loss"
    assert [label for _, label in plot.panels] == ["Recall_M (objective)", "Recall_μ", "Recall_M*"]
    bh = plot.series["BHTriplet"].sort_values("x")
    assert list(bh["x"]) == [0.1, 0.6, 1.2, 1.8]
    assert bh["objective"].is_monotonic_increasing
    assert plot.hidden == 1 and plot.best_trial_id == "m06"

    by_loss = param_plot(trials, space, "train.loss")
    assert by_loss.kind == "categorical" and by_loss.series_key is None
    assert by_loss.categories == ("batch_hard", "batch_all")


def test_importances_computed_with_several_parameters(margin_experiment):
    space = read_space(margin_experiment)
    importances = param_importances(load_trials(margin_experiment, space), space)
    assert set(importances.values) == {"train.loss", "train.margin"}
    assert math.isclose(sum(importances.values.values()), 1.0)
    assert importances.n_trials == 8  # the errored trial is left out
    assert "PED-ANOVA" in importances.note
    assert importances.values["train.margin"] > 0


def test_pretrain_epochs_series_per_contrastive_loss_and_missing_metrics_recomputed(tmp_path):
    space = {"name": "pretrain_epochs", "search": "tpe", "objective": {"metric": "val_recall_macro", "mode": "max"},
             "parameters": {"pretrain.enabled": True, "train.loss": "batch_hard",
                            "pretrain.loss": {"type": "choice", "values": ["ntxent", "batch_all", "batch_hard"]},
                            "pretrain.epochs": {"type": "int", "low": 1, "high": 20}}}
    trials = []
    for i, (loss, epochs) in enumerate([("ntxent", 2), ("ntxent", 10), ("batch_all", 5), ("batch_all", 15),
                                        ("batch_hard", 5), ("batch_hard", 20)]):
        best = round(0.3 + 0.01 * epochs + 0.05 * i, 4)
        files = ("result.json",) if i == 1 else ("metrics.csv",)  # trial p01 stopped by ASHA: Tune's log only
        trials.append({"id": f"p{i:02d}", "params": {"pretrain.loss": loss, "pretrain.epochs": epochs},
                       "history": history(best, rare=best - 0.1), "files": files})
    exp = make_experiment(tmp_path, space, trials, leaderboard_metrics=False)

    loaded = load_trials(exp)
    assert loaded["objective"].notna().all()
    p01 = loaded.set_index("trial_id").loc["p01"]
    assert p01["objective"] == pytest.approx(0.45) and p01["best_epoch"] == 3
    assert p01["val_recall_macro_rare"] == pytest.approx(0.35)

    space_info = read_space(exp)
    plot = param_plot(loaded, space_info, "pretrain.epochs")
    # Figs. 2-3: Recall_M and Recall_M* against pre-train epochs, per contrastive loss.
    assert plot.series_key == "pretrain.loss"
    assert set(plot.series) == {"NTXent", "BATriplet", "BHTriplet"}
    assert "Recall_M*" in [label for _, label in plot.panels] and plot.discrete
    write_sweep_report(exp)
    md = (exp / "report.md").read_text()
    assert "Series (pretrain.loss): BATriplet (2 trials), BHTriplet (2 trials), NTXent (2 trials)" in md


def test_embedding_dim_choice_is_numeric_on_a_log2_axis_and_single_param_skips_importances(tmp_path):
    space = {"name": "embedding_dim", "objective": {"metric": "val_recall_macro", "mode": "max"},
             "parameters": {"train.loss": "batch_hard", "train.margin": 1.0,
                            "model.embedding_dim": {"type": "choice", "values": [2, 3, 4, 6, 8, 12, 16, 32, 64]}}}
    trials = [{"id": f"e{d}", "params": {"model.embedding_dim": d}, "history": history(round(0.2 + d / 100, 4))}
              for d in (2, 4, 8, 16, 64)]
    exp = make_experiment(tmp_path, space, trials)
    space_info = read_space(exp)
    loaded = load_trials(exp, space_info)
    plot = param_plot(loaded, space_info, "model.embedding_dim")
    assert plot.kind == "numeric" and plot.log_x == 2.0
    assert list(plot.series) == ["BHTriplet"]  # train.loss fixed: one series, named
    importances = param_importances(loaded, space_info)
    assert importances.values == {} and "single swept parameter" in importances.note
    page = write_sweep_report(exp).read_text()
    assert "single swept parameter" in page
    assert "Best trial e64: val_recall_macro = 0.8400" in page


def test_conditional_parameters_inactive_from_config_and_importances(tmp_path):
    space = {"name": "full", "objective": {"metric": "val_recall_macro", "mode": "max"},
             "parameters": {"pretrain.enabled": {"type": "choice", "values": [True, False]},
                            "pretrain.loss": {"type": "choice", "values": ["ntxent", "batch_all", "batch_hard"],
                                              "when": {"pretrain.enabled": True}},
                            "pretrain.epochs": {"type": "int", "low": 2, "high": 20, "step": 2,
                                                "when": {"pretrain.enabled": True}},
                            "train.lr": {"type": "loguniform", "low": 1e-4, "high": 3e-3}}}
    trials = []
    for i in range(8):
        enabled = i % 2 == 0
        params = {"pretrain.enabled": enabled, "train.lr": [1e-4, 3e-4, 1e-3, 2e-3][i % 4]}
        if enabled:
            params.update({"pretrain.loss": ["ntxent", "batch_hard"][i % 4 // 2], "pretrain.epochs": 2 + 2 * i})
        trials.append({"id": f"f{i}", "params": params, "history": history(round(0.3 + 0.05 * i + 0.2 * enabled, 4))})
    exp = make_experiment(tmp_path, space, trials)
    space_info = read_space(exp)
    loaded = load_trials(exp, space_info).set_index("trial_id")
    # f1's config still holds pretrain.loss/epochs defaults; the `when` marks them inactive.
    assert loaded.loc["f1", "param:pretrain.loss"] is None and math.isnan(loaded.loc["f1", "param:pretrain.epochs"])
    assert loaded.loc["f2", "param:pretrain.epochs"] == 6 and loaded.loc["f2", "name"] == "BHTriplet-None-BHTriplet"
    assert loaded.loc["f1", "name"] == "None-None-BHTriplet"
    importances = param_importances(load_trials(exp, space_info), space_info)
    assert set(importances.values) == {"pretrain.enabled", "pretrain.loss", "pretrain.epochs", "train.lr"}
    assert "assessed where active" in importances.note
    lr_plot = param_plot(load_trials(exp, space_info), space_info, "train.lr")
    assert lr_plot.log_x == 10.0
    page = write_sweep_report(exp).read_text()
    assert len([a for a in _img_alts(page) if a.startswith("Objective against")]) == 5  # 4 params + configurations


def test_grid_experiment_plots_per_paper_configuration(tmp_path):
    configurations = [
        {"pretrain.enabled": False, "data.augment_rare": False, "train.loss": "cross_entropy"},
        {"pretrain.enabled": True, "pretrain.loss": "ntxent", "data.augment_rare": False, "train.loss": "cross_entropy"},
        {"pretrain.enabled": False, "data.augment_rare": True, "train.loss": "batch_hard"},
        {"pretrain.enabled": True, "pretrain.loss": "batch_hard", "data.augment_rare": True, "train.loss": "batch_hard"},
    ]
    space = {"name": "paper_table2", "search": "grid", "objective": {"metric": "val_recall_macro", "mode": "max"},
             "scheduler": {"type": "none"}, "parameters": {"pretrain.epochs": 5}, "configurations": configurations}
    trials = [{"id": f"g{i}", "params": c, "history": history(0.3 + 0.1 * i)} for i, c in enumerate(configurations)]
    trials.append({"id": "g9", "params": configurations[0], "status": "error"})
    exp = make_experiment(tmp_path, space, trials)
    loaded = load_trials(exp)
    assert list(loaded["name"]) == ["BHTriplet-Aug-BHTriplet", "None-Aug-BHTriplet", "NTXent-None-CrossEntropy",
                                    "None-None-CrossEntropy", "None-None-CrossEntropy"]
    page = write_sweep_report(exp).read_text()
    assert [a for a in _img_alts(page) if a.startswith("Objective against")] == ["Objective against configuration"]
    assert "Best trial g3: val_recall_macro = 0.6000" in page
    assert "BHTriplet-Aug-BHTriplet" in page and "NTXent-None-CrossEntropy" in page
    # Grid keys become categorical distributions; pretrain.loss is conditional (absent when disabled).
    space_info = read_space(exp)
    importances = param_importances(loaded, space_info)
    assert set(importances.values) <= set(space_info.grid_keys) and importances.values


def test_single_trial_and_all_errored(tmp_path):
    one = make_experiment(tmp_path, {**MARGIN_SPACE, "name": "one"},
                          [{"id": "only", "params": {"train.loss": "batch_all", "train.margin": 0.5},
                            "history": history(0.5)}])
    page = write_sweep_report(one).read_text()
    assert "Best trial only: val_recall_macro = 0.5000" in page
    assert "Parameter importances skipped: 1 trial(s) with an objective; at least 3 are needed." in page

    failed = make_experiment(tmp_path, {**MARGIN_SPACE, "name": "failed"},
                             [{"id": f"x{i}", "params": {"train.loss": "batch_all", "train.margin": 0.5 + i},
                               "status": "error"} for i in range(2)])
    page = write_sweep_report(failed).read_text()
    assert "No trial reported val_recall_macro" in page
    assert "nothing to plot" in page


def test_out_directory_and_rewrite_replaces_plots(tmp_path):
    exp = make_experiment(tmp_path, {**MARGIN_SPACE, "name": "small"},
                          [{"id": f"s{i}", "params": {"train.loss": "batch_all", "train.margin": 0.2 * (i + 1)},
                            "history": history(0.3 + 0.1 * i)} for i in range(3)])
    out = tmp_path / "elsewhere"
    (out / "report_plots").mkdir(parents=True)
    (out / "report_plots" / "stale.png").write_bytes(b"old")  # from an earlier report
    path = write_sweep_report(exp, out=out)
    assert path == out / "report.html" and (out / "report.md").is_file()
    assert not (exp / "report.html").exists()
    assert not (out / "report_plots" / "stale.png").exists()
    assert sorted(p.name for p in (out / "report_plots").iterdir()) == [
        "importances.png", "param-train.loss.png", "param-train.margin.png"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("run_file", ["best_model.pt", "config.yaml"])
def test_out_holding_a_training_run_is_refused_before_anything_is_written(tmp_path, run_file):
    exp = make_experiment(tmp_path, {**MARGIN_SPACE, "name": "small"},
                          [{"id": "s0", "params": {"train.loss": "batch_all", "train.margin": 0.2}, "history": history(0.3)}])
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / run_file).write_bytes(b"a training run's file")
    result = runner.invoke(app, ["sweep-report", str(exp), "--out", str(run)])
    assert isinstance(result.exception, RaytumorError)
    message = str(result.exception)
    assert "\n" not in message and message.startswith(str(run)) and run_file in message and "training run" in message
    assert sorted(p.name for p in run.iterdir()) == [run_file]


def test_missing_experiment_and_leaderboard_are_one_line_errors(tmp_path):
    with pytest.raises(RaytumorError, match="does not exist"):
        write_sweep_report(tmp_path / "nope")
    (tmp_path / "running").mkdir()
    with pytest.raises(RaytumorError, match="no leaderboard.csv"):
        load_trials(tmp_path / "running")


def test_cli_help_error_and_name_under_results(tmp_path, monkeypatch):
    result = runner.invoke(app, ["sweep-report", "--help"])
    assert result.exit_code == 0 and "--out" in result.output

    result = runner.invoke(app, ["sweep-report", str(tmp_path / "missing")])
    assert isinstance(result.exception, RaytumorError)
    assert "no such experiment" in str(result.exception) and "\n" not in str(result.exception)

    (tmp_path / "work" / "results" / "running").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    result = runner.invoke(app, ["sweep-report", "running"])
    assert isinstance(result.exception, RaytumorError) and "no leaderboard.csv" in str(result.exception)

    exp = make_experiment(tmp_path / "shared", {**MARGIN_SPACE, "name": "one"},
                          [{"id": "t0", "params": {"train.loss": "batch_all", "train.margin": 0.5}, "history": history(0.5)}])
    result = runner.invoke(app, ["sweep-report", "one", "--results-dir", str(exp.parent)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(exp / "report.html")
    assert "Best trial t0" in (exp / "report.html").read_text()


def test_cli_module_imports_nothing_heavy():
    code = ("import sys, raytumor.cli.sweep_report; "
            "print(sorted(m for m in ('matplotlib', 'optuna', 'torch', 'ray', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_grid_labels_name_other_varying_configuration_keys():
    space = SweepSpace("g", "val_recall_macro", "max", "grid", {}, ("train.loss", "train.margin"))
    trials = pd.DataFrame({"name": ["None-None-BHTriplet"] * 2, "param:train.loss": ["batch_hard"] * 2,
                           "param:train.margin": [0.5, 1.0]})
    assert configuration_labels(trials, space) == ["None-None-BHTriplet (train.margin=0.5)",
                                                   "None-None-BHTriplet (train.margin=1)"]


def test_a_key_given_twice_in_the_experiments_space_yaml_is_a_one_line_error(tmp_path):
    exp = make_experiment(tmp_path, {**MARGIN_SPACE, "name": "small"},
                          [{"id": "s0", "params": {"train.loss": "batch_all", "train.margin": 0.2}, "history": history(0.3)}])
    space_file = exp / "space.yaml"
    space_file.write_text(space_file.read_text() + "search: random\n")  # `search: tpe` is in it already
    with pytest.raises(RaytumorError) as error:
        read_space(exp)
    assert str(error.value) == f"{space_file}: duplicate key 'search' (line {len(space_file.read_text().splitlines())})"
