"""Retention against a real PostgreSQL: exactly what each purge deletes and keeps.

Rows are written with explicit timestamps around a pinned ``NOW``; nothing sleeps. The default
policy is used unless a test says otherwise: 30 days for webhook rows and idempotency keys,
7 days for finished outbox jobs.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from config.settings import Settings
from core.clock import FixedClock
from storage import retention
from storage.retention import RetentionPolicy
from workers.main import build_worker
from workers.retention import policy, purge_retention

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


async def add_event(conn: asyncpg.Connection, created: datetime) -> int:
    event_pk: int = await conn.fetchval(
        """INSERT INTO webhook_events (event_id, event_type, body, occurred_at, create_time)
           VALUES ($1, 100, '{}', $2, $2) RETURNING id""", uuid.uuid4(), created)
    return event_pk


async def add_delivery(conn: asyncpg.Connection, event_pk: int, *, status: str,
                       created: datetime, updated: datetime, listener: int = 1) -> int:
    delivery_pk: int = await conn.fetchval(
        """INSERT INTO webhook_deliveries (event_id, listener_id, status, run_started_at,
                                           create_time, update_time)
           VALUES ($1, $2, $3, $4, $4, $5) RETURNING id""",
        event_pk, listener, status, created, updated)
    return delivery_pk


async def add_attempt(conn: asyncpg.Connection, delivery_pk: int, attempt: int,
                      started: datetime) -> int:
    attempt_pk: int = await conn.fetchval(
        """INSERT INTO webhook_attempts (delivery_id, attempt, url, started_at, finished_at,
                                         status_code)
           VALUES ($1, $2, 'http://listener.test/hook', $3, $3, 200) RETURNING id""",
        delivery_pk, attempt, started)
    return attempt_pk


async def add_job(conn: asyncpg.Connection, *, status: str, created: datetime,
                  finished: datetime | None, due: datetime | None = None) -> int:
    job_pk: int = await conn.fetchval(
        """INSERT INTO outbox_jobs (kind, status, due_at, created_at, finished_at)
           VALUES ('test.kind', $1, $2, $3, $4) RETURNING id""",
        status, due or created, created, finished)
    return job_pk


async def add_key(conn: asyncpg.Connection, request_id: str, created: datetime) -> None:
    await conn.execute(
        """INSERT INTO idempotency_keys (scope, request_id, request_hash, response, created_at)
           VALUES ('CreateRewardType', $1, '\\x00', '\\x00', $2)""", request_id, created)


async def ids(conn: asyncpg.Connection, table: str) -> list[int]:
    return [r["id"] for r in await conn.fetch(f"SELECT id FROM {table} ORDER BY id")]


class CountingConnection:
    """Delegates to a connection and counts the statements run, to see the chunks."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.statements = 0

    async def fetchrow(self, *args: Any) -> Any:
        self.statements += 1
        return await self.conn.fetchrow(*args)

    async def fetchval(self, *args: Any) -> Any:
        self.statements += 1
        return await self.conn.fetchval(*args)


async def test_webhook_rows_past_retention_go_and_live_ones_stay(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        # Delivered 35 days ago: delivery, its attempts and its event go.
        done_event = await add_event(conn, ago(40))
        done = await add_delivery(conn, done_event, status="DELIVERED", created=ago(40),
                                  updated=ago(35))
        await add_attempt(conn, done, 1, ago(36))
        await add_attempt(conn, done, 2, ago(35))
        # Still being retried after 40 days (a listener down, a long deadline): all stays.
        pending_event = await add_event(conn, ago(40))
        pending = await add_delivery(conn, pending_event, status="PENDING", created=ago(40),
                                     updated=ago(40))
        pending_attempt = await add_attempt(conn, pending, 1, ago(40))
        # Old, but redelivered and finished 10 days ago: the delivery and its event stay, its
        # first run's attempt goes, the recent attempt stays.
        redone_event = await add_event(conn, ago(40))
        redone = await add_delivery(conn, redone_event, status="FAILED", created=ago(40),
                                    updated=ago(10))
        await add_attempt(conn, redone, 1, ago(40))
        redone_recent = await add_attempt(conn, redone, 2, ago(10))
        # Young: everything stays.
        young_event = await add_event(conn, ago(5))
        young = await add_delivery(conn, young_event, status="DELIVERED", created=ago(5),
                                   updated=ago(5))
        young_attempt = await add_attempt(conn, young, 1, ago(5))
        # Events nobody listened to: older than 30 days go; exactly 30 days old stays.
        unheard_old = await add_event(conn, ago(31))
        unheard_edge = await add_event(conn, ago(30))

        counts = await retention.purge_all(conn, RetentionPolicy(), now=NOW)

        assert counts == {"webhook_attempts": 3, "webhook_deliveries": 1, "webhook_events": 2,
                          "code_pool_alerts": 0, "outbox_jobs": 0, "idempotency_keys": 0,
                          "bonus_results": 0, "bonus_requests": 0, "bonus_batches": 0}
        assert await ids(conn, "webhook_deliveries") == [pending, redone, young]
        assert await ids(conn, "webhook_attempts") == [pending_attempt, redone_recent,
                                                       young_attempt]
        assert await ids(conn, "webhook_events") == [pending_event, redone_event, young_event,
                                                     unheard_edge]
        assert done_event not in await ids(conn, "webhook_events")
        assert unheard_old not in await ids(conn, "webhook_events")
        # A second run finds nothing more.
        again = await retention.purge_all(conn, RetentionPolicy(), now=NOW)
        assert set(again.values()) == {0}


async def test_deliveries_go_with_their_attempts_when_attempts_are_kept_longer(
        pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        event = await add_event(conn, ago(40))
        delivery = await add_delivery(conn, event, status="DEAD", created=ago(40),
                                      updated=ago(31))
        await add_attempt(conn, delivery, 1, ago(40))
        await add_attempt(conn, delivery, 2, ago(31))

        counts = await retention.purge_all(
            conn, RetentionPolicy(webhook_attempt_days=0), now=NOW)

        assert counts["webhook_attempts"] == 2  # with their delivery, though kept on their own
        assert counts["webhook_deliveries"] == 1
        assert counts["webhook_events"] == 1
        assert await conn.fetchval("SELECT count(*) FROM webhook_attempts") == 0


async def test_events_wait_for_their_deliveries(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        event = await add_event(conn, ago(40))
        await add_delivery(conn, event, status="DELIVERED", created=ago(40), updated=ago(35))

        counts = await retention.purge_all(
            conn, RetentionPolicy(webhook_delivery_days=60), now=NOW)

        assert counts["webhook_deliveries"] == 0
        assert counts["webhook_events"] == 0
        assert await ids(conn, "webhook_events") == [event]


async def test_finished_outbox_jobs_go_after_seven_days(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        # A campaign job created long ago for a far date: pending, never deleted.
        waiting = await add_job(conn, status="pending", created=ago(100), finished=None,
                                due=NOW + timedelta(days=30))
        await add_job(conn, status="done", created=ago(9), finished=ago(8))
        await add_job(conn, status="dead", created=ago(9), finished=ago(7) - timedelta(seconds=1))
        edge = await add_job(conn, status="done", created=ago(8), finished=ago(7))
        recent = await add_job(conn, status="done", created=ago(8), finished=ago(6))
        retrying = await add_job(conn, status="pending", created=ago(8), finished=None)

        counts = await retention.purge_all(conn, RetentionPolicy(), now=NOW)

        assert counts["outbox_jobs"] == 2
        assert await ids(conn, "outbox_jobs") == [waiting, edge, recent, retrying]


async def test_idempotency_keys_older_than_their_retention_go(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        for n in range(3):
            await add_key(conn, f"old-{n}", ago(31))
        await add_key(conn, "edge", ago(30))
        await add_key(conn, "young", ago(1))

        counts = await retention.purge_all(conn, RetentionPolicy(), now=NOW)

        assert counts["idempotency_keys"] == 3
        kept = [r["request_id"] for r in await conn.fetch(
            "SELECT request_id FROM idempotency_keys ORDER BY request_id")]
        assert kept == ["edge", "young"]


async def test_emitted_code_pool_alerts_go_with_the_event_retention(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        promotion = await conn.fetchval(
            """INSERT INTO promotions (code, name, status, rewards)
               VALUES ('codes', 'Codes', 'ACTIVE', '[]') RETURNING id""")

        async def alert(raised: datetime, emitted: datetime | None) -> int:
            alert_pk: int = await conn.fetchval(
                """INSERT INTO code_pool_alerts (promotion_id, kind, remaining, total,
                                                 raised_at, emitted_at)
                   VALUES ($1, 'DEPLETED', 0, 10, $2, $3) RETURNING id""",
                promotion, raised, emitted)
            return alert_pk

        await alert(ago(40), ago(40))
        not_emitted = await alert(ago(40), None)
        young = await alert(ago(2), ago(2))

        counts = await retention.purge_all(conn, RetentionPolicy(), now=NOW)

        assert counts["code_pool_alerts"] == 1
        assert await ids(conn, "code_pool_alerts") == [not_emitted, young]


async def test_zero_days_disables_each_purge(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        event = await add_event(conn, ago(400))
        delivery = await add_delivery(conn, event, status="DELIVERED", created=ago(400),
                                      updated=ago(400))
        await add_attempt(conn, delivery, 1, ago(400))
        await add_event(conn, ago(400))
        await add_job(conn, status="done", created=ago(400), finished=ago(400))
        await add_key(conn, "ancient", ago(400))
        off = RetentionPolicy(webhook_event_days=0, webhook_delivery_days=0,
                              webhook_attempt_days=0, outbox_job_days=0,
                              idempotency_key_days=0)

        counts = await retention.purge_all(conn, off, now=NOW)

        assert counts == dict.fromkeys(retention.TABLES, 0)
        for table, rows in (("webhook_events", 2), ("webhook_deliveries", 1),
                            ("webhook_attempts", 1), ("outbox_jobs", 1),
                            ("idempotency_keys", 1)):
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == rows, table


async def test_purges_work_in_chunks(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        # ids 1..10: a pending job at the old end, seven finished old ones, two young ones.
        await add_job(conn, status="pending", created=ago(30), finished=None)
        for _ in range(7):
            await add_job(conn, status="done", created=ago(20), finished=ago(19))
        for _ in range(2):
            await add_job(conn, status="done", created=ago(1), finished=ago(1))
        for n in range(5):
            await add_key(conn, f"old-{n}", ago(40))
        counting = CountingConnection(conn)

        jobs = await retention.purge_outbox_jobs(counting, now=NOW, days=7,
                                                 chunk=2)
        # Chunks [1,2] [3,4] [5,6] [7,8] [9,10]; the last one reaches young rows and stops.
        assert (jobs, counting.statements) == (7, 5)
        assert await conn.fetchval("SELECT count(*) FROM outbox_jobs") == 3

        counting.statements = 0
        keys = await retention.purge_idempotency_keys(counting, now=NOW,
                                                      days=30, chunk=2)
        assert (keys, counting.statements) == (5, 3)  # 2 + 2 + 1
        assert await conn.fetchval("SELECT count(*) FROM idempotency_keys") == 0


async def test_a_walk_stops_at_the_first_chunk_of_young_rows(pool: asyncpg.Pool) -> None:
    """Rows are created in id order, so the walk stops once a chunk reaches the cutoff: a
    table's young part is never read, however large."""
    async with pool.acquire() as conn:
        for _ in range(2):
            await add_event(conn, ago(40))
        for _ in range(6):
            await add_event(conn, ago(1))
        counting = CountingConnection(conn)

        deleted = await retention.purge_webhook_events(counting, now=NOW,
                                                       days=30, chunk=2)

        assert (deleted, counting.statements) == (2, 2)


def test_policy_refuses_negative_days() -> None:
    with pytest.raises(ValueError, match="outbox_job_days"):
        RetentionPolicy(outbox_job_days=-1)


async def test_the_worker_job_purges_with_the_settings_and_logs_one_line(
        settings: Settings, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture) -> None:
    tuned = settings.model_copy(update={"outbox_job_retention_days": 2,
                                        "idempotency_key_retention_days": 0})
    assert policy(tuned) == RetentionPolicy(outbox_job_days=2, idempotency_key_days=0)
    async with pool.acquire() as conn:
        await add_job(conn, status="done", created=ago(4), finished=ago(3))
        await add_job(conn, status="done", created=ago(1), finished=ago(1))
        await add_key(conn, "old", ago(400))
        await add_event(conn, ago(31))
    ctx = {"pool": pool, "settings": tuned, "clock": FixedClock(NOW)}

    with caplog.at_level(logging.INFO, logger="promo.retention"):
        counts = await purge_retention(ctx)

    assert counts == {"webhook_attempts": 0, "webhook_deliveries": 0, "webhook_events": 1,
                      "code_pool_alerts": 0, "outbox_jobs": 1, "idempotency_keys": 0,
                          "bonus_results": 0, "bonus_requests": 0, "bonus_batches": 0}
    records = [r for r in caplog.records if r.name == "promo.retention"]
    assert [r.getMessage() for r in records] == ["retention purge done"]
    assert {t: getattr(records[0], t) for t in retention.TABLES} == counts


async def test_the_worker_runs_the_purge_hourly(settings: Settings) -> None:
    worker = build_worker(settings, handle_signals=False)
    assert [(job.name, job.minute, job.second) for job in worker.cron_jobs] == [
        ("promo.retention", 17, 0)]
    quiet = build_worker(settings, handle_signals=False, run_sweeper=False)
    assert quiet.cron_jobs == []
