"""Benchmark (figure 7): encoder training samples/s and achieved TFLOP/s on a GPU, fp32 vs bf16
autocast vs bf16 + ``channels_last_3d``, as a fraction of the chip's peak.

The paper's encoder (``paper_cnn``, width 1.0, about 7M parameters) with the triplet head, at
the paper's input (2 x 128 x 128 x 12), trained with batch-hard triplet loss and Adam on random
volumes resident on the device (the figure is the encoder's compute, not input loading, which
figure 4 covers). Each precision mode runs the step of ``raytumor.train.steps.train_step``:

- ``fp32``: no autocast; torch's defaults, so cuDNN runs fp32 convolutions as TF32
  (``torch.backends.cudnn.allow_tf32`` is on by default); its peak is the chip's TF32 figure.
- ``bf16``: ``torch.autocast(bfloat16)``, what ``train_step`` does on CUDA; tensors in the
  default (channels-first) layout.
- ``bf16_channels_last_3d``: bf16 autocast, model and volumes in ``channels_last_3d``, which is
  what the Ray Train loop does on CUDA (``_prepare_model``, ``to_device``).

FLOPs per sample (forward + backward) come from ``raytumor.models.flops_per_sample``
(``torch.utils.flop_counter``: convolutions and matmuls, 2 per multiply-add). Achieved TFLOP/s =
FLOPs per sample x samples/s; the fraction is of the dense (no sparsity) peak for the mode's
number format from the vendor's data sheet (``PEAK_TFLOPS``; ``--peak-tflops`` overrides it).
Steps run back to back with no host sync; the clock stops after ``torch.cuda.synchronize``.
Each mode gets ``--warmup`` untimed steps (cuDNN picks its algorithms there) and then runs for at
least ``--min-seconds``. Needs only torch (no Ray, no MONAI), so it runs on a bare GPU image.

    python benchmarks/gpu_throughput.py [--json gpu.json] [--batches 30 120] [--smoke] [--device cpu]

``--smoke`` (tiny shape, CPU allowed) only checks that the script runs; its numbers are not the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raytumor.losses import get_loss  # noqa: E402
from raytumor.models import build_model, count_parameters, flops_per_sample  # noqa: E402

PAPER_SHAPE = (128, 128, 12)
PAPER_BATCH = 30
# Dense TFLOP/s by number format, from NVIDIA's data sheets (SXM parts; the sparsity figures halved).
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}
MODES = {
    "fp32": {"bf16": False, "channels_last": False, "peak_format": "tf32"},
    "bf16": {"bf16": True, "channels_last": False, "peak_format": "bf16"},
    "bf16_channels_last_3d": {"bf16": True, "channels_last": True, "peak_format": "bf16"},
}
SMOKE = {"shape": (16, 16, 4), "width": 0.25, "batches": [6], "min_seconds": 0.3, "warmup": 1}


def chip_peak(device: torch.device, peak_format: str, override: float | None) -> float | None:
    """The chip's dense peak for ``peak_format`` in TFLOP/s, or None when unknown (and on CPU)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for chip, peaks in PEAK_TFLOPS.items():
        if chip in name:
            return peaks[peak_format]
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(model, volumes, labels, loss_fn, optimizer, bf16: bool) -> torch.Tensor:
    """``raytumor.train.steps.train_step`` with the autocast switch made explicit (the training
    code turns bf16 on whenever the device is CUDA)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(volumes.device.type, dtype=torch.bfloat16, enabled=bf16):
        outputs = model(volumes)
    loss = loss_fn(outputs.float(), labels)
    loss.backward()
    optimizer.step()
    return loss.detach()


def measure(mode: str, device: torch.device, shape, width: float, batch: int, warmup: int, min_seconds: float,
            train_flops: int, peak_override: float | None, seed: int) -> dict:
    settings = MODES[mode]
    torch.manual_seed(seed)
    model = build_model("paper_cnn", in_channels=2, embedding_dim=6, normalize=True, width=width).to(device)
    volumes = torch.randn(batch, 2, *shape, device=device)
    if settings["channels_last"]:
        model = model.to(memory_format=torch.channels_last_3d)
        volumes = volumes.contiguous(memory_format=torch.channels_last_3d)
    labels = (torch.arange(batch, device=device) // 3) % 3  # every class appears, 3 rows at a time
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = get_loss("batch_hard", margin=1.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    started = time.perf_counter()
    for _ in range(warmup):
        loss = step(model, volumes, labels, loss_fn, optimizer, settings["bf16"])
    synchronize(device)
    warmup_s = time.perf_counter() - started

    # Launch in rounds of steps_per_check with one sync per round, so the clock is read rarely.
    steps, steps_per_check = 0, max(1, warmup)
    started = time.perf_counter()
    while True:
        for _ in range(steps_per_check):
            loss = step(model, volumes, labels, loss_fn, optimizer, settings["bf16"])
        steps += steps_per_check
        synchronize(device)
        seconds = time.perf_counter() - started
        if seconds >= min_seconds:
            break
    finite = bool(torch.isfinite(loss))
    # On CUDA a NaN would be a real finding about bf16 training. On the CPU (smoke runs only)
    # torch 2.13's bf16 conv3d backward gives NaN weight gradients now and then (5 in 1,000
    # random 2x2x2 inputs, none in fp32), one more reason raytumor trains in fp32 on CPUs.
    if not finite and device.type == "cuda":
        raise RuntimeError(f"{mode}, batch {batch}: the loss is not finite ({loss.item()})")
    samples_per_s = steps * batch / seconds
    achieved = train_flops * samples_per_s / 1e12
    peak = chip_peak(device, settings["peak_format"], peak_override)
    return {
        "mode": mode,
        "batch": batch,
        "steps": steps,
        "step_ms": round(1000 * seconds / steps, 3),
        "samples_per_s": round(samples_per_s, 2),
        "achieved_tflop_per_s": round(achieved, 3),
        "peak_format": settings["peak_format"],
        "peak_tflop_per_s": peak,
        "fraction_of_peak": None if peak is None else round(achieved / peak, 4),
        "warmup_s": round(warmup_s, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "final_loss": round(float(loss), 4) if finite else None,
        "loss_finite": finite,
    }


def device_facts(device: torch.device) -> dict:
    facts = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
             "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                      "multiprocessors": props.multi_processor_count, "cuda": torch.version.cuda,
                      "cudnn": torch.backends.cudnn.version(), "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                      "cudnn_benchmark": torch.backends.cudnn.benchmark})
    else:
        facts["torch_threads"] = torch.get_num_threads()
    return facts


def print_report(results: dict) -> None:
    facts, model = results["machine"], results["model"]
    print(f"\n{facts.get('gpu', facts['device'])}, torch {facts['torch']}"
          + (f", CUDA {facts['cuda']}, cuDNN {facts['cudnn']}" if "cuda" in facts else ""))
    print(f"paper_cnn width {model['width']}: {model['parameters']:,} parameters, input {model['input']}, "
          f"{model['train_gflop_per_sample']:.3f} GFLOP per sample (forward + backward)")
    print(f"{'mode':>22} {'batch':>5} {'steps':>6} {'ms/step':>9} {'samples/s':>10} {'TFLOP/s':>8} "
          f"{'peak':>7} {'of peak':>8} {'GiB':>6}")
    for r in results["runs"]:
        peak = "-" if r["peak_tflop_per_s"] is None else f"{r['peak_tflop_per_s']:.0f}"
        frac = "-" if r["fraction_of_peak"] is None else f"{100 * r['fraction_of_peak']:.1f} %"
        mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        print(f"{r['mode']:>22} {r['batch']:>5} {r['steps']:>6} {r['step_ms']:>9.2f} {r['samples_per_s']:>10.1f} "
              f"{r['achieved_tflop_per_s']:>8.2f} {peak:>7} {frac:>8} {mem:>6}")
    for batch, ratios in results["speedup_vs_fp32"].items():
        print(f"   batch {batch}: " + ", ".join(f"{mode} {ratio:.2f}x fp32" for mode, ratio in ratios.items()))
    if results["settings"]["smoke"]:
        print("Smoke size: these numbers only show that the script runs; they are not the figure.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (default when there is a GPU) or cpu (only for --smoke: not the figure)")
    parser.add_argument("--shape", type=int, nargs=3, default=list(PAPER_SHAPE), metavar=("X", "Y", "Z"),
                        help="input volume shape (default: the paper's 128 128 12)")
    parser.add_argument("--width", type=float, default=1.0, help="encoder width multiplier (default 1.0: the paper's)")
    parser.add_argument("--batches", type=int, nargs="+", default=[PAPER_BATCH, 4 * PAPER_BATCH],
                        help="batch sizes to run every mode at (default: the paper's 30, and 120)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per run (cuDNN autotuning)")
    parser.add_argument("--min-seconds", type=float, default=10.0, help="timed seconds per run, at least")
    parser.add_argument("--peak-tflops", type=float, help="the chip's peak TFLOP/s for every mode (default: data sheet)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--smoke", action="store_true", help="tiny shape and width, CPU allowed; checks that it runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.smoke:
        args.shape, args.width, args.batches = list(SMOKE["shape"]), SMOKE["width"], SMOKE["batches"]
        args.min_seconds, args.warmup = SMOKE["min_seconds"], SMOKE["warmup"]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_throughput: --device cuda but torch sees no GPU; figure 7 needs one (--smoke --device cpu to check the script)")
    if device.type != "cuda" and not args.smoke:
        sys.exit("gpu_throughput: no GPU here; figure 7 is a GPU figure (--smoke runs it on the CPU to check the script)")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark

    model = build_model("paper_cnn", in_channels=2, embedding_dim=6, normalize=True, width=args.width).to(device)
    train_flops = flops_per_sample(model, (2, *args.shape), include_backward=True)
    results = {
        "machine": device_facts(device),
        "settings": {"shape": args.shape, "width": args.width, "batches": args.batches, "warmup": args.warmup,
                     "min_seconds": args.min_seconds, "smoke": args.smoke, "seed": args.seed},
        "model": {"width": args.width, "parameters": count_parameters(model), "input": [2, *args.shape],
                  "forward_gflop_per_sample": round(flops_per_sample(model, (2, *args.shape)) / 1e9, 4),
                  "train_gflop_per_sample": round(train_flops / 1e9, 4)},
        "runs": [],
    }
    del model
    for batch in args.batches:
        for mode in args.modes:
            print(f"{mode}, batch {batch} ...", flush=True)
            results["runs"].append(measure(mode, device, tuple(args.shape), args.width, batch, args.warmup,
                                           args.min_seconds, train_flops, args.peak_tflops, args.seed))
    results["speedup_vs_fp32"] = {}
    for batch in args.batches:
        same_batch = {r["mode"]: r["samples_per_s"] for r in results["runs"] if r["batch"] == batch}
        if "fp32" in same_batch:
            results["speedup_vs_fp32"][str(batch)] = {
                mode: round(rate / same_batch["fp32"], 3) for mode, rate in same_batch.items() if mode != "fp32"}
    print_report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
