"""The transactional job outbox: PostgreSQL rows that say which work is due.

Why: a change and the work it causes (a webhook, a notification, a batch) must both happen or
neither. The change's transaction inserts an outbox row; Redis/arq only carries the row id. If
Redis loses the job, or a worker dies mid-job, the sweeper finds the row still pending with an
expired lease and queues it again. Handlers must be idempotent (delivery is at least once).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from core.text import storable


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


async def rearm_done_job(conn: asyncpg.Connection, dedup_key: str, *,
                         due_at: datetime) -> int | None:
    """Make the finished ('done') job of ``dedup_key`` pending again, due at ``due_at``, with
    fresh attempts; returns its id, or None when there is no such finished job (none, still
    pending, or dead: a dead job is an operator's to look at). For work that can arrive after
    its job ran, e.g. a request joining a bonus window whose batch already computed."""
    return await conn.fetchval(
        """UPDATE outbox_jobs
              SET status = 'pending', due_at = $2, attempts = 0, locked_until = NULL,
                  last_error = NULL, finished_at = NULL
            WHERE dedup_key = $1 AND status = 'done' RETURNING id""", dedup_key, due_at)


_LEASE_DUE_SQL = """
UPDATE outbox_jobs AS j
   SET locked_until = greatest(j.due_at, $1::timestamptz) + $3::interval
 WHERE j.id IN (
       SELECT id FROM outbox_jobs
        WHERE status = 'pending' AND due_at <= $1::timestamptz + $2::interval
          AND (locked_until IS NULL OR locked_until < $1::timestamptz)
          AND attempts < max_attempts
          AND {kinds}
        ORDER BY due_at
        LIMIT $4
        FOR UPDATE SKIP LOCKED)
RETURNING j.*"""


async def lease_due_jobs(
    conn: asyncpg.Connection, *, now: datetime, lookahead: timedelta, lease: timedelta,
    limit: int = 1000, capped: Mapping[str, int] | None = None,
) -> list[OutboxJob]:
    """Claim pending jobs due before now + lookahead whose lease is free or expired and that
    have attempts left (a job out of attempts is for ``bury_interrupted_jobs``).

    The lease runs from the due time, so a job queued for later is not claimed again before it
    had its chance to run.

    ``capped`` maps a kind to the most of its jobs claimed per call (the oldest due first): for
    kinds whose one running job also takes the other due jobs of its kind (webhook deliveries
    claim due deliveries in chunks), a few queued jobs drain a backlog of thousands, and the
    rows left unleased are theirs to take. Queueing every row of a flood instead put thousands
    of jobs in front of every other kind in arq's due-ordered queue.
    """
    capped = dict(capped or {})
    rows = list(await conn.fetch(
        _LEASE_DUE_SQL.format(kinds="kind <> ALL($5::text[])"),
        now, lookahead, lease, limit, list(capped)))
    for kind, most in capped.items():
        rows += await conn.fetch(_LEASE_DUE_SQL.format(kinds="kind = $5"),
                                 now, lookahead, lease, min(most, limit), kind)
    return [_job(row) for row in rows]


async def start_attempt(conn: asyncpg.Connection, job_id: int, *, now: datetime,
                        lease: timedelta) -> OutboxJob | None:
    """Mark one attempt of a pending, due job as running; None if it is done, not due yet or
    out of attempts.

    The attempt is counted before the handler runs, so an attempt that never records its end
    (the worker was killed, or arq's job timeout cancelled it) still counts: a job that
    crashes its worker every time stops after max_attempts (see ``bury_interrupted_jobs``).
    """
    row = await conn.fetchrow(
        """UPDATE outbox_jobs
              SET attempts = attempts + 1, locked_until = $2::timestamptz + $3::interval
            WHERE id = $1 AND status = 'pending' AND due_at <= $2
              AND attempts < max_attempts
        RETURNING *""",
        job_id, now, lease)
    return _job(row) if row is not None else None


async def release_leases(conn: asyncpg.Connection, jobs: list[OutboxJob]) -> int:
    """Free the leases the sweeper took on ``jobs`` but could not queue, so the next tick
    claims them again instead of waiting out the lease with nothing in Redis.

    A row whose attempts changed since the lease was taken (a worker started it through a
    copy queued earlier) keeps its lease: that attempt is in flight. Returns the rows freed.
    """
    if not jobs:
        return 0
    freed: int = await conn.fetchval(
        """WITH freed AS (
               UPDATE outbox_jobs AS j SET locked_until = NULL
                 FROM unnest($1::bigint[], $2::integer[]) AS r(id, attempts)
                WHERE j.id = r.id AND j.attempts = r.attempts AND j.status = 'pending'
            RETURNING j.id)
           SELECT count(*) FROM freed""",
        [job.id for job in jobs], [job.attempts for job in jobs])
    return freed


@dataclass(frozen=True)
class BuriedJob:
    id: int
    kind: str
    attempts: int
    last_error: str


async def bury_interrupted_jobs(conn: asyncpg.Connection, *, now: datetime,
                                limit: int = 1000) -> list[BuriedJob]:
    """Mark dead the pending jobs whose every attempt was interrupted: out of attempts, with
    the last attempt's lease run out and no result recorded (its worker was killed, or arq's
    job timeout cancelled it). Without this such a job would be queued again after every lease,
    forever; ``fail_attempt`` only sees attempts that end.

    Such a row's due time is at most its last attempt's start, so the pending-due index finds it.
    """
    rows = await conn.fetch(
        """UPDATE outbox_jobs AS j
              SET status = 'dead', locked_until = NULL, finished_at = $1::timestamptz,
                  last_error = 'interrupted ' || j.attempts || ' times'
            WHERE j.id IN (
                  SELECT id FROM outbox_jobs
                   WHERE status = 'pending' AND due_at <= $1::timestamptz
                     AND attempts >= max_attempts
                     AND (locked_until IS NULL OR locked_until < $1::timestamptz)
                   ORDER BY due_at
                   LIMIT $2
                   FOR UPDATE SKIP LOCKED)
        RETURNING j.id, j.kind, j.attempts, j.last_error""",
        now, limit)
    return [BuriedJob(id=row["id"], kind=row["kind"], attempts=row["attempts"],
                      last_error=row["last_error"]) for row in rows]


async def finish_job(conn: asyncpg.Connection, job_id: int, *, now: datetime) -> None:
    await conn.execute(
        """UPDATE outbox_jobs SET status = 'done', finished_at = $2, locked_until = NULL,
                  last_error = NULL
            WHERE id = $1""", job_id, now)


async def defer_attempt(conn: asyncpg.Connection, job_id: int, *, attempts: int,
                        retry_at: datetime, lease_until: datetime | None) -> bool:
    """Give back an attempt that could not start (what it needs is held by other work) and
    make the job due again at ``retry_at``; ``lease_until`` keeps the sweeper off the row
    while the caller's own re-queued copy waits in Redis. Only the attempt counted as
    ``attempts`` is given back: if another copy finished or moved the row meanwhile, nothing
    changes and False is returned."""
    moved: int | None = await conn.fetchval(
        """UPDATE outbox_jobs
              SET attempts = greatest(attempts - 1, 0), due_at = $3, locked_until = $4
            WHERE id = $1 AND status = 'pending' AND attempts = $2
        RETURNING id""",
        job_id, attempts, retry_at, lease_until)
    return moved is not None


async def release_requeue_lease(conn: asyncpg.Connection, job_id: int, *,
                                lease_until: datetime) -> None:
    """Drop the lease ``lease_until`` that was set for a copy queued under an id of its own
    (a put-off job, a webhook send not made) when that copy could not be queued after all: the
    sweeper then takes the row at its due time. A row whose lease changed since is left be."""
    await conn.execute(
        """UPDATE outbox_jobs SET locked_until = NULL
            WHERE id = $1 AND status = 'pending' AND locked_until = $2""", job_id, lease_until)


async def fail_attempt(conn: asyncpg.Connection, job_id: int, *, now: datetime, error: str,
                       retry_at: datetime | None, lease_until: datetime | None = None) -> str:
    """Record a failed attempt: back to pending at ``retry_at``, or dead when out of attempts
    (or when retry_at is None). Returns the new status. ``lease_until`` keeps the sweeper off
    the row until then (a retry the caller queued under an id the sweeper cannot know)."""
    status: str = await conn.fetchval(
        """UPDATE outbox_jobs
              SET status = CASE WHEN $4::timestamptz IS NULL OR attempts >= max_attempts
                                THEN 'dead' ELSE 'pending' END,
                  due_at = coalesce($4::timestamptz, due_at),
                  locked_until = $5::timestamptz,
                  last_error = left($3::text, 2000),
                  finished_at = CASE WHEN $4::timestamptz IS NULL OR attempts >= max_attempts
                                     THEN $2::timestamptz END
            WHERE id = $1
        RETURNING status""",
        job_id, now, storable(error), retry_at, lease_until)
    return status


async def get_job(conn: asyncpg.Connection, job_id: int) -> dict[str, Any] | None:
    row = await conn.fetchrow("SELECT * FROM outbox_jobs WHERE id = $1", job_id)
    return dict(row) if row is not None else None
