"""Listener signing secrets at rest: the purpose they are sealed for, and the re-seal pass.

Why a purpose shared by ``secret`` and ``previous_secret``: a rotation moves the current value
into ``previous_secret`` in SQL (storage.webhooks.update_listener), sealed as it is, so both
columns must open under the same associated data. It still keeps a listener secret from
opening anywhere a value of another use is read.

The re-seal pass (``promo secrets reseal``) brings every row under the first configured key, so
an old key can be dropped: rows go in id order, in batches, each batch in its own transaction
with its rows locked FOR UPDATE (an UpdateListener that rotates a secret locks the row too, so
the two never overwrite each other). A row already sealed with the first key is left alone, so
running it again changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import asyncpg

from core.secret_box import SecretBox, SecretBoxError

LISTENER_SECRET_PURPOSE = b"webhook_listeners.secret"
DEFAULT_BATCH_SIZE = 500

log = logging.getLogger("promo.secrets")


@dataclass(frozen=True)
class Unreadable:
    """A stored secret the configured keys cannot open (its key id is in ``error``)."""

    listener_id: int
    column: str
    error: str


@dataclass
class ResealResult:
    changed: int = 0  # listener rows rewritten (either column)
    unchanged: int = 0  # rows already under the first key (or with nothing to seal)
    unreadable: list[Unreadable] = field(default_factory=list)


def _resealed(box: SecretBox, value: str | None) -> str | None:
    """The value sealed with the first key; empty and NULL stay so (e-mail listeners have an
    empty secret, a never-rotated listener no previous one)."""
    if not value:
        return value
    return box.reseal(value, purpose=LISTENER_SECRET_PURPOSE)


def _reseal_row(box: SecretBox, row: asyncpg.Record,
                result: ResealResult) -> tuple[str, str | None] | None:
    """(secret, previous_secret) under the first key, or None (recorded in ``result``) when
    one of them cannot be opened."""
    fresh: list[str | None] = []
    for column in ("secret", "previous_secret"):
        try:
            fresh.append(_resealed(box, row[column]))
        except SecretBoxError as exc:
            result.unreadable.append(Unreadable(row["id"], column, str(exc)))
            log.error("listener secret cannot be re-sealed; left as it is", extra={
                "listener_id": row["id"], "column": column, "error": str(exc)})
            return None
    secret, previous = fresh
    assert secret is not None  # the column is NOT NULL
    return secret, previous


async def reseal_listener_secrets(conn: asyncpg.Connection, box: SecretBox, *,
                                  batch_size: int = DEFAULT_BATCH_SIZE) -> ResealResult:
    """Re-seal every listener's secret and previous_secret under ``box``'s first key.

    A row with a value no configured key opens is left as it is and reported in
    ``unreadable`` (the others still move on). Raises SecretBoxError when ``box`` has no key.
    """
    if not box.sealing:
        raise SecretBoxError("no encryption key is configured (PROMO_SECRET_ENCRYPTION_KEYS): "
                             "nothing to seal with")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    result = ResealResult()
    after = 0
    while True:
        async with conn.transaction():
            rows = await conn.fetch(
                """SELECT id, secret, previous_secret FROM webhook_listeners
                    WHERE id > $1 ORDER BY id LIMIT $2 FOR UPDATE""", after, batch_size)
            if not rows:
                break
            after = rows[-1]["id"]
            ids: list[int] = []
            secrets: list[str] = []
            previous: list[str | None] = []
            for row in rows:
                fresh = _reseal_row(box, row, result)
                if fresh is None:
                    continue
                if fresh == (row["secret"], row["previous_secret"]):
                    result.unchanged += 1
                    continue
                ids.append(row["id"])
                secrets.append(fresh[0])
                previous.append(fresh[1])
            if ids:
                await conn.execute(
                    """UPDATE webhook_listeners l SET secret = n.secret,
                              previous_secret = n.previous_secret
                         FROM unnest($1::bigint[], $2::text[], $3::text[])
                              AS n(id, secret, previous_secret)
                        WHERE l.id = n.id""", ids, secrets, previous)
                result.changed += len(ids)
        if len(rows) < batch_size:
            break
    log.info("listener secrets re-sealed", extra={
        "key_id": box.current_key_id, "changed": result.changed, "unchanged": result.unchanged,
        "unreadable": len(result.unreadable)})
    return result
