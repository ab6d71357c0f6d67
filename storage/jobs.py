"""The operator's view of the outbox: list jobs, and run a dead one again.

Why a dead job needs a person: the outbox retries a failing job with backoff up to its
``max_attempts`` and then stops (storage.outbox.fail_attempt, bury_interrupted_jobs), because
retrying forever would hide whatever breaks it. Until now nothing could start it again, so a
dead campaign execution left its campaign unexecuted for good and a dead bonus batch
left its window's requests PENDING (the sweeper re-arms only finished jobs). ``retry_dead_job``
is that missing step: the same row, pending again, so its dedup key and what points at it hold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from core.errors import FailedPrecondition, NotFound
from storage.webhooks import DELIVER_KIND

_COLUMNS = ("id, kind, status, payload, attempts, max_attempts, due_at, created_at, "
            "finished_at, last_error")


@dataclass(frozen=True)
class JobRow:
    id: int
    kind: str
    status: str
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    due_at: datetime
    created_at: datetime
    finished_at: datetime | None
    last_error: str | None


def _row(row: asyncpg.Record) -> JobRow:
    payload = row["payload"]
    return JobRow(id=row["id"], kind=row["kind"], status=row["status"],
                  payload=json.loads(payload) if isinstance(payload, str) else payload,
                  attempts=row["attempts"], max_attempts=row["max_attempts"],
                  due_at=row["due_at"], created_at=row["created_at"],
                  finished_at=row["finished_at"], last_error=row["last_error"])


async def list_jobs(conn: asyncpg.Connection, *, status: str | None, kind: str | None,
                    before_id: int | None, limit: int) -> list[JobRow]:
    """Newest first (by id), ``limit`` rows after the cursor ``before_id``."""
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM outbox_jobs
             WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR kind = $2)
               AND ($3::bigint IS NULL OR id < $3)
             ORDER BY id DESC LIMIT $4""", status, kind, before_id, limit)
    return [_row(r) for r in rows]


def _not_found(job_id: int) -> NotFound:
    return NotFound(f"no job {job_id}", reason="JOB_NOT_FOUND", metadata={"job_id": str(job_id)})


async def retry_dead_job(conn: asyncpg.Connection, job_id: int, *, now: datetime) -> JobRow:
    """Make a dead job pending again, due ``now``, with its attempts starting over (in the
    caller's transaction; queue it after commit). The row is locked first, so a retry racing a
    sweeper or another retry sees one consistent status."""
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM outbox_jobs WHERE id = $1 FOR UPDATE",
                              job_id)
    if row is None:
        raise _not_found(job_id)
    if row["kind"] == DELIVER_KIND:
        raise FailedPrecondition(
            f"job {job_id} delivers a webhook: send it again with RedeliverEvent (promo "
            "listeners redeliver), which also reopens the delivery's record",
            reason="USE_REDELIVER_EVENT", metadata={"job_id": str(job_id)})
    if row["status"] != "dead":
        raise FailedPrecondition(
            f"job {job_id} is {row['status']}, not dead: "
            + ("it will run (or is running) on its own" if row["status"] == "pending"
               else "it has already run to completion"),
            reason="JOB_NOT_DEAD", metadata={"job_id": str(job_id), "status": row["status"]})
    updated = await conn.fetchrow(
        f"""UPDATE outbox_jobs
               SET status = 'pending', attempts = 0, due_at = $2, locked_until = NULL,
                   finished_at = NULL
             WHERE id = $1 RETURNING {_COLUMNS}""", job_id, now)
    return _row(updated)
