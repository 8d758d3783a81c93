"""Benchmark (figure 3, per case): reading and reorienting a volume, the old way vs the current one.

On a demo dataset (``make_demo_dataset``, NIfTI ``.nii.gz`` at ``--raw-shape``), side by side in
one process, alternating ``--rounds`` times over every case's image and mask:

- read: ``nib.load`` + ``np.asarray(dataobj, float32)`` (zlib, nibabel's gzip reader) vs
  ``raytumor.data.volumes.load_nifti`` + the same (ISA-L through ``isal``);
- reorient + resize + normalise: ``preprocess_volume(reorient_to_ras(...))`` (a C-order copy of
  the file's Fortran-ordered voxels) vs ``preprocess_volume(ras_voxels(...))`` (a torch view).

Both pairs must give identical arrays (checked on every case); each figure is the median over
the rounds of the per-case mean, and the ratio is old / new. Torch runs on one thread, as in a
Ray worker.

Then the allocator (``raytumor.runtime.reuse_freed_memory``): the whole per-case work of
``prepare_dataset`` (``check_case`` + ``ras_voxels`` + ``preprocess_volume``) in fresh
processes with glibc's default allocator settings vs with ``reuse_freed_memory``. The
processes run one alone and two at once (as two Ray workers do), alternating ``--allocator-rounds``
times. Each figure reports ms per case and minor page faults per case of one warm pass.

    python benchmarks/read_volume.py [--json read.json] [--raw-shape 256 256 48] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, run_then_exit

SIZES = {"default": dict(scale=0.0001, raw_shape=(128, 128, 32), rounds=5, allocator_rounds=3),
         "smoke": dict(scale=0.0001, raw_shape=(32, 32, 8), rounds=1, allocator_rounds=1)}
ALLOCATOR_MODES = ("glibc-default", "reuse_freed_memory")
# One process of the allocator comparison: a warm pass, a barrier (so that processes started
# together measure together), then the measured pass; prints its figures as JSON.
ALLOCATOR_WORKER = """
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from preprocess import manifest_rows
from raytumor.data import volumes
from raytumor.data.preprocess import PrepareSettings, preprocess_volume
from raytumor.data.validate import check_case

mode, dataset, barrier, together = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5])
settings = PrepareSettings(shape=tuple(int(n) for n in sys.argv[6:9]))
if mode == "glibc-default":
    volumes.reuse_freed_memory = lambda: False
rows = manifest_rows(dataset)
cases = list(zip(rows["image"], rows["mask"]))

def one_pass():
    for image_path, mask_path in cases:
        image, mask = check_case(image_path, mask_path)
        mask_voxels = volumes.ras_voxels(mask) if mask is not None else None
        preprocess_volume(volumes.ras_voxels(image), mask_voxels, settings)

one_pass()
(barrier / str(id(cases))).touch()
while len(list(barrier.iterdir())) < together:
    time.sleep(0.005)
before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
one_pass()
seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"ms_per_case": 1000 * seconds / len(cases), "faults_per_case": (after.ru_minflt - before.ru_minflt) / len(cases),
                  "system_s": after.ru_stime - before.ru_stime}))
"""


def per_case_ms(fn, items) -> float:
    started = time.perf_counter()
    for item in items:
        fn(*item)
    return 1000 * (time.perf_counter() - started) / len(items)


def run(dataset: Path, rounds: int, shape) -> dict:
    import nibabel as nib
    import numpy as np
    import torch

    from preprocess import manifest_rows
    from raytumor.data.preprocess import PrepareSettings, preprocess_volume
    from raytumor.data.validate import check_case
    from raytumor.data.volumes import load_nifti, ras_voxels, reorient_to_ras

    torch.set_num_threads(1)
    rows = manifest_rows(dataset)
    files = list(zip(rows["image"], rows["mask"]))
    volumes = [check_case(image, mask) for image, mask in files]
    settings = PrepareSettings(shape=tuple(shape))

    def read_with(loader):
        def read(*paths):
            return [np.asarray(loader(path).dataobj, dtype=np.float32) for path in paths if path is not None]
        return read

    def prepare_with(orient):
        def prepare(image, mask):
            return preprocess_volume(orient(image), orient(mask) if mask is not None else None, settings)
        return prepare

    read_old, read_new = read_with(nib.load), read_with(load_nifti)
    prep_old, prep_new = prepare_with(reorient_to_ras), prepare_with(ras_voxels)
    for paths, case in zip(files, volumes):
        assert all(np.array_equal(a, b) for a, b in zip(read_old(*paths), read_new(*paths))), paths[0]
        assert np.array_equal(prep_old(*case), prep_new(*case)), paths[0]

    timings = {"read_zlib": [], "read_isal": [], "prepare_copy": [], "prepare_view": []}
    for _ in range(rounds):
        timings["read_zlib"].append(per_case_ms(read_old, files))
        timings["read_isal"].append(per_case_ms(read_new, files))
        timings["prepare_copy"].append(per_case_ms(prep_old, volumes))
        timings["prepare_view"].append(per_case_ms(prep_new, volumes))
    ms = {k: round(statistics.median(v), 3) for k, v in timings.items()}
    return {
        "cases": len(files),
        "ms_per_case": ms,
        "runs_ms_per_case": {k: [round(x, 3) for x in v] for k, v in timings.items()},
        "read_speedup": round(ms["read_zlib"] / ms["read_isal"], 2),
        "reorient_resize_speedup": round(ms["prepare_copy"] / ms["prepare_view"], 2),
        "both_speedup": round((ms["read_zlib"] + ms["prepare_copy"]) / (ms["read_isal"] + ms["prepare_view"]), 2),
        "identical_output": True,
    }


def allocator_processes(dataset: Path, mode: str, together: int, shape) -> list[dict]:
    """``together`` fresh processes doing the per-case work at once; each one's figures."""
    bench_dir = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(bench_dir).parent), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory(prefix="raytumor-alloc-barrier-") as barrier:
        args = [sys.executable, "-c", ALLOCATOR_WORKER, bench_dir, mode, str(dataset), barrier, str(together),
                *map(str, shape)]
        procs = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env) for _ in range(together)]
        outputs = [proc.communicate()[0] for proc in procs]
    if any(proc.returncode for proc in procs):
        raise RuntimeError(f"an allocator-comparison process failed ({mode}, {together} at once)")
    return [json.loads(out.strip().splitlines()[-1]) for out in outputs]


def allocator_comparison(dataset: Path, rounds: int, shape) -> dict:
    """glibc's defaults vs ``reuse_freed_memory``, one process alone and two at once, alternating."""
    runs: dict = {f"{mode}/{n}": [] for n in (1, 2) for mode in ALLOCATOR_MODES}
    for _ in range(rounds):
        for together in (1, 2):
            for mode in ALLOCATOR_MODES:
                runs[f"{mode}/{together}"].append(allocator_processes(dataset, mode, together, shape))

    def median(key: str, field: str) -> float:
        return round(statistics.median(statistics.mean(p[field] for p in procs) for procs in runs[key]), 3)

    table = {key: {"ms_per_case": median(key, "ms_per_case"), "faults_per_case": median(key, "faults_per_case"),
                   "system_s": median(key, "system_s")} for key in runs}
    default, tuned = "glibc-default", "reuse_freed_memory"
    return {
        "processes": table,
        "speedup_alone": round(table[f"{default}/1"]["ms_per_case"] / table[f"{tuned}/1"]["ms_per_case"], 2),
        "speedup_two_at_once": round(table[f"{default}/2"]["ms_per_case"] / table[f"{tuned}/2"]["ms_per_case"], 2),
        # Two processes give (2 x alone / two-at-once) times the throughput of one.
        "two_process_scaling": {mode: round(2 * table[f"{mode}/1"]["ms_per_case"] / table[f"{mode}/2"]["ms_per_case"], 2)
                                for mode in ALLOCATOR_MODES},
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny volumes, one round: checks that it runs")
    parser.add_argument("--raw-shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="NIfTI shape (default 128 128 32)")
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 32, 8], metavar=("X", "Y", "Z"), help="prepared shape")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 5)")
    parser.add_argument("--allocator-rounds", type=int, help="rounds of the allocator comparison (default 3; 0 skips it)")
    parser.add_argument("--data", type=Path, help="use the demo dataset in this directory, or write it there and keep it")
    args = parser.parse_args()
    size = dict(SIZES["smoke" if args.smoke else "default"])
    if args.raw_shape:
        size["raw_shape"] = tuple(args.raw_shape)
    if args.rounds:
        size["rounds"] = args.rounds
    if args.allocator_rounds is not None:
        size["allocator_rounds"] = args.allocator_rounds

    from preprocess import make_data

    with tempfile.TemporaryDirectory(prefix="raytumor-read-bench-") as tmp:
        print("writing the demo dataset ...", flush=True)
        dataset, facts = make_data(args.data or Path(tmp) / "demo", size["scale"], size["raw_shape"], None, 0)
        results = {"machine": machine(torch_threads=1), "dataset": facts, "settings": {**size, "shape": args.shape},
                   **run(dataset, size["rounds"], args.shape)}
        if size["allocator_rounds"]:
            print("allocator: fresh processes, one alone and two at once ...", flush=True)
            results["allocator"] = allocator_comparison(dataset, size["allocator_rounds"], args.shape)
    ms = results["ms_per_case"]
    print(f"\n{results['cases']} cases (image + mask), {'x'.join(map(str, results['dataset']['raw_shape']))} .nii.gz "
          f"-> {'x'.join(map(str, args.shape))}; ms per case, median of {size['rounds']} alternating rounds, 1 torch thread")
    print(f"   read:                        nib.load (zlib) {ms['read_zlib']:.2f}  load_nifti (ISA-L) {ms['read_isal']:.2f}"
          f"  -> {results['read_speedup']:.2f}x")
    print(f"   reorient+resize+normalise:   reorient_to_ras {ms['prepare_copy']:.2f}  ras_voxels {ms['prepare_view']:.2f}"
          f"  -> {results['reorient_resize_speedup']:.2f}x")
    print(f"   both: {results['both_speedup']:.2f}x; outputs identical on every case")
    if "allocator" in results:
        a = results["allocator"]
        print(f"\nWhole per-case work (check_case + ras_voxels + preprocess_volume) in fresh processes, median of "
              f"{a['rounds']} alternating rounds:")
        print(f"{'':>34} {'ms/case':>8} {'faults/case':>12} {'system s':>9}")
        for key, row in a["processes"].items():
            mode, together = key.split("/")
            label = f"{mode}, {'alone' if together == '1' else 'two at once'}"
            print(f"{label:>34} {row['ms_per_case']:>8.2f} {row['faults_per_case']:>12.0f} {row['system_s']:>9.2f}")
        print(f"   reuse_freed_memory: {a['speedup_alone']:.2f}x alone, {a['speedup_two_at_once']:.2f}x two at once; "
              f"two processes give {a['two_process_scaling']['glibc-default']:.2f}x the throughput of one with glibc's "
              f"defaults, {a['two_process_scaling']['reuse_freed_memory']:.2f}x with reuse_freed_memory")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    run_then_exit(main)
