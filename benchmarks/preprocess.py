"""Benchmark: preprocessing with Ray Data (``prepare_dataset``) vs a single-process loop, and the cache hit.

A demo dataset (``make_demo_dataset``, MNI152 cases with synthetic tumours, NIfTI on disk at
``--raw-shape``, default 64 x 64 x 16, no unlabelled cases) is written into a temp dir and
prepared to ``--shape`` (default 32 x 32 x 8) two ways, in one process:

- ``loop``: a single-process loop over the manifest doing exactly what ``preprocess_batch``
  does per case (``check_case`` + ``reorient_to_ras`` + ``preprocess_volume``) and writing one
  Parquet file with pyarrow (same columns, fixed-shape tensor volume). It runs in this process
  at torch's default thread count, after importing what it needs (so it pays no import).
- ``prepare_dataset(dataset, PrepareSettings(shape), force=True)`` on a Ray started with
  ``ray.init(num_cpus=2, include_dashboard=False)`` (workers at niceness 0 and with the
  worker set-up hook of ``raytumor.runtime.EMBEDDED_RUNTIME_ENV``, as ``raytumor`` starts them). ``ray.init`` is not timed; everything ``prepare_dataset`` does is. Its first
  call (``cold``) pays Ray Data's first start and the workers' imports of torch, MONAI and
  nibabel, which is what ``raytumor data prepare`` pays after ``ray.init``; later calls
  (``warm``) do not.

The machine is shared, so every Ray timing is bracketed by loop runs: the sequence is
``L P L P L ...`` and each Ray figure is compared with the mean of the loop runs just before
and after it. Figures:

1. Speed-up = loop seconds / ``prepare_dataset`` seconds, cold (first call) and warm (the
   median over ``--rounds`` warm calls).
2. Cache hit: ``prepare_dataset`` without ``force`` on the unchanged dataset (fingerprint of
   the manifest and every file's size and mtime, then ``meta.json``), median of 3 calls.
3. Why (left out by ``--skip-variants``), each bracketed by loop runs like the above, warm
   workers: the loop at 1 torch thread (a Ray task runs with ``OMP_NUM_THREADS=1``); the map
   stage alone (``from_pandas`` into B blocks -> ``map_batches(preprocess_batch)`` ->
   ``materialize``, as ``prepare_dataset`` builds it, with ``B = min(cases // batch + 1,
   4 x CPUs)``) for several block counts and batch sizes, with Ray Data's per-task wall/CPU
   seconds and their split into input conversion, function body and output build, and with
   Ray Data's per-operator resource reservation on (its default) and off
   (``DataContext.op_resource_reservation_enabled = False``: on 2 CPUs the reservation was
   seen to run the map's tasks one at a time); what follows the map inside
   ``prepare_dataset`` (two filters, ``write_parquet``, ``to_pandas``, ``count``) on a
   materialised result, and a leaner two-pass version of it; a single streaming pass (map ->
   ``write_parquet`` of every row, errors read back with pyarrow: a sketch of a leaner
   ``prepare_dataset``, not what it does); ``prepare_dataset`` with
   ``batch_size=64`` and with the reservation off (set on the driver's ``DataContext``,
   ``raytumor`` unchanged); and the import time a fresh worker process pays (measured in a
   fresh Python process). The loop's own time is split into read + check, reorient, resize +
   normalise, and Parquet write, with its CPU seconds.

The loop's output is checked against the cache ``prepare_dataset`` wrote (same case ids, same
volumes), so both sides did the same work.

    python benchmarks/preprocess.py [--json results.json] [--smoke] [--scale 0.05] [--rounds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SPEEDUP = 1.7
TARGET_CACHE_HIT_S = 1.0
# Default: 291 cases (demo scale 0.05), ~2 min in all on 2 busy cores.
# Smoke: the demo's smallest dataset (135 cases, 5 per class) cut to 40 cases of 32x32x8.
SIZES = {
    "default": dict(scale=0.05, raw_shape=(64, 64, 16), cases=None, rounds=2),
    "smoke": dict(scale=0.0001, raw_shape=(32, 32, 8), cases=40, rounds=1),
}
# What a Ray worker imports before its first preprocessing task can run.
WORKER_IMPORTS = "import raytumor.data.preprocess, monai.transforms, nibabel, pandas, pyarrow"


# --- set-up ---------------------------------------------------------------------------------


def make_data(workdir: Path, scale: float, raw_shape, cases: int | None, seed: int) -> tuple[Path, dict]:
    """A demo dataset; with ``cases``, its manifest cut to that many rows spread over it."""
    import numpy as np

    from raytumor.data.demo import make_demo_dataset
    from raytumor.data.manifest import read_manifest, write_manifest

    summary = make_demo_dataset(workdir / "demo", scale=scale, seed=seed, unlabelled=0, shape=raw_shape)
    manifest = read_manifest(summary.out_dir)
    if cases is not None and cases < len(manifest):
        keep = np.unique(np.linspace(0, len(manifest) - 1, cases).round().astype(int))
        write_manifest(summary.out_dir, manifest.iloc[keep].reset_index(drop=True))
        manifest = read_manifest(summary.out_dir)
    return summary.out_dir, {"cases": len(manifest), "raw_shape": list(raw_shape), "generate_s": round(summary.seconds, 2)}


def manifest_rows(dataset: Path):
    """The rows ``prepare_dataset`` hands to Ray Data (same columns and path resolution)."""
    from raytumor.data.manifest import read_manifest, resolve_path

    rows = read_manifest(dataset)
    rows["image"] = [resolve_path(dataset, p) for p in rows["image"]]
    rows["mask"] = [resolve_path(dataset, p) for p in rows["mask"]]
    rows = rows[["case_id", "image", "mask", "label", "split", "mask_kind"]].copy()
    rows["label"] = rows["label"].astype("float64")
    return rows


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


# --- the single-process loop ----------------------------------------------------------------


def loop_prepare(dataset: Path, settings, out_file: Path) -> dict:
    """The per-case work of ``preprocess_batch`` in one loop, then one Parquet file. Seconds per piece."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytumor.data.preprocess import preprocess_volume
    from raytumor.data.validate import CaseCheckError, check_case
    from raytumor.data.volumes import reorient_to_ras

    started, cpu_started = time.perf_counter(), time.process_time()
    rows = manifest_rows(dataset)
    split = {"read_check_s": 0.0, "reorient_s": 0.0, "resize_normalise_s": 0.0}
    volumes, has_mask, quarantined = [], [], 0
    for row in rows.itertuples(index=False):
        t0 = time.perf_counter()
        try:
            image, mask = check_case(row.image, row.mask, allow_2d=settings.allow_2d)
        except CaseCheckError:
            quarantined += 1
            volumes.append(None)
            has_mask.append(False)
            split["read_check_s"] += time.perf_counter() - t0
            continue
        t1 = time.perf_counter()
        image_ras = reorient_to_ras(image)
        mask_ras = reorient_to_ras(mask) if mask is not None else None
        t2 = time.perf_counter()
        volumes.append(preprocess_volume(image_ras, mask_ras, settings))
        has_mask.append(mask is not None)
        t3 = time.perf_counter()
        split["read_check_s"] += t1 - t0
        split["reorient_s"] += t2 - t1
        split["resize_normalise_s"] += t3 - t2
    t0 = time.perf_counter()
    good = np.array([v is not None for v in volumes])
    kept = rows[good]
    table = pa.table({
        "case_id": pa.array(kept["case_id"].astype(str)),
        "label": pa.array(kept["label"].fillna(-1).astype(np.int64)),
        "split": pa.array(kept["split"].astype(str)),
        "has_mask": pa.array(np.asarray(has_mask, dtype=bool)[good]),
        "mask_kind": pa.array(kept["mask_kind"].fillna("").astype(str)),
        "augmented": pa.array(np.zeros(len(kept), dtype=bool)),
        "volume": pa.FixedShapeTensorArray.from_numpy_ndarray(np.stack([v for v in volumes if v is not None])),
    })
    pq.write_table(table, out_file)
    split["write_s"] = time.perf_counter() - t0
    return {"total_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu_started, **split,
            "cases": len(rows), "quarantined": quarantined}


def check_same_output(loop_file: Path, prepared) -> dict:
    """Loop output vs the Ray cache: same case ids, largest volume difference."""
    import numpy as np
    import pyarrow.parquet as pq
    import ray

    ours = pq.read_table(loop_file)
    ours_ids = ours.column("case_id").to_pylist()
    ours_volumes = ours.column("volume").combine_chunks().to_numpy_ndarray()
    theirs = ray.data.read_parquet(str(prepared.shards)).select_columns(["case_id", "volume"]).to_pandas()
    by_id = dict(zip(theirs["case_id"], theirs["volume"]))
    diff = max(float(np.abs(np.asarray(by_id[c], dtype=np.float32) - v).max()) for c, v in zip(ours_ids, ours_volumes))
    return {"same_case_ids": sorted(ours_ids) == sorted(by_id), "max_abs_volume_difference": diff}


class Bracketed:
    """Runs the loop between every Ray measurement; each Ray figure is compared with the mean of
    the loop runs just before and after it (``L x L y L ...``)."""

    def __init__(self, loop):
        self.loop = loop
        self.loop_runs: list[dict] = [loop()]

    def measure(self, fn):
        seconds, out = timed(fn)
        self.loop_runs.append(self.loop())
        around = (self.loop_runs[-2]["total_s"] + self.loop_runs[-1]["total_s"]) / 2
        return seconds, around, out


# --- Ray Data pieces ------------------------------------------------------------------------


def map_stage(rows, settings, blocks: int, batch_size: int):
    """``prepare_dataset``'s map stage alone: ``from_pandas`` in ``blocks`` -> ``map_batches`` -> ``materialize``."""
    import ray

    from raytumor.data.preprocess import preprocess_batch

    return (ray.data.from_pandas([rows.iloc[i::blocks] for i in range(blocks)])
            .map_batches(preprocess_batch, fn_kwargs={"settings": settings}, batch_size=batch_size,
                         batch_format="pandas")
            .materialize())


def map_task_stats(processed) -> dict:
    """Ray Data's own figures for the map operator: tasks, and summed per-task seconds."""
    import re

    for op in processed.get_stats_summary().operators_stats:
        if "MapBatches" not in op.operator_name:
            continue
        tasks = re.search(r"(\d+) tasks executed", op.block_execution_summary_str)
        out = {"tasks": int(tasks.group(1)) if tasks else None}
        for name in ("wall_time", "cpu_time", "input_prep_time", "function_body_time", "output_build_time"):
            summary = getattr(op, name, None)
            out[f"task_{name}_sum_s"] = round(float(summary.sum), 3) if summary else None
        return out
    return {}


def after_map_stage(processed, out_dir: Path) -> None:
    """What ``prepare_dataset`` does after the map: filter + write the good rows, collect the bad, count."""
    from ray.data.expressions import col

    good = processed.filter(expr=col("error") == "").drop_columns(["error", "error_file"])
    good.write_parquet(str(out_dir))
    processed.filter(expr=col("error") != "").select_columns(["case_id", "error_file", "error"]).to_pandas()
    good.count()


def after_map_lean(processed, out_dir: Path) -> None:
    """The same outputs in two passes: write the good rows, then one small ``to_pandas`` of the error
    columns for the quarantine list and the count (the rows' ``error`` is already materialised)."""
    from ray.data.expressions import col

    processed.filter(expr=col("error") == "").drop_columns(["error", "error_file"]).write_parquet(str(out_dir))
    errors = processed.select_columns(["case_id", "error_file", "error"]).to_pandas()
    int((errors["error"] == "").sum())


def single_pass(rows, settings, blocks: int, batch_size: int, out_dir: Path) -> int:
    """One streaming execution instead of four: map -> ``write_parquet`` of every row (error columns
    kept), then the quarantine list and count from the small columns with pyarrow. A sketch of a
    leaner ``prepare_dataset``; readers would then filter ``error == ""``."""
    import pyarrow.parquet as pq
    import ray

    from raytumor.data.preprocess import preprocess_batch

    (ray.data.from_pandas([rows.iloc[i::blocks] for i in range(blocks)])
     .map_batches(preprocess_batch, fn_kwargs={"settings": settings}, batch_size=batch_size, batch_format="pandas")
     .write_parquet(str(out_dir)))
    errors = pq.read_table(out_dir, columns=["case_id", "error_file", "error"]).to_pandas()
    return int((errors["error"] == "").sum())


@contextlib.contextmanager
def without_reservation():
    """Ray Data's per-operator resource reservation off (``DataContext.op_resource_reservation_enabled``)
    for this driver while the block runs; ``prepare_dataset`` picks up the driver's context."""
    import ray

    ctx = ray.data.DataContext.get_current()
    before = ctx.op_resource_reservation_enabled
    ctx.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        ctx.op_resource_reservation_enabled = before


def worker_import_s() -> float:
    """Seconds a fresh Python process takes to import what a preprocessing task needs."""
    code = f"import time; t = time.perf_counter(); {WORKER_IMPORTS}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def map_variants(n_cases: int, cpus: int) -> list[tuple[int, int]]:
    """(blocks, batch_size) pairs: prepare_dataset's own layout first, then fewer/more tasks and batches."""
    own = (max(1, min(n_cases // 8 + 1, cpus * 4)), 8)
    per_block = lambda blocks: math.ceil(n_cases / blocks)  # noqa: E731 - one batch per block
    pairs = [own, (cpus, 8), (own[0], per_block(own[0])), (cpus, per_block(cpus))]
    return list(dict.fromkeys(pairs))


# --- the run --------------------------------------------------------------------------------


def machine() -> dict:
    import ray
    import torch

    return {"cpu_count": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__,
            "ray": ray.__version__, "python": platform.python_version(),
            "torch_threads_loop": torch.get_num_threads()}


def run(args, size: dict, workdir: Path) -> dict:
    import ray

    from raytumor.data.manifest import read_manifest
    from raytumor.data.preprocess import PrepareSettings, fingerprint, prepare_dataset
    from raytumor.runtime import EMBEDDED_RUNTIME_ENV

    settings = PrepareSettings(shape=tuple(args.shape))
    print("writing the demo dataset ...", flush=True)
    dataset, data_facts = make_data(workdir, size["scale"], size["raw_shape"], size["cases"], args.seed)
    results = {"machine": machine(), "dataset": data_facts,
               "settings": {**size, "shape": list(settings.shape), "seed": args.seed, "smoke": args.smoke}}

    os.environ["RAY_worker_niceness"] = "0"  # as raytumor's embedded Ray (raytumor.runtime.ray_session)
    started = time.perf_counter()
    # As raytumor's embedded Ray: workers pin RAY_ADDRESS to this cluster.
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             runtime_env=EMBEDDED_RUNTIME_ENV)
    results["ray_init_s"] = round(time.perf_counter() - started, 2)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        load = [round(os.getloadavg()[0], 2)]
        print(f"loop and prepare_dataset, alternating: 1 cold + {size['rounds']} warm ...", flush=True)
        runs = iter(range(10_000))
        bench = Bracketed(lambda: loop_prepare(dataset, settings, workdir / f"loop-{next(runs)}.parquet"))
        ray_runs = []
        for _ in range(1 + size["rounds"]):
            seconds, around, prepared = bench.measure(lambda: prepare_dataset(dataset, settings, force=True))
            ray_runs.append({"prepare_s": round(seconds, 3), "loop_s_around": round(around, 3),
                             "speedup": round(around / seconds, 3)})
        load.append(round(os.getloadavg()[0], 2))
        hits = []
        for _ in range(3):
            seconds, hit = timed(lambda: prepare_dataset(dataset, settings))
            assert hit.cached, "prepare_dataset without force did not hit the cache"
            hits.append(seconds)
        manifest = read_manifest(dataset)
        fingerprint_s, _ = timed(lambda: fingerprint(manifest, dataset, settings))

        loops = bench.loop_runs
        cases = loops[0]["cases"]
        warm = ray_runs[1:]
        results["side_by_side"] = {
            "cases": cases,
            "runs": ray_runs,
            "loop_s_runs": [round(r["total_s"], 3) for r in loops],
            "speedup_cold": ray_runs[0]["speedup"],
            "speedup_warm": round(statistics.median(r["speedup"] for r in warm), 3),
            "prepare_s_cold": ray_runs[0]["prepare_s"],
            "prepare_s_warm": round(statistics.median(r["prepare_s"] for r in warm), 3),
            "loop_s": round(statistics.median(r["total_s"] for r in loops), 3),
            "target_speedup": TARGET_SPEEDUP,
            "cache_hit_s_runs": [round(s, 4) for s in hits],
            "cache_hit_s": round(statistics.median(hits), 4),
            "fingerprint_s": round(fingerprint_s, 4),
            "target_cache_hit_s": TARGET_CACHE_HIT_S,
            "load_average_before_after": load,
        }
        # The loop, its pieces and its CPU seconds, over every loop run of the section above.
        results["loop"] = {
            "cases_per_s": round(cases / statistics.median(r["total_s"] for r in loops), 1),
            "cpu_s_per_case_ms": round(1000 * statistics.median(r["cpu_s"] for r in loops) / cases, 2),
            "wall_s_per_case_ms": round(1000 * statistics.median(r["total_s"] for r in loops) / cases, 2),
            **{k: round(statistics.median(r[k] for r in loops), 3)
               for k in ("read_check_s", "reorient_s", "resize_normalise_s", "write_s")},
            "quarantined": loops[0]["quarantined"],
        }
        results["same_output"] = check_same_output(workdir / "loop-0.parquet", prepared)
        if not args.skip_variants:
            results["variants"] = variants(dataset, settings, workdir, bench, smoke=args.smoke)
    finally:
        ray.shutdown()
    return results


def variants(dataset: Path, settings, workdir: Path, bench: Bracketed, *, smoke: bool) -> dict:
    """Where ``prepare_dataset``'s time goes, on warm workers; see the module docstring, point 3."""
    import ray
    import torch

    from raytumor.data.preprocess import prepare_dataset

    print("variants: loop at 1 thread, map stage layouts, after-map stage, prepare_dataset settings ...", flush=True)
    out: dict = {"worker_import_s": None if smoke else round(worker_import_s(), 2)}
    rows = manifest_rows(dataset)
    n, cpus = len(rows), int(ray.available_resources().get("CPU", 1))

    def one_thread():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return bench.loop()
        finally:
            torch.set_num_threads(threads)

    seconds, around, _ = bench.measure(one_thread)
    out["loop_1_thread"] = {"loop_s": round(seconds, 3), "loop_default_threads_s_around": round(around, 3)}

    def ratio_row(seconds: float, around: float, **facts) -> dict:
        return {**facts, "seconds": round(seconds, 3), "loop_s_around": round(around, 3),
                "loop_over_this": round(around / seconds, 3)}

    layouts = map_variants(n, cpus)
    runs = [(blocks, batch, True) for blocks, batch in layouts] + [(blocks, batch, False) for blocks, batch in layouts[:2]]
    out["map_stage"] = []
    for blocks, batch, reservation in [(*layouts[0], True), (*layouts[0], False)] if smoke else runs:
        with contextlib.nullcontext() if reservation else without_reservation():
            seconds, around, processed = bench.measure(lambda: map_stage(rows, settings, blocks, batch))
        out["map_stage"].append(ratio_row(seconds, around, blocks=blocks, batch_size=batch, reservation=reservation,
                                          **map_task_stats(processed)))
        if "after_map" not in out:  # on prepare_dataset's own layout, which comes first
            after, around, _ = bench.measure(lambda: after_map_stage(processed, workdir / "after-map"))
            out["after_map"] = ratio_row(after, around)
            lean, around, _ = bench.measure(lambda: after_map_lean(processed, workdir / "after-map-lean"))
            out["after_map_lean"] = ratio_row(lean, around)
        del processed

    layout = layouts[0] if smoke else (cpus, 8)
    with without_reservation():
        seconds, around, n_good = bench.measure(
            lambda: single_pass(rows, settings, *layout, workdir / "single-pass"))
    assert n_good == n - bench.loop_runs[0]["quarantined"]
    out["single_pass"] = ratio_row(seconds, around, blocks=layout[0], batch_size=layout[1], reservation=False)

    out["prepare_dataset"] = []
    for batch, reservation in [(8, False)] if smoke else [(64, True), (8, False), (64, False)]:
        with contextlib.nullcontext() if reservation else without_reservation():
            seconds, around, _ = bench.measure(lambda: prepare_dataset(dataset, settings, force=True, batch_size=batch))
        out["prepare_dataset"].append(ratio_row(seconds, around, batch_size=batch, reservation=reservation,
                                                blocks=max(1, min(n // batch + 1, cpus * 4))))
    return out


def print_report(results: dict) -> None:
    m, s, d, lp = results["machine"], results["side_by_side"], results["dataset"], results["loop"]
    print(f"\nMachine: {m['cpu_count']} CPUs (load {m['load_average_1m']} at start, "
          f"{s['load_average_before_after'][1]} after the main runs), torch {m['torch']}, ray {m['ray']}; "
          f"loop at {m['torch_threads_loop']} torch threads")
    print(f"Dataset: {d['cases']} demo cases, {'x'.join(map(str, d['raw_shape']))} NIfTI -> "
          f"{'x'.join(map(str, results['settings']['shape']))}; ray.init {results['ray_init_s']:.1f} s (not timed)")
    print(f"\n{'':>30} {'prepare s':>10} {'loop s (around)':>16} {'speed-up':>9}")
    for i, r in enumerate(s["runs"]):
        label = "prepare_dataset, cold" if i == 0 else f"prepare_dataset, warm {i}"
        print(f"{label:>30} {r['prepare_s']:>10.2f} {r['loop_s_around']:>16.2f} {r['speedup']:>9.2f}")
    print(f"   speed-up cold {s['speedup_cold']:.2f}, warm (median) {s['speedup_warm']:.2f}; target >= {s['target_speedup']}")
    print(f"   cache hit {s['cache_hit_s']:.3f} s (median of 3; target < {s['target_cache_hit_s']} s), "
          f"fingerprint alone {s['fingerprint_s']:.3f} s")
    print(f"   loop: {lp['cases_per_s']:.0f} cases/s, {lp['wall_s_per_case_ms']:.1f} ms wall and "
          f"{lp['cpu_s_per_case_ms']:.1f} ms CPU per case; read + check {lp['read_check_s']:.2f} s, reorient "
          f"{lp['reorient_s']:.2f} s, resize + normalise {lp['resize_normalise_s']:.2f} s, Parquet write {lp['write_s']:.2f} s")
    same = results["same_output"]
    print(f"   same output: case ids {same['same_case_ids']}, largest volume difference {same['max_abs_volume_difference']:.2e}")
    v = results.get("variants")
    if not v:
        return
    one = v["loop_1_thread"]
    print(f"\nWhere the time goes (warm workers; every row bracketed by loop runs). Fresh-process import of a "
          f"task's modules: {_f(v['worker_import_s'])} s; loop at 1 torch thread {one['loop_s']:.2f} s vs "
          f"{one['loop_default_threads_s_around']:.2f} s at {m['torch_threads_loop']}")
    print("Map stage alone (from_pandas -> map_batches(preprocess_batch) -> materialize); task columns are Ray Data's "
          "per-task seconds, summed")
    print(f"{'blocks':>7} {'batch':>6} {'reserve':>8} {'map s':>7} {'loop s':>7} {'loop/map':>9} {'tasks':>6}"
          f" {'task wall':>10} {'task CPU':>9} {'to pandas':>10} {'fn body':>8} {'to block':>9}")
    for r in v["map_stage"]:
        print(f"{r['blocks']:>7} {r['batch_size']:>6} {str(r['reservation']):>8} {r['seconds']:>7.2f}"
              f" {r['loop_s_around']:>7.2f} {r['loop_over_this']:>9.2f} {r.get('tasks') or '-':>6}"
              f" {_f(r.get('task_wall_time_sum_s')):>10} {_f(r.get('task_cpu_time_sum_s')):>9}"
              f" {_f(r.get('task_input_prep_time_sum_s')):>10} {_f(r.get('task_function_body_time_sum_s')):>8}"
              f" {_f(r.get('task_output_build_time_sum_s')):>9}")
    a, lean = v["after_map"], v["after_map_lean"]
    print(f"   after the map as prepare_dataset does it (filter + write_parquet, filter + to_pandas, count): "
          f"{a['seconds']:.2f} s = {1 / a['loop_over_this']:.2f} x the loop; write + one to_pandas of the error "
          f"columns: {lean['seconds']:.2f} s = {1 / lean['loop_over_this']:.2f} x the loop")
    sp = v["single_pass"]
    print(f"   single pass (map -> write_parquet of all rows, errors read back with pyarrow; {sp['blocks']} blocks, batch "
          f"{sp['batch_size']}, reservation off): {sp['seconds']:.2f} s, loop {sp['loop_s_around']:.2f} s, "
          f"speed-up {sp['loop_over_this']:.2f}")
    for r in v["prepare_dataset"]:
        print(f"   prepare_dataset(batch_size={r['batch_size']}) ({r['blocks']} blocks), reservation "
              f"{'on' if r['reservation'] else 'off'}: {r['seconds']:.2f} s, loop {r['loop_s_around']:.2f} s, "
              f"speed-up {r['loop_over_this']:.2f}")


def _f(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="40 small cases, one warm round, fewest variants")
    parser.add_argument("--scale", type=float, help="demo dataset scale (default 0.05: 291 cases)")
    parser.add_argument("--cases", type=int, help="cut the manifest to this many cases")
    parser.add_argument("--raw-shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="NIfTI shape (default 64 64 16)")
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 32, 8], metavar=("X", "Y", "Z"), help="prepared shape")
    parser.add_argument("--rounds", type=int, help="warm prepare_dataset calls (default 2)")
    parser.add_argument("--skip-variants", action="store_true", help="leave out the where-the-time-goes part")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="where the temp dataset goes (default: system temp dir)")
    args = parser.parse_args()
    size = dict(SIZES["smoke" if args.smoke else "default"])
    size.update({k: v for k, v in (("scale", args.scale), ("cases", args.cases), ("rounds", args.rounds),
                                   ("raw_shape", tuple(args.raw_shape) if args.raw_shape else None)) if v})

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    os.environ.pop("RAY_ADDRESS", None)  # always a fresh local Ray, never another job's cluster
    # The loop's imports, before any timing (a Ray worker pays them in the cold call).
    import monai.transforms  # noqa: F401
    import nibabel  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="raytumor-prep-bench-", dir=args.workdir) as tmp:
        results = run(args, size, Path(tmp))
    print_report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
