"""Benchmark: Ray Train data-parallel scaling on this machine (2 workers vs 1), data wait, time to first batch.

Every run is a real ``raytumor.train.trainer.run_training(config)`` (training only, no
pre-training) on one local Ray (``ray.init(num_cpus=2)``, workers at niceness 0, started by
``raytumor.runtime.start_embedded_ray`` as ``raytumor`` starts them), over a small synthetic
dataset (``tests/conftest.py::make_dataset``: ``--classes`` classes x ``--cases-per-class`` blob
volumes, 70 % to train) prepared once and read once in the driver: every run gets the same
materialised Ray Datasets (``shared_datasets``), so Ray Data starts no read tasks while the
Train workers hold the CPUs.

1. Scaling. Resource layouts ``WORKERSxCPUS`` (``resources.num_workers`` x
   ``resources.cpus_per_worker``): the baseline ``1x1``, then by default ``2x0.5`` and ``2x1``
   (``--layouts 2x0.5 2x1 1x2`` adds one worker holding both CPUs). The baseline runs first and
   again after every other layout, and each layout is compared with the mean of the baseline
   runs just before and after it, so a change in machine load biases it less. Every worker runs
   the same ``--steps-per-epoch`` steps of ``train.batch_size`` rows per epoch (batch size is per
   worker, so 2 workers process twice the samples per epoch: weak scaling, as data-parallel
   training runs). The loop reports per-epoch ``samples_per_s`` (global: steps x batch x world
   size / rank 0's epoch seconds, validation excluded) in the run's ``metrics.csv``; steady
   state = epochs 2.. (total samples over total time). Efficiency = samples/s(layout) /
   (cores used x samples/s(1x1)), cores used = workers x CPUs per worker rounded up (Ray sets a
   worker's ``OMP_NUM_THREADS`` from its CPUs: 0.5 -> 1, 1 -> 1, 2 -> 2; the torch threads a
   fresh actor of each size gets are measured and reported). A layout that does not finish
   within ``--fit-timeout`` stops the benchmark with its partial JSON and says which
   (RAY-NOTES: Train workers holding every CPU can starve Ray Data).
2. Data wait: ``data_wait_fraction`` (time per epoch spent fetching the batch from the
   worker's in-memory shard) over epochs 2.., per layout, from ``metrics.csv``. Target < 2 %.
3. Time to first batch from the cache, measured on the workers: each run's ``first_batch_s``
   (``metrics.csv``, epoch 1), the slowest worker's time from its loop's start until its
   ``train`` shard is in memory plus assembling the first batch. Every run gets per-worker
   shards cut in the driver (``class_stratified_shards``, as ``raytumor`` does); the last
   layout runs once more without them (``--no-split-compare`` leaves it out), so Ray Train's
   ``streaming_split`` is compared side by side: time to first batch and fit wall time.
   Also reported: the driver's ``read_stage_datasets`` (read the Parquet cache, split
   train/val, materialise), median of 3 and the session's first call, and the time to cut
   the shards. Target < 2 s.

``--smoke`` (16x16x4 volumes, layouts ``1x1`` and ``2x0.5`` once each, 2 epochs x 2 steps, one
driver read, no ``streaming_split`` run, no thread probe, shorter Ray Train teardown) only checks
that the script runs.

    python benchmarks/scaling.py [--json results.json] [--smoke] [--layouts 2x0.5 2x1 1x2]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common import import_make_dataset, machine, run_then_exit, steady

SAMPLES_PER_CLASS = 3
TARGET_DATA_WAIT = 0.02
TARGET_FIRST_BATCH_S = 2.0
SIZES = {
    "default": dict(shape=(32, 32, 8), width=0.25, batch=30, classes=10, cases_per_class=12, epochs=4,
                    steps_per_epoch=8, layouts=["2x0.5", "2x1"]),
    "smoke": dict(shape=(16, 16, 4), width=0.25, batch=12, classes=4, cases_per_class=8, epochs=2,
                  steps_per_epoch=2, layouts=["2x0.5"]),
}


def parse_layout(text: str) -> tuple[int, float]:
    workers, cpus = text.lower().split("x")
    return int(workers), float(cpus)


# --- measurements ---------------------------------------------------------------------------


def driver_read(config, repeats: int) -> tuple[dict, dict]:
    """``read_stage_datasets`` in the driver (the cache read every run starts from), timed; also
    returns the datasets of the last read, for the runs to share."""
    from raytumor.train.datasets import read_stage_datasets

    read_s = []
    for _ in range(repeats):
        started = time.perf_counter()
        datasets = read_stage_datasets(config, augmented=False, pretraining=False, shard=())
        read_s.append(time.perf_counter() - started)
    return datasets, {
        "read_stage_datasets_s_runs": [round(x, 3) for x in read_s],
        "read_stage_datasets_s": round(statistics.median(read_s), 3),
        "first_call_s": round(read_s[0], 3),
        "train_rows": int(datasets["train"].count()),
        "train_mb": round(datasets["train"].size_bytes() / 2**20, 2),
        "repeats": repeats,
    }


def with_shards(datasets: dict, workers: int) -> dict:
    """The shared datasets with ``train`` cut into one class-stratified shard per worker (timed)."""
    from raytumor.train.datasets import class_stratified_shards

    started = time.perf_counter()
    shards = class_stratified_shards(datasets["train"], workers)
    return {**datasets, "shards": {"train": shards}, "shard_s": round(time.perf_counter() - started, 3)}


def actor_threads(cpu_sizes, capacity: float = 2.0) -> dict[str, int]:
    """torch threads in a fresh Ray actor holding each of ``cpu_sizes`` CPUs, as a Train worker is
    (Ray sets its ``OMP_NUM_THREADS``). Not tasks: a pooled task worker keeps the threads of the task
    that first imported torch in it. Actors that fit together start together."""
    import ray

    @ray.remote
    class Probe:
        def threads(self) -> int:
            import torch

            return torch.get_num_threads()

    groups, group = [], []
    for cpus in sorted(cpu_sizes):
        if group and sum(group) + cpus > capacity:
            groups.append(group)
            group = []
        group.append(cpus)
    groups.append(group)
    out = {}
    for group in groups:
        probes = [Probe.options(num_cpus=cpus).remote() for cpus in group]
        try:
            out.update({f"{cpus:g}": n for cpus, n in zip(group, ray.get([p.threads.remote() for p in probes]))})
        finally:
            for probe in probes:
                ray.kill(probe)
    return out


def run_layout(base_overrides: list[str], name: str, workers: int, cpus: float, steps: int, shared: dict,
               timeout_s: float, partial: dict, json_path: str | None) -> dict:
    """One ``run_training`` with ``workers`` x ``cpus``; its per-epoch history from ``metrics.csv``."""
    import pandas as pd

    from raytumor.config import load_config
    from raytumor.train.trainer import run_training

    config = load_config(overrides=[*base_overrides, f"name={name}", f"resources.num_workers={workers}",
                                    f"resources.cpus_per_worker={cpus}"])

    def hung() -> None:  # a layout that never starts (or stalls) would block here forever
        partial["hung"] = {"layout": f"{workers}x{cpus:g}", "after_s": timeout_s}
        print(f"\n{workers}x{cpus:g} did not finish within {timeout_s:.0f} s: stopping (partial results kept)",
              flush=True)
        if json_path:
            Path(json_path).write_text(json.dumps(partial, indent=2))
        os._exit(3)

    watchdog = threading.Timer(timeout_s, hung)
    watchdog.daemon = True
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    watchdog.start()
    try:
        result = run_training(config, stages=("train",), shared_datasets=shared,
                              extra_loop_config={"steps_per_epoch": steps})
    finally:
        watchdog.cancel()
    wall = time.perf_counter() - started
    history = pd.read_csv(result.run_dir / "metrics.csv").to_dict("records")
    rate, wait = steady(history)
    samples = sum(steps * config.train.batch_size * workers for _ in history)
    return {
        "layout": f"{workers}x{cpus:g}",
        "workers": workers,
        "cpus_per_worker": cpus,
        "shards": "stratified" if shared.get("shards", {}).get("train") else "streaming_split",
        "first_batch_s": round(float(history[0]["first_batch_s"]), 3),
        "samples_per_s": round(rate, 2),
        "data_wait_fraction": round(wait, 5),
        "data_wait_fraction_max": round(max(r["data_wait_fraction"] for r in history[1:] or history), 5),
        "epochs": [{k: round(float(r[k]), 5) for k in ("epoch", "samples_per_s", "data_wait_fraction", "loss")}
                   for r in history],
        "fit_wall_s": round(wall, 2),
        "wall_samples_per_s": round(samples / wall, 2),
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def efficiency_rows(runs: list[dict]) -> list[dict]:
    """Each non-baseline layout against the mean of the 1x1 runs just before and after it."""
    rows = []
    for i, r in enumerate(runs):
        if r["layout"] == "1x1" or r["shards"] != "stratified":
            continue
        around = [runs[j] for j in (i - 1, i + 1) if 0 <= j < len(runs) and runs[j]["layout"] == "1x1"]
        base_rate = statistics.mean(b["samples_per_s"] for b in around)
        base_wall = statistics.mean(b["wall_samples_per_s"] for b in around)
        cores = r["workers"] * math.ceil(r["cpus_per_worker"])
        rows.append({
            "layout": r["layout"],
            "cores_used": cores,
            "baseline_samples_per_s": round(base_rate, 2),
            "speedup_vs_1x1": round(r["samples_per_s"] / base_rate, 3),
            "efficiency": round(r["samples_per_s"] / (cores * base_rate), 3),
            "wall_speedup_vs_1x1": round(r["wall_samples_per_s"] / base_wall, 3),
        })
    return rows


# --- report ---------------------------------------------------------------------------------


def print_report(results: dict) -> None:
    m, s = results["machine"], results["settings"]
    print(f"\nMachine: {m['cpu_count']} CPUs (load {m['load_average_1m']} at start), torch {m['torch']}, ray {m['ray']}")
    print(f"Model paper_cnn width {s['width']}, 2x{'x'.join(map(str, s['shape']))}, batch {s['batch']} per worker, "
          f"{s['epochs']} epochs x {s['steps_per_epoch']} steps per worker; torch threads of a fresh Ray actor "
          f"by CPUs held: {results['worker_threads'] or 'not probed'}")
    print(f"\n{'layout':>8} {'samples/s':>10} {'data wait':>10} {'fit wall s':>11} {'wall samples/s':>15} {'load':>12}")
    for r in results["runs"]:
        load = "->".join(str(x) for x in r["load_average_before_after"])
        print(f"{r['layout']:>8} {r['samples_per_s']:>10.2f} {r['data_wait_fraction']:>10.4f} {r['fit_wall_s']:>11.1f}"
              f" {r['wall_samples_per_s']:>15.2f} {load:>12}")
    print("   samples/s: in-loop, global, epochs 2..; wall samples/s: every sample over the whole fit (start-up included)")
    print(f"\n{'layout':>8} {'cores':>6} {'speed-up vs 1x1':>16} {'efficiency':>11} {'wall speed-up':>14}")
    for r in results["scaling"]:
        print(f"{r['layout']:>8} {r['cores_used']:>6} {r['speedup_vs_1x1']:>16.3f} {r['efficiency']:>11.3f}"
              f" {r['wall_speedup_vs_1x1']:>14.3f}")
    print("   efficiency = samples/s / (cores used x samples/s of 1x1, mean of the 1x1 runs just before and after)")
    f = results["driver_read"]
    print(f"\nTime to first batch on the workers (slowest worker, epoch 1; target < {TARGET_FIRST_BATCH_S} s):")
    for r in results["runs"]:
        print(f"{r['layout']:>8} {r['shards']:>16} {r['first_batch_s']:>6.2f} s   fit {r['fit_wall_s']:.1f} s")
    split = results.get("split_compare")
    if split:
        print(f"   {split['layout']} with stratified shards vs Ray Train's streaming_split, side by side: first batch "
              f"{split['first_batch_s'][0]:.2f} vs {split['first_batch_s'][1]:.2f} s, fit {split['fit_wall_s'][0]:.1f} vs "
              f"{split['fit_wall_s'][1]:.1f} s")
    print(f"Driver: read_stage_datasets {f['read_stage_datasets_s']:.2f} s (median of {f['repeats']}; first call "
          f"{f['first_call_s']:.2f} s), shards cut in {results['shard_s']} s; {f['train_rows']} train rows, {f['train_mb']} MB")
    worst = max(r["data_wait_fraction"] for r in results["runs"])
    print(f"Data wait, epochs 2..: at most {worst:.4f} of a step over all layouts (target < {TARGET_DATA_WAIT})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiniest run (1x1 and 2x0.5, 2 epochs x 2 steps)")
    parser.add_argument("--layouts", nargs="+", help="WORKERSxCPUS layouts besides the 1x1 baseline "
                                                      "(default 2x0.5 2x1; 1x2 = one worker, 2 threads)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--steps-per-epoch", type=int)
    parser.add_argument("--no-split-compare", action="store_true",
                        help="leave out the last layout's extra run with Ray Train's streaming_split")
    parser.add_argument("--fit-timeout", type=float, default=300.0, help="seconds before a layout counts as hung")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="where the temp dataset and runs go (default: system temp dir)")
    args = parser.parse_args()
    size = dict(SIZES["smoke" if args.smoke else "default"])
    size.update({k: v for k, v in (("epochs", args.epochs), ("steps_per_epoch", args.steps_per_epoch)) if v})
    if args.layouts:
        size["layouts"] = [x for x in args.layouts if x != "1x1"]
    # The baseline first and after every other layout (in a smoke run, only first).
    layouts = [(1, 1.0)]
    for text in size["layouts"]:
        layouts += [parse_layout(text)] + ([] if args.smoke else [(1, 1.0)])

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    os.environ.pop("RAY_ADDRESS", None)  # always a fresh local Ray, never another job's cluster
    os.environ["RAY_worker_niceness"] = "0"  # as raytumor's embedded Ray (raytumor.runtime.ray_session)
    make_dataset = import_make_dataset()
    import ray

    from raytumor.config import load_config
    from raytumor.runtime import start_embedded_ray, stop_embedded_ray, train_env_vars

    train_env_vars(embedded=True)  # Ray Train's settings as raytumor's embedded Ray has them
    from raytumor.train.datasets import ensure_prepared

    results = {"machine": machine(), "settings": {**size, "seed": args.seed, "fit_timeout_s": args.fit_timeout}}
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="raytumor-scaling-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        shape = size["shape"]
        dataset = make_dataset(workdir / "ds", n_per_class=(size["cases_per_class"],) * size["classes"], shape=shape)
        base = [
            f"data.dataset={dataset}", f"data.shape=[{','.join(map(str, shape))}]", f"output_dir={workdir / 'runs'}",
            f"seed={args.seed}", f"model.width={size['width']}", f"train.batch_size={size['batch']}",
            f"train.samples_per_class={SAMPLES_PER_CLASS}", "train.loss=batch_hard", "train.margin=1.0",
            f"train.epochs={size['epochs']}", "resources.use_gpu=false", "resources.max_failures=0",
            "data.augment_rare=false",
        ]
        config = load_config(overrides=[*base, "name=proxy"])
        started = time.perf_counter()
        # As raytumor's embedded Ray: its processes have RAY_ADDRESS set to this cluster, so Ray
        # Train's placement-group cleaner cannot pick another Ray instance on this shared machine.
        start_embedded_ray(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        results["ray_init_s"] = round(time.perf_counter() - started, 2)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            started = time.perf_counter()
            ensure_prepared(config)
            results["prepare_s"] = round(time.perf_counter() - started, 2)
            print("read_stage_datasets ...", flush=True)
            datasets, results["driver_read"] = driver_read(config, repeats=1 if args.smoke else 3)
            shared = {w: with_shards(datasets, w) for w in sorted({w for w, _ in layouts})}
            results["shard_s"] = {str(w): d.pop("shard_s") for w, d in shared.items()}
            # Each probe is a fresh process importing torch (~1-2 s): left out of the smoke run.
            results["worker_threads"] = None if args.smoke else actor_threads({c for _, c in layouts})
            results["runs"] = []
            plan = [(w, c, shared[w]) for w, c in layouts]
            if not args.smoke and not args.no_split_compare:
                last = parse_layout(size["layouts"][-1])
                plan.append((*last, datasets))  # no shards: Ray Train's streaming_split
            for i, (workers, cpus, inputs) in enumerate(plan):
                print(f"run_training {workers}x{cpus:g} ({'stratified shards' if inputs.get('shards') else 'streaming_split'})"
                      " ...", flush=True)
                results["runs"].append(run_layout(base, f"run{i}-{workers}x{cpus:g}", workers, cpus,
                                                  size["steps_per_epoch"], inputs, args.fit_timeout, results, args.json))
            if len(plan) > len(layouts):
                split = results["runs"][-1]
                ours = [r for r in results["runs"] if r["layout"] == split["layout"] and r["shards"] == "stratified"][-1]
                results["split_compare"] = {
                    "layout": split["layout"],
                    "first_batch_s": [ours["first_batch_s"], split["first_batch_s"]],
                    "fit_wall_s": [ours["fit_wall_s"], split["fit_wall_s"]],
                }
        finally:
            stop_embedded_ray()
    results["scaling"] = efficiency_rows(results["runs"])
    print_report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    run_then_exit(main)
