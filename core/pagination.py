"""Opaque page tokens for every List RPC (AIP-158).

Why opaque: clients must not build tokens, so the server may change the ordering key later. A
token remembers the last key of the page and a fingerprint of the filters, so a token used with
different filters is rejected instead of silently skipping rows.

A token is base64 JSON with a checksum over its content and the list it belongs to (``scope``,
the List RPC: server/page_tokens.py), so a token that was altered, truncated or sent to another
List is INVALID_ARGUMENT INVALID_PAGE_TOKEN instead of silently starting elsewhere. The checksum
is no signature (a client reading this code could forge one, which only picks where its own
listing starts), so decoding also checks the key's shape against what the list expects (its
``key`` kinds: text of at most MAX_TEXT_KEY characters that PostgreSQL can store, a 64-bit
integer, or an ISO 8601 instant with a UTC offset): never a crash in the query.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from core.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_TEXT_KEY = 1000  # characters; longer than any id or name this server issues tokens for
_INT64 = range(-(2**63), 2**63)

KeyKind = type[str] | type[int] | type[datetime]
"""The kind of one part of a list's ordering key: ``str``, ``int`` or ``datetime``."""


def effective_page_size(requested: int, *, default: int = DEFAULT_PAGE_SIZE,
                        maximum: int = MAX_PAGE_SIZE) -> int:
    """0 means the default, above the maximum is lowered to it, negative is an error."""
    if requested < 0:
        raise InvalidArgument("page_size must not be negative", reason="INVALID_PAGE_SIZE",
                              metadata={"field": "page_size"})
    if requested == 0:
        return default
    return min(requested, maximum)


def filters_fingerprint(filters: dict[str, Any]) -> str:
    raw = json.dumps(filters, sort_keys=True, default=str).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class PageCursor:
    """Where the next page starts: strictly after ``after`` in the list's order. ``after``
    holds one value per key kind, of that kind (a ``datetime`` part is an aware datetime)."""

    after: list[Any]
    filters: str


def _checksum(after: Any, fingerprint: Any, scope: str) -> str:
    raw = json.dumps([scope, after, fingerprint], default=str, sort_keys=True).encode()
    return hashlib.sha256(b"promo-page-token\x00" + raw).hexdigest()[:16]


def encode_page_token(after: list[Any], filters: dict[str, Any], *, scope: str = "") -> str:
    fingerprint = filters_fingerprint(filters)
    after = json.loads(json.dumps(after, default=str))  # as decoding will see it
    payload = json.dumps({"a": after, "f": fingerprint,
                          "c": _checksum(after, fingerprint, scope)})
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def _not_ours() -> InvalidArgument:
    return InvalidArgument("page_token is not a token this server issued",
                           reason="INVALID_PAGE_TOKEN", metadata={"field": "page_token"})


def _not_this_list() -> InvalidArgument:
    return InvalidArgument(
        "page_token was altered or was issued by another List call; use the next_page_token "
        "of this call's previous page as it was, or start again without a page_token",
        reason="INVALID_PAGE_TOKEN", metadata={"field": "page_token"})


def _key_part(value: Any, kind: KeyKind) -> Any:
    """``value`` checked (and for datetimes parsed) as ``kind``; ValueError if it is not one."""
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value not in _INT64:
            raise ValueError("not a 64-bit integer")
        return value
    if not isinstance(value, str) or len(value) > MAX_TEXT_KEY or "\x00" in value:
        raise ValueError("not a storable text")
    value.encode()  # a lone surrogate (valid JSON "\ud800") is no text PostgreSQL takes
    if kind is datetime:
        moment = datetime.fromisoformat(value)
        if moment.utcoffset() is None:
            raise ValueError("an instant without a UTC offset")
        try:
            utc = moment.astimezone(UTC)
        except OverflowError as exc:  # "0001-01-01T00:00:00+14:00" is before the year 1
            raise ValueError("an instant out of range") from exc
        if utc.replace(tzinfo=None) in (datetime.min, datetime.max):
            raise ValueError("an instant the database stores as infinity")
        return moment
    return value


def decode_page_token(token: str, filters: dict[str, Any], *, key: Sequence[KeyKind],
                      scope: str = "") -> PageCursor | None:
    """None for the first page; InvalidArgument INVALID_PAGE_TOKEN for a malformed token, one
    altered or issued for another ``scope`` (its checksum does not match), one whose key does
    not have the shape ``key`` describes, or one issued for other filters."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        raw = base64.urlsafe_b64decode(padded.encode())
        data = json.loads(raw)
        after = data["a"]
        fingerprint = data["f"]
        checksum = data["c"]
        if not isinstance(after, list) or not isinstance(fingerprint, str):
            raise ValueError("bad shape")
        # Only the exact text this server issued: base64 decoding skips characters outside
        # its alphabet and extra padding, and JSON allows other spacing, so an edited token
        # could otherwise pass (harmlessly, the checksum covers the content, but an edited
        # token is refused as the README says).
        issued = json.dumps({"a": after, "f": fingerprint, "c": checksum}).encode()
        if raw != issued or base64.urlsafe_b64encode(raw).decode().rstrip("=") != token:
            raise ValueError("not the issued text")
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError) as exc:
        raise _not_ours() from exc
    if checksum != _checksum(after, fingerprint, scope):
        raise _not_this_list()
    try:
        if len(after) != len(key):
            raise ValueError("wrong key length")
        parts = [_key_part(value, kind) for value, kind in zip(after, key, strict=True)]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise _not_ours() from exc
    if fingerprint != filters_fingerprint(filters):
        raise InvalidArgument(
            "page_token was issued for different filters; repeat the request with the same "
            "filters or start again without a page_token",
            reason="INVALID_PAGE_TOKEN", metadata={"field": "page_token"},
        )
    return PageCursor(after=parts, filters=fingerprint)
