"""Search-space schema: validation errors name the file and key; conditionals only when active."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from raytumor.errors import ConfigError
from raytumor.sweep.space import OBJECTIVE_METRICS, load_search_space, suggest, trial_config

SPACES = sorted(Path(__file__).resolve().parents[2].joinpath("search_spaces").glob("*.yaml"))


def write(tmp_path, body: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_shipped_spaces_are_valid(path):
    space, base = load_search_space(path)
    assert space.name == path.stem
    assert space.objective.metric == "val_recall_macro" and space.objective.mode == "max"


def test_paper_table2_has_the_14_configurations():
    space, _ = load_search_space(next(p for p in SPACES if p.name == "paper_table2.yaml"))
    assert space.search == "grid" and len(space.configurations) == 14
    assert len({tuple(sorted(c.items())) for c in space.configurations}) == 14


@pytest.mark.parametrize(
    "body, message",
    [
        ({"name": "x", "paramters": {}}, "paramters: unknown key"),
        ({"name": "x", "parameters": {"train.margn": {"type": "uniform", "low": 0, "high": 1}}}, "train.margn: unknown key"),
        ({"name": "x", "parameters": {"train.margin": {"type": "uniform", "low": 2, "high": 1}}}, "must be below"),
        ({"name": "x", "parameters": {"train.lr": {"type": "loguniform", "low": 0, "high": 1}}}, "loguniform needs 'low' > 0"),
        ({"name": "x", "parameters": {"train.loss": {"type": "choice", "values": ["batch_hard", "hinge"]}}}, "train.loss"),
        ({"name": "x", "parameters": {"model.embedding_dim": {"type": "int", "low": 1.5, "high": 4}}}, "integer"),
        ({"name": "x", "parameters": {"pretrain.epochs": {"type": "int", "low": 1, "high": 4, "when": {"pretrain.enabld": True}}}},
         "pretrain.enabld is not a parameter"),
        ({"name": "x", "num_samples": 0}, "num_samples"),
        ({"name": "x", "search": "grid"}, "configurations"),
        ({"name": "x", "base": "missing.yaml"}, "missing.yaml: config file does not exist"),
    ],
)
def test_bad_spaces_name_file_and_key(tmp_path, body, message):
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as error:
        load_search_space(path)
    assert str(path) in str(error.value) and message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "parameter, problem",
    [
        ({"type": "loguniform", "low": -1, "high": 2}, "parameters.train.margin: loguniform needs 'low' > 0"),
        ({"type": "uniform", "low": 2, "high": 1}, "parameters.train.margin: 'low' (2.0) must be below 'high' (1.0)"),
        ({"type": "triangular", "low": 0.1, "high": 1},
         "parameters.train.margin.type: Input should be 'uniform', 'loguniform', 'int' or 'choice'"),
        ({"type": "uniform", "low": 0.1, "high": 1, "stpe": 2}, "parameters.train.margin.stpe: unknown key"),
    ],
)
def test_a_bad_distribution_is_one_problem_not_one_per_kind_of_value(tmp_path, parameter, problem):
    # A parameter is a distribution or a fixed value; a bad distribution used to be reported
    # against every kind of fixed value as well ("Input should be a valid boolean; ...").
    path = write(tmp_path, {"name": "x", "parameters": {"train.margin": parameter}})
    with pytest.raises(ConfigError) as error:
        load_search_space(path)
    assert str(error.value) == f"{path}: {problem}"


def test_an_objective_the_training_loop_does_not_report_is_refused_before_ray(tmp_path):
    path = write(tmp_path, {"name": "x", "objective": {"metric": "val_acc", "mode": "max"}})
    with pytest.raises(ConfigError) as error:
        load_search_space(path)
    assert str(error.value) == (f"{path}: objective.metric: unknown metric 'val_acc'; the training loop reports "
                                + ", ".join(OBJECTIVE_METRICS))


def test_the_objective_metrics_are_what_the_training_loop_reports():
    """The loop reports ``val_`` + ``eval_step``'s scores (raytumor/train/loops.py)."""
    import numpy as np
    import torch

    from raytumor.models import build_model
    from raytumor.train.steps import eval_step

    rng = np.random.default_rng(0)
    volumes = rng.normal(size=(6, 2, 8, 8, 4)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2])
    model = build_model("paper_cnn", width=0.0625, embedding_dim=4)
    scores = eval_step(model, (volumes, labels), (volumes, labels), torch.device("cpu"))
    reported = {f"val_{key}" for key in scores} | {"best_val_recall_macro"}
    assert set(OBJECTIVE_METRICS) <= reported


@pytest.mark.parametrize("name", ["../../escape", "/tmp/escape", "", ".", "..", "a\\b"])
def test_an_experiment_name_is_one_directory_name(tmp_path, name):
    # name: ../../escape wrote the experiment to /tmp/escape.
    path = write(tmp_path, {"name": name})
    with pytest.raises(ConfigError) as error:
        load_search_space(path)
    assert str(error.value) == f"{path}: name: must be one directory name: not empty, '.' or '..', no '/' or '\\'"


@pytest.mark.parametrize(
    "body, problem",
    [
        ({"parameters": {"train.margin": {"type": "uniform", "low": 0.1, "high": float("inf")}}},
         "parameters.train.margin.high: Input should be a finite number"),
        ({"parameters": {"train.lr": float("nan")}}, "parameters: train.lr: Input should be a finite number (got nan)"),
        ({"scheduler": {"reduction_factor": float("inf")}}, "scheduler.reduction_factor: Input should be a finite number"),
        ({"num_samples": True}, "num_samples: must be a number, not a boolean"),
    ],
)
def test_space_numbers_are_finite_and_not_booleans(tmp_path, body, problem):
    path = write(tmp_path, {"name": "x", **body})
    with pytest.raises(ConfigError) as error:
        load_search_space(path)
    assert str(error.value) == f"{path}: {problem}"


def test_a_whole_space_error_has_no_empty_key(tmp_path):
    path = write(tmp_path, {"name": "x", "search": "grid"})
    with pytest.raises(ConfigError) as error:
        load_search_space(path)
    assert str(error.value) == f"{path}: search: grid needs a non-empty 'configurations' list"


def test_a_bad_key_of_the_base_is_reported_against_the_base(tmp_path):
    parameters = {"train.margin": {"type": "uniform", "low": 0.1, "high": 1.0}}
    path = write(tmp_path, {"name": "x", "base": {"train": {"epochz": 2}}, "parameters": parameters})
    with pytest.raises(ConfigError) as error:
        load_search_space(path)
    assert str(error.value) == f"{path}: base: train.epochz: unknown key"

    (tmp_path / "base.yaml").write_text("train:\n  epochz: 2\n")
    path = write(tmp_path, {"name": "x", "base": "base.yaml", "parameters": parameters})
    with pytest.raises(ConfigError) as error:
        load_search_space(path)
    assert str(error.value) == f"{path}: base: base.yaml: train.epochz: unknown key"

    path = write(tmp_path, {"name": "x", "base": {"train": {"epochs": 2}}, "parameters": {**parameters, "train.epochz": 3}})
    with pytest.raises(ConfigError) as error:
        load_search_space(path)
    assert str(error.value) == f"{path}: parameters: train.epochz: unknown key"


def test_a_space_or_base_that_is_not_utf8_is_one_error(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_bytes(b"\xff\xfe\x80bad")
    with pytest.raises(ConfigError) as error:
        load_search_space(path)
    assert str(error.value) == f"{path}: not a UTF-8 text file (byte 0xff at offset 0)"

    (tmp_path / "base.yaml").write_bytes(b"name: \x80")
    path = write(tmp_path, {"name": "x", "base": "base.yaml"})
    with pytest.raises(ConfigError) as error:
        load_search_space(path)
    assert str(error.value) == f"{path}: base: {tmp_path / 'base.yaml'}: not a UTF-8 text file (byte 0x80 at offset 6)"


def test_a_key_given_twice_in_a_space_or_base_is_an_error(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("name: x\nparameters:\n  train.margin: 0.5\n  train.margin: 0.7\n")
    with pytest.raises(ConfigError) as error:
        load_search_space(path)
    assert str(error.value) == f"{path}: duplicate key 'train.margin' (line 4)"

    (tmp_path / "base.yaml").write_text("seed: 1\nseed: 2\n")
    path = write(tmp_path, {"name": "x", "base": "base.yaml"})
    with pytest.raises(ConfigError) as error:
        load_search_space(path)
    assert str(error.value) == f"{path}: base: {tmp_path / 'base.yaml'}: duplicate key 'seed' (line 2)"


def test_conditional_parameters_reach_trials_only_when_active(tmp_path):
    path = write(tmp_path, {
        "name": "cond",
        "parameters": {
            "pretrain.enabled": {"type": "choice", "values": [True, False]},
            "pretrain.epochs": {"type": "int", "low": 1, "high": 5, "when": {"pretrain.enabled": True}},
            "pretrain.loss": {"type": "choice", "values": ["ntxent", "batch_hard"], "when": {"pretrain.enabled": True}},
            "train.margin": {"type": "uniform", "low": 0.1, "high": 1.0},
            "train.epochs": 3,
        },
    })
    space, base = load_search_space(path)
    distributions = {k: v.model_dump(exclude_none=True) for k, v in space.distributions().items()}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {True: 0, False: 0}
    for _ in range(30):
        trial = study.ask()
        sampled = suggest(trial, distributions, space.fixed())
        enabled = sampled["pretrain.enabled"]
        seen[enabled] += 1
        assert ("pretrain.epochs" in sampled) == enabled and ("pretrain.loss" in sampled) == enabled
        assert set(trial.params) == set(sampled)  # Optuna records inactive parameters as absent
        config = trial_config(base, space, sampled)
        assert config.train.epochs == 3 and config.pretrain.enabled == enabled
        study.tell(trial, 0.5)
    assert seen[True] and seen[False]


def test_condition_on_a_fixed_parameter(tmp_path):
    path = write(tmp_path, {"name": "fixed", "parameters": {
        "pretrain.enabled": False,
        "pretrain.epochs": {"type": "int", "low": 1, "high": 5, "when": {"pretrain.enabled": True}},
        "train.margin": {"type": "uniform", "low": 0.1, "high": 1.0},
    }})
    space, _ = load_search_space(path)
    distributions = {k: v.model_dump(exclude_none=True) for k, v in space.distributions().items()}
    trial = optuna.create_study().ask()
    assert set(suggest(trial, distributions, space.fixed())) == {"train.margin"}


def test_space_resources_reach_the_trial_config(tmp_path):
    path = write(tmp_path, {"name": "res", "resources": {"num_workers": 2, "cpus_per_worker": 0.5},
                            "parameters": {"train.margin": {"type": "uniform", "low": 0.1, "high": 1.0}}})
    space, base = load_search_space(path)
    config = trial_config(base, space, {"train.margin": 0.5})
    assert config.resources.num_workers == 2 and config.resources.cpus_per_worker == 0.5


@pytest.mark.parametrize("value", [0, -2, "many", True, 1.5])
def test_max_concurrent_trials_is_a_positive_integer_or_auto(tmp_path, value):
    path = write(tmp_path, {"name": "x", "max_concurrent_trials": value})
    with pytest.raises(ConfigError) as error:
        load_search_space(path)
    assert str(error.value) == f"{path}: max_concurrent_trials: must be a positive integer or 'auto', got {value!r}"


@pytest.mark.parametrize(
    "cluster, resources, at_once",
    [
        ({"CPU": 2.0}, {"num_workers": 1, "cpus_per_worker": 1}, 1),  # the other CPU is Ray Data's
        ({"CPU": 2.0}, {"num_workers": 1, "cpus_per_worker": 0.5}, 2),  # one torch thread per core
        ({"CPU": 2.0}, {"num_workers": 1, "cpus_per_worker": 0.25}, 2),  # not 4 threads on 2 cores
        ({"CPU": 2.0}, {"num_workers": 2, "cpus_per_worker": 0.5}, 1),
        ({"CPU": 16.0}, {"num_workers": 1, "cpus_per_worker": 1}, 15),
        ({"CPU": 16.0}, {"num_workers": 2, "cpus_per_worker": 2}, 3),
        ({"CPU": 16.0, "GPU": 2.0}, {"num_workers": 1, "cpus_per_worker": 2}, 2),  # use_gpu auto: a GPU each
        ({"CPU": 16.0, "GPU": 2.0}, {"num_workers": 1, "cpus_per_worker": 2, "use_gpu": False}, 7),
        ({"CPU": 0.0}, {"num_workers": 1, "cpus_per_worker": 1}, 1),  # an autoscaling head before its workers
    ],
)
def test_auto_concurrency_fits_the_cluster_with_a_cpu_left_for_ray_data(tmp_path, cluster, resources, at_once):
    from raytumor.config import build_config
    from raytumor.sweep.run import trials_at_once

    space, _ = load_search_space(write(tmp_path, {"name": "x"}))
    assert space.max_concurrent_trials == "auto"
    assert trials_at_once(space, build_config({"resources": resources}), cluster) == at_once
    fixed, _ = load_search_space(write(tmp_path, {"name": "x", "max_concurrent_trials": 3}))
    assert trials_at_once(fixed, build_config({"resources": resources}), cluster) == 3


@pytest.mark.parametrize(
    "cluster, resources, per_worker",
    [
        ({"CPU": 2.0}, {"num_workers": 1, "cpus_per_worker": 0.5}, None),  # 1 thread, 1 CPU free: nothing to gain
        ({"CPU": 4.0}, {"num_workers": 1, "cpus_per_worker": 0.5}, 3),
        ({"CPU": 16.0}, {"num_workers": 1, "cpus_per_worker": 0.5}, 15),
        ({"CPU": 16.0}, {"num_workers": 2, "cpus_per_worker": 1}, 7),
        ({"CPU": 16.0}, {"num_workers": 2, "cpus_per_worker": 4}, None),  # uses 8 of 15
        ({"CPU": 16.0}, {"num_workers": 1, "cpus_per_worker": 8}, None),
        ({"CPU": 16.0, "GPU": 1.0}, {"num_workers": 1, "cpus_per_worker": 0.5}, None),  # use_gpu auto: a GPU trains
        ({"CPU": 16.0, "GPU": 1.0}, {"num_workers": 1, "cpus_per_worker": 0.5, "use_gpu": False}, 15),
    ],
)
def test_train_best_says_when_the_trial_sized_resources_leave_cpus_idle(cluster, resources, per_worker):
    from raytumor.config import build_config
    from raytumor.sweep.run import idle_cpus_note

    note = idle_cpus_note(build_config({"resources": resources}), cluster)
    if per_worker is None:
        assert note is None
    else:
        assert note.startswith("note: the best config trains ")
        assert f"this Ray has {cluster['CPU']:g} CPUs: add --set resources.cpus_per_worker={per_worker} " in note


def test_train_best_prints_the_idle_cpus_note_to_stderr(monkeypatch, capsys):
    import ray

    from raytumor.cli.train import _note_idle_cpus
    from raytumor.config import build_config

    config = build_config({"resources": {"num_workers": 1, "cpus_per_worker": 0.5}})
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    _note_idle_cpus(config)
    out, err = capsys.readouterr()
    assert out == "" and "--set resources.cpus_per_worker=7 to use 7 of them" in err
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    _note_idle_cpus(config)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_shipped_spaces_run_two_trials_at_once_on_two_cores(path):
    from raytumor.config import build_config, merge
    from raytumor.sweep.run import trials_at_once
    from raytumor.sweep.space import nest

    space, base = load_search_space(path)
    assert trials_at_once(space, build_config(merge(base, nest(space.fixed()))), {"CPU": 2.0}) == 2


def test_the_searcher_is_built_without_optunas_new_study_line(tmp_path):
    import logging

    from raytumor.sweep.run import _search_alg

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    optuna_logger = logging.getLogger("optuna")
    optuna_logger.addHandler(handler)
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        space, _ = load_search_space(write(tmp_path, {"name": "x"}))
        searcher = _search_alg(space)
        assert optuna.logging.get_verbosity() == optuna.logging.INFO  # the caller's setting is back
        optuna.create_study()  # the handler does see Optuna's INFO lines
    finally:
        optuna_logger.removeHandler(handler)
        optuna.logging.set_verbosity(before)
    assert searcher is not None
    messages = [record.getMessage() for record in records]
    assert len(messages) == 1 and messages[0].startswith("A new study created"), messages


def test_the_searcher_keeps_a_resumed_trials_first_value_per_epoch_without_a_warning(tmp_path):
    """A trial resumed from a checkpoint reports again the epochs after it: Optuna keeps the
    first value, and the searcher says nothing about it (Optuna warned once per repeat)."""
    import pickle
    import warnings

    from ray.tune.search.optuna import OptunaSearch

    from raytumor.sweep.run import _search_alg

    space, _ = load_search_space(write(tmp_path, {"name": "x", "seed": 0}))
    searcher = _search_alg(space)
    metric = space.objective.metric
    for trial_id in ("t1", "t2"):
        assert searcher.suggest(trial_id) is not None
        searcher.on_trial_result(trial_id, {metric: 0.5, "training_iteration": 1})
        searcher.on_trial_result(trial_id, {metric: 0.6, "training_iteration": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        searcher.on_trial_result("t1", {metric: 0.55, "training_iteration": 2})  # the replayed epoch
        searcher.on_trial_result("t1", {metric: 0.7, "training_iteration": 3})
    with pytest.warns(UserWarning, match="already reported"):  # what Ray's OptunaSearch does
        OptunaSearch.on_trial_result(searcher, "t2", {metric: 0.55, "training_iteration": 2})
    searcher.on_trial_complete("t1", {metric: 0.7, "training_iteration": 3})
    first = searcher._ot_study.trials[0]
    assert first.intermediate_values == {1: 0.5, 2: 0.6, 3: 0.7} and first.value == 0.7
    assert type(pickle.loads(pickle.dumps(searcher))) is type(searcher)  # Tune saves it with the sweep
