"""The arq worker: shared resources in ``ctx``, the outbox job, the sweeper loop and the hourly
retention purge.

Resources (the asyncpg pool) are created in ``on_startup`` inside the worker's loop and kept in
``ctx``; the sweeper runs as a background task of the same loop, every
``sweeper_interval_seconds``. Several workers may run at once: leases and SKIP LOCKED keep them
from queueing the same row twice in one interval, and handlers are idempotent anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from arq.connections import RedisSettings
from arq.worker import Worker, func
from redis.exceptions import RedisError

from config.settings import Settings
from core.clock import Clock, SystemClock
from storage.db import create_pool
from storage.migrate import migrate_dsn
from storage.queue import OUTBOX_JOB_FUNCTION
from workers import bonuses as _bonuses  # noqa: F401  registers bonus.batch + purge
from workers import campaigns as _campaigns  # noqa: F401  registers campaign.notify/execute
from workers import codes as _codes  # noqa: F401  dispatches pending code pool alerts
from workers import retention, webhooks  # webhooks registers the webhook.deliver handler
from workers.outbox import run_outbox_job, sweep_once

log = logging.getLogger("promo.worker")

# What a lost or restarted Redis raises: redis-py wraps socket errors in its ConnectionError and
# TimeoutError, both RedisErrors (a bare OSError is the database's or something else's).
REDIS_ERRORS = (RedisError,)
# How long a stopping worker waits for Redis to delete its health-check key, and again to
# close its connections.
REDIS_CLOSE_TIMEOUT_SECONDS = 2.0
_STARTED = "promo_started"  # set in ctx once on_startup has finished
_STOPPED = "promo_stopped"  # set in ctx once on_shutdown has run


class PromoWorker(Worker):
    """arq's Worker with a shutdown that cannot fail on its own cancelled jobs.

    arq's ``close()`` cancels the running job tasks and then gathers them; a task cancelled
    while arq itself was recording its result (not inside our handler) re-raises
    CancelledError there. That skipped ``on_shutdown`` (pool left open, no "worker stopped")
    and ended `promo worker` with a traceback and exit code 1 on SIGTERM. Here the tasks are
    cancelled and waited for without raising first, then forgotten, and arq closes as usual.
    An interrupted outbox job is not lost: its row stays pending and is queued again when its
    lease runs out. A Redis that is gone or stalled does not stop the shutdown either (arq's
    close first deletes its health-check key there): that waits at most
    REDIS_CLOSE_TIMEOUT_SECONDS, and ``on_shutdown`` still runs.
    """

    async def close(self) -> None:
        self.allow_pick_jobs = False  # no new job between the cancel and arq's close
        if self.main_task is not None:
            self.main_task.cancel()
        running = list(self.tasks.values())
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                if not task.cancelled() and task.exception() is not None:
                    log.error("job task failed while the worker stopped",
                              exc_info=task.exception())
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)  # as arq's close: tells its main loop to end
        if self._pool is None:
            return
        # arq's close, step by step, with Redis's two steps bounded: a Redis that accepts
        # connections but never answers (stalled, not down) would otherwise hold SIGTERM.
        try:
            await asyncio.wait_for(self._pool.delete(self.health_check_key),
                                   REDIS_CLOSE_TIMEOUT_SECONDS)
        except (TimeoutError, *REDIS_ERRORS) as exc:
            log.warning("Redis unreachable while the worker stopped; stopping without it",
                        extra={"error": str(exc) or type(exc).__name__})
        if self.on_shutdown is not None and not self.ctx.get(_STOPPED):
            await self.on_shutdown(self.ctx)
        with contextlib.suppress(TimeoutError, *REDIS_ERRORS):
            await asyncio.wait_for(self._pool.close(close_connection_pool=True),
                                   REDIS_CLOSE_TIMEOUT_SECONDS)
        self._pool = None


async def _sweeper_loop(ctx: dict[str, Any], interval: float) -> None:
    while True:
        try:
            await sweep_once(ctx)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("sweeper tick failed; trying again next tick")
        await asyncio.sleep(interval)


def build_worker(settings: Settings, *, clock: Clock | None = None, burst: bool = False,
                 handle_signals: bool = True, run_sweeper: bool = True) -> Worker:
    """Create the arq Worker (call inside the running event loop). ``run_sweeper=False`` also
    leaves out the hourly retention cron: tests that drive jobs themselves get neither."""
    if not settings.redis_url or not settings.database_url:
        raise RuntimeError("the worker needs PROMO_DATABASE_URL and PROMO_REDIS_URL "
                           "(or use `promo up`, which starts embedded ones)")
    database_url = settings.database_url

    async def on_startup(ctx: dict[str, Any]) -> None:
        ctx["settings"] = settings
        ctx["clock"] = clock or SystemClock()
        ctx[webhooks.SECRET_BOX_KEY] = settings.secret_box()  # opens listener secrets to sign
        ctx["pool"] = await create_pool(database_url, min_size=settings.db_pool_min_size,
                                        max_size=settings.db_pool_max_size,
                                        command_timeout=settings.db_command_timeout_seconds)
        if settings.migrate_on_start:  # its own connection: see migrate_dsn
            await migrate_dsn(database_url)
        await webhooks.setup(ctx)
        if run_sweeper:
            ctx["sweeper"] = asyncio.create_task(
                _sweeper_loop(ctx, settings.sweeper_interval_seconds), name="promo-sweeper")
        ctx[_STARTED] = True
        log.info("worker started", extra={"queue": settings.queue_name})

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        sweeper = ctx.pop("sweeper", None)
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        await webhooks.teardown(ctx)
        pool = ctx.pop("pool", None)
        if pool is not None:
            await pool.close()
        ctx[_STOPPED] = True
        log.info("worker stopped")

    return PromoWorker(
        functions=[func(run_outbox_job, name=OUTBOX_JOB_FUNCTION)],
        cron_jobs=[retention.cron_job()] if run_sweeper else None,
        queue_name=settings.queue_name,
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        max_jobs=settings.worker_max_jobs,
        max_tries=settings.job_max_tries,
        # arq cancels a job after job_timeout (300 s by default). The outbox lease is how long
        # an attempt may be in flight, so the timeout follows it: a longer lease lets long jobs
        # finish, and an attempt is cancelled before its lease runs out and it is queued again.
        job_timeout=settings.job_lease_seconds,
        burst=burst,
        handle_signals=handle_signals,
        keep_result=60,
        poll_delay=0.2,
    )


class WorkerRunner:
    """Runs the arq worker until ``stop`` is set, through Redis outages.

    arq's poll loop raises when Redis goes away (a restart, a failover), which ended
    `promo worker` (and `promo up` with it). A worker that has started and then loses Redis is
    closed (its jobs in flight are cancelled: their outbox rows stay leased and run again after
    the lease) and a new one is started, after 1, 2, 4 ... up to 30 s, until Redis answers.
    Nothing is lost meanwhile: the work waits in PostgreSQL, and the servers' queueing is best
    effort. A worker that cannot reach Redis at its very first start still fails at once, so a
    wrong PROMO_REDIS_URL is an error, not an endless wait.
    """

    MAX_DELAY_SECONDS = 30.0

    def __init__(self, settings: Settings, *, clock: Clock | None = None) -> None:
        self._settings = settings
        self._clock = clock
        self.worker: Worker | None = None  # the current one (metrics read its pool)
        self.started = False  # some worker of this runner reached Redis and PostgreSQL

    async def run(self, stop: asyncio.Event) -> None:
        delay = 1.0
        connected_before = False
        while not stop.is_set():
            worker = build_worker(self._settings, clock=self._clock, handle_signals=False)
            self.worker = worker
            task = asyncio.create_task(worker.async_run(), name="promo-worker")
            waiter = asyncio.create_task(stop.wait())
            try:
                done, _ = await asyncio.wait({task, waiter},
                                             return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:  # this runner cancelled: the worker stops too
                await _stop_worker(worker, task)
                raise
            finally:
                waiter.cancel()
            error = task.exception() if task in done and not task.cancelled() else None
            started = bool(worker.ctx.get(_STARTED))  # Redis and PostgreSQL both answered
            self.started = self.started or started
            await _stop_worker(worker, task)
            if task not in done or error is None:
                return  # stopped, or a burst worker that finished
            if not isinstance(error, REDIS_ERRORS) or not (started or connected_before):
                raise error
            if started:
                delay = 1.0
            connected_before = True
            log.warning("worker lost Redis; starting again when it answers",
                        extra={"error": str(error) or type(error).__name__,
                               "retry_in_s": delay})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, self.MAX_DELAY_SECONDS)


async def _stop_worker(worker: Worker, task: asyncio.Task[None]) -> None:
    """Close the worker (its jobs are cancelled, ``on_shutdown`` runs), then its main task."""
    await worker.close()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
