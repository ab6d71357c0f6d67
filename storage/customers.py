"""Customers in PostgreSQL.

Properties are jsonb with typed values: text as JSON strings, decimals as JSON numbers (jsonb
keeps numbers as exact numerics), flags as JSON booleans. They are written and read as JSON text
here rather than through the pool's jsonb codec, because that codec's ``json`` module would turn
numbers into floats.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

import asyncpg

from core.customers import Customer, PropertyValue
from core.errors import NotFound

_COLUMNS = ("customer_id, time_zone, currency, properties::text AS properties, create_time, "
            "update_time")


def encode_properties(properties: Mapping[str, PropertyValue]) -> str:
    """JSON text with decimals as exact JSON numbers (``json.dumps`` cannot write Decimal)."""
    parts = []
    for name in sorted(properties):
        value = properties[name]
        if isinstance(value, bool):
            encoded = "true" if value else "false"
        elif isinstance(value, Decimal):
            encoded = format(value, "f")
        else:
            encoded = json.dumps(value)
        parts.append(f"{json.dumps(name)}: {encoded}")
    return "{" + ", ".join(parts) + "}"


def decode_properties(text: str) -> dict[str, PropertyValue]:
    return dict(json.loads(text, parse_float=Decimal, parse_int=Decimal))


def _from_row(row: asyncpg.Record) -> Customer:
    return Customer(customer_id=row["customer_id"], time_zone=row["time_zone"],
                    currency=row["currency"], properties=decode_properties(row["properties"]),
                    create_time=row["create_time"], update_time=row["update_time"])


@dataclass(frozen=True)
class UpsertOutcome:
    created: int
    updated: int


async def upsert(conn: asyncpg.Connection, customers: Sequence[Customer]) -> UpsertOutcome:
    """Create or fully replace ``customers`` in one statement (arrays, not one row per call).

    Rows go in sorted by customer_id so that overlapping concurrent batches queue instead of
    deadlocking. ``xmax = 0`` tells a freshly inserted row from one the ON CONFLICT branch
    updated."""
    rows = await conn.fetch(
        """INSERT INTO customers AS c (customer_id, time_zone, currency, properties)
           SELECT t.customer_id, t.time_zone, t.currency, t.properties::jsonb
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                  AS t(customer_id, time_zone, currency, properties)
            ORDER BY t.customer_id
           ON CONFLICT (customer_id) DO UPDATE
              SET time_zone = EXCLUDED.time_zone, currency = EXCLUDED.currency,
                  properties = EXCLUDED.properties, update_time = now()
           RETURNING (c.xmax = 0) AS created""",
        [c.customer_id for c in customers], [c.time_zone for c in customers],
        [c.currency for c in customers], [encode_properties(c.properties) for c in customers])
    created = sum(1 for row in rows if row["created"])
    return UpsertOutcome(created=created, updated=len(rows) - created)


async def get(conn: asyncpg.Connection, customer_id: str) -> Customer:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM customers WHERE customer_id = $1",
                              customer_id)
    if row is None:
        raise NotFound(f"no customer with customer_id {customer_id!r}",
                       reason="CUSTOMER_NOT_FOUND", metadata={"customer_id": customer_id})
    return _from_row(row)


async def list_page(conn: asyncpg.Connection, *, after_id: str | None,
                    limit: int) -> list[Customer]:
    """Up to ``limit`` customers ordered by customer_id, strictly after ``after_id``."""
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM customers
             WHERE $1::text IS NULL OR customer_id > $1 ORDER BY customer_id LIMIT $2""",
        after_id, limit)
    return [_from_row(row) for row in rows]


async def missing(conn: asyncpg.Connection, customer_ids: Iterable[str]) -> set[str]:
    """Which of ``customer_ids`` do not exist."""
    rows = await conn.fetch(
        """SELECT DISTINCT t.id FROM unnest($1::text[]) AS t(id)
            WHERE NOT EXISTS (SELECT 1 FROM customers c WHERE c.customer_id = t.id)""",
        list(customer_ids))
    return {row["id"] for row in rows}
