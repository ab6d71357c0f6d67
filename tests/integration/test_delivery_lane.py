"""Webhook delivery jobs cannot take every job slot of a worker (workers/delivery_lane.py), and
the sweeper queues a flood of due deliveries as a few jobs that claim the rest themselves
(storage.outbox.lease_due_jobs ``capped``). Real PostgreSQL and Redis; the end-to-end case (a
campaign due during a flood of 2,000 deliveries to a slow listener executes on time) is in
tests/e2e/test_overload_audit.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from arq import create_pool as create_arq_pool
from arq.connections import RedisSettings

from config.settings import Settings
from core.clock import FixedClock
from storage import outbox
from storage import webhooks as webhooks_repo
from storage.queue import queue_deliveries_after_commit
from workers import registry, webhooks  # noqa: F401  (webhooks registers its cap)
from workers.delivery_lane import LANE_KEY, DeliveryLane, delivery_job_limit
from workers.outbox import run_outbox_job, sweep_once

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(("max_jobs", "lane"), [(20, 15), (8, 6), (4, 3), (3, 2), (2, 1),
                                                 (1, 1), (100, 75)])
def test_delivery_jobs_get_three_quarters_of_the_slots_and_leave_at_least_one(
        max_jobs: int, lane: int) -> None:
    assert delivery_job_limit(max_jobs) == lane


def test_the_lane_counts_its_places() -> None:
    lane = DeliveryLane(2)
    assert lane.enter() and lane.enter()
    assert not lane.enter()
    lane.leave()
    assert lane.enter()
    retry_at = lane.retry_at(NOW)
    assert NOW + timedelta(seconds=1) <= retry_at <= NOW + timedelta(seconds=2)


async def _add(conn: asyncpg.Connection, kind: str, n: int, due: datetime) -> list[int]:
    ids = []
    for i in range(n):
        job_id = await outbox.add_job(conn, kind=kind, payload={"delivery_id": i}, due_at=due)
        assert job_id is not None
        ids.append(job_id)
    return ids


async def test_lease_due_jobs_takes_at_most_the_cap_of_a_capped_kind_oldest_first(
        pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        old = await _add(conn, webhooks_repo.DELIVER_KIND, 3, NOW - timedelta(minutes=5))
        await _add(conn, webhooks_repo.DELIVER_KIND, 40, NOW - timedelta(minutes=1))
        others = await _add(conn, "campaign.execute", 4, NOW)
        leased = await outbox.lease_due_jobs(
            conn, now=NOW, lookahead=timedelta(seconds=60), lease=timedelta(seconds=300),
            capped={webhooks_repo.DELIVER_KIND: 5})
        kinds = [job.kind for job in leased]
        assert kinds.count("campaign.execute") == 4
        assert kinds.count(webhooks_repo.DELIVER_KIND) == 5
        assert set(old) <= {job.id for job in leased}  # the oldest due first
        assert set(others) <= {job.id for job in leased}
        # The 38 deliveries left are unleased: free for a running delivery job to claim.
        free = await conn.fetchval(
            "SELECT count(*) FROM outbox_jobs WHERE kind = $1 AND locked_until IS NULL",
            webhooks_repo.DELIVER_KIND)
        assert free == 38
        again = await outbox.lease_due_jobs(
            conn, now=NOW, lookahead=timedelta(seconds=60), lease=timedelta(seconds=300),
            capped={webhooks_repo.DELIVER_KIND: 5})
        assert [job.kind for job in again] == [webhooks_repo.DELIVER_KIND] * 5
        # Without caps every due row is taken, as before.
        rest = await outbox.lease_due_jobs(
            conn, now=NOW, lookahead=timedelta(seconds=60), lease=timedelta(seconds=300))
        assert len(rest) == 33


async def test_the_sweeper_queues_one_lane_of_delivery_jobs_per_tick(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock) -> None:
    async with pool.acquire() as conn:
        await _add(conn, webhooks_repo.DELIVER_KIND, 50, clock.now() - timedelta(seconds=1))
        await _add(conn, "campaign.execute", 2, clock.now())
    assert settings.redis_url
    redis = await create_arq_pool(RedisSettings.from_dsn(settings.redis_url))
    try:
        ctx = {"pool": pool, "redis": redis, "clock": clock, "settings": settings}
        queued = await sweep_once(ctx)
        lane = delivery_job_limit(settings.worker_max_jobs)
        assert registry.SWEEP_CAPS[webhooks_repo.DELIVER_KIND](settings) == lane
        assert queued == lane + 2
        assert await redis.zcard(settings.queue_name) == lane + 2
    finally:
        await redis.aclose()


async def test_a_delivery_job_beyond_the_lane_is_put_off_without_using_an_attempt(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock) -> None:
    async with pool.acquire() as conn:
        [job_id] = await _add(conn, webhooks_repo.DELIVER_KIND, 1, clock.now())
    lane = DeliveryLane(1)
    assert lane.enter()  # another delivery job holds the only place
    ctx: dict[str, Any] = {"pool": pool, "redis": None, "clock": clock, "settings": settings,
                           LANE_KEY: lane}
    assert await run_outbox_job(ctx, job_id) == "deferred"
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT status, attempts, due_at, last_error FROM outbox_jobs "
                                  "WHERE id = $1", job_id)
    assert (row["status"], row["attempts"], row["last_error"]) == ("pending", 0, None)
    assert clock.now() + timedelta(seconds=1) <= row["due_at"] <= clock.now() + timedelta(
        seconds=2)
    assert lane.running == 1  # the put-off job took no place


async def test_a_burst_of_deliveries_is_queued_as_one_lane_of_claimers(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """A bonus batch's or an approval's deliveries (one per result): the first lane's worth
    are queued in Redis, the rest wait in PostgreSQL, unleased, for those jobs to claim."""
    async with pool.acquire() as conn:
        ids = await _add(conn, webhooks_repo.DELIVER_KIND, 40, clock.now())
    assert settings.redis_url
    redis = await create_arq_pool(RedisSettings.from_dsn(settings.redis_url))
    try:
        queued = await queue_deliveries_after_commit(
            redis, job_ids=ids, due_at=clock.now(), queue_name=settings.queue_name,
            worker_max_jobs=8)
        assert queued == 6
        queued_ids = {int(raw.decode().split("/")[-2])
                      for raw in await redis.zrange(settings.queue_name, 0, -1)}
        assert queued_ids == set(ids[:6])
        assert await queue_deliveries_after_commit(
            redis, job_ids=ids[:3], due_at=clock.now(), queue_name=settings.queue_name,
            worker_max_jobs=8) == 3
    finally:
        await redis.aclose()
    free = await pool.fetchval("SELECT count(*) FROM outbox_jobs WHERE locked_until IS NULL")
    assert free == 40
