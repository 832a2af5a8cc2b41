"""Prometheus metrics at `/metrics`, correct across gunicorn's worker processes.

`gunicorn.conf.py` points `PROMETHEUS_MULTIPROC_DIR` at a fresh directory before any worker
starts, so every worker writes its samples there and any worker can answer for all of them.
Everything is recorded when a stream begins and when it ends, never per token.
"""

from __future__ import annotations

import functools
import os

from flask import Flask, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

STARTED = Counter("streams_started_total", "Answers started", ["endpoint"])
ACTIVE = Gauge("streams_active", "Answers in progress", multiprocess_mode="livesum")
FINISHED = Counter("streams_finished_total", "Answers ended, by outcome", ["outcome"])
TTFT = Histogram(
    "stream_ttft_seconds", "Time to first token", buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
)
DURATION = Histogram(
    "stream_duration_seconds", "Stream duration", buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
)
TOKENS = Counter("tokens_relayed_total", "Answer tokens relayed to clients")
HEARTBEATS = Counter("heartbeats_total", "Heartbeats sent while the model was silent")
DISCONNECTS = Counter("client_disconnects_total", "Clients that left before their answer ended")
UPSTREAM_ERRORS = Counter("upstream_errors_total", "Answers that failed upstream, by code", ["code"])


@functools.lru_cache(maxsize=256)
def child(metric: Counter, label: str) -> Counter:
    """`metric`'s child for `label`, made once: `labels()` takes a lock and builds a key each time.
    (Labels are endpoints, outcomes and error codes: a few dozen.)"""
    return metric.labels(label)


def stream_started(endpoint: str) -> None:
    child(STARTED, endpoint).inc()
    ACTIVE.inc()


def stream_ended(outcome: str, error_code: str | None, ttft_ms: int | None, duration_ms: int, tokens: int,
                 heartbeats: int) -> None:
    ACTIVE.dec()
    child(FINISHED, outcome).inc()
    if ttft_ms is not None:
        TTFT.observe(ttft_ms / 1000)
    DURATION.observe(duration_ms / 1000)
    TOKENS.inc(tokens)
    if heartbeats:
        HEARTBEATS.inc(heartbeats)
    if error_code == "interrupted":
        DISCONNECTS.inc()
    elif error_code is not None and error_code != "shutdown":
        child(UPSTREAM_ERRORS, error_code).inc()


def init_app(app: Flask) -> None:
    @app.get("/metrics")
    def metrics() -> Response:
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            from prometheus_client import REGISTRY as registry
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
