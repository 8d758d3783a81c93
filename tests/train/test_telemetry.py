"""raytumor's gauges reach Ray's Prometheus metrics endpoint (what the dashboard's charts read)."""

from __future__ import annotations

import time
import urllib.request

import pytest

from raytumor.train.telemetry import EPOCH_GAUGES

pytestmark = pytest.mark.ray


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_epoch_gauges_are_exported_to_prometheus(ray_local):
    @ray_local.remote(num_cpus=0)
    class Worker:
        """Stands in for a Train worker of rank 0: sets the gauges, stays alive while scraped."""

        def record(self, metrics: dict) -> None:
            from raytumor.train.telemetry import EpochMetrics

            self.telemetry = EpochMetrics("telemetry-test", "train")
            self.telemetry.record(metrics)

    values = {"loss": 0.625, "samples_per_s": 42.5, "data_wait_fraction": 0.015, "val_recall_macro": 0.75,
              "first_batch_s": 1.25, "pretrain_loss": float("nan")}
    worker = Worker.remote()
    try:
        ray_local.get(worker.record.remote(values))
        port = ray_local.nodes()[0]["MetricsExportPort"]
        expected = {f'ray_raytumor_{name}{{': value for name, value in values.items() if value == value}
        deadline, text = time.time() + 60, ""
        while time.time() < deadline:
            text = scrape(port)
            lines = [line for line in text.splitlines() if 'run="telemetry-test"' in line]
            found = {prefix: float(line.rsplit(" ", 1)[1]) for line in lines for prefix in expected if line.startswith(prefix)}
            if found.keys() == expected.keys():
                break
            time.sleep(1)
        assert found == pytest.approx(expected), f"exported: {lines}"
        assert all('stage="train"' in line for line in lines)
        assert "ray_raytumor_pretrain_loss{" not in "\n".join(lines)  # NaN is not exported
        assert set(EPOCH_GAUGES) >= {"loss", "samples_per_s", "data_wait_fraction", "val_recall_macro"}
    finally:
        ray_local.kill(worker)
