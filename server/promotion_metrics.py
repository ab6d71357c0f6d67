"""Prometheus gauges of the active promotions, read from PostgreSQL on scrape: each cap's use
in its current window and each personalized code pool's inventory.

Labels carry the promotion code, so the series grow with the number of ACTIVE promotions; at
most MAX_PROMOTIONS of them (by code) are reported, which keeps a scrape bounded. A cap's
current window is computed as grants compute it (core.caps.period_window in the promotion's
time zone, at the clock's now), and its use read from that window's cap_usage row, 0 when no
grant has been made in it yet. (Reading the newest row instead kept a full daily cap full after
local midnight until the day's first grant.)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import asyncpg
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from core.cap_state import CUSTOMERS_SCOPE
from core.caps import LIFETIME_START, CapPeriod, period_window
from core.clock import Clock, SystemClock
from storage.scrape_metrics import DatabaseCollector, register, registered

MAX_PROMOTIONS = 500

_ACTIVE = """
SELECT id, code, time_zone, budget_caps, customer_cap FROM promotions
 WHERE status = 'ACTIVE' ORDER BY code LIMIT $1"""

# One row per current window asked for, its use 0 without a cap_usage row.
_USED = """
SELECT w.n, coalesce(u.used, 0)::float8 AS used
  FROM unnest($1::bigint[], $2::text[], $3::text[], $4::timestamptz[])
       WITH ORDINALITY AS w(promotion_id, scope, period, start, n)
  LEFT JOIN cap_usage u ON u.promotion_id = w.promotion_id AND u.scope = w.scope
                       AND u.period = w.period AND u.period_start = w.start"""

_POOLS = """
SELECT p.code, cp.total, cp.allocated, cp.fallback_grants
  FROM code_pools cp JOIN promotions p ON p.id = cp.promotion_id
 WHERE p.id = ANY($1::bigint[]) AND p.code_type = 'PERSONALIZED'"""


def _current_windows(promotion: asyncpg.Record, now: datetime
                     ) -> list[tuple[str, str, datetime, float]]:
    """(scope, period, window start, limit) of each cap of an active promotion."""
    caps = promotion["budget_caps"]
    if isinstance(caps, str):
        caps = json.loads(caps)
    found: list[tuple[str, str, datetime, float]] = []
    if promotion["customer_cap"] is not None:
        found.append((CUSTOMERS_SCOPE, CapPeriod.LIFETIME.value, LIFETIME_START,
                      float(promotion["customer_cap"])))
    for cap in caps:
        period = CapPeriod(cap["period"])
        start, _ = period_window(period, now, promotion["time_zone"])
        found.append((cap["reward_type"], period.value, start, float(cap["limit"])))
    return found


class PromotionsCollector(DatabaseCollector):
    what = "the promotions' caps and code pools"

    def families(self) -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily("promo_cap_used", "Use of each cap of an active promotion in its "
                              "current window (amount, or customers for scope #customers).",
                              labels=["promotion", "scope", "period"]),
            GaugeMetricFamily("promo_cap_limit", "Each cap's limit.",
                              labels=["promotion", "scope", "period"]),
            GaugeMetricFamily("promo_code_pool_available", "Personalized codes not handed out "
                              "yet, by active promotion.", labels=["promotion"]),
            GaugeMetricFamily("promo_code_pool_used", "Personalized codes handed out.",
                              labels=["promotion"]),
            GaugeMetricFamily("promo_code_pool_fallback_grants", "Grants that got the fallback "
                              "code because the pool was empty.", labels=["promotion"]))

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 pool: Callable[[], asyncpg.Pool | None], clock: Clock | None = None) -> None:
        super().__init__(loop, pool)
        self.clock: Clock = clock or SystemClock()

    async def rows(self, conn: asyncpg.Connection) -> list[Any]:
        now = self.clock.now()
        promotions = await conn.fetch(_ACTIVE, MAX_PROMOTIONS)
        caps = [(p["id"], p["code"], *window) for p in promotions
                for window in _current_windows(p, now)]
        used = {row["n"]: row["used"] for row in await conn.fetch(
            _USED, [c[0] for c in caps], [c[2] for c in caps], [c[3] for c in caps],
            [c[4] for c in caps])} if caps else {}
        rows: list[Any] = [("cap", code, scope, period, used[n], limit)
                           for n, (_, code, scope, period, _start, limit)
                           in enumerate(caps, start=1)]
        rows += [("codes", r["code"], r["total"], r["allocated"], r["fallback_grants"])
                 for r in await conn.fetch(_POOLS, [p["id"] for p in promotions])]
        return rows

    def fill(self, families: Sequence[GaugeMetricFamily], rows: list[Any]) -> None:
        used, limit, available, allocated, fallback = families
        for row in rows:
            if row[0] == "cap":
                _, code, scope, period, value, cap_limit = row
                used.add_metric([code, scope, period], value)
                limit.add_metric([code, scope, period], cap_limit)
            else:
                _, code, total, handed_out, fallback_grants = row
                available.add_metric([code], total - handed_out)
                allocated.add_metric([code], handed_out)
                fallback.add_metric([code], fallback_grants)


def register_promotions_collector(loop: asyncio.AbstractEventLoop,
                                  pool: Callable[[], asyncpg.Pool | None],
                                  registry: CollectorRegistry = REGISTRY, *,
                                  clock: Clock | None = None) -> None:
    """Serve the gauges from this process; ``clock`` (the server's) says which windows are
    current."""
    register(PromotionsCollector, loop, pool, registry)
    collector = registered(PromotionsCollector)
    assert isinstance(collector, PromotionsCollector)
    collector.clock = clock or SystemClock()
