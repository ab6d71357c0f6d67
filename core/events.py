"""Webhook events: the types the product emits, their JSON envelope, and the rules for listeners.

Why here: emitters (campaigns, code pools, dynamic bonuses), the storage layer that writes the
outbox, the worker that delivers and the API that registers listeners must agree on the event
numbers, on the exact bytes of a body (the signature covers them), on what a listener URL may
be, and on which HTTP answers are worth retrying. All of that is pure, so it lives in the core.

Event numbers are part of the public contract (listeners switch on them) and never change or get
reused. The scheduled-campaign event keeps the number 5 of the source API (seed 001,
"EventTypeID=5"); the product's own events are numbered from 100. Each payload is documented in
``PAYLOAD_FIELDS`` and, with examples, in docs/webhooks.md.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

from core.errors import InvalidArgument


class EventType(enum.IntEnum):
    """Every event a listener can subscribe to. Values are stable wire numbers."""

    # A conditional campaign awaits clearance: the listener pulls the target group and approves
    # customers before clearance_required_by (seed 001, EventTypeID=5).
    SCHEDULED_CAMPAIGN = 5
    # A scheduled campaign ran; approved and rejected counts are final.
    CAMPAIGN_EXECUTED = 100
    # A personalized code pool's remaining codes fell to or below its alert threshold (seed 001,
    # "Automated Threshold Alerts": once per breach, again after a replenishment).
    CODE_POOL_THRESHOLD = 101
    # A personalized code pool has no codes left.
    CODE_POOL_DEPLETED = 102
    # A depleted pool's promotion now hands out its fallback code (seed 002, "Default Code On").
    FALLBACK_CODE_ACTIVE = 103
    # The bonus formula gave no amount/template for a customer (seed 004, "Skipped").
    BONUS_SKIPPED = 110
    # A dynamic bonus was calculated but not issued yet (seed 004, "Calculated").
    BONUS_CALCULATED = 111
    # A dynamic bonus was issued (seed 004, "Issued").
    BONUS_ISSUED = 112


# The keys of each event's ``data`` object (documented in docs/webhooks.md). Emitters may add
# keys; listeners must ignore keys they do not know. Money is a decimal string, times ISO 8601.
PAYLOAD_FIELDS: Mapping[EventType, tuple[str, ...]] = {
    EventType.SCHEDULED_CAMPAIGN: ("campaign_id", "name", "promotion_codes",
                                   "clearance_required_by", "target_count"),
    EventType.CAMPAIGN_EXECUTED: ("campaign_id", "name", "promotion_codes", "executed_at",
                                  "approved_count", "rejected_count", "conditional_execution"),
    EventType.CODE_POOL_THRESHOLD: ("promotion_code", "remaining", "total", "threshold"),
    EventType.CODE_POOL_DEPLETED: ("promotion_code", "total", "fallback_code_active",
                                   "promotion_paused"),
    EventType.FALLBACK_CODE_ACTIVE: ("promotion_code", "fallback_code"),
    EventType.BONUS_SKIPPED: ("bonus_id", "formula_id", "customer_id", "reason"),
    EventType.BONUS_CALCULATED: ("bonus_id", "formula_id", "customer_id", "result_type",
                                 "amount", "currency", "period_start", "period_end",
                                 "requires_approval"),
    EventType.BONUS_ISSUED: ("bonus_id", "formula_id", "customer_id", "result_type", "amount",
                             "currency", "issued_at"),
}


def parse_event_type(value: int, *, field: str = "event_type") -> EventType:
    """The event type for a wire number; unknown numbers are refused.

    Why refuse: a listener registered for a number the product never emits would wait forever
    in silence; a typo should fail at registration, not in production a month later.
    """
    try:
        return EventType(value)
    except ValueError:
        known = ", ".join(f"{t.value} ({t.name})" for t in EventType)
        raise InvalidArgument(f"{field} {value} is not an event type this service emits; "
                              f"known types: {known}", reason="INVALID_EVENT_TYPE",
                              metadata={"field": field}) from None


# Listener rules.

MAX_URL_LENGTH = 2048
MIN_SECRET_LENGTH = 16
MAX_SECRET_LENGTH = 256
MAX_DESCRIPTION_LENGTH = 2000


def validate_listener_url(url: str, *, field: str = "url") -> str:
    """An absolute http(s) URL with a host; no userinfo (credentials would sit in logs and in
    every delivery row) and no fragment (never sent over HTTP, so almost certainly a mistake)."""

    def bad(problem: str) -> InvalidArgument:
        return InvalidArgument(f"{field} {problem}", reason="INVALID_URL",
                               metadata={"field": field})

    if not url:
        raise bad("is required: an absolute http:// or https:// URL")
    if len(url) > MAX_URL_LENGTH:
        raise bad(f"must be at most {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise bad("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise bad(f"is not a valid URL ({exc})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise bad(f"must use http or https, not {parts.scheme or 'no scheme'!r}")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise bad("must not contain a user name or password; the signature authenticates "
                  "the sender")
    if not parts.hostname:
        raise bad("must name a host")
    if port == 0:
        raise bad("must not use port 0")
    if parts.fragment or url.endswith("#"):
        raise bad("must not contain a fragment ('#...')")
    return url


def validate_secret(secret: str, *, field: str = "secret") -> str:
    """A signing secret chosen by the caller: printable, 16-256 characters (UTF-8 is the key)."""
    if not MIN_SECRET_LENGTH <= len(secret) <= MAX_SECRET_LENGTH:
        raise InvalidArgument(
            f"{field} must be {MIN_SECRET_LENGTH}-{MAX_SECRET_LENGTH} characters; leave it empty "
            "to have the server generate one", reason="INVALID_SECRET", metadata={"field": field})
    if not secret.isprintable() or secret != secret.strip():
        raise InvalidArgument(f"{field} must be printable, without leading or trailing spaces",
                              reason="INVALID_SECRET", metadata={"field": field})
    return secret


def validate_description(description: str, *, field: str = "description") -> str:
    if len(description) > MAX_DESCRIPTION_LENGTH:
        raise InvalidArgument(f"{field} must be at most {MAX_DESCRIPTION_LENGTH} characters",
                              reason="INVALID_DESCRIPTION", metadata={"field": field})
    return description


# Delivery rules.

class DeliveryStatus(enum.StrEnum):
    """Where one (event, listener) delivery is. Stored as these strings."""

    PENDING = "PENDING"  # waiting for its first or next attempt
    DELIVERED = "DELIVERED"  # the listener answered 2xx
    FAILED = "FAILED"  # the listener refused it for good (a non-retryable answer, e.g. 400)
    DEAD = "DEAD"  # retries ran out or the deadline passed
    CANCELLED = "CANCELLED"  # the listener was deactivated or unregistered first


# What an operator may redeliver (PENDING is already on its way).
REDELIVERABLE = frozenset({DeliveryStatus.DELIVERED, DeliveryStatus.FAILED, DeliveryStatus.DEAD,
                           DeliveryStatus.CANCELLED})


class Outcome(enum.Enum):
    """What one HTTP answer means for the delivery."""

    DELIVERED = "delivered"
    RETRY = "retry"
    REJECTED = "rejected"


# Answers that say "not now" rather than "never": request timeout and rate limiting.
RETRYABLE_4XX = frozenset({408, 425, 429})


def classify_status(status_code: int) -> Outcome:
    """2xx delivered; 5xx, 408, 425 and 429 retried; anything else (other 4xx, and 3xx, which
    is not followed because a signed POST must not be forwarded elsewhere) rejected."""
    if 200 <= status_code < 300:
        return Outcome.DELIVERED
    if status_code >= 500 or status_code in RETRYABLE_4XX:
        return Outcome.RETRY
    return Outcome.REJECTED


# The envelope.

def _json_default(value: object) -> object:
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"event payloads cannot carry {value}")
        return str(value)  # money stays exact: a decimal string, never a float
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("event payloads need timezone-aware datetimes")
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"event payloads cannot carry a {type(value).__name__}")


def _check_floats(value: object) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("event payloads cannot carry NaN or infinity")
    if isinstance(value, Mapping):
        for item in value.values():
            _check_floats(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_floats(item)


@dataclass(frozen=True)
class Envelope:
    """One event as listeners receive it."""

    event_id: str
    event_type: EventType
    occurred_at: datetime
    data: Mapping[str, Any]

    def body(self) -> bytes:
        """The exact bytes POSTed (and signed); stored once so every attempt sends the same."""
        if self.occurred_at.tzinfo is None:
            raise ValueError("occurred_at must be timezone-aware")
        _check_floats(self.data)
        document = {"event_id": self.event_id, "event_type": int(self.event_type),
                    "occurred_at": self.occurred_at.isoformat(), "data": dict(self.data)}
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False, default=_json_default).encode()
