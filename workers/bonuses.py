"""Dynamic-bonus jobs: the batch of one (definition, batching window), and the 30-day purge.

The batch job is an outbox row written with the window's first request, due when the window
closes (dedup key per definition and window, so one job per window). It computes every pending
request of the definition (stragglers of earlier windows included) with one aggregate pass; see
storage/bonuses.py for why a crash or a second copy of the job cannot lose or double anything.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from core.clock import Clock
from storage import bonus_triggers as triggers_repo
from storage import bonuses as repo
from storage.outbox import OutboxJob
from storage.queue import queue_after_commit
from workers.outbox import JobAlreadyRunning
from workers.registry import PermanentJobError, handler, sweep_hook

log = logging.getLogger("promo.bonuses")

PURGE_EVERY = timedelta(hours=1)


@handler(repo.BATCH_JOB_KIND)
async def run_bonus_batch(ctx: dict[str, Any], job: OutboxJob) -> None:
    clock: Clock = ctx["clock"]
    now = clock.now()
    try:
        definition_pk = int(job.payload["definition"])
        window = datetime.fromisoformat(job.payload["window_start"])
        end = datetime.fromisoformat(job.payload["window_end"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PermanentJobError(f"bad bonus batch payload {job.payload!r}") from exc
    if now < end:  # a clock behind the queue's: try again at the due time
        raise RuntimeError("the bonus batch window has not closed yet")
    try:
        report = await repo.run_batch(ctx["pool"], definition_pk, window, now=now)
    except repo.BatchBusy as exc:
        raise JobAlreadyRunning(str(exc)) from exc
    log.info("bonus batch done", extra={
        "definition_pk": definition_pk, "window_start": window.isoformat(),
        "requests": report.requests, "customers": report.customers,
        "events_read": report.events_read, "ms": report.duration_ms, **report.statuses})
    for job_id in report.outbox_job_ids:
        await queue_after_commit(ctx.get("redis"), job_id=job_id, due_at=now,
                                 queue_name=ctx["settings"].queue_name)


@sweep_hook
async def purge_old_results(ctx: dict[str, Any]) -> None:
    """Results older than 30 days are deleted (the vendor keeps the queue's history 30 days);
    the ledger of issued rewards stays. At most once an hour per worker."""
    clock: Clock = ctx["clock"]
    now = clock.now()
    last = ctx.get("bonus_purged_at")
    if last is not None and now - last < PURGE_EVERY:
        return
    async with ctx["pool"].acquire() as conn:
        deleted = await repo.purge(conn, now=now)
    ctx["bonus_purged_at"] = now
    if deleted:
        log.info("purged old bonus results", extra={"count": deleted})


@sweep_hook
async def run_due_schedules(ctx: dict[str, Any]) -> None:
    """Scheduled bonus runs (e.g. every Monday 06:00 for last weekend's deposits): due
    schedules become requests in the current batching window, on every sweeper tick."""
    clock: Clock = ctx["clock"]
    settings = ctx["settings"]
    jobs = await triggers_repo.run_due_schedules(ctx["pool"], now=clock.now(),
                                        default_window=settings.bonus_batch_window_seconds)
    for job_id, due in jobs:
        await queue_after_commit(ctx.get("redis"), job_id=job_id, due_at=due,
                                 queue_name=settings.queue_name)
