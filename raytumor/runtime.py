"""Connecting to Ray: an embedded local instance by default, an existing cluster on request."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import signal
import socket
import time
from typing import Iterator

LOOPBACK = "127.0.0.1"
# glibc allocator settings (see reuse_freed_memory): blocks up to 32 MiB (glibc's largest mmap
# threshold) come from the heap, and up to 128 MiB of freed heap is kept for reuse.
MMAP_THRESHOLD_BYTES = 32 * 2**20
TRIM_THRESHOLD_BYTES = 128 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_allocator_tuned = False


def wait_for_free_cpu(timeout_s: float = 0.5, poll_s: float = 0.01) -> bool:
    """True as soon as Ray's resource view shows a free CPU; False after ``timeout_s``.

    Ray Data checks that view as a Dataset job starts, and warns "The Dataset job will hang
    unless more CPUs are freed up" when it shows none. Right after an earlier job of this
    process, its tasks' CPUs come back to the view 20-50 ms later, so back-to-back jobs drew
    the warning though nothing hung: 2 of 5 ``read_stage_datasets`` calls (five jobs in a row),
    and once in every ``raytumor demo``. Call this before such a job; where the CPUs stay taken
    (other work on a cluster), the job starts after ``timeout_s`` and the warning stands: ten
    times the lag seen, and little delay where a busy cluster keeps every CPU.
    """
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while not ray.available_resources().get("CPU"):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def reuse_freed_memory() -> bool:
    """Let this process reuse freed buffers instead of returning them to the kernel.

    glibc hands allocations above 128 KiB out as fresh ``mmap``s (its threshold adapts, but
    not reliably) and returns freed heap above 128 KiB to the kernel, so the buffers of every
    volume read and of every training step are faulted in and zeroed again on first touch:
    300-750 faults per 128x128x32 case (9-16 % of preprocessing time) and ~13,000 per training
    step of the demo model (8 % of the in-loop throughput of a Ray Train worker;
    docs/benchmarks.md, figures 1 and 3). Raising the mmap and trim thresholds keeps those
    buffers in the heap, where the next case or step reuses them. Called by volume reading
    and at the start of every training loop; once per process; glibc only (elsewhere a
    no-op). True if the settings apply.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        return False
    _allocator_tuned = bool(ok)
    return _allocator_tuned


def _unused_port(port: int = 0) -> int:
    """``port`` (any free one for 0) if nothing listens on it; OSError otherwise."""
    with socket.socket() as probe:
        probe.bind(("", port))
        return probe.getsockname()[1]


_embedded_ray_address: str | None = None


def on_embedded_ray() -> bool:
    """Whether this process is connected to a Ray that :func:`start_embedded_ray` started: one
    node of fixed size, so a request it cannot hold now it never will."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().gcs_address == _embedded_ray_address


def start_embedded_ray(**init_kwargs):
    """``ray.init`` a new local Ray whose every process has ``RAY_ADDRESS`` set to it.

    Ray Train's placement-group cleaner finds Ray's state API by auto-detecting "the" local
    Ray; with other Ray instances on the machine that fails ("Found multiple active Ray
    instances"), and every trial Tune stops then leaks its workers' CPUs: on 2 CPUs a sweep
    hangs after two early stops. So the GCS port is chosen here, and the address is in the
    environment that Ray's processes inherit when they start. This process's own environment
    is left as it was. (A worker set-up hook did this before; it gave the job a runtime
    environment, and the workers Ray prestarts without one went unused: a fresh Ray's first
    Ray Data job started two more and took ~1 s longer, docs/benchmarks.md, figure 3.)
    A port you set in ``RAY_GCS_SERVER_PORT`` is used as it is.
    """
    import ray

    from raytumor.errors import ConfigError, RaytumorError

    chosen = os.environ.get("RAY_GCS_SERVER_PORT", "")
    if chosen and not (chosen.isdigit() and 0 < int(chosen) < 65536):
        raise ConfigError(f"RAY_GCS_SERVER_PORT={chosen!r}: not a TCP port number (1-65535)")
    try:
        port = _unused_port(int(chosen or 0))
    except OSError as exc:  # Ray would wait 40 s for its GCS, then fail with a traceback
        raise ConfigError(f"RAY_GCS_SERVER_PORT={chosen}: cannot use this port ({exc.strerror})") from None
    address = f"{ray.util.get_node_ip_address()}:{port}"
    saved = {name: os.environ.get(name) for name in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    os.environ.update(RAY_ADDRESS=address, RAY_GCS_SERVER_PORT=str(port))
    try:
        context = ray.init(address="local", **init_kwargs)
    except BaseException:
        # Ctrl-C during ray.init left the dashboard and runtime-env agents running, orphaned.
        ray.shutdown()
        kill_leftover_workers(address)
        raise
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    started_at = ray.get_runtime_context().gcs_address
    if started_at != address:
        ray.shutdown()
        raise RaytumorError(f"the embedded Ray started at {started_at}, not at {address} as asked; start Ray "
                            "yourself (ray start --head) and pass --address")
    global _embedded_ray_address
    _embedded_ray_address = started_at
    return context


def stop_embedded_ray() -> list[int]:
    """``ray.shutdown()`` of the Ray that ``start_embedded_ray`` started here, then
    :func:`kill_leftover_workers` of it; the pids killed."""
    import ray

    address = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    ray.shutdown()
    return kill_leftover_workers(address) if address else []


def kill_leftover_workers(address: str, grace_s: float = 3.0) -> list[int]:
    """SIGKILL the Ray worker processes (``ray::...``) of the Ray at ``address`` that are still
    alive ``grace_s`` seconds after it was shut down; their pids. Linux only (reads ``/proc``);
    elsewhere none.

    ``ray.shutdown()`` of an embedded Ray returns before every worker has exited: in 4 of 10
    small training runs the ``ray::TrainController`` was still running and exited by itself
    0.2-0.6 s later, so those are waited for. But Ray 2.60's core worker now and then
    deadlocks in its own destructor as a worker process exits (seen once in a full test run: a
    ``ray::TrainController`` whose fit had ended, blocked forever at 400 MB). Its Ray gone,
    nothing else would ever stop it. A worker is known by the ``RAY_ADDRESS`` that
    ``start_embedded_ray`` gives all of that Ray's processes.
    """
    leftovers = _ray_workers_of(address)
    deadline = time.monotonic() + grace_s
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.05)
        leftovers = _ray_workers_of(address)
    killed = []
    for pid, name in leftovers.items():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # gone meanwhile
            continue
        killed.append(pid)
        logging.getLogger(__name__).warning(
            "killed %s (pid %s): a process of the embedded Ray at %s still alive %.0f s after its shutdown",
            name, pid, address, grace_s)
    return killed


def _ray_workers_of(address: str) -> dict[int, str]:
    """pid -> process name of the live ``ray::`` processes whose environment holds ``RAY_ADDRESS=address``."""
    if not os.path.isdir("/proc"):
        return {}
    marker = f"RAY_ADDRESS={address}".encode()
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                name = cmdline.read().split(b"\0", 1)[0]
            if not name.startswith(b"ray::"):
                continue
            with open(f"/proc/{entry.name}/environ", "rb") as environ:
                if marker not in environ.read().split(b"\0"):
                    continue
        except OSError:  # gone meanwhile, or another user's
            continue
        found[int(entry.name)] = name.decode(errors="replace")
    return found


TRAIN_ENV_DEFAULTS = {
    # Ray Train's controller polls its workers every this many seconds (Ray's default: 2); a
    # fit's end is noticed at the next poll and its teardown waits on more. At 0.5 s a small fit
    # took 12.4 s instead of 16.4 s (docs/benchmarks.md, figure 1). A poll is one small actor
    # call per worker; a missed one is only waited on, not a failure.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Ray Train's print patch writes every print of a worker to its stdout and, through its
    # logger, to its stderr too; Ray forwards both to the console. Each state of a progress bar
    # (``ray.experimental.tqdm_ray``) then arrived twice, and the second copy of a bar's last
    # state re-opened the closed bar: finished runs and trials stayed on screen, their elapsed
    # time still counting. Without the patch, prints reach the console and the workers' log
    # files once, but not Ray Train's own per-worker log file (logs/train/).
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
# Only where raytumor starts Ray itself: one local node, which no cloud provider drains, so
# Ray Train's preemption watcher (an actor started with every fit, ~1.3 CPU-s each here) has
# nothing to watch. A cluster keeps it.
EMBEDDED_TRAIN_ENV_DEFAULTS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def train_env_vars(embedded: bool = False) -> dict[str, str]:
    """raytumor's Ray Train settings (those of an embedded Ray too, with ``embedded``), each
    overridable by the environment, and set in it: Ray Train passes them from the process that
    calls ``fit`` to its controller and workers."""
    defaults = {**TRAIN_ENV_DEFAULTS, **(EMBEDDED_TRAIN_ENV_DEFAULTS if embedded else {})}
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in defaults}


def cluster_address(address: str | None) -> str | None:
    """The Ray cluster to join: ``address``, else ``RAY_ADDRESS``; None means an embedded Ray."""
    return address or os.environ.get("RAY_ADDRESS") or None


def check_dashboard_for_ray_train(address: str | None, dashboard: bool, command: str) -> None:
    """Refuse Ray Train runs (``command``: "a sweep", "training") on an embedded Ray without its dashboard.

    The dashboard serves Ray's state API, which Ray Train's placement-group cleaner queries.
    Without it the cleaner cannot free the workers of a trial the scheduler stopped: a
    6-trial ASHA sweep on 2 CPUs stalled after its first early stops (docs/benchmarks.md,
    figure 6). And it can take a healthy run's controller for dead: a training run lost its
    placement group at epoch 4 in 1 of 3 runs, and restarted. A cluster (``address`` or
    ``RAY_ADDRESS``) has its own dashboard.
    """
    from raytumor.errors import ConfigError

    if not dashboard and not cluster_address(address):
        raise ConfigError(f"--no-dashboard: {command} needs the Ray dashboard, whose state API Ray Train uses to free "
                          "the workers of stopped runs and to check its controller is alive; it listens on 127.0.0.1 only")


def check_cluster_reachable(address: str, timeout_s: float = 10.0) -> None:
    """A one-line error when nothing answers at ``address`` ("host:port" or "ray://host:port"),
    instead of Ray's minutes of retries (over 6 minutes measured). Other forms ("auto") are
    left to Ray."""
    from raytumor.errors import RaytumorError

    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise RaytumorError(f"Ray cluster at {address}: nothing answers there ({reason}); start it with "
                            "`ray start --head` (which prints its address) or check --address / RAY_ADDRESS") from None


@contextlib.contextmanager
def ray_session(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    dashboard: bool = True,
    dashboard_port: int | None = None,
    announce: bool = True,
) -> Iterator[None]:
    """Use the running Ray, a cluster at ``address`` (or ``RAY_ADDRESS``), or start one in-process.

    An embedded instance binds its dashboard to 127.0.0.1 only and is shut down on exit; a
    Ray that was already initialised (tests share one) or a remote cluster is left running.
    The dashboard also serves Ray's state API, which Ray Train uses to clean up after a
    trial that Tune stopped; ``dashboard=False`` saves a little start-up time elsewhere.
    """
    import ray

    from raytumor.errors import ConfigError

    if num_cpus is not None and num_cpus < 1:
        raise ConfigError(f"--num-cpus {num_cpus}: must be at least 1 (every Ray task needs a CPU; with none, "
                          "Ray waits for one forever)")
    # Set before the check: this process's own fits pass them on. The processes of an embedded
    # Ray inherit them; a cluster's get them through the job's runtime environment.
    env_vars = train_env_vars()
    if ray.is_initialized():
        yield
        return
    address = cluster_address(address)
    if address:
        check_cluster_reachable(address)
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True,
                 runtime_env={"env_vars": env_vars})
        if announce:
            print(f"Connected to Ray cluster at {address}")
    else:
        # Ray starts workers at niceness 15; on a machine shared with other work that lets
        # every other process pre-empt the training workers (measured ~0.7x throughput).
        os.environ.setdefault("RAY_worker_niceness", "0")
        train_env_vars(embedded=True)
        started = start_embedded_ray(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=dashboard,
            dashboard_host=LOOPBACK,
            dashboard_port=dashboard_port,
            logging_level=logging.WARNING,
        )
        if announce and dashboard and started.dashboard_url:
            print(f"Ray dashboard: http://{started.dashboard_url}")
            if os.environ.get("RAY_AUTH_MODE", "token") != "disabled":
                print("  token authentication is on: log in with the token in ~/.ray/auth_token")
    try:
        yield
    finally:
        if not address:
            stop_embedded_ray()
