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
| anything else        | INTERNAL (logged with its traceback, never shown to the caller) |
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from core import errors

ERROR_DOMAIN = "promo.engine"

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


def to_status(code: grpc.StatusCode, message: str, reason: str,
              metadata: dict[str, str] | None = None) -> grpc.Status:
    """A grpc.Status whose details carry ErrorInfo(reason, domain, metadata)."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN,
                                       metadata=metadata or {})
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
