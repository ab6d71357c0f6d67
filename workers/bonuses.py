"""Dynamic-bonus jobs: the batch of one (definition, batching window), due schedules, and the
sweep that re-arms the batch of requests left pending after their window's batch ran.

The 30-day purge of results is part of the hourly retention job (storage/retention.py).

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
from storage.queue import queue_after_commit, queue_deliveries_after_commit
from workers.outbox import JobAlreadyRunning, JobDeferred
from workers.registry import PermanentJobError, handler, sweep_hook

log = logging.getLogger("promo.bonuses")

# How long the next window's job waits for an earlier window's batch of the same definition:
# 5 s at first, a quarter of the time waited so far later, at most a minute.
BUSY_RETRY_SECONDS = 5.0
BUSY_RETRY_MAX_SECONDS = 60.0

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
    except repo.DefinitionBusy as exc:
        # An earlier window's batch is still running: its requests are not this window's,
        # so this window runs right after it, not a whole lease later. The wait between
        # tries grows with the time waited (5 s, up to a minute), and past a job lease it is
        # logged: a holder that hangs would otherwise put this job off unnoticed.
        waited = (now - end).total_seconds()
        if waited > ctx["settings"].job_lease_seconds:
            log.warning("bonus batch waits for another batch of its definition", extra={
                "definition_pk": definition_pk, "window_start": window.isoformat(),
                "waited_s": round(waited)})
        delay = min(max(BUSY_RETRY_SECONDS, waited / 4), BUSY_RETRY_MAX_SECONDS)
        raise JobDeferred(str(exc), retry_at=now + timedelta(seconds=delay)) from exc
    except repo.BatchBusy as exc:
        raise JobAlreadyRunning(str(exc)) from exc
    log.info("bonus batch done", extra={
        "definition_id": report.definition_id, "definition_pk": definition_pk,
        "batch_id": report.batch_pk, "window_start": window.isoformat(),
        "requests": report.requests, "customers": report.customers,
        "events_read": report.events_read, "ms": report.duration_ms, **report.statuses})
    # The batch's events' deliveries: a few claimers, not one arq job per result.
    await queue_deliveries_after_commit(ctx.get("redis"), job_ids=report.outbox_job_ids,
                                        due_at=now, queue_name=ctx["settings"].queue_name,
                                        worker_max_jobs=ctx["settings"].worker_max_jobs)


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


@sweep_hook
async def rearm_stranded_batches(ctx: dict[str, Any]) -> None:
    """Requests still pending after their window's batch finished get that batch again (see
    storage.bonuses.rearm_stranded_batches); on every sweeper tick, one indexed query."""
    clock: Clock = ctx["clock"]
    async with ctx["pool"].acquire() as conn:
        armed = await repo.rearm_stranded_batches(conn, now=clock.now())
    for job_id, due in armed:
        log.warning("bonus requests were left pending after their batch ran: batch queued again",
                    extra={"outbox_job_id": job_id})
        await queue_after_commit(ctx.get("redis"), job_id=job_id, due_at=due,
                                 queue_name=ctx["settings"].queue_name)
