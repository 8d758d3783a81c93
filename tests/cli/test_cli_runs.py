"""``raytumor train / pretrain / sweep``: bad input is a one-line error before Ray starts."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import yaml

from raytumor import runtime
from raytumor.cli import main
from tests.conftest import make_dataset


def _no_ray(*args, **kwargs):
    raise AssertionError("Ray was started")


def _no_ray_needed(*args, **kwargs):
    return contextlib.nullcontext()


def _run_main(monkeypatch, capsys, *args: str, ray_session=_no_ray) -> tuple[int, str]:
    """The real entry point in-process, with Ray forbidden (or faked): its exit code and stderr."""
    monkeypatch.setattr(runtime, "ray_session", ray_session)
    monkeypatch.setattr(sys, "argv", ["raytumor", *args])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code, capsys.readouterr().err


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "ds", n_per_class=(3, 3, 3), shape=(8, 8, 4))


@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_training_on_a_missing_dataset_fails_before_ray_starts(command, tmp_path, monkeypatch, capsys):
    code, err = _run_main(monkeypatch, capsys, command, "--set", f"data.dataset={tmp_path / 'none'}",
                          "--set", f"output_dir={tmp_path / 'runs'}")
    assert code == 2 and err.count("\n") == 1 and "no such dataset directory" in err
    assert not (tmp_path / "runs").exists()


def test_training_checks_the_run_directory_and_backbone_before_ray_starts(dataset, tmp_path, monkeypatch, capsys):
    base = ["--set", f"data.dataset={dataset}", "--set", f"output_dir={tmp_path / 'runs'}", "--name", "r1"]
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    code, err = _run_main(monkeypatch, capsys, "train", *base)
    assert code == 2 and err.count("\n") == 1 and "run exists; use --resume" in err
    code, err = _run_main(monkeypatch, capsys, "train", *base[:-1], "r2", "--resume")
    assert code == 2 and "no run to resume" in err
    (tmp_path / "runs" / "r1" / "summary.json").write_text("{}")
    code, err = _run_main(monkeypatch, capsys, "train", *base, "--resume")
    assert code == 2 and err.count("\n") == 1
    assert f"{tmp_path / 'runs' / 'r1'}: the run has finished (summary.json); nothing to resume" in err
    code, err = _run_main(monkeypatch, capsys, "train", *base[:-1], "r2", "--set", f"train.pretrained={tmp_path}")
    assert code == 2 and err.count("\n") == 1 and "no pre-trained backbone found" in err
    assert not (tmp_path / "runs" / "r2").exists()


def test_a_bad_config_value_is_one_plain_line(monkeypatch, capsys):
    code, err = _run_main(monkeypatch, capsys, "train", "--set", "data.shape=[0,8,4]")
    assert code == 2 and err == "error: defaults + --set: data.shape: every axis must be >= 1 (got [0, 8, 4])\n"


def test_sweep_checks_space_experiment_and_dataset_before_ray_starts(dataset, tmp_path, monkeypatch, capsys):
    code, err = _run_main(monkeypatch, capsys, "sweep", str(tmp_path / "none.yaml"))
    assert code == 2 and err.count("\n") == 1 and "search-space file does not exist" in err

    space = {"name": "tiny", "dataset": str(tmp_path / "none"), "results_dir": str(tmp_path / "results"),
             "parameters": {"train.margin": {"type": "uniform", "low": 0.1, "high": 1.0}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(space))
    code, err = _run_main(monkeypatch, capsys, "sweep", str(path))
    assert code == 2 and err.count("\n") == 1 and "no such dataset directory" in err

    path.write_text(yaml.safe_dump({**space, "dataset": str(dataset)}))
    (tmp_path / "results" / "tiny").mkdir(parents=True)
    code, err = _run_main(monkeypatch, capsys, "sweep", str(path))
    assert code == 2 and err.count("\n") == 1 and "sweep exists; use --resume" in err
    code, err = _run_main(monkeypatch, capsys, "sweep", str(path), "--name", "other", "--resume")
    assert code == 2 and "no sweep to resume" in err
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["tiny"]


def test_ray_train_on_an_embedded_ray_refuses_no_dashboard(tmp_path, monkeypatch, capsys):
    # Without the dashboard's state API, Ray Train cannot free a stopped trial's workers (the
    # sweep stalls) and may take a healthy run's controller for dead, so the option is refused
    # before anything runs.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    missing = str(tmp_path / "none.yaml")
    for args, command in ((["sweep", missing, "--no-dashboard"], "a sweep"),
                          (["demo", "--dir", str(tmp_path / "d"), "--no-dashboard"], "a sweep"),
                          (["train", "-c", missing, "--no-dashboard"], "training"),
                          (["pretrain", "-c", missing, "--no-dashboard"], "pre-training")):
        code, err = _run_main(monkeypatch, capsys, *args)
        assert code == 2 and err.count("\n") == 1 and f"--no-dashboard: {command} needs the Ray dashboard" in err
    assert not (tmp_path / "d").exists()
    # A cluster has its own dashboard, and --data-only runs no sweep: the next check speaks.
    for args in (["sweep", missing, "--no-dashboard", "--address", "ray://head:10001"],
                 ["demo", "--dir", str(tmp_path / "d"), "--space", missing, "--no-dashboard", "--data-only"]):
        code, err = _run_main(monkeypatch, capsys, *args)
        assert code == 2 and "search-space file does not exist" in err


@pytest.mark.parametrize("name", ["", ".", "..", "../../escape", "/tmp/absolute"])
def test_run_and_sweep_names_stay_inside_their_output_directory(tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)
    code, err = _run_main(monkeypatch, capsys, "train", "--name", name)
    assert code == 2 and err.count("\n") == 1 and "name: must be one directory name" in err, err
    demo_space = str(Path(__file__).parents[2] / "search_spaces" / "demo.yaml")
    code, err = _run_main(monkeypatch, capsys, "sweep", demo_space, "--name", name, "--results-dir", str(tmp_path / "results"))
    assert code == 2 and err == f"error: --name {name!r}: must be one directory name: not empty, '.' or '..', " \
                                "no '/' or '\\'\n", err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_ctrl_c_during_training_says_how_to_resume(command, dataset, tmp_path, monkeypatch, capsys):
    from raytumor.train import trainer

    def interrupted_training(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "run_training", interrupted_training)
    code, err = _run_main(monkeypatch, capsys, command, "--set", f"data.dataset={dataset}",
                          "--set", f"output_dir={tmp_path / 'runs'}", "--name", "r 1", ray_session=_no_ray_needed)
    assert code == 130
    assert (f"training interrupted; {tmp_path / 'runs' / 'r 1'} keeps its checkpoints. Continue it with: "
            f"raytumor {command} --set data.dataset={dataset} --set output_dir={tmp_path / 'runs'} "
            f"--name 'r 1' --resume") in err


def test_ctrl_c_during_train_best_says_to_resume_it_as_the_sweeps_best(dataset, tmp_path, monkeypatch, capsys):
    """Resumed with -c best.yaml, the run was no longer recorded as the sweep's best (so a bare
    `raytumor evaluate` missed it) and lost the sweep's pre-training cache."""
    import ray

    from raytumor.train import trainer

    def interrupted_training(*args, **kwargs):
        raise KeyboardInterrupt

    results = tmp_path / "my results"
    (results / "exp").mkdir(parents=True)
    (results / "exp" / "best.yaml").write_text(yaml.safe_dump(
        {"name": "exp-best", "output_dir": str(tmp_path / "runs"), "data": {"dataset": str(dataset)}}))
    monkeypatch.setattr(trainer, "run_training", interrupted_training)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    code, err = _run_main(monkeypatch, capsys, "train", "--best", "--results-dir", str(results),
                          ray_session=_no_ray_needed)
    assert code == 130
    assert err.startswith("\ntraining interrupted; ")  # a line of its own, after any progress bar
    assert (f"Continue it with: raytumor train --best --from '{results / 'exp'}' --results-dir '{results}' "
            "--resume") in err


def test_ctrl_c_during_the_demo_says_the_same_command_continues(tmp_path, monkeypatch, capsys):
    from raytumor.data import demo

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "make_demo_dataset", interrupted)
    code, err = _run_main(monkeypatch, capsys, "demo", "--dir", str(tmp_path / "my demo"), "--seed", "3")
    assert code == 130
    assert err.startswith("\ndemo interrupted; its finished steps are kept. Continue it with the same command: "
                          f"raytumor demo --dir '{tmp_path / 'my demo'}' --seed 3\n")


def test_ctrl_c_during_a_sweep_says_how_to_resume(dataset, tmp_path, monkeypatch, capsys):
    from raytumor.sweep import run

    def interrupted_sweep(space, name, results_dir, resume, mlflow):
        raise run.SweepInterrupted(Path(results_dir) / name)

    space = {"name": "tiny", "dataset": str(dataset),
             "parameters": {"train.margin": {"type": "uniform", "low": 0.1, "high": 1.0}}}
    path = tmp_path / "my space.yaml"
    path.write_text(yaml.safe_dump(space))
    monkeypatch.setattr(run, "run_sweep", interrupted_sweep)
    code, err = _run_main(monkeypatch, capsys, "sweep", str(path), "--name", "a b",
                          "--results-dir", str(tmp_path / "results"), ray_session=_no_ray_needed)
    assert code == 130
    assert (f"sweep interrupted; its state is saved in {tmp_path / 'results' / 'a b' / 'tune'}; no best config "
            f"chosen. Continue it with: raytumor sweep '{path}' --resume --name 'a b' "
            f"--results-dir {tmp_path / 'results'}") in err


def test_a_sweep_resumes_only_with_the_space_and_base_it_started_with(dataset, tmp_path, monkeypatch, capsys):
    from ray import tune

    from raytumor.sweep.run import check_sweep

    space = {"name": "tiny", "dataset": str(dataset), "results_dir": str(tmp_path / "results"), "num_samples": 4,
             "base": {"train": {"epochs": 2}},
             "parameters": {"train.margin": {"type": "uniform", "low": 0.1, "high": 1.0}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(space))
    _, base_tree, experiment = check_sweep(path)
    experiment.mkdir(parents=True)  # what run_sweep records when the sweep starts
    (experiment / "space.yaml").write_text(path.read_text())
    (experiment / "base.yaml").write_text(yaml.safe_dump(base_tree))
    monkeypatch.setattr(tune.Tuner, "can_restore", staticmethod(lambda directory: True))

    path.write_text(yaml.safe_dump({**space, "name": "renamed"}))  # --name finds it; a name is not a setting
    check_sweep(path, name="tiny", resume=True)
    changed = {**space, "num_samples": 8, "base": {"train": {"epochs": 3}},
               "parameters": {"train.margin": {"type": "uniform", "low": 0.1, "high": 2.0}}}
    path.write_text(yaml.safe_dump(changed))
    code, err = _run_main(monkeypatch, capsys, "sweep", str(path), "--resume")
    assert code == 2 and err.count("\n") == 1
    assert (f"{path}: not the search space tiny started with (num_samples, parameters.train.margin.high, "
            f"base: train.epochs changed; it started with {experiment / 'space.yaml'})") in err


def test_a_sweep_checks_a_backbone_every_trial_uses_before_ray_starts(dataset, tmp_path, monkeypatch, capsys):
    (tmp_path / "damaged.pt").write_bytes(b"not a checkpoint")
    space = {"name": "tiny", "dataset": str(dataset), "results_dir": str(tmp_path / "results"),
             "base": {"train": {"pretrained": str(tmp_path / "damaged.pt")}},
             "parameters": {"train.margin": {"type": "uniform", "low": 0.1, "high": 1.0}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(space))
    code, err = _run_main(monkeypatch, capsys, "sweep", str(path))
    assert code == 2 and err.count("\n") == 1
    assert f"train.pretrained: {tmp_path / 'damaged.pt'}: not a loadable weights file" in err
    assert not (tmp_path / "results").exists()

    # Trials of another width each load it into their own encoder; nothing to check once for all.
    space["parameters"]["model.width"] = {"type": "choice", "values": [0.25, 0.5]}
    path.write_text(yaml.safe_dump(space))
    from raytumor.sweep.run import check_sweep

    check_sweep(path)


def test_pretraining_on_a_pool_without_masks_says_how_to_make_pseudo_masks(tmp_path, capsys):
    from raytumor.cli.train import note_pool_without_masks
    from raytumor.config import load_config
    from raytumor.data.manifest import read_manifest, write_manifest

    dataset = make_dataset(tmp_path / "ds", n_per_class=(3, 3), shape=(8, 8, 4), unlabelled=3)
    config = load_config(overrides=[f"data.dataset={dataset}", "pretrain.enabled=true"])
    note_pool_without_masks(config)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: 3 of 3 unlabelled case(s) have no mask")
    assert err.rstrip().endswith(f"raytumor masks train {dataset} && raytumor masks predict {dataset}")

    for overrides in (["pretrain.enabled=false"], ["pretrain.enabled=true", "pretrain.use_unlabelled=false"]):
        note_pool_without_masks(load_config(overrides=[f"data.dataset={dataset}", *overrides]))
        assert capsys.readouterr().err == ""
    manifest = read_manifest(dataset)
    pool = manifest["split"] == "unlabelled"
    manifest.loc[pool, "mask"], manifest.loc[pool, "mask_kind"] = manifest.loc[pool, "image"], "pseudo"
    write_manifest(dataset, manifest)
    note_pool_without_masks(config)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("space, notes", [("demo", False), ("pretrain_epochs", True), ("full", True),
                                          ("paper_table2", True)])
def test_a_sweep_that_may_pretrain_notes_the_pool_without_masks(space, notes, tmp_path, capsys):
    from raytumor.cli.sweep import _note_pool_without_masks
    from raytumor.sweep.space import load_search_space

    dataset = make_dataset(tmp_path / "ds", n_per_class=(3, 3), shape=(8, 8, 4), unlabelled=2)
    search_space, base_tree = load_search_space(Path(__file__).resolve().parents[2] / "search_spaces" / f"{space}.yaml")
    base_tree["data"]["dataset"] = str(dataset)
    _note_pool_without_masks(search_space, base_tree)
    err = capsys.readouterr().err
    assert err.startswith("note: 2 of 2 unlabelled case(s) have no mask") if notes else err == ""
