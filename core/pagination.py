"""Opaque page tokens for every List RPC (AIP-158).

Why opaque: clients must not build tokens, so the server may change the ordering key later. A
token remembers the last key of the page and a fingerprint of the filters, so a token used with
different filters is rejected instead of silently skipping rows.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from core.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def effective_page_size(requested: int, *, default: int = DEFAULT_PAGE_SIZE,
                        maximum: int = MAX_PAGE_SIZE) -> int:
    """0 means the default, above the maximum is lowered to it, negative is an error."""
    if requested < 0:
        raise InvalidArgument("page_size must not be negative", reason="INVALID_PAGE_SIZE")
    if requested == 0:
        return default
    return min(requested, maximum)


def filters_fingerprint(filters: dict[str, Any]) -> str:
    raw = json.dumps(filters, sort_keys=True, default=str).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class PageCursor:
    """Where the next page starts: strictly after ``after`` in the list's order."""

    after: list[Any]
    filters: str


def encode_page_token(after: list[Any], filters: dict[str, Any]) -> str:
    payload = json.dumps({"a": after, "f": filters_fingerprint(filters)}, default=str)
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode_page_token(token: str, filters: dict[str, Any]) -> PageCursor | None:
    """None for the first page; InvalidArgument for a malformed or mismatched token."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        after = data["a"]
        fingerprint = data["f"]
        if not isinstance(after, list) or not isinstance(fingerprint, str):
            raise ValueError("bad shape")
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidArgument(
            "page_token is not a token this server issued", reason="INVALID_PAGE_TOKEN"
        ) from exc
    if fingerprint != filters_fingerprint(filters):
        raise InvalidArgument(
            "page_token was issued for different filters; repeat the request with the same "
            "filters or start again without a page_token",
            reason="INVALID_PAGE_TOKEN",
        )
    return PageCursor(after=after, filters=fingerprint)
