"""``raytumor data ...``: exit codes, one-line user errors, help texts."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from raytumor import runtime
from raytumor.cli import app, main
from raytumor.data.manifest import read_manifest, write_manifest
from raytumor.errors import RaytumorError
from tests.conftest import blob_volume, make_dataset, shard_count, write_nifti

SHAPE = (12, 12, 4)
WIDE = {"COLUMNS": "250"}  # rich tables must not wrap case ids and reasons
runner = CliRunner()

DATA_COMMANDS = ["demo", "import-folder", "import-brats", "import-figshare", "import-unlabelled", "validate", "split",
                 "prepare"]


def _no_ray(*args, **kwargs):
    raise AssertionError("Ray was started")


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "ds", n_per_class=(3, 3, 3), shape=SHAPE)


def _run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the real entry point in-process: its exit code, stdout and stderr."""
    monkeypatch.setattr(sys, "argv", ["raytumor", *args])
    with pytest.raises(SystemExit) as info:
        main()
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


@pytest.mark.parametrize("command", DATA_COMMANDS)
def test_help_of_each_data_command(command):
    result = runner.invoke(app, ["data", command, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and command in result.output


def test_data_help_lists_commands():
    result = runner.invoke(app, ["data", "--help"], env=WIDE)
    assert result.exit_code == 0
    for command in DATA_COMMANDS:
        assert command in result.output


def test_validate_good_dataset_exits_0(dataset):
    result = runner.invoke(app, ["data", "validate", str(dataset)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "9 of 9 cases valid" in result.output


def test_validate_bad_case_exits_1_and_names_it(dataset):
    image, _ = blob_volume(SHAPE)
    image[2, 2, 2] = float("nan")
    write_nifti(dataset / "images" / "broken.nii.gz", image)
    manifest = read_manifest(dataset)
    extra = dict(case_id="broken-case", image="images/broken.nii.gz", mask=None, label=1, label_name="type1",
                 patient_id=None, split="train", source="test", mask_kind=None)
    write_manifest(dataset, pd.concat([manifest, pd.DataFrame([extra])], ignore_index=True))

    result = runner.invoke(app, ["data", "validate", str(dataset)], env=WIDE)
    assert result.exit_code == 1, result.output
    line = next(line for line in result.output.splitlines() if "broken-case" in line)
    assert "broken.nii.gz" in line and "1 NaN/Inf voxel(s)" in line
    assert "9 of 10 cases valid, 1 quarantined" in result.output


def test_bad_split_value_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "labels.csv").write_text("case_id,image,label\n")
    args = ["data", "import-folder", str(tmp_path / "src"), "--labels", str(tmp_path / "labels.csv"),
            "--out", str(tmp_path / "ds"), "--split", "0.8,0.1"]

    result = runner.invoke(app, args)
    assert isinstance(result.exception, RaytumorError) and "--split" in str(result.exception)

    code, _, err = _run_main(monkeypatch, capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: --split: expected three positive fractions")
    assert "0.8,0.1" in err and "Traceback" not in err
    assert not (tmp_path / "ds").exists()


def test_import_folder_via_cli(tmp_path):
    src = tmp_path / "src"
    rows = []
    for k in range(6):
        write_nifti(src / f"s{k}.nii.gz", blob_volume(SHAPE, seed=k)[0])
        rows.append(dict(case_id=f"s{k}", image=f"s{k}.nii.gz", label=k % 2))
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    result = runner.invoke(app, ["data", "import-folder", str(src), "--labels", str(tmp_path / "labels.csv"),
                                 "--out", str(tmp_path / "ds"), "--rare-classes", "1"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "imported 6 case(s)" in result.output
    assert len(read_manifest(tmp_path / "ds")) == 6


def test_import_unlabelled_twice_is_a_one_line_error(dataset, tmp_path, monkeypatch, capsys):
    write_nifti(tmp_path / "pool" / "a.nii.gz", blob_volume(SHAPE, seed=5)[0])
    args = ["data", "import-unlabelled", str(tmp_path / "pool"), "--into", str(dataset)]
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 0 and "imported 1 case(s)" in result.output
    code, _, err = _run_main(monkeypatch, capsys, *args)
    assert code == 2 and err.count("\n") == 1 and "already in the manifest" in err


def test_import_brats_via_cli_then_its_pool(tmp_path, monkeypatch, capsys):
    from tests.data.test_brats import brats_2019, write_case

    src = brats_2019(tmp_path / "src", per_grade=3)
    args = ["data", "import-brats", str(src), "--out", str(tmp_path / "ds"), "--modality", "flair", "--label-from", "folder"]
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 0, result.output
    assert f"imported 6 case(s) into {tmp_path / 'ds'}" in result.output
    manifest = read_manifest(tmp_path / "ds")
    assert manifest["image"].str.endswith("_flair.nii.gz").all() and set(manifest["label_name"]) == {"HGG", "LGG"}

    write_case(tmp_path / "pool" / "p1", "p1", seed=7)
    result = runner.invoke(app, ["data", "import-unlabelled", str(tmp_path / "pool"), "--into", str(tmp_path / "ds"),
                                 "--modality", "t2f"], env=WIDE)
    assert result.exit_code == 0 and "imported 1 case(s)" in result.output
    assert read_manifest(tmp_path / "ds")["image"].iloc[-1].endswith("p1_flair.nii.gz")

    code, _, err = _run_main(monkeypatch, capsys, "data", "import-brats", str(src), "--out", str(tmp_path / "ds2"),
                             "--modality", "dwi")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: modality 'dwi': not one of t1, t1ce, t2, flair")
    assert not (tmp_path / "ds2").exists()


@pytest.mark.ray
def test_prepare_via_cli_with_blocks_per_cpu(ray_local, dataset, monkeypatch, capsys):
    args = ["data", "prepare", str(dataset), "--shape", "8,8,4", "--blocks-per-cpu", "2"]
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 0, result.output
    assert "prepared 9 case(s), 0 quarantined" in result.output
    shards = list((dataset / "prepared").glob("8x8x4-*/shards/*.parquet"))
    # 9 cases in 2 blocks per CPU, one task each: the batch (one shard) shrinks to the
    # smallest block, so that Ray Data does not merge blocks smaller than a batch.
    blocks = min(9, 2 * int(ray_local.cluster_resources()["CPU"]))
    assert len(shards) == shard_count(9, blocks, 9 // blocks)

    code, _, err = _run_main(monkeypatch, capsys, "data", "prepare", str(dataset), "--blocks-per-cpu", "0")
    assert code == 2 and "--blocks-per-cpu" in err and "Traceback" not in err

    # The second run is a cache hit, answered without starting (or joining) a Ray.
    monkeypatch.setattr(runtime, "ray_session", _no_ray)
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 0, result.output
    assert "prepared 9 case(s), 0 quarantined (cache hit, nothing to do)" in result.output


def test_prepare_of_a_missing_dataset_fails_before_ray_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "ray_session", _no_ray)
    code, _, err = _run_main(monkeypatch, capsys, "data", "prepare", str(tmp_path / "none"), "--force")
    assert code == 2 and err.count("\n") == 1 and "no such dataset directory" in err


def test_os_errors_about_a_path_are_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("")
    code, _, err = _run_main(monkeypatch, capsys, "data", "demo", str(tmp_path / "a-file" / "demo"), "--scale", "0.01")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {tmp_path / 'a-file'}: ") and "Traceback" not in err


def test_prepare_with_no_cpus_or_no_cluster_fails_at_once(dataset, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "start_embedded_ray", _no_ray)
    monkeypatch.setattr("ray.init", _no_ray)
    monkeypatch.setattr("ray.is_initialized", lambda: False)
    code, _, err = _run_main(monkeypatch, capsys, "data", "prepare", str(dataset), "--num-cpus", "0", "--force")
    assert code == 2 and err == "error: --num-cpus 0: must be at least 1 (every Ray task needs a CPU; with none, Ray " \
                               "waits for one forever)\n"
    address = f"127.0.0.1:{runtime._unused_port()}"
    code, _, err = _run_main(monkeypatch, capsys, "data", "prepare", str(dataset), "--address", address, "--force")
    assert code == 2 and err.count("\n") == 1 and f"Ray cluster at {address}: nothing answers there" in err


def test_split_keeps_existing_unless_force(dataset):
    before = read_manifest(dataset)["split"].tolist()
    result = runner.invoke(app, ["data", "split", str(dataset), "--seed", "9"])
    assert result.exit_code == 0, result.output
    assert read_manifest(dataset)["split"].tolist() == before
    result = runner.invoke(app, ["data", "split", str(dataset), "--seed", "9", "--force"])
    assert result.exit_code == 0, result.output
    assert "train" in result.output


def test_entry_point_prints_one_error_line_for_a_bad_dataset(tmp_path):
    missing = tmp_path / "no-such-dataset"
    proc = subprocess.run(
        [sys.executable, "-c", "from raytumor.cli import main; main()", "data", "validate", str(missing)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and str(missing) in lines[0]
    assert proc.stdout == ""  # no empty progress bar drawn before the error


@pytest.mark.parametrize("group", [[], ["data"], ["masks"], ["index"]])
def test_command_lists_show_each_whole_summary_and_flags_no_type(group):
    result = runner.invoke(app, [*group, "--help"])
    assert result.exit_code == 0, result.output
    listing = " ".join(result.output.split("Commands:")[1].split())
    assert "..." not in listing  # click cut summaries at ~45 characters without short_help
    if not group:
        assert "data Datasets: import, demo data, validation, preprocessing cache, rare-case augmentation." in listing
        assert "sweep Sweep a search space with Ray Tune + Optuna (TPE, seeded) and ASHA, selecting by validation " \
               "Recall_M." in listing
    flags = runner.invoke(app, ["train", "--help"]).output
    assert "<bool>" not in flags and "--resume   " in flags and "-s, --set KEY=VALUE" in flags


@pytest.mark.parametrize("command, sentence", [
    ("train", "the best model by val Recall_M"),
    ("sweep", "trains through the same trainer builder as `raytumor train`"),
    ("evaluate", "Rank-5 and, for classifier models, Acc_clf"),
    ("search", "resized to the run's shape"),
    ("sweep-report", "from the experiment's leaderboard"),
])
def test_help_paragraphs_are_refilled_to_the_help_width(command, sentence):
    # The docstrings are wrapped at ~90 characters; click refills each paragraph to its 80
    # columns, so no docstring line break shows and no line runs over.
    result = runner.invoke(app, [command, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert sentence in " ".join(result.output.split())
    lines = result.output.splitlines()
    assert max(map(len, lines)) <= 80
    description = lines[2:lines.index("Options:") if "Arguments:" not in lines else lines.index("Arguments:")]
    for line, after in zip(description, description[1:]):
        if line.strip() and after.strip():  # a line within a paragraph is full: the next word did not fit
            assert len(line) + 1 + len(after.split()[0]) > 78, (line, after)
