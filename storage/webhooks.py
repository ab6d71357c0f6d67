"""Listeners (webhook or e-mail), events, deliveries and attempts in PostgreSQL.

Why this shape: an event is written in the transaction of the change that caused it, with one
delivery row and one outbox job per active listener of its type, in a single statement (emitters
such as batch bonus runs emit many events per transaction). The outbox job only points at the
delivery; the worker reads the listener's current URL, recipients and secret at each attempt, so
an update or a deactivation applies to deliveries already on their way. Nothing here talks HTTP
or SMTP.

The worker's side works in batches (``claim_batch``, ``start_batch``, ``finish_batch``): one
worker job claims up to N due delivery jobs with FOR UPDATE SKIP LOCKED and logs all their
attempts as started in a few statements, sends without holding a connection, then records every
result in one statement. A claimed job's due time moves to the end of its lease while it is in
flight, so another copy of its arq job (or another worker) does not start it again; if the worker
dies, the job is due again when the lease runs out and the sweeper queues it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import asyncpg

from core.errors import FailedPrecondition, NotFound
from core.events import (
    REDELIVERABLE,
    Channel,
    DeliveryStatus,
    Envelope,
    EventType,
    mailto_uri,
)
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
    """A listener as the API shows it: never its secret. ``url`` is empty for an e-mail
    listener, ``email_recipients`` empty for a webhook."""

    id: int
    event_type: int
    url: str
    active: bool
    description: str
    secret_rotated_at: datetime | None
    create_time: datetime
    update_time: datetime
    channel: Channel = Channel.WEBHOOK
    email_recipients: tuple[str, ...] = ()


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
    """One claimed delivery job and everything its attempt needs, read before the send (then the
    connection is released). ``delivery_id`` is None when the job points at no delivery;
    ``listener_*`` are None when the listener was unregistered."""

    job_id: int
    job_attempts: int  # the outbox job's attempts, this one included
    job_max_attempts: int
    own: bool  # the job the calling outbox runner started (it records the job's own outcome)
    delivery_id: int | None
    status: DeliveryStatus
    outbox_job_id: int | None  # the delivery's current job (a redelivery replaces it)
    event_id: str
    event_type: int
    body: bytes
    occurred_at: datetime | None
    deliver_by: datetime | None
    run_started_at: datetime | None
    attempts: int
    listener_id: int | None
    channel: Channel
    listener_url: str | None
    email_recipients: tuple[str, ...]
    listener_active: bool
    secret: str | None
    previous_secret: str | None
    secret_rotated_at: datetime | None

    @property
    def target(self) -> str:
        """Where an attempt goes, as the attempt log shows it: the URL, or mailto:..."""
        if self.channel is Channel.EMAIL:
            return mailto_uri(self.email_recipients)
        return self.listener_url or ""


@dataclass(frozen=True)
class Closing:
    """A claimed job that ends without a send: its delivery closes (``delivery_status`` None:
    left as it is) and, unless it is the caller's own job, its outbox row is settled."""

    work: DeliveryWork
    delivery_status: DeliveryStatus | None
    job_status: str  # 'done' or 'dead'
    error: str | None
    # For the metrics only: a delivery closed before this job came up (UnregisterListener,
    # CancelCampaign), counted once, by the job that was to attempt it.
    closed_before: DeliveryStatus | None = None


@dataclass(frozen=True)
class AttemptResult:
    """The result of one send, for ``finish_batch``."""

    work: DeliveryWork
    attempt: int
    finished_at: datetime
    status_code: int | None
    error: str | None
    latency_ms: float
    new_status: DeliveryStatus
    # The outbox row's next state (ignored for the caller's own job): 'done', 'dead', or
    # 'pending' again at retry_at.
    job_status: str
    retry_at: datetime | None = None
    job_error: str | None = None  # the outbox row's last_error
    # False for a send that was never made (no free send slot in time): its logged attempt is
    # removed and the delivery's and the job's attempt counts are given back.
    counted: bool = True


# Events.

# Events in one statement, one or many: each event's row (a dedup key already seen: nothing),
# then a delivery and its outbox job for each active listener of its type.
_EMIT_SQL = """
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::integer[], $3::text[], $4::text[])
                  WITH ORDINALITY AS t(event_id, event_type, dedup_key, body, n)),
event AS (
    INSERT INTO webhook_events (event_id, event_type, dedup_key, body, occurred_at, deliver_by)
    SELECT event_id, event_type, dedup_key, body, $5, $6 FROM input ORDER BY n
    ON CONFLICT (dedup_key) DO NOTHING
    RETURNING id, event_type),
targets AS MATERIALIZED (
    -- delivery ids are drawn first so the outbox payload can carry them
    SELECT nextval('webhook_deliveries_id_seq') AS delivery_id, l.id AS listener_id,
           e.id AS event_pk
      FROM event e JOIN webhook_listeners l ON l.event_type = e.event_type AND l.active
     ORDER BY e.id, l.id),
jobs AS (
    INSERT INTO outbox_jobs (kind, payload, due_at, max_attempts)
    SELECT $7, jsonb_build_object('delivery_id', t.delivery_id), $5, $8 FROM targets t
    RETURNING id, (payload ->> 'delivery_id')::bigint AS delivery_id),
deliveries AS (
    INSERT INTO webhook_deliveries (id, event_id, listener_id, outbox_job_id, run_started_at,
                                    deliver_by)
    SELECT t.delivery_id, t.event_pk, t.listener_id, j.id, $5, $6
      FROM targets t JOIN jobs j USING (delivery_id)
    RETURNING id)
SELECT (SELECT count(*) FROM event) AS events,
       coalesce((SELECT array_agg(id ORDER BY id) FROM jobs), '{}'::bigint[]) AS job_ids
"""


class EventRow(NamedTuple):
    """One event ready to record: its id, type, dedup key (or None) and envelope body (a
    tuple: a bonus batch builds over 100,000 of them)."""

    event_id: str
    event_type: int
    dedup_key: str | None
    body: str


async def emit_events(conn: asyncpg.Connection, events: Sequence[EventRow], *, now: datetime,
                      deliver_by: datetime | None = None, max_attempts: int | None = None
                      ) -> tuple[int, list[int]]:
    """Record already-built events in one statement (see :func:`emit_event` for what that
    means); returns (events recorded, outbox job ids to queue after commit). Batches use it
    directly to emit thousands of events per statement."""
    if not events:
        return 0, []
    row = await conn.fetchrow(
        _EMIT_SQL, [e.event_id for e in events], [e.event_type for e in events],
        [e.dedup_key for e in events], [e.body for e in events], now, deliver_by,
        DELIVER_KIND, max_attempts or OUTBOX_MAX_ATTEMPTS)
    assert row is not None
    return row["events"], list(row["job_ids"])


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
    recorded, job_ids = await emit_events(
        conn, [EventRow(event_id, int(kind), dedup_key, body.decode())], now=now,
        deliver_by=deliver_by, max_attempts=max_attempts)
    if not recorded:
        return None
    return EmittedEvent(event_id=event_id, outbox_job_ids=job_ids)


# Listeners.

_LISTENER_COLUMNS = ("id, event_type, url, active, description, secret_rotated_at, create_time, "
                     "update_time, channel, email_recipients")


def _listener(row: asyncpg.Record) -> ListenerRow:
    return ListenerRow(id=row["id"], event_type=row["event_type"], url=row["url"],
                       active=row["active"], description=row["description"],
                       secret_rotated_at=row["secret_rotated_at"],
                       create_time=row["create_time"], update_time=row["update_time"],
                       channel=Channel(row["channel"]),
                       email_recipients=tuple(row["email_recipients"]))


def _listener_not_found(listener_id: int) -> NotFound:
    return NotFound(f"no webhook listener {listener_id}", reason="LISTENER_NOT_FOUND",
                    metadata={"listener_id": listener_id})


async def insert_listener(conn: asyncpg.Connection, *, event_type: int, url: str, secret: str,
                          active: bool, description: str, now: datetime,
                          channel: Channel = Channel.WEBHOOK,
                          email_recipients: list[str] | tuple[str, ...] = ()) -> ListenerRow:
    """A webhook listener (url and secret) or an e-mail listener (recipients; url and secret
    empty)."""
    row = await conn.fetchrow(
        f"""INSERT INTO webhook_listeners (event_type, url, secret, active, description,
                                           create_time, update_time, channel, email_recipients)
            VALUES ($1, $2, $3, $4, $5, $6, $6, $7, $8) RETURNING {_LISTENER_COLUMNS}""",
        event_type, url, secret, active, description, now, channel.value, list(email_recipients))
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
                          secret: str | None = None,
                          email_recipients: list[str] | None = None) -> ListenerRow:
    """Change the given fields (None: keep). A new secret keeps the old one as previous_secret,
    which the worker still signs with for PROMO_WEBHOOK_SECRET_GRACE_SECONDS. The caller checks
    that the fields fit the listener's channel (the table's CHECK refuses a mismatch)."""
    row = await conn.fetchrow(
        f"""UPDATE webhook_listeners
               SET url = coalesce($2, url), active = coalesce($3, active),
                   email_recipients = coalesce($7::text[], email_recipients),
                   description = coalesce($4, description),
                   previous_secret = CASE WHEN $5::text IS NULL THEN previous_secret
                                          ELSE secret END,
                   secret_rotated_at = CASE WHEN $5::text IS NULL THEN secret_rotated_at
                                            ELSE $6 END,
                   secret = coalesce($5, secret),
                   update_time = $6
             WHERE id = $1 RETURNING {_LISTENER_COLUMNS}""",
        listener_id, url, active, description, secret, now, email_recipients)
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


async def cancel_pending_deliveries(conn: asyncpg.Connection, dedup_key: str, *, now: datetime,
                                    why: str) -> int:
    """Cancel the still pending deliveries of the event emitted under ``dedup_key`` (its news
    went stale, e.g. a campaign cancelled while awaiting clearance); returns how many. Their
    outbox jobs stay: the worker finds the delivery cancelled and does nothing. The event is
    marked withdrawn (``why``), so RedeliverEvent does not send it again either."""
    cancelled: int = await conn.fetchval(
        """WITH e AS (
               UPDATE webhook_events SET withdrawn = $3 WHERE dedup_key = $1 RETURNING id),
           c AS (
               UPDATE webhook_deliveries d
                  SET status = 'CANCELLED', update_time = $2,
                      last_error = coalesce(d.last_error || ' / ', '') || $3
                 FROM e
                WHERE d.event_id = e.id AND d.status = 'PENDING'
               RETURNING 1)
           SELECT count(*) FROM c""", dedup_key, now, why)
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
    de-duplicates by event id anyway). A pending one is refused: it is already on its way; so
    is a withdrawn event (a cancelled campaign's clearance announcement).
    """
    row = await conn.fetchrow(
        """SELECT d.status, l.id AS listener, l.active,
                  -- A campaign cancelled by a server of the version before migration 0027
                  -- (during a rolling upgrade) did not mark its announcement: ask the campaign.
                  coalesce(e.withdrawn, CASE WHEN c.status = 'CANCELLED'
                                             THEN 'campaign cancelled' END) AS withdrawn
             FROM webhook_deliveries d
             JOIN webhook_events e ON e.id = d.event_id
             LEFT JOIN webhook_listeners l ON l.id = d.listener_id
             LEFT JOIN campaigns c
               ON c.id = CASE WHEN e.dedup_key ~ '^campaign:[0-9]{1,18}:clearance$'
                              THEN split_part(e.dedup_key, ':', 2)::bigint END
            WHERE d.id = $1 FOR UPDATE OF d""", delivery_id)
    if row is None:
        raise _delivery_not_found(delivery_id)
    status = DeliveryStatus(row["status"])
    meta = {"delivery_id": delivery_id, "status": status.value}
    if status not in REDELIVERABLE:
        raise FailedPrecondition(
            f"delivery {delivery_id} is {status.value}: it is already on its way; see its "
            "next attempt time", reason="DELIVERY_PENDING", metadata=meta)
    if row["withdrawn"] is not None:
        raise FailedPrecondition(
            f"the event of delivery {delivery_id} was withdrawn ({row['withdrawn']}): its "
            "news is stale, so it is not sent again", reason="EVENT_WITHDRAWN", metadata=meta)
    if row["listener"] is None:
        # Not LISTENER_NOT_FOUND (NOT_FOUND, for a listener id asked for): the delivery exists;
        # the state it refers to is what is missing.
        raise FailedPrecondition(f"the listener of delivery {delivery_id} was unregistered",
                                 reason="LISTENER_UNREGISTERED", metadata=meta)
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


# The worker's side: batches.

_CLAIM_SQL = """
WITH own AS (
    -- The job the caller's outbox runner already started (attempts counted, lease set): move its
    -- due time to the end of the lease, so a second copy of its arq job cannot start it too.
    UPDATE outbox_jobs SET due_at = $2::timestamptz + $3::interval
     WHERE id = $1 AND status = 'pending' AND due_at <= $2::timestamptz
    RETURNING id, attempts, max_attempts, payload, true AS own),
picked AS MATERIALIZED (
    -- Other due delivery jobs nobody holds: not leased (a leased one is queued or running
    -- elsewhere), not locked by another claimer. Materialized: evaluated exactly once.
    SELECT id FROM outbox_jobs
     WHERE status = 'pending' AND kind = $5 AND due_at <= $2::timestamptz
       AND (locked_until IS NULL OR locked_until < $2::timestamptz)
       AND attempts < max_attempts  -- out of attempts: the sweeper buries it (storage/outbox)
       AND id IS DISTINCT FROM $1
     ORDER BY due_at, id
     LIMIT $4
     FOR UPDATE SKIP LOCKED),
others AS (
    UPDATE outbox_jobs j
       SET attempts = j.attempts + 1, locked_until = $2::timestamptz + $3::interval,
           due_at = $2::timestamptz + $3::interval
      FROM picked
     WHERE j.id = picked.id
    RETURNING j.id, j.attempts, j.max_attempts, j.payload, false AS own),
jobs AS (
    -- The payload is {"delivery_id": n}; rows written through storage.outbox.add_job hold it as
    -- a JSON string of that object.
    SELECT *, CASE jsonb_typeof(payload)
                  WHEN 'object' THEN payload ->> 'delivery_id'
                  WHEN 'string' THEN substring(
                      payload #>> '{}' FROM '"delivery_id"[[:space:]]*:[[:space:]]*([0-9]+)')
              END AS delivery_ref
      FROM (SELECT * FROM own UNION ALL SELECT * FROM others) AS claimed)
SELECT jobs.id AS job_id, jobs.attempts AS job_attempts, jobs.max_attempts AS job_max_attempts,
       jobs.own, d.id AS delivery_id, d.status, d.outbox_job_id, d.deliver_by, d.run_started_at,
       d.attempts, d.listener_id, e.event_id::text AS event_uuid, e.event_type, e.body,
       e.occurred_at, l.channel, l.url, l.email_recipients, coalesce(l.active, false) AS active,
       l.secret, l.previous_secret, l.secret_rotated_at
  FROM jobs
  LEFT JOIN webhook_deliveries d
         ON d.id = CASE WHEN jobs.delivery_ref ~ '^[0-9]{1,18}$'
                        THEN jobs.delivery_ref::bigint END
  LEFT JOIN webhook_events e ON e.id = d.event_id
  LEFT JOIN webhook_listeners l ON l.id = d.listener_id
 ORDER BY jobs.own DESC, jobs.id
"""


def _work(row: asyncpg.Record) -> DeliveryWork:
    return DeliveryWork(
        job_id=row["job_id"], job_attempts=row["job_attempts"],
        job_max_attempts=row["job_max_attempts"], own=row["own"],
        delivery_id=row["delivery_id"],
        status=DeliveryStatus(row["status"] or DeliveryStatus.PENDING.value),
        outbox_job_id=row["outbox_job_id"], event_id=row["event_uuid"] or "",
        event_type=row["event_type"] or 0, body=(row["body"] or "").encode(),
        occurred_at=row["occurred_at"], deliver_by=row["deliver_by"],
        run_started_at=row["run_started_at"], attempts=row["attempts"] or 0,
        listener_id=row["listener_id"], channel=Channel(row["channel"] or Channel.WEBHOOK.value),
        listener_url=row["url"], email_recipients=tuple(row["email_recipients"] or ()),
        listener_active=row["active"], secret=row["secret"],
        previous_secret=row["previous_secret"], secret_rotated_at=row["secret_rotated_at"])


async def claim_batch(conn: asyncpg.Connection, *, own_job_id: int | None, now: datetime,
                      lease: timedelta, limit: int) -> list[DeliveryWork]:
    """Claim the caller's own delivery job (already started by the outbox runner) and up to
    ``limit`` other due, unleased delivery jobs, in one statement; return them with their
    delivery, event and current listener, the own job first.

    Each other job's attempt is counted and it is leased until now + ``lease``; every claimed
    job's due time moves there too, so nothing starts it again while it is in flight (a worker
    that dies leaves it due when the lease ends; the sweeper queues it then). If the own job is
    missing from the answer, another runner already has it in flight: leave it alone.
    """
    rows = await conn.fetch(_CLAIM_SQL, own_job_id, now, lease, limit, DELIVER_KIND)
    return [_work(row) for row in rows]


_START_SQL = """
WITH go AS (
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[]) AS t(delivery_id, job_id, url)),
started AS (
    -- Only a delivery still pending and still carried by this job is attempted.
    UPDATE webhook_deliveries d SET attempts = d.attempts + 1, update_time = $4
      FROM go
     WHERE d.id = go.delivery_id AND d.status = 'PENDING' AND d.outbox_job_id = go.job_id
    RETURNING d.id, d.attempts, go.job_id, go.url),
interrupted AS (
    -- An earlier attempt that never finished: its worker stopped before recording a result.
    UPDATE webhook_attempts a
       SET finished_at = $4, error = 'interrupted: the worker stopped before recording a result'
      FROM started
     WHERE a.delivery_id = started.id AND a.finished_at IS NULL),
logged AS (
    INSERT INTO webhook_attempts (delivery_id, attempt, outbox_job_id, url, started_at)
    SELECT id, attempts, job_id, url, $4 FROM started
    RETURNING delivery_id, attempt),
closed AS (
    UPDATE webhook_deliveries d
       SET status = c.status, last_error = left(c.error, $8), update_time = $4
      FROM unnest($5::bigint[], $6::text[], $7::text[]) AS c(delivery_id, status, error)
     WHERE d.id = c.delivery_id AND d.status = 'PENDING')
SELECT delivery_id, attempt FROM logged
"""


async def start_batch(conn: asyncpg.Connection, *, now: datetime, attempts: list[DeliveryWork],
                      closings: list[Closing]) -> dict[int, int]:
    """Log the attempts as started (before any send) and close the deliveries that end without
    one (cancelled, or past their deadline), in one statement. Returns {delivery id: attempt
    number} for the deliveries actually started: one that stopped being pending meanwhile (e.g.
    its listener was unregistered) is missing, and must not be sent."""
    closing = [c for c in closings if c.delivery_status is not None and c.work.delivery_id]
    rows = await conn.fetch(
        _START_SQL,
        [w.delivery_id for w in attempts], [w.job_id for w in attempts],
        [w.target for w in attempts], now,
        [c.work.delivery_id for c in closing],
        [c.delivery_status.value for c in closing if c.delivery_status is not None],
        [c.error or "" for c in closing], MAX_ERROR_LENGTH)
    return {row["delivery_id"]: row["attempt"] for row in rows}


_FINISH_SQL = """
WITH r AS (
    SELECT * FROM unnest($1::bigint[], $2::integer[], $3::timestamptz[], $4::integer[],
                         $5::text[], $6::double precision[], $7::text[], $14::boolean[])
           AS t(delivery_id, attempt, finished_at, status_code, error, latency_ms, new_status,
                counted)),
attempts AS (
    UPDATE webhook_attempts a
       SET finished_at = r.finished_at, status_code = r.status_code,
           error = left(r.error, $12), latency_ms = r.latency_ms
      FROM r
     WHERE a.delivery_id = r.delivery_id AND a.attempt = r.attempt AND r.counted),
not_made AS (
    -- A send never made (no free send slot in time) was no attempt: its log line goes.
    DELETE FROM webhook_attempts a
     USING r
     WHERE a.delivery_id = r.delivery_id AND a.attempt = r.attempt AND NOT r.counted),
deliveries AS (
    -- A delivered answer always wins (it was delivered, even if the listener was unregistered
    -- meanwhile); any other result only moves a delivery that is still pending.
    UPDATE webhook_deliveries d
       SET status = CASE WHEN r.new_status = 'DELIVERED' OR d.status = 'PENDING'
                         THEN r.new_status ELSE d.status END,
           delivered_at = CASE WHEN r.new_status = 'DELIVERED' THEN r.finished_at
                               ELSE d.delivered_at END,
           attempts = CASE WHEN r.counted OR d.attempts <> r.attempt THEN d.attempts
                           ELSE d.attempts - 1 END,
           last_status_code = r.status_code,
           -- A delivery cancelled while its attempt was in flight keeps why it was cancelled
           -- (the attempt's own error stays in its attempt log).
           last_error = CASE WHEN r.new_status = 'DELIVERED' OR d.status = 'PENDING'
                             THEN left(r.error, $12) ELSE d.last_error END,
           last_latency_ms = r.latency_ms, update_time = r.finished_at
      FROM r
     WHERE d.id = r.delivery_id),
jobs AS (
    UPDATE outbox_jobs j
       SET status = s.status,
           due_at = coalesce(s.retry_at, j.due_at),
           last_error = CASE WHEN s.status = 'done' THEN NULL ELSE left(s.error, 2000) END,
           finished_at = CASE WHEN s.status = 'pending' THEN NULL ELSE $11::timestamptz END,
           attempts = greatest(j.attempts - s.given_back, 0),
           -- A retry after a send not made is queued under an id the sweeper cannot know
           -- (workers.webhooks._queue_retries): the row stays leased past its retry time.
           locked_until = CASE WHEN s.given_back > 0 AND s.status = 'pending'
                               THEN s.retry_at + $17::interval END
      FROM unnest($8::bigint[], $9::text[], $10::text[], $13::timestamptz[], $15::integer[])
           AS s(job_id, status, error, retry_at, given_back)
     WHERE j.id = s.job_id AND j.status = 'pending'),
own AS (
    -- The caller's own job, when its send was never made: the attempt its outbox runner
    -- counted is given back too (the runner settles its status afterwards).
    UPDATE outbox_jobs j SET attempts = greatest(j.attempts - 1, 0)
     WHERE j.id = ANY($16::bigint[]) AND j.status = 'pending')
SELECT 1
"""


async def finish_batch(conn: asyncpg.Connection, *, now: datetime,
                       results: list[AttemptResult], closings: list[Closing],
                       lease: timedelta) -> None:
    """Record every send's result (attempt log and delivery) and settle the outbox rows of the
    claimed jobs other than the caller's own (done, dead, or pending again at their retry
    time), in one statement."""
    settle: list[tuple[int, str, str | None, datetime | None, int]] = [
        (r.work.job_id, r.job_status, r.job_error, r.retry_at, 0 if r.counted else 1)
        for r in results if not r.work.own]
    settle += [(c.work.job_id, c.job_status, c.error, None, 0)
               for c in closings if not c.work.own]
    await conn.execute(
        _FINISH_SQL,
        [r.work.delivery_id for r in results], [r.attempt for r in results],
        [r.finished_at for r in results], [r.status_code for r in results],
        [r.error for r in results], [r.latency_ms for r in results],
        [r.new_status.value for r in results],
        [s[0] for s in settle], [s[1] for s in settle], [s[2] for s in settle], now,
        MAX_ERROR_LENGTH, [s[3] for s in settle], [r.counted for r in results],
        [s[4] for s in settle],
        [r.work.job_id for r in results if r.work.own and not r.counted], lease)
