"""Request fingerprints that do not give away a caller-chosen listener secret.

A retry is recognised by a fingerprint of the request (storage.idempotency keeps it for
PROMO_IDEMPOTENCY_KEY_RETENTION_DAYS). A plain SHA-256 over a RegisterListener or
UpdateListener request that carries ``listener.secret`` would let anyone who reads that table
test guesses of the secret offline at billions per second, while the secret itself is sealed
at rest (core/secret_box.py). So the secret enters the fingerprint only through scrypt, salted
with the RPC and the request id: each guess then costs as much as scrypt, for one row.

Rows stored before this existed hold the plain fingerprint: ``legacy`` is that value, which a
retry of such a request still matches (until retention removes the row).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

from google.protobuf.message import Message

from server.convert import request_fingerprint

# About 70 ms and 16 MiB per call on the test machine; listener calls are rare.
SCRYPT_N = 2 ** 14
SCRYPT_R = 8
SCRYPT_P = 1
_MAXMEM = 64 * 1024 * 1024


@dataclass(frozen=True)
class Fingerprints:
    current: bytes
    legacy: bytes | None  # the plain fingerprint, only when the request carries a secret


def _scrypt_hex(secret: str, salt: bytes) -> str:
    return hashlib.scrypt(secret.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                          dklen=32, maxmem=_MAXMEM).hex()


async def listener_request_fingerprints(scope: str, request: Message) -> Fingerprints:
    """The fingerprint of a request with a ``listener`` field: its secret (if any) replaced by
    scrypt(secret, salt = scope and request id), computed off the event loop."""
    listener = request.listener  # type: ignore[attr-defined]
    if not listener.secret:
        return Fingerprints(request_fingerprint(request), None)
    salt = f"{scope}\x00{request.request_id}".encode()  # type: ignore[attr-defined]
    stretched = await asyncio.to_thread(_scrypt_hex, listener.secret, salt)
    copy = type(request)()
    copy.CopyFrom(request)
    copy.listener.secret = f"scrypt:{stretched}"  # type: ignore[attr-defined]
    return Fingerprints(request_fingerprint(copy), request_fingerprint(request))
