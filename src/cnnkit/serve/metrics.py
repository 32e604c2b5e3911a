"""The server's Prometheus metrics (prometheus-client), one registry per app."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STAGES = ("queue", "preprocess", "inference", "postprocess", "total")


class Metrics:
    """Request counts by status, latency per stage, batch sizes, in-flight requests, queued
    images and predicted-class counts, labelled by model."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("cnnkit_requests", "Predict requests by model and HTTP status",
                                ["model", "status"], registry=r)
        self.latency = Histogram("cnnkit_latency_seconds", "Predict latency by stage (queue, preprocess, "
                                 "inference, postprocess, total)", ["model", "stage"], buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.batch = Histogram("cnnkit_batch_images", "Images per core call", ["model"],
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.in_flight = Gauge("cnnkit_in_flight_requests", "Predict requests being answered", ["model"],
                               registry=r)
        self.queued = Gauge("cnnkit_queued_images", "Images waiting for a batch", ["model"], registry=r)
        self.drift = Gauge("cnnkit_drift_score", "Largest PSI of the recent requests' features against the "
                           "reference", ["model"], registry=r)
        self.drift_feature = Gauge("cnnkit_drift_psi", "PSI of one feature of the recent requests against the "
                                   "reference", ["model", "feature"], registry=r)
        self.classes = Counter("cnnkit_predicted_class", "Predicted classes (labels, detections, mask classes)",
                               ["model", "class_name"], registry=r)

    def observe(self, model: str, timing: dict[str, float]) -> None:
        for stage in STAGES:
            if f"{stage}_ms" in timing:
                self.latency.labels(model, stage).observe(timing[f"{stage}_ms"] / 1e3)

    def count_classes(self, model: str, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            for name in predicted_classes(row):
                self.classes.labels(model, name).inc()


def predicted_classes(row: dict[str, Any]) -> list[str]:
    """The class names a result row names: its label, its tags, its detections' classes or
    the classes in its mask or label volume."""
    if "detections" in row:
        return [d["class_name"] for d in row["detections"]]
    if "labels" in row and isinstance(row["labels"], list):
        return list(row["labels"])
    if "label" in row:
        return [row["label"]]
    if "classes" in row:
        return list(row["classes"])
    if "voxels" in row:
        return list(row["voxels"])
    return []
