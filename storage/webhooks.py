"""Webhook listeners, events, deliveries and attempts in PostgreSQL.

Why this shape: an event is written in the transaction of the change that caused it, with one
delivery row and one outbox job per active listener of its type, in a single statement (emitters
such as batch bonus runs emit many events per transaction). The outbox job only points at the
delivery; the worker reads the listener's current URL and secret at each attempt, so an update
or a deactivation applies to deliveries already on their way. Nothing here talks HTTP.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from core.errors import FailedPrecondition, NotFound
from core.events import REDELIVERABLE, DeliveryStatus, Envelope, EventType
from storage import outbox

DELIVER_KIND = "webhook.deliver"

# The outbox row's own attempt limit is only a backstop: the worker applies
# PROMO_WEBHOOK_MAX_ATTEMPTS (and the deadline) at delivery time, so changing the setting also
# applies to events already emitted. A caller may pass a lower max_attempts for its events.
OUTBOX_MAX_ATTEMPTS = 100

# Errors longer than this are cut before they are stored.
MAX_ERROR_LENGTH = 2000


@dataclass(frozen=True)
class EmittedEvent:
    event_id: str  # the Promo-Event-Id (a UUID)
    outbox_job_ids: list[int]  # queue them after commit with storage.queue.queue_after_commit


@dataclass(frozen=True)
class ListenerRow:
    """A listener as the API shows it: never its secret."""

    id: int
    event_type: int
    url: str
    active: bool
    description: str
    secret_rotated_at: datetime | None
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    event_id: str
    event_type: int
    listener_id: int
    status: DeliveryStatus
    attempts: int
    last_status_code: int | None
    last_error: str | None
    last_latency_ms: float | None
    next_attempt_at: datetime | None  # the due time of its pending outbox job
    delivered_at: datetime | None
    deliver_by: datetime | None  # NULL: run_started_at + the configured deadline
    run_started_at: datetime
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True)
class AttemptRow:
    attempt: int
    url: str
    started_at: datetime
    finished_at: datetime | None
    status_code: int | None
    error: str | None
    latency_ms: float | None


@dataclass(frozen=True)
class DeliveryWork:
    """Everything one delivery attempt needs, read before the HTTP call (then the connection is
    released). ``listener_*`` are None when the listener was unregistered."""

    delivery_id: int
    status: DeliveryStatus
    outbox_job_id: int | None
    event_id: str
    event_type: int
    body: bytes
    occurred_at: datetime
    deliver_by: datetime | None
    run_started_at: datetime
    attempts: int
    listener_id: int
    listener_url: str | None
    listener_active: bool
    secret: str | None
    previous_secret: str | None
    secret_rotated_at: datetime | None


# Events.

_EMIT_SQL = """
WITH event AS (
    INSERT INTO webhook_events (event_id, event_type, dedup_key, body, occurred_at, deliver_by)
    VALUES ($1, $2, $3, $4, $5, $6)
    ON CONFLICT (dedup_key) DO NOTHING
    RETURNING id),
targets AS MATERIALIZED (
    -- delivery ids are drawn first so the outbox payload can carry them
    SELECT nextval('webhook_deliveries_id_seq') AS delivery_id, l.id AS listener_id
      FROM webhook_listeners l, event
     WHERE l.event_type = $2 AND l.active
     ORDER BY l.id),
jobs AS (
    INSERT INTO outbox_jobs (kind, payload, due_at, max_attempts)
    SELECT $7, jsonb_build_object('delivery_id', t.delivery_id), $5, $8 FROM targets t
    RETURNING id, (payload ->> 'delivery_id')::bigint AS delivery_id),
deliveries AS (
    INSERT INTO webhook_deliveries (id, event_id, listener_id, outbox_job_id, run_started_at,
                                    deliver_by)
    SELECT t.delivery_id, event.id, t.listener_id, j.id, $5, $6
      FROM targets t JOIN jobs j USING (delivery_id) CROSS JOIN event
    RETURNING id)
SELECT (SELECT id FROM event) AS event_pk,
       coalesce((SELECT array_agg(id ORDER BY id) FROM jobs), '{}'::bigint[]) AS job_ids,
       (SELECT count(*) FROM deliveries) AS deliveries
"""


async def emit_event(
    conn: asyncpg.Connection,
    *,
    event_type: int,
    payload: dict[str, Any],
    now: datetime,
    dedup_key: str | None = None,
    deliver_by: datetime | None = None,
    max_attempts: int | None = None,
) -> EmittedEvent | None:
    """Record an event and a delivery (with its outbox job) for each active listener of its type.

    Call it inside the transaction of the change that caused the event, then queue the returned
    outbox job ids after commit (``storage.queue.queue_after_commit``; best effort, the sweeper
    covers Redis being down). With no listener the event is still recorded, with no deliveries.
    ``dedup_key``: a second emit with the same key does nothing and returns None (retried jobs
    never notify twice). ``deliver_by``: give up delivering after this time (default: now +
    PROMO_WEBHOOK_DEADLINE_SECONDS, applied by the worker). ``max_attempts``: an optional lower
    cap than PROMO_WEBHOOK_MAX_ATTEMPTS for these deliveries. Payload values may be str, int,
    bool, None, Decimal (sent as a string), aware datetimes, lists and dicts; never floats for
    money. Raises ValueError/TypeError for an unknown type or a payload JSON cannot carry.
    """
    try:
        kind = EventType(int(event_type))
    except ValueError:
        raise ValueError(f"unknown event type {event_type}; see core.events.EventType") from None
    if now.tzinfo is None or (deliver_by is not None and deliver_by.tzinfo is None):
        raise ValueError("emit_event needs timezone-aware datetimes")
    if max_attempts is not None and max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    event_id = str(uuid.uuid4())
    body = Envelope(event_id=event_id, event_type=kind, occurred_at=now, data=payload).body()
    row = await conn.fetchrow(
        _EMIT_SQL, uuid.UUID(event_id), int(kind), dedup_key, body.decode(), now, deliver_by,
        DELIVER_KIND, max_attempts or OUTBOX_MAX_ATTEMPTS)
    assert row is not None
    if row["event_pk"] is None:
        return None
    return EmittedEvent(event_id=event_id, outbox_job_ids=list(row["job_ids"]))


# Listeners.

_LISTENER_COLUMNS = ("id, event_type, url, active, description, secret_rotated_at, create_time, "
                     "update_time")


def _listener(row: asyncpg.Record) -> ListenerRow:
    return ListenerRow(id=row["id"], event_type=row["event_type"], url=row["url"],
                       active=row["active"], description=row["description"],
                       secret_rotated_at=row["secret_rotated_at"],
                       create_time=row["create_time"], update_time=row["update_time"])


def _listener_not_found(listener_id: int) -> NotFound:
    return NotFound(f"no webhook listener {listener_id}", reason="LISTENER_NOT_FOUND",
                    metadata={"listener_id": listener_id})


async def insert_listener(conn: asyncpg.Connection, *, event_type: int, url: str, secret: str,
                          active: bool, description: str, now: datetime) -> ListenerRow:
    row = await conn.fetchrow(
        f"""INSERT INTO webhook_listeners (event_type, url, secret, active, description,
                                           create_time, update_time)
            VALUES ($1, $2, $3, $4, $5, $6, $6) RETURNING {_LISTENER_COLUMNS}""",
        event_type, url, secret, active, description, now)
    assert row is not None
    return _listener(row)


async def get_listener(conn: asyncpg.Connection, listener_id: int, *,
                       for_update: bool = False) -> ListenerRow:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(
        f"SELECT {_LISTENER_COLUMNS} FROM webhook_listeners WHERE id = $1{lock}", listener_id)
    if row is None:
        raise _listener_not_found(listener_id)
    return _listener(row)


async def list_listeners(conn: asyncpg.Connection, *, event_type: int | None,
                         after_id: int | None, limit: int) -> list[ListenerRow]:
    """Up to ``limit`` listeners in id order, strictly after ``after_id``."""
    rows = await conn.fetch(
        f"""SELECT {_LISTENER_COLUMNS} FROM webhook_listeners
             WHERE ($1::integer IS NULL OR event_type = $1)
               AND ($2::bigint IS NULL OR id > $2)
             ORDER BY id LIMIT $3""",
        event_type, after_id, limit)
    return [_listener(row) for row in rows]


async def update_listener(conn: asyncpg.Connection, listener_id: int, *, now: datetime,
                          url: str | None = None, active: bool | None = None,
                          description: str | None = None,
                          secret: str | None = None) -> ListenerRow:
    """Change the given fields (None: keep). A new secret keeps the old one as previous_secret,
    which the worker still signs with for PROMO_WEBHOOK_SECRET_GRACE_SECONDS."""
    row = await conn.fetchrow(
        f"""UPDATE webhook_listeners
               SET url = coalesce($2, url), active = coalesce($3, active),
                   description = coalesce($4, description),
                   previous_secret = CASE WHEN $5::text IS NULL THEN previous_secret
                                          ELSE secret END,
                   secret_rotated_at = CASE WHEN $5::text IS NULL THEN secret_rotated_at
                                            ELSE $6 END,
                   secret = coalesce($5, secret),
                   update_time = $6
             WHERE id = $1 RETURNING {_LISTENER_COLUMNS}""",
        listener_id, url, active, description, secret, now)
    if row is None:
        raise _listener_not_found(listener_id)
    return _listener(row)


async def delete_listener(conn: asyncpg.Connection, listener_id: int, *, now: datetime) -> int:
    """Delete the listener and cancel its pending deliveries; returns how many were cancelled.
    Their outbox jobs stay: the worker finds the delivery cancelled and does nothing."""
    deleted = await conn.fetchval("DELETE FROM webhook_listeners WHERE id = $1 RETURNING id",
                                  listener_id)
    if deleted is None:
        raise _listener_not_found(listener_id)
    cancelled: int = await conn.fetchval(
        """WITH c AS (
               UPDATE webhook_deliveries
                  SET status = 'CANCELLED', update_time = $2,
                      last_error = coalesce(last_error || ' / ', '') || 'listener unregistered'
                WHERE listener_id = $1 AND status = 'PENDING' RETURNING 1)
           SELECT count(*) FROM c""", listener_id, now)
    return cancelled


# Deliveries.

_DELIVERY_SELECT = """
SELECT d.id, e.event_id::text AS event_uuid, e.event_type, d.listener_id, d.status, d.attempts,
       d.last_status_code, d.last_error, d.last_latency_ms, d.delivered_at, d.deliver_by,
       d.run_started_at, d.create_time, d.update_time,
       CASE WHEN d.status = 'PENDING' AND j.status = 'pending' THEN j.due_at END AS next_attempt_at
  FROM webhook_deliveries d
  JOIN webhook_events e ON e.id = d.event_id
  LEFT JOIN outbox_jobs j ON j.id = d.outbox_job_id
"""


def _delivery(row: asyncpg.Record) -> DeliveryRow:
    return DeliveryRow(
        id=row["id"], event_id=row["event_uuid"], event_type=row["event_type"],
        listener_id=row["listener_id"], status=DeliveryStatus(row["status"]),
        attempts=row["attempts"], last_status_code=row["last_status_code"],
        last_error=row["last_error"], last_latency_ms=row["last_latency_ms"],
        next_attempt_at=row["next_attempt_at"], delivered_at=row["delivered_at"],
        deliver_by=row["deliver_by"], run_started_at=row["run_started_at"],
        create_time=row["create_time"], update_time=row["update_time"])


def _delivery_not_found(delivery_id: int) -> NotFound:
    return NotFound(f"no webhook delivery {delivery_id}", reason="DELIVERY_NOT_FOUND",
                    metadata={"delivery_id": delivery_id})


async def get_delivery(conn: asyncpg.Connection, delivery_id: int) -> DeliveryRow:
    row = await conn.fetchrow(f"{_DELIVERY_SELECT} WHERE d.id = $1", delivery_id)
    if row is None:
        raise _delivery_not_found(delivery_id)
    return _delivery(row)


async def list_deliveries(conn: asyncpg.Connection, *, listener_id: int | None,
                          event_id: str | None, event_type: int | None,
                          statuses: list[str] | None, before_id: int | None,
                          limit: int) -> list[DeliveryRow]:
    """Newest first (operators look at what just happened), strictly before ``before_id``."""
    rows = await conn.fetch(
        f"""{_DELIVERY_SELECT}
             WHERE ($1::bigint IS NULL OR d.listener_id = $1)
               AND ($2::uuid IS NULL OR e.event_id = $2)
               AND ($3::integer IS NULL OR e.event_type = $3)
               AND ($4::text[] IS NULL OR d.status = ANY($4))
               AND ($5::bigint IS NULL OR d.id < $5)
             ORDER BY d.id DESC LIMIT $6""",
        listener_id, uuid.UUID(event_id) if event_id else None, event_type, statuses, before_id,
        limit)
    return [_delivery(row) for row in rows]


async def list_attempts(conn: asyncpg.Connection, delivery_id: int) -> list[AttemptRow]:
    rows = await conn.fetch(
        """SELECT attempt, url, started_at, finished_at, status_code, error, latency_ms
             FROM webhook_attempts WHERE delivery_id = $1 ORDER BY attempt""", delivery_id)
    return [AttemptRow(attempt=r["attempt"], url=r["url"], started_at=r["started_at"],
                       finished_at=r["finished_at"], status_code=r["status_code"],
                       error=r["error"], latency_ms=r["latency_ms"]) for r in rows]


async def get_event_body(conn: asyncpg.Connection, delivery_id: int) -> str:
    body: str | None = await conn.fetchval(
        """SELECT e.body FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id
            WHERE d.id = $1""", delivery_id)
    if body is None:
        raise _delivery_not_found(delivery_id)
    return body


async def redeliver(conn: asyncpg.Connection, delivery_id: int, *, now: datetime,
                    max_attempts: int | None = None) -> tuple[DeliveryRow, int]:
    """Start a new run of a finished delivery: back to PENDING with a fresh outbox job and a
    fresh deadline (run_started_at = now). Returns the delivery and the job id to queue.

    A delivered event may be redelivered too (a listener that lost it asks again; it
    de-duplicates by event id anyway). A pending one is refused: it is already on its way.
    """
    row = await conn.fetchrow(
        """SELECT d.status, l.id AS listener, l.active
             FROM webhook_deliveries d LEFT JOIN webhook_listeners l ON l.id = d.listener_id
            WHERE d.id = $1 FOR UPDATE OF d""", delivery_id)
    if row is None:
        raise _delivery_not_found(delivery_id)
    status = DeliveryStatus(row["status"])
    meta = {"delivery_id": delivery_id, "status": status.value}
    if status not in REDELIVERABLE:
        raise FailedPrecondition(
            f"delivery {delivery_id} is {status.value}: it is already on its way; see its "
            "next attempt time", reason="DELIVERY_PENDING", metadata=meta)
    if row["listener"] is None:
        raise FailedPrecondition(f"the listener of delivery {delivery_id} was unregistered",
                                 reason="LISTENER_NOT_FOUND", metadata=meta)
    if not row["active"]:
        raise FailedPrecondition(
            f"the listener of delivery {delivery_id} is inactive; activate it first",
            reason="LISTENER_INACTIVE", metadata=meta)
    job_id = await outbox.add_job(conn, kind=DELIVER_KIND, payload={"delivery_id": delivery_id},
                                  due_at=now, max_attempts=max_attempts or OUTBOX_MAX_ATTEMPTS)
    assert job_id is not None
    await conn.execute(
        """UPDATE webhook_deliveries
              SET status = 'PENDING', outbox_job_id = $2, run_started_at = $3, deliver_by = NULL,
                  update_time = $3
            WHERE id = $1""", delivery_id, job_id, now)
    return await get_delivery(conn, delivery_id), job_id


# The worker's side.

async def load_work(conn: asyncpg.Connection, delivery_id: int, *,
                    lock: bool = False) -> DeliveryWork | None:
    """The delivery with its event and current listener; None if the delivery does not exist."""
    row = await conn.fetchrow(
        f"""SELECT d.id, d.status, d.outbox_job_id, d.deliver_by, d.run_started_at, d.attempts,
                   d.listener_id, e.event_id::text AS event_uuid, e.event_type, e.body,
                   e.occurred_at, l.url, coalesce(l.active, false) AS active, l.secret,
                   l.previous_secret, l.secret_rotated_at
              FROM webhook_deliveries d
              JOIN webhook_events e ON e.id = d.event_id
              LEFT JOIN webhook_listeners l ON l.id = d.listener_id
             WHERE d.id = $1{" FOR UPDATE OF d" if lock else ""}""", delivery_id)
    if row is None:
        return None
    return DeliveryWork(
        delivery_id=row["id"], status=DeliveryStatus(row["status"]),
        outbox_job_id=row["outbox_job_id"], event_id=row["event_uuid"],
        event_type=row["event_type"], body=row["body"].encode(), occurred_at=row["occurred_at"],
        deliver_by=row["deliver_by"], run_started_at=row["run_started_at"],
        attempts=row["attempts"], listener_id=row["listener_id"], listener_url=row["url"],
        listener_active=row["active"], secret=row["secret"],
        previous_secret=row["previous_secret"], secret_rotated_at=row["secret_rotated_at"])


async def close_delivery(conn: asyncpg.Connection, delivery_id: int, *, status: DeliveryStatus,
                         error: str, now: datetime) -> None:
    """End a pending delivery without an HTTP attempt (cancelled, or past its deadline)."""
    await conn.execute(
        """UPDATE webhook_deliveries SET status = $2, last_error = left($3, $5), update_time = $4
            WHERE id = $1 AND status = 'PENDING'""",
        delivery_id, status.value, error, now, MAX_ERROR_LENGTH)


async def start_attempt(conn: asyncpg.Connection, delivery_id: int, *, outbox_job_id: int,
                        url: str, now: datetime) -> int:
    """Log an attempt as started (before the HTTP call) and return its number. An earlier
    attempt that never finished (its worker died) is marked interrupted now."""
    await conn.execute(
        """UPDATE webhook_attempts
              SET finished_at = $2,
                  error = 'interrupted: the worker stopped before recording a result'
            WHERE delivery_id = $1 AND finished_at IS NULL""", delivery_id, now)
    attempt: int = await conn.fetchval(
        """UPDATE webhook_deliveries SET attempts = attempts + 1, update_time = $2
            WHERE id = $1 RETURNING attempts""", delivery_id, now)
    await conn.execute(
        """INSERT INTO webhook_attempts (delivery_id, attempt, outbox_job_id, url, started_at)
           VALUES ($1, $2, $3, $4, $5)""", delivery_id, attempt, outbox_job_id, url, now)
    return attempt


async def finish_attempt(conn: asyncpg.Connection, delivery_id: int, attempt: int, *,
                         now: datetime, status_code: int | None, error: str | None,
                         latency_ms: float, new_status: DeliveryStatus) -> None:
    """Record an attempt's result and the delivery's new status.

    A 2xx always wins (it was delivered, even if the listener was unregistered meanwhile);
    any other result only moves a delivery that is still PENDING.
    """
    await conn.execute(
        """UPDATE webhook_attempts
              SET finished_at = $3, status_code = $4, error = left($5, $7), latency_ms = $6
            WHERE delivery_id = $1 AND attempt = $2""",
        delivery_id, attempt, now, status_code, error, latency_ms, MAX_ERROR_LENGTH)
    await conn.execute(
        """UPDATE webhook_deliveries
              SET status = CASE WHEN $2 = 'DELIVERED' OR status = 'PENDING' THEN $2
                                ELSE status END,
                  delivered_at = CASE WHEN $2 = 'DELIVERED' THEN $3 ELSE delivered_at END,
                  last_status_code = $4, last_error = left($5, $7), last_latency_ms = $6,
                  update_time = $3
            WHERE id = $1""",
        delivery_id, new_status.value, now, status_code, error, latency_ms, MAX_ERROR_LENGTH)
