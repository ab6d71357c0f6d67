"""Running outbox jobs and sweeping for lost ones.

The row in PostgreSQL is the truth: an attempt is recorded before the handler runs, the result
after. No database connection is held while the handler runs (it may call a webhook).
"""

from __future__ import annotations

import logging
import random
import time
from datetime import datetime, timedelta
from typing import Any

from redis.exceptions import ResponseError

from config.settings import Settings
from core.clock import Clock
from storage import outbox
from storage.queue import fresh_arming, queue_outbox_job
from workers.registry import HANDLERS, SWEEP_CAPS, SWEEP_HOOKS, PermanentJobError

log = logging.getLogger("promo.worker")


class JobAlreadyRunning(Exception):
    """Raised by a handler that finds its job already in flight elsewhere (two copies of its arq
    job started at the same moment): the runner leaves the row to the one running it."""


class JobDeferred(Exception):
    """Raised by a handler that cannot start yet because other work holds what it needs (the
    batch of an earlier window of the same bonus definition): the attempt is given back, not
    failed, and the job runs again at ``retry_at``."""

    def __init__(self, reason: str, *, retry_at: datetime) -> None:
        super().__init__(reason)
        self.retry_at = retry_at


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
        return "not due or already done"  # or out of attempts
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
    except JobDeferred as exc:
        return await _defer(ctx, job, exc)
    except PermanentJobError as exc:
        async with pool.acquire() as conn:
            await outbox.fail_attempt(conn, job.id, now=clock.now(), error=str(exc),
                                      retry_at=None)
        log.error("outbox job failed permanently", extra={
            "outbox_job_id": job.id, "kind": job.kind, "attempt": job.attempts, "error": str(exc)})
        return "dead"
    except Exception as exc:
        # A handler may say when (webhook deliveries keep their retry before their deadline).
        retry_at = getattr(exc, "retry_at", None)
        if isinstance(retry_at, datetime):
            delay = max(0.0, (retry_at - clock.now()).total_seconds())
        else:
            delay = backoff_seconds(job.attempts, base=settings.job_retry_base_seconds,
                                    maximum=settings.job_retry_max_seconds)
            retry_at = clock.now() + timedelta(seconds=delay)
        # A webhook send that was not made gave its attempt back: its retry is queued under an
        # id of its own (the count repeats), which the sweeper cannot know, so the row stays
        # leased past the retry time and the sweeper does not queue a second copy.
        rearmed = getattr(exc, "not_made", False)
        async with pool.acquire() as conn:
            status = await outbox.fail_attempt(
                conn, job.id, now=clock.now(), error=f"{type(exc).__name__}: {exc}",
                retry_at=retry_at, lease_until=retry_at + job_lease(settings) if rearmed else None)
        log.warning("outbox job attempt failed", extra={
            "outbox_job_id": job.id, "kind": job.kind, "attempt": job.attempts,
            "status": status, "retry_in_s": round(delay, 3), "error": repr(exc)})
        if status == "pending" and ctx.get("redis") is not None:
            await _queue_next_run(ctx, job, attempts=job.attempts, due_at=retry_at,
                                  arming=fresh_arming(retry_at) if rearmed else "",
                                  lease_until=retry_at + job_lease(settings) if rearmed else None)
        return status
    async with pool.acquire() as conn:
        await outbox.finish_job(conn, job.id, now=clock.now())
    log.info("outbox job done", extra={"outbox_job_id": job.id, "kind": job.kind,
                                       "attempt": job.attempts,
                                       "ms": round((time.perf_counter() - started) * 1000, 3)})
    return "done"


async def _defer(ctx: dict[str, Any], job: outbox.OutboxJob, exc: JobDeferred) -> str:
    """Put the job off to ``exc.retry_at`` without counting the attempt. Its next run is
    queued here under an id of its own (the attempt count repeats), so the row stays leased
    a lease past it: the sweeper takes it over only if that copy is lost."""
    settings: Settings = ctx["settings"]
    redis = ctx.get("redis")
    lease_until = exc.retry_at + job_lease(settings) if redis is not None else None
    async with ctx["pool"].acquire() as conn:
        moved = await outbox.defer_attempt(conn, job.id, attempts=job.attempts,
                                           retry_at=exc.retry_at, lease_until=lease_until)
    log.info("outbox job put off: what it needs is busy", extra={
        "outbox_job_id": job.id, "kind": job.kind, "retry_at": exc.retry_at.isoformat(),
        "reason": str(exc), "moved": moved})
    if moved and redis is not None:
        assert lease_until is not None
        await _queue_next_run(ctx, job, attempts=job.attempts - 1, due_at=exc.retry_at,
                              arming=fresh_arming(exc.retry_at), lease_until=lease_until)
    return "deferred"


async def _queue_next_run(ctx: dict[str, Any], job: outbox.OutboxJob, *, attempts: int,
                          due_at: datetime, arming: str, lease_until: datetime | None) -> None:
    """Queue the row's next run in Redis. If Redis refuses, the sweeper's turn: the lease set
    for a copy under an id of its own (``lease_until``) is dropped so that it takes the row at
    its due time, not a lease later, and the failure is a warning, not the job's error."""
    try:
        await queue_outbox_job(ctx["redis"], job_id=job.id, attempts=attempts, due_at=due_at,
                               queue_name=ctx["settings"].queue_name, arming=arming)
    except Exception as error:
        if lease_until is not None:
            async with ctx["pool"].acquire() as conn:
                await outbox.release_requeue_lease(conn, job.id, lease_until=lease_until)
        log.warning("outbox job's next run not queued; the sweeper queues it at its time",
                    extra={"outbox_job_id": job.id, "kind": job.kind,
                           "due_at": due_at.isoformat(), "error": str(error)})


async def sweep_once(ctx: dict[str, Any]) -> int:
    """One sweeper tick: mark dead the jobs interrupted on every attempt, queue every due
    outbox row whose lease is free, then run the registered sweep hooks.

    Returns how many rows were handed to arq (arq keeps one job per id, so a row it already
    holds is not queued twice). The hooks run even when queueing failed: they only need
    PostgreSQL and queue best effort. A queueing error is raised after them, for the loop to log.
    """
    error: Exception | None = None
    queued = 0
    try:
        queued = await _queue_due_jobs(ctx)
    except Exception as exc:  # the hooks first; then the tick fails with this error
        error = exc
    await _run_sweep_hooks(ctx)
    if error is not None:
        raise error
    return queued


async def _queue_due_jobs(ctx: dict[str, Any]) -> int:
    pool = ctx["pool"]
    clock: Clock = ctx["clock"]
    settings: Settings = ctx["settings"]
    lookahead = timedelta(seconds=2 * settings.sweeper_interval_seconds)
    async with pool.acquire() as conn:
        buried = await outbox.bury_interrupted_jobs(conn, now=clock.now())
        jobs = await outbox.lease_due_jobs(
            conn, now=clock.now(), lookahead=lookahead, lease=job_lease(settings),
            capped={kind: cap(settings) for kind, cap in SWEEP_CAPS.items()})
    for dead in buried:
        log.error("outbox job failed permanently", extra={
            "outbox_job_id": dead.id, "kind": dead.kind, "attempt": dead.attempts,
            "error": dead.last_error})
    queued, unqueued, error = await _queue_jobs(ctx["redis"], jobs, settings.queue_name)
    if queued:
        log.info("sweeper queued outbox jobs", extra={"count": queued})
    if unqueued:
        async with pool.acquire() as conn:
            await outbox.release_leases(conn, unqueued)
        log.warning("sweeper could not queue outbox jobs; the next tick tries again", extra={
            "count": len(unqueued), "outbox_job_ids": [job.id for job in unqueued[:20]],
            "error": repr(error)})
    if error is not None:
        raise error
    return queued


async def _queue_jobs(redis: Any, jobs: list[outbox.OutboxJob], queue_name: str,
                      ) -> tuple[int, list[outbox.OutboxJob], Exception | None]:
    """Queue ``jobs`` one by one: (how many were queued, the ones that were not, the first
    error). Redis refusing one row (a ResponseError) is about that row: the rest still go.
    Any other error (Redis unreachable, a timeout) stops the tick's queueing at once: trying
    every other row would only wait out the same failure once per row."""
    queued = 0
    unqueued: list[outbox.OutboxJob] = []
    first_error: Exception | None = None
    for index, job in enumerate(jobs):
        try:
            await queue_outbox_job(redis, job_id=job.id, attempts=job.attempts,
                                   due_at=job.due_at, queue_name=queue_name)
        except ResponseError as exc:
            unqueued.append(job)
            first_error = first_error or exc
            continue
        except Exception as exc:
            unqueued.extend(jobs[index:])
            first_error = first_error or exc
            break
        queued += 1
    return queued, unqueued, first_error


async def _run_sweep_hooks(ctx: dict[str, Any]) -> None:
    """Each hook on its own: one failing hook is logged and does not keep the others from
    running."""
    for hook in list(SWEEP_HOOKS):
        try:
            await hook(ctx)
        except Exception:
            log.exception("sweep hook failed", extra={"hook": getattr(hook, "__name__", "?")})
