"""Run every benchmark, one subprocess each, collect their JSON and print one summary table.

Each script runs with ``--json DIR/<name>.json`` (its stdout and stderr go to ``DIR/<name>.log``)
one after the other, so no two compete for the 2 CPUs; a script that fails or runs past
``--timeout`` is reported and the others still run. ``--smoke`` is passed through (``knn.py``,
which has no ``--smoke``, gets a small size instead). ``gpu_throughput.py`` (figure 7) runs
only where torch sees a GPU, or with ``--smoke`` (on the CPU: it only checks that it runs). The
summary (figure, measured, target, met) is printed and written to ``DIR/summary.json``; the
figure numbers follow docs/benchmarks.md.

    python benchmarks/run.py [--smoke] [--json-dir DIR] [--only knn preprocess ...] [--timeout 1800]
                             [--paper-size-data DIR]

``--paper-size-data DIR`` adds figure 3 at the paper's size (``preprocess.py --full --data DIR``:
4,962 cases, written to DIR once, ~20 min, and reused; ~8 min per run after that).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
# name -> (script, extra arguments for --smoke); in the order they run.
SCRIPTS = {
    "knn": ("knn.py", ["--n-ref", "500", "--n-query", "100", "--repeats", "1"]),
    "preprocess": ("preprocess.py", ["--smoke"]),
    "read_volume": ("read_volume.py", ["--smoke"]),
    "scaling": ("scaling.py", ["--smoke"]),
    "train_throughput": ("train_throughput.py", ["--smoke"]),
    "sweep_efficiency": ("sweep_efficiency.py", ["--smoke"]),
    "gpu_throughput": ("gpu_throughput.py", ["--smoke"]),
}


PAPER_SIZE_RUN = "preprocess_full"


def run_script(name: str, smoke: bool, json_dir: Path, timeout: float, extra_args: tuple[str, ...] = ()) -> dict:
    script, smoke_args = SCRIPTS[name] if name != PAPER_SIZE_RUN else ("preprocess.py", [])
    path = BENCH_DIR / script
    if not path.is_file():
        return {"status": "missing", "seconds": 0.0}
    if name == "gpu_throughput" and not smoke and not cuda_available():
        return {"status": "skipped: no GPU", "seconds": 0.0}
    out = json_dir / f"{name}.json"
    out.unlink(missing_ok=True)
    command = [sys.executable, str(path), *(smoke_args if smoke else []), *extra_args, "--json", str(out)]
    started = time.perf_counter()
    with open(json_dir / f"{name}.log", "w") as log:
        try:
            proc = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = f"timeout after {timeout:.0f} s"
    seconds = time.perf_counter() - started
    if status == "ok" and not out.is_file():
        status = "no JSON"
    return {"status": status, "seconds": round(seconds, 1), "json": str(out) if out.is_file() else None}


def cuda_available() -> bool:
    """Asked in a subprocess, so this driver never initialises CUDA."""
    code = "import torch; print(torch.cuda.is_available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return out.stdout.strip() == "True"


def load(json_dir: Path, name: str, names_run) -> dict | list | None:
    """A script's JSON from this invocation (never a stale file of a script that did not run)."""
    path = json_dir / f"{name}.json"
    return json.loads(path.read_text()) if name in names_run and path.is_file() else None


def met(value, target: float, higher_is_better: bool) -> str:
    if value is None:
        return "-"
    return "yes" if (value >= target if higher_is_better else value < target) else "no"


def summary_rows(json_dir: Path, names_run, smoke: bool = False) -> list[dict]:
    """One row per figure, from whatever JSON the scripts left; a missing figure says so.
    Smoke sizes say nothing about the targets, so a smoke run leaves ``met`` empty."""
    rows = []

    def row(figure: str, name: str, measured: str, target: str = "-", ok: str = "-") -> None:
        rows.append({"figure": figure, "name": name, "measured": measured, "target": target,
                     "met": "-" if smoke else ok})

    tt = load(json_dir, "train_throughput", names_run)
    overhead = (tt or {}).get("ray_overhead")
    if overhead:
        ratio = overhead["in_loop_ratio_ray_over_plain"]
        runs = ", ".join(f"{r:.3f}" for r in overhead.get("in_loop_ratio_runs", []))
        row("1", "Ray Train 1 worker / plain loop, in-loop samples/s", f"{ratio:.3f} median of [{runs}] (fixed cost "
            f"per fit {overhead['ray_fixed_cost_s']:.1f} s)", ">= 0.95", met(ratio, 0.95, True))
        if "in_loop_ratio_ray_task_over_plain" in overhead:
            row("1", "plain loop in a 1-CPU Ray task / plain loop (no Ray Train)",
                f"{overhead['in_loop_ratio_ray_task_over_plain']:.3f}", "report")
        poll = overhead.get("controller_poll")
        if poll:
            walls = poll["fit_wall_s"]
            row("1", "whole fit, Ray Train's controller poll at Ray's 2 s vs raytumor's 0.5 s",
                f"{walls['ray_default']:.2f} vs {walls['raytumor']:.2f} s (median of {poll['pairs']}; "
                f"{poll['saved_per_fit_s']:.2f} s saved per fit)", "report")
        watcher = overhead.get("preemption_watcher")
        if watcher:
            walls, cpus = watcher["fit_wall_s"], watcher["machine_cpu_s"]
            row("1", "whole fit, Ray Train's preemption watcher on (Ray's default) vs off (raytumor's embedded Ray)",
                f"{walls['ray_default']:.2f} vs {walls['raytumor']:.2f} s, {cpus['ray_default']:.2f} vs "
                f"{cpus['raytumor']:.2f} CPU-s (median of {watcher['pairs']}; {watcher['saved_cpu_s_per_fit']:.2f} "
                "CPU-s saved per fit)", "report")
    else:
        row("1", "Ray Train 1 worker / plain loop", "not measured (train_throughput failed or skipped)")
    for step in (tt or {}).get("step_throughput", []):
        shape = "x".join(map(str, step["shape"]))
        row("1", f"train step {shape}, width {step['width']}, batch {step['batch']}",
            f"{step['samples_per_s']:.2f} samples/s ({step['train_gflop_per_sample']:.1f} GFLOP/sample fwd+bwd)")

    sc = load(json_dir, "scaling", names_run)
    if sc:
        for r in sc["scaling"]:
            row("2", f"scaling {r['layout']} vs 1x1 (workers x CPUs)", f"efficiency {r['efficiency']:.3f}, "
                f"speed-up {r['speedup_vs_1x1']:.2f}", "report")
    else:
        row("2", "scaling 2 workers vs 1", "not measured (scaling failed or skipped)")

    preprocess_runs = {name: load(json_dir, name, names_run) for name in ("preprocess", PAPER_SIZE_RUN)}
    for name, measured in preprocess_runs.items():
        if not measured:
            continue
        s = measured["side_by_side"]
        size = f"{s['cases']:,} cases" + (", the paper's size" if name == PAPER_SIZE_RUN else "")
        cold_runs = s.get("speedup_cold_runs", [s["speedup_cold"]])
        row("3", f"prepare_dataset vs single-process loop, {size}, warm",
            f"{s['speedup_warm']:.2f}x (target met in {s['warm_rounds_meeting_target']} of "
            f"{len(s['runs']) - len(cold_runs)} rounds)",
            ">= 1.7x", met(s["speedup_warm"], 1.7, True))
        row("3", f"2 bare processes doing the same work in the same rounds, {size}",
            f"{s['processes_speedup_warm']:.2f}x (the cores' ceiling then); prepare_dataset at "
            f"{s['share_of_processes_warm']:.2f} of it", "report")
        row("3", f"prepare_dataset vs loop, cold (first call on a fresh Ray, median of {len(cold_runs)}), {size}",
            f"{s['speedup_cold']:.2f}x ({', '.join(f'{x:.2f}' for x in cold_runs)})",
            ">= 1.7x", met(s["speedup_cold"], 1.7, True))
        row("3", f"prepare_dataset cache hit, {size}", f"{s['cache_hit_s']:.3f} s", "< 1 s",
            met(s["cache_hit_s"], 1.0, False))
        if "cli_cache_hit_s" in s:
            row("3", f"second `raytumor data prepare`, fresh process (cache hit), {size}",
                f"{s['cli_cache_hit_s']:.2f} s", "< 1 s", met(s["cli_cache_hit_s"], 1.0, False))
    if preprocess_runs["preprocess"]:
        variants = preprocess_runs["preprocess"].get("variants") or {}
        for key, label in (("plain_ray_tasks", "plain Ray tasks, no Ray Data"),
                           ("previous_prepare", "previous 4-pass prepare_dataset")):
            if key in variants:
                row("3", f"ceiling / before: {label}", f"{variants[key]['loop_over_this']:.2f}x", "report")
    else:
        row("3", "preprocessing speed-up and cache hit", "not measured (preprocess failed or skipped)")
    rv = load(json_dir, "read_volume", names_run)
    if rv:
        ms = rv["ms_per_case"]
        row("3", f"per case, {'x'.join(map(str, rv['dataset']['raw_shape']))}: read, ISA-L vs zlib",
            f"{ms['read_isal']:.2f} vs {ms['read_zlib']:.2f} ms ({rv['read_speedup']:.2f}x)", "report")
        row("3", "per case: reorient + resize + normalise, view vs copy",
            f"{ms['prepare_view']:.2f} vs {ms['prepare_copy']:.2f} ms ({rv['reorient_resize_speedup']:.2f}x); "
            f"identical output", "report")
        alloc = rv.get("allocator")
        if alloc:
            row("3", "per case: reuse_freed_memory vs glibc defaults (alone / two processes at once)",
                f"{alloc['speedup_alone']:.2f}x / {alloc['speedup_two_at_once']:.2f}x; two-process scaling "
                f"{alloc['two_process_scaling']['glibc-default']:.2f}x -> "
                f"{alloc['two_process_scaling']['reuse_freed_memory']:.2f}x", "report")

    if sc:
        wait = max(r["data_wait_fraction"] for r in sc["runs"])
        row("4", "data wait fraction, epochs 2.. (worst layout)", f"{wait:.4f}", "< 0.02", met(wait, 0.02, False))
        first = max(r["first_batch_s"] for r in sc["runs"] if r["shards"] == "stratified")
        row("4", "time to first batch on the workers (slowest worker, worst layout)", f"{first:.2f} s", "< 2 s",
            met(first, 2.0, False))
        split = sc.get("split_compare")
        if split:
            row("4", f"  the same, {split['layout']}: stratified shards vs Ray Train's streaming_split",
                f"{split['first_batch_s'][0]:.2f} vs {split['first_batch_s'][1]:.2f} s; fit "
                f"{split['fit_wall_s'][0]:.1f} vs {split['fit_wall_s'][1]:.1f} s", "report")
    else:
        row("4", "data wait and time to first batch", "not measured (scaling failed or skipped)")
    for name, measured in preprocess_runs.items():
        read = (measured or {}).get("cache_read")
        if read:
            row("4", f"reading the prepared cache in the driver, {read['rows']:,} rows in {read['files']} files: "
                f"raytumor vs Ray Data's default reader", f"{read['seconds']['raytumor']:.2f} vs "
                f"{read['seconds']['ray_default']:.2f} s ({read['speedup']:.2f}x, median of {read['pairs']})", "report")

    knn = load(json_dir, "knn", names_run)
    if knn:
        for r in knn:
            row("5", f"knn_scores {r['n_ref']}x{r['n_query']}, D={r['dim']}", f"{r['knn_scores_ms']:.1f} ms vs sklearn "
                f"{r['sklearn_brute_ms']:.1f} ms ({r['speedup_vs_sklearn']:.1f}x)")
    else:
        row("5", "K-NN vs scikit-learn", "not measured (knn failed or skipped)")

    sw = load(json_dir, "sweep_efficiency", names_run)
    eff = (sw or {}).get("efficiency")
    if eff:
        for strategy, figures in eff.items():
            row("6", f"sweep {strategy}", f"trial-epochs to target {figures.get('trial_epochs_to_target')} of "
                f"{figures.get('total_trial_epochs')}, Tune overhead {figures.get('tune_overhead_fraction')}")
        one, auto = eff.get("tpe_asha"), eff.get("tpe_asha_auto")
        if one and auto:
            row("6", "sweep trials at once: 1 (1-CPU workers) vs auto (0.5-CPU workers)",
                f"{one['sweep_wall_s']:.1f} vs {auto['sweep_wall_s']:.1f} s "
                f"({one['sweep_wall_s'] / auto['sweep_wall_s']:.2f}x; {auto.get('most_trials_at_once')} at once), "
                f"{one['trial_epochs_per_min']:.2f} vs {auto['trial_epochs_per_min']:.2f} trial-epochs/min")
        reuse = sw.get("pretrain_reuse") or {}
        if reuse:
            row("6", "pre-training reused across trials", f"{reuse.get('pretraining_fits')} fit(s), "
                f"{reuse.get('reused_from_cache')} reuse(s), ~{reuse.get('saved_s_estimate')} s saved (estimate)")
    else:
        row("6", "sweep efficiency", "not measured (sweep_efficiency failed, missing or skipped)")

    gpu = load(json_dir, "gpu_throughput", names_run)
    if gpu and gpu["machine"]["device"].startswith("cuda"):
        chip, model = gpu["machine"]["gpu"], gpu["model"]
        for r in gpu["runs"]:
            fraction = "-" if r["fraction_of_peak"] is None else f"{100 * r['fraction_of_peak']:.1f} % of {r['peak_format']} peak"
            row("7", f"{chip}, {r['mode']}, batch {r['batch']}", f"{r['samples_per_s']:.0f} samples/s, "
                f"{r['achieved_tflop_per_s']:.1f} TFLOP/s ({fraction}; {model['train_gflop_per_sample']:.2f} GFLOP/sample)",
                "report")
    elif gpu:
        row("7", "GPU throughput", f"script ran on {gpu['machine']['device']} only (smoke): not the figure")
    else:
        row("7", "GPU throughput", "not measured (no GPU here)")
    return rows


def print_table(rows: list[dict], statuses: dict) -> None:
    print("\nScripts: " + ", ".join(f"{n} {s['status']} ({s['seconds']:.0f} s)" for n, s in statuses.items()))
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in ("figure", "name", "measured", "target", "met")}
    header = "  ".join(k.ljust(widths[k]) for k in widths)
    print(header)
    print("-" * len(header))
    for r in rows:
        print("  ".join(r[k].ljust(widths[k]) for k in widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="pass --smoke to every script (knn: a small size)")
    parser.add_argument("--json-dir", type=Path, help="where the JSON, logs and summary go (default: a new temp dir)")
    parser.add_argument("--only", nargs="+", choices=list(SCRIPTS), help="run only these")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per script before it is stopped")
    parser.add_argument("--paper-size-data", type=Path, metavar="DIR",
                        help="also run figure 3 at the paper's size (4,962 cases) on the demo dataset in DIR, "
                             "writing it there first if missing (~20 min)")
    args = parser.parse_args()
    if args.paper_size_data and args.smoke:
        parser.error("--paper-size-data measures the full size; it does not go with --smoke")
    json_dir = args.json_dir or Path(tempfile.mkdtemp(prefix="raytumor-bench-"))
    json_dir.mkdir(parents=True, exist_ok=True)

    load_before = os.getloadavg()[0]
    statuses = {}
    names = list(args.only or SCRIPTS)
    if args.paper_size_data:
        names.insert(names.index("preprocess") + 1 if "preprocess" in names else 0, PAPER_SIZE_RUN)
    for name in names:
        print(f"{name} ...", flush=True)
        extra = ("--full", "--data", str(args.paper_size_data)) if name == PAPER_SIZE_RUN else ()
        statuses[name] = run_script(name, args.smoke, json_dir, args.timeout, extra)
        print(f"   {statuses[name]['status']} in {statuses[name]['seconds']:.0f} s; log {json_dir / (name + '.log')}",
              flush=True)
    rows = summary_rows(json_dir, statuses, smoke=args.smoke)
    print_table(rows, statuses)
    if args.smoke:
        print("Smoke sizes: these numbers only show that the scripts run; they are not the figures.")
    summary = {"cpu_count": os.cpu_count(), "load_average_before_after": [round(load_before, 2),
                                                                           round(os.getloadavg()[0], 2)],
               "smoke": args.smoke, "scripts": statuses, "figures": rows}
    (json_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nJSON, logs and summary.json in {json_dir}")
    sys.exit(0 if all(s["status"] in ("ok", "missing") or s["status"].startswith("skipped") for s in statuses.values()) else 1)


if __name__ == "__main__":
    main()
