"""The outbox through a real arq worker on real Redis: run, retry with backoff, dead letters,
and recovery of a job that Redis lost."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from arq import create_pool as create_arq_pool
from arq.connections import RedisSettings

from config.settings import Settings
from storage import outbox
from storage.outbox import OutboxJob
from workers import registry
from workers.main import build_worker
from workers.outbox import backoff_seconds, sweep_once
from workers.registry import PermanentJobError

CALLS: list[tuple[str, int]] = []


@pytest.fixture(autouse=True)
def _handlers() -> Iterator[None]:
    CALLS.clear()
    failures: dict[int, int] = {}

    async def ok(ctx: dict[str, Any], job: OutboxJob) -> None:
        CALLS.append(("ok", job.id))

    async def flaky(ctx: dict[str, Any], job: OutboxJob) -> None:
        failures[job.id] = failures.get(job.id, 0) + 1
        CALLS.append(("flaky", job.id))
        if failures[job.id] < job.payload["succeed_on"]:
            raise ConnectionError("peer unavailable")

    async def broken(ctx: dict[str, Any], job: OutboxJob) -> None:
        CALLS.append(("broken", job.id))
        raise PermanentJobError("payload is unusable")

    for kind, fn in (("test.ok", ok), ("test.flaky", flaky), ("test.broken", broken)):
        registry.HANDLERS[kind] = fn
    yield
    for kind in ("test.ok", "test.flaky", "test.broken"):
        registry.HANDLERS.pop(kind, None)


async def _run_worker_until_idle(settings: Settings, rounds: int = 40) -> None:
    """Run burst workers until no outbox row is pending (retries are re-queued with delays)."""
    import asyncio

    for _ in range(rounds):
        worker = build_worker(settings, burst=True, handle_signals=False, run_sweeper=False)
        await worker.async_run()
        await worker.close()
        assert settings.database_url
        conn = await asyncpg.connect(settings.database_url)
        try:
            pending = await conn.fetchval(
                "SELECT count(*) FROM outbox_jobs WHERE status = 'pending'")
        finally:
            await conn.close()
        if pending == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("outbox did not drain")


async def _sweep(settings: Settings, pool: asyncpg.Pool) -> int:
    from core.clock import SystemClock

    assert settings.redis_url
    redis = await create_arq_pool(RedisSettings.from_dsn(settings.redis_url))
    try:
        return await sweep_once({"pool": pool, "redis": redis, "clock": SystemClock(),
                                 "settings": settings})
    finally:
        await redis.aclose()


async def test_sweeper_queues_and_worker_runs_each_job_once(settings: Settings,
                                                            pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        ids = [await outbox.add_job(conn, kind="test.ok", payload={"n": i}) for i in range(5)]
        assert await outbox.add_job(conn, kind="test.ok", payload={}, dedup_key="k") is not None
        assert await outbox.add_job(conn, kind="test.ok", payload={}, dedup_key="k") is None
    assert await _sweep(settings, pool) == 6
    assert await _sweep(settings, pool) == 0  # leased: not queued twice
    await _run_worker_until_idle(settings)
    assert sorted(i for kind, i in CALLS) == sorted([*ids, ids[-1] + 1])
    async with pool.acquire() as conn:
        statuses = await conn.fetch("SELECT status, attempts FROM outbox_jobs")
    assert {(r["status"], r["attempts"]) for r in statuses} == {("done", 1)}


async def test_transient_failures_are_retried_with_backoff(settings: Settings,
                                                           pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        job_id = await outbox.add_job(conn, kind="test.flaky", payload={"succeed_on": 3})
    await _sweep(settings, pool)
    await _run_worker_until_idle(settings)
    assert CALLS == [("flaky", job_id)] * 3
    async with pool.acquire() as conn:
        row = await outbox.get_job(conn, job_id)
    assert row is not None
    assert (row["status"], row["attempts"], row["last_error"]) == ("done", 3, None)


async def test_attempts_run_out_and_permanent_errors_stop_at_once(settings: Settings,
                                                                  pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        flaky = await outbox.add_job(conn, kind="test.flaky", payload={"succeed_on": 99},
                                     max_attempts=2)
        broken = await outbox.add_job(conn, kind="test.broken", payload={})
        unknown = await outbox.add_job(conn, kind="test.nobody-handles-this", payload={})
    await _sweep(settings, pool)
    await _run_worker_until_idle(settings)
    async with pool.acquire() as conn:
        rows = {r["id"]: r for r in await conn.fetch("SELECT * FROM outbox_jobs")}
    assert (rows[flaky]["status"], rows[flaky]["attempts"]) == ("dead", 2)
    assert "ConnectionError: peer unavailable" in rows[flaky]["last_error"]
    assert (rows[broken]["status"], rows[broken]["attempts"]) == ("dead", 1)
    assert rows[broken]["last_error"] == "payload is unusable"
    assert rows[unknown]["status"] == "dead"
    assert "no handler registered" in rows[unknown]["last_error"]


async def test_job_lost_by_redis_is_queued_again_after_its_lease(settings: Settings,
                                                                 pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        job_id = await outbox.add_job(conn, kind="test.ok", payload={})
    assert await _sweep(settings, pool) == 1
    # Redis loses everything (a restart without persistence).
    import redis.asyncio as aioredis

    assert settings.redis_url
    client = aioredis.Redis.from_url(settings.redis_url)
    for key in [k async for k in client.scan_iter(match=f"*{settings.queue_name}*")]:
        await client.delete(key)
    await client.aclose()
    assert await _sweep(settings, pool) == 0  # still leased
    async with pool.acquire() as conn:  # time passes beyond the lease
        await conn.execute("UPDATE outbox_jobs SET locked_until = now() - interval '1 second'")
    assert await _sweep(settings, pool) == 1
    await _run_worker_until_idle(settings)
    assert CALLS == [("ok", job_id)]


def test_backoff_grows_exponentially_with_jitter_and_a_ceiling() -> None:
    rng = random.Random(7)
    delays = [backoff_seconds(a, base=1.0, maximum=30.0, rng=rng) for a in range(1, 9)]
    for attempt, delay in enumerate(delays, start=1):
        ceiling = min(30.0, 2 ** (attempt - 1))
        assert ceiling * 0.5 <= delay <= ceiling
    assert timedelta(seconds=delays[-1]) <= timedelta(seconds=30)
