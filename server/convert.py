"""Small wire-format helpers shared by the servicers (timestamps, decimals, enums)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from core.errors import InvalidArgument
from server.auth import current_principal
from storage.idempotency import fingerprint, run_once


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


# The range google.protobuf.Timestamp allows (0001-01-01 .. 9999-12-31T23:59:59Z); outside it
# (or with nanos outside [0, 1e9)) ToDatetime raises, which would surface as INTERNAL. Its two
# ends are refused too: asyncpg stores datetime.min and datetime.max as PostgreSQL's -infinity
# and infinity and reads them back without a time zone, which later comparisons crash on.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799
TIMESTAMP_RANGE = ("it must lie strictly between 0001-01-01T00:00:00Z and "
                   "9999-12-31T23:59:59.999999Z")


def timestamp_problem(value: timestamp_pb2.Timestamp) -> str | None:
    """Why ``value`` is no time this service can store, or None when it is one."""
    in_range = _MIN_SECONDS <= value.seconds <= _MAX_SECONDS
    if (not in_range or not 0 <= value.nanos < 1_000_000_000
            or value.ToDatetime() in (datetime.min, datetime.max)):  # naive, as these
        return (f"seconds={value.seconds}, nanos={value.nanos} is not a valid timestamp; "
                f"{TIMESTAMP_RANGE}")
    return None


def read_timestamp(value: timestamp_pb2.Timestamp, field: str) -> datetime:
    """A request's Timestamp as an aware UTC datetime; one out of range is the caller's mistake
    (INVALID_ARGUMENT INVALID_TIME naming the field), not a server crash."""
    if (problem := timestamp_problem(value)) is not None:
        raise InvalidArgument(f"{field}: {problem}", reason="INVALID_TIME",
                              metadata={"field": field})
    return value.ToDatetime(UTC)


def required_id(value: str, field: str) -> str:
    """An id the call names: empty is INVALID_ARGUMENT MISSING_FIELD, not NOT_FOUND "no such
    ''" (nothing can have an empty id, so the caller forgot the field). List filters are not
    checked with this: there an empty id means "all"."""
    if not value:
        raise InvalidArgument(f"{field} is required", reason="MISSING_FIELD",
                              metadata={"field": field})
    return value


def request_fingerprint(request: Message) -> bytes:
    """Hash of the request without its request_id: what must match on a retry."""
    copy = type(request)()
    copy.CopyFrom(request)
    if "request_id" in copy.DESCRIPTOR.fields_by_name:
        copy.ClearField("request_id")  # type: ignore[arg-type]
    return fingerprint(copy.SerializeToString(deterministic=True))


async def run_request_once(pool: asyncpg.Pool, scope: str, request: Message,
                           work: Callable[[asyncpg.Connection], Awaitable[bytes]], *,
                           request_hash: bytes | None = None,
                           legacy_hash: bytes | None = None,
                           deadlock_attempts: int = 1) -> bytes:
    """Run a mutating request's ``work`` once per request_id; its answer is replayed only to
    the API key name that made it (see storage.idempotency). ``request_hash``: a fingerprint
    of the caller's own (server.secret_fingerprint), ``legacy_hash`` the one rows stored
    before it hold."""
    return await run_once(pool, scope=scope, caller=current_principal.get().name,
                          request_id=request.request_id,  # type: ignore[attr-defined]
                          request_hash=request_hash or request_fingerprint(request),
                          legacy_hash=legacy_hash, work=work,
                          deadlock_attempts=deadlock_attempts)
