"""Domain errors: the one exception tree every layer raises and the server maps to gRPC.

Each error carries a machine-readable ``reason`` (UPPER_SNAKE_CASE, stable, used as the
google.rpc ``ErrorInfo.reason``), a message a person can act on, and optional string
``metadata`` (for example ``line`` and ``column`` of a formula error). The class decides the
gRPC status code; the mapping table lives in ``server/errors.py`` and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping


class DomainError(Exception):
    """Base of every error the domain raises on purpose."""

    default_reason = "DOMAIN_ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = {k: str(v) for k, v in (metadata or {}).items()}

    def __str__(self) -> str:
        return self.message


class InvalidArgument(DomainError):
    """The request itself is malformed: fixing the input fixes the call."""

    default_reason = "INVALID_ARGUMENT"


class NotFound(DomainError):
    """A referenced entity does not exist."""

    default_reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    """A unique name or code is taken."""

    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    """The request is well-formed but the system is not in a state that allows it."""

    default_reason = "FAILED_PRECONDITION"


class PermissionDenied(DomainError):
    """The caller is known but may not do this."""

    default_reason = "PERMISSION_DENIED"


class Unauthenticated(DomainError):
    """The caller could not be identified."""

    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(DomainError):
    """A limit on the request's size or rate was hit."""

    default_reason = "RESOURCE_EXHAUSTED"


class Aborted(DomainError):
    """A concurrency conflict; the caller may retry the same request."""

    default_reason = "ABORTED"
