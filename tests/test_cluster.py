"""Cluster configs checked against Ray's own schema, and a real two-node Ray cluster on this
machine running raytumor's training and sweep code paths.

The two-node cluster (``ray.cluster_utils.Cluster``) lives in a subprocess with its own driver
and Ray temp dir, so the session's shared Ray (``ray_local``) is never touched; the
subprocess shuts the cluster down by its handle.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
GPU_WORKER = "ray.worker.gpu"


def ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.fixture(scope="module")
def aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


@pytest.fixture(scope="module")
def kuberay() -> dict:
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text()) if d]
    clusters = [d for d in docs if d.get("kind") == "RayCluster"]
    assert len(clusters) == 1
    return clusters[0]


# ---------------------------------------------------------------- AWS cluster launcher config


def test_aws_config_is_valid_for_rays_cluster_launcher(aws):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(aws, ray_schema())
    # What `ray up` does before it talks to AWS: fill in defaults, validate again.
    validate_config(prepare_config(copy.deepcopy(aws)))

    head = aws["available_node_types"][aws["head_node_type"]]
    gpu = aws["available_node_types"][GPU_WORKER]
    assert "GPU" not in head["resources"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] == 8 == aws["max_workers"]
    assert gpu["resources"]["GPU"] == 1
    assert aws["idle_timeout_minutes"] <= 10 and aws["provider"]["cache_stopped_nodes"] is False


def test_aws_config_starts_ray_with_token_auth_and_a_loopback_dashboard(aws):
    head = " ".join(aws["head_start_ray_commands"])
    worker = " ".join(aws["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head and "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token ray start --address=" in worker
    assert "-e RAY_AUTH_MODE=token" in aws["docker"]["run_options"]  # drivers and shells in the container too
    assert aws["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # one token on every node
    setup = " ".join(aws["setup_commands"])
    assert 'pip install -q "torch==2.13.0"' in setup and "pip install -q ~/raytumor" in setup
    assert aws["file_mounts"]["~/raytumor"] == "."
    # Shared storage: mounted on the host, passed into the container.
    assert any("/mnt/shared" in c and "mount" in c for c in aws["initialization_commands"])
    assert "-v /mnt/shared:/mnt/shared" in aws["docker"]["run_options"]


def test_every_top_level_key_of_the_aws_config_has_a_comment(aws):
    lines = (CLUSTER / "aws.yaml").read_text().splitlines()
    seen = []
    for number, line in enumerate(lines):
        match = re.match(r"^([A-Za-z_][\w]*):", line)
        if not match:
            continue
        seen.append(match.group(1))
        above = lines[number - 1].strip() if number else ""
        assert above.startswith("#"), f"aws.yaml:{number + 1}: top-level key {match.group(1)!r} has no comment above it"
    assert sorted(seen) == sorted(aws)


# ---------------------------------------------------------------- KubeRay, Dockerfile, search space


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_kuberay_manifest_has_head_and_autoscaling_gpu_workers(kuberay):
    import ray

    spec = kuberay["spec"]
    assert kuberay["apiVersion"] == "ray.io/v1"
    assert spec["rayVersion"] == ray.__version__ and spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    groups = spec["workerGroupSpecs"]
    assert len(groups) == 1
    gpu = groups[0]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] == 8 and gpu["replicas"] == 0
    (worker,) = _containers(gpu["template"])
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) == 1
    (head_container,) = _containers(head["template"])
    assert head_container["image"] == worker["image"]
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    for container in (head_container, worker, spec["autoscalerOptions"]):
        env = _env(container)
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_AUTH_TOKEN"]["secretKeyRef"]["key"] == "auth_token"  # from a Secret, never inline
    for container in (head_container, worker):
        assert {m["mountPath"] for m in container["volumeMounts"]} == {"/mnt/shared"}


def test_kuberay_shared_volume_is_read_write_many():
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text()) if d]
    (claim,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_dockerfile_pins_ray_and_torch_and_installs_this_tree():
    import ray

    text = (CLUSTER / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert base.startswith(f"rayproject/ray:{ray.__version__}-py311") and "latest" not in base
    assert 'pip install --no-cache-dir "torch==2.13.0"' in text
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", text)
    assert "ENV RAY_AUTH_MODE=token" in text and "RAY_AUTH_TOKEN=" not in text


def test_cluster_search_space_is_full_yaml_with_a_gpu_per_trial(aws, kuberay):
    from raytumor.sweep.space import load_search_space

    space, base = load_search_space(CLUSTER / "full-gpu.yaml")
    full, _ = load_search_space(REPO / "search_spaces" / "full.yaml")
    assert space.distributions() == full.distributions()  # the same search as full.yaml
    assert space.fixed() == {**full.fixed(), "resources.use_gpu": True, "resources.num_workers": 1,
                             "resources.cpus_per_worker": 2}
    assert base["data"]["dataset"].startswith("/mnt/shared/") and space.results_dir.startswith("/mnt/shared/")
    aws_gpu = aws["available_node_types"][GPU_WORKER]
    k8s_gpu = kuberay["spec"]["workerGroupSpecs"][0]
    assert space.max_concurrent_trials == aws_gpu["max_workers"] == k8s_gpu["maxReplicas"]
    # A trial's worker fits a GPU node with CPU to spare for Ray Data (AWS node, Kubernetes pod).
    pod_cpus = int(_containers(k8s_gpu["template"])[0]["resources"]["limits"]["cpu"])
    assert space.fixed()["resources.cpus_per_worker"] < min(aws_gpu["resources"]["CPU"], pod_cpus)


def test_nothing_in_cluster_binds_all_interfaces():
    """0.0.0.0 (or ::) appears only in a comment that says it is a deliberate choice; so far nowhere."""
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file()):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if "0.0.0.0" in line or re.search(r"host[=:\s\"']+::", line):
                assert line.lstrip().startswith("#") and "deliberate" in line, f"{path.name}:{number}: {line.strip()}"
        for host in re.findall(r"dashboard[-_]host[=:\s\"']+([^\s\"']+)", path.read_text()):
            assert host == "127.0.0.1", f"{path.name}: dashboard host {host}"


# ---------------------------------------------------------------- a real two-node cluster

TWO_NODE_SCRIPT = r"""
import json, socket, subprocess, sys, time
from pathlib import Path

import ray
import yaml
from ray.cluster_utils import Cluster

dataset, work = sys.argv[1], Path(sys.argv[2])
out = {"seconds": {}}
started = time.monotonic()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_workers(nodes):
    from ray.util.state import list_actors

    return [{"node": nodes.get(a.node_id, a.node_id), "job": a.job_id, "group": a.placement_group_id}
            for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True)]


# Two 1-CPU nodes told apart by a custom resource; the dashboard (state API) on 127.0.0.1.
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 1, "resources": {"rt_head": 1}, "include_dashboard": True,
    "dashboard_host": "127.0.0.1", "dashboard_port": free_port()})
try:
    cluster.add_node(num_cpus=1, resources={"rt_worker": 1})
    cluster.wait_for_nodes()
    out["address"] = cluster.address
    out["seconds"]["cluster"] = time.monotonic() - started

    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    nodes = {n["NodeID"]: ("head" if "rt_head" in n["Resources"] else "worker") for n in ray.nodes() if n["Alive"]}
    out["nodes"] = sorted(nodes.values())

    # raytumor's own path: 2 Train workers at 0.75 CPU cannot share a 1-CPU node, so they spread,
    # and each node keeps 0.25 CPU for Ray Data.
    from raytumor.config import load_config
    from raytumor.train.trainer import run_training

    config = load_config(overrides=[
        f"data.dataset={dataset}", "data.shape=[16,16,4]", f"output_dir={work / 'runs'}", "name=two-node",
        "model.width=0.25", "train.batch_size=9", "train.loss=batch_all", "train.margin=0.5", "train.lr=0.003",
        "train.epochs=2", "resources.num_workers=2", "resources.cpus_per_worker=0.75", "resources.use_gpu=false",
        "resources.max_failures=0"])
    mark = time.monotonic()
    result = run_training(config)
    out["seconds"]["train"] = time.monotonic() - mark
    out["run_dir"] = str(result.run_dir)
    out["train_job"] = ray.get_runtime_context().get_job_id()
    out["train_workers"] = train_workers(nodes)
    ray.shutdown()

    # A 1-trial sweep through the CLI, as on a real cluster: --address, results on a path both nodes see.
    space = {"name": "tiny", "dataset": dataset, "search": "random", "seed": 0, "num_samples": 1,
             "max_concurrent_trials": 1, "results_dir": str(work / "results"),
             "base": {"data": {"shape": [16, 16, 4]}, "model": {"width": 0.25},
                      "train": {"batch_size": 9, "lr": 0.003, "epochs": 1, "loss": "batch_all"}},
             "scheduler": {"type": "none"},
             "parameters": {"resources.num_workers": 2, "resources.cpus_per_worker": 0.75,
                            "resources.use_gpu": False, "resources.max_failures": 0,
                            "train.margin": {"type": "uniform", "low": 0.1, "high": 1.0}}}
    (work / "tiny.yaml").write_text(yaml.safe_dump(space))
    mark = time.monotonic()
    sweep = subprocess.run([sys.executable, "-m", "raytumor.cli", "sweep", str(work / "tiny.yaml"),
                            "--address", cluster.address], capture_output=True, text=True, timeout=400)
    out["seconds"]["sweep"] = time.monotonic() - mark
    out["sweep_rc"] = sweep.returncode
    out["sweep_output"] = (sweep.stdout + sweep.stderr)[-3000:]
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    out["all_workers"] = train_workers(nodes)
    ray.shutdown()
finally:
    cluster.shutdown()
out["seconds"]["total"] = time.monotonic() - started
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def two_node_cluster_run(tmp_path_factory):
    """Run ``TWO_NODE_SCRIPT`` on a tiny dataset; its JSON result and work directory."""
    from tests.conftest import make_dataset
    from tests.evaluate.test_report import write_prepared_cache

    root = tmp_path_factory.mktemp("two-node")
    dataset = make_dataset(root / "ds", n_per_class=(6, 6, 6), shape=(16, 16, 4))
    write_prepared_cache(dataset, shape=(16, 16, 4))  # the cache `data prepare` would write (no Ray needed)
    work = root / "work"
    work.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="rtc", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # RAY_TMPDIR: this cluster's sessions and its "current cluster" address file stay private, so
    # a bare ray.init() anywhere else on the machine never finds (or joins) it.
    env.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR=str(ray_tmp), RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5",
               PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", TWO_NODE_SCRIPT, str(dataset), str(work)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=480)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script's own process group: its driver and Ray nodes
        output, _ = proc.communicate()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, output[-5000:]
    result = json.loads(lines[-1][len("RESULT "):])
    print(f"two-node cluster timings (s): {result['seconds']}")
    return result, work


def _spread_groups(workers: list[dict], job: str) -> list[list[str]]:
    groups = defaultdict(list)
    for worker in workers:
        if worker["job"] == job:
            groups[worker["group"]].append(worker["node"])
    return [sorted(nodes) for nodes in groups.values()]


@pytest.mark.ray
@pytest.mark.slow
def test_two_worker_training_spreads_over_two_nodes(two_node_cluster_run):
    result, work = two_node_cluster_run
    assert result["nodes"] == ["head", "worker"]
    assert _spread_groups(result["train_workers"], result["train_job"]) == [["head", "worker"]]
    run_dir = Path(result["run_dir"])
    assert run_dir == work / "runs" / "two-node"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2
    assert pd.read_csv(run_dir / "metrics.csv")["epoch"].tolist() == [1, 2]
    assert (run_dir / "best_model.pt").is_file()


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_on_two_nodes_writes_results_to_shared_storage(two_node_cluster_run):
    from raytumor.sweep.run import BEST_FILE, LEADERBOARD_FILE

    result, work = two_node_cluster_run
    assert result["sweep_rc"] == 0, result["sweep_output"]
    experiment = work / "results" / "tiny"
    board = pd.read_csv(experiment / LEADERBOARD_FILE)
    assert len(board) == 1 and board["objective"].notna().all()
    assert (experiment / BEST_FILE).is_file()
    assert len(list(experiment.glob("trials/*/summary.json"))) == 1
    # The trial's 2 Train workers ran on both nodes.
    sweep_jobs = {w["job"] for w in result["all_workers"]} - {result["train_job"]}
    assert len(sweep_jobs) == 1
    groups = _spread_groups(result["all_workers"], sweep_jobs.pop())
    assert groups == [["head", "worker"]]
