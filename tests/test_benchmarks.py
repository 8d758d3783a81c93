"""The benchmark scripts run end to end at their smallest size (their figures are not checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_script(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python benchmarks/<args>`` from the repository root; fails the test on a non-zero exit.
    The timeout only stops a hung run; a crash (a negative return code) comes with the Python
    stack of every thread (``-X faulthandler``)."""
    proc = subprocess.run([sys.executable, "-X", "faulthandler", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def load_benchmark_module(name: str = "run"):
    """``benchmarks/<name>.py`` as a module (benchmarks/ is not a package; its scripts import ``common``)."""
    import importlib.util

    if str(REPO_ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_run_module():
    return load_benchmark_module("run")


@pytest.fixture(scope="module")
def smoke_demo_data(tmp_path_factory) -> dict[str, Path]:
    """The demo datasets of ``preprocess.py --smoke`` (cut to 40 cases) and ``read_volume.py
    --smoke`` (all 135), written here with the scripts' own ``make_data`` and handed to them
    with ``--data``: one process pays the demo's imports (nilearn, scikit-learn) instead of two."""
    make_data = load_benchmark_module("preprocess").make_data
    root = tmp_path_factory.mktemp("bench-demo")
    data = {}
    for name, cases in (("preprocess", 40), ("read_volume", None)):
        data[name], facts = make_data(root / name, 0.0001, (32, 32, 8), cases, 0)
        assert facts["cases"] == (cases or 135) and facts["generate_s"] is not None
    return data


@pytest.mark.slow
@pytest.mark.ray
def test_train_throughput_smoke(tmp_path):
    out = tmp_path / "train.json"
    # Ray Train start-up alone is 10-25 s here; the limit only stops a hung run.
    proc = run_script("benchmarks/train_throughput.py", "--smoke", "--json", str(out))
    assert "samples/s" in proc.stdout and "ray/plain" in proc.stdout
    results = json.loads(out.read_text())
    assert results["machine"]["cpu_count"] >= 1
    (step,) = results["step_throughput"]
    assert step["samples_per_s"] > 0 and step["train_gflop_per_sample"] > step["forward_gflop_per_sample"] > 0
    overhead = results["ray_overhead"]
    assert overhead["torch_threads_plain"] == overhead["torch_threads_ray_worker"]
    assert len(overhead["ray_epochs"]) == overhead["epochs"] == 2
    assert overhead["ray_in_loop_samples_per_s"] > 0 and overhead["plain_in_loop_samples_per_s"] > 0
    assert overhead["in_loop_ratio_ray_over_plain"] > 0 and overhead["ray_wall_s"] > 0
    assert len(overhead["in_loop_ratio_runs"]) == overhead["rounds"] == 1
    assert overhead["in_loop_ratio_ray_task_over_plain"] > 0
    # Ray Train ran with raytumor's settings; the poll comparison is left out of the smoke run
    # (two more fits) and tested below without Ray.
    assert overhead["ray_train_health_check_interval_s"] == "0.5" and overhead["controller_poll"] is None
    assert overhead["preemption_watcher"] is None


def test_train_throughput_runs_its_long_parts_only_with_full(capsys):
    train_throughput = load_benchmark_module("train_throughput")
    default = train_throughput.parse_args([])
    assert (default.poll_pairs, default.watcher_pairs) == (0, 0)
    assert [shape for shape, _, _ in train_throughput.step_cases(default)] == [(32, 32, 8)] * 2
    full = train_throughput.parse_args(["--full", "--full-batch"])
    assert (full.poll_pairs, full.watcher_pairs) == (3, 3)
    assert train_throughput.step_cases(full)[-1] == ((128, 128, 12), 1.0, 30)
    assert train_throughput.parse_args(["--full", "--poll-pairs", "1"]).poll_pairs == 1
    assert train_throughput.parse_args(["--watcher-pairs", "2"]).watcher_pairs == 2
    with pytest.raises(SystemExit):
        train_throughput.parse_args(["--full-batch"])
    assert "only --full runs" in capsys.readouterr().err


def test_poll_comparison_alternates_the_controller_poll(tmp_path, monkeypatch):
    train_throughput = load_benchmark_module("train_throughput")
    seen = []

    def fake_fit(config, inputs, run_dir, steps_per_epoch):
        value = os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]
        seen.append((value, run_dir.name))
        return {"wall_s": {"2.0": 16.0, "0.5": 12.0}[value] + len(seen) / 100}

    monkeypatch.setattr(train_throughput, "ray_training", fake_fit)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    poll = train_throughput.poll_comparison(None, None, tmp_path, 2, pairs=2)
    assert [value for value, _ in seen] == ["2.0", "0.5", "2.0", "0.5"]
    assert len({run for _, run in seen}) == 4  # a fresh run directory per fit (a reused one resumes)
    assert poll["fit_wall_s_runs"] == {"ray_default": [16.01, 16.03], "raytumor": [12.02, 12.04]}
    assert poll["saved_per_fit_s"] == 3.99 and os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    (tmp_path / "train_throughput.json").write_text(json.dumps({"ray_overhead": {
        "in_loop_ratio_ray_over_plain": 1.0, "ray_fixed_cost_s": 11.0, "controller_poll": poll}}))
    rows = [row for row in load_run_module().summary_rows(tmp_path, ["train_throughput"]) if "controller poll" in row["name"]]
    assert len(rows) == 1 and rows[0]["measured"] == "16.02 vs 12.03 s (median of 2; 3.99 s saved per fit)"


def test_watcher_comparison_alternates_the_preemption_watcher_and_counts_machine_cpu(tmp_path, monkeypatch):
    train_throughput = load_benchmark_module("train_throughput")
    busy = [100.0]
    seen = []

    def fake_fit(config, inputs, run_dir, steps_per_epoch):
        value = os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"]
        seen.append((value, run_dir.name))
        busy[0] += {"1": 18.0, "0": 16.0}[value]  # the machine's CPU seconds this fit used
        return {"wall_s": 11.0 + len(seen) / 100}

    monkeypatch.setattr(train_throughput, "ray_training", fake_fit)
    monkeypatch.setattr(train_throughput, "machine_busy_cpu_s", lambda: busy[0])
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    watcher = train_throughput.watcher_comparison(None, None, tmp_path, 2, pairs=2)
    assert [value for value, _ in seen] == ["1", "0", "1", "0"]
    assert len({run for _, run in seen}) == 4
    assert watcher["values"] == {"ray_default": "1", "raytumor": "0"}
    assert watcher["machine_cpu_s_runs"] == {"ray_default": [18.0, 18.0], "raytumor": [16.0, 16.0]}
    assert watcher["saved_cpu_s_per_fit"] == 2.0 and watcher["fit_wall_s"] == {"ray_default": 11.02, "raytumor": 11.03}
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    (tmp_path / "train_throughput.json").write_text(json.dumps({"ray_overhead": {
        "in_loop_ratio_ray_over_plain": 1.0, "ray_fixed_cost_s": 11.0, "preemption_watcher": watcher}}))
    rows = [row for row in load_run_module().summary_rows(tmp_path, ["train_throughput"]) if "watcher" in row["name"]]
    assert len(rows) == 1
    assert rows[0]["measured"] == "11.02 vs 11.03 s, 18.00 vs 16.00 CPU-s (median of 2; 2.00 CPU-s saved per fit)"


@pytest.mark.slow
@pytest.mark.ray
def test_preprocess_smoke(tmp_path, smoke_demo_data):
    out = tmp_path / "preprocess.json"
    # ~45 s on 2 idle cores (two Ray starts and the workers' first imports dominate); the limit only stops a hang.
    proc = run_script("benchmarks/preprocess.py", "--smoke", "--data", str(smoke_demo_data["preprocess"]),
                      "--json", str(out))
    assert "speed-up" in proc.stdout and "cache hit" in proc.stdout
    results = json.loads(out.read_text())
    assert results["dataset"]["reused"] and results["dataset"]["cases"] == 40
    side = results["side_by_side"]
    # Two cold calls, each on a fresh Ray (started, and the first one shut down, untimed), then one warm.
    assert side["cases"] == 40 and [r["cold"] for r in side["runs"]] == [True, True, False]
    assert len(results["ray_init_s"]) == 2 and "cold 2" in proc.stdout
    assert side["speedup_cold_runs"] == [r["speedup"] for r in side["runs"][:2]]
    assert side["speedup_cold"] == pytest.approx(sum(side["speedup_cold_runs"]) / 2, abs=1e-3)
    assert side["speedup_warm"] > 0 and side["cache_hit_s"] > 0
    # The second CLI run answered from the cache (the script checks its output) in a fresh process.
    assert len(side["cli_cache_hit_s_runs"]) == 3 and side["cli_cache_hit_s"] > side["cache_hit_s"]
    # The loop did the same work as prepare_dataset: same cases, same volumes.
    assert results["same_output"]["same_case_ids"]
    assert results["same_output"]["max_abs_volume_difference"] < 1e-5
    # The warm round also ran the same work on two bare processes (the script checks their case
    # count against prepare_dataset's), and the cold rounds did not.
    assert not any("processes_s" in r for r in side["runs"][:2])
    warm = side["runs"][2]
    assert warm["processes_s"] > 0
    assert warm["share_of_processes"] == pytest.approx(warm["processes_s"] / warm["prepare_s"], rel=0.03)
    assert side["warm_rounds_meeting_target"] == int(warm["speedup"] >= 1.7)
    variants = results["variants"]
    assert variants["previous_prepare"]["seconds"] > 0 and variants["plain_ray_tasks"]["seconds"] > 0
    assert [(r["batch_size"], r["blocks_per_cpu"]) for r in variants["prepare_dataset"]] == [(16, 2)]
    # run.py's summary: rows for this run and, when present, for the paper-size one (same JSON here).
    (tmp_path / "preprocess_full.json").write_text(out.read_text())
    bench_run = load_run_module()
    rows = [row for row in bench_run.summary_rows(tmp_path, ["preprocess", "preprocess_full"]) if row["figure"] == "3"]
    warm_rows = [row for row in rows if row["name"].startswith("prepare_dataset vs single-process loop")]
    assert len(warm_rows) == 2 and "the paper's size" in warm_rows[1]["name"]
    assert all(row["measured"].startswith(f"{side['speedup_warm']:.2f}x") for row in warm_rows)
    assert all(row["met"] == ("yes" if side["speedup_warm"] >= 1.7 else "no") for row in warm_rows)
    assert sum("bare processes" in row["name"] for row in rows) == 2
    cold_rows = [row for row in rows if "cold" in row["name"]]
    assert len(cold_rows) == 2 and all("median of 2" in row["name"] for row in cold_rows)
    assert all(row["measured"].startswith(f"{side['speedup_cold']:.2f}x (") for row in cold_rows)
    cli_rows = [row for row in rows if row["name"].startswith("second `raytumor data prepare`")]
    assert [row["measured"] for row in cli_rows] == [f"{side['cli_cache_hit_s']:.2f} s"] * 2
    # Reading the cache both ways, the same rows; and its figure-4 row.
    read = results["cache_read"]
    assert read["rows"] == 40 and read["pairs"] == 1 and 1 <= read["files"] <= 64
    assert read["runs"]["ray_default"][0]["rows"] == read["runs"]["raytumor"][0]["rows"] == 40
    assert read["seconds"]["raytumor"] > 0 and read["speedup"] == round(read["seconds"]["ray_default"] / read["seconds"]["raytumor"], 2)
    read_rows = [row for row in bench_run.summary_rows(tmp_path, ["preprocess"]) if "reading the prepared cache" in row["name"]]
    assert len(read_rows) == 1 and read_rows[0]["figure"] == "4" and f"({read['speedup']:.2f}x" in read_rows[0]["measured"]


@pytest.mark.slow
@pytest.mark.ray
def test_scaling_smoke(tmp_path):
    out = tmp_path / "scaling.json"
    # Two short Ray Train fits (1 worker, then 2 x 0.5 CPU); the limit only stops a hung run.
    proc = run_script("benchmarks/scaling.py", "--smoke", "--json", str(out))
    assert "efficiency" in proc.stdout
    results = json.loads(out.read_text())
    assert [r["layout"] for r in results["runs"]] == ["1x1", "2x0.5"]
    for run in results["runs"]:
        assert len(run["epochs"]) == 2 and run["samples_per_s"] > 0 and 0 <= run["data_wait_fraction"] < 1
    (row,) = results["scaling"]
    assert row["layout"] == "2x0.5" and row["cores_used"] == 2 and row["efficiency"] > 0
    assert all(run["shards"] == "stratified" and run["first_batch_s"] > 0 for run in results["runs"])
    assert results["driver_read"]["read_stage_datasets_s"] > 0 and results["driver_read"]["train_rows"] > 0


def test_read_volume_smoke(tmp_path, smoke_demo_data):
    out = tmp_path / "read_volume.json"
    # 135 tiny demo cases, one round; ~20 s. The script itself asserts both paths give identical arrays.
    proc = run_script("benchmarks/read_volume.py", "--smoke", "--data", str(smoke_demo_data["read_volume"]),
                      "--json", str(out), timeout=180)
    assert "outputs identical on every case" in proc.stdout
    results = json.loads(out.read_text())
    assert results["cases"] == 135 and results["identical_output"] and results["dataset"]["reused"]
    ms = results["ms_per_case"]
    assert set(ms) == {"read_zlib", "read_isal", "prepare_copy", "prepare_view"} and min(ms.values()) > 0
    assert results["read_speedup"] == round(ms["read_zlib"] / ms["read_isal"], 2)
    allocator = results["allocator"]  # fresh processes, glibc defaults vs reuse_freed_memory, 1 and 2 at once
    assert set(allocator["processes"]) == {f"{mode}/{n}" for mode in ("glibc-default", "reuse_freed_memory") for n in (1, 2)}
    assert all(row["ms_per_case"] > 0 for row in allocator["processes"].values())
    # run.py's summary turns this JSON into figure-3 rows, the allocator one included.
    bench_run = load_run_module()
    rows = [row for row in bench_run.summary_rows(tmp_path, ["read_volume"], smoke=True) if row["figure"] == "3"]
    assert any("reuse_freed_memory" in row["name"] and f"{allocator['speedup_alone']:.2f}x" in row["measured"]
               for row in rows)


def test_gpu_throughput_smoke_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    # CPU smoke: tiny shape, every precision mode; ~5 s. The figure itself needs a GPU.
    proc = run_script("benchmarks/gpu_throughput.py", "--smoke", "--device", "cpu", "--peak-tflops", "0.5",
                      "--json", str(out), timeout=120)
    assert "samples/s" in proc.stdout and "not the figure" in proc.stdout
    results = json.loads(out.read_text())
    assert [r["mode"] for r in results["runs"]] == ["fp32", "bf16", "bf16_channels_last_3d"]
    model = results["model"]
    assert model["train_gflop_per_sample"] > model["forward_gflop_per_sample"] > 0 and model["parameters"] > 0
    for r in results["runs"]:
        assert r["steps"] >= 1 and r["samples_per_s"] > 0
        assert r["achieved_tflop_per_s"] == pytest.approx(model["train_gflop_per_sample"] * r["samples_per_s"] / 1000, rel=0.05, abs=1e-3)
        assert r["peak_tflop_per_s"] == 0.5
        # achieved is rounded to 3 decimals (error <= 0.0005 / 0.5 in the fraction), the fraction to 4.
        assert r["fraction_of_peak"] == pytest.approx(r["achieved_tflop_per_s"] / 0.5, abs=0.0005 / 0.5 + 1e-4)
    assert set(results["speedup_vs_fp32"][str(results["runs"][0]["batch"])]) == {"bf16", "bf16_channels_last_3d"}


def test_gpu_throughput_refuses_to_report_a_cpu_figure():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_throughput.py", "--device", "cpu"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "figure 7 is a GPU figure" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_run_collects_a_summary(tmp_path):
    # knn alone keeps this quick; the other scripts' smoke runs have their own tests.
    proc = run_script("benchmarks/run.py", "--smoke", "--only", "knn", "--json-dir", str(tmp_path), timeout=120)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["scripts"]["knn"]["status"] == "ok" and summary["smoke"]
    figures = {row["figure"] for row in summary["figures"]}
    assert figures == {"1", "2", "3", "4", "5", "6", "7"}  # every figure has a row, measured or not
    knn_rows = [row for row in summary["figures"] if row["figure"] == "5"]
    assert len(knn_rows) == 2 and all("ms" in row["measured"] for row in knn_rows)
    gpu = [row for row in summary["figures"] if row["figure"] == "7"]
    assert "not measured" in gpu[0]["measured"]
    assert "knn_scores" in proc.stdout and (tmp_path / "knn.json").is_file()


def test_run_refuses_paper_size_with_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/run.py", "--smoke", "--paper-size-data", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--paper-size-data" in proc.stderr and "--smoke" in proc.stderr


def test_sweep_efficiency_counts_trials_at_once_and_run_reports_the_ratio(tmp_path):
    sweep_efficiency = load_benchmark_module("sweep_efficiency")
    spans = [(0.0, 10.0), (1.0, 5.0), (6.0, 4.0), (10.0, 3.0)]  # (start, time_total_s)
    assert sweep_efficiency.most_at_once([{"start": a, "time_total_s": d} for a, d in spans]) == 2
    assert sweep_efficiency.most_at_once([{"start": a, "time_total_s": 1.0} for a in (0.0, 1.0, 2.0)]) == 1

    def figures(wall, epochs_per_min, at_once):
        return {"sweep_wall_s": wall, "trial_epochs_per_min": epochs_per_min, "most_trials_at_once": at_once,
                "trial_epochs_to_target": 10, "total_trial_epochs": 20, "tune_overhead_fraction": 0.1}

    (tmp_path / "sweep_efficiency.json").write_text(json.dumps({"efficiency": {
        "tpe_asha": figures(120.0, 5.0, 1), "random_no_stopping": figures(150.0, 4.0, 1),
        "tpe_asha_auto": figures(80.0, 7.5, 2)}}))
    rows = [row for row in load_run_module().summary_rows(tmp_path, ["sweep_efficiency"]) if "at once" in row["name"]]
    assert len(rows) == 1
    assert rows[0]["measured"] == "120.0 vs 80.0 s (1.50x; 2 at once), 5.00 vs 7.50 trial-epochs/min"
