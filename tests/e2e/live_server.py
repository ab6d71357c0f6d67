"""A server and a worker on the real clock, in this process: for end-to-end tests where a real
arq worker must run outbox jobs (webhook deliveries, campaign jobs) while the test calls gRPC."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
from arq.connections import RedisSettings
from arq.connections import create_pool as create_arq_pool
from grpc import aio

from config.settings import Settings
from core.clock import SystemClock
from server.app import Dependencies, start_server
from tests.conftest import Api
from workers.main import build_worker


@contextlib.asynccontextmanager
async def live_server(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[Api]:
    assert settings.redis_url
    redis = await create_arq_pool(RedisSettings.from_dsn(settings.redis_url))
    running = await start_server(settings, Dependencies(pool=pool, clock=SystemClock(),
                                                        redis=redis))
    worker = build_worker(settings, handle_signals=False)
    task = asyncio.create_task(worker.async_run())
    channel = aio.insecure_channel(running.address)
    try:
        yield Api(channel=channel, address=running.address)
    finally:
        await channel.close()
        await worker.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await running.stop(0)
        await redis.aclose()
