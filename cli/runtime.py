"""Async lifecycles behind the CLI commands: serve, worker, and both together for `promo up`.

Each waits for SIGTERM or SIGINT, then stops in order: health NOT_SERVING and in-flight calls
finish within the grace period, the worker finishes or cancels its jobs, pools close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from config.settings import Settings
from server.app import Dependencies, RunningServer, start_server
from storage.db import create_pool
from storage.migrate import migrate
from workers.main import build_worker

log = logging.getLogger("promo.cli")


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
    pool = await create_pool(settings.database_url, min_size=settings.db_pool_min_size,
                             max_size=settings.db_pool_max_size,
                             command_timeout=settings.db_command_timeout_seconds)
    worker_task: asyncio.Task[None] | None = None
    worker = None
    try:
        if settings.migrate_on_start:
            async with pool.acquire() as conn:
                await migrate(conn)
        running = await start_server(settings, Dependencies(pool=pool))
        if with_worker:
            worker = build_worker(settings, handle_signals=False)
            worker_task = asyncio.create_task(worker.async_run(), name="promo-worker")
        if on_ready is not None:
            on_ready(running)
        waiter = asyncio.create_task(stop.wait())
        watched: set[asyncio.Task[object]] = {waiter}  # type: ignore[arg-type]
        if worker_task is not None:
            watched.add(worker_task)  # type: ignore[arg-type]
        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        if worker_task in done and worker_task is not None:
            worker_task.result()  # a crashed worker stops everything, loudly
        log.info("stopping", extra={"grace_s": settings.shutdown_grace_seconds})
        await running.stop(settings.shutdown_grace_seconds)
    finally:
        if worker is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await worker.close()
        if worker_task is not None and not worker_task.done():
            worker_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker_task
        await pool.close()


async def run_worker(settings: Settings) -> None:
    stop = _stop_event()
    worker = build_worker(settings, handle_signals=False)
    task = asyncio.create_task(worker.async_run(), name="promo-worker")
    waiter = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
    finally:
        waiter.cancel()
        await worker.close()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
