"""``raytumor masks``: train a tumour segmenter and write pseudo masks for the unlabelled pool."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from raytumor.cli.data import _shape
from raytumor.cli.progress import progress_bar

app = typer.Typer(help="Pseudo tumour masks: train a segmenter on ground-truth masks, predict masks for unlabelled scans.",
                  no_args_is_help=True, rich_markup_mode=None)


def _channels(text: str) -> tuple[int, ...]:
    from raytumor.errors import RaytumorError

    try:
        channels = tuple(int(p) for p in text.split(","))
    except ValueError:
        channels = ()
    if len(channels) < 2 or min(channels) < 1:
        raise RaytumorError(f"--channels: expected two or more positive comma-separated ints like 8,16,32, got {text!r}")
    return channels


def _positive_lr(lr: float) -> float:
    import math

    from raytumor.errors import RaytumorError

    if not (math.isfinite(lr) and lr > 0):
        raise RaytumorError(f"--lr: must be a finite number > 0, got {lr}")
    return lr


@app.command("train")
def train(
    dataset: Path = typer.Argument(..., help="Dataset directory (labelled train/val cases with ground-truth masks)."),
    shape: str = typer.Option("64,64,16", help="Segmenter input shape X,Y,Z; volumes are reoriented to RAS and resized to it."),
    epochs: int = typer.Option(20, min=1, help="Training epochs; the epoch with the best val Dice is kept."),
    batch_size: int = typer.Option(4, min=1, help="Volumes per step."),
    lr: float = typer.Option(1e-3, help="Adam learning rate, a finite number > 0."),
    channels: str = typer.Option("8,16,32", help="UNet channels per level, comma-separated."),
    seed: int = typer.Option(0, help="Seed of initialisation, shuffling and flips."),
) -> None:
    """Train a 3-D UNet on the ground-truth masks; save DATASET/segmenter/model.ts (TorchScript) and meta.json."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from raytumor.data.manifest import read_manifest
    from raytumor.data.pseudo_masks import train_segmenter

    # Checked before the bar is drawn: a bad argument is one error line, not a bar and then one.
    input_shape, unet_channels, lr = _shape(shape), _channels(channels), _positive_lr(lr)
    read_manifest(dataset)
    columns = (
        TextColumn("[bold]training segmenter"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epochs  loss {task.fields[loss]}  val Dice {task.fields[dice]}"),
        TimeRemainingColumn(),
    )
    best = {"dice": -1.0, "epoch": 0}
    with Progress(*columns) as bar:
        task = bar.add_task("train", total=epochs, loss="-", dice="-")

        def update(epoch: int, total: int, metrics: dict[str, float]) -> None:
            if metrics["val_dice"] > best["dice"]:
                best.update(dice=metrics["val_dice"], epoch=epoch)
            bar.update(task, completed=epoch, total=total, loss=f"{metrics['loss']:.3f}", dice=f"{metrics['val_dice']:.3f}")

        model = train_segmenter(dataset, shape=input_shape, epochs=epochs, batch_size=batch_size, lr=lr,
                                channels=unet_channels, seed=seed, progress=update)
    typer.echo(f"segmenter saved: {model} (best val Dice {best['dice']:.3f} at epoch {best['epoch']})")


@app.command("predict")
def predict(
    dataset: Path = typer.Argument(..., help="Dataset directory whose unlabelled cases get pseudo masks."),
    model: Optional[Path] = typer.Option(None, "--model", help="TorchScript model: (B,1,X,Y,Z) normalised RAS image -> (B,1,X,Y,Z) logits. Default: DATASET/segmenter/model.ts."),
    threshold: float = typer.Option(0.5, help="Tumour where the predicted probability exceeds this (between 0 and 1)."),
    shape: Optional[str] = typer.Option(None, help="Model input shape X,Y,Z; needed for a model without a meta.json beside it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Predict again for cases that already have a pseudo mask."),
) -> None:
    """Write DATASET/pseudo_masks/<case>.nii.gz for unlabelled cases and record them in the manifest as pseudo."""
    from raytumor.data.pseudo_masks import predict_pseudo_masks

    input_shape = _shape(shape) if shape is not None else None
    with progress_bar("predicting") as update:
        summary = predict_pseudo_masks(dataset, model_path=model, threshold=threshold, shape=input_shape,
                                       overwrite=overwrite, progress=update)
    typer.echo(summary.summary())
    for problem in summary.problems:
        typer.echo(f"skipped {problem.case_id}: {Path(problem.file).name}: {problem.reason}")
