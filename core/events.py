"""Webhook events: the types the product emits, their JSON envelope, and the rules for listeners.

Why here: emitters (campaigns, code pools, dynamic bonuses), the storage layer that writes the
outbox, the worker that delivers and the API that registers listeners must agree on the event
numbers, on the exact bytes of a body (the signature covers them), on what a listener URL may
be, and on which HTTP answers are worth retrying. All of that is pure, so it lives in the core.
A listener receives events over one channel: a webhook (an HTTP POST) or e-mail (for alerts read
by people); the rules for recipient addresses, the SMTP answers worth retrying and the text of
an alert e-mail are here too.

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
from core.secret_box import PREFIX as SEALED_PREFIX
from core.text import nul_problem


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
    if secret.startswith(SEALED_PREFIX):
        # Stored in clear (no encryption key configured), such a value would read as a sealed
        # one (core.secret_box) and never open: every delivery would fail until DEAD.
        raise InvalidArgument(
            f"{field} must not start with {SEALED_PREFIX!r}: that prefix marks an encrypted "
            "stored secret, so the worker could never sign with it", reason="INVALID_SECRET",
            metadata={"field": field})
    return secret


class Channel(enum.StrEnum):
    """How a listener receives its events. Stored as these strings."""

    WEBHOOK = "WEBHOOK"  # a signed JSON POST to the listener's URL
    EMAIL = "EMAIL"  # a plain-text e-mail to the listener's recipients


MIN_EMAIL_RECIPIENTS = 1
MAX_EMAIL_RECIPIENTS = 20
MAX_EMAIL_ADDRESS_LENGTH = 254  # RFC 5321's limit on a forward path, less the angle brackets
MAX_EMAIL_LOCAL_PART_LENGTH = 64
# RFC 5322 "atext": what an unquoted local part may hold, besides dots between atoms.
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                   "!#$%&'*+-/=?^_`{|}~")
_LABEL = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


def validate_email_address(address: str, *, field: str = "email") -> str:
    """A plain address ``local@domain.tld`` as it would appear in SMTP's RCPT TO; returned with
    its domain lowercased.

    Deliberately narrower than RFC 5322: no display name ("Ops <ops@x>"), no quoted local part,
    no comments, no IP-literal domain, and the domain needs a dot (an alert to ``root@localhost``
    is almost certainly a mistake). Anything that could break out of a header (spaces, commas,
    line breaks) is refused, so an address can never inject a header or a second recipient.
    """

    def bad(problem: str) -> InvalidArgument:
        return InvalidArgument(f"{field} {address[:100]!r} {problem}", reason="INVALID_EMAIL",
                               metadata={"field": field})

    if not address:
        raise InvalidArgument(f"{field} must not be empty", reason="INVALID_EMAIL",
                              metadata={"field": field})
    if len(address) > MAX_EMAIL_ADDRESS_LENGTH:
        raise bad(f"is longer than {MAX_EMAIL_ADDRESS_LENGTH} characters")
    if not address.isascii() or not address.isprintable() or " " in address:
        raise bad("must be a plain ASCII address without spaces, e.g. ops@example.com")
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise bad("is not an e-mail address: expected local-part@domain, e.g. ops@example.com")
    if len(local) > MAX_EMAIL_LOCAL_PART_LENGTH:
        raise bad(f"has a local part longer than {MAX_EMAIL_LOCAL_PART_LENGTH} characters")
    atoms = local.split(".")
    if any(not atom or not set(atom) <= _ATEXT for atom in atoms):
        raise bad("has a local part that is not allowed (letters, digits, and !#$%&'*+-/=?^_`{|}~ "
                  "in dot-separated parts; no quotes, spaces or '@')")
    domain = domain.lower().removesuffix(".")
    labels = domain.split(".")
    if len(labels) < 2:
        raise bad("needs a domain with a dot, e.g. example.com")
    for label in labels:
        if (not label or len(label) > 63 or not set(label) <= _LABEL
                or label.startswith("-") or label.endswith("-")):
            raise bad("has a domain that is not a valid host name (letters, digits and hyphens "
                      "in dot-separated labels; IDN domains in their xn-- form)")
    if labels[-1].isdigit():
        raise bad("has a domain that is an IP address; use a host name")
    return f"{local}@{domain}"


def validate_email_recipients(addresses: list[str] | tuple[str, ...], *,
                              field: str = "email_recipients") -> list[str]:
    """1-20 distinct valid addresses (compared without case), in the order given."""
    if not MIN_EMAIL_RECIPIENTS <= len(addresses) <= MAX_EMAIL_RECIPIENTS:
        raise InvalidArgument(
            f"{field} must list {MIN_EMAIL_RECIPIENTS}-{MAX_EMAIL_RECIPIENTS} addresses, "
            f"got {len(addresses)}", reason="INVALID_EMAIL", metadata={"field": field})
    result: list[str] = []
    seen: set[str] = set()
    for index, address in enumerate(addresses):
        clean = validate_email_address(address, field=f"{field}[{index}]")
        if clean.lower() in seen:
            raise InvalidArgument(f"{field}[{index}] {clean!r} is listed twice",
                                  reason="INVALID_EMAIL", metadata={"field": field})
        seen.add(clean.lower())
        result.append(clean)
    return result


def mailto_uri(recipients: list[str] | tuple[str, ...]) -> str:
    """Where an e-mail attempt went, in the delivery log's URL column (RFC 6068)."""
    return "mailto:" + ",".join(recipients)


def validate_description(description: str, *, field: str = "description") -> str:
    if len(description) > MAX_DESCRIPTION_LENGTH:
        raise InvalidArgument(f"{field} must be at most {MAX_DESCRIPTION_LENGTH} characters",
                              reason="INVALID_DESCRIPTION", metadata={"field": field})
    if (problem := nul_problem(description, field)) is not None:
        raise InvalidArgument(problem, reason="INVALID_DESCRIPTION", metadata={"field": field})
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
    """2xx delivered; 5xx, 408, 425 and 429 retried; anything else (other 4xx, 3xx, which is
    not followed because a signed POST must not be forwarded elsewhere, and codes outside
    HTTP's 1xx-5xx such as 600 or 999) rejected."""
    if 200 <= status_code < 300:
        return Outcome.DELIVERED
    if 500 <= status_code < 600 or status_code in RETRYABLE_4XX:
        return Outcome.RETRY
    return Outcome.REJECTED


# SMTP's three-digit replies (RFC 5321 section 4.2.1): 2yz done, 4yz "transient negative
# completion" (try again later), 5yz "permanent negative completion" (do not repeat as is).
def classify_smtp_code(code: int) -> Outcome:
    """2xx delivered, 4xx retried, 5xx rejected; anything else (no valid reply) retried."""
    if 200 <= code < 300:
        return Outcome.DELIVERED
    if 500 <= code < 600:
        return Outcome.REJECTED
    return Outcome.RETRY


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


# Alert e-mails: what a person reads. The same facts as the webhook body, as text.

SUBJECT_PREFIX = "[promo]"
MAX_SUBJECT_LENGTH = 200

_TITLES: Mapping[EventType, str] = {
    EventType.SCHEDULED_CAMPAIGN: "Campaign awaiting clearance",
    EventType.CAMPAIGN_EXECUTED: "Campaign executed",
    EventType.CODE_POOL_THRESHOLD: "Code pool threshold",
    EventType.CODE_POOL_DEPLETED: "Code pool depleted",
    EventType.FALLBACK_CODE_ACTIVE: "Fallback code active",
    EventType.BONUS_SKIPPED: "Bonus skipped",
    EventType.BONUS_CALCULATED: "Bonus calculated",
    EventType.BONUS_ISSUED: "Bonus issued",
}


def event_title(event_type: EventType) -> str:
    return _TITLES.get(event_type, event_type.name.replace("_", " ").capitalize())


def _text(value: object) -> str:
    """One payload value as a person reads it: lists comma separated, JSON for nested objects,
    yes/no for booleans, and no line breaks (a subject or a "key: value" line stays one line)."""
    if value is None:
        text = "-"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, list | tuple):
        text = ", ".join(_text(item) for item in value)
    elif isinstance(value, Mapping):
        text = json.dumps(value, ensure_ascii=False, default=str, separators=(", ", ": "))
    else:
        text = str(value)
    return " ".join(text.split())


def _facts(event_type: EventType, data: Mapping[str, Any]) -> str:
    """The key facts of an event for a subject line; empty when a key fact is missing."""
    def get(key: str) -> str:
        return _text(data.get(key)) if data.get(key) not in (None, "") else ""

    name = get("name") or get("campaign_id")
    code = get("promotion_code")
    customer = get("customer_id")
    money = " ".join(part for part in (get("amount"), get("currency")) if part)
    facts: dict[EventType, str] = {
        EventType.SCHEDULED_CAMPAIGN: name and (
            f"{name} needs approvals by {get('clearance_required_by')}"
            if get("clearance_required_by") else name),
        EventType.CAMPAIGN_EXECUTED: name and (
            f"{name}: {get('approved_count')} approved, {get('rejected_count')} rejected"
            if get("approved_count") and get("rejected_count") else name),
        EventType.CODE_POOL_THRESHOLD: code and (
            f"{code} has {get('remaining')} codes left" if get("remaining") else code),
        EventType.CODE_POOL_DEPLETED: code and (
            f"{code} has no codes left" + (
                "; the fallback code is active" if data.get("fallback_code_active") is True
                else "; the promotion is paused" if data.get("promotion_paused") is True
                else "")),
        EventType.FALLBACK_CODE_ACTIVE: code and (
            f"{code} now hands out {get('fallback_code')}" if get("fallback_code") else code),
        EventType.BONUS_SKIPPED: customer and (
            f"customer {customer}" + (f" ({get('reason')})" if get("reason") else "")),
        EventType.BONUS_CALCULATED: customer and (
            f"{money} for customer {customer}" if money else f"customer {customer}"),
        EventType.BONUS_ISSUED: customer and (
            f"{money} to customer {customer}" if money else f"customer {customer}"),
    }
    return facts.get(event_type, "")


def email_subject(event_type: EventType, data: Mapping[str, Any]) -> str:
    """``[promo] <title>: <key facts>``, e.g. "[promo] Code pool threshold: LOYALTY10 has 40
    codes left"; one line, at most MAX_SUBJECT_LENGTH characters."""
    facts = _facts(event_type, data)
    subject = f"{SUBJECT_PREFIX} {event_title(event_type)}" + (f": {facts}" if facts else "")
    if len(subject) > MAX_SUBJECT_LENGTH:
        subject = subject[:MAX_SUBJECT_LENGTH - 3].rstrip() + "..."
    return subject


def email_text(event_type: EventType, data: Mapping[str, Any], *, event_id: str,
               occurred_at: str, delivery_id: int, attempt: int, body: str) -> str:
    """The plain-text body: the title, every data key (the documented ones first, in their
    order, then any others sorted), the event's identity, and the exact JSON a webhook gets."""
    documented = [key for key in PAYLOAD_FIELDS.get(event_type, ()) if key in data]
    keys = documented + sorted(key for key in data if key not in documented)
    width = max((len(key) for key in keys), default=0)
    lines = [f"{event_title(event_type)} (event type {int(event_type)})", ""]
    lines += [f"{key + ':':<{width + 1}} {_text(data[key])}" for key in keys] or ["(no data)"]
    lines += ["", f"Event id:    {event_id}", f"Occurred at: {occurred_at}",
              f"Delivery:    {delivery_id}, attempt {attempt}", "",
              "This alert may arrive more than once (delivery is at least once); every copy",
              "carries the same Promo-Event-Id header.", "", "The event as JSON:",
              body, ""]
    return "\n".join(lines)
