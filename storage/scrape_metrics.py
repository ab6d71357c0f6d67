"""Prometheus gauges read from PostgreSQL when Prometheus scrapes.

The HTTP server of prometheus_client answers in a thread of its own; the figures live in the
database, behind the process's asyncpg pool and event loop. ``DatabaseCollector`` runs one query
on that loop from the scrape thread and waits at most SCRAPE_TIMEOUT_SECONDS; a failed or slow
query drops those gauges from that scrape (logged) instead of failing the whole page.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import asyncpg
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger("promo.metrics")

SCRAPE_TIMEOUT_SECONDS = 5.0


class DatabaseCollector(Collector):
    """Subclasses give the families, the query, and how its rows fill the families."""

    what = "the database"

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 pool: Callable[[], asyncpg.Pool | None]) -> None:
        self.loop = loop
        self.pool = pool

    def families(self) -> Sequence[GaugeMetricFamily]:
        raise NotImplementedError

    async def rows(self, conn: asyncpg.Connection) -> list[Any]:
        raise NotImplementedError

    def fill(self, families: Sequence[GaugeMetricFamily], rows: list[Any]) -> None:
        raise NotImplementedError

    def describe(self) -> Iterator[Metric]:
        yield from self.families()

    def collect(self) -> Iterator[Metric]:
        pool = self.pool()
        if pool is None or self.loop.is_closed():
            return
        future = asyncio.run_coroutine_threadsafe(self._read(pool), self.loop)
        try:
            rows = future.result(timeout=SCRAPE_TIMEOUT_SECONDS)
        except Exception:
            future.cancel()
            log.warning("could not read %s for metrics", self.what, exc_info=True)
            return
        families = self.families()
        self.fill(families, rows)
        yield from families

    async def _read(self, pool: asyncpg.Pool) -> list[Any]:
        async with pool.acquire() as conn:
            return await self.rows(conn)


_registered: dict[type[DatabaseCollector], DatabaseCollector] = {}


def register(kind: type[DatabaseCollector], loop: asyncio.AbstractEventLoop,
             pool: Callable[[], asyncpg.Pool | None],
             registry: CollectorRegistry = REGISTRY) -> None:
    """Serve ``kind``'s figures from this process (once per process and kind; a later call
    re-points the collector at the new loop and pool)."""
    found = _registered.get(kind)
    if found is None:
        _registered[kind] = kind(loop, pool)
        registry.register(_registered[kind])
    else:
        found.loop, found.pool = loop, pool


def registered(kind: type[DatabaseCollector]) -> DatabaseCollector | None:
    """The collector of ``kind`` this process serves, if ``register`` made one."""
    return _registered.get(kind)
