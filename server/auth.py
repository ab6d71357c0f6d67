"""API-key authentication and role checks.

Keys come from settings as SHA-256 hashes; a presented key is hashed and looked up, so the
plain key is never stored or logged. Each RPC names the roles that may call it (the ``ROLES``
table of each servicer module); ``admin`` may call everything. Health checking and reflection
are open: they reveal only service names and serving state, and load balancers and grpcurl need
them without credentials.
"""

from __future__ import annotations

import contextvars
import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from config.settings import ApiKeyConfig, hash_api_key
from core.errors import PermissionDenied, Unauthenticated

PUBLIC_SERVICE_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's configured name (safe to log) and its roles."""

    name: str
    roles: frozenset[str]


ANONYMOUS = Principal(name="anonymous", roles=frozenset())

# The authenticated caller of the RPC being served (set by the interceptor).
current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "promo_principal", default=ANONYMOUS)


class Authenticator:
    def __init__(self, keys: Sequence[ApiKeyConfig],
                 method_roles: Mapping[str, Iterable[str]]) -> None:
        self._by_hash = {k.key_sha256: Principal(k.name, frozenset(k.roles)) for k in keys}
        self._method_roles = {m: frozenset(r) for m, r in method_roles.items()}

    @staticmethod
    def is_public(method: str) -> bool:
        return method.startswith(PUBLIC_SERVICE_PREFIXES)

    @staticmethod
    def presented_key(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
        """The key from ``x-api-key: KEY`` or ``authorization: Bearer KEY``."""
        for name, value in metadata:
            if name not in ("x-api-key", "authorization"):
                continue  # other headers (binary "-bin" ones included) are not read here
            if isinstance(value, bytes):
                try:
                    value = value.decode()
                except UnicodeDecodeError:
                    return None  # no key this server could have issued: UNAUTHENTICATED
            if name == "x-api-key":
                return value.strip()
            if value.lower().startswith("bearer "):
                return value[7:].strip()
        return None

    def authenticate(self, key: str | None) -> Principal:
        if not key:
            raise Unauthenticated(
                "missing API key: send it as 'x-api-key: <key>' or 'authorization: Bearer <key>'",
                reason="MISSING_API_KEY")
        digest = hash_api_key(key)
        for known, principal in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                return principal
        raise Unauthenticated("unknown API key", reason="INVALID_API_KEY")

    def authorize(self, principal: Principal, method: str) -> None:
        if "admin" in principal.roles:
            return
        allowed = self._method_roles.get(method, frozenset())
        if not principal.roles & allowed:
            needed = sorted(allowed | {"admin"})
            raise PermissionDenied(
                f"API key {principal.name!r} (roles: {', '.join(sorted(principal.roles))}) may "
                f"not call {method}; it needs one of the roles: {', '.join(needed)}",
                reason="ROLE_REQUIRED", metadata={"method": method, "roles": ",".join(needed)})
