"""Benchmark: training samples/s of one step on CPU, and what running the loop under Ray Train costs.

1. Step throughput: ``train_step`` (forward + backward + Adam step, batch-hard triplet loss,
   P x K labels with K = 3) on random volumes, at the demo shape ``2 x 32 x 32 x 8`` (width 0.25
   and 1.0, batch 30) and the paper's full shape ``2 x 128 x 128 x 12`` (width 1.0). A batch of 30
   at the full shape takes 30 s to over a minute per step on two CPU cores, so by default that case
   runs batch 6 (``--full-batch`` for 30). One warm-up step is excluded; then steps run until
   ``--min-seconds`` have passed (at least one). FLOPs per sample come from ``flops_per_sample``
   (convolutions and matmuls, 2 per multiply-add; forward, and forward + backward for training).
2. Ray Train overhead: the same model, data and steps run (a) as a plain PyTorch loop in this
   process that mirrors ``train_loop_per_worker`` (P x K sampler over in-memory arrays,
   ``to_device``, ``train_step``, KNN validation each epoch) and (b) as the real
   ``train_loop_per_worker`` in a ``TorchTrainer`` with one worker built by ``build_trainer``,
   both reading the same Ray Datasets of a small synthetic dataset prepared with Ray Data.
   Both sides get equal CPU terms: Ray gives a 1-CPU worker ``OMP_NUM_THREADS=1``, so the plain
   loop runs with ``torch.set_num_threads(1)``; Ray starts its workers at niceness 15, which on
   a machine busy with other work lets every other process pre-empt the training worker (~0.7x
   here), so the workers run at niceness 0 like the plain loop (``--worker-niceness 15``
   measures Ray as ``raytumor train`` runs it). In-loop samples/s are the loop's own per-epoch
   figures, steady state = epochs 2.. (epoch 1 holds the warm-up); wall time covers loading
   the arrays, building the model, every epoch and its validation, plus for Ray the ``fit``
   start-up, checkpoints and teardown. The plain loop runs before and after the Ray run and its
   figures are averaged, so a change in machine load during the run biases neither side.
   ``--rounds`` Ray fits alternate with plain runs (P R P R ... P); each is compared with the
   plain runs around it and the median ratio is the figure. The plain loop also runs inside
   a 1-CPU Ray task (no Ray Train) between two plain runs: that splits the overhead into "a
   Ray worker process" and "Ray Train's machinery". Ray Train runs with raytumor's settings
   (``raytumor.runtime.train_env_vars``); ``--poll-pairs`` more fits then alternate Ray
   Train's default controller poll (2 s) with raytumor's (0.5 s): the whole-fit time each;
   ``--watcher-pairs`` fits alternate Ray Train's preemption watcher on (Ray's default) and
   off (raytumor's embedded Ray): the whole-fit time and the whole machine's CPU seconds each.

By default (~3 min on 2 cores): part 1 at the demo shape, part 2 with 3 fits. ``--full`` adds
the paper's full shape to part 1 and 3 pairs each of the two settings above (~9 min).

    python benchmarks/train_throughput.py [--json results.json] [--full [--full-batch]] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

from common import import_make_dataset, machine, machine_busy_cpu_s, run_then_exit, steady

DEMO_SHAPE = (32, 32, 8)
PAPER_SHAPE = (128, 128, 12)
SAMPLES_PER_CLASS = 3


# --- 1. step throughput --------------------------------------------------------------------


def step_throughput(shape, width: float, batch: int, min_seconds: float, seed: int = 0) -> dict:
    """samples/s of ``train_step`` at one shape/width/batch, after one warm-up step."""
    import torch

    from raytumor.losses import get_loss
    from raytumor.models import build_model, count_parameters, flops_per_sample
    from raytumor.train.steps import train_step

    torch.manual_seed(seed)
    model = build_model("paper_cnn", in_channels=2, embedding_dim=6, normalize=True, width=width)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = get_loss("batch_hard", margin=1.0)
    volumes = torch.randn(batch, 2, *shape)
    labels = torch.arange(batch) // SAMPLES_PER_CLASS  # P x K: batch / 3 classes, 3 rows each

    forward_flops = flops_per_sample(model, (2, *shape))
    train_flops = flops_per_sample(model, (2, *shape), include_backward=True)
    start = time.perf_counter()
    train_step(model, volumes, labels, loss_fn, optimizer).item()
    warmup = time.perf_counter() - start
    steps, start = 0, time.perf_counter()
    while steps == 0 or time.perf_counter() - start < min_seconds:
        train_step(model, volumes, labels, loss_fn, optimizer).item()
        steps += 1
    seconds = time.perf_counter() - start
    samples_per_s = steps * batch / seconds
    return {
        "shape": [2, *shape],
        "width": width,
        "batch": batch,
        "parameters": count_parameters(model),
        "forward_gflop_per_sample": round(forward_flops / 1e9, 4),
        "train_gflop_per_sample": round(train_flops / 1e9, 4),
        "warmup_step_s": round(warmup, 3),
        "measured_steps": steps,
        "step_s": round(seconds / steps, 4),
        "samples_per_s": round(samples_per_s, 3),
        "achieved_gflop_per_s": round(train_flops * samples_per_s / 1e9, 2),
        "torch_threads": torch.get_num_threads(),
    }


# --- 2. plain loop vs Ray Train -----------------------------------------------------------


@contextlib.contextmanager
def torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def plain_training(config, inputs, steps_per_epoch: int) -> dict:
    """``train_loop_per_worker`` for one worker, minus Ray: same seeds, sampler, steps, timing."""
    import torch

    from raytumor.losses import get_loss
    from raytumor.models import build_model
    from raytumor.train.datasets import load_arrays
    from raytumor.train.sampler import PKBatchSampler
    from raytumor.train.steps import eval_step, to_device, train_step

    from raytumor.runtime import reuse_freed_memory

    reuse_freed_memory()  # as the real loop's _start does
    started_run = time.perf_counter()
    train_cfg, device, rank = config.train, torch.device("cpu"), 0
    torch.manual_seed(config.seed * 1000 + rank)
    volumes, labels = load_arrays(inputs.datasets["train"])
    reference = load_arrays(inputs.datasets["reference"])
    val = load_arrays(inputs.datasets["val"])
    model = build_model(config.model.encoder, in_channels=2, embedding_dim=config.model.embedding_dim,
                        normalize=True, width=config.model.width)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    loss_fn = get_loss(train_cfg.loss, margin=train_cfg.margin)
    sampler = PKBatchSampler(labels, train_cfg.batch_size, train_cfg.samples_per_class,
                             seed=config.seed * 1000 + rank, steps=steps_per_epoch)
    history = []
    for epoch in range(train_cfg.epochs):
        started, waited = time.perf_counter(), 0.0
        total = torch.zeros((), device=device)
        for indices in sampler:
            tick = time.perf_counter()
            x = to_device(volumes[indices], device)
            y = torch.from_numpy(labels[indices]).to(device)
            waited += time.perf_counter() - tick
            total += train_step(model, x, y, loss_fn, optimizer)
        seconds = time.perf_counter() - started
        history.append({
            "epoch": epoch + 1,
            "loss": float(total.item()) / len(sampler),
            "samples_per_s": len(sampler) * len(indices) / seconds,
            "data_wait_fraction": waited / seconds,
        })
        eval_step(model, reference, val, device, k=train_cfg.knn_k, rare_classes=inputs.rare_classes)
    return {"history": history, "wall_s": time.perf_counter() - started_run, "batch": len(indices)}


def ray_training(config, inputs, run_dir: Path, steps_per_epoch: int) -> dict:
    """The real ``train_loop_per_worker`` under ``TorchTrainer`` (1 worker, via ``build_trainer``)."""
    import io

    import torch

    from raytumor.train.loops import CHECKPOINT_FILE
    from raytumor.train.trainer import build_trainer

    started = time.perf_counter()
    trainer = build_trainer(config, "train", run_dir, inputs, extra_loop_config={"steps_per_epoch": steps_per_epoch})
    result = trainer.fit()
    wall = time.perf_counter() - started
    with result.checkpoint.as_directory() as directory:
        state = torch.load(io.BytesIO((Path(directory) / CHECKPOINT_FILE).read_bytes()), weights_only=True)
    history = [{k: row[k] for k in ("epoch", "loss", "samples_per_s", "data_wait_fraction")} for row in state["history"]]
    return {"history": history, "wall_s": wall}


RAY_DEFAULT_POLL_S = "2.0"  # ray.train.v2._internal.constants.DEFAULT_HEALTH_CHECK_INTERVAL_S
RAY_DEFAULT_WATCHER = "1"  # ray.train.v2._internal.constants.DEFAULT_ENABLE_PREEMPTION_WATCHER


def setting_comparison(name: str, ray_default: str, ours: str, config, inputs, workdir: Path, steps_per_epoch: int,
                       pairs: int) -> dict:
    """Whole ``fit`` wall time and the whole machine's CPU seconds with the Ray Train setting
    ``name`` at Ray's default and at raytumor's, alternating. Ray Train reads its settings from
    this process's environment at every fit, so they can change between fits of one Ray."""
    values = {"ray_default": ray_default, "raytumor": ours}
    walls: dict[str, list[float]] = {side: [] for side in values}
    cpus: dict[str, list[float]] = {side: [] for side in values}
    for pair in range(pairs):
        for side, value in values.items():
            with mock.patch.dict(os.environ, {name: value}):
                busy = machine_busy_cpu_s()
                run = ray_training(config, inputs, workdir / "runs" / f"{name}-{value}-{pair}", steps_per_epoch)
                cpus[side].append(round(machine_busy_cpu_s() - busy, 2))
            walls[side].append(round(run["wall_s"], 2))
    wall = {side: round(statistics.median(runs), 2) for side, runs in walls.items()}
    cpu = {side: round(statistics.median(runs), 2) for side, runs in cpus.items()}
    return {"setting": name, "pairs": pairs, "values": values, "fit_wall_s_runs": walls, "fit_wall_s": wall,
            "saved_per_fit_s": round(wall["ray_default"] - wall["raytumor"], 2),
            "machine_cpu_s_runs": cpus, "machine_cpu_s": cpu,
            "saved_cpu_s_per_fit": round(cpu["ray_default"] - cpu["raytumor"], 2)}


def poll_comparison(config, inputs, workdir: Path, steps_per_epoch: int, pairs: int) -> dict:
    """Ray Train's default controller poll (2 s) vs raytumor's (``raytumor.runtime.TRAIN_ENV_DEFAULTS``)."""
    from raytumor.runtime import TRAIN_ENV_DEFAULTS

    name = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    return setting_comparison(name, RAY_DEFAULT_POLL_S, TRAIN_ENV_DEFAULTS[name], config, inputs, workdir,
                              steps_per_epoch, pairs)


def watcher_comparison(config, inputs, workdir: Path, steps_per_epoch: int, pairs: int) -> dict:
    """Ray Train's preemption watcher on (Ray's default) vs off (raytumor's embedded Ray:
    ``raytumor.runtime.EMBEDDED_TRAIN_ENV_DEFAULTS``)."""
    from raytumor.runtime import EMBEDDED_TRAIN_ENV_DEFAULTS

    name = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
    return setting_comparison(name, RAY_DEFAULT_WATCHER, EMBEDDED_TRAIN_ENV_DEFAULTS[name], config, inputs, workdir,
                              steps_per_epoch, pairs)


def ray_overhead(shape, width: float, batch: int, epochs: int, steps_per_epoch: int, cases_per_class: int,
                 workdir: Path, worker_niceness: int, rounds: int = 3, poll_pairs: int = 0, watcher_pairs: int = 0,
                 seed: int = 0) -> dict:
    import ray

    from raytumor.config import load_config
    from raytumor.runtime import train_env_vars
    from raytumor.train.datasets import training_inputs

    n_classes = math.ceil(batch / SAMPLES_PER_CLASS)
    make_dataset = import_make_dataset()
    dataset = make_dataset(workdir / "ds", n_per_class=(cases_per_class,) * n_classes, shape=tuple(shape))
    config = load_config(overrides=[
        f"data.dataset={dataset}", f"data.shape=[{','.join(map(str, shape))}]", f"output_dir={workdir / 'runs'}",
        "name=bench", f"seed={seed}", f"model.width={width}", f"train.batch_size={batch}",
        f"train.samples_per_class={SAMPLES_PER_CLASS}", "train.loss=batch_hard", "train.margin=1.0",
        f"train.epochs={epochs}", "resources.num_workers=1", "resources.cpus_per_worker=1",
        "resources.use_gpu=false", "resources.max_failures=0",
    ])

    os.environ["RAY_worker_niceness"] = str(worker_niceness)  # read by the raylet ray.init starts
    train_env_vars(embedded=True)  # Ray Train's settings as raytumor's embedded Ray has them
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    init_s = time.perf_counter() - started
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False

        @ray.remote(num_cpus=1)
        def worker_settings() -> tuple[int, int]:
            """torch threads and niceness of a 1-CPU Ray worker process (Train's worker is one too)."""
            import torch

            return torch.get_num_threads(), os.nice(0)

        ray_threads, ray_niceness = ray.get(worker_settings.remote())
        started = time.perf_counter()
        inputs = training_inputs(config)  # prepares the Ray Data cache, then reads it
        inputs_s = time.perf_counter() - started

        @ray.remote(num_cpus=1)
        def plain_in_actor(config, inputs, steps_per_epoch):
            """The plain loop in a 1-CPU Ray worker process: what being a Ray process costs, without Train."""
            return plain_training(config, inputs, steps_per_epoch)

        # P R P R ... P T P: every Ray run is compared with the plain runs just before and after it.
        with torch_threads(ray_threads):
            plains = [plain_training(config, inputs, steps_per_epoch)]
            ray_runs = []
            for round_ in range(rounds):
                ray_runs.append(ray_training(config, inputs, workdir / "runs" / f"round{round_}", steps_per_epoch))
                plains.append(plain_training(config, inputs, steps_per_epoch))
            in_ray_task = ray.get(plain_in_actor.remote(config, inputs, steps_per_epoch))
            plains.append(plain_training(config, inputs, steps_per_epoch))
            polls = poll_comparison(config, inputs, workdir, steps_per_epoch, poll_pairs) if poll_pairs else None
            watchers = (watcher_comparison(config, inputs, workdir, steps_per_epoch, watcher_pairs)
                        if watcher_pairs else None)
    finally:
        ray.shutdown()

    plain_rates = [steady(run["history"])[0] for run in plains]
    ratios = [steady(run["history"])[0] / ((plain_rates[i] + plain_rates[i + 1]) / 2) for i, run in enumerate(ray_runs)]
    plain_rate = statistics.mean(plain_rates)
    plain_wait = statistics.mean(steady(run["history"])[1] for run in plains)
    plain_wall = statistics.mean(run["wall_s"] for run in plains)
    ray_rate = statistics.median(steady(run["history"])[0] for run in ray_runs)
    ray_wait = statistics.median(steady(run["history"])[1] for run in ray_runs)
    ray_wall = statistics.median(run["wall_s"] for run in ray_runs)
    task_rate = steady(in_ray_task["history"])[0]
    task_plain_rate = (plain_rates[-2] + plain_rates[-1]) / 2  # the plain runs around it
    under_ray = ray_runs[len(ray_runs) // 2]
    samples = epochs * steps_per_epoch * plains[0]["batch"]
    return {
        "shape": [2, *shape],
        "width": width,
        "batch": plains[0]["batch"],
        "rounds": rounds,
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "train_rows": inputs.n_train_rows,
        "torch_threads_plain": ray_threads,
        "torch_threads_ray_worker": ray_threads,
        "niceness_plain": os.nice(0),
        "niceness_ray_worker": ray_niceness,
        "ray_init_s": round(init_s, 2),
        "prepare_and_read_datasets_s": round(inputs_s, 2),
        "plain_in_loop_samples_per_s": round(plain_rate, 2),
        "plain_in_loop_samples_per_s_runs": [round(r, 2) for r in plain_rates],
        "ray_in_loop_samples_per_s": round(ray_rate, 2),
        "in_loop_ratio_ray_over_plain": round(statistics.median(ratios), 4),
        "in_loop_ratio_runs": [round(r, 4) for r in ratios],
        "ray_in_loop_samples_per_s_runs": [round(steady(run["history"])[0], 2) for run in ray_runs],
        "ray_task_in_loop_samples_per_s": round(task_rate, 2),
        "plain_around_ray_task_samples_per_s": round(task_plain_rate, 2),
        "in_loop_ratio_ray_task_over_plain": round(task_rate / task_plain_rate, 4),
        "plain_data_wait_fraction": round(plain_wait, 4),
        "ray_data_wait_fraction": round(ray_wait, 4),
        "plain_wall_s": round(plain_wall, 2),
        "plain_wall_s_runs": [round(run["wall_s"], 2) for run in plains],
        "ray_wall_s": round(ray_wall, 2),
        "ray_fixed_cost_s": round(ray_wall - plain_wall, 2),
        "wall_samples_per_s_plain": round(samples / plain_wall, 2),
        "wall_samples_per_s_ray": round(samples / ray_wall, 2),
        "wall_ratio_ray_over_plain": round(plain_wall / ray_wall, 4),
        "ray_epochs": under_ray["history"],
        "plain_epochs": plains[0]["history"],
        "ray_train_health_check_interval_s": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "default"),
        "controller_poll": polls,
        "preemption_watcher": watchers,
    }


# --- report ---------------------------------------------------------------------------------


def print_setting_comparison(label: str, compared: dict) -> None:
    """One line per :func:`setting_comparison`: the medians, then every fit, Ray's side first."""
    sides = [f"{compared['fit_wall_s'][side]:.2f} s, {compared['machine_cpu_s'][side]:.2f} CPU-s "
             f"{list(zip(compared['fit_wall_s_runs'][side], compared['machine_cpu_s_runs'][side]))}"
             for side in ("ray_default", "raytumor")]
    print(f"   whole fit, {label}, alternating: {sides[0]} vs {sides[1]}; saved per fit "
          f"{compared['saved_per_fit_s']:.2f} s, {compared['saved_cpu_s_per_fit']:.2f} CPU-s")


def print_report(results: dict) -> None:
    m = results["machine"]
    print(f"\nMachine: {m['cpu_count']} CPUs (load {m['load_average_1m']} at start), torch {m['torch']}, "
          f"ray {m['ray']}, torch threads {m['torch_threads_default']}")
    print("\n1. train_step samples/s (forward + backward + Adam, batch-hard loss, P x K labels, warm-up excluded)")
    print(f"{'shape':>14} {'width':>5} {'batch':>5} {'params':>10} {'GFLOP/sample fwd':>16} {'fwd+bwd':>8}"
          f" {'steps':>5} {'s/step':>8} {'samples/s':>10} {'GFLOP/s':>8} {'threads':>7}")
    for r in results["step_throughput"]:
        shape = "x".join(map(str, r["shape"]))
        print(f"{shape:>14} {r['width']:>5} {r['batch']:>5} {r['parameters']:>10,} {r['forward_gflop_per_sample']:>16.3f}"
              f" {r['train_gflop_per_sample']:>8.3f} {r['measured_steps']:>5} {r['step_s']:>8.3f}"
              f" {r['samples_per_s']:>10.2f} {r['achieved_gflop_per_s']:>8.2f} {r['torch_threads']:>7}")
    print("   GFLOP/s = (forward + backward GFLOP/sample, convolutions and matmuls only) x samples/s")
    o = results.get("ray_overhead")
    if o:
        shape = "x".join(map(str, o["shape"]))
        print(f"\n2. Plain loop vs Ray Train (1 worker): {shape}, width {o['width']}, batch {o['batch']}, "
              f"{o['epochs']} epochs x {o['steps_per_epoch']} steps, torch threads {o['torch_threads_plain']} "
              f"(plain) / {o['torch_threads_ray_worker']} (Ray worker), niceness {o['niceness_plain']} / "
              f"{o['niceness_ray_worker']}")
        print(f"{'':>28} {'plain':>10} {'Ray Train':>10} {'ray/plain':>10}   (Ray: median of {o['rounds']} fits)")
        print(f"{'in-loop samples/s (ep 2..)':>28} {o['plain_in_loop_samples_per_s']:>10.2f}"
              f" {o['ray_in_loop_samples_per_s']:>10.2f} {o['in_loop_ratio_ray_over_plain']:>10.3f}")
        print(f"{'data wait fraction':>28} {o['plain_data_wait_fraction']:>10.4f} {o['ray_data_wait_fraction']:>10.4f}")
        print(f"{'plain loop in a Ray task':>28} {o['plain_around_ray_task_samples_per_s']:>10.2f}"
              f" {o['ray_task_in_loop_samples_per_s']:>10.2f} {o['in_loop_ratio_ray_task_over_plain']:>10.3f}"
              "   (no Ray Train: what a Ray worker process costs)")
        print(f"{'wall s (incl. fit start/end)':>28} {o['plain_wall_s']:>10.2f} {o['ray_wall_s']:>10.2f}"
              f" {o['wall_ratio_ray_over_plain']:>10.3f}")
        print(f"   Ray / plain per round (each vs the plain runs around it): {o['in_loop_ratio_runs']}, "
              f"median {o['in_loop_ratio_ray_over_plain']:.3f}; target >= 0.95")
        print(f"   plain runs: {o['plain_in_loop_samples_per_s_runs']} samples/s, "
              f"{o['plain_wall_s_runs']} s; Ray fixed cost {o['ray_fixed_cost_s']:.1f} s; "
              f"ray.init {o['ray_init_s']:.1f} s, prepare + read datasets {o['prepare_and_read_datasets_s']:.1f} s")
        comparisons = {"controller_poll": "Ray Train's controller poll every {ray_default} s (Ray's default) vs "
                                          "{raytumor} s (raytumor's)",
                       "preemption_watcher": "Ray Train's preemption watcher on (Ray's default) vs off (raytumor's "
                                             "embedded Ray)"}
        for key, label in comparisons.items():
            compared = o.get(key)
            if compared:
                print_setting_comparison(label.format(**compared["values"]), compared)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--smoke", action="store_true",
                        help="tiniest sizes (for the test): demo shape width 0.25 only, 2 short epochs at 16x16x4")
    parser.add_argument("--full", action="store_true",
                        help="the full run (~9 min): the paper's full shape in part 1, and 3 pairs each of "
                             "--poll-pairs and --watcher-pairs unless given")
    parser.add_argument("--full-batch", action="store_true", help="with --full: batch 30 at the paper's full shape (minutes)")
    parser.add_argument("--min-seconds", type=float, default=4.0, help="measure each step case at least this long")
    parser.add_argument("--step-threads", type=int, help="torch threads for part 1 (default: torch's default)")
    parser.add_argument("--skip-ray", action="store_true", help="leave out part 2")
    parser.add_argument("--ray-shape", type=int, nargs=3, default=list(DEMO_SHAPE), metavar=("X", "Y", "Z"))
    parser.add_argument("--ray-width", type=float, default=0.25)
    parser.add_argument("--ray-batch", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="Ray Train fits, each between two plain runs")
    parser.add_argument("--poll-pairs", type=int,
                        help="fit pairs at Ray Train's default controller poll (2 s) and raytumor's (0.5 s) "
                             "(default: 3 with --full, else 0)")
    parser.add_argument("--watcher-pairs", type=int,
                        help="fit pairs with Ray Train's preemption watcher on (Ray's default) and off (raytumor's "
                             "embedded Ray) (default: 3 with --full, else 0)")
    parser.add_argument("--steps-per-epoch", type=int, default=10)
    parser.add_argument("--cases-per-class", type=int, default=6,
                        help="synthetic cases per class (70%% go to train; a class needs >= 2 there)")
    parser.add_argument("--worker-niceness", type=int, default=0,
                        help="niceness of Ray's worker processes (Ray's default is 15; 0 = the plain loop's)")
    parser.add_argument("--workdir", type=Path, help="where the temporary dataset and Ray run storage go (default: the system temp dir)")
    args = parser.parse_args(argv)
    if args.full_batch and not args.full:
        parser.error("--full-batch sets the batch of the paper's full shape, which only --full runs")
    for name in ("poll_pairs", "watcher_pairs"):
        if getattr(args, name) is None:
            setattr(args, name, 3 if args.full else 0)
    return args


def step_cases(args: argparse.Namespace) -> list[tuple[tuple[int, int, int], float, int]]:
    """Part 1's (shape, width, batch) cases."""
    cases = [(DEMO_SHAPE, 0.25, 30)]
    if not args.smoke:
        cases.append((DEMO_SHAPE, 1.0, 30))
        if args.full:
            cases.append((PAPER_SHAPE, 1.0, 30 if args.full_batch else 6))
    return cases


def main() -> None:
    args = parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # keep the table readable

    import torch

    if args.step_threads:
        torch.set_num_threads(args.step_threads)
    cases = step_cases(args)
    if args.smoke:
        args.min_seconds, args.ray_shape, args.ray_batch = 0.0, [16, 16, 4], 12
        args.epochs, args.steps_per_epoch, args.cases_per_class, args.rounds = 2, 2, 5, 1
        args.poll_pairs = args.watcher_pairs = 0

    results = {"machine": machine(torch_threads_default=torch.get_num_threads()), "step_throughput": [], "settings": vars(args) | {"workdir": str(args.workdir)}}
    for shape, width, batch in cases:
        print(f"step throughput: shape {shape}, width {width}, batch {batch} ...", flush=True)
        results["step_throughput"].append(step_throughput(shape, width, batch, args.min_seconds))
    if not args.skip_ray:
        print("plain loop vs Ray Train ...", flush=True)
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
        # A fresh directory each time: a Ray Train run reusing a storage path resumes the old run.
        with tempfile.TemporaryDirectory(prefix="raytumor-bench-", dir=args.workdir) as tmp:
            workdir = Path(tmp)
            results["ray_overhead"] = ray_overhead(tuple(args.ray_shape), args.ray_width, args.ray_batch, args.epochs,
                                                   args.steps_per_epoch, args.cases_per_class, workdir,
                                                   args.worker_niceness, rounds=args.rounds,
                                                   poll_pairs=args.poll_pairs, watcher_pairs=args.watcher_pairs)
    print_report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    run_then_exit(main)
