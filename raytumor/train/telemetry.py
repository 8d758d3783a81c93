"""raytumor's own metrics, exported through ``ray.util.metrics`` to the Ray dashboard and Prometheus."""

from __future__ import annotations

EPOCH_GAUGES = {
    "loss": "Training loss of the last epoch",
    "pretrain_loss": "Contrastive pre-training loss of the last epoch",
    "samples_per_s": "Training samples per second (all workers) in the last epoch",
    "data_wait_fraction": "Share of the last epoch spent waiting for input",
    "first_batch_s": "Slowest worker's seconds from loop start to its first batch of input (first epoch of a start)",
    "val_recall_macro": "Validation Recall_M (K-nearest-neighbour macro recall) after the last epoch",
}


class EpochMetrics:
    """Gauges ``raytumor_<name>`` tagged with the run and stage; set once per epoch on rank 0."""

    def __init__(self, run: str, stage: str):
        from ray.util.metrics import Gauge

        self.tags = {"run": run, "stage": stage}
        self.gauges = {
            name: Gauge(f"raytumor_{name}", description=text, tag_keys=("run", "stage"))
            for name, text in EPOCH_GAUGES.items()
        }

    def record(self, metrics: dict) -> None:
        for name, gauge in self.gauges.items():
            value = metrics.get(name)
            if value is not None and value == value:
                gauge.set(float(value), tags=self.tags)
