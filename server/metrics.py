"""Prometheus metrics of the gRPC server: RPCs by method and code, GetReward outcomes.

Recording is on the hot path, so each label combination's child is looked up once and cached
in a dict: a call costs a dict lookup, a counter increment and a histogram observation (a few
microseconds). The metrics live in prometheus_client's default registry, served over HTTP by
the process (cli/runtime.py) when PROMO_METRICS_PORT is set.
"""

from __future__ import annotations

import threading
from typing import Any

import grpc
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from promo.v1 import rewards_pb2 as rpb
from server.admission import Admission
from server.interceptors import CallObserver

# RPC latencies run from ~0.2 ms (a cached GetReward) to seconds (10,000-event batches).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0)

RPC_HANDLED = Counter(
    "promo_rpc_handled_total", "RPCs completed, by service, method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"])
RPC_SECONDS = Histogram(
    "promo_rpc_duration_seconds", "Time from the call's start to its status, by service, "
    "method and status code (authentication included).",
    ["grpc_service", "grpc_method", "grpc_code"], buckets=LATENCY_BUCKETS)
REWARDS = Counter(
    "promo_rewards_total", "GetReward answers: outcome granted, existing (a retry or a "
    "customer's earlier grant) or denied, and the denial reason.", ["outcome", "reason"])

RPC_IN_FLIGHT = Gauge(
    "promo_rpc_in_flight", "Calls this server process holds now (health and reflection not "
    "counted); at PROMO_MAX_CALLS_IN_FLIGHT further calls are refused with RESOURCE_EXHAUSTED "
    "SERVER_OVERLOADED (server/admission.py).")


def watch_admission(admission: Admission) -> None:
    """Report this admission's calls in flight (the last server started in the process)."""
    RPC_IN_FLIGHT.set_function(lambda: admission.in_flight)


GRANT_BATCH_SIZE = Histogram(
    "promo_grant_batch_size", "Grants per GetReward group-commit transaction "
    "(server/grant_batcher.py); the count is the number of transactions.",
    buckets=(1, 2, 4, 8, 16, 32, 60))
GRANT_BATCH_FALLBACKS = Counter(
    "promo_grant_batch_fallbacks_total", "Grant batches that failed as a whole and were sent "
    "again one grant at a time.")


class RpcMetrics(CallObserver):
    """The interceptor's observer: one counter and one histogram child per (method, code)."""

    def __init__(self) -> None:
        self._children: dict[tuple[str, grpc.StatusCode], tuple[Any, Any]] = {}

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        children = self._children.get((method, code))
        if children is None:
            children = self._child(method, code)
        children[0].inc()
        children[1].observe(seconds)

    def _child(self, method: str, code: grpc.StatusCode) -> tuple[Any, Any]:
        service, _, name = method.lstrip("/").partition("/")
        labels = (service, name, code.name)
        children = (RPC_HANDLED.labels(*labels), RPC_SECONDS.labels(*labels))
        self._children[(method, code)] = children
        return children


RPC_METRICS = RpcMetrics()

_REWARD_CHILDREN: dict[tuple[bool, bool, int], Any] = {}


def observe_reward(response: rpb.GetRewardResponse) -> rpb.GetRewardResponse:
    """Count one GetReward answer by outcome and denial reason; returns the answer."""
    granted = response.HasField("grant")
    key = (granted, response.existing, response.denial_reason)
    child = _REWARD_CHILDREN.get(key)
    if child is None:
        if granted:
            outcome, reason = ("existing" if response.existing else "granted"), ""
        else:
            outcome = "denied"
            reason = rpb.DenialReason.Name(response.denial_reason).removeprefix(
                "DENIAL_REASON_")
        child = _REWARD_CHILDREN[key] = REWARDS.labels(outcome, reason)
    child.inc()
    return response


class MetricsEndpoint:
    """A running /metrics HTTP endpoint (prometheus_client's threaded WSGI server)."""

    def __init__(self, host: str, port: int,
                 registry: CollectorRegistry = REGISTRY) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port: int = self._server.server_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if isinstance(self._thread, threading.Thread):
            self._thread.join(timeout=5)
