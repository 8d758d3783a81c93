"""What every benchmark script shares: the machine facts, steady-state epoch figures, the
tests' synthetic dataset writer, number formatting. Imported by the scripts as ``common``
(each runs as ``python benchmarks/<name>.py``, so this folder is on ``sys.path``)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_then_exit(main) -> None:
    """``main()``, then exit at once (code 0), without Python's finalization.

    Once a Ray-using script has written its report, finalization has only native teardown left
    (Ray's core worker after ``ray.shutdown``, the thread pools of pyarrow and torch). It crashed
    once with SIGSEGV after ``preprocess.py --smoke`` had written all of its output, JSON
    included (exit code -11 in a fresh-clone CI run, 2026-12-02; no Python frame for
    ``-X faulthandler`` to show; not seen in 4 reruns). An error in ``main`` exits as usual.
    """
    import logging

    main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def machine(**extra) -> dict:
    """CPUs, load, library versions; ``extra`` adds a script's own facts."""
    import ray
    import torch

    return {"cpu_count": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__,
            "ray": ray.__version__, "python": platform.python_version(), **extra}


def machine_busy_cpu_s() -> float:
    """CPU seconds every process on the machine has used since boot (psutil, which Ray's
    dashboard installs; the fields a platform lacks count 0)."""
    import psutil

    times = psutil.cpu_times()
    return sum(getattr(times, field, 0.0) for field in ("user", "nice", "system", "irq", "softirq", "steal"))


def steady(history: list[dict]) -> tuple[float, float]:
    """samples/s and mean data-wait fraction over epochs 2.. (epoch 1 only when there is no other).

    Every epoch runs the same steps, so the harmonic mean of the per-epoch rates is total
    samples over total time.
    """
    rows = history[1:] or history
    rate = len(rows) / sum(1.0 / r["samples_per_s"] for r in rows)
    wait = sum(r["data_wait_fraction"] for r in rows) / len(rows)
    return rate, wait


def import_make_dataset():
    """``tests.conftest.make_dataset``, without keeping the env defaults conftest sets for the tests.

    conftest sets environment defaults for the tests; the scripts set their own, as
    ``raytumor`` does (``raytumor.runtime.train_env_vars``).
    """
    saved = dict(os.environ)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from tests.conftest import make_dataset

    for key in set(os.environ) - set(saved):
        del os.environ[key]
    return make_dataset


def two_decimals(value) -> str:
    return "-" if value is None else f"{value:.2f}"
