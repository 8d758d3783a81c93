"""Process-level settings: glibc reuses freed buffers in processes that read volumes or train."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
import torch

from raytumor import runtime
from raytumor.config import RunConfig
from raytumor.train import loops
from tests.conftest import GLIBC


@pytest.fixture(autouse=True)
def _keep_the_sessions_embedded_ray_address(monkeypatch):
    """Tests here call ``start_embedded_ray`` with a fake ``ray.init``; the address it records
    must not replace that of the session's real Ray."""
    monkeypatch.setattr(runtime, "_embedded_ray_address", runtime._embedded_ray_address)


_FAULTS_PER_STEP = """
import resource, statistics, sys, torch
torch.set_num_threads(1)
from raytumor import runtime
from raytumor.losses import get_loss
from raytumor.models import build_model
from raytumor.train.steps import train_step
if sys.argv[1] == "tuned":
    assert runtime.reuse_freed_memory()
model = build_model("paper_cnn", in_channels=2, embedding_dim=6, normalize=True, width=0.25)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
loss_fn = get_loss("batch_hard", margin=0.5)
x, y = torch.randn(30, 2, 16, 16, 8), torch.arange(30) % 6
for _ in range(3):
    train_step(model, x, y, loss_fn, optimizer)
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    train_step(model, x, y, loss_fn, optimizer)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median step: with the settings, an occasional step grows the heap (480-960 faults once),
# which made a mean over 5 steps swing between 0 and 288.
print(statistics.median(faults))
"""


@pytest.mark.skipif(not GLIBC, reason="the allocator settings are glibc's")
def test_training_steps_reuse_freed_buffers():
    # With glibc's defaults each step maps and faults in fresh pages for its activations.
    def faults_per_step(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _FAULTS_PER_STEP, mode], capture_output=True, text=True,
                             check=True)
        return float(out.stdout.strip().splitlines()[-1])

    tuned = faults_per_step("tuned")
    # glibc's dynamic mmap and trim thresholds sometimes settle so that its defaults reuse the
    # heap as well (1 process in 14 had a median of 0 faults per step, the rest 1,400-3,800), so
    # the baseline is the worst of up to three processes.
    default = 0.0
    for _ in range(3):
        default = max(default, faults_per_step("glibc-default"))
        if default > 1000:
            break
    assert default > 1000, default
    assert tuned < default / 10, (tuned, default)


def test_training_loops_tune_the_allocator_before_anything_else(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "reuse_freed_memory", lambda: calls.append("tuned") or True)
    monkeypatch.setattr(loops, "_context", lambda: (calls.append("context") or 0, 1, torch.device("cpu")))
    config, rank, world, device = loops._start({"config": RunConfig().model_dump(mode="json")})
    assert calls == ["tuned", "context"] and (rank, world) == (0, 1)


def test_reuse_freed_memory_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(runtime, "_allocator_tuned", False)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert runtime.reuse_freed_memory() is False


def test_ray_session_gives_a_cluster_job_the_train_settings(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(runtime, "check_cluster_reachable", lambda address: None)
    for name in (*runtime.TRAIN_ENV_DEFAULTS, *runtime.EMBEDDED_TRAIN_ENV_DEFAULTS):
        monkeypatch.delenv(name, raising=False)
    with runtime.ray_session("ray://head:10001", announce=False):
        pass
    assert calls[0]["address"] == "ray://head:10001"
    # The preemption watcher stays on: a cluster's nodes can be drained.
    assert calls[0]["runtime_env"] == {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                                                    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    # This process's own fits pass them on to their controllers, too.
    assert runtime.os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in runtime.os.environ

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")  # the user's setting wins
    with runtime.ray_session("ray://head:10001", announce=False):
        pass
    assert calls[1]["runtime_env"]["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"


def test_ray_session_turns_the_preemption_watcher_off_on_an_embedded_ray(monkeypatch):
    import ray

    class Started:
        dashboard_url = None

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime, "start_embedded_ray", lambda **kwargs: calls.append(kwargs) or Started())
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    with runtime.ray_session(num_cpus=1, announce=False):
        assert runtime.os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert calls[0]["num_cpus"] == 1  # embedded: started here, its processes inherit the setting

    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")  # the user's setting wins
    with runtime.ray_session(num_cpus=1, announce=False):
        assert runtime.os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"



def _no_ray(*args, **kwargs):
    raise AssertionError("Ray was started")


class _FakeContext:
    def __init__(self, gcs_address):
        self.gcs_address = gcs_address


def _fake_ray(monkeypatch, started_at=None):
    """ray.init records the environment Ray's processes would inherit; the GCS comes up where asked."""
    import ray

    seen, calls = {}, []

    def init(**kwargs):
        seen.update({name: runtime.os.environ.get(name) for name in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")})
        calls.append(kwargs)
        return "context"

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.1.2.3")
    monkeypatch.setattr(ray, "get_runtime_context",
                        lambda: _FakeContext(started_at or seen["RAY_ADDRESS"]))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    return seen, calls


def test_start_embedded_ray_sets_the_address_for_rays_processes_only(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_GCS_SERVER_PORT", raising=False)
    seen, calls = _fake_ray(monkeypatch)
    assert runtime.start_embedded_ray(num_cpus=2) == "context"
    port = int(seen["RAY_GCS_SERVER_PORT"])
    assert seen["RAY_ADDRESS"] == f"10.1.2.3:{port}" and 0 < port < 65536
    assert calls == [{"address": "local", "num_cpus": 2}]  # a new Ray, never the one in RAY_ADDRESS
    assert "RAY_ADDRESS" not in runtime.os.environ and "RAY_GCS_SERVER_PORT" not in runtime.os.environ


def test_start_embedded_ray_keeps_your_gcs_port_and_refuses_a_bad_one(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    free = str(runtime._unused_port())  # a port nothing listens on
    monkeypatch.setenv("RAY_GCS_SERVER_PORT", free)
    seen, _ = _fake_ray(monkeypatch)
    runtime.start_embedded_ray()
    assert seen == {"RAY_ADDRESS": f"10.1.2.3:{free}", "RAY_GCS_SERVER_PORT": free}
    assert runtime.os.environ["RAY_GCS_SERVER_PORT"] == free and "RAY_ADDRESS" not in runtime.os.environ

    from raytumor.errors import ConfigError

    monkeypatch.setenv("RAY_GCS_SERVER_PORT", "63x")
    with pytest.raises(ConfigError, match="RAY_GCS_SERVER_PORT='63x': not a TCP port number"):
        runtime.start_embedded_ray()
    with runtime.socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        monkeypatch.setenv("RAY_GCS_SERVER_PORT", str(taken.getsockname()[1]))
        with pytest.raises(ConfigError, match="cannot use this port"):
            runtime.start_embedded_ray()


def test_start_embedded_ray_stops_a_ray_that_came_up_elsewhere(monkeypatch):
    from raytumor.errors import RaytumorError

    monkeypatch.delenv("RAY_GCS_SERVER_PORT", raising=False)
    _, calls = _fake_ray(monkeypatch, started_at="10.9.9.9:1")
    with pytest.raises(RaytumorError, match="started at 10.9.9.9:1"):
        runtime.start_embedded_ray()
    assert calls[-1] == "shutdown"  # its workers would carry a wrong RAY_ADDRESS


def test_start_embedded_ray_interrupted_stops_what_it_started(monkeypatch):
    """Ctrl-C during ``ray.init`` left Ray's dashboard and runtime-env agents running, orphaned."""
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_GCS_SERVER_PORT", raising=False)
    seen, calls = _fake_ray(monkeypatch)

    def interrupted_init(**kwargs):
        seen["RAY_ADDRESS"] = runtime.os.environ["RAY_ADDRESS"]
        raise KeyboardInterrupt

    monkeypatch.setattr(ray, "init", interrupted_init)
    monkeypatch.setattr(runtime, "kill_leftover_workers", lambda address: calls.append(("kill", address)))
    with pytest.raises(KeyboardInterrupt):
        runtime.start_embedded_ray()
    assert calls == ["shutdown", ("kill", seen["RAY_ADDRESS"])]
    assert "RAY_ADDRESS" not in runtime.os.environ


def test_ray_session_refuses_zero_cpus_before_starting_ray(monkeypatch):
    from raytumor.errors import ConfigError

    monkeypatch.setattr(runtime, "start_embedded_ray", _no_ray)
    with pytest.raises(ConfigError, match="--num-cpus 0: must be at least 1"):
        with runtime.ray_session(num_cpus=0, announce=False):
            pass


def test_an_address_where_nothing_listens_fails_at_once(monkeypatch):
    import ray

    from raytumor.errors import RaytumorError

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", _no_ray)
    free = runtime._unused_port()
    for address in (f"127.0.0.1:{free}", f"ray://127.0.0.1:{free}"):
        with pytest.raises(RaytumorError, match=f"Ray cluster at {address}: nothing answers there"):
            with runtime.ray_session(address, announce=False):
                pass
    with runtime.socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        runtime.check_cluster_reachable(f"127.0.0.1:{listening.getsockname()[1]}")
    runtime.check_cluster_reachable("auto")  # Ray finds it itself



def _process(name: str, ray_address: str, seconds: float = 600) -> subprocess.Popen:
    """A process called ``name`` (its argv[0]) with ``RAY_ADDRESS`` set, sleeping ``seconds``: a
    stand-in for a Ray worker (Ray names its workers ``ray::<class>``) that hangs, or exits late."""
    import os
    import time

    proc = subprocess.Popen(["bash", "-c", f'exec -a "{name}" sleep {seconds}'], env={**os.environ, "RAY_ADDRESS": ray_address})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until bash has become the named process
        with open(f"/proc/{proc.pid}/cmdline", "rb") as cmdline:
            if cmdline.read().startswith(name.encode()):
                return proc
        time.sleep(0.02)
    raise AssertionError(f"{name}: not started")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds processes in /proc")
def test_a_stopped_embedded_rays_hung_workers_are_killed_and_nothing_else(caplog):
    import signal

    address = "10.1.2.3:6379"
    hung = _process("ray::TrainController", address)
    other_rays = _process("ray::TrainController", "10.1.2.3:6380")
    not_a_worker = _process("python", address)  # e.g. a driver that used this Ray
    try:
        assert runtime.kill_leftover_workers(address, grace_s=0.3) == [hung.pid]
        assert hung.wait(timeout=10) == -signal.SIGKILL
        assert other_rays.poll() is None and not_a_worker.poll() is None
        assert f"killed ray::TrainController (pid {hung.pid})" in caplog.text and address in caplog.text
        assert runtime.kill_leftover_workers(address, grace_s=0.3) == []
    finally:
        for proc in (hung, other_rays, not_a_worker):
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds processes in /proc")
def test_a_worker_still_exiting_after_the_shutdown_is_left_to_exit(caplog):
    """After ``ray.shutdown()`` a TrainController at times still runs for ~0.2 s, then exits
    by itself: no kill, no warning."""
    address = "10.1.2.3:6379"
    exiting = _process("ray::TrainController", address, seconds=0.5)
    try:
        assert runtime.kill_leftover_workers(address, grace_s=10) == []
        assert exiting.wait(timeout=1) == 0
        assert "killed" not in caplog.text
    finally:
        exiting.kill()
        exiting.wait()


def test_an_embedded_session_ends_by_killing_what_its_shutdown_left(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: _FakeContext("10.1.2.3:6379"))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(runtime, "kill_leftover_workers", lambda address: calls.append(address) or [4321])
    assert runtime.stop_embedded_ray() == [4321]
    assert calls == ["shutdown", "10.1.2.3:6379"]  # after the shutdown, for that Ray only

    class Started:
        dashboard_url = None

    stopped = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime, "start_embedded_ray", lambda **kwargs: Started())
    monkeypatch.setattr(runtime, "stop_embedded_ray", lambda: stopped.append(True))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with runtime.ray_session(num_cpus=1, announce=False):
        assert not stopped
    assert stopped == [True]

_EMBEDDED_PROCESSES = """
import json, os, time
import ray
import psutil  # Ray's own copy (ray/thirdparty_files), on sys.path once ray is imported
from raytumor.runtime import ray_session

def own_idle_workers():
    return {p.pid for p in psutil.Process().children(recursive=True) if p.cmdline()[:1] == ["ray::IDLE"]}

@ray.remote
def worker_facts():
    from ray.util.state import list_nodes
    time.sleep(0.5)  # both tasks at once: each on a worker of its own
    try:
        state_api = len(list_nodes())
    except Exception as exc:
        state_api = repr(exc)[:300]
    return {"pid": os.getpid(), "ray_address": os.environ.get("RAY_ADDRESS"),
            "gcs_address": ray.get_runtime_context().gcs_address, "state_api_nodes": state_api}

with ray_session(num_cpus=2, announce=False):
    driver_env = {name: os.environ.get(name) for name in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    deadline = time.monotonic() + 60
    while len(own_idle_workers()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    prestarted = sorted(own_idle_workers())
    facts = ray.get([worker_facts.remote() for _ in range(2)])
print("RESULT " + json.dumps({"driver_env": driver_env, "prestarted": prestarted, "workers": facts}))
"""


@pytest.mark.ray
def test_embedded_ray_processes_know_their_cluster_and_use_prestarted_workers(ray_local):
    """With another Ray on the machine (the tests' own), an embedded Ray's workers reach their own
    cluster's state API (Ray Train's placement-group cleaner needs it), and its first tasks run on
    the workers Ray prestarted: a job runtime environment would leave those unused."""
    env = {k: v for k, v in runtime.os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    proc = subprocess.run([sys.executable, "-c", _EMBEDDED_PROCESSES], env=env, capture_output=True, text=True,
                          timeout=240)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["driver_env"] == {"RAY_ADDRESS": None, "RAY_GCS_SERVER_PORT": None}
    workers = result["workers"]
    assert {w["ray_address"] for w in workers} == {workers[0]["gcs_address"]}
    assert all(w["state_api_nodes"] == 1 for w in workers), workers
    assert len(result["prestarted"]) == 2
    assert sorted(w["pid"] for w in workers) == result["prestarted"]
