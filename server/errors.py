"""The one place that turns domain errors into gRPC statuses with a google.rpc ErrorInfo.

| domain error         | gRPC code           |
|----------------------|---------------------|
| InvalidArgument      | INVALID_ARGUMENT    |
| NotFound             | NOT_FOUND           |
| AlreadyExists        | ALREADY_EXISTS      |
| FailedPrecondition   | FAILED_PRECONDITION |
| PermissionDenied     | PERMISSION_DENIED   |
| Unauthenticated      | UNAUTHENTICATED     |
| ResourceExhausted    | RESOURCE_EXHAUSTED  |
| Aborted              | ABORTED             |
| database unreachable | UNAVAILABLE (DATABASE_UNAVAILABLE; logged without a traceback) |
| database timed out   | UNAVAILABLE (DATABASE_TIMEOUT; a statement over the command timeout) |
| anything else        | INTERNAL (logged with its traceback, never shown to the caller) |

Two safety nets apply to every RPC. A NUL character (U+0000) that reaches PostgreSQL (which no
text can hold) is the caller's bad input, not a crash: the request is searched for it and the
call is INVALID_ARGUMENT INVALID_TEXT naming the field. And a status is kept small: messages and
ErrorInfo metadata that echo a caller's value (a 10,000-character id, 2,000 emoji) are cut by
their encoded size, so the trailers stay under gRPC's default 8 KiB metadata limit and the client
sees the ErrorInfo, not RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import errno
import socket

import grpc
from asyncpg.exceptions import (
    AdminShutdownError,
    CannotConnectNowError,
    CharacterNotInRepertoireError,
    CrashShutdownError,
    PostgresConnectionError,
    QueryCanceledError,
    TooManyConnectionsError,
    UntranslatableCharacterError,
)
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from core import errors
from core.text import NUL

ERROR_DOMAIN = "promo.engine"

# PostgreSQL could not be reached or went away mid-call (refused, reset, restarting, shut down,
# out of connections): a transient condition that clients retry (UNAVAILABLE), not a bug.
_DATABASE_UNREACHABLE = (ConnectionError, socket.gaierror, PostgresConnectionError,
                         CannotConnectNowError, AdminShutdownError, CrashShutdownError,
                         TooManyConnectionsError)
_UNREACHABLE_ERRNOS = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN})
DATABASE_UNAVAILABLE_MESSAGE = ("the database is unreachable; retry later with the same "
                                "request_id (a retry never applies a change twice)")


def database_unreachable(exc: BaseException) -> bool:
    """True for the errors of a PostgreSQL outage. Redis is never on a call's path (queueing
    after commit is best effort), so a ConnectionError here is the database's."""
    return isinstance(exc, _DATABASE_UNREACHABLE) or (
        isinstance(exc, OSError) and exc.errno in _UNREACHABLE_ERRNOS)


INTERNAL_MESSAGE = "internal error; the server log has the details for this request id"
DATABASE_TIMEOUT_MESSAGE = ("the database did not answer in time (overloaded, or a lock is "
                            "held); retry later with the same request_id (a retry never "
                            "applies a change twice)")


def database_timed_out(exc: BaseException) -> bool:
    """True for a statement over PROMO_DB_COMMAND_TIMEOUT_SECONDS (asyncpg's client-side
    timeout, or PostgreSQL cancelling it): its transaction is rolled back, so the caller may
    retry (UNAVAILABLE DATABASE_TIMEOUT), unlike a bug (INTERNAL). Handlers have no other
    timeouts on a call's path."""
    return isinstance(exc, TimeoutError | QueryCanceledError)

_CODES: dict[type[errors.DomainError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Aborted: grpc.StatusCode.ABORTED,
}


def status_code_for(error: errors.DomainError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in _CODES:
            return _CODES[cls]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


# The message travels twice: in grpc-message, percent-encoded (a byte outside printable ASCII
# costs 3 characters there, so an emoji costs 12), and inside grpc-status-details-bin (base64 of
# its UTF-8). Both are cut by that encoded cost, not by characters: 2,000 characters of emoji
# would be 24 KB, past the 16 KiB a client accepts at all (and 8 KiB, past which it may refuse
# at random). At these limits the trailers stay under 8 KiB with a few metadata entries.
MAX_MESSAGE_COST = 2000
MAX_METADATA_VALUE_COST = 200


_SHORTENED = "... (shortened)"


def _cost(char: str) -> int:
    """What ``char`` costs in grpc-message: printable ASCII as is, anything else %XX per byte."""
    return 1 if " " <= char <= "~" else 3 * len(char.encode("utf-8", "surrogatepass"))


def _cut(text: str, limit: int) -> str:
    """``text`` if its encoded cost is within ``limit``, else its longest prefix that is, with
    a marker saying so (the marker included in the limit)."""
    if len(text) <= limit and text.isascii() and text.isprintable():
        return text
    costs = [_cost(c) for c in text]
    if sum(costs) <= limit:
        return text
    budget, end = limit - len(_SHORTENED), 0
    for cost in costs:
        if cost > budget:
            break
        budget -= cost
        end += 1
    return text[:end] + _SHORTENED


def to_status(code: grpc.StatusCode, message: str, reason: str,
              metadata: dict[str, str] | None = None) -> grpc.Status:
    """A grpc.Status whose details carry ErrorInfo(reason, domain, metadata), cut to size."""
    message = _cut(message, MAX_MESSAGE_COST)
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata={
        _cut(k, MAX_METADATA_VALUE_COST): _cut(v, MAX_METADATA_VALUE_COST)
        for k, v in (metadata or {}).items()})
    detail = any_pb2.Any()
    detail.Pack(info)
    proto = status_pb2.Status(code=getattr(code_pb2, code.name), message=message,
                              details=[detail])
    return rpc_status.to_status(proto)


def domain_status(error: errors.DomainError) -> grpc.Status:
    return to_status(status_code_for(error), error.message, error.reason, error.metadata)


def error_info_of(exc: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """For clients and tests: the ErrorInfo carried by a failed call, if any."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def nul_field(message: Message, prefix: str = "") -> str | None:
    """The path of the first string in ``message`` (nested messages, repeated fields and maps
    included) that holds a NUL character, e.g. ``listener.url`` or ``customer_ids[3]``."""
    for descriptor, value in message.ListFields():
        name = f"{prefix}{descriptor.name}"
        found: str | None
        if isinstance(value, (str, Message)):
            found = _nul_in(value, name)
        elif isinstance(value, (bytes, bool, int, float)):
            found = None
        elif hasattr(value, "items"):  # a map field
            found = None
            for key, item in value.items():
                path = f"{name}[{key!r}]"
                found = path if isinstance(key, str) and NUL in key else _nul_in(item, path)
                if found is not None:
                    break
        else:  # a repeated field
            found = next((path for index, item in enumerate(value)
                          if (path := _nul_in(item, f"{name}[{index}]")) is not None), None)
        if found is not None:
            return found
    return None


def _nul_in(value: object, path: str) -> str | None:
    if isinstance(value, str):
        return path if NUL in value else None
    if isinstance(value, Message):
        return nul_field(value, f"{path}.")
    return None


def stored_text_error(exc: BaseException, request: object) -> errors.InvalidArgument | None:
    """The caller's error behind a database refusal of a NUL character, or None when ``exc``
    is something else (or the NUL is not in the request)."""
    # Text columns refuse it as CharacterNotInRepertoire, jsonb (properties, stored formulas)
    # as UntranslatableCharacter ("\u0000 cannot be converted to text").
    refused = (CharacterNotInRepertoireError, UntranslatableCharacterError)
    if not isinstance(exc, refused) or not isinstance(request, Message):
        return None
    path = nul_field(request)
    if path is None:
        return None
    return errors.InvalidArgument(
        f"{path} must not contain the NUL character (U+0000): it cannot be stored",
        reason="INVALID_TEXT", metadata={"field": path})
