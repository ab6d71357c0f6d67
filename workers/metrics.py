"""Prometheus metrics of the workers: webhook delivery outcomes and latencies, delivery batch
durations, and the outbox queue (depth and age of the oldest due job, read on scrape).

The counters are recorded where the outcome is known (workers/webhooks.py). The outbox figures
come from PostgreSQL when Prometheus scrapes: the HTTP server's thread runs one small query on
the worker's event loop (the partial index on pending jobs keeps it cheap) and waits at most
SCRAPE_TIMEOUT_SECONDS for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import asyncpg
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from core.events import DeliveryStatus
from storage import webhooks as repo
from storage.scrape_metrics import DatabaseCollector, register

log = logging.getLogger("promo.metrics")

DELIVERIES = Counter(
    "promo_webhook_deliveries_total",
    "Delivery attempts and closings by channel and outcome: delivered, retry (will be tried "
    "again), failed (refused by the listener), dead (retries or deadline ran out), cancelled "
    "(listener inactive or unregistered).", ["channel", "outcome"])
ATTEMPT_SECONDS = Histogram(
    "promo_webhook_attempt_duration_seconds", "Time of one webhook POST or e-mail send.",
    ["channel"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
BATCH_SECONDS = Histogram(
    "promo_webhook_batch_duration_seconds", "Time of one delivery job: claiming, sending and "
    "recording every chunk of due deliveries it took.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0))
BATCH_CLAIMED = Counter("promo_webhook_batch_claimed_total",
                        "Delivery jobs claimed by delivery batches.")

_OUTCOME = {DeliveryStatus.DELIVERED: "delivered", DeliveryStatus.PENDING: "retry",
            DeliveryStatus.FAILED: "failed", DeliveryStatus.DEAD: "dead",
            DeliveryStatus.CANCELLED: "cancelled"}


def record_deliveries(results: Iterable[repo.AttemptResult],
                      closings: Iterable[repo.Closing]) -> None:
    """Count one chunk's attempt results and its closings that changed a delivery."""
    for result in results:
        channel = result.work.channel.value.lower()
        if not result.counted:  # no slot in time: no request made, so no duration either
            outcome = ("not_sent" if result.new_status is DeliveryStatus.PENDING
                       else _OUTCOME[result.new_status])
            DELIVERIES.labels(channel, outcome).inc()
            continue
        DELIVERIES.labels(channel, _OUTCOME[result.new_status]).inc()
        ATTEMPT_SECONDS.labels(channel).observe(result.latency_ms / 1000)
    for closing in closings:
        status = closing.delivery_status or closing.closed_before
        if status is not None:
            DELIVERIES.labels(closing.work.channel.value.lower(), _OUTCOME[status]).inc()


def record_batch(claimed: int, seconds: float) -> None:
    if claimed:
        BATCH_CLAIMED.inc(claimed)
        BATCH_SECONDS.observe(seconds)


_OUTBOX_SQL = """
SELECT kind, count(*) FILTER (WHERE status = 'pending') AS pending,
       count(*) FILTER (WHERE status = 'pending' AND due_at <= now()) AS due,
       coalesce(extract(epoch FROM now() - min(due_at) FILTER (
           WHERE status = 'pending' AND due_at <= now())), 0) AS oldest_due_seconds,
       count(*) FILTER (WHERE status = 'dead') AS dead
FROM outbox_jobs WHERE status = 'pending' OR status = 'dead' GROUP BY kind ORDER BY kind"""


class OutboxCollector(DatabaseCollector):
    """Outbox depth per job kind, queried when Prometheus scrapes."""

    what = "the outbox"

    def families(self) -> tuple[GaugeMetricFamily, ...]:
        return (GaugeMetricFamily("promo_outbox_pending_jobs",
                                  "Outbox jobs not finished yet (due now or later), by kind.",
                                  labels=["kind"]),
                GaugeMetricFamily("promo_outbox_due_jobs",
                                  "Outbox jobs due now and not finished: the backlog, by kind.",
                                  labels=["kind"]),
                GaugeMetricFamily("promo_outbox_oldest_due_age_seconds",
                                  "How long the oldest due outbox job has been waiting, by kind.",
                                  labels=["kind"]),
                GaugeMetricFamily("promo_outbox_dead_jobs",
                                  "Outbox jobs out of attempts (kept for the retention days), by "
                                  "kind: each needs a look, then JobService.RetryJob.",
                                  labels=["kind"]))

    async def rows(self, conn: asyncpg.Connection) -> list[Any]:
        return list(await conn.fetch(_OUTBOX_SQL))

    def fill(self, families: Sequence[GaugeMetricFamily], rows: list[Any]) -> None:
        pending, due, oldest, dead = families
        for row in rows:
            if row["pending"]:
                pending.add_metric([row["kind"]], row["pending"])
                due.add_metric([row["kind"]], row["due"])
                oldest.add_metric([row["kind"]], float(row["oldest_due_seconds"]))
            if row["dead"]:
                dead.add_metric([row["kind"]], row["dead"])


def register_outbox_collector(loop: asyncio.AbstractEventLoop,
                              pool: Callable[[], asyncpg.Pool | None],
                              registry: CollectorRegistry = REGISTRY) -> None:
    """Serve the outbox figures from this process."""
    register(OutboxCollector, loop, pool, registry)
