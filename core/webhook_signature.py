"""Signing webhook deliveries, and the check a listener runs on what it receives.

Why a signature: a listener's URL is reachable by anyone who learns it; an HMAC-SHA256 over the
timestamp and the exact body, keyed with the secret that only we and the listener hold, proves
the request came from us and was not changed. The timestamp is signed too and must be recent,
so a captured request cannot be replayed later; within the tolerance, the event id header lets
the listener drop repeats (deliveries are at least once).

The scheme, for listeners that do not use Python (docs/webhooks.md has a copy-paste version):

    signed   = ascii(Promo-Timestamp) + "." + body            (body: the raw request bytes)
    v1       = lowercase hex of HMAC-SHA256(key=utf8(secret), msg=signed)
    header   Promo-Signature: v1=<hex>[, v1=<hex> ...]

Several ``v1=`` values appear while a secret is being rotated (one per secret still valid); a
request is authentic if any of them matches. This module uses only the standard library, so a
listener may copy it as is.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping

HEADER_EVENT_ID = "Promo-Event-Id"
HEADER_EVENT_TYPE = "Promo-Event-Type"
HEADER_TIMESTAMP = "Promo-Timestamp"
HEADER_SIGNATURE = "Promo-Signature"
SCHEME = "v1"
DEFAULT_TOLERANCE_SECONDS = 300

Secret = bytes | str


class SignatureError(Exception):
    """The request is not a fresh, authentic delivery; answer 400 (or 401) and drop it."""


class MissingHeader(SignatureError):
    """A required header is absent (or empty)."""


class MalformedHeader(SignatureError):
    """A header is present but not in the documented format."""


class BadSignature(SignatureError):
    """No signature matches any of the secrets: wrong secret, or the body was changed."""


class StaleTimestamp(SignatureError):
    """The signed timestamp is too far from now: a replay, or a badly wrong clock."""


def _key(secret: Secret) -> bytes:
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    if not key:
        raise ValueError("the webhook secret is empty")
    return key


def sign(secret: Secret, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``b"<timestamp>." + body`` keyed with ``secret``."""
    message = str(int(timestamp)).encode() + b"." + body
    return hmac.new(_key(secret), message, hashlib.sha256).hexdigest()


def signature_header(secrets: Secret | Iterable[Secret], timestamp: int, body: bytes) -> str:
    """The Promo-Signature value: ``v1=<hex>`` for each secret (newest first), comma separated."""
    keys = [secrets] if isinstance(secrets, bytes | str) else list(secrets)
    if not keys:
        raise ValueError("at least one secret is needed to sign")
    return ", ".join(f"{SCHEME}={sign(key, timestamp, body)}" for key in keys)


def _get(headers: Mapping[str, str], name: str) -> str:
    """Header lookup that ignores case (HTTP header names are case-insensitive)."""
    value = headers.get(name)
    if value is None:
        wanted = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == wanted), None)
    if value is None or not value.strip():
        raise MissingHeader(f"the {name} header is missing")
    return value.strip()


def parse_signatures(value: str) -> list[str]:
    """The ``v1`` hex values of a Promo-Signature header; other schemes are ignored (they may be
    added later), so a header with none is malformed."""
    found: list[str] = []
    for item in value.replace(" ", ",").split(","):
        scheme, sep, digest = item.strip().partition("=")
        if sep and scheme.strip() == SCHEME and digest.strip():
            found.append(digest.strip().lower())
    if not found:
        raise MalformedHeader(f"the {HEADER_SIGNATURE} header has no '{SCHEME}=<hex>' value")
    return found


def verify(secret: Secret | Iterable[Secret], headers: Mapping[str, str], body: bytes, *,
           now: int, tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS) -> None:
    """Check a received delivery; return None if authentic and fresh, else raise.

    ``secret``: the listener's secret, or several while rotating (any may match).
    ``headers``: the request headers (any mapping; names are matched without case).
    ``body``: the raw request body bytes, before any JSON parsing.
    ``now``: the current Unix time in seconds (``int(time.time())``).
    Raises MissingHeader, MalformedHeader, BadSignature or StaleTimestamp (all SignatureError).
    The comparison is constant-time.
    """
    raw_timestamp = _get(headers, HEADER_TIMESTAMP)
    signatures = parse_signatures(_get(headers, HEADER_SIGNATURE))
    if not raw_timestamp.isascii() or not raw_timestamp.isdigit():
        raise MalformedHeader(f"the {HEADER_TIMESTAMP} header must be Unix seconds, "
                              f"got {raw_timestamp[:40]!r}")
    timestamp = int(raw_timestamp)
    keys = [secret] if isinstance(secret, bytes | str) else list(secret)
    if not keys:
        raise ValueError("at least one secret is needed to verify")
    expected = [sign(key, timestamp, body) for key in keys]
    matched = False
    for candidate in signatures:
        for digest in expected:
            # Every pair is compared (no early exit) so timing says nothing about which matched.
            matched |= hmac.compare_digest(candidate.encode(), digest.encode())
    if not matched:
        raise BadSignature("no signature matches: check the listener's secret, and verify the "
                           "raw body bytes (not re-serialized JSON)")
    if abs(now - timestamp) > tolerance_seconds:
        raise StaleTimestamp(f"the {HEADER_TIMESTAMP} is {now - timestamp:+d} s from now; at most "
                             f"{tolerance_seconds} s is accepted (replayed request or wrong clock)")
