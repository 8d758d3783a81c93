"""The evaluation report: the paper's Table 2 metrics per run, as JSON, Markdown and HTML.

As in the paper (section 4.2), every test case is classified by a K = 7 nearest-neighbour
vote over the train + validation embeddings (non-augmented rows only). A report directory
holds::

    metrics.json   per run: Recall_mu, Recall_M, Recall_M*, Rank-5, Acc_clf, per-class recall,
                   CMC (ranks 1..10), confusion matrix, K, reference/query counts, Table-2 row name
    report.md      the comparison table, per-run tables, links to plots/*.png
    report.html    the same, self-contained (plots embedded as base64 PNG)
    plots/         confusion matrix, per-class recall, 2-D PCA projection, CMC, retrieved neighbours

Reports carry case ids and class names only: no patient ids, no NIfTI header text. A report
directory is never overwritten: it is written to a temporary sibling and renamed into place,
which fails on an existing non-empty directory.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from raytumor.config import RunConfig
from raytumor.errors import RaytumorError
from raytumor.evaluate.embeddings import EmbeddedRows, RunEmbeddings, middle_slices
from raytumor.evaluate.metrics import knn_scores, nearest_neighbors
from raytumor.reporting import ReportDoc, new_figure, png_bytes, pretrain_name, table2_row_name

REFERENCE_SPLITS = ("train", "val")
QUERY_SPLITS = ("test",)
REPORTS_DIR = "reports"
TABLE_COLUMNS = ("Model", "Recall_μ", "Recall_M", "Recall_M*", "Rank-5", "Acc_clf", "Run")
METRIC_KEYS = ("recall_micro", "recall_macro", "recall_macro_rare", "rank5", "acc_clf")
N_NEIGHBOURS_SHOWN = 5


# ---------------------------------------------------------------- naming and formatting


def _pretraining(config: RunConfig) -> tuple[bool, str, bool]:
    """``(enabled, loss, pretrained)`` naming the run's contrastive pre-training."""
    if config.pretrain.enabled or not config.train.pretrained:
        return config.pretrain.enabled, config.pretrain.loss, bool(config.train.pretrained)
    # Weights from another run: its config says which contrastive loss made them.
    from raytumor.config import load_config

    source = Path(config.train.pretrained)
    saved = (source if source.is_dir() else source.parent) / "config.yaml"
    try:
        other = load_config(saved)
    except RaytumorError:
        return False, config.pretrain.loss, True
    return other.pretrain.enabled, other.pretrain.loss, True


def _pretrain_name(config: RunConfig) -> str:
    return pretrain_name(*_pretraining(config))


def table2_name(config: RunConfig) -> str:
    """The paper's row name ``ContrastivePretrain-Augment-Loss``, e.g. ``BHTriplet-Aug-BHTriplet``."""
    enabled, loss, pretrained = _pretraining(config)
    return table2_row_name(pretrain_enabled=enabled, pretrain_loss=loss, augment_rare=config.data.augment_rare,
                           train_loss=config.train.loss, pretrained=pretrained)


def format_metric(value: float | None, missing: str = "n/a") -> str:
    """How reports print a metric: 4 decimals; ``missing`` for None/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return f"{value:.4f}"


def _json_float(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


# ---------------------------------------------------------------- metrics


@dataclass(frozen=True)
class RunEvaluation:
    """One run's K-NN evaluation: test queries against train + val references."""

    embeddings: RunEmbeddings
    reference: EmbeddedRows
    queries: EmbeddedRows
    scores: dict  # knn_scores output
    neighbor_indices: np.ndarray  # (Q, n) into reference, nearest first
    neighbor_distances: np.ndarray  # (Q, n)
    k_requested: int

    @property
    def name(self) -> str:
        return self.embeddings.name

    @property
    def row_name(self) -> str:
        return table2_name(self.embeddings.config)

    @property
    def classes(self) -> pd.DataFrame:
        return self.embeddings.classes

    @property
    def rare_classes(self) -> list[int]:
        return [int(c) for c in self.classes.loc[self.classes["rare"], "label"]]

    def class_name(self, label: int) -> str:
        names = dict(zip(self.classes["label"].astype(int), self.classes["name"].astype(str)))
        return names.get(int(label), str(int(label)))

    def confusion(self) -> tuple[list[int], np.ndarray]:
        """Labels and counts ``[true, predicted]`` over the classes seen in the test set or predicted."""
        y_true, y_pred = self.queries.label, np.asarray(self.scores["predictions"])
        labels = sorted(set(map(int, y_true)) | set(map(int, y_pred)))
        index = {label: i for i, label in enumerate(labels)}
        counts = np.zeros((len(labels), len(labels)), dtype=np.int64)
        for t, p in zip(y_true, y_pred):
            counts[index[int(t)], index[int(p)]] += 1
        return labels, counts

    def per_class(self) -> list[dict]:
        """Every class of the class table (and any other test label); recall None without test cases."""
        recalls = {int(k): float(v) for k, v in self.scores["per_class_recall"].items()}
        rare = set(self.rare_classes)
        labels = sorted(set(map(int, self.classes["label"])) | set(recalls))
        return [{
            "label": label,
            "name": self.class_name(label),
            "rare": label in rare,
            "n_test": int(np.sum(self.queries.label == label)),
            "recall": recalls.get(label),
        } for label in labels]

    def metrics(self) -> dict:
        """This run's entry of ``metrics.json`` (JSON types; NaN as null)."""
        config = self.embeddings.config
        scores = self.scores
        labels, counts = self.confusion()
        acc = scores.get("acc_clf")
        return {
            "run": self.name,
            "run_dir": str(self.embeddings.run_dir.resolve()),
            "row_name": self.row_name,
            "train_loss": config.train.loss,
            "pretrain": _pretrain_name(config),
            "augment_rare": bool(config.data.augment_rare),
            "knn_vectors": "softmax" if self.embeddings.outputs_logits else "embedding",
            "dataset": str(self.embeddings.dataset_dir),
            "shape": list(config.data.shape),
            "prepared_fingerprint": self.embeddings.prepared.fingerprint,
            "k": int(scores["k"]),
            "k_requested": int(self.k_requested),
            "n_reference": len(self.reference),
            "n_queries": len(self.queries),
            "recall_micro": _json_float(scores["recall_micro"]),
            "recall_macro": _json_float(scores["recall_macro"]),
            "recall_macro_rare": _json_float(scores["recall_macro_rare"]),
            "rank5": _json_float(scores["rank5"]),
            "acc_clf": None if acc is None else _json_float(acc),
            "cmc": [_json_float(v) for v in scores["cmc"]],
            "per_class_recall": {str(k): float(v) for k, v in sorted(scores["per_class_recall"].items())},
            "per_class": self.per_class(),
            "rare_classes": self.rare_classes,
            "confusion_matrix": {"labels": labels, "counts": counts.tolist()},
        }

    def table_row(self) -> dict[str, str]:
        """This run as a row of the paper's Table 2 (formatted strings)."""
        m = self.metrics()
        acc = "-" if not self.embeddings.outputs_logits else format_metric(m["acc_clf"])
        values = [format_metric(m[key]) for key in METRIC_KEYS[:4]] + [acc]
        return dict(zip(TABLE_COLUMNS, [self.row_name, *values, self.name]))


def evaluate_run(embeddings: RunEmbeddings, k: int = 7) -> RunEvaluation:
    """K-NN metrics of a run: test queries vs train + val references, rare classes from the class table."""
    rows = embeddings.rows
    reference, queries = rows.select(REFERENCE_SPLITS), rows.select(QUERY_SPLITS)
    if len(reference) == 0:
        raise RaytumorError(f"{embeddings.dataset_dir}: no train/val cases in the preprocessing cache to search")
    if len(queries) == 0:
        raise RaytumorError(f"{embeddings.dataset_dir}: the test split is empty in the preprocessing cache; "
                            "nothing to evaluate (see `raytumor data split`)")
    rare = [int(c) for c in embeddings.classes.loc[embeddings.classes["rare"], "label"]]
    # A cross-entropy model's KNN vectors are its softmax outputs: their argmax is the class.
    logits = queries.embeddings if embeddings.outputs_logits else None
    scores = knn_scores(reference.embeddings, reference.label, queries.embeddings, queries.label,
                        k=k, rare_classes=rare, query_logits=logits)
    distances, indices = nearest_neighbors(reference.embeddings, queries.embeddings, 10)
    return RunEvaluation(embeddings, reference, queries, scores, indices, distances, k)


# ---------------------------------------------------------------- plots


def _png(fig) -> bytes:
    return png_bytes(fig, bbox_inches="tight")


def _class_colours(labels: Sequence[int]) -> dict[int, Any]:
    import matplotlib

    palette = [c for name in ("tab20", "tab20b", "tab20c") for c in matplotlib.colormaps[name].colors]
    ordered = sorted(set(int(x) for x in labels))
    if len(ordered) > len(palette):
        cmap = matplotlib.colormaps["hsv"]
        return {label: cmap(i / len(ordered)) for i, label in enumerate(ordered)}
    if len(ordered) <= 10:
        palette = list(matplotlib.colormaps["tab10"].colors)
    return {label: palette[i] for i, label in enumerate(ordered)}


def _tick(ev: RunEvaluation, label: int) -> str:
    return f"{ev.class_name(label)}{'*' if label in set(ev.rare_classes) else ''}"


def plot_confusion(ev: RunEvaluation) -> bytes:
    labels, counts = ev.confusion()
    n = len(labels)
    size = max(3.5, 0.35 * n + 2)
    fig = new_figure(size, size)
    ax = fig.add_subplot()
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if shares[i, j] > 0.5 else "black")
    ticks = [_tick(ev, label) for label in labels]
    ax.set_xticks(range(n), ticks, rotation=90, fontsize=7)
    ax.set_yticks(range(n), ticks, fontsize=7)
    ax.set_xlabel("predicted (K-NN vote)")
    ax.set_ylabel("true class")
    ax.set_title(f"{ev.name}: confusion matrix (test, K={ev.scores['k']})", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    return _png(fig)


def plot_per_class_recall(ev: RunEvaluation) -> bytes:
    from matplotlib.patches import Patch

    rows = ev.per_class()
    fig = new_figure(max(4.5, 0.3 * len(rows) + 2), 3.2)
    ax = fig.add_subplot()
    colours = ["tab:orange" if r["rare"] else "tab:blue" for r in rows]
    bars = ax.bar(range(len(rows)), [r["recall"] or 0.0 for r in rows], color=colours)
    for i, (bar, r) in enumerate(zip(bars, rows)):
        if r["rare"]:
            bar.set_hatch("//")
        if r["recall"] is None:
            ax.text(i, 0.02, "no test case", rotation=90, ha="center", va="bottom", fontsize=6, color="grey")
    if any(r["rare"] for r in rows):
        ax.add_artist(ax.legend(handles=[Patch(facecolor="tab:orange", hatch="//", label="rare class")],
                                fontsize=7, loc="upper left"))
    ax.axhline(ev.scores["recall_macro"], color="black", linestyle="--", linewidth=1,
               label=f"Recall_M {format_metric(ev.scores['recall_macro'])}")
    if not math.isnan(ev.scores["recall_macro_rare"]):
        ax.axhline(ev.scores["recall_macro_rare"], color="tab:orange", linestyle=":", linewidth=1.5,
                   label=f"Recall_M* {format_metric(ev.scores['recall_macro_rare'])}")
    ax.set_xticks(range(len(rows)), [_tick(ev, r["label"]) for r in rows], rotation=90, fontsize=7)
    ax.set_ylim(0, 1.22)  # room for the legends above the bars
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("recall (test)")
    ax.set_title(f"{ev.name}: per-class recall on the test set (* = rare class)", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    return _png(fig)


def pca_2d(points: np.ndarray) -> np.ndarray:
    """``(N, D)`` -> ``(N, 2)``: projection on the first two principal axes (numpy SVD; sign-fixed)."""
    x = np.asarray(points, dtype=np.float64)
    if len(x) == 0:
        return np.zeros((0, 2))
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    components = vt[:2]
    # The sign of a singular vector is arbitrary: make each component's largest loading positive.
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    projected = x @ (components * signs[:, None]).T
    if projected.shape[1] < 2:
        projected = np.pad(projected, ((0, 0), (0, 2 - projected.shape[1])))
    return projected


def plot_projection(ev: RunEvaluation) -> bytes:
    ref, queries = ev.reference, ev.queries
    xy = pca_2d(np.concatenate([ref.embeddings, queries.embeddings]))
    ref_xy, query_xy = xy[: len(ref)], xy[len(ref):]
    labels = np.concatenate([ref.label, queries.label])
    colours = _class_colours(labels)
    fig = new_figure(6.5, 5)
    ax = fig.add_subplot()
    for label in sorted(colours):
        sel = ref.label == label
        ax.scatter(ref_xy[sel, 0], ref_xy[sel, 1], s=10, alpha=0.45, color=colours[label], linewidths=0)
        sel = queries.label == label
        ax.scatter(query_xy[sel, 0], query_xy[sel, 1], s=28, marker="^", color=colours[label],
                   edgecolors="black", linewidths=0.5, label=_tick(ev, label))
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(f"{ev.name}: PCA of embeddings (dots: train+val, triangles: test)", fontsize=9)
    if len(colours) <= 30:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 if len(colours) <= 15 else 2)
    return _png(fig)


def plot_cmc(evaluations: Sequence[RunEvaluation]) -> bytes:
    fig = new_figure(5, 3.4)
    ax = fig.add_subplot()
    ranks = np.arange(1, 11)
    for ev in evaluations:
        ax.plot(ranks, ev.scores["cmc"], marker="o", markersize=3, label=f"{ev.row_name} ({ev.name})")
    ax.axvline(5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(ranks)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("rank")
    ax.set_ylabel("share of test cases matched")
    ax.set_title("CMC: correct class among the r nearest train+val cases", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def example_queries(ev: RunEvaluation, n: int) -> list[int]:
    """Up to ``n`` test queries (indices), one per class, rare classes first, then by label."""
    if n <= 0:
        return []
    rare = set(ev.rare_classes)
    order = np.lexsort((ev.queries.case_id.astype(str), ev.queries.label))
    chosen, seen = [], set()
    for index in sorted(order, key=lambda i: (int(ev.queries.label[i]) not in rare,)):
        label = int(ev.queries.label[index])
        if label not in seen:
            seen.add(label)
            chosen.append(int(index))
    # Fill with further queries when there are fewer classes than examples.
    chosen += [int(i) for i in order if int(i) not in chosen]
    return chosen[:n]


def retrieval_examples(ev: RunEvaluation, n: int) -> list[dict]:
    """For ``n`` test cases: the query and its top-5 train+val neighbours (case id, class, distance)."""
    out = []
    for q in example_queries(ev, n):
        neighbours = []
        for rank in range(min(N_NEIGHBOURS_SHOWN, ev.neighbor_indices.shape[1])):
            r = int(ev.neighbor_indices[q, rank])
            neighbours.append({"case_id": str(ev.reference.case_id[r]), "label": int(ev.reference.label[r]),
                               "name": ev.class_name(ev.reference.label[r]),
                               "distance": float(ev.neighbor_distances[q, rank])})
        out.append({"case_id": str(ev.queries.case_id[q]), "label": int(ev.queries.label[q]),
                    "name": ev.class_name(ev.queries.label[q]),
                    "predicted": ev.class_name(ev.scores["predictions"][q]), "neighbours": neighbours})
    return out


def plot_retrieval(ev: RunEvaluation, examples: list[dict]) -> bytes | None:
    if not examples:
        return None
    ids = [e["case_id"] for e in examples] + [n["case_id"] for e in examples for n in e["neighbours"]]
    slices = middle_slices(ev.embeddings.prepared, ids)
    columns = 1 + N_NEIGHBOURS_SHOWN
    fig = new_figure(1.7 * columns, 1.95 * len(examples))
    for row, example in enumerate(examples):
        cells = [(example, None)] + [(n, n["label"] == example["label"]) for n in example["neighbours"]]
        for col in range(columns):
            ax = fig.add_subplot(len(examples), columns, row * columns + col + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(cells):
                ax.axis("off")
                continue
            case, match = cells[col]
            image = slices.get(case["case_id"])
            if image is not None:
                ax.imshow(image.T, cmap="gray", origin="lower")
            # Class names can be long: wrap them so neighbouring titles do not overlap.
            name = "\n".join(textwrap.wrap(str(case["name"]).replace("_", " "), 18)[:2])
            if col == 0:
                title = f"query {case['case_id']}\n{name}"
                edge = "black"
            else:
                title = f"#{col} {case['case_id']} d={case['distance']:.3g}\n{name}"
                edge = "tab:green" if match else "tab:red"
            ax.set_title(title, fontsize=6.5)
            for spine in ax.spines.values():
                spine.set_edgecolor(edge)
                spine.set_linewidth(2.5)
    fig.suptitle(f"{ev.name}: test cases and their 5 nearest train+val cases "
                 "(middle axial slice; green = same class)", fontsize=8)
    return _png(fig)


# ---------------------------------------------------------------- report directory


def default_report_dir(run_dir: str | os.PathLike) -> Path:
    """A new directory ``RUN/reports/<YYYYmmdd-HHMMSS>`` (``-2``, ``-3`` ... when taken)."""
    base = Path(run_dir) / REPORTS_DIR
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = base / stamp, 1
    while candidate.exists():
        n += 1
        candidate = base / f"{stamp}-{n}"
    return candidate


def check_report_dir(path: str | os.PathLike) -> Path:
    """Refuse an existing non-empty directory (or a file): reports are never overwritten."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RaytumorError(f"{path}: already exists and is not empty; reports are never overwritten, choose another --out")
    return path


def _publish(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` onto ``target``; rename(2) itself refuses a non-empty target, so no report is lost."""
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RaytumorError(f"{target}: already exists and is not empty; reports are never overwritten") from None


# ---------------------------------------------------------------- writing


def comparison_table(evaluations: Sequence[RunEvaluation]) -> list[dict[str, str]]:
    """The paper's Table 2 with one row per run (formatted strings keyed by :data:`TABLE_COLUMNS`)."""
    return [ev.table_row() for ev in evaluations]


def _run_section(doc: ReportDoc, index: int, ev: RunEvaluation, n_examples: int) -> list[dict]:
    m = ev.metrics()
    slug = f"{index}-{''.join(c if c.isalnum() or c in '-_' else '_' for c in ev.name)}"
    doc.heading(2, f"{ev.name}: {ev.row_name}")
    doc.bullets([
        f"run directory: {m['run_dir']}",
        f"dataset: {m['dataset']} (prepared shape {'x'.join(map(str, m['shape']))})",
        f"K = {m['k']}; {m['n_reference']} reference cases (train + val), {m['n_queries']} test queries",
        f"KNN vectors: {'softmax outputs of the classifier' if m['knn_vectors'] == 'softmax' else 'unit embeddings'}"
        f" ({ev.reference.embeddings.shape[1]} dimensions)",
        f"Recall_μ {format_metric(m['recall_micro'])}, Recall_M {format_metric(m['recall_macro'])}, "
        f"Recall_M* {format_metric(m['recall_macro_rare'])}, Rank-5 {format_metric(m['rank5'])}, "
        f"Acc_clf {format_metric(m['acc_clf'], '-')}",
    ])
    doc.heading(3, "Per-class recall")
    doc.table(["Label", "Class", "Rare", "Test cases", "Recall"],
              [[str(r["label"]), r["name"], "*" if r["rare"] else "", str(r["n_test"]),
                format_metric(r["recall"], "n/a (no test case)")]
               for r in m["per_class"]])
    doc.image(f"{slug}-per-class-recall.png", plot_per_class_recall(ev), f"{ev.name} per-class recall")
    doc.heading(3, "Confusion matrix")
    doc.image(f"{slug}-confusion.png", plot_confusion(ev), f"{ev.name} confusion matrix")
    doc.heading(3, "Cumulative match characteristic")
    doc.table(["Rank"] + [str(r) for r in range(1, 11)], [["share"] + [format_metric(v) for v in m["cmc"]]])
    doc.heading(3, "Embedding projection")
    doc.image(f"{slug}-projection.png", plot_projection(ev), f"{ev.name} PCA projection")
    examples = retrieval_examples(ev, n_examples)
    if examples:
        doc.heading(3, "Similar cases")
        doc.table(["Query", "Class", "Predicted"] + [f"#{r}" for r in range(1, N_NEIGHBOURS_SHOWN + 1)],
                  [[e["case_id"], e["name"], e["predicted"]]
                   + [f"{n['case_id']} ({n['name']}, {n['distance']:.3g})" for n in e["neighbours"]]
                   for e in examples])
        doc.image(f"{slug}-retrieval.png", plot_retrieval(ev, examples), f"{ev.name} retrieved neighbours")
    return examples


def write_report(
    evaluations: Sequence[RunEvaluation],
    out_dir: str | os.PathLike,
    *,
    examples: int = 4,
) -> Path:
    """Write metrics.json, report.md, report.html and plots/ into the new directory ``out_dir``."""
    if not evaluations:
        raise ValueError("write_report needs at least one evaluation")
    target = check_report_dir(out_dir)
    created = time.strftime("%Y-%m-%dT%H:%M:%S")
    doc = ReportDoc()
    doc.heading(1, "raytumor evaluation report")
    ks = sorted({ev.scores["k"] for ev in evaluations})
    doc.para(f"Created {created}. Each test case is classified by a K = {', '.join(map(str, ks))} nearest-neighbour "
             "vote over the train + validation embeddings (non-augmented cases), as in Liu & Feng, Table 2.")
    doc.table(TABLE_COLUMNS, [list(row.values()) for row in comparison_table(evaluations)])
    doc.para("Recall_μ: micro recall; Recall_M: macro recall; Recall_M*: macro recall over rare classes (n/a when "
             "no rare class is in the test set); Rank-5: share of test cases with their class among the 5 nearest; "
             "Acc_clf: accuracy of the classification layer ('-' for triplet models). Rows are named "
             "ContrastivePretrain-Augment-Loss.", note=True)
    datasets = {str(ev.embeddings.dataset_dir) for ev in evaluations}
    if len(datasets) > 1:
        doc.para(f"Warning: the runs were evaluated on different datasets ({', '.join(sorted(datasets))}); "
                 "their rows are not directly comparable.")
    doc.image("cmc.png", plot_cmc(evaluations), "CMC curves")
    runs, all_examples = [], []
    for index, ev in enumerate(evaluations, start=1):
        all_examples.append(_run_section(doc, index, ev, examples))
        runs.append(ev.metrics())
    metrics = {"created": created, "reference_splits": list(REFERENCE_SPLITS), "query_splits": list(QUERY_SPLITS),
               "runs": runs, "table": comparison_table(evaluations)}
    for run, shown in zip(metrics["runs"], all_examples):
        run["retrieval_examples"] = shown

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        (tmp / "plots").mkdir(parents=True)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
        (tmp / "report.md").write_text(doc.markdown(), encoding="utf-8")
        (tmp / "report.html").write_text(doc.html_page("raytumor evaluation report"), encoding="utf-8")
        for name, png in doc.plots.items():
            (tmp / "plots" / name).write_bytes(png)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, target)
    return target


__all__ = [
    "table2_name",
    "format_metric",
    "RunEvaluation",
    "evaluate_run",
    "comparison_table",
    "pca_2d",
    "default_report_dir",
    "check_report_dir",
    "write_report",
    "TABLE_COLUMNS",
]
