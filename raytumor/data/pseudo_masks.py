"""Pseudo tumour masks for the unlabelled pool, from a segmentation network.

The paper pre-trains on unlabelled scans with "a pseudo ground truth segmentation mask using a
pre-trained tumor segmentation model", so that pre-training sees the tumour site. Here:

* :func:`train_segmenter` fits a MONAI 3-D UNet on the ground-truth masks of the labelled
  train split (validation Dice on the val split) and saves it as TorchScript with
  ``meta.json`` in ``DATASET/segmenter/``;
* :func:`predict_pseudo_masks` runs that model, or any user-supplied TorchScript model mapping
  a ``(B, 1, X, Y, Z)`` normalised RAS image to ``(B, 1, X, Y, Z)`` logits, on every unlabelled
  case without a mask, writes ``DATASET/pseudo_masks/<case_id>.nii.gz`` on the image's own
  grid and orientation, and records them in the manifest with ``mask_kind = "pseudo"``, and
  in ``pseudo_masks/made_by.json`` the model (its SHA-256), threshold and shape that made
  each: a mask another model made is predicted again, so a retrained segmenter never leaves
  its predecessor's masks behind.

The model sees volumes exactly as pre-training does (reoriented to RAS, resized, normalised by
:func:`raytumor.data.preprocess.preprocess_volume`), only at the segmenter's shape.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
import pandas as pd

from raytumor.data.manifest import read_manifest, resolve_path, write_manifest
from raytumor.data.preprocess import PrepareSettings, preprocess_volume
from raytumor.data.validate import CaseCheckError, CaseProblem, check_case
from raytumor.data.volumes import Volume, ras_voxels, reorient_to_ras
from raytumor.errors import DatasetError, RaytumorError
from raytumor.storage import atomic_path, atomic_write_bytes, atomic_write_text

SEGMENTER_DIR = "segmenter"
MODEL_FILE = "model.ts"
META_FILE = "meta.json"
PSEUDO_MASKS_DIR = "pseudo_masks"
MADE_BY_FILE = "made_by.json"
DEFAULT_SHAPE = (64, 64, 16)
DEFAULT_THRESHOLD = 0.5

TrainProgress = Callable[[int, int, dict[str, float]], None]
CaseProgress = Callable[[int, int], None]


class SegmenterError(RaytumorError):
    """A segmentation model that is missing, unloadable or gives outputs of the wrong shape."""


@dataclass(frozen=True)
class PseudoMaskSummary:
    n_predicted: int
    n_kept: int  # unlabelled cases that already had a pseudo mask of the same model and were left alone
    problems: list[CaseProblem] = field(default_factory=list)
    mean_tumour_fraction: float = float("nan")  # over the newly predicted masks
    n_empty: int = 0  # predicted masks without a single tumour voxel
    n_replaced: int = 0  # of n_predicted: masks another model, threshold or shape had made

    @property
    def n_skipped(self) -> int:
        return len({p.case_id for p in self.problems})

    def summary(self) -> str:
        fraction = "n/a" if np.isnan(self.mean_tumour_fraction) else f"{100 * self.mean_tumour_fraction:.2f}%"
        replaced = f"; {self.n_replaced} of them replace masks another model made" if self.n_replaced else ""
        return (
            f"{self.n_predicted} pseudo mask(s) written ({self.n_empty} empty, mean tumour fraction {fraction}{replaced}), "
            f"{self.n_kept} kept from an earlier run, {self.n_skipped} case(s) skipped"
        )


def unet_strides(shape: Sequence[int], levels: int) -> list[tuple[int, int, int]]:
    """Per-level, per-axis strides for a UNet with ``levels`` channel levels at ``shape``.

    An axis is halved only while its size is even and at least 4, so the transposed
    convolutions restore every size exactly: a thin or odd depth (6, 5, even 1 for 2-D
    slices) just stops being downsampled instead of breaking the skip connections.
    """
    sizes = [int(s) for s in shape]
    strides = []
    for _ in range(levels - 1):
        level = tuple(2 if size % 2 == 0 and size >= 4 else 1 for size in sizes)
        sizes = [size // stride for size, stride in zip(sizes, level)]
        strides.append(level)
    return strides


def build_segmenter(shape: Sequence[int], channels: Sequence[int]):
    """A MONAI 3-D UNet: ``(B, 1, *shape)`` normalised image -> ``(B, 1, *shape)`` logits."""
    from monai.networks.nets import UNet

    if len(channels) < 2:
        raise RaytumorError(f"channels: need at least two levels, got {tuple(channels)}")
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=tuple(int(c) for c in channels),
        strides=unet_strides(shape, len(channels)),
        num_res_units=1,
    )


def training_cases(manifest: pd.DataFrame) -> pd.DataFrame:
    """Labelled train/val cases with a ground-truth mask (pseudo masks never teach the segmenter)."""
    has_truth = manifest["mask"].notna() & (manifest["mask_kind"].fillna("ground_truth") == "ground_truth")
    return manifest[has_truth & manifest["split"].isin(("train", "val"))]


def load_segmentation_pairs(
    dataset_dir: str | os.PathLike, rows: pd.DataFrame, settings: PrepareSettings, *, threads: int = 4
) -> tuple[np.ndarray, np.ndarray, list[CaseProblem]]:
    """Cases -> images ``(N, 1, *shape)`` float32 and masks ``(N, 1, *shape)`` uint8, RAS; bad cases listed."""

    def one(row) -> tuple[np.ndarray | None, CaseProblem | None]:
        try:
            image, mask = check_case(resolve_path(dataset_dir, row.image), resolve_path(dataset_dir, row.mask),
                                     allow_2d=settings.allow_2d)
        except CaseCheckError as exc:
            return None, CaseProblem(row.case_id, exc.file, exc.reason)
        return preprocess_volume(ras_voxels(image), ras_voxels(mask), settings), None

    images, masks, problems = [], [], []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for volume, problem in pool.map(one, list(rows.itertuples(index=False))):
            if problem is not None:
                problems.append(problem)
                continue
            images.append(volume[0])
            masks.append(volume[1].astype(np.uint8))
    empty = np.zeros((0, 1, *settings.shape), dtype=np.float32)
    if not images:
        return empty, empty.astype(np.uint8), problems
    return np.stack(images)[:, np.newaxis], np.stack(masks)[:, np.newaxis], problems


def dice_score(model, images, masks, *, batch_size: int, device) -> float:
    """Mean Dice of thresholded predictions over the cases with a non-empty mask or prediction."""
    import torch
    from monai.metrics import DiceMetric

    metric = DiceMetric(include_background=True, reduction="mean", ignore_empty=True)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device)
            y = masks[start:start + batch_size].to(device)
            metric(y_pred=(torch.sigmoid(model(x)) > DEFAULT_THRESHOLD).float(), y=y.float())
    value = float(metric.aggregate().item())
    return 0.0 if np.isnan(value) else value


def train_segmenter(
    dataset_dir: str | os.PathLike,
    *,
    shape: Sequence[int] = DEFAULT_SHAPE,
    epochs: int = 20,
    batch_size: int = 4,
    lr: float = 1e-3,
    channels: Sequence[int] = (8, 16, 32),
    seed: int = 0,
    out: str | os.PathLike | None = None,
    progress: TrainProgress | None = None,
) -> Path:
    """Train a UNet on the train split's ground-truth masks; save the best-by-val-Dice model.

    Writes ``model.ts`` (TorchScript) and ``meta.json`` into ``out`` (default
    ``DATASET/segmenter``), replacing it in one rename, and returns the path of ``model.ts``.
    ``progress(epoch, epochs, {"loss", "val_dice"})`` is called after every epoch. Without a val
    split holding masks, Dice is measured on the train split (``meta.json`` says so).
    """
    import torch
    from monai.losses import DiceCELoss

    if epochs < 1 or batch_size < 1 or not (math.isfinite(lr) and lr > 0):
        raise RaytumorError(f"epochs and batch_size must be >= 1 and lr a finite number > 0; "
                            f"got {epochs}, {batch_size}, {lr}")
    dataset_dir = Path(dataset_dir)
    settings = PrepareSettings(shape=tuple(shape))
    cases = training_cases(read_manifest(dataset_dir))
    train_rows, val_rows = cases[cases["split"] == "train"], cases[cases["split"] == "val"]
    train_x, train_y, problems = load_segmentation_pairs(dataset_dir, train_rows, settings)
    if len(train_x) == 0:
        reason = f" ({len(problems)} unreadable, e.g. {problems[0].file}: {problems[0].reason})" if problems else ""
        raise DatasetError(f"{dataset_dir}: no labelled train cases with a ground-truth mask to train the segmenter on{reason}")
    val_x, val_y, val_problems = load_segmentation_pairs(dataset_dir, val_rows, settings)
    dice_on = "val" if len(val_x) else "train"
    if not len(val_x):
        val_x, val_y = train_x, train_y

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_segmenter(settings.shape, channels).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = DiceCELoss(sigmoid=True)
    images, masks = torch.from_numpy(train_x), torch.from_numpy(train_y)
    val_images, val_masks = torch.from_numpy(val_x), torch.from_numpy(val_y)

    best_dice, best_epoch, best_state, history = -1.0, 0, None, []
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        # Tumours sit in either hemisphere: a left-right flip (RAS axis 0) is a free, faithful extra case.
        flips = torch.rand(len(images), generator=generator) < 0.5
        total, seen = 0.0, 0
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            x, y = images[index].clone(), masks[index].float()
            flip = flips[index]
            x[flip], y[flip] = x[flip].flip(2), y[flip].flip(2)
            x, y = x.to(device), y.to(device)
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimiser.step()
            total += float(loss.item()) * len(index)
            seen += len(index)
        if not math.isfinite(total):
            # Weights that went NaN never recover; saving them would replace a working segmenter
            # with one whose every mask is empty.
            raise RaytumorError(f"{dataset_dir}: segmenter training diverged (loss {total / seen} at epoch {epoch}); "
                                f"nothing saved; try a learning rate smaller than {lr}")
        dice = dice_score(model, val_images, val_masks, batch_size=batch_size, device=device)
        metrics = {"loss": total / seen, "val_dice": dice}
        history.append({"epoch": epoch, **metrics})
        if dice > best_dice:
            best_dice, best_epoch = dice, epoch
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        if progress is not None:
            progress(epoch, epochs, metrics)

    model.load_state_dict(best_state)
    model = model.cpu().eval()
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    meta = {
        "format": "torchscript",
        "input": "(B, 1, X, Y, Z) image reoriented to RAS, resized and normalised by preprocess_volume",
        "output": "(B, 1, X, Y, Z) tumour logits",
        "shape": list(settings.shape),
        "prepare": asdict(settings),
        "channels": [int(c) for c in channels],
        "strides": [list(s) for s in unet_strides(settings.shape, len(channels))],
        "threshold": DEFAULT_THRESHOLD,
        "best_val_dice": best_dice,
        "best_epoch": best_epoch,
        "dice_on": dice_on,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "n_train": len(train_x),
        "n_val": len(val_x) if dice_on == "val" else 0,
        "skipped_cases": [asdict(p) for p in problems + val_problems],
        "history": history,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    target = Path(out) if out is not None else dataset_dir / SEGMENTER_DIR
    with atomic_path(target) as tmp:
        tmp.mkdir(parents=True)
        atomic_write_bytes(tmp / MODEL_FILE, buffer.getvalue())
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2))
    return target / MODEL_FILE


def load_segmenter(model_path: str | os.PathLike, device):
    """A TorchScript model from ``model_path``, in eval mode on ``device``."""
    import torch

    path = Path(model_path)
    if not path.is_file():
        raise SegmenterError(f"{path}: no segmentation model; train one with `raytumor masks train DATASET` or pass --model")
    try:
        model = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, ValueError, zip errors ...
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SegmenterError(f"{path}: not a loadable TorchScript model ({first_line})") from None
    return model.eval()


def model_settings(model_path: Path, shape: Sequence[int] | None) -> PrepareSettings:
    """The model's input settings: ``shape`` when given, else those in the ``meta.json`` beside it."""
    meta_path = model_path.parent / META_FILE
    prepare: dict = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            prepare = dict(meta.get("prepare") or {"shape": meta["shape"]})
        except (ValueError, KeyError, TypeError) as exc:
            raise SegmenterError(f"{meta_path}: unreadable segmenter metadata ({exc})") from None
    elif shape is None:
        raise SegmenterError(f"{model_path}: no {META_FILE} beside the model to give its input shape; pass --shape X,Y,Z")
    if shape is not None:
        prepare["shape"] = tuple(shape)
    prepare["shape"] = tuple(prepare["shape"])
    try:
        return PrepareSettings(**prepare)
    except (TypeError, ValueError) as exc:
        raise SegmenterError(f"{meta_path}: bad input settings ({exc})") from None


def to_stored_orientation(ras_data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Undo :func:`reorient_to_ras`: RAS-ordered voxels back to the grid described by ``affine``."""
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.axcodes2ornt("RAS")
    back = nib.orientations.ornt_transform(ras, ornt)
    return np.ascontiguousarray(nib.orientations.apply_orientation(ras_data, back))


def predict_mask(model, image: Volume, settings: PrepareSettings, threshold: float, device) -> np.ndarray:
    """One image -> a uint8 mask with the image's stored shape and voxel order."""
    import torch
    import torch.nn.functional as F

    ras = reorient_to_ras(image)
    x = torch.from_numpy(preprocess_volume(ras, None, settings)[0][None, None]).to(device)
    with torch.no_grad():
        try:
            logits = model(x)
        except Exception as exc:  # noqa: BLE001 - a user model can fail in any way
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SegmenterError(f"segmentation model failed on input {tuple(x.shape)} ({first_line})") from None
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != tuple(x.shape):
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise SegmenterError(f"segmentation model returned {got} for input {tuple(x.shape)}; expected logits of the same shape")
        # Resample probabilities, not the binary mask, so the full-resolution edge is smooth.
        probabilities = F.interpolate(torch.sigmoid(logits.float()), size=ras.shape, mode="trilinear", align_corners=False)
    mask_ras = (probabilities[0, 0] > threshold).cpu().numpy().astype(np.uint8)
    return to_stored_orientation(mask_ras, image.affine)


def nifti_gz_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return gzip.compress(image.to_bytes(), compresslevel=6)


def pseudo_mask_path(case_id: str) -> str:
    """Where a case's pseudo mask goes, relative to the dataset directory."""
    return f"{PSEUDO_MASKS_DIR}/{re.sub(r'[^A-Za-z0-9._-]', '_', case_id)}.nii.gz"


def predict_pseudo_masks(
    dataset_dir: str | os.PathLike,
    *,
    model_path: str | os.PathLike | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    shape: Sequence[int] | None = None,
    overwrite: bool = False,
    progress: CaseProgress | None = None,
) -> PseudoMaskSummary:
    """Write a pseudo mask for every unlabelled case without one and record it in the manifest.

    ``model_path`` defaults to ``DATASET/segmenter/model.ts``; its input shape comes from
    ``shape`` or the ``meta.json`` beside it. Masks are written to
    ``DATASET/pseudo_masks/<case_id>.nii.gz`` with the image's shape, voxel order and affine;
    unreadable images are skipped and listed in the summary. With ``overwrite`` earlier pseudo
    masks are predicted again. The manifest is written once, at the end.
    """
    import torch

    if not 0.0 < threshold < 1.0:
        raise RaytumorError(f"threshold: must lie strictly between 0 and 1, got {threshold}")
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    unlabelled = manifest[manifest["split"] == "unlabelled"]
    has_pseudo = unlabelled["mask"].notna() & (unlabelled["mask_kind"] == "pseudo")
    path = Path(model_path) if model_path is not None else dataset_dir / SEGMENTER_DIR / MODEL_FILE
    made_by_path = dataset_dir / PSEUDO_MASKS_DIR / MADE_BY_FILE
    made_by = _read_made_by(made_by_path)
    maker = None
    if path.is_file():  # without a model nothing is predicted, and earlier masks stay
        settings = model_settings(path, shape)
        maker = _maker(path, threshold, settings)
    other_maker = has_pseudo & (maker is not None) & (unlabelled["case_id"].map(made_by) != maker)
    redo = has_pseudo & (overwrite | other_maker)
    todo = unlabelled[unlabelled["mask"].isna() | redo]
    n_kept = int((has_pseudo & ~redo).sum())
    if todo.empty:
        return PseudoMaskSummary(n_predicted=0, n_kept=n_kept)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_segmenter(path, device)
    replaced = set(unlabelled.loc[other_maker & ~overwrite, "case_id"])

    written: dict[str, str] = {}
    fractions: list[float] = []
    problems: list[CaseProblem] = []
    for done, row in enumerate(todo.itertuples(index=False), start=1):
        image_path = resolve_path(dataset_dir, row.image)
        try:
            image, _ = check_case(image_path, None, allow_2d=settings.allow_2d)
        except CaseCheckError as exc:
            problems.append(CaseProblem(row.case_id, exc.file, exc.reason))
        else:
            try:
                mask = predict_mask(model, image, settings, threshold, device)
            except SegmenterError as exc:
                raise SegmenterError(f"{path}: {exc}") from None
            relative = pseudo_mask_path(row.case_id)
            atomic_write_bytes(dataset_dir / relative, nifti_gz_bytes(mask, image.affine))
            written[row.case_id] = relative
            fractions.append(float(mask.mean()))
        if progress is not None:
            progress(done, len(todo))

    if written:
        # The record first: a mask it lists that the manifest does not hold yet is predicted again.
        atomic_write_text(made_by_path, json.dumps({**made_by, **dict.fromkeys(written, maker)}, indent=1, sort_keys=True))
        # Re-read so that edits made to the manifest while predicting are not lost.
        current = read_manifest(dataset_dir)
        rows = current["case_id"].isin(list(written))
        current.loc[rows, "mask"] = current.loc[rows, "case_id"].map(written)
        current.loc[rows, "mask_kind"] = "pseudo"
        write_manifest(dataset_dir, current)
    return PseudoMaskSummary(
        n_predicted=len(written),
        n_kept=n_kept,
        problems=problems,
        mean_tumour_fraction=float(np.mean(fractions)) if fractions else float("nan"),
        n_empty=sum(f == 0.0 for f in fractions),
        n_replaced=len(replaced & set(written)),
    )


def _maker(model_path: Path, threshold: float, settings: PrepareSettings) -> str:
    """What makes a pseudo mask what it is: the model's bytes, the threshold, the input shape."""
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    return f"sha256:{digest} threshold:{threshold:g} shape:{'x'.join(map(str, settings.shape))}"


def _read_made_by(path: Path) -> dict[str, str]:
    """case_id -> maker of its pseudo mask; an unreadable record counts as none (all predicted again)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in record.items()} if isinstance(record, dict) else {}
