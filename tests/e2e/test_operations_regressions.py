"""Operations: the outbox and its sweeper, the arq worker's limits, migrations on start.

What these guarantee: a job interrupted on every attempt stops after its max_attempts; a
sweeper tick that cannot reach Redis loses nothing (its rows are claimable by the next tick)
and still runs its hooks; a row Redis refuses does not hold up the rows behind it; rows overdue
by days are queued like any other; arq's job timeout is the outbox lease; a process started
with PROMO_MIGRATE_ON_START waits for another's migration however long it takes.

Each test drives the real PostgreSQL and Redis with a pinned clock (time moves by telling the
clock, never by sleeping), except the migration test, which is about a real-time timeout and
waits on PostgreSQL's own view of the waiting process instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from arq.connections import ArqRedis
from redis.exceptions import ResponseError

from config.settings import Settings
from core.clock import FixedClock
from storage import outbox
from storage.migrate import APPLICATION_NAME as MIGRATION_APPLICATION_NAME
from storage.migrate import MIGRATION_LOCK_ID
from storage.outbox import OutboxJob
from storage.queue import OUTBOX_JOB_FUNCTION, outbox_job_id
from workers import registry
from workers.main import build_worker
from workers.outbox import run_outbox_job, sweep_once

# arq scores and expiries use the real time, so the pinned clock starts there.
NOW = datetime.now(UTC).replace(microsecond=0)
RUNS: list[int] = []


@pytest.fixture(autouse=True)
def _handlers() -> Iterator[None]:
    """``review.killed``: the worker running it dies (or arq's job timeout cancels it) before
    the attempt is recorded. ``review.ok``: succeeds."""
    RUNS.clear()

    async def killed(ctx: dict[str, Any], job: OutboxJob) -> None:
        RUNS.append(job.id)
        raise asyncio.CancelledError  # what a SIGKILL'd worker or a job timeout leaves behind

    async def ok(ctx: dict[str, Any], job: OutboxJob) -> None:
        RUNS.append(job.id)

    registry.HANDLERS["review.killed"] = killed
    registry.HANDLERS["review.ok"] = ok
    yield
    registry.HANDLERS.pop("review.killed", None)
    registry.HANDLERS.pop("review.ok", None)


class _RedisDown:
    """An arq pool whose Redis went away: every enqueue fails as redis-py does."""

    async def enqueue_job(self, *args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def _ctx(pool: asyncpg.Pool, settings: Settings, clock: FixedClock, redis: Any) -> dict[str, Any]:
    return {"pool": pool, "settings": settings, "clock": clock, "redis": redis}


async def test_a_job_killed_on_every_attempt_is_dead_lettered_after_max_attempts(
        settings: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis,
        caplog: pytest.LogCaptureFixture) -> None:
    """A poison job (it crashes the worker, or outlives arq's job timeout) runs at most
    max_attempts times like any failing job: each start counts an attempt, a job out of
    attempts is neither queued nor started again, and once its last attempt's lease runs out
    the sweeper marks it dead ('interrupted N times') and logs it as a dead job."""
    clock = FixedClock(NOW)
    async with pool.acquire() as conn:
        job_id = await outbox.add_job(conn, kind="review.killed", payload={}, due_at=NOW,
                                      max_attempts=2)
    assert job_id is not None
    ctx = _ctx(pool, settings, clock, arq_redis)
    queued = []
    for _ in range(4):  # four ticks, each a lease apart
        queued.append(await sweep_once(ctx))
        if queued[-1]:
            with pytest.raises(asyncio.CancelledError):
                await run_outbox_job(ctx, job_id)
        clock.advance(timedelta(seconds=settings.job_lease_seconds + 1))
    assert queued == [1, 1, 0, 0]
    assert RUNS == [job_id, job_id]
    assert await run_outbox_job(ctx, job_id) == "not due or already done"  # a stray arq copy
    assert RUNS == [job_id, job_id]
    async with pool.acquire() as conn:
        row = await outbox.get_job(conn, job_id)
    assert row is not None
    buried_at = NOW + 2 * timedelta(seconds=settings.job_lease_seconds + 1)  # the third tick
    assert (row["status"], row["attempts"], row["last_error"], row["locked_until"],
            row["finished_at"]) == ("dead", 2, "interrupted 2 times", None, buried_at)
    [dead] = [r for r in caplog.records if r.getMessage() == "outbox job failed permanently"]
    assert (dead.levelname, dead.outbox_job_id, dead.kind, dead.attempt, dead.error) == (
        "ERROR", job_id, "review.killed", 2, "interrupted 2 times")


async def test_rows_a_sweep_could_not_queue_are_queued_by_the_next_tick(
        settings: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis) -> None:
    """Redis is down during one sweeper tick and back for the next. The tick fails with
    Redis's error and releases the leases it took, so the next tick (not one a whole
    PROMO_JOB_LEASE_SECONDS later) queues every row."""
    clock = FixedClock(NOW)
    async with pool.acquire() as conn:
        ids = [await outbox.add_job(conn, kind="review.ok", payload={}, due_at=NOW)
               for _ in range(3)]
    with pytest.raises(ConnectionError):
        await sweep_once(_ctx(pool, settings, clock, _RedisDown()))
    async with pool.acquire() as conn:
        leases = await conn.fetch("SELECT locked_until FROM outbox_jobs")
    assert [row["locked_until"] for row in leases] == [None] * 3
    clock.advance(timedelta(seconds=settings.sweeper_interval_seconds))
    assert await sweep_once(_ctx(pool, settings, clock, arq_redis)) == 3
    assert sorted(await arq_redis.zrange(settings.queue_name, 0, -1)) == sorted(
        outbox_job_id(settings.queue_name, job_id, 0).encode() for job_id in ids
        if job_id is not None)


async def test_a_row_redis_refuses_does_not_hold_up_the_rows_behind_it(
        settings: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis) -> None:
    """Redis refusing one row's job (a ResponseError: Redis answered, about that row) is about
    that row only: the rows behind it are queued in the same tick, the refused one is released
    for the next tick, and the tick reports the error."""
    async with pool.acquire() as conn:
        refused = await outbox.add_job(conn, kind="review.ok", payload={},
                                       due_at=NOW - timedelta(minutes=1))
        behind = await outbox.add_job(conn, kind="review.ok", payload={}, due_at=NOW)
    assert refused is not None and behind is not None
    refused_job = outbox_job_id(settings.queue_name, refused, 0)

    class _RefusesOne:
        async def enqueue_job(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs["_job_id"] == refused_job:
                raise ResponseError("invalid expire time in 'psetex' command")
            return await arq_redis.enqueue_job(*args, **kwargs)

    with pytest.raises(ResponseError):
        await sweep_once(_ctx(pool, settings, FixedClock(NOW), _RefusesOne()))
    assert await arq_redis.zrange(settings.queue_name, 0, -1) == [
        outbox_job_id(settings.queue_name, behind, 0).encode()]
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT locked_until FROM outbox_jobs WHERE id = $1",
                                   refused) is None
        assert await conn.fetchval("SELECT locked_until FROM outbox_jobs WHERE id = $1",
                                   behind) is not None


async def test_sweep_hooks_still_run_on_a_tick_where_redis_is_down(
        settings: Settings, pool: asyncpg.Pool) -> None:
    """The sweep hooks (scheduled bonus runs, code-pool alerts, stranded batches) only need
    PostgreSQL and queue best effort: they run on every tick, also when queueing the due
    outbox rows failed; the tick then fails with Redis's error (the loop logs it)."""
    calls: list[str] = []

    async def review_hook(ctx: dict[str, Any]) -> None:
        calls.append("hook")

    registry.SWEEP_HOOKS.append(review_hook)
    try:
        async with pool.acquire() as conn:
            await outbox.add_job(conn, kind="review.ok", payload={}, due_at=NOW)
        with pytest.raises(ConnectionError):
            await sweep_once(_ctx(pool, settings, FixedClock(NOW), _RedisDown()))
        assert calls == ["hook"]
    finally:
        registry.SWEEP_HOOKS.remove(review_hook)


async def test_arq_job_timeout_follows_the_outbox_lease(settings: Settings) -> None:
    """PROMO_JOB_LEASE_SECONDS is how long a started job is considered in flight; an operator
    raises it for long jobs (a large bonus batch). arq's job timeout is the lease, so a job may
    run as long as its lease and is cancelled before the sweeper would queue it again."""
    worker = build_worker(settings.model_copy(update={"job_lease_seconds": 900}),
                          handle_signals=False, run_sweeper=False)
    function = worker.functions[OUTBOX_JOB_FUNCTION]
    timeout = function.timeout_s if function.timeout_s is not None else worker.job_timeout_s
    assert timeout == 900


async def test_migrate_on_start_waits_for_another_process_holding_the_migration_lock(
        settings: Settings) -> None:
    """With PROMO_MIGRATE_ON_START, processes starting at once queue on the advisory lock,
    however long the one holding it takes: the migration runs on a connection of its own
    without PROMO_DB_COMMAND_TIMEOUT_SECONDS, so a worker whose command timeout is 0.3 s
    waits past it and starts once the lock is free.

    Deterministic: the lock is released only once PostgreSQL shows the starting worker's
    migration connection waiting for it for longer than the command timeout."""
    assert settings.database_url is not None
    timeout = 0.3
    slow = settings.model_copy(update={"migrate_on_start": True,
                                       "db_command_timeout_seconds": timeout})
    worker = build_worker(slow, handle_signals=False, run_sweeper=False)
    holder = await asyncpg.connect(settings.database_url)
    ctx: dict[str, Any] = {}
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        assert worker.on_startup is not None
        start = asyncio.create_task(worker.on_startup(ctx))
        waited_past_timeout = """
            SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = $1
               AND wait_event_type = 'Lock' AND wait_event = 'advisory'
               AND clock_timestamp() - query_start > make_interval(secs => $2)"""
        async with asyncio.timeout(30):
            while not await holder.fetchval(waited_past_timeout, MIGRATION_APPLICATION_NAME,
                                            timeout):
                assert not start.done(), start.exception()  # it gave up waiting
                await asyncio.sleep(0.02)  # polling PostgreSQL, not waiting for time
        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
        await asyncio.wait_for(start, 30)
        assert ctx["pool"] is not None
    finally:
        await holder.close()
        if worker.on_shutdown is not None and "pool" in ctx:
            await worker.on_shutdown(ctx)


async def test_a_job_overdue_by_more_than_a_day_is_queued_and_runs(
        settings: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis) -> None:
    """Workers were down over a weekend (or Redis was gone for a day): rows more than 24 h
    overdue are queued like any due row, without a defer time (arq would give its key a
    negative expiry, which Redis refuses), on every tick whose lease ran out, and run once.
    arq keeps one job per id, so queueing a row again does not run it twice."""
    async with pool.acquire() as conn:
        old = await outbox.add_job(conn, kind="review.ok", payload={},
                                   due_at=NOW - timedelta(days=2))
        fresh = await outbox.add_job(conn, kind="review.ok", payload={}, due_at=NOW)
    assert old is not None and fresh is not None
    clock = FixedClock(NOW)
    ctx = _ctx(pool, settings, clock, arq_redis)
    queued = []
    for _ in range(3):  # three ticks, each a lease apart: every one claims both rows again
        queued.append(await sweep_once(ctx))
        clock.advance(timedelta(seconds=settings.job_lease_seconds + 1))
    assert queued == [2, 2, 2]
    assert await arq_redis.zcard(settings.queue_name) == 2
    key = f"arq:job:{outbox_job_id(settings.queue_name, old, 0)}"
    assert 0 < await arq_redis.pttl(key) <= 24 * 3600 * 1000
    worker = build_worker(settings, clock=clock, burst=True, handle_signals=False,
                          run_sweeper=False)
    await worker.async_run()
    await worker.close()
    assert sorted(RUNS) == sorted([old, fresh])


async def test_a_job_queued_by_both_the_server_and_the_sweeper_runs_once(
        settings: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis) -> None:
    """The server's queue_after_commit and a sweeper tick before a worker took the job give
    arq one job id, so the handler runs once."""
    from storage.queue import queue_after_commit

    async with pool.acquire() as conn:
        job_id = await outbox.add_job(conn, kind="review.ok", payload={}, due_at=NOW)
    await queue_after_commit(arq_redis, job_id=job_id, due_at=NOW,
                             queue_name=settings.queue_name)
    assert await sweep_once(_ctx(pool, settings, FixedClock(NOW), arq_redis)) == 1
    assert await arq_redis.zcard(settings.queue_name) == 1
    worker = build_worker(settings, clock=FixedClock(NOW), burst=True, handle_signals=False,
                          run_sweeper=False)
    await worker.async_run()
    await worker.close()
    assert RUNS == [job_id]
