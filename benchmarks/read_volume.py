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

    python benchmarks/read_volume.py [--json read.json] [--raw-shape 256 256 48] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import machine

SIZES = {"default": dict(scale=0.0001, raw_shape=(128, 128, 32), rounds=5),
         "smoke": dict(scale=0.0001, raw_shape=(32, 32, 8), rounds=1)}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny volumes, one round: checks that it runs")
    parser.add_argument("--raw-shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="NIfTI shape (default 128 128 32)")
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 32, 8], metavar=("X", "Y", "Z"), help="prepared shape")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 5)")
    parser.add_argument("--data", type=Path, help="use the demo dataset in this directory, or write it there and keep it")
    args = parser.parse_args()
    size = dict(SIZES["smoke" if args.smoke else "default"])
    if args.raw_shape:
        size["raw_shape"] = tuple(args.raw_shape)
    if args.rounds:
        size["rounds"] = args.rounds

    from preprocess import make_data

    with tempfile.TemporaryDirectory(prefix="raytumor-read-bench-") as tmp:
        print("writing the demo dataset ...", flush=True)
        dataset, facts = make_data(args.data or Path(tmp) / "demo", size["scale"], size["raw_shape"], None, 0)
        results = {"machine": machine(torch_threads=1), "dataset": facts, "settings": {**size, "shape": args.shape},
                   **run(dataset, size["rounds"], args.shape)}
    ms = results["ms_per_case"]
    print(f"\n{results['cases']} cases (image + mask), {'x'.join(map(str, results['dataset']['raw_shape']))} .nii.gz "
          f"-> {'x'.join(map(str, args.shape))}; ms per case, median of {size['rounds']} alternating rounds, 1 torch thread")
    print(f"   read:                        nib.load (zlib) {ms['read_zlib']:.2f}  load_nifti (ISA-L) {ms['read_isal']:.2f}"
          f"  -> {results['read_speedup']:.2f}x")
    print(f"   reorient+resize+normalise:   reorient_to_ras {ms['prepare_copy']:.2f}  ras_voxels {ms['prepare_view']:.2f}"
          f"  -> {results['reorient_resize_speedup']:.2f}x")
    print(f"   both: {results['both_speedup']:.2f}x; outputs identical on every case")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
