"""Benchmark: sweep efficiency (TPE + ASHA vs random search without early stopping), Tune's
bookkeeping overhead, and pre-training reused across sweep trials vs recomputed.

Everything runs through ``raytumor.sweep.run.run_sweep`` on a fresh local Ray (2 CPUs, dashboard
on 127.0.0.1, workers at niceness 0 as ``raytumor sweep`` starts them) over a small demo
dataset written by ``make_demo_dataset`` into a temp dir and prepared once before any timing.

1. Efficiency. Two sweeps over the same search space (``train.loss``, ``train.margin``,
   ``model.embedding_dim``, as ``search_spaces/demo.yaml``), same seed, same trial count and
   epoch budget, ``max_concurrent_trials: 1``: (a) ``search: tpe`` + ASHA
   (``time_attr=epoch``, grace period 2, reduction factor 2), (b) ``search: random`` +
   ``scheduler: none`` (every trial runs every epoch). Optuna's TPE draws its first
   ``min(4, num_samples)`` trials with a ``RandomSampler`` of the same seed, so those
   configurations are the random sweep's first ones; the strategies differ in ASHA's stops
   and in the later trials. The same configuration does not give the same curve twice (seen:
   val Recall_M 0.130 vs 0.093 after 2 epochs), so with a handful of trials the comparison
   carries run-to-run noise; ``trial_log`` lists each trial's parameters, epochs and best value.
   Per-trial histories come from Tune's ``<experiment>/tune/<trial_id>/result.json`` (one JSON
   line per reported epoch). Trials are
   ordered by start time (first line's ``timestamp - time_total_s``, i.e. when Tune's clock for
   the trial started; ties by trial id) and their epochs concatenated in that order:
   - ``trial_epochs_to_target``: reported epochs (summed over trials, in that order) until the
     running best ``val_recall_macro`` first reaches >= 0.99 x the best value found by ANY
     strategy (None when it never does);
   - ``total_trial_epochs``, ``best_value``, ``sweep_wall_s`` (``run_sweep`` call, which
     includes reading the datasets into the driver and writing the leaderboard).
   - Tune bookkeeping overhead (one trial at a time only; None when trials overlapped) = 1 -
     (sum over trials of ``time_total_s`` of the trial's last report) / ``sweep_wall_s``.
     ``time_total_s`` is Tune's clock inside the trial: from the trainable's start to its last
     report, so it holds Ray Train's ``fit`` start-up (and any pre-training) and every epoch.
     The overhead is everything else: the driver reading the datasets, trial actor start and
     stop, Optuna and ASHA, result handling and syncing, and, for trials that
     ran to the end, Ray Train's teardown and the run-directory export after the last report
     (ASHA-stopped trials are killed at a report). Also split out:
     ``epochs_s`` = sum of per-epoch ``time_this_iter_s`` (a trial's first one also holds the fit
     start-up, so its epoch 1 is estimated as the median of the sweep's later epochs) and
     ``trial_startup_s`` = in-trial time minus ``epochs_s``.
   A third sweep, ``tpe_asha_auto``, is the TPE + ASHA one as the shipped configs now run it:
   0.5-CPU workers and ``max_concurrent_trials: auto`` (2 trials at once on 2 CPUs), against
   ``tpe_asha``'s one at a time with 1-CPU workers. Same space, seed and epoch budget; Optuna
   draws the same first configurations, and ASHA's stops may differ. Figures:
   ``most_trials_at_once`` (from the trials' spans), ``sweep_wall_s`` and
   ``trial_epochs_per_min``, and their ratios.
2. Pre-training reuse. A sweep with ``pretrain.enabled: true`` and fixed pre-training settings,
   sweeping only ``train.margin`` (random search, no early stopping): every trial has the same
   ``pretrain_key``. Counted per trial directory ``<experiment>/trials/<id>/``: a pre-training
   fit = ``pretrain/`` exists (Ray Train storage of a pre-training that ran); a reuse =
   ``pretrain_backbone.pt`` without ``pretrain/`` (copied from ``<experiment>/pretrain_cache/``).
   Measured time of a trial's pre-training step = mtime of ``pretrain_backbone.pt`` - mtime of
   ``config.yaml`` (written just before). The counterfactual where every trial pre-trains is an
   ESTIMATE: n_trials x the measured pre-training time; time saved = that - what the sweep spent.

Every Ray process gets ``RAY_ADDRESS`` = its own cluster (``start_embedded_ray``): without it,
on a machine running other Ray instances, Ray Train's placement-group cleaner fails and every
trial ASHA stops leaks its worker's CPU, which hangs the sweep on 2 CPUs.
``placement_groups_left_after`` counts what a sweep left behind (0 expected).

Ray Train runs with raytumor's settings (``raytumor.runtime.train_env_vars``: the controller
polls every 0.5 s). ``--smoke`` (2 trials x 2 epochs per strategy, 2 pre-training trials) only
checks that the script runs.

    python benchmarks/sweep_efficiency.py [--json results.json] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import machine, run_then_exit

METRIC = "val_recall_macro"
WITHIN = 0.99  # "within 1 % of the best": running best >= WITHIN x best value found

# Default and smoke sizes: dataset, trials, epochs. The default takes ~8-12 min on 2 busy cores.
SIZES = {
    "default": dict(scale=0.05, raw_shape=(24, 24, 8), shape=(16, 16, 8), unlabelled=20, width=0.25,
                    trials=6, epochs=8, grace_period=2, pretrain_trials=3, pretrain_epochs=3, pretrain_train_epochs=2),
    "smoke": dict(scale=0.02, raw_shape=(16, 16, 4), shape=(16, 16, 4), unlabelled=5, width=0.25,
                  trials=2, epochs=2, grace_period=1, pretrain_trials=2, pretrain_epochs=1, pretrain_train_epochs=1),
}
# One trial at a time with 1-CPU workers (as every sweep ran before `max_concurrent_trials: auto`),
# and TPE + ASHA as the shipped configs now run: 0.5-CPU workers, `auto` (2 at once on 2 CPUs).
STRATEGIES = {
    "tpe_asha": {"search": "tpe", "scheduler": "asha", "max_concurrent_trials": 1, "cpus_per_worker": 1},
    "random_no_stopping": {"search": "random", "scheduler": "none", "max_concurrent_trials": 1, "cpus_per_worker": 1},
    "tpe_asha_auto": {"search": "tpe", "scheduler": "asha", "max_concurrent_trials": "auto", "cpus_per_worker": 0.5},
}


# --- set-up ---------------------------------------------------------------------------------


def make_data(workdir: Path, size: dict, seed: int) -> tuple[Path, dict]:
    from raytumor.data.demo import make_demo_dataset

    summary = make_demo_dataset(workdir / "demo", scale=size["scale"], seed=seed, unlabelled=size["unlabelled"],
                                shape=size["raw_shape"])
    return summary.out_dir, {"cases": summary.counts, "unlabelled": summary.n_unlabelled,
                             "generate_s": round(summary.seconds, 2)}


def base_tree(dataset: Path, size: dict, seed: int) -> dict:
    """The run settings every trial shares (what a space's ``base`` holds)."""
    return {
        "seed": seed,
        "data": {"dataset": str(dataset), "shape": list(size["shape"]), "augment_rare": False},
        "model": {"encoder": "paper_cnn", "width": size["width"], "embedding_dim": 6},
        "pretrain": {"enabled": False, "loss": "batch_hard", "batch_size": 15, "epochs": size["pretrain_epochs"]},
        "train": {"loss": "batch_hard", "margin": 1.0, "epochs": size["epochs"], "batch_size": 30,
                  "samples_per_class": 3, "lr": 0.003},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "use_gpu": False, "max_failures": 0},
    }


def write_space(workdir: Path, name: str, base: dict, *, search: str, scheduler: dict, num_samples: int,
                parameters: dict, seed: int, max_concurrent_trials: int | str = 1, cpus_per_worker: float = 1) -> Path:
    import yaml

    space = {
        "name": name, "base": base, "search": search, "seed": seed, "num_samples": num_samples,
        "max_concurrent_trials": max_concurrent_trials, "results_dir": str(workdir / "results"),
        "objective": {"metric": METRIC, "mode": "max"}, "scheduler": scheduler,
        "resources": {"num_workers": 1, "cpus_per_worker": cpus_per_worker}, "parameters": parameters,
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def timed_sweep(space_path: Path) -> tuple[Path, float, float, list]:
    """Run one sweep; returns its experiment dir, wall seconds, wall-clock start and load averages."""
    from raytumor.sweep.run import run_sweep

    load_before = os.getloadavg()[0]
    started_at, started = time.time(), time.perf_counter()
    result = run_sweep(space_path, verbose=0)
    wall = time.perf_counter() - started
    return result.experiment_dir, wall, started_at, [round(load_before, 2), round(os.getloadavg()[0], 2)]


from raytumor.runtime import start_embedded_ray, stop_embedded_ray  # noqa: E402  (as raytumor's embedded Ray starts)


def live_placement_groups(wait_s: float = 15.0) -> int:
    """Placement groups not removed after a sweep (the cleaner gets ``wait_s`` to catch up)."""
    from ray.util import placement_group_table

    deadline = time.time() + wait_s
    while True:
        live = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
        if not live or time.time() > deadline:
            return len(live)
        time.sleep(1)


# --- analysis -------------------------------------------------------------------------------


def trial_histories(experiment: Path) -> list[dict]:
    """Each trial's reported epochs from Tune's result.json, trials in start order."""
    trials = []
    for result_file in sorted((experiment / "tune").glob("*/result.json")):
        rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if METRIC in r]
        if not rows:
            continue
        first = rows[0]
        trials.append({
            "trial_id": result_file.parent.name,
            "start": float(first["timestamp"]) - float(first["time_total_s"]),
            "epochs": [int(r["epoch"]) for r in rows],
            "values": [float(r[METRIC]) for r in rows],
            "iter_s": [float(r["time_this_iter_s"]) for r in rows],
            "time_total_s": float(rows[-1]["time_total_s"]),
            "params": {k: v for k, v in (rows[0].get("config") or {}).items() if not k.startswith("__")},
        })
    return sorted(trials, key=lambda t: (t["start"], t["trial_id"]))


def epochs_to_target(trials: list[dict], target: float) -> tuple[int | None, str | None]:
    """Cumulative trial-epochs (trials in start order) until the running best reaches ``target``."""
    spent, best = 0, -math.inf
    for trial in trials:
        for epoch, value in zip(trial["epochs"], trial["values"]):
            spent += 1
            best = max(best, value)
            if best >= target:
                return spent, f"{trial['trial_id']} epoch {epoch}"
    return None, None


def time_split(trials: list[dict]) -> tuple[float, float]:
    """(epochs_s, trial_startup_s) summed over trials. A trial's first ``time_this_iter_s`` holds
    the fit start-up and epoch 1; epoch 1 is estimated as the median of the sweep's later epochs."""
    later = [s for t in trials for s in t["iter_s"][1:]]
    typical = statistics.median(later) if later else 0.0
    epochs_s = startup_s = 0.0
    for t in trials:
        first_epoch = min(typical, t["iter_s"][0])
        epochs_s += sum(t["iter_s"][1:]) + first_epoch
        startup_s += t["time_total_s"] - sum(t["iter_s"][1:]) - first_epoch
    return epochs_s, startup_s


def most_at_once(trials: list[dict]) -> int:
    """The most trials running at the same moment (each from its start to its last report)."""
    events = sorted([(t["start"], 1) for t in trials] + [(t["start"] + t["time_total_s"], -1) for t in trials])
    running = most = 0
    for _, step in events:  # an end before a start at the same instant: -1 sorts first
        running += step
        most = max(most, running)
    return most


def strategy_figures(trials: list[dict], wall: float, started_at: float, target: float) -> dict:
    in_trial = sum(t["time_total_s"] for t in trials)
    one_at_a_time = most_at_once(trials) == 1
    epochs_s, startup_s = time_split(trials)
    spent, reached_at = epochs_to_target(trials, target)
    return {
        "trials": len(trials),
        "total_trial_epochs": sum(len(t["epochs"]) for t in trials),
        "best_value": round(max(max(t["values"]) for t in trials), 4),
        "target": round(target, 4),
        "trial_epochs_to_target": spent,
        "target_reached_at": reached_at,
        "sweep_wall_s": round(wall, 2),
        "in_trial_s": round(in_trial, 2),
        "epochs_s": round(epochs_s, 2),
        "trial_startup_s": round(startup_s, 2),
        # Only meaningful one trial at a time: trials at once overlap, so their times sum past the wall.
        "outside_trials_s": round(wall - in_trial, 2) if one_at_a_time else None,
        "tune_overhead_fraction": round(1 - in_trial / wall, 4) if one_at_a_time else None,
        "before_first_trial_s": round(trials[0]["start"] - started_at, 1),  # +-1 s: int timestamps
        "most_trials_at_once": most_at_once(trials),
        "trial_epochs_per_min": round(sum(len(t["epochs"]) for t in trials) / wall * 60, 2),
        "trial_log": [{"trial_id": t["trial_id"], "epochs": len(t["epochs"]), "best": round(max(t["values"]), 4),
                       "time_total_s": round(t["time_total_s"], 2), "params": t["params"]} for t in trials],
    }


def pretrain_figures(experiment: Path, trials: list[dict], wall: float) -> dict:
    fits, reuses, fit_s, reuse_s = [], [], [], []
    for run_dir in sorted((experiment / "trials").iterdir()):
        backbone = run_dir / "pretrain_backbone.pt"
        if not backbone.is_file():
            continue
        seconds = backbone.stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime
        if (run_dir / "pretrain").is_dir():
            fits.append(run_dir.name)
            fit_s.append(seconds)
        else:
            reuses.append(run_dir.name)
            reuse_s.append(seconds)
    n_trials = len(fits) + len(reuses)
    pretrain_s = statistics.mean(fit_s) if fit_s else float("nan")
    spent = sum(fit_s) + sum(reuse_s)
    counterfactual = n_trials * pretrain_s
    first_iter = {t["trial_id"]: t["iter_s"][0] for t in trials}
    return {
        "trials": n_trials,
        "pretrain_cache_keys": sorted(p.name for p in (experiment / "pretrain_cache").iterdir()),
        "pretraining_fits": len(fits),
        "reused_from_cache": len(reuses),
        "measured_pretrain_s": [round(s, 2) for s in fit_s],
        "measured_reuse_copy_s": [round(s, 3) for s in reuse_s],
        "pretrain_s_spent": round(spent, 2),
        "counterfactual_pretrain_s_estimate": round(counterfactual, 2),
        "saved_s_estimate": round(counterfactual - spent, 2),
        "sweep_wall_s": round(wall, 2),
        "saved_fraction_of_counterfactual_wall_estimate": round((counterfactual - spent) / (wall + counterfactual - spent), 4),
        # Tune's first iteration spans pre-training (or the copy) + Train start-up + epoch 1.
        "first_iter_s_fit_trials": [round(first_iter[t], 2) for t in fits if t in first_iter],
        "first_iter_s_reuse_trials": [round(first_iter[t], 2) for t in reuses if t in first_iter],
    }


# --- report ---------------------------------------------------------------------------------


def print_report(results: dict) -> None:
    m, s = results["machine"], results["settings"]
    print(f"\nMachine: {m['cpu_count']} CPUs (load {m['load_average_1m']} at start), torch {m['torch']}, ray {m['ray']}")
    print(f"Dataset: demo scale {s['scale']}, cases per split {results['dataset']['cases']}, prepared at {'x'.join(map(str, s['shape']))}; width {s['width']}; {s['trials']} trials x "
          f"up to {s['epochs']} epochs, seed {s['seed']}")
    eff = results["efficiency"]
    names = list(STRATEGIES)
    print(f"\n1. Efficiency: target = {WITHIN} x best {METRIC} of any strategy = {eff[names[0]]['target']:.4f}")
    print(f"{'':>34}" + "".join(f"{n:>20}" for n in names))
    rows = [
        ("best val Recall_M", "best_value", "{:.4f}"),
        ("trial-epochs to target", "trial_epochs_to_target", "{}"),
        ("total trial-epochs", "total_trial_epochs", "{}"),
        ("sweep wall s", "sweep_wall_s", "{:.1f}"),
        ("in-trial s (sum time_total_s)", "in_trial_s", "{:.1f}"),
        ("  of which epochs s", "epochs_s", "{:.1f}"),
        ("  of which Train start-up s", "trial_startup_s", "{:.1f}"),
        ("outside trials s", "outside_trials_s", "{:.1f}"),
        ("Tune overhead (1 - in/wall)", "tune_overhead_fraction", "{:.3f}"),
        ("most trials at once", "most_trials_at_once", "{}"),
        ("trial-epochs per minute", "trial_epochs_per_min", "{:.2f}"),
    ]
    for label, key, fmt in rows:
        cells = [eff[n][key] for n in names]
        print(f"{label:>34}" + "".join(f"{('-' if c is None else fmt.format(c)):>20}" for c in cells))
    for n in names:
        log = ", ".join(f"{t['trial_id'][-5:]}:{t['epochs']}ep/{t['best']:.3f}" for t in eff[n]["trial_log"])
        print(f"   {n}: {log}; target reached at {eff[n]['target_reached_at']}; "
              f"placement groups left after: {eff[n]['placement_groups_left_after']}")
    p = results["pretrain_reuse"]
    print(f"\n2. Pre-training reuse: {p['trials']} trials sharing one pre-training config "
          f"({len(p['pretrain_cache_keys'])} cache key), {s['pretrain_epochs']} pre-train epochs")
    print(f"   pre-training fits {p['pretraining_fits']}, reused from cache {p['reused_from_cache']}; "
          f"measured pre-training {p['measured_pretrain_s']} s, copies {p['measured_reuse_copy_s']} s")
    print(f"   pre-training time spent {p['pretrain_s_spent']:.1f} s vs every-trial-pre-trains "
          f"{p['counterfactual_pretrain_s_estimate']:.1f} s (ESTIMATE: n_trials x measured) -> saved "
          f"~{p['saved_s_estimate']:.1f} s of a {p['sweep_wall_s']:.1f} s sweep")
    print(f"   Tune's first iteration (pre-training + start-up + epoch 1): fit trials {p['first_iter_s_fit_trials']} s, "
          f"reuse trials {p['first_iter_s_reuse_trials']} s")
    one, auto = eff["tpe_asha"], eff["tpe_asha_auto"]
    print(f"\n3. Trials at once (TPE + ASHA): one at a time with 1-CPU workers vs max_concurrent_trials: auto with "
          f"0.5-CPU workers ({auto['most_trials_at_once']} at once): wall {one['sweep_wall_s']:.1f} vs "
          f"{auto['sweep_wall_s']:.1f} s ({one['sweep_wall_s'] / auto['sweep_wall_s']:.2f}x), trial-epochs per minute "
          f"{one['trial_epochs_per_min']:.2f} vs {auto['trial_epochs_per_min']:.2f} "
          f"({auto['trial_epochs_per_min'] / one['trial_epochs_per_min']:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--smoke", action="store_true",
                        help="tiniest run (2 trials x 2 epochs per strategy, 2 pre-training trials): ~2 min")
    parser.add_argument("--trials", type=int, help="trials per efficiency sweep (default 6)")
    parser.add_argument("--epochs", type=int, help="epoch budget per trial (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="dataset, search and training seed")
    parser.add_argument("--worker-niceness", type=int, default=0,
                        help="niceness of Ray's workers (0 as `raytumor sweep` starts them; Ray's default is 15)")
    parser.add_argument("--workdir", type=Path, help="where the temp dataset and sweeps go (default: system temp dir)")
    args = parser.parse_args()
    size = dict(SIZES["smoke" if args.smoke else "default"])
    size.update({k: v for k, v in (("trials", args.trials), ("epochs", args.epochs)) if v})

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    os.environ["RAY_worker_niceness"] = str(args.worker_niceness)  # read by the raylet ray.init starts
    os.environ.pop("RAY_ADDRESS", None)  # always a fresh local Ray, never another job's cluster
    import ray

    from raytumor.config import build_config
    from raytumor.runtime import train_env_vars

    train_env_vars(embedded=True)  # Ray Train's settings as raytumor's embedded Ray has them
    from raytumor.train.datasets import ensure_prepared

    results = {"machine": machine(), "settings": {**size, "seed": args.seed, "worker_niceness": args.worker_niceness,
                                                  "within": WITHIN, "metric": METRIC}}
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="raytumor-sweep-bench-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        print("writing the demo dataset ...", flush=True)
        dataset, results["dataset"] = make_data(workdir, size, args.seed)
        base = base_tree(dataset, size, args.seed)
        start_embedded_ray(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", logging_level=logging.ERROR,
                           log_to_driver=False)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            started = time.perf_counter()
            ensure_prepared(build_config(base))  # outside every timed sweep
            results["dataset"]["prepare_s"] = round(time.perf_counter() - started, 2)

            space = {
                "train.loss": {"type": "choice", "values": ["batch_all", "batch_hard"]},
                "train.margin": {"type": "uniform", "low": 0.1, "high": 1.0},
                "model.embedding_dim": {"type": "choice", "values": [6, 16]},
            }
            runs = {}
            for name, strategy in STRATEGIES.items():
                scheduler = ({"type": "asha", "grace_period": size["grace_period"], "reduction_factor": 2}
                             if strategy["scheduler"] == "asha" else {"type": "none"})
                path = write_space(workdir, name, base, search=strategy["search"], scheduler=scheduler,
                                   num_samples=size["trials"], parameters=space, seed=args.seed,
                                   max_concurrent_trials=strategy["max_concurrent_trials"],
                                   cpus_per_worker=strategy["cpus_per_worker"])
                print(f"sweep {name} ...", flush=True)
                experiment, wall, started_at, load = timed_sweep(path)
                runs[name] = (trial_histories(experiment), wall, started_at, load, live_placement_groups())

            best_either = max(max(max(t["values"]) for t in trials) for trials, *_ in runs.values())
            results["efficiency"] = {}
            for name, (trials, wall, started_at, load, leaked) in runs.items():
                figures = strategy_figures(trials, wall, started_at, WITHIN * best_either)
                results["efficiency"][name] = {**figures, "load_average_before_after": load,
                                               "placement_groups_left_after": leaked}

            pretrain_base = {**base, "pretrain": {**base["pretrain"], "enabled": True},
                             "train": {**base["train"], "epochs": size["pretrain_train_epochs"]}}
            path = write_space(workdir, "pretrain_reuse", pretrain_base, search="random", scheduler={"type": "none"},
                               num_samples=size["pretrain_trials"], seed=args.seed,
                               parameters={"train.margin": {"type": "uniform", "low": 0.1, "high": 1.0}})
            print("sweep pretrain_reuse ...", flush=True)
            experiment, wall, _, load = timed_sweep(path)
            results["pretrain_reuse"] = {**pretrain_figures(experiment, trial_histories(experiment), wall),
                                         "load_average_before_after": load,
                                         "placement_groups_left_after": live_placement_groups()}
        finally:
            stop_embedded_ray()
    print_report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    run_then_exit(main)
