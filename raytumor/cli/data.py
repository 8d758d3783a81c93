"""``raytumor data``: import, generate, validate, split, prepare and augment datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from raytumor.cli.progress import progress_bar

app = typer.Typer(help="Datasets: import, demo data, validation, preprocessing cache, rare-case augmentation.",
                  no_args_is_help=True, rich_markup_mode=None)


def _shape(text: str) -> tuple[int, int, int]:
    from raytumor.errors import RaytumorError

    try:
        shape = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise RaytumorError(f"--shape: expected three comma-separated ints like 128,128,12, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise RaytumorError(f"--shape: expected three positive ints like 128,128,12, got {text!r}")
    return shape  # type: ignore[return-value]


def _fractions(text: str) -> tuple[float, float, float]:
    from raytumor.errors import RaytumorError

    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) <= 0 or abs(sum(parts) - 1) > 1e-6:
        raise RaytumorError(f"--split: expected three positive fractions summing to 1 like 0.7,0.1,0.2, got {text!r}")
    return parts  # type: ignore[return-value]


def _rare(text: Optional[str]) -> Optional[list[int]]:
    from raytumor.errors import RaytumorError

    if text is None:
        return None
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise RaytumorError(f"--rare-classes: expected comma-separated class ints, got {text!r}") from None


SplitOpt = typer.Option("0.7,0.1,0.2", "--split", help="train,val,test fractions (stratified by label, patients kept together).")
SeedOpt = typer.Option(0, help="Seed of the split.")
RareFractionOpt = typer.Option(0.01, help="A class is rare when it holds <= this fraction of labelled cases.")
RareClassesOpt = typer.Option(None, help="Comma-separated rare class ints; overrides --rare-fraction.")


@app.command("demo")
def demo(
    out: Path = typer.Argument(..., help="Directory to write the demo dataset into (created)."),
    scale: float = typer.Option(0.1, help="Scale of the paper's Table 1 class counts (1.0 = 4,962 labelled cases)."),
    seed: int = typer.Option(0, help="Seed: the same seed writes the same data."),
    unlabelled: int = typer.Option(50, help="Number of unlabelled cases (no label, no mask)."),
    shape: str = typer.Option("64,64,16", help="Shape X,Y,Z of the written volumes."),
) -> None:
    """Write a realistic demo dataset: MNI152 anatomy, 27 tumour classes with the paper's imbalance."""
    from raytumor.data.demo import make_demo_dataset

    with progress_bar("generating") as update:
        summary = make_demo_dataset(out, scale=scale, seed=seed, unlabelled=unlabelled, shape=_shape(shape), progress=update)
    typer.echo(f"demo dataset: {summary.n_labelled} labelled + {summary.n_unlabelled} unlabelled cases in {out}")


@app.command("import-folder")
def import_folder(
    src: Path = typer.Argument(..., help="Folder holding the NIfTI volumes."),
    labels: Path = typer.Option(..., "--labels", help="CSV with case_id,image,label[,mask,patient_id]; paths relative to SRC."),
    out: Path = typer.Option(..., "--out", help="New dataset directory."),
    split: str = SplitOpt,
    seed: int = SeedOpt,
    rare_fraction: float = RareFractionOpt,
    rare_classes: Optional[str] = RareClassesOpt,
) -> None:
    """Import NIfTI volumes listed in a labels CSV (labels as ints, or names mapped to sorted ints)."""
    from raytumor.data.importers import import_folder as run

    with progress_bar("checking") as update:
        summary = run(src, labels, out, seed=seed, fractions=_fractions(split), rare_fraction=rare_fraction,
                      rare_classes=_rare(rare_classes), progress=update)
    typer.echo(summary.summary())


@app.command("import-brats")
def import_brats(
    src: Path = typer.Argument(..., help="BraTS-style folder: each case's files named <case>_<modality>.nii[.gz], "
                                         "searched recursively."),
    out: Path = typer.Option(..., "--out", help="New dataset directory."),
    modality: str = typer.Option("t2", help="The volume each case contributes: t2 (the paper's T2-weighted scans), "
                                            "t1, t1ce or flair; BraTS 2023's t2w, t1n, t1c, t2f name the same. "
                                            "The case's seg file becomes its ground-truth mask."),
    label_from: str = typer.Option(
        "auto", "--label-from",
        help="Where the class comes from: folder (class folders such as HGG/ and LGG/), challenge (BraTS 2023 "
             "names: BraTS-GLI-, -MEN-, -MET-, -PED-, -SSA-), csv (--labels-csv), or auto: a name_mapping.csv in "
             "SRC, else BraTS 2023 names, else class folders."),
    labels_csv: Optional[Path] = typer.Option(
        None, "--labels-csv", help="CSV holding the case names in one column and the classes in --label-column "
                                   "(BraTS 2020's name_mapping.csv is found in SRC by itself)."),
    label_column: str = typer.Option("Grade", help="The labels CSV's class column."),
    split: str = SplitOpt,
    seed: int = SeedOpt,
    rare_fraction: float = RareFractionOpt,
    rare_classes: Optional[str] = RareClassesOpt,
) -> None:
    """Import a BraTS-style folder: one volume per case, its seg file as the mask, a class from folders, names or a CSV."""
    from raytumor.data.importers import import_brats as run

    with progress_bar("checking") as update:
        summary = run(src, out, modality=modality, label_from=label_from, labels_csv=labels_csv,
                      label_column=label_column, seed=seed, fractions=_fractions(split), rare_fraction=rare_fraction,
                      rare_classes=_rare(rare_classes), progress=update)
    typer.echo(summary.summary())


@app.command("import-figshare")
def import_figshare(
    src: Path = typer.Argument(..., help="Folder with the Figshare brain-tumour .mat files (Cheng 2017), searched recursively."),
    out: Path = typer.Option(..., "--out", help="New dataset directory."),
    split: str = SplitOpt,
    seed: int = SeedOpt,
    rare_fraction: float = RareFractionOpt,
    rare_classes: Optional[str] = RareClassesOpt,
) -> None:
    """Import the public Figshare brain-tumour set: each slice becomes a depth-1 NIfTI volume."""
    from raytumor.data.importers import import_figshare as run

    with progress_bar("converting") as update:
        summary = run(src, out, seed=seed, fractions=_fractions(split), rare_fraction=rare_fraction,
                      rare_classes=_rare(rare_classes), progress=update)
    typer.echo(summary.summary())


@app.command("import-unlabelled")
def import_unlabelled(
    src: Path = typer.Argument(..., help="Folder of NIfTI volumes without labels, searched recursively."),
    into: Path = typer.Option(..., "--into", help="Existing dataset directory to add them to."),
    modality: Optional[str] = typer.Option(
        None, help="SRC is a BraTS-style folder: add each case's volume of this modality (t2, t1, t1ce, flair; "
                   "or t2w, t1n, t1c, t2f) and nothing else. Default: every NIfTI file is a case."),
) -> None:
    """Add an unlabelled pool (images only) to a dataset, for contrastive pre-training."""
    from raytumor.data.importers import import_unlabelled as run

    with progress_bar("checking") as update:
        summary = run(src, into, modality=modality, progress=update)
    typer.echo(summary.summary())


@app.command("validate")
def validate(
    dataset: Path = typer.Argument(..., help="Dataset directory."),
) -> None:
    """Read every case fully and list each bad one with its file and reason; exit 1 if any.

    It applies the rules of `data prepare`: a case that validates is never quarantined there.
    """
    from rich.console import Console
    from rich.table import Table

    from raytumor.data.validate import validate_dataset

    with progress_bar("validating") as update:
        report = validate_dataset(dataset, progress=update)
    console = Console()
    if report.problems:
        table = Table("case_id", "file", "reason", title="Problems")
        for problem in report.problems:
            table.add_row(problem.case_id, problem.file, problem.reason)
        console.print(table)
    console.print(report.summary())
    if not report.ok:
        raise typer.Exit(1)


@app.command("split")
def split_cmd(
    dataset: Path = typer.Argument(..., help="Dataset directory."),
    split: str = SplitOpt,
    seed: int = SeedOpt,
    force: bool = typer.Option(False, "--force", help="Recompute every split (otherwise only cases without one get one)."),
) -> None:
    """Assign train/val/test splits; existing splits never change unless --force."""
    from raytumor.data.manifest import read_manifest, write_manifest
    from raytumor.data.splits import assign_splits

    manifest = assign_splits(read_manifest(dataset), _fractions(split), seed, resplit=force)
    write_manifest(dataset, manifest)
    typer.echo(manifest["split"].value_counts().to_string())


@app.command("prepare")
def prepare(
    dataset: Path = typer.Argument(..., help="Dataset directory."),
    shape: str = typer.Option("128,128,12", help="Target shape X,Y,Z (the paper's is 128,128,12)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when a matching cache exists."),
    address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster address; default: embedded Ray."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs for the embedded Ray (default: all)."),
    blocks_per_cpu: int = typer.Option(
        1, "--blocks-per-cpu", min=1,
        help="Ray Data tasks per CPU of the cluster. 1 is fastest on even workers; more balance "
             "better on a cluster of uneven or shared nodes."),
) -> None:
    """Reorient, resize, normalise and stack image+mask into cached Parquet shards, on Ray Data."""
    from raytumor.data.layout import PrepareSettings, find_prepared_quick

    settings = PrepareSettings(shape=_shape(shape))
    # Checked before Ray starts: a cache hit needs no Ray (starting one takes seconds), and a
    # missing or broken dataset fails at once. The quick look needs no pandas either.
    prepared = None if force else find_prepared_quick(dataset, settings)
    if prepared is None:
        from raytumor.data.preprocess import find_prepared, prepare_dataset
        from raytumor.runtime import ray_session

        prepared = find_prepared(dataset, settings)
        if prepared is None or force:
            with ray_session(address, num_cpus=num_cpus):
                # Looked just now (nothing matched, or --force), so build without fingerprinting again.
                prepared = prepare_dataset(dataset, settings, force=True, blocks_per_cpu=blocks_per_cpu)
    state = "cache hit, nothing to do" if prepared.cached else f"{prepared.n_cases / max(prepared.seconds, 1e-9):.1f} cases/s"
    typer.echo(f"prepared {prepared.n_cases} case(s), {prepared.n_quarantined} quarantined ({state}): {prepared.path}")
    if prepared.n_quarantined:
        typer.echo(f"quarantined cases and reasons: {prepared.quarantine}")
