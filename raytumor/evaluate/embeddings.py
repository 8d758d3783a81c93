"""Embeddings of a run's prepared cases: the input of the report and of the retrieval index.

The preprocessing cache (``raytumor data prepare``) is read with pyarrow alone, no Ray: its
``volume`` column holds ``(2, X, Y, Z)`` float32 tensors, stored by Ray Data as a list
column with extension metadata (or as Arrow's fixed-shape tensor). Rows are read and
embedded in batches, so memory stays bounded by the batch and not by the dataset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from raytumor.config import RunConfig
from raytumor.data.manifest import LABELLED_SPLITS, read_classes
from raytumor.data.preprocess import PrepareSettings, PreparedDataset, find_prepared
from raytumor.errors import DatasetError

META_COLUMNS = ("case_id", "label", "split")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class EmbeddedRows:
    """Prepared rows and their KNN vectors: ``case_id``, ``label``, ``split`` ``(N,)``, ``embeddings`` ``(N, D)`` float32."""

    case_id: np.ndarray
    label: np.ndarray
    split: np.ndarray
    embeddings: np.ndarray

    def __len__(self) -> int:
        return len(self.case_id)

    def select(self, splits: Iterable[str]) -> "EmbeddedRows":
        keep = np.isin(self.split, list(splits))
        return EmbeddedRows(self.case_id[keep], self.label[keep], self.split[keep], self.embeddings[keep])


@dataclass(frozen=True)
class RunEmbeddings:
    """A run's best model applied to its dataset's prepared cases."""

    run_dir: Path
    config: RunConfig
    dataset_dir: Path
    prepared: PreparedDataset
    classes: pd.DataFrame  # label, name, count, rare
    rows: EmbeddedRows
    outputs_logits: bool  # cross-entropy/interval model: embeddings are softmax outputs

    @property
    def name(self) -> str:
        return self.run_dir.resolve().name


def default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dataset_of(config: RunConfig, dataset: str | os.PathLike | None = None) -> Path:
    """The dataset directory of a run: ``dataset`` if given, else ``config.data.dataset``."""
    return Path(dataset if dataset is not None else config.data.dataset)


def prepared_for_config(config: RunConfig, dataset: str | os.PathLike | None = None) -> PreparedDataset:
    """The preprocessing cache of the run's dataset at the run's ``data.shape``; never builds one."""
    dataset_dir = dataset_of(config, dataset)
    shape = tuple(config.data.shape)
    prepared = find_prepared(dataset_dir, PrepareSettings(shape=shape))
    if prepared is None:
        shape_arg = ",".join(str(s) for s in shape)
        raise DatasetError(
            f"{dataset_dir}: no preprocessing cache for shape {shape_arg} matching the dataset as it is now; "
            f"run `raytumor data prepare {dataset_dir} --shape {shape_arg}`"
        )
    return prepared


def volumes_from_arrow(column: pa.Array | pa.ChunkedArray, shape: Sequence[int]) -> np.ndarray:
    """A tensor column of the cache -> ``(N, *shape)`` float32.

    Works for Ray's tensor extension (with or without Ray's types registered: without them
    the column reads as a plain list column) and for Arrow's fixed-shape tensor type.
    """
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type)):
        raise DatasetError(f"volume column has type {array.type}; expected a tensor (list) column")
    if array.null_count:
        raise DatasetError(f"volume column has {array.null_count} null row(s)")
    values = array.flatten()
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(values.type):
        values = values.flatten()  # nested storage (one list level per axis)
    flat = values.to_numpy(zero_copy_only=False)
    expected = len(array) * int(np.prod(shape))
    if flat.size != expected:
        raise DatasetError(f"volume column holds {flat.size} values for {len(array)} rows of shape {tuple(shape)}")
    volumes = flat.astype(np.float32, copy=False).reshape(len(array), *shape)
    # Zero-copy Arrow buffers are read-only; torch.from_numpy wants writable memory.
    return volumes if volumes.flags.writeable else volumes.copy()


def _scan(prepared: PreparedDataset, columns: Sequence[str], filter_expr, batch_rows: int):
    import pyarrow.dataset as pds

    if not prepared.shards.is_dir():
        raise DatasetError(f"{prepared.shards}: missing; rebuild the cache with `raytumor data prepare --force`")
    dataset = pds.dataset(str(prepared.shards), format="parquet")
    return dataset, dataset.to_batches(columns=list(columns), filter=filter_expr, batch_size=batch_rows)


def _rows_filter(splits: Sequence[str]):
    import pyarrow.dataset as pds

    return (pds.field("split").isin(list(splits))) & (pds.field("augmented") == False) & (pds.field("label") >= 0)  # noqa: E712


def count_rows(prepared: PreparedDataset, splits: Sequence[str] = LABELLED_SPLITS) -> int:
    """Labelled, non-augmented rows of ``splits`` in the cache."""
    import pyarrow.dataset as pds

    return pds.dataset(str(prepared.shards), format="parquet").count_rows(filter=_rows_filter(splits))


def iter_prepared(
    prepared: PreparedDataset, splits: Sequence[str] = LABELLED_SPLITS, *, batch_rows: int = 64
) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """Labelled, non-augmented rows of ``splits``: batches of (``case_id, label, split`` frame, volumes ``(B, 2, X, Y, Z)``)."""
    shape = (2, *prepared.shape)
    _, batches = _scan(prepared, (*META_COLUMNS, "volume"), _rows_filter(splits), batch_rows)
    for batch in batches:
        if batch.num_rows == 0:
            continue
        meta = pd.DataFrame({name: batch.column(name).to_pylist() for name in META_COLUMNS})
        yield meta, volumes_from_arrow(batch.column("volume"), shape)


def read_prepared(prepared: PreparedDataset, splits: Sequence[str] = LABELLED_SPLITS) -> tuple[pd.DataFrame, np.ndarray]:
    """All labelled, non-augmented rows of ``splits`` at once (small datasets and tests)."""
    frames, volumes = [], []
    for meta, batch in iter_prepared(prepared, splits):
        frames.append(meta)
        volumes.append(batch)
    if not frames:
        return pd.DataFrame(columns=list(META_COLUMNS)), np.zeros((0, 2, *prepared.shape), dtype=np.float32)
    return pd.concat(frames, ignore_index=True), np.concatenate(volumes)


def embed_prepared(
    model,
    prepared: PreparedDataset,
    splits: Sequence[str] = LABELLED_SPLITS,
    *,
    device=None,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> EmbeddedRows:
    """``model.embed`` of every labelled, non-augmented row of ``splits``, in cache order."""
    from raytumor.train.steps import embed_volumes

    device = device or default_device()
    model = model.to(device)
    total = count_rows(prepared, splits)
    ids, labels, split_names, chunks = [], [], [], []
    done = 0
    for meta, volumes in iter_prepared(prepared, splits, batch_rows=max(batch_size, 1)):
        chunks.append(embed_volumes(model, volumes, device, batch_size=batch_size))
        ids.extend(meta["case_id"])
        labels.extend(meta["label"])
        split_names.extend(meta["split"])
        done += len(meta)
        if progress is not None:
            progress(done, total)
    dim = getattr(model, "embedding_dim", 0)
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, dim), dtype=np.float32)
    return EmbeddedRows(
        case_id=np.asarray(ids, dtype=object),
        label=np.asarray(labels, dtype=np.int64),
        split=np.asarray(split_names, dtype=object),
        embeddings=embeddings.astype(np.float32, copy=False),
    )


def middle_slices(prepared: PreparedDataset, case_ids: Iterable[str]) -> dict[str, np.ndarray]:
    """Middle axial slice of channel 0 (the image) of each prepared case: ``{case_id: (X, Y)}``."""
    import pyarrow.dataset as pds

    wanted = sorted(set(map(str, case_ids)))
    if not wanted:
        return {}
    shape = (2, *prepared.shape)
    filter_expr = pds.field("case_id").isin(wanted) & (pds.field("augmented") == False)  # noqa: E712
    _, batches = _scan(prepared, ("case_id", "volume"), filter_expr, 64)
    out: dict[str, np.ndarray] = {}
    for batch in batches:
        volumes = volumes_from_arrow(batch.column("volume"), shape)
        for case_id, volume in zip(batch.column("case_id").to_pylist(), volumes):
            out[case_id] = np.ascontiguousarray(volume[0, :, :, shape[3] // 2])
    return out


def embed_run(
    run_dir: str | os.PathLike,
    splits: Sequence[str] = LABELLED_SPLITS,
    *,
    dataset: str | os.PathLike | None = None,
    device=None,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> RunEmbeddings:
    """Load a run's best model and embed its dataset's prepared ``splits`` (``dataset`` overrides the config's)."""
    from raytumor.train.trainer import load_best_model

    run_dir = Path(run_dir)
    model, config = load_best_model(run_dir)
    prepared = prepared_for_config(config, dataset)
    dataset_dir = dataset_of(config, dataset)
    rows = embed_prepared(model, prepared, splits, device=device, batch_size=batch_size, progress=progress)
    return RunEmbeddings(
        run_dir=run_dir,
        config=config,
        dataset_dir=dataset_dir,
        prepared=prepared,
        classes=read_classes(dataset_dir),
        rows=rows,
        outputs_logits=bool(model.outputs_logits),
    )


__all__ = [
    "EmbeddedRows",
    "RunEmbeddings",
    "prepared_for_config",
    "volumes_from_arrow",
    "iter_prepared",
    "read_prepared",
    "count_rows",
    "embed_prepared",
    "middle_slices",
    "embed_run",
]
