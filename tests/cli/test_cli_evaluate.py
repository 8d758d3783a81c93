"""``raytumor evaluate``, ``raytumor index build``, ``raytumor search``: help, outputs, one-line errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
import typer
from typer.testing import CliRunner

from raytumor.cli import evaluate as evaluate_cli
from raytumor.data.manifest import read_manifest, resolve_path
from raytumor.errors import RaytumorError
from tests.conftest import blob_volume, write_nifti
from tests.data.bad_volumes import write_truncated
from tests.evaluate.test_report import make_eval_dataset, make_run

WIDE = {"COLUMNS": "250"}  # rich tables must not wrap case ids
runner = CliRunner()

# The registration the main app uses (see raytumor/cli/evaluate.py).
app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
app.command("evaluate")(evaluate_cli.evaluate)
app.add_typer(evaluate_cli.index_app, name="index")
app.command("search")(evaluate_cli.search)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-eval")
    dataset = make_eval_dataset(root / "ds", n_per_class=(5, 5, 5))
    return {
        "root": root,
        "dataset": dataset,
        "triplet": make_run(root / "runs", dataset, "bh", pretrain="ntxent", seed=5),
        "ce": make_run(root / "runs", dataset, "ce", loss="cross_entropy", seed=6),
    }


@pytest.mark.parametrize("command", [["evaluate"], ["index", "build"], ["search"]])
def test_help_of_each_command(command):
    result = runner.invoke(app, [*command, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and command[-1] in result.output


def test_importing_the_cli_module_loads_no_heavy_library():
    code = ("import sys, raytumor.cli.evaluate; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'ray', 'pyarrow') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_registered_in_the_main_app():
    from raytumor.cli import app as main_app

    names = {c.name for c in main_app.registered_commands} | {g.name for g in main_app.registered_groups}
    if not {"evaluate", "index", "search"} <= names:
        pytest.skip("raytumor.cli does not register evaluate/index/search yet")
    for command in (["evaluate"], ["index", "build"], ["search"]):
        assert runner.invoke(main_app, [*command, "--help"]).exit_code == 0


def test_evaluate_two_runs_prints_table_and_never_overwrites(runs, tmp_path):
    out = tmp_path / "cmp"
    args = ["evaluate", str(runs["triplet"]), str(runs["ce"]), "--out", str(out), "--examples", "1"]
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["row_name"] for r in metrics["runs"]] == ["NTXent-None-BHTriplet", "None-None-CrossEntropy"]
    for run in metrics["runs"]:
        line = next(line for line in result.output.splitlines() if run["row_name"] in line)
        assert f"{run['recall_macro']:.4f}" in line and f"{run['rank5']:.4f}" in line
    assert str(out / "report.html") in result.output.replace("\n", "")
    # Same --out again: refused, the first report untouched.
    before = (out / "metrics.json").read_bytes()
    again = runner.invoke(app, args, env=WIDE)
    assert again.exit_code != 0 and isinstance(again.exception, RaytumorError)
    assert "not empty" in str(again.exception) and "\n" not in str(again.exception)
    assert (out / "metrics.json").read_bytes() == before


@pytest.mark.parametrize("bad", ["missing", "unfinished"])
def test_evaluate_checks_every_run_before_embedding_any(runs, tmp_path, monkeypatch, bad):
    import raytumor.evaluate.embeddings as embeddings

    embedded = []
    monkeypatch.setattr(embeddings, "embed_run", lambda run, **kwargs: embedded.append(run))
    second = tmp_path / "run-2"
    if bad == "unfinished":
        second.mkdir()  # a run directory without best_model.pt
    result = runner.invoke(app, ["evaluate", str(runs["triplet"]), str(second), "--out", str(tmp_path / "r")], env=WIDE)
    assert result.exit_code != 0 and isinstance(result.exception, RaytumorError)
    message = str(result.exception)
    assert str(second) in message and "\n" not in message
    assert ("no such run directory" if bad == "missing" else "finished training run") in message
    assert embedded == [] and not (tmp_path / "r").exists()


def test_evaluate_default_location_is_a_new_dir_each_time(runs):
    for _ in range(2):
        result = runner.invoke(app, ["evaluate", str(runs["triplet"]), "--k", "3", "--examples", "0"], env=WIDE)
        assert result.exit_code == 0, result.output
    reports = sorted(p for p in (runs["triplet"] / "reports").iterdir())
    assert len(reports) == 2
    assert all(json.loads((p / "metrics.json").read_text())["runs"][0]["k"] == 3 for p in reports)


def test_index_build_then_search_a_scan_and_a_folder(runs, tmp_path):
    run = runs["triplet"]
    result = runner.invoke(app, ["index", "build", str(run)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "indexed 15 labelled case(s)" in result.output and (run / "index" / "meta.json").is_file()

    manifest = read_manifest(runs["dataset"])
    case = manifest[manifest["split"] == "train"].iloc[0]
    image, mask = resolve_path(runs["dataset"], case["image"]), resolve_path(runs["dataset"], case["mask"])
    result = runner.invoke(app, ["search", str(run), image, "--mask", mask, "--top", "3"], env=WIDE)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.strip().startswith("│")]
    assert case["case_id"] in rows[0] and case["label_name"] in rows[0] and len(rows) == 3

    folder = tmp_path / "scans"
    for k in range(2):
        write_nifti(folder / f"s{k}.nii.gz", blob_volume((12, 12, 4), seed=50 + k)[0])
    target = tmp_path / "out.csv"
    result = runner.invoke(app, ["search", str(run), str(folder), "--csv", str(target)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert f"matches written to {target}" in result.output.replace("\n", "")
    with open(target) as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 10 and {r["query"] for r in table} == {str(folder / "s0.nii.gz"), str(folder / "s1.nii.gz")}
    # Without --csv the batch goes to a fresh file under the run.
    result = runner.invoke(app, ["search", str(run), str(folder), "--top", "1"], env=WIDE)
    assert result.exit_code == 0, result.output
    [written] = list((run / "searches").glob("scans-*.csv"))
    assert str(written) in result.output.replace("\n", "")


def test_search_builds_a_missing_index(runs, tmp_path):
    run = runs["ce"]
    assert not (run / "index").exists()
    path = write_nifti(tmp_path / "q.nii.gz", blob_volume((12, 12, 4), seed=77)[0])
    result = runner.invoke(app, ["search", str(run), str(path)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "built the retrieval index (15 labelled cases)" in result.output
    assert (run / "index" / "meta.json").is_file()


def test_search_on_a_corrupt_file_is_a_one_line_error(runs, tmp_path, monkeypatch, capsys):
    bad, _ = write_truncated(tmp_path)
    result = runner.invoke(app, ["search", str(runs["triplet"]), str(bad)])
    assert isinstance(result.exception, RaytumorError)
    message = str(result.exception)
    assert "\n" not in message and message.startswith(str(bad)) and "truncated" in message
    # Through an entry point like raytumor.cli.main: one line on stderr, exit code 2, no traceback.
    from raytumor.cli import main

    monkeypatch.setattr("raytumor.cli.app", app)
    monkeypatch.setattr(sys, "argv", ["raytumor", "search", str(runs["triplet"]), str(bad)])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and str(bad) in err
    assert "Traceback" not in err


def test_search_of_a_folder_skips_bad_scans_writes_the_rest_and_lists_them(runs, tmp_path):
    folder = tmp_path / "scans"
    for name in ("a.nii.gz", "c.nii.gz"):
        write_nifti(folder / name, blob_volume((12, 12, 4), seed=len(name))[0])
    four_d = write_nifti(folder / "b_4d.nii.gz", torch.ones(6, 6, 4, 3).numpy())
    target = tmp_path / "out" / "matches.csv"
    result = runner.invoke(app, ["search", str(runs["triplet"]), str(folder), "--csv", str(target), "--top", "2"],
                           env=WIDE)
    assert result.exit_code == 1, result.output
    with open(target) as handle:
        matches = list(csv.DictReader(handle))
    assert [r["query"] for r in matches] == [str(folder / "a.nii.gz")] * 2 + [str(folder / "c.nii.gz")] * 2
    quarantine = tmp_path / "out" / "matches-quarantine.csv"
    with open(quarantine) as handle:
        [bad] = list(csv.DictReader(handle))
    assert bad["query"] == bad["file"] == str(four_d) and "4-D image" in bad["reason"]
    assert str(four_d) in result.stderr and "4-D image" in result.stderr
    assert "1 of 3 scan(s) bad" in result.stderr and str(quarantine) in result.stderr.replace("\n", "")
    assert f"matches written to {target}" in result.stdout.replace("\n", "")
    # Searched again without the bad scan: no quarantine list left from before.
    four_d.unlink()
    again = runner.invoke(app, ["search", str(runs["triplet"]), str(folder), "--csv", str(target)], env=WIDE)
    assert again.exit_code == 0, again.output
    assert not quarantine.exists() and not again.stderr

    # The same bad scan given alone: a one-line error, nothing written.
    write_nifti(four_d, torch.ones(6, 6, 4, 3).numpy())
    alone = runner.invoke(app, ["search", str(runs["triplet"]), str(four_d), "--csv", str(tmp_path / "alone.csv")])
    assert isinstance(alone.exception, RaytumorError)
    message = str(alone.exception)
    assert "\n" not in message and message.startswith(str(four_d)) and "4-D image" in message
    assert not (tmp_path / "alone.csv").exists()


def test_search_help_says_when_the_exit_code_is_1():
    result = runner.invoke(app, ["search", "--help"], env=WIDE)
    assert result.exit_code == 0
    assert "exit code is 1" in " ".join(result.output.split())


def test_evaluate_without_runs_finds_the_best_run_recorded_in_results_dir(runs, tmp_path, monkeypatch):
    from raytumor.sweep.run import record_best_run

    monkeypatch.chdir(tmp_path)  # no ./results here
    record_best_run(str(tmp_path / "res"), runs["ce"])  # what `raytumor train --best --results-dir res` does
    result = runner.invoke(app, ["evaluate", "--results-dir", str(tmp_path / "res"), "--out", "r", "--examples", "0"],
                           env=WIDE)
    assert result.exit_code == 0, result.output
    [evaluated] = json.loads((tmp_path / "r" / "metrics.json").read_text())["runs"]
    assert evaluated["run_dir"] == str(runs["ce"].resolve())
    default = runner.invoke(app, ["evaluate", "--out", "r2"], env=WIDE)
    assert isinstance(default.exception, RaytumorError)
    assert "no `raytumor train --best` run recorded in results (--results-dir)" in str(default.exception)


def test_evaluate_notes_a_k_clamped_to_the_reference_set(runs, tmp_path):
    result = runner.invoke(app, ["evaluate", str(runs["triplet"]), "--k", "1000", "--out", str(tmp_path / "r"),
                                 "--examples", "0"], env=WIDE)
    assert result.exit_code == 0, result.output
    [metrics] = json.loads((tmp_path / "r" / "metrics.json").read_text())["runs"]
    assert metrics["k_requested"] == 1000 and metrics["k"] == metrics["n_reference"] < 1000
    [note] = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert f"--k 1000 is more than the {metrics['n_reference']} train+val reference cases" in note
    assert f"K = {metrics['k']} used" in note
    unclamped = runner.invoke(app, ["evaluate", str(runs["triplet"]), "--k", "3", "--out", str(tmp_path / "r3"),
                                    "--examples", "0"], env=WIDE)
    assert unclamped.exit_code == 0 and "note:" not in unclamped.output
