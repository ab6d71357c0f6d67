"""Running outbox jobs and sweeping for lost ones.

The row in PostgreSQL is the truth: an attempt is recorded before the handler runs, the result
after. No database connection is held while the handler runs (it may call a webhook).
"""

from __future__ import annotations

import logging
import random
import time
from datetime import timedelta
from typing import Any

from config.settings import Settings
from core.clock import Clock
from storage import outbox
from storage.queue import queue_outbox_job
from workers.registry import HANDLERS, SWEEP_HOOKS, PermanentJobError

log = logging.getLogger("promo.worker")


class JobAlreadyRunning(Exception):
    """Raised by a handler that finds its job already in flight elsewhere (two copies of its arq
    job started at the same moment): the runner leaves the row to the one running it."""


def backoff_seconds(attempt: int, *, base: float, maximum: float,
                    rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: base * 2^(attempt-1), capped, times 0.5-1.0."""
    ceiling = min(maximum, base * (2 ** max(0, attempt - 1)))
    return ceiling * (0.5 + 0.5 * (rng or random).random())


def job_lease(settings: Settings) -> timedelta:
    return timedelta(seconds=settings.job_lease_seconds)


async def run_outbox_job(ctx: dict[str, Any], job_id: int) -> str:
    """The arq entry point: one attempt at outbox row ``job_id``."""
    pool = ctx["pool"]
    clock: Clock = ctx["clock"]
    settings: Settings = ctx["settings"]
    async with pool.acquire() as conn:
        job = await outbox.start_attempt(conn, job_id, now=clock.now(), lease=job_lease(settings))
    if job is None:
        return "not due or already done"
    fn = HANDLERS.get(job.kind)
    started = time.perf_counter()
    try:
        if fn is None:
            raise PermanentJobError(f"no handler registered for outbox kind {job.kind!r}")
        await fn(ctx, job)
    except JobAlreadyRunning:
        log.info("outbox job already in flight elsewhere; left to it", extra={
            "outbox_job_id": job.id, "kind": job.kind})
        return "already running"
    except PermanentJobError as exc:
        async with pool.acquire() as conn:
            await outbox.fail_attempt(conn, job.id, now=clock.now(), error=str(exc),
                                      retry_at=None)
        log.error("outbox job failed permanently", extra={
            "outbox_job_id": job.id, "kind": job.kind, "attempt": job.attempts, "error": str(exc)})
        return "dead"
    except Exception as exc:
        delay = backoff_seconds(job.attempts, base=settings.job_retry_base_seconds,
                                maximum=settings.job_retry_max_seconds)
        retry_at = clock.now() + timedelta(seconds=delay)
        async with pool.acquire() as conn:
            status = await outbox.fail_attempt(conn, job.id, now=clock.now(),
                                               error=f"{type(exc).__name__}: {exc}",
                                               retry_at=retry_at)
        log.warning("outbox job attempt failed", extra={
            "outbox_job_id": job.id, "kind": job.kind, "attempt": job.attempts,
            "status": status, "retry_in_s": round(delay, 3), "error": repr(exc)})
        if status == "pending" and ctx.get("redis") is not None:
            await queue_outbox_job(ctx["redis"], job_id=job.id, attempts=job.attempts,
                                   due_at=retry_at, queue_name=settings.queue_name)
        return status
    async with pool.acquire() as conn:
        await outbox.finish_job(conn, job.id, now=clock.now())
    log.info("outbox job done", extra={"outbox_job_id": job.id, "kind": job.kind,
                                       "attempt": job.attempts,
                                       "ms": round((time.perf_counter() - started) * 1000, 3)})
    return "done"


async def sweep_once(ctx: dict[str, Any]) -> int:
    """Queue every due outbox row whose lease is free, then run the registered sweep hooks.
    Returns how many rows were queued."""
    pool = ctx["pool"]
    clock: Clock = ctx["clock"]
    settings: Settings = ctx["settings"]
    lookahead = timedelta(seconds=2 * settings.sweeper_interval_seconds)
    async with pool.acquire() as conn:
        jobs = await outbox.lease_due_jobs(conn, now=clock.now(), lookahead=lookahead,
                                           lease=job_lease(settings))
    for job in jobs:
        await queue_outbox_job(ctx["redis"], job_id=job.id, attempts=job.attempts,
                               due_at=job.due_at, queue_name=settings.queue_name)
    if jobs:
        log.info("sweeper queued outbox jobs", extra={"count": len(jobs)})
    for hook in list(SWEEP_HOOKS):
        try:
            await hook(ctx)
        except Exception:
            log.exception("sweep hook failed", extra={"hook": getattr(hook, "__name__", "?")})
    return len(jobs)
