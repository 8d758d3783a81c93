"""``raytumor demo``: the main job on the embedded default, end to end on demo data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from raytumor.cli.progress import progress_bar


def demo(
    directory: Path = typer.Option(Path("demo"), "--dir", help="Working directory for the demo dataset and results."),
    scale: float = typer.Option(0.1, help="Scale of the paper's Table 1 class counts."),
    unlabelled: int = typer.Option(100, help="Unlabelled cases for contrastive pre-training."),
    shape: str = typer.Option("32,32,8", help="Training shape X,Y,Z (the paper's is 128,128,12)."),
    seed: int = typer.Option(0, help="Seed of the demo data and the augmentation."),
    augment_n: int = typer.Option(5, help="Augmented copies per rare-class training case."),
    address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster address; default: embedded Ray."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs for the embedded Ray (default: all)."),
    dashboard: bool = typer.Option(True, "--dashboard/--no-dashboard", help="Ray dashboard on 127.0.0.1 (embedded Ray)."),
) -> None:
    """Run the main job on demo data: generate -> validate -> prepare (Ray Data) -> rare-case augmentation."""
    from rich.console import Console
    from rich.table import Table

    from raytumor.cli.data import _shape
    from raytumor.data.demo import make_demo_dataset
    from raytumor.data.manifest import MANIFEST_FILE, read_classes, read_manifest, rare_labels
    from raytumor.data.preprocess import PrepareSettings, prepare_dataset
    from raytumor.data.rare_cases import augment_rare_cases
    from raytumor.data.validate import validate_dataset
    from raytumor.runtime import ray_session

    console = Console()
    dataset = directory / "data"
    target_shape = _shape(shape)
    if (dataset / MANIFEST_FILE).is_file():
        console.print(f"[1/4] demo dataset exists: {dataset}")
    else:
        with progress_bar("[1/4] generating demo dataset") as update:
            make_demo_dataset(dataset, scale=scale, seed=seed, unlabelled=unlabelled, progress=update)
    with progress_bar("[2/4] validating") as update:
        report = validate_dataset(dataset, progress=update)
    console.print(f"      {report.summary()}")

    with ray_session(address, num_cpus=num_cpus, dashboard=dashboard):
        console.print("[3/4] preprocessing on Ray Data")
        prepared = prepare_dataset(dataset, PrepareSettings(shape=target_shape))
        classes = read_classes(dataset)
        console.print("[4/4] rare-case augmentation on Ray Data")
        augmented = augment_rare_cases(prepared, rare_labels(classes), n=augment_n, seed=seed)

    manifest = read_manifest(dataset)
    counts = manifest.groupby(["label", "split"]).size().unstack(fill_value=0)
    table = Table("class", "name", "rare", "train", "val", "test", title="Demo dataset")
    for row in classes.itertuples(index=False):
        split = counts.loc[row.label] if row.label in counts.index else {}
        table.add_row(str(row.label), row.name, "*" if row.rare else "",
                      *(str(int(split.get(s, 0))) for s in ("train", "val", "test")))
    console.print(table)
    rate = "cache hit" if prepared.cached else f"{prepared.n_cases / max(prepared.seconds, 1e-9):.1f} cases/s"
    console.print(
        f"labelled {int(manifest['label'].notna().sum())}, unlabelled {int((manifest['split'] == 'unlabelled').sum())}, "
        f"quarantined {prepared.n_quarantined}\n"
        f"prepared {prepared.n_cases} cases at {'x'.join(map(str, prepared.shape))} ({rate}): {prepared.path}\n"
        f"rare-case augmentation: {augmented.n_rows} rows from {augmented.n_source_cases} rare training cases: {augmented.path}"
    )
