"""Pseudo masks: segmenter training, prediction on the original grid, manifest updates, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from raytumor.cli.masks import app
from raytumor.data.manifest import read_manifest, resolve_path, write_manifest
from raytumor.data.pseudo_masks import (
    PSEUDO_MASKS_DIR,
    SegmenterError,
    build_segmenter,
    predict_pseudo_masks,
    train_segmenter,
    unet_strides,
)
from raytumor.data.validate import check_case
from raytumor.errors import DatasetError, RaytumorError
from tests.conftest import blob_volume, make_dataset, write_nifti

SHAPE = (20, 20, 6)
SEGMENTER_SHAPE = (16, 16, 8)
EPOCHS = 30
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # On a small shared machine, spinning OpenMP threads make these tiny 3-D convs ~30x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[tuple[int, int, dict]]]:
    dataset = make_dataset(tmp_path_factory.mktemp("trained") / "ds", n_per_class=(6, 6), shape=SHAPE, unlabelled=3)
    calls = []
    train_segmenter(dataset, shape=SEGMENTER_SHAPE, epochs=EPOCHS, lr=1e-2, seed=0,
                    progress=lambda epoch, total, metrics: calls.append((epoch, total, metrics)))
    return dataset, calls


@pytest.fixture
def dataset(trained, tmp_path) -> Path:
    """A private copy of the trained dataset, so each test can write masks into it."""
    return Path(shutil.copytree(trained[0], tmp_path / "ds"))


class IntensityThreshold(torch.nn.Module):
    """A stand-in user model: logits high where the normalised image is bright (the blob)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 1.5) * 10.0


def save_threshold_model(path: Path) -> Path:
    torch.jit.save(torch.jit.script(IntensityThreshold()), str(path))
    return path


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def unlabelled_truth(k: int) -> np.ndarray:
    """The blob mask conftest drew for unlabelled case ``u{k:03d}``."""
    return blob_volume(SHAPE, seed=1000 + k)[1]


@pytest.mark.parametrize("shape", [(16, 16, 8), (20, 20, 6), (12, 10, 5), (16, 16, 1)])
def test_unet_keeps_every_shape_including_thin_and_odd_depths(shape):
    model = build_segmenter(shape, (4, 8, 16)).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 1, *shape)).shape == (2, 1, *shape)
    assert unet_strides((16, 16, 6), 3) == [(2, 2, 2), (2, 2, 1)]


def test_training_segments_the_blobs_and_saves_torchscript_with_meta(trained):
    dataset, calls = trained
    meta = json.loads((dataset / "segmenter" / "meta.json").read_text())
    assert [c[0] for c in calls] == list(range(1, EPOCHS + 1)) and all(c[1] == EPOCHS for c in calls)
    losses = [c[2]["loss"] for c in calls]
    assert losses[-1] < 0.5 * losses[0]
    assert meta["best_val_dice"] == max(c[2]["val_dice"] for c in calls)
    # An all-background predictor scores 0 and the blobs are easy: the segmenter must be far above that.
    assert meta["best_val_dice"] > 0.6
    assert meta["dice_on"] == "val" and meta["n_val"] == 2 and meta["n_train"] == 8
    assert meta["shape"] == list(SEGMENTER_SHAPE) and meta["threshold"] == 0.5
    model = torch.jit.load(str(dataset / "segmenter" / "model.ts"))
    assert model(torch.zeros(1, 1, *SEGMENTER_SHAPE)).shape == (1, 1, *SEGMENTER_SHAPE)
    assert not [p for p in (dataset).iterdir() if ".tmp-" in p.name]


def test_predict_writes_a_checked_pseudo_mask_per_unlabelled_case(dataset):
    before = read_manifest(dataset)
    seen = []
    summary = predict_pseudo_masks(dataset, progress=lambda done, total: seen.append((done, total)))
    assert (summary.n_predicted, summary.n_kept, summary.problems) == (3, 0, [])
    assert seen[-1] == (3, 3)
    assert 0.0 < summary.mean_tumour_fraction < 0.5

    after = read_manifest(dataset)
    unlabelled = after[after["split"] == "unlabelled"]
    assert set(unlabelled["mask_kind"]) == {"pseudo"}
    assert list(unlabelled["mask"]) == [f"{PSEUDO_MASKS_DIR}/u{k:03d}.nii.gz" for k in range(3)]
    labelled = after["split"] != "unlabelled"
    assert after[labelled].equals(before[labelled])

    for k, row in enumerate(unlabelled.itertuples(index=False)):
        image, mask = check_case(resolve_path(dataset, row.image), resolve_path(dataset, row.mask))
        stored = nib.load(resolve_path(dataset, row.mask))
        assert stored.get_data_dtype() == np.uint8
        assert mask.data.shape == image.data.shape and np.array_equal(mask.affine, image.affine)
        assert set(np.unique(mask.data)) <= {0.0, 1.0}
        assert dice(mask.data, unlabelled_truth(k)) > 0.5


def test_second_run_keeps_existing_pseudo_masks_unless_overwrite(dataset):
    predict_pseudo_masks(dataset)
    files = sorted((dataset / PSEUDO_MASKS_DIR).iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    manifest_stamp = (dataset / "manifest.parquet").stat().st_mtime_ns

    again = predict_pseudo_masks(dataset)
    assert (again.n_predicted, again.n_kept) == (0, 3)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert (dataset / "manifest.parquet").stat().st_mtime_ns == manifest_stamp

    redone = predict_pseudo_masks(dataset, overwrite=True)
    assert (redone.n_predicted, redone.n_kept) == (3, 0)


def test_masks_another_model_or_threshold_made_are_predicted_again(dataset, tmp_path):
    predict_pseudo_masks(dataset)
    record = json.loads((dataset / PSEUDO_MASKS_DIR / "made_by.json").read_text())
    assert sorted(record) == ["u000", "u001", "u002"] and len(set(record.values())) == 1

    # Another model (a retrained segmenter, or --model): every earlier mask is replaced.
    user_model = save_threshold_model(tmp_path / "user.ts")
    other = predict_pseudo_masks(dataset, model_path=user_model, shape=SEGMENTER_SHAPE)
    assert (other.n_predicted, other.n_replaced, other.n_kept) == (3, 3, 0)
    assert "3 of them replace masks another model made" in other.summary()
    assert predict_pseudo_masks(dataset, model_path=user_model, shape=SEGMENTER_SHAPE).n_kept == 3
    # The same model at another threshold, or another input shape, makes other masks too.
    assert predict_pseudo_masks(dataset, model_path=user_model, shape=SEGMENTER_SHAPE, threshold=0.7).n_replaced == 3
    assert predict_pseudo_masks(dataset, model_path=user_model, shape=(20, 20, 6), threshold=0.7).n_replaced == 3

    # Masks with no record (written before there was one) cannot be vouched for: predicted again.
    (dataset / PSEUDO_MASKS_DIR / "made_by.json").unlink()
    unknown = predict_pseudo_masks(dataset, model_path=user_model, shape=(20, 20, 6), threshold=0.7)
    assert (unknown.n_predicted, unknown.n_replaced) == (3, 3)
    # --overwrite predicts again whoever made them; that is no replacement of another model's.
    redone = predict_pseudo_masks(dataset, model_path=user_model, shape=(20, 20, 6), threshold=0.7, overwrite=True)
    assert (redone.n_predicted, redone.n_replaced) == (3, 0)


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("P", "I", "R")])
def test_mask_of_a_non_ras_image_is_in_the_image_orientation_on_the_blob(dataset, tmp_path, codes):
    # The blob is placed in stored voxel order, off-centre, so a mask left in RAS order misses it.
    image, blob = blob_volume((20, 16, 6), centre=(5, 11, 2), radius=3.0, seed=7)
    affine = np.eye(4)
    affine[:3, :3] = 0
    for axis, (world, flip) in enumerate(nib.orientations.axcodes2ornt(codes)):
        affine[int(world), axis] = 2.0 * flip
    write_nifti(dataset / "unlabelled" / "odd.nii.gz", image, affine)
    manifest = read_manifest(dataset)
    odd = manifest[manifest["case_id"] == "u000"].assign(case_id="odd", image="unlabelled/odd.nii.gz")
    write_manifest(dataset, pd.concat([manifest, odd], ignore_index=True))

    model = save_threshold_model(tmp_path / "user.ts")
    summary = predict_pseudo_masks(dataset, model_path=model, shape=(16, 16, 8))
    assert summary.n_predicted == 4
    image_volume, mask = check_case(str(dataset / "unlabelled" / "odd.nii.gz"), str(dataset / PSEUDO_MASKS_DIR / "odd.nii.gz"))
    assert mask.orientation == "".join(codes) == image_volume.orientation
    assert np.array_equal(mask.affine, image_volume.affine)
    assert dice(mask.data, blob) > 0.7
    assert dice(mask.data[::-1, ::-1], blob) < 0.2


def test_user_torchscript_model_is_used_and_needs_a_shape_without_meta(dataset, tmp_path):
    model = save_threshold_model(tmp_path / "user.ts")
    with pytest.raises(SegmenterError, match="--shape"):
        predict_pseudo_masks(dataset, model_path=model)
    summary = predict_pseudo_masks(dataset, model_path=model, shape=SHAPE)
    assert summary.n_predicted == 3
    for k in range(3):
        mask = nib.load(str(dataset / PSEUDO_MASKS_DIR / f"u{k:03d}.nii.gz")).get_fdata()
        assert dice(mask, unlabelled_truth(k)) > 0.8


def test_model_returning_the_wrong_shape_is_a_user_error(dataset, tmp_path):
    class Pooled(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3, 4), keepdim=True)

    path = tmp_path / "pooled.ts"
    torch.jit.save(torch.jit.script(Pooled()), str(path))
    with pytest.raises(SegmenterError, match=r"pooled.ts: segmentation model returned \(1, 1, 1, 1, 1\)"):
        predict_pseudo_masks(dataset, model_path=path, shape=SHAPE)
    assert read_manifest(dataset)["mask_kind"].eq("pseudo").sum() == 0


def test_unreadable_unlabelled_image_is_skipped_and_reported(dataset):
    broken = dataset / "unlabelled" / "u001.nii.gz"
    broken.write_bytes(broken.read_bytes()[:100])
    summary = predict_pseudo_masks(dataset)
    assert summary.n_predicted == 2 and summary.n_skipped == 1
    assert summary.problems[0].case_id == "u001" and "u001.nii.gz" in summary.problems[0].file
    row = read_manifest(dataset).set_index("case_id").loc["u001"]
    assert row["mask"] is None and row["mask_kind"] is None
    assert "1 case(s) skipped" in summary.summary()


def test_missing_or_broken_model_and_missing_masks_are_user_errors(tmp_path):
    dataset = make_dataset(tmp_path / "ds", n_per_class=(3, 3), shape=SHAPE, unlabelled=1)
    with pytest.raises(RaytumorError, match="segmenter/model.ts: no segmentation model"):
        predict_pseudo_masks(dataset)
    broken = tmp_path / "broken.ts"
    broken.write_bytes(b"not a model")
    with pytest.raises(RaytumorError, match="broken.ts: not a loadable TorchScript model"):
        predict_pseudo_masks(dataset, model_path=broken, shape=SHAPE)

    manifest = read_manifest(dataset)
    manifest["mask"] = None
    manifest["mask_kind"] = None
    write_manifest(dataset, manifest)
    with pytest.raises(DatasetError, match="no labelled train cases with a ground-truth mask"):
        train_segmenter(dataset, shape=SEGMENTER_SHAPE, epochs=1)


def test_diverging_training_fails_and_keeps_the_existing_segmenter(dataset):
    before = {p.name: p.read_bytes() for p in (dataset / "segmenter").iterdir()}
    # A finite but absurd learning rate: the weights overflow and the loss turns NaN.
    with pytest.raises(RaytumorError) as info:
        train_segmenter(dataset, shape=SEGMENTER_SHAPE, epochs=2, lr=1e30, channels=(2, 4))
    message = str(info.value)
    assert "\n" not in message and str(dataset) in message and "diverged" in message and "loss nan" in message
    assert {p.name: p.read_bytes() for p in (dataset / "segmenter").iterdir()} == before
    assert not [p for p in dataset.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("lr", ["inf", "-inf", "nan", "0", "-1e-3"])
def test_cli_train_refuses_a_non_finite_or_non_positive_lr_before_drawing_its_bar(tmp_path, monkeypatch, lr):
    import raytumor.data.pseudo_masks as pseudo_masks

    monkeypatch.setattr(pseudo_masks, "train_segmenter", lambda *a, **k: pytest.fail("trained with a bad --lr"))
    dataset = tmp_path / "ds"  # no dataset needed: the option fails first
    result = runner.invoke(app, ["train", str(dataset), "--lr", lr], env={"COLUMNS": "200"})
    assert isinstance(result.exception, RaytumorError)
    message = str(result.exception)
    assert "\n" not in message and message.startswith("--lr:") and "finite number > 0" in message
    assert result.output == ""
    with pytest.raises(RaytumorError, match="finite number > 0"):
        train_segmenter(dataset, lr=float(lr))


def test_cli_train_checks_the_dataset_before_drawing_its_bar(tmp_path):
    result = runner.invoke(app, ["train", str(tmp_path / "nope")], env={"COLUMNS": "200"})
    assert isinstance(result.exception, DatasetError) and "nope" in str(result.exception)
    assert result.output == ""


def test_cli_train_help_gives_the_lr_bound_that_is_enforced():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    help_text = " ".join(result.output.split())
    assert "finite number > 0" in help_text and "x>=0.0" not in help_text


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["predict", "--help"]])
def test_cli_help(args):
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_cli_predict_without_a_model_fails_with_one_line_error(tmp_path):
    dataset = make_dataset(tmp_path / "ds", n_per_class=(3, 3), shape=SHAPE, unlabelled=1)
    result = runner.invoke(app, ["predict", str(dataset)])
    assert result.exit_code != 0
    assert isinstance(result.exception, RaytumorError)
    message = str(result.exception)
    assert "\n" not in message and "model.ts" in message and "raytumor masks train" in message


def test_cli_train_then_predict(tmp_path):
    dataset = make_dataset(tmp_path / "ds", n_per_class=(3, 3), shape=SHAPE, unlabelled=2)
    result = runner.invoke(app, ["train", str(dataset), "--shape", "16,16,8", "--epochs", "2", "--channels", "4,8"])
    assert result.exit_code == 0, result.output
    assert "segmenter saved" in result.output and "val Dice" in result.output
    result = runner.invoke(app, ["predict", str(dataset), "--threshold", "0.5"])
    assert result.exit_code == 0, result.output
    assert "2 pseudo mask(s) written" in result.output
    bad = runner.invoke(app, ["train", str(dataset), "--shape", "16,16"])
    assert bad.exit_code != 0 and "--shape" in str(bad.exception)
