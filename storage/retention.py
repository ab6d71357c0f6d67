"""Retention: delete bookkeeping rows whose age makes them useless, in bounded chunks.

Why: webhook events, deliveries and their attempt log, finished outbox jobs, idempotency keys
and emitted code-pool alerts are written on every change and were never deleted; the dynamic-bonus
history (results, finished requests, batch records) is kept 30 days, as the vendor keeps its
approval queue's records. Business records (grants, the bonus ledger, codes, budgets, campaign
targets) are never touched here.

How, so that a backlog of millions never holds long locks or scans a table per chunk:
* every statement deletes at most ``chunk`` rows and commits on its own (no transaction around
  the loop), taking its rows FOR UPDATE SKIP LOCKED so a row a worker is busy with is left for
  the next run;
* tables without an index on their age column are walked by primary key from the oldest row
  (ids grow with time): a statement looks at the next ``chunk`` ids only, deletes the ones that
  qualify, and the walk stops at the first chunk holding a row younger than the cutoff. A row
  can only qualify if it was *created* before the cutoff, so nothing past that point needs
  looking at, and no index beyond the primary key is needed (none is added to the hot
  write paths). Rows kept at the old end (a delivery still pending) are looked at again each
  run; there are few of them;
* idempotency keys have an index on created_at (migration 0001) and are deleted oldest first.

What is never deleted: a delivery still PENDING (being sent or retried) and the attempts of such a
delivery; an event that still has any delivery (deliveries reference their event, ON DELETE
CASCADE: deleting the event would take them along); an outbox job that is not finished
(``pending``); an idempotency key younger than its retention; an alert not yet emitted; a bonus
request still PENDING, or one whose result is kept. A bonus result still waiting for approval
(CALCULATED) *is* deleted with the rest of its day (the vendor's rule): those are counted apart
and logged as a warning, so an operator learns that a queue went unattended for 30 days.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

log = logging.getLogger("promo.retention")

# Rows per statement: large enough that a backlog goes quickly, small enough that each
# statement holds its row locks for milliseconds.
CHUNK = 5000

WEBHOOK_EVENTS = "webhook_events"
WEBHOOK_DELIVERIES = "webhook_deliveries"
WEBHOOK_ATTEMPTS = "webhook_attempts"
OUTBOX_JOBS = "outbox_jobs"
IDEMPOTENCY_KEYS = "idempotency_keys"
CODE_POOL_ALERTS = "code_pool_alerts"
BONUS_RESULTS = "bonus_results"
BONUS_REQUESTS = "bonus_requests"
BONUS_BATCHES = "bonus_batches"
TABLES = (WEBHOOK_ATTEMPTS, WEBHOOK_DELIVERIES, WEBHOOK_EVENTS, CODE_POOL_ALERTS, OUTBOX_JOBS,
          IDEMPOTENCY_KEYS, BONUS_RESULTS, BONUS_REQUESTS, BONUS_BATCHES)


@dataclass(frozen=True)
class RetentionPolicy:
    """Days each table family keeps its rows; 0 keeps them forever (that purge is off).
    Emitted code-pool alerts follow the webhook events they became."""

    webhook_event_days: int = 30
    webhook_delivery_days: int = 30
    webhook_attempt_days: int = 30
    outbox_job_days: int = 7
    idempotency_key_days: int = 30
    bonus_result_days: int = 30

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 0:
                raise ValueError(f"{name} must be 0 (keep forever) or a number of days")


def _cutoff(now: datetime, days: int) -> datetime | None:
    if now.tzinfo is None:
        raise ValueError("retention needs a timezone-aware now")
    return None if days == 0 else now - timedelta(days=days)


# Each walk statement takes ($1 last id seen, $2 cutoff, $3 chunk) and returns scanned,
# last_id, past_cutoff (the chunk reached rows created after the cutoff: stop) and deleted.
# ``doomed`` re-reads the rows it locks, so a row changed since the scan (a redelivered delivery)
# is judged on its current state.

_ATTEMPTS_SQL = """
WITH scan AS (SELECT id, started_at FROM webhook_attempts WHERE id > $1 ORDER BY id LIMIT $3),
doomed AS (
    SELECT a.id FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id
     WHERE a.id IN (SELECT id FROM scan) AND a.started_at < $2 AND d.status <> 'PENDING'
       FOR UPDATE OF a SKIP LOCKED FOR SHARE OF d SKIP LOCKED),
gone AS (DELETE FROM webhook_attempts a USING doomed WHERE a.id = doomed.id RETURNING 1)
SELECT (SELECT count(*) FROM scan) AS scanned, (SELECT max(id) FROM scan) AS last_id,
       coalesce((SELECT bool_or(started_at >= $2) FROM scan), false) AS past_cutoff,
       (SELECT count(*) FROM gone) AS deleted, 0::bigint AS cascaded
"""

# A delivery's age is its last change (delivered, failed, given up, cancelled); its attempts go
# with it (counted as attempts).
_DELIVERIES_SQL = """
WITH scan AS (SELECT id, create_time FROM webhook_deliveries WHERE id > $1 ORDER BY id LIMIT $3),
doomed AS (
    SELECT d.id FROM webhook_deliveries d
     WHERE d.id IN (SELECT id FROM scan) AND d.status <> 'PENDING' AND d.update_time < $2
       FOR UPDATE SKIP LOCKED),
attempts AS (DELETE FROM webhook_attempts a USING doomed WHERE a.delivery_id = doomed.id
             RETURNING 1),
gone AS (DELETE FROM webhook_deliveries d USING doomed WHERE d.id = doomed.id RETURNING 1)
SELECT (SELECT count(*) FROM scan) AS scanned, (SELECT max(id) FROM scan) AS last_id,
       coalesce((SELECT bool_or(create_time >= $2) FROM scan), false) AS past_cutoff,
       (SELECT count(*) FROM gone) AS deleted, (SELECT count(*) FROM attempts) AS cascaded
"""

# An event goes once it is old and none of its deliveries is left (a pending one, or a finished
# one its own retention still keeps). Deliveries are only ever added with their event, in the
# same statement, so an event without deliveries stays without.
_EVENTS_SQL = """
WITH scan AS (SELECT id, create_time FROM webhook_events WHERE id > $1 ORDER BY id LIMIT $3),
doomed AS (
    SELECT e.id FROM webhook_events e
     WHERE e.id IN (SELECT id FROM scan) AND e.create_time < $2
       AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = e.id)
       FOR UPDATE SKIP LOCKED),
gone AS (DELETE FROM webhook_events e USING doomed WHERE e.id = doomed.id RETURNING 1)
SELECT (SELECT count(*) FROM scan) AS scanned, (SELECT max(id) FROM scan) AS last_id,
       coalesce((SELECT bool_or(create_time >= $2) FROM scan), false) AS past_cutoff,
       (SELECT count(*) FROM gone) AS deleted, 0::bigint AS cascaded
"""

_ALERTS_SQL = """
WITH scan AS (SELECT id, raised_at FROM code_pool_alerts WHERE id > $1 ORDER BY id LIMIT $3),
doomed AS (
    SELECT a.id FROM code_pool_alerts a
     WHERE a.id IN (SELECT id FROM scan) AND a.raised_at < $2 AND a.emitted_at IS NOT NULL
       FOR UPDATE SKIP LOCKED),
gone AS (DELETE FROM code_pool_alerts a USING doomed WHERE a.id = doomed.id RETURNING 1)
SELECT (SELECT count(*) FROM scan) AS scanned, (SELECT max(id) FROM scan) AS last_id,
       coalesce((SELECT bool_or(raised_at >= $2) FROM scan), false) AS past_cutoff,
       (SELECT count(*) FROM gone) AS deleted, 0::bigint AS cascaded
"""

# Finished jobs only ('done' or 'dead', both stamp finished_at). A pending job is never touched,
# however old (a campaign due in months). A freed dedup key is never needed again: the keys
# name a campaign or a batching window that is long past. Except a dead bonus batch whose
# window still has PENDING requests: the sweeper re-arms the batch of any closed window with
# pending requests whose job is not there, so purging the dead job would run the failing
# batch again on its own (and hide it from the dead-job alert). It stays until an operator
# retries it (or a later window's batch computes those requests as stragglers).
_OUTBOX_SQL = """
WITH scan AS (SELECT id, created_at FROM outbox_jobs WHERE id > $1 ORDER BY id LIMIT $3),
doomed AS (
    SELECT j.id FROM outbox_jobs j
     WHERE j.id IN (SELECT id FROM scan) AND j.status IN ('done', 'dead')
       AND j.finished_at < $2
       AND NOT (j.status = 'dead' AND j.kind = 'bonus.batch' AND EXISTS (
               -- storage.outbox.add_job stores the payload object as a JSON string.
               SELECT 1 FROM (SELECT CASE jsonb_typeof(j.payload)
                                     WHEN 'string' THEN (j.payload #>> '{}')::jsonb
                                     ELSE j.payload END AS p) batch
                 JOIN bonus_requests q
                   ON q.definition_pk = CASE WHEN batch.p ->> 'definition' ~ '^[0-9]{1,18}$'
                                             THEN (batch.p ->> 'definition')::bigint END
                  AND q.window_start = promo_try_timestamptz(batch.p ->> 'window_start')
                  AND q.status = 'PENDING'))
       FOR UPDATE SKIP LOCKED),
gone AS (DELETE FROM outbox_jobs j USING doomed WHERE j.id = doomed.id RETURNING 1)
SELECT (SELECT count(*) FROM scan) AS scanned, (SELECT max(id) FROM scan) AS last_id,
       coalesce((SELECT bool_or(created_at >= $2) FROM scan), false) AS past_cutoff,
       (SELECT count(*) FROM gone) AS deleted, 0::bigint AS cascaded
"""

_IDEMPOTENCY_SQL = """
WITH doomed AS (
    SELECT scope, request_id FROM idempotency_keys WHERE created_at < $1
     ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED),
gone AS (DELETE FROM idempotency_keys k USING doomed
          WHERE k.scope = doomed.scope AND k.request_id = doomed.request_id RETURNING 1)
SELECT count(*) FROM gone
"""


async def _walk(conn: asyncpg.Connection, sql: str, cutoff: datetime,
                chunk: int) -> tuple[int, int]:
    """Run a walk statement chunk after chunk; returns (deleted, cascaded attempts)."""
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    after, deleted, cascaded = 0, 0, 0
    while True:
        row = await conn.fetchrow(sql, after, cutoff, chunk)
        assert row is not None
        deleted += row["deleted"]
        cascaded += row["cascaded"]
        if row["scanned"] < chunk or row["past_cutoff"]:
            return deleted, cascaded
        after = row["last_id"]


async def purge_webhook_attempts(conn: asyncpg.Connection, *, now: datetime, days: int,
                                 chunk: int = CHUNK) -> int:
    """Attempts started more than ``days`` ago, of deliveries that are no longer pending."""
    cutoff = _cutoff(now, days)
    if cutoff is None:
        return 0
    return (await _walk(conn, _ATTEMPTS_SQL, cutoff, chunk))[0]


async def purge_webhook_deliveries(conn: asyncpg.Connection, *, now: datetime, days: int,
                                   chunk: int = CHUNK) -> tuple[int, int]:
    """Finished deliveries last changed more than ``days`` ago, with their attempts. Returns
    (deliveries, attempts) deleted."""
    cutoff = _cutoff(now, days)
    if cutoff is None:
        return 0, 0
    return await _walk(conn, _DELIVERIES_SQL, cutoff, chunk)


async def purge_webhook_events(conn: asyncpg.Connection, *, now: datetime, days: int,
                               chunk: int = CHUNK) -> int:
    """Events recorded more than ``days`` ago that no delivery refers to any more."""
    cutoff = _cutoff(now, days)
    if cutoff is None:
        return 0
    return (await _walk(conn, _EVENTS_SQL, cutoff, chunk))[0]


async def purge_code_pool_alerts(conn: asyncpg.Connection, *, now: datetime, days: int,
                                 chunk: int = CHUNK) -> int:
    """Alerts raised more than ``days`` ago and already turned into events."""
    cutoff = _cutoff(now, days)
    if cutoff is None:
        return 0
    return (await _walk(conn, _ALERTS_SQL, cutoff, chunk))[0]


async def purge_outbox_jobs(conn: asyncpg.Connection, *, now: datetime, days: int,
                            chunk: int = CHUNK) -> int:
    """Outbox jobs finished (done or dead) more than ``days`` ago."""
    cutoff = _cutoff(now, days)
    if cutoff is None:
        return 0
    return (await _walk(conn, _OUTBOX_SQL, cutoff, chunk))[0]


async def _drain(conn: asyncpg.Connection, sql: str, cutoff: datetime, chunk: int) -> int:
    """Run a ($1 cutoff, $2 chunk) delete statement until a chunk comes back short."""
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    total = 0
    while True:
        deleted: int = await conn.fetchval(sql, cutoff, chunk)
        total += deleted
        if deleted < chunk:
            return total


async def purge_idempotency_keys(conn: asyncpg.Connection, *, now: datetime, days: int,
                                 chunk: int = CHUNK) -> int:
    """Keys created more than ``days`` ago: a retry with such a request id runs as new."""
    cutoff = _cutoff(now, days)
    if cutoff is None:
        return 0
    return await _drain(conn, _IDEMPOTENCY_SQL, cutoff, chunk)


# Bonus history. bonus_results and bonus_requests have indexes on their age columns (migration
# 0009): deleted oldest first. A result's request goes once the result has gone (a request
# recalculated later keeps its newer result, and so itself). Batch records are one row per
# definition and window: few, no index needed. A batch record goes once no result points at it
# (a result skipped because an approval holds it keeps its batch until the next run), so the
# purge never writes to, nor waits on, a result row; a record with work pending again is
# unfinished (storage.bonuses.add_requests) and stays. The results pointing at a batch were
# calculated by its runs, no later than its finish_time (a recalculation drops the pointer),
# so only results older than the cutoff need looking at: the few the results purge just
# left (held by an approval), found through the calculate_time index, not the whole table.

_BONUS_RESULTS_SQL = """
WITH doomed AS (
    SELECT id FROM bonus_results WHERE calculate_time < $1
     ORDER BY calculate_time LIMIT $2 FOR UPDATE SKIP LOCKED),
gone AS (DELETE FROM bonus_results r USING doomed WHERE r.id = doomed.id RETURNING r.status)
SELECT count(*) AS deleted, count(*) FILTER (WHERE status = 'CALCULATED') AS unapproved FROM gone
"""

_BONUS_REQUESTS_SQL = """
WITH doomed AS (
    SELECT id FROM bonus_requests q
     WHERE request_time < $1 AND status = 'DONE'
       AND NOT EXISTS (SELECT 1 FROM bonus_results r WHERE r.request_pk = q.id)
     ORDER BY request_time LIMIT $2 FOR UPDATE SKIP LOCKED),
gone AS (DELETE FROM bonus_requests q USING doomed WHERE q.id = doomed.id RETURNING 1)
SELECT count(*) FROM gone
"""

_BONUS_BATCHES_SQL = """
WITH doomed AS (
    SELECT id FROM bonus_batches b
     WHERE finish_time < $1
       AND NOT EXISTS (SELECT 1 FROM bonus_results r
                        WHERE r.calculate_time < $1 AND r.batch_pk = b.id)
     ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED),
gone AS (DELETE FROM bonus_batches b USING doomed WHERE b.id = doomed.id RETURNING b.id)
SELECT count(*) FROM gone
"""


async def purge_bonus_history(conn: asyncpg.Connection, *, now: datetime, days: int,
                              chunk: int = CHUNK) -> tuple[int, int, int]:
    """Bonus results calculated, finished requests made and batches finished more than
    ``days`` ago; returns (results, requests, batches) deleted. The ledger stays."""
    cutoff = _cutoff(now, days)
    if cutoff is None:
        return 0, 0, 0
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    results = unapproved = 0
    while True:
        row = await conn.fetchrow(_BONUS_RESULTS_SQL, cutoff, chunk)
        assert row is not None
        results += row["deleted"]
        unapproved += row["unapproved"]
        if row["deleted"] < chunk:
            break
    if unapproved:
        log.warning("purged bonus results that were still waiting for approval",
                    extra={"count": unapproved, "calculated_before": cutoff.isoformat()})
    requests = await _drain(conn, _BONUS_REQUESTS_SQL, cutoff, chunk)
    batches = await _drain(conn, _BONUS_BATCHES_SQL, cutoff, chunk)
    return results, requests, batches


async def purge_all(conn: asyncpg.Connection, policy: RetentionPolicy, *, now: datetime,
                    chunk: int = CHUNK) -> dict[str, int]:
    """Every purge, children before parents (attempts, deliveries, then the events they freed),
    on an autocommit connection. Returns rows deleted per table (every table in TABLES)."""
    attempts = await purge_webhook_attempts(conn, now=now, days=policy.webhook_attempt_days,
                                            chunk=chunk)
    deliveries, with_deliveries = await purge_webhook_deliveries(
        conn, now=now, days=policy.webhook_delivery_days, chunk=chunk)
    events = await purge_webhook_events(conn, now=now, days=policy.webhook_event_days,
                                        chunk=chunk)
    alerts = await purge_code_pool_alerts(conn, now=now, days=policy.webhook_event_days,
                                          chunk=chunk)
    jobs = await purge_outbox_jobs(conn, now=now, days=policy.outbox_job_days, chunk=chunk)
    keys = await purge_idempotency_keys(conn, now=now, days=policy.idempotency_key_days,
                                        chunk=chunk)
    results, requests, batches = await purge_bonus_history(
        conn, now=now, days=policy.bonus_result_days, chunk=chunk)
    return {WEBHOOK_ATTEMPTS: attempts + with_deliveries, WEBHOOK_DELIVERIES: deliveries,
            WEBHOOK_EVENTS: events, CODE_POOL_ALERTS: alerts, OUTBOX_JOBS: jobs,
            IDEMPOTENCY_KEYS: keys, BONUS_RESULTS: results, BONUS_REQUESTS: requests,
            BONUS_BATCHES: batches}
