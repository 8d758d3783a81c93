"""``raytumor evaluate``, ``raytumor index build`` and ``raytumor search``: Table 2 reports and similar-case retrieval.

Registered in ``raytumor.cli`` as::

    app.command("evaluate")(evaluate_cli.evaluate)
    app.add_typer(evaluate_cli.index_app, name="index")
    app.command("search")(evaluate_cli.search)

Heavy libraries (torch, matplotlib, pyarrow) are imported inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

DatasetOpt = typer.Option(
    None, "--dataset", help="Dataset directory to use instead of the one in the run's config (e.g. after moving it)."
)
BatchOpt = typer.Option(32, "--batch-size", min=1, help="Volumes embedded per forward pass.")

index_app = typer.Typer(help="Similar-case retrieval index of a trained run.", no_args_is_help=True, rich_markup_mode=None)


def _metric_table(rows: list[dict], title: str):
    from rich.table import Table

    from raytumor.evaluate.report import TABLE_COLUMNS

    table = Table(title=title)
    for column in TABLE_COLUMNS:
        # The row name is what the table is read by: never cut it.
        table.add_column(column, no_wrap=column == "Model", overflow="fold")
    for row in rows:
        table.add_row(*[row[column] for column in TABLE_COLUMNS])
    return table


def evaluate(
    runs: Optional[List[Path]] = typer.Argument(
        None, metavar="RUN", help="Run directories (from `raytumor train`); several give one comparison table. "
        "Default: the latest `raytumor train --best` run recorded in --results-dir."
    ),
    k: int = typer.Option(
        7, "--k", min=1, help="K of the K-nearest-neighbour vote (the paper's is 7); at most the number of train+val cases."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="New report directory (must not exist or be empty); default: FIRST_RUN/reports/<timestamp>."
    ),
    dataset: Optional[Path] = DatasetOpt,
    examples: int = typer.Option(4, "--examples", min=0, help="Test cases shown with their 5 nearest neighbours."),
    batch_size: int = BatchOpt,
    results_dir: str = typer.Option(
        "results", "--results-dir",
        help="Where `raytumor train --best` recorded its run (give it the same --results-dir); used without RUN.",
    ),
) -> None:
    """Table 2 metrics on the test split: K-NN over train+val embeddings; writes metrics.json, report.md, report.html.

    Recall_mu, Recall_M, Recall_M* (rare classes from the dataset's class table), Rank-5 and,
    for classifier models, Acc_clf; plus confusion matrix, per-class recall, CMC, a 2-D
    projection of the embeddings and retrieved neighbours of a few test cases.
    """
    from rich.console import Console

    from raytumor.cli.progress import progress_bar
    from raytumor.evaluate.embeddings import embed_run
    from raytumor.evaluate.report import check_report_dir, comparison_table, default_report_dir, evaluate_run, write_report

    if not runs:
        from raytumor.sweep.run import latest_best_run

        runs = [latest_best_run(results_dir)]
    from raytumor.train.trainer import best_model_path

    for run in runs:  # every run checked before any is embedded
        best_model_path(run)
    target = check_report_dir(out) if out is not None else default_report_dir(runs[0])
    evaluations = []
    for run in runs:
        with progress_bar(f"embed {run.name}") as update:
            embedded = embed_run(run, dataset=dataset, batch_size=batch_size, progress=update)
        evaluation = evaluate_run(embedded, k=k)
        if evaluation.scores["k"] < k:
            typer.echo(f"note: --k {k} is more than the {len(evaluation.reference)} train+val reference cases of "
                       f"{run}; K = {evaluation.scores['k']} used", err=True)
        evaluations.append(evaluation)
    path = write_report(evaluations, target, examples=examples)
    ks = sorted({ev.scores["k"] for ev in evaluations})
    console = Console()
    console.print(_metric_table(comparison_table(evaluations), f"Test set, K = {', '.join(map(str, ks))} (train+val reference)"))
    typer.echo(f"report: {path / 'report.html'}")
    typer.echo(f"metrics: {path / 'metrics.json'}")


@index_app.command("build")
def build(
    run: Path = typer.Argument(..., help="Run directory (from `raytumor train`)."),
    dataset: Optional[Path] = DatasetOpt,
    batch_size: int = BatchOpt,
) -> None:
    """Embed every labelled case (train, val, test; no augmented copies) once and save RUN/index/."""
    from raytumor.cli.progress import progress_bar
    from raytumor.evaluate.retrieval import build_index

    with progress_bar(f"index {run.name}") as update:
        index = build_index(run, dataset=dataset, batch_size=batch_size, progress=update)
    typer.echo(f"indexed {len(index)} labelled case(s) ({index.vectors.shape[1]}-dim vectors): {index.path}")


def search(
    run: Path = typer.Argument(..., help="Run directory (from `raytumor train`)."),
    image: Path = typer.Argument(..., help="A .nii/.nii.gz scan, or a folder of them (batch mode)."),
    mask: Optional[Path] = typer.Option(
        None, "--mask", help="Tumour mask of the scan (a folder of same-named masks in batch mode); absent: zeros."
    ),
    top: int = typer.Option(5, "--top", min=1, help="Matches to return per scan."),
    csv: Optional[Path] = typer.Option(
        None, "--csv", help="Write the matches to this CSV (batch mode default: RUN/searches/<folder>-<timestamp>.csv)."
    ),
    dataset: Optional[Path] = DatasetOpt,
) -> None:
    """The top-N most similar labelled cases of a scan (case id, class, distance), by the run's embedding.

    The scan is preprocessed like the training data (reoriented to RAS, resized to the run's
    shape, normalised). Without an index (or with one older than the model) the index is
    built first, from the run's preprocessing cache. A bad scan given alone is an error. In a
    folder, bad scans are skipped: the others are searched and written, the bad ones listed
    with their reasons on stderr and in <CSV>-quarantine.csv next to the matches, and the
    exit code is 1.
    """
    from rich.console import Console
    from rich.table import Table

    from raytumor.evaluate.retrieval import (
        ScanError,
        default_csv_path,
        ensure_index,
        find_scans,
        quarantine_csv_path,
        search_scans,
    )
    from raytumor.storage import atomic_write_text

    scans = find_scans(image, mask)  # bad paths fail before any model or index work
    index, built = ensure_index(run, dataset=dataset)
    if built:
        typer.echo(f"built the retrieval index ({len(index)} labelled cases): {index.path}")
    results = search_scans(run, scans, top=top, index=index)
    batch = image.is_dir()
    if not batch and results.problems:
        [problem] = results.problems
        raise ScanError(problem.file, problem.reason)
    matches = results.matches
    if batch or csv is not None:
        path = csv if csv is not None else default_csv_path(run, image)
        atomic_write_text(path, matches.to_csv(index=False, float_format="%.6f"))
    if batch:
        quarantine = quarantine_csv_path(path)
        if results.problems:
            atomic_write_text(quarantine, results.problems_frame().to_csv(index=False))
        else:  # one left by an earlier search into the same --csv would list scans that are fine now
            quarantine.unlink(missing_ok=True)
    console = Console()
    if batch:
        searched = len(scans) - len(results.problems)
        table = Table("scan", "top match", "class", "distance", title=f"{searched} scan(s): nearest labelled case")
        for _, row in matches[matches["rank"] == 1].iterrows():
            table.add_row(Path(row["query"]).name, row["case_id"], row["label_name"], f"{row['distance']:.4f}")
    else:
        table = Table("rank", "case id", "class", "distance", title=f"Top {top} labelled matches of {image.name}")
        for _, row in matches.iterrows():
            table.add_row(str(row["rank"]), row["case_id"], row["label_name"], f"{row['distance']:.4f}")
    console.print(table)
    if batch or csv is not None:
        typer.echo(f"matches written to {path}")
    if results.problems:
        bad = Table("file", "reason", title="Bad scans (not searched)")
        for problem in results.problems:
            bad.add_row(problem.file, problem.reason)
        Console(stderr=True).print(bad)
        typer.echo(f"{len(results.problems)} of {len(scans)} scan(s) bad, not searched; "
                   f"files and reasons: {quarantine}", err=True)
        raise typer.Exit(1)
