"""Async lifecycles behind the CLI commands: serve, worker, and both together for `promo up`.

Each waits for SIGTERM or SIGINT, then stops in order: health NOT_SERVING and in-flight calls
finish within the grace period, the worker finishes or cancels its jobs, pools close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable

import asyncpg
from arq.connections import ArqRedis, RedisSettings
from arq.connections import create_pool as create_arq_pool

from config.settings import DEFAULT_UP_METRICS_PORT, Settings
from server.app import Dependencies, ListenError, RunningServer, start_server
from server.metrics import MetricsEndpoint
from server.promotion_metrics import register_promotions_collector
from storage.db import create_pool
from storage.migrate import migrate_dsn
from workers.main import REDIS_ERRORS, WorkerRunner
from workers.metrics import register_outbox_collector

log = logging.getLogger("promo.cli")

# What a database that cannot be reached (or refuses us) raises at connect: socket errors
# (refused, unknown host, timeout) and asyncpg's (authentication, no such database).
_DATABASE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class StartupError(Exception):
    """A start that cannot go on, as one line naming the setting to look at (never a value:
    URLs may hold passwords). The CLI prints it as ``error: ...`` and exits with status 1."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def database_unreachable(exc: BaseException) -> StartupError:
    """The error for a PROMO_DATABASE_URL that cannot be used: the driver's reason only (its
    messages name host, port, user or database, never the password)."""
    return StartupError(f"PROMO_DATABASE_URL: cannot connect to PostgreSQL ({_reason(exc)})")


async def _database_pool(settings: Settings) -> asyncpg.Pool:
    assert settings.database_url
    try:
        return await create_pool(settings.database_url, min_size=settings.db_pool_min_size,
                                 max_size=settings.db_pool_max_size,
                                 command_timeout=settings.db_command_timeout_seconds)
    except _DATABASE_ERRORS as exc:
        raise database_unreachable(exc) from exc


async def migrate_or_fail(database_url: str) -> list[int]:
    """storage.migrate.migrate_dsn, with an unreachable database as a StartupError."""
    try:
        return await migrate_dsn(database_url)
    except _DATABASE_ERRORS as exc:
        raise database_unreachable(exc) from exc


def start_metrics(settings: Settings, port: int | None, *,
                  default_port: int | None = None,
                  setting: str = "PROMO_METRICS_PORT") -> MetricsEndpoint | None:
    """The /metrics endpoint on ``port`` (None or 0: off). With only a ``default_port`` (the
    `promo up` default), a busy port is logged and skipped instead of stopping the start.
    ``setting`` names the port's variable in the StartupError of a port that cannot be used."""
    if port:
        try:
            endpoint = MetricsEndpoint(settings.metrics_host, port)
        except OSError as exc:
            unknown_host = isinstance(exc, socket.gaierror)
            raise StartupError(
                f"{'PROMO_METRICS_HOST' if unknown_host else setting}: cannot serve metrics on "
                f"{settings.metrics_host}:{port} ({_reason(exc)})") from exc
    elif port is None and default_port:
        try:
            endpoint = MetricsEndpoint(settings.metrics_host, default_port)
        except OSError as exc:
            log.warning("metrics endpoint not started: port %s is busy (set PROMO_METRICS_PORT "
                        "to another port, or 0 for none)", default_port,
                        extra={"error": str(exc)})
            return None
    else:
        return None
    log.info("metrics endpoint listening", extra={"url": endpoint.url})
    return endpoint


async def _arq_client(redis_url: str) -> ArqRedis:
    """The server's client for queueing outbox jobs after commit. When Redis does not answer at
    the start, a client that connects on first use instead (redis-py reconnects on every
    command): queueing is best effort either way (storage.queue.queue_after_commit), and work
    committed meanwhile waits for the workers' sweeper, but once Redis answers jobs are queued
    at once again, as for a server whose Redis went away after its start."""
    try:
        return await create_arq_pool(RedisSettings.from_dsn(redis_url))
    except Exception as exc:
        log.warning("Redis unreachable: outbox jobs wait for the workers' sweeper until it "
                    "answers", extra={"error": str(exc)})
        return ArqRedis.from_url(redis_url)


def _stop_event() -> asyncio.Event:
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event


async def run_server(settings: Settings, *,
                     on_ready: Callable[[RunningServer], None] | None = None,
                     with_worker: bool = False) -> None:
    if not settings.database_url:
        raise RuntimeError("PROMO_DATABASE_URL is not set (or use `promo up`, which starts an "
                           "embedded PostgreSQL when none is configured)")
    stop = _stop_event()
    pool = await _database_pool(settings)
    worker_task: asyncio.Task[None] | None = None
    worker_stop = asyncio.Event()
    endpoint: MetricsEndpoint | None = None
    redis: ArqRedis | None = None
    try:
        # `promo up` (server and worker in one process) serves metrics by default.
        endpoint = start_metrics(settings, settings.metrics_port,
                                 default_port=DEFAULT_UP_METRICS_PORT if with_worker else None)
        if settings.migrate_on_start:  # its own connection: see migrate_dsn
            await migrate_or_fail(settings.database_url)
        if settings.redis_url:  # queue outbox jobs at once; without it they wait for the sweeper
            redis = await _arq_client(settings.redis_url)
        try:
            running = await start_server(settings, Dependencies(pool=pool, redis=redis))
        except ListenError as exc:
            raise StartupError(
                f"PROMO_GRPC_HOST / PROMO_GRPC_PORT: cannot listen on {settings.grpc_host}:"
                f"{settings.grpc_port} (the port is in use, or the host is not an address of "
                "this machine)") from exc
        if endpoint is not None:
            register_promotions_collector(asyncio.get_running_loop(), lambda: pool)
        if with_worker:
            register_outbox_collector(asyncio.get_running_loop(), lambda: pool)
            worker_task = asyncio.create_task(WorkerRunner(settings).run(worker_stop),
                                              name="promo-worker-runner")
        if on_ready is not None:
            on_ready(running)
        waiter = asyncio.create_task(stop.wait())
        watched: set[asyncio.Task[object]] = {waiter}  # type: ignore[arg-type]
        if worker_task is not None:
            watched.add(worker_task)  # type: ignore[arg-type]
        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        log.info("stopping", extra={"grace_s": settings.shutdown_grace_seconds})
        # Health goes NOT_SERVING and calls in flight finish before anything closes, also when
        # the stop comes from a crashed worker, whose error is then raised (loudly).
        await running.stop(settings.shutdown_grace_seconds)
        if worker_task is not None and worker_task in done:
            worker_task.result()
    finally:
        worker_stop.set()  # the runner closes its worker and returns
        if worker_task is not None and not worker_task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await worker_task
        if endpoint is not None:
            endpoint.close()
        if redis is not None:
            await redis.aclose()
        await pool.close()


async def run_worker(settings: Settings) -> None:
    stop = _stop_event()
    runner = WorkerRunner(settings)
    endpoint = start_metrics(settings, settings.worker_metrics_port,
                             setting="PROMO_WORKER_METRICS_PORT")
    if endpoint is not None:
        register_outbox_collector(
            asyncio.get_running_loop(),
            lambda: runner.worker.ctx.get("pool") if runner.worker is not None else None)
    try:
        await runner.run(stop)
    except REDIS_ERRORS as exc:  # only at its first start: later losses are ridden out
        raise StartupError(f"PROMO_REDIS_URL: cannot connect to Redis ({_reason(exc)})") from exc
    except _DATABASE_ERRORS as exc:
        if runner.started:
            raise
        raise database_unreachable(exc) from exc
    finally:
        if endpoint is not None:
            endpoint.close()
