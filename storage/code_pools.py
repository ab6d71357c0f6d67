"""Pools of personalized promo codes: uploads, inventory, thresholds and their alerts.

Codes are allocated inside promo_grant (migration 0012): the pool's counter row says how many
codes went out, the next one is the code with the next ordinal. This module writes the pools:
an upload adds codes with the ordinals after the current total (uploads of one pool take turns
under an advisory lock; grants never wait for an upload except for its final counter update),
and the thresholds follow the promotion's settings. Alerts are rows raised in the transaction
that caused them; ``dispatch_alerts`` turns them into events for the listeners.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from core.catalogue.promotions import Promotion
from core.codes import CodeFile, CodeFileRejected, CodeType, Inventory, LineError
from core.events import EventType
from storage.webhooks import emit_event

ALERT_EVENT_TYPES = {"THRESHOLD": EventType.CODE_POOL_THRESHOLD,
                     "DEPLETED": EventType.CODE_POOL_DEPLETED,
                     "FALLBACK_ACTIVE": EventType.FALLBACK_CODE_ACTIVE}
DEPLETED_KEY = "depleted"
DISPATCH_BATCH = 100


@dataclass(frozen=True)
class Upload:
    upload_id: int
    codes: int
    bytes: int
    uploaded_at: datetime


def _upload_lock_key(promotion_id: int) -> int:
    """A 64-bit advisory lock key for one pool's uploads."""
    digest = hashlib.blake2b(f"promo-code-upload/{promotion_id}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


async def sync_pool(conn: asyncpg.Connection, promotion_id: int, promotion: Promotion,
                    now: datetime) -> int:
    """Give a PERSONALIZED promotion its pool row and its thresholds as configured (an
    unchanged threshold keeps its armed state; a new one that is already breached alerts
    once). Returns the number of alerts raised. Does nothing for other code types."""
    if promotion.code_type is not CodeType.PERSONALIZED:
        return 0
    await conn.execute(
        """INSERT INTO code_pools (promotion_id, updated_at) VALUES ($1, $2)
           ON CONFLICT (promotion_id) DO NOTHING""", promotion_id, now)
    keys = [DEPLETED_KEY, *(t.key for t in promotion.code_alerts)]
    await conn.execute(
        "DELETE FROM code_pool_thresholds WHERE promotion_id = $1 AND NOT (key = ANY($2::text[]))",
        promotion_id, keys)
    await conn.executemany(
        """INSERT INTO code_pool_thresholds (promotion_id, key, kind, remaining_codes,
                                             remaining_percent)
           VALUES ($1, $2, $3, $4, $5) ON CONFLICT (promotion_id, key) DO NOTHING""",
        [(promotion_id, DEPLETED_KEY, "DEPLETED", 0, None),
         *((promotion_id, t.key, "THRESHOLD", t.remaining_codes, t.remaining_percent)
           for t in promotion.code_alerts)])
    raised: int = await conn.fetchval("SELECT promo_code_pool_check($1, $2)", promotion_id, now)
    return raised


async def add_codes(conn: asyncpg.Connection, promotion_id: int, codes: CodeFile, *,
                    size: int, now: datetime, fallback_code: str = "") -> tuple[int, int]:
    """Add an accepted file's codes after the pool's current total, in one COPY; a code that
    is already in the pool, or is the promotion's ``fallback_code``, rejects the whole file
    (CodeFileRejected with its lines). Call in a transaction. Returns (upload id, alerts
    raised)."""
    if fallback_code and fallback_code in codes.codes:
        # A grant is told apart as a fallback by its code (storage.promotions): a personal code
        # equal to the shared one would be reported as a fallback, and handed out twice.
        raise CodeFileRejected([
            LineError(line, f"code {code!r} is the promotion's fallback code (given once the "
                            "pool is empty); a personal code must differ from it")
            for code, line in zip(codes.codes, codes.line_numbers(), strict=True)
            if code == fallback_code])
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _upload_lock_key(promotion_id))
    total = await conn.fetchval("SELECT total FROM code_pools WHERE promotion_id = $1",
                                promotion_id)
    assert total is not None, "sync_pool creates the pool of a PERSONALIZED promotion"
    upload_id = await conn.fetchval(
        """INSERT INTO code_uploads (promotion_id, codes, bytes, first_ordinal, uploaded_at)
           VALUES ($1, $2, $3, $4, $5) RETURNING id""",
        promotion_id, len(codes.codes), size, total + 1, now)
    try:
        async with conn.transaction():  # a savepoint: on a duplicate, find which lines
            await conn.copy_records_to_table(
                "promo_codes", columns=("promotion_id", "ordinal", "code", "upload_id"),
                records=((promotion_id, total + i, code, upload_id)
                         for i, code in enumerate(codes.codes, start=1)))
    except asyncpg.UniqueViolationError:
        await _reject_duplicates(conn, promotion_id, codes)
        raise
    await conn.execute(
        """UPDATE code_pools SET total = total + $2, uploads = uploads + 1, updated_at = $3
            WHERE promotion_id = $1""", promotion_id, len(codes.codes), now)
    raised: int = await conn.fetchval("SELECT promo_code_pool_check($1, $2)", promotion_id, now)
    return upload_id, raised


async def _reject_duplicates(conn: asyncpg.Connection, promotion_id: int,
                             codes: CodeFile) -> None:
    rows = await conn.fetch(
        "SELECT code FROM promo_codes WHERE promotion_id = $1 AND code = ANY($2::text[])",
        promotion_id, codes.codes)
    existing = {row["code"] for row in rows}
    if not existing:
        return
    errors = [LineError(line, f"code {code!r} is already in the pool")
              for code, line in zip(codes.codes, codes.line_numbers(), strict=True)
              if code in existing]
    raise CodeFileRejected(errors)


async def inventory(conn: asyncpg.Connection, promotion_id: int) -> Inventory | None:
    row = await conn.fetchrow(
        "SELECT total, allocated, fallback_grants FROM code_pools WHERE promotion_id = $1",
        promotion_id)
    if row is None:
        return None
    return Inventory(total=row["total"], used=row["allocated"],
                     fallback_grants=row["fallback_grants"])


async def uploads(conn: asyncpg.Connection, promotion_id: int, *, limit: int = 100
                  ) -> list[Upload]:
    rows = await conn.fetch(
        """SELECT id, codes, bytes, uploaded_at FROM code_uploads WHERE promotion_id = $1
            ORDER BY id DESC LIMIT $2""", promotion_id, limit)
    return [Upload(r["id"], r["codes"], r["bytes"], r["uploaded_at"]) for r in rows]


def _threshold_as_configured(key: str) -> str:
    """'remaining:500' -> '500', 'percent:10' -> '10%' (docs/webhooks.md)."""
    kind, _, value = key.partition(":")
    return f"{value}%" if kind == "percent" else value


def _alert_payload(row: asyncpg.Record) -> dict[str, Any]:
    """The event's data as docs/webhooks.md lists it for types 101-103."""
    payload: dict[str, Any] = {
        "promotion_code": row["promotion_code"], "alert": row["kind"],
        "remaining": row["remaining"], "total": row["total"],
        "used": row["total"] - row["remaining"], "raised_at": row["raised_at"]}
    if row["kind"] == "THRESHOLD":
        payload["threshold"] = _threshold_as_configured(row["threshold_key"])
        payload["level"] = row["level"]
    elif row["kind"] == "DEPLETED":
        payload["fallback_code_active"] = bool(row["fallback_code"])
        payload["promotion_paused"] = not row["fallback_code"]
    else:
        payload["fallback_code"] = row["fallback_code"]
    return payload


async def dispatch_alerts(conn: asyncpg.Connection, now: datetime) -> list[int]:
    """Turn raised alerts into events (one per alert, deduplicated by alert id) and mark them
    emitted. Call in a transaction; returns the outbox job ids to queue after commit. Several
    dispatchers at once each take different alerts (SKIP LOCKED)."""
    rows = await conn.fetch(
        """SELECT a.id, a.kind, a.threshold_key, a.level, a.remaining, a.total, a.raised_at,
                  p.code AS promotion_code, p.fallback_code
             FROM code_pool_alerts a JOIN promotions p ON p.id = a.promotion_id
            WHERE a.emitted_at IS NULL
            ORDER BY a.id LIMIT $1 FOR UPDATE OF a SKIP LOCKED""", DISPATCH_BATCH)
    job_ids: list[int] = []
    for row in rows:
        emitted = await emit_event(conn, event_type=ALERT_EVENT_TYPES[row["kind"]],
                                   payload=_alert_payload(row), now=now,
                                   dedup_key=f"code-pool-alert/{row['id']}")
        if emitted is not None:
            job_ids.extend(emitted.outbox_job_ids)
    if rows:
        await conn.execute("UPDATE code_pool_alerts SET emitted_at = $2 WHERE id = ANY($1)",
                           [row["id"] for row in rows], now)
    return job_ids
