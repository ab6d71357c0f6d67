"""Run-once semantics for mutating requests, keyed by the client's request id.

The first call with a request id does the work and stores its serialized answer in the same
transaction as the change; a retry finds the row and returns that answer, charging nothing.
Concurrent duplicates queue on the primary key: the second insert waits for the first
transaction and then sees its row (or, if the first rolled back, does the work itself).

A request id is one request for every caller (ids are global: give each service its own
prefix), but its stored answer is replayed only to the caller that made it (the API key's
configured name; a key rotated under the same name keeps its retries). Another caller reusing
the id is REQUEST_ID_REUSED even with the same input: the answer can hold what only the first
caller may see, such as a generated listener secret. Rows stored before migration 0022 have
caller '' and answer a retry from any caller, so an upgrade never fails an in-flight retry.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from core.errors import InvalidArgument
from core.text import nul_problem

MAX_REQUEST_ID_LENGTH = 200

log = logging.getLogger("promo.idempotency")


def validate_request_id(request_id: str) -> str:
    if not request_id or len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidArgument(
            f"request_id is required (1-{MAX_REQUEST_ID_LENGTH} characters); reuse the same id "
            "when retrying a call", reason="INVALID_REQUEST_ID", metadata={"field": "request_id"})
    if (problem := nul_problem(request_id, "request_id")) is not None:
        raise InvalidArgument(problem, reason="INVALID_REQUEST_ID",
                              metadata={"field": "request_id"})
    return request_id


def fingerprint(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()


async def run_once(
    pool: asyncpg.Pool,
    *,
    scope: str,
    caller: str,
    request_id: str,
    request_hash: bytes,
    work: Callable[[asyncpg.Connection], Awaitable[bytes]],
    legacy_hash: bytes | None = None,
    deadlock_attempts: int = 1,
) -> bytes:
    """Do ``work`` in a transaction unless ``request_id`` already ran in ``scope`` (the RPC);
    return the stored answer to the ``caller`` that made it. ``legacy_hash``: another
    fingerprint of the same request that a row stored by an earlier version may hold.
    ``deadlock_attempts``: how many times to run a transaction PostgreSQL aborted to break a
    deadlock; only for a ``work`` whose effects are all inside the transaction."""
    validate_request_id(request_id)
    if not caller:
        raise ValueError("run_once needs the caller's name ('' marks rows from before 0022)")
    for attempt in range(1, deadlock_attempts + 1):
        try:
            return await _run_once(pool, scope, caller, request_id, request_hash, work,
                                   legacy_hash)
        except asyncpg.DeadlockDetectedError:
            # The transaction was rolled back whole (the request id's row included): a ``work``
            # without effects outside it can simply run again.
            if attempt == deadlock_attempts:
                raise
            log.info("request retried after a deadlock",
                     extra={"scope": scope, "attempt": attempt})
    raise AssertionError("unreachable")


async def _run_once(pool: asyncpg.Pool, scope: str, caller: str, request_id: str,
                    request_hash: bytes, work: Callable[[asyncpg.Connection], Awaitable[bytes]],
                    legacy_hash: bytes | None) -> bytes:
    async with pool.acquire() as conn, conn.transaction():
        claimed = await conn.fetchval(
            """INSERT INTO idempotency_keys (scope, request_id, request_hash, caller)
               VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING true""",
            scope, request_id, request_hash, caller)
        if not claimed:
            row = await conn.fetchrow(
                "SELECT request_hash, response, caller FROM idempotency_keys "
                "WHERE scope = $1 AND request_id = $2", scope, request_id)
            assert row is not None
            if row["caller"] not in ("", caller):
                raise InvalidArgument(
                    f"request_id {request_id!r} was already used by another caller; request "
                    "ids are shared by all callers: use a new request_id (e.g. with a prefix "
                    "of your own)", reason="REQUEST_ID_REUSED", metadata={"field": "request_id"})
            if bytes(row["request_hash"]) not in (request_hash, legacy_hash):
                raise InvalidArgument(
                    f"request_id {request_id!r} was already used for a different request; "
                    "use a new request_id for a new request",
                    reason="REQUEST_ID_REUSED", metadata={"field": "request_id"})
            return bytes(row["response"])
        response = await work(conn)
        await conn.execute(
            "UPDATE idempotency_keys SET response = $3 WHERE scope = $1 AND request_id = $2",
            scope, request_id, response)
        return response
