"""Evaluation report: metrics.json against an independent K-NN, Table-2 rows, files never overwritten.

Runs are written by hand (a random-weight model saved like ``loops.py`` does) and the
preprocessing cache is written without Ray by the very ``preprocess_batch`` that Ray Data maps,
in the column layout Ray Data writes. The helpers here are shared with the retrieval and CLI tests.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raytumor.config import DataConfig, ModelConfig, PretrainConfig, RunConfig, TrainConfig, dump_config
from raytumor.data.manifest import (
    build_class_table,
    read_classes,
    read_manifest,
    resolve_path,
    write_classes,
    write_manifest,
)
from raytumor.data.preprocess import (
    META_FILE,
    SHARDS_DIR,
    PrepareSettings,
    cache_dir,
    fingerprint,
    load_prepared,
    preprocess_batch,
)
from raytumor.errors import RaytumorError
from raytumor.evaluate import knn_scores
from raytumor.evaluate.embeddings import embed_run, read_prepared, volumes_from_arrow
from raytumor.evaluate.report import (
    TABLE_COLUMNS,
    RunEvaluation,
    check_report_dir,
    default_report_dir,
    evaluate_run,
    format_metric,
    pca_2d,
    table2_name,
    write_report,
)
from raytumor.models import build_model
from raytumor.train.steps import embed_volumes
from raytumor.train.trainer import load_best_model
from tests.conftest import make_dataset

SHAPE = (16, 16, 4)
SOURCE_SHAPE = (12, 12, 4)
RARE = 2
PATIENT_PREFIX = "PATIENT-SECRET-"


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # small 3-D convs are far slower with many threads on a loaded box
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------- shared helpers


def make_eval_dataset(root: Path, n_per_class=(6, 6, 6)) -> Path:
    """A labelled dataset with distinctive patient ids, class ``RARE`` marked rare, and its cache."""
    dataset = make_dataset(root, n_per_class=n_per_class, shape=SOURCE_SHAPE, patients=True)
    manifest = read_manifest(dataset)
    manifest["patient_id"] = [f"{PATIENT_PREFIX}{i}" for i in range(len(manifest))]
    write_manifest(dataset, manifest)
    write_classes(dataset, build_class_table(manifest, rare_classes=[RARE]))
    write_prepared_cache(dataset)
    return dataset


def _ray_tensor_column(volumes: np.ndarray) -> tuple[pa.Field, pa.Array]:
    """The layout Ray Data writes: a large_list<float> column tagged with Ray's tensor extension."""
    per_row = int(np.prod(volumes.shape[1:]))
    offsets = pa.array(np.arange(len(volumes) + 1, dtype=np.int64) * per_row)
    array = pa.LargeListArray.from_arrays(offsets, pa.array(volumes.reshape(-1), type=pa.float32()))
    field = pa.field("volume", array.type, metadata={
        b"ARROW:extension:name": b"ray.data.arrow_tensor_v2",
        b"ARROW:extension:metadata": json.dumps(list(volumes.shape[1:])).encode(),
    })
    return field, array


def write_prepared_cache(dataset: Path, shape=SHAPE):
    """Write the preprocessing cache ``find_prepared`` looks for, without Ray."""
    settings = PrepareSettings(shape=shape)
    manifest = read_manifest(dataset)
    rows = manifest[["case_id", "image", "mask", "label", "split", "mask_kind"]].copy()
    rows["image"] = [resolve_path(dataset, p) for p in rows["image"]]
    rows["mask"] = [resolve_path(dataset, p) for p in rows["mask"]]
    rows["label"] = rows["label"].astype("float64")
    out = preprocess_batch(rows, settings)
    assert not any(out["error"]), out["error"]
    field, volume = _ray_tensor_column(out["volume"])
    columns = {name: pa.array(out[name]) for name in ("case_id", "label", "split", "has_mask", "mask_kind", "augmented")}
    schema = pa.schema([pa.field(name, array.type) for name, array in columns.items()] + [field])
    table = pa.Table.from_arrays([*columns.values(), volume], schema=schema)
    target = cache_dir(dataset, settings, fingerprint(manifest, dataset, settings))
    (target / SHARDS_DIR).mkdir(parents=True)
    pq.write_table(table, target / SHARDS_DIR / "part-0.parquet")
    (target / META_FILE).write_text(json.dumps({
        "fingerprint": target.name.split("-", 1)[1], "shape": list(shape), "n_cases": len(rows), "n_quarantined": 0,
    }))
    return load_prepared(target)


def make_run(root: Path, dataset: Path, name: str, *, loss: str = "batch_hard", pretrain: str | None = None,
             augment: bool = False, seed: int = 0) -> Path:
    """A finished-looking run directory: config.yaml and best_model.pt with random weights."""
    torch.manual_seed(seed)
    num_classes = int(read_classes(dataset)["label"].max()) + 1
    triplet = loss in ("batch_hard", "batch_all")
    model = build_model("paper_cnn", embedding_dim=6 if triplet else num_classes, normalize=triplet, width=0.25)
    config = RunConfig(
        name=name, output_dir=str(root), seed=seed,
        data=DataConfig(dataset=str(dataset), shape=SHAPE, augment_rare=augment),
        model=ModelConfig(width=0.25, embedding_dim=6),
        pretrain=PretrainConfig(enabled=pretrain is not None, loss=pretrain or "batch_hard"),
        train=TrainConfig(loss=loss),
    )
    run_dir = root / name
    run_dir.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "config": config.model_dump(mode="json"), "epoch": 1,
                "num_classes": num_classes, "val_recall_macro": 0.5}, run_dir / "best_model.pt")
    (run_dir / "config.yaml").write_text(dump_config(config))
    return run_dir


def independent_scores(run_dir: Path, dataset: Path, k: int = 7, *, vectors_of: RunEvaluation | None = None) -> dict:
    """knn_scores from embeddings computed here, not by the report code.

    With ``vectors_of``, that evaluation's vectors are checked against the ones computed here
    and then searched instead. A random-weight cross-entropy model gives every case nearly the
    same softmax output (pairwise distances from 1e-6), and the float noise between two
    embedding passes at different batch sizes (3e-8) is enough to reorder neighbours.
    """
    model, config = load_best_model(run_dir)
    prepared = _prepared(dataset)
    frame, volumes = read_prepared(prepared)
    vectors = embed_volumes(model, volumes, torch.device("cpu"), batch_size=8)
    if vectors_of is not None:
        rows = vectors_of.embeddings.rows
        theirs = rows.embeddings[pd.Index(rows.case_id).get_indexer(frame["case_id"])]
        np.testing.assert_allclose(theirs, vectors, rtol=0, atol=1e-6)
        vectors = theirs
    ref = frame["split"].isin(["train", "val"]).to_numpy()
    test = (frame["split"] == "test").to_numpy()
    labels = frame["label"].to_numpy()
    logits = None
    if model.outputs_logits:
        with torch.no_grad():
            logits = model(torch.from_numpy(volumes[test])).numpy()
    return knn_scores(vectors[ref], labels[ref], vectors[test], labels[test], k=k, rare_classes=[RARE],
                      query_logits=logits)


def _prepared(dataset: Path):
    from raytumor.data.preprocess import find_prepared

    prepared = find_prepared(dataset, PrepareSettings(shape=SHAPE))
    assert prepared is not None
    return prepared


def table_rows(markdown: str) -> list[list[str]]:
    """Data rows of the first Markdown table whose header is the Table-2 header."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Model |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """One dataset with its cache, a triplet run and a cross-entropy run (module-wide: embedding costs)."""
    root = tmp_path_factory.mktemp("eval")
    dataset = make_eval_dataset(root / "ds")
    triplet = make_run(root / "runs", dataset, "triplet", pretrain="batch_hard", augment=True, seed=1)
    ce = make_run(root / "runs", dataset, "ce", loss="cross_entropy", seed=2)
    return {"root": root, "dataset": dataset, "triplet": triplet, "ce": ce,
            "eval_triplet": evaluate_run(embed_run(triplet)), "eval_ce": evaluate_run(embed_run(ce))}


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("pretrain, augment, loss, expected", [
    (None, False, "cross_entropy", "None-None-CrossEntropy"),
    ("batch_hard", True, "batch_hard", "BHTriplet-Aug-BHTriplet"),
    ("ntxent", False, "batch_hard", "NTXent-None-BHTriplet"),
    ("batch_all", True, "cross_entropy", "BATriplet-Aug-CrossEntropy"),
    (None, False, "interval", "None-None-Interval"),
    (None, True, "batch_all", "None-Aug-BATriplet"),
])
def test_table2_row_names(pretrain, augment, loss, expected):
    config = RunConfig(data=DataConfig(augment_rare=augment), train=TrainConfig(loss=loss),
                       pretrain=PretrainConfig(enabled=pretrain is not None, loss=pretrain or "batch_hard"))
    assert table2_name(config) == expected


def test_table2_row_name_of_weights_from_a_pretraining_run(tmp_path):
    pre = RunConfig(name="pre", pretrain=PretrainConfig(enabled=True, loss="ntxent"))
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "config.yaml").write_text(dump_config(pre))
    config = RunConfig(train=TrainConfig(loss="cross_entropy", pretrained=str(tmp_path / "pre")))
    assert table2_name(config) == "NTXent-None-CrossEntropy"


def test_metrics_json_equals_an_independent_knn(workspace, tmp_path):
    ev = workspace["eval_triplet"]
    out = write_report([ev], tmp_path / "report")
    run = json.loads((out / "metrics.json").read_text())["runs"][0]
    expected = independent_scores(workspace["triplet"], workspace["dataset"])
    for key in ("recall_micro", "recall_macro", "recall_macro_rare", "rank5"):
        assert run[key] == pytest.approx(expected[key], abs=1e-9), key
    assert run["cmc"] == pytest.approx(expected["cmc"], abs=1e-9)
    assert run["per_class_recall"] == pytest.approx({str(k): v for k, v in expected["per_class_recall"].items()})
    assert run["acc_clf"] is None
    manifest = read_manifest(workspace["dataset"])
    assert run["n_reference"] == int(manifest["split"].isin(["train", "val"]).sum())
    assert run["n_queries"] == int((manifest["split"] == "test").sum())
    assert run["k"] == 7 and run["rare_classes"] == [RARE]
    assert run["row_name"] == "BHTriplet-Aug-BHTriplet" and run["run"] == "triplet"
    counts = np.array(run["confusion_matrix"]["counts"])
    assert counts.sum() == run["n_queries"]
    assert np.trace(counts) / counts.sum() == pytest.approx(run["recall_micro"])


def test_report_files_hold_the_numbers_of_metrics_json(workspace, tmp_path):
    out = write_report([workspace["eval_triplet"]], tmp_path / "report", examples=2)
    metrics = json.loads((out / "metrics.json").read_text())
    run = metrics["runs"][0]
    markdown = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    [row] = table_rows(markdown)
    assert dict(zip(TABLE_COLUMNS, row)) == {
        "Model": "BHTriplet-Aug-BHTriplet",
        "Recall_μ": format_metric(run["recall_micro"]),
        "Recall_M": format_metric(run["recall_macro"]),
        "Recall_M*": format_metric(run["recall_macro_rare"]),
        "Rank-5": format_metric(run["rank5"]),
        "Acc_clf": "-",
        "Run": "triplet",
    }
    cells = re.findall(r"<td>([^<]*)</td>", page)
    for key in ("recall_micro", "recall_macro", "recall_macro_rare", "rank5"):
        assert format_metric(run[key]) in cells, key
    for entry in run["per_class"]:
        assert f"| {entry['label']} | {entry['name']} |" in markdown
        assert format_metric(entry["recall"]) in markdown
    # Self-contained HTML: every image inline, no external reference.
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) >= 5  # CMC, per-class recall, confusion, projection, retrieval
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert all(base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n" for src in images)
    assert "http://" not in page and "https://" not in page
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown):
        assert (out / link).read_bytes()[:4] == b"\x89PNG"
    # Retrieval examples: queries are test cases, neighbours train/val cases, five each.
    manifest = read_manifest(workspace["dataset"]).set_index("case_id")
    assert len(run["retrieval_examples"]) == 2
    for example in run["retrieval_examples"]:
        assert manifest.loc[example["case_id"], "split"] == "test"
        assert len(example["neighbours"]) == 5
        assert {manifest.loc[n["case_id"], "split"] for n in example["neighbours"]} <= {"train", "val"}
        assert [n["distance"] for n in example["neighbours"]] == sorted(n["distance"] for n in example["neighbours"])
    # Case ids only: no patient id anywhere.
    for text in (markdown, page, (out / "metrics.json").read_text()):
        assert PATIENT_PREFIX not in text


def test_two_runs_give_a_two_row_table_with_paper_row_names(workspace, tmp_path):
    out = write_report([workspace["eval_triplet"], workspace["eval_ce"]], tmp_path / "report", examples=1)
    metrics = json.loads((out / "metrics.json").read_text())
    rows = table_rows((out / "report.md").read_text())
    assert [row[0] for row in rows] == ["BHTriplet-Aug-BHTriplet", "None-None-CrossEntropy"]
    assert [row[-1] for row in rows] == ["triplet", "ce"]
    assert [r["Model"] for r in metrics["table"]] == ["BHTriplet-Aug-BHTriplet", "None-None-CrossEntropy"]
    triplet, ce = metrics["runs"]
    assert rows[0][5] == "-" and triplet["acc_clf"] is None
    expected = independent_scores(workspace["ce"], workspace["dataset"], vectors_of=workspace["eval_ce"])
    assert ce["acc_clf"] == pytest.approx(expected["acc_clf"])
    assert rows[1][5] == format_metric(ce["acc_clf"])
    assert ce["recall_macro"] == pytest.approx(expected["recall_macro"])
    assert ce["knn_vectors"] == "softmax" and triplet["knn_vectors"] == "embedding"


def test_a_report_directory_is_never_overwritten(workspace, tmp_path):
    ev = workspace["eval_triplet"]
    first = write_report([ev], tmp_path / "report", examples=0)
    before = {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()}
    with pytest.raises(RaytumorError, match="not empty"):
        write_report([ev], first, examples=0)
    assert {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()} == before
    with pytest.raises(RaytumorError, match="report"):
        check_report_dir(first)
    (tmp_path / "empty").mkdir()
    assert (write_report([ev], tmp_path / "empty", examples=0) / "metrics.json").is_file()
    # The default location is a fresh directory under the run, even within the same second.
    run_dir = tmp_path / "run"
    made = []
    for _ in range(2):
        made.append(write_report([ev], default_report_dir(run_dir), examples=0))
    assert len(set(made)) == 2 and all(p.parent == run_dir / "reports" for p in made)
    assert not [p for p in (run_dir / "reports").iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_missing_cache_names_the_prepare_command(tmp_path):
    dataset = make_dataset(tmp_path / "ds", n_per_class=(3, 3, 3), shape=SOURCE_SHAPE)
    run = make_run(tmp_path / "runs", dataset, "r")
    with pytest.raises(RaytumorError, match=r"raytumor data prepare .* --shape 16,16,4"):
        embed_run(run)


def test_pca_matches_sklearn_up_to_sign():
    from sklearn.decomposition import PCA

    points = np.random.default_rng(0).normal(size=(40, 6)) * np.array([5, 3, 1, 1, 0.5, 0.1])
    ours = pca_2d(points)
    theirs = PCA(n_components=2).fit_transform(points)
    assert np.allclose(np.abs(ours), np.abs(theirs), atol=1e-8)
    assert pca_2d(points[:, :1]).shape == (40, 2)


def test_volumes_from_arrow_reads_ray_and_arrow_tensor_layouts():
    volumes = np.random.default_rng(0).normal(size=(3, 2, 4, 4, 2)).astype(np.float32)
    _, ray_layout = _ray_tensor_column(volumes)
    assert np.array_equal(volumes_from_arrow(pa.chunked_array([ray_layout[:1], ray_layout[1:]]), (2, 4, 4, 2)), volumes)
    arrow_layout = pa.FixedShapeTensorArray.from_numpy_ndarray(volumes)
    assert np.array_equal(volumes_from_arrow(arrow_layout, (2, 4, 4, 2)), volumes)
    with pytest.raises(RaytumorError, match="values for 3 rows"):
        volumes_from_arrow(ray_layout, (2, 4, 4, 3))


def test_augmented_rows_are_not_used(workspace, tmp_path):
    """Rare-case copies in the shards never join the reference or query sets."""
    prepared = _prepared(workspace["dataset"])
    frame, _ = read_prepared(prepared)
    table = pq.read_table(prepared.shards)
    extra = table.slice(0, 2)
    extra = extra.set_column(extra.schema.get_field_index("augmented"), "augmented", pa.array([True, True]))
    extra = extra.set_column(0, "case_id", pa.array(["aug-a", "aug-b"]))
    pq.write_table(extra, prepared.shards / "part-augmented.parquet")
    try:
        again, _ = read_prepared(prepared)
        assert sorted(again["case_id"]) == sorted(frame["case_id"])
    finally:
        (prepared.shards / "part-augmented.parquet").unlink()
