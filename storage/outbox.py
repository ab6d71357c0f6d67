"""The transactional job outbox: PostgreSQL rows that say which work is due.

Why: a change and the work it causes (a webhook, a notification, a batch) must both happen or
neither. The change's transaction inserts an outbox row; Redis/arq only carries the row id. If
Redis loses the job, or a worker dies mid-job, the sweeper finds the row still pending with an
expired lease and queues it again. Handlers must be idempotent (delivery is at least once).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg


@dataclass(frozen=True)
class OutboxJob:
    id: int
    kind: str
    payload: dict[str, Any]
    due_at: datetime
    attempts: int
    max_attempts: int
    dedup_key: str | None


def _job(row: asyncpg.Record) -> OutboxJob:
    payload = row["payload"]
    if isinstance(payload, str):
        payload = json.loads(payload)
    return OutboxJob(id=row["id"], kind=row["kind"], payload=payload, due_at=row["due_at"],
                     attempts=row["attempts"], max_attempts=row["max_attempts"],
                     dedup_key=row["dedup_key"])


async def add_job(
    conn: asyncpg.Connection,
    *,
    kind: str,
    payload: dict[str, Any],
    due_at: datetime | None = None,
    dedup_key: str | None = None,
    max_attempts: int = 8,
) -> int | None:
    """Insert a job inside the caller's transaction. With a dedup_key, a second add is a no-op
    and returns None."""
    return await conn.fetchval(
        """INSERT INTO outbox_jobs (kind, payload, due_at, dedup_key, max_attempts)
           VALUES ($1, $2::jsonb, coalesce($3, now()), $4, $5)
           ON CONFLICT (dedup_key) DO NOTHING RETURNING id""",
        kind, json.dumps(payload), due_at, dedup_key, max_attempts)


async def lease_due_jobs(
    conn: asyncpg.Connection, *, now: datetime, lookahead: timedelta, lease: timedelta,
    limit: int = 1000,
) -> list[OutboxJob]:
    """Claim pending jobs due before now + lookahead whose lease is free or expired.

    The lease runs from the due time, so a job queued for later is not claimed again before it
    had its chance to run.
    """
    rows = await conn.fetch(
        """UPDATE outbox_jobs AS j
              SET locked_until = greatest(j.due_at, $1::timestamptz) + $3::interval
            WHERE j.id IN (
                  SELECT id FROM outbox_jobs
                   WHERE status = 'pending' AND due_at <= $1::timestamptz + $2::interval
                     AND (locked_until IS NULL OR locked_until < $1::timestamptz)
                   ORDER BY due_at
                   LIMIT $4
                   FOR UPDATE SKIP LOCKED)
        RETURNING j.*""",
        now, lookahead, lease, limit)
    return [_job(row) for row in rows]


async def start_attempt(conn: asyncpg.Connection, job_id: int, *, now: datetime,
                        lease: timedelta) -> OutboxJob | None:
    """Mark one attempt of a pending, due job as running; None if it is done or not due yet."""
    row = await conn.fetchrow(
        """UPDATE outbox_jobs
              SET attempts = attempts + 1, locked_until = $2::timestamptz + $3::interval
            WHERE id = $1 AND status = 'pending' AND due_at <= $2
        RETURNING *""",
        job_id, now, lease)
    return _job(row) if row is not None else None


async def finish_job(conn: asyncpg.Connection, job_id: int, *, now: datetime) -> None:
    await conn.execute(
        """UPDATE outbox_jobs SET status = 'done', finished_at = $2, locked_until = NULL,
                  last_error = NULL
            WHERE id = $1""", job_id, now)


async def fail_attempt(conn: asyncpg.Connection, job_id: int, *, now: datetime, error: str,
                       retry_at: datetime | None) -> str:
    """Record a failed attempt: back to pending at ``retry_at``, or dead when out of attempts
    (or when retry_at is None). Returns the new status."""
    status: str = await conn.fetchval(
        """UPDATE outbox_jobs
              SET status = CASE WHEN $4::timestamptz IS NULL OR attempts >= max_attempts
                                THEN 'dead' ELSE 'pending' END,
                  due_at = coalesce($4::timestamptz, due_at),
                  locked_until = NULL,
                  last_error = left($3::text, 2000),
                  finished_at = CASE WHEN $4::timestamptz IS NULL OR attempts >= max_attempts
                                     THEN $2::timestamptz END
            WHERE id = $1
        RETURNING status""",
        job_id, now, error, retry_at)
    return status


async def get_job(conn: asyncpg.Connection, job_id: int) -> dict[str, Any] | None:
    row = await conn.fetchrow("SELECT * FROM outbox_jobs WHERE id = $1", job_id)
    return dict(row) if row is not None else None
