"""The hourly retention purge (storage/retention.py) as an arq cron job.

Why arq's cron rather than a sweeper hook: arq gives each hourly run one job id, so however many
workers run, one of them purges per hour (a second one would only find nothing to delete: the
statements skip locked rows). The run logs one line with the rows deleted per table and counts
them in ``promo_retention_deleted_rows_total``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from arq.cron import CronJob, cron
from prometheus_client import Counter

from config.settings import Settings
from core.clock import Clock
from storage import retention

log = logging.getLogger("promo.retention")

# Minute of the hour the purge runs at: off the full hour, where schedules and batches cluster.
PURGE_MINUTE = 17
# A run that has not finished by then is cancelled; the next hour carries on where it stopped.
PURGE_TIMEOUT_SECONDS = 55 * 60

DELETED = Counter("promo_retention_deleted_rows_total",
                  "Rows deleted by the hourly retention purge, by table.", ["table"])


def policy(settings: Settings) -> retention.RetentionPolicy:
    return retention.RetentionPolicy(
        webhook_event_days=settings.webhook_event_retention_days,
        webhook_delivery_days=settings.webhook_delivery_retention_days,
        webhook_attempt_days=settings.webhook_attempt_retention_days,
        outbox_job_days=settings.outbox_job_retention_days,
        idempotency_key_days=settings.idempotency_key_retention_days,
        bonus_result_days=settings.bonus_result_retention_days)


async def purge_retention(ctx: dict[str, Any]) -> dict[str, int]:
    """Delete every table's rows past its retention; returns the counts per table."""
    clock: Clock = ctx["clock"]
    started = time.perf_counter()
    async with ctx["pool"].acquire() as conn:
        counts = await retention.purge_all(conn, policy(ctx["settings"]), now=clock.now())
    for table, count in counts.items():
        if count:
            DELETED.labels(table).inc(count)
    log.info("retention purge done",
             extra={**counts, "ms": round((time.perf_counter() - started) * 1000, 3)})
    return counts


def cron_job() -> CronJob:
    """The hourly job. Its result is kept for an hour: arq will not queue a run whose result
    still exists, so a worker whose clock lags does not start the same hour's run again."""
    return cron(purge_retention, name="promo.retention", minute=PURGE_MINUTE, second=0,
                timeout=PURGE_TIMEOUT_SECONDS, max_tries=1, keep_result=3600)
