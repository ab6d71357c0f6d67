"""Prometheus gauges of the active promotions, read from PostgreSQL on scrape: each cap's use
in its current window and each personalized code pool's inventory.

Labels carry the promotion code, so the series grow with the number of ACTIVE promotions; at
most MAX_PROMOTIONS of them (by code) are reported, which keeps a scrape bounded. The caps are
read from cap_usage rows whose window is the newest for their (promotion, scope, period): the
current one once a grant has been made in it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from storage.scrape_metrics import DatabaseCollector, register

MAX_PROMOTIONS = 500

_SQL = """
WITH active AS (
    SELECT id, code, budget_caps, customer_cap FROM promotions
     WHERE status = 'ACTIVE' ORDER BY code LIMIT $1),
latest AS (
    SELECT DISTINCT ON (u.promotion_id, u.scope, u.period)
           u.promotion_id, u.scope, u.period, u.used
      FROM cap_usage u JOIN active a ON a.id = u.promotion_id
     ORDER BY u.promotion_id, u.scope, u.period, u.period_start DESC)
SELECT 'cap' AS kind, a.code, l.scope, l.period, l.used::float8 AS used,
       CASE WHEN l.scope = '#customers' THEN a.customer_cap::float8
            ELSE (SELECT (c->>'limit')::float8 FROM jsonb_array_elements(a.budget_caps) c
                   WHERE c->>'reward_type' = l.scope AND c->>'period' = l.period) END AS limit_,
       0 AS total, 0 AS allocated, 0 AS fallback_grants
  FROM latest l JOIN active a ON a.id = l.promotion_id
UNION ALL
SELECT 'codes', a.code, '', '', 0, 0, cp.total, cp.allocated, cp.fallback_grants
  FROM code_pools cp JOIN active a ON a.id = cp.promotion_id"""


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

    async def rows(self, conn: asyncpg.Connection) -> list[Any]:
        return list(await conn.fetch(_SQL, MAX_PROMOTIONS))

    def fill(self, families: Sequence[GaugeMetricFamily], rows: list[Any]) -> None:
        used, limit, available, allocated, fallback = families
        for row in rows:
            if row["kind"] == "cap":
                labels = [row["code"], row["scope"], row["period"]]
                used.add_metric(labels, row["used"])
                if row["limit_"] is not None:
                    limit.add_metric(labels, row["limit_"])
            else:
                available.add_metric([row["code"]], row["total"] - row["allocated"])
                allocated.add_metric([row["code"]], row["allocated"])
                fallback.add_metric([row["code"]], row["fallback_grants"])


def register_promotions_collector(loop: asyncio.AbstractEventLoop,
                                  pool: Callable[[], asyncpg.Pool | None],
                                  registry: CollectorRegistry = REGISTRY) -> None:
    register(PromotionsCollector, loop, pool, registry)
