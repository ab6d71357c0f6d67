"""Customer activity events in PostgreSQL: batch ingestion and the per-customer list.

Ingestion of a batch is one binary COPY into a temporary table and one INSERT ... SELECT that
checks for unknown customers, creates them when asked, and inserts the events with
``ON CONFLICT (external_id) DO NOTHING`` (a retried batch adds nothing twice; an external id
already stored for an event with other content is reported, and the caller rolls back). Measured for
10,000 events against a single ``INSERT ... SELECT FROM unnest($1::text[], ...)``: median 221 ms
vs 296 ms for new events, 85 ms vs 138 ms for an all-duplicate retry (the arrays cost more to
encode and unnest than the binary COPY stream).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import asyncpg

from core.customers import Event

_STAGE = "promo_events_in"
# IF NOT EXISTS + TRUNCATE: a second batch in the same transaction reuses the table.
_CREATE_STAGE = f"""
CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGE} (
    external_id text, customer_id text, kind text, amount numeric,
    currency text, occurred_at timestamptz, attributes text
) ON COMMIT DROP;
TRUNCATE pg_temp.{_STAGE}"""
_STAGE_COLUMNS = ("external_id", "customer_id", "kind", "amount", "currency",
                  "occurred_at", "attributes")

# $1: create missing customers. The data-modifying CTEs share one snapshot and the foreign key
# checks run at the end of the statement, so events may reference customers created by it.
# Rows go in sorted by key (external_id, customer_id): concurrent batches that overlap (a retry
# racing its original, in another order) then wait for each other instead of deadlocking.
_INSERT = f"""
WITH missing AS (
    SELECT DISTINCT s.customer_id FROM pg_temp.{_STAGE} s
     WHERE NOT EXISTS (SELECT 1 FROM customers c WHERE c.customer_id = s.customer_id)
), created AS (
    INSERT INTO customers (customer_id)
    SELECT customer_id FROM missing WHERE $1 ORDER BY customer_id
    ON CONFLICT (customer_id) DO NOTHING
    RETURNING 1
), inserted AS (
    INSERT INTO events (external_id, customer_id, kind, amount, currency, occurred_at, attributes)
    SELECT s.external_id, s.customer_id, s.kind, s.amount, s.currency, s.occurred_at,
           s.attributes::jsonb
      FROM pg_temp.{_STAGE} s
     WHERE $1 OR NOT EXISTS (SELECT 1 FROM missing)
     ORDER BY s.external_id
    ON CONFLICT (external_id) DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM inserted) AS inserted,
       (SELECT count(*) FROM created) AS created,
       CASE WHEN $1 THEN '{{}}'::text[]
            ELSE (SELECT coalesce(array_agg(customer_id), '{{}}') FROM missing) END AS missing
"""

_COLUMNS = ("id, external_id, customer_id, kind, amount, currency, occurred_at, attributes, "
            "record_time")


# The stored events that share an external id with a staged event but not its content: a
# "retry" that is really another event. Read only when some staged event was not inserted.
_CONFLICTS = f"""
SELECT s.external_id, e.customer_id, e.kind, e.amount, e.currency, e.occurred_at
  FROM pg_temp.{_STAGE} s JOIN events e ON e.external_id = s.external_id
 WHERE (e.customer_id, e.kind, e.amount, e.currency, e.occurred_at, e.attributes)
       IS DISTINCT FROM (s.customer_id, s.kind, s.amount, s.currency, s.occurred_at,
                         s.attributes::jsonb)
 ORDER BY s.external_id
"""


@dataclass(frozen=True)
class StoredConflict:
    """An event already stored under an external id the batch reuses for different content."""

    external_id: str
    customer_id: str
    kind: str
    amount: Decimal
    currency: str
    occurred_at: datetime


@dataclass(frozen=True)
class InsertOutcome:
    inserted: int
    duplicates: int
    created_customers: int
    # Unknown customers when create_missing was false; then nothing was inserted.
    missing_customers: frozenset[str]
    # External ids already stored with other content; the caller must roll back.
    conflicts: tuple[StoredConflict, ...] = ()


async def insert_batch(conn: asyncpg.Connection, events: Sequence[Event], *,
                       create_missing: bool) -> InsertOutcome:
    """Insert ``events`` (already validated, external ids unique within the batch).

    Must run inside the caller's transaction: the staging table lives until its COMMIT, and an
    outcome with missing customers must be followed by a rollback (the caller raises)."""
    if not conn.is_in_transaction():
        raise RuntimeError("insert_batch needs a transaction (the staging table is ON COMMIT "
                           "DROP)")
    await conn.execute(_CREATE_STAGE)
    await conn.copy_records_to_table(
        _STAGE, columns=_STAGE_COLUMNS,
        records=[(e.external_id, e.customer_id, e.kind, e.amount, e.currency, e.occurred_at,
                  json.dumps(dict(e.attributes), sort_keys=True)) for e in events])
    row = await conn.fetchrow(_INSERT, create_missing)
    assert row is not None
    inserted = int(row["inserted"])
    conflicts: tuple[StoredConflict, ...] = ()
    if inserted < len(events) and not row["missing"]:
        conflicts = tuple(StoredConflict(*r) for r in await conn.fetch(_CONFLICTS))
    return InsertOutcome(inserted=inserted, duplicates=len(events) - inserted,
                         created_customers=int(row["created"]),
                         missing_customers=frozenset(row["missing"]), conflicts=conflicts)


def _from_row(row: asyncpg.Record) -> Event:
    return Event(event_id=row["id"], external_id=row["external_id"],
                 customer_id=row["customer_id"], kind=row["kind"], amount=row["amount"],
                 currency=row["currency"], occurred_at=row["occurred_at"],
                 attributes=row["attributes"], record_time=row["record_time"])


async def list_for_customer(conn: asyncpg.Connection, customer_id: str, *,
                            kinds: Sequence[str], before: tuple[datetime, int] | None,
                            limit: int) -> list[Event]:
    """Newest first (occurred_at, then id, descending), strictly before ``before``; a backward
    walk of the (customer_id, occurred_at, id) index."""
    if before is None:
        rows = await conn.fetch(
            f"""SELECT {_COLUMNS} FROM events
                 WHERE customer_id = $1 AND (cardinality($2::text[]) = 0 OR kind = ANY($2))
                 ORDER BY occurred_at DESC, id DESC LIMIT $3""",
            customer_id, list(kinds), limit)
    else:
        rows = await conn.fetch(
            f"""SELECT {_COLUMNS} FROM events
                 WHERE customer_id = $1 AND (cardinality($2::text[]) = 0 OR kind = ANY($2))
                   AND (occurred_at, id) < ($3, $4)
                 ORDER BY occurred_at DESC, id DESC LIMIT $5""",
            customer_id, list(kinds), before[0], before[1], limit)
    return [_from_row(row) for row in rows]


async def count_for_customer(conn: asyncpg.Connection, customer_id: str) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM events WHERE customer_id = $1",
                                   customer_id))
