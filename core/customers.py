"""Customers and their activity events (seed 004): the data dynamic bonus formulas compute over.

Pure validation of what ingesting systems send. Batches are all or nothing, so a batch is checked
completely before anything is written, and every problem is reported with its position
(``events[12]: amount must not be negative for kind 'bet'``): an ingesting system with a bad
batch of 10,000 events can fix all of them in one go instead of one error per round trip.

Decisions:
- ``bet``, ``win``, ``deposit`` and ``withdrawal`` move money in a fixed direction, so their
  amounts must not be negative. Custom kinds may be negative: their meaning is the client's own
  (corrections, chargebacks, points adjustments), and a formula can filter them.
- An event may happen at most 5 minutes after the server's clock (ingesting systems' clocks
  drift a little; more than that is a unit or time-zone bug that would put the event in future
  bonus windows).
- Attribute names ``amount`` and ``currency`` are refused: formula filters use them for the
  event's own fields, so such an attribute could never be read.
- Property and attribute values must not contain NUL (U+0000): jsonb cannot store it
  (core.text). Other control characters are kept; ids refuse all of them.
- A batch holds at most 10,000 items; more is INVALID_ARGUMENT (``BATCH_TOO_LARGE``), not
  RESOURCE_EXHAUSTED: it is the request's shape, not a quota, and retrying it never helps.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from functools import lru_cache

from core.errors import InvalidArgument
from core.money import parse_decimal
from core.periods import NOT_ZONES
from core.text import nul_problem

MAX_BATCH = 10_000
MAX_REPORTED_PROBLEMS = 10
MAX_CUSTOMER_ID_LENGTH = 128
MAX_EXTERNAL_ID_LENGTH = 200
MAX_PROPERTIES = 100
MAX_PROPERTY_TEXT = 1000
MAX_ATTRIBUTES = 50
MAX_ATTRIBUTE_TEXT = 500
MAX_FUTURE = timedelta(minutes=5)

STANDARD_KINDS = frozenset({"bet", "win", "deposit", "withdrawal"})
NON_NEGATIVE_KINDS = STANDARD_KINDS
RESERVED_ATTRIBUTES = frozenset({"amount", "currency"})

KIND_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,39}")
CURRENCY_PATTERN = re.compile(r"[A-Z]{3}")
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# An attribute value that reads as a number is one, for formulas (``rtp > 95``, ``sum(bet.rtp)``):
# plain decimal notation, at most 30 digits on either side of the point. storage/aggregates.py
# applies the same test in SQL (NUMERIC_ATTRIBUTE_SQL); keep the two in step.
NUMERIC_ATTRIBUTE = re.compile(r"-?[0-9]{1,30}(\.[0-9]{1,30})?")
NUMERIC_ATTRIBUTE_SQL = r"^-?[0-9]{1,30}(\.[0-9]{1,30})?$"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: every Unicode control (Cc)

PropertyValue = str | Decimal | bool


@dataclass(frozen=True)
class DecimalText:
    """A property value that arrived as a decimal string (kept apart from plain text)."""

    text: str


@dataclass(frozen=True)
class Unreadable:
    """A value the wire layer could not turn into a Python value (e.g. a timestamp out of
    range); reported at its position like any other problem."""

    why: str


RawProperty = str | DecimalText | bool | None  # None: the wire value had nothing set


@dataclass(frozen=True)
class CustomerInput:
    """A customer as received, before validation."""

    customer_id: str
    time_zone: str = ""
    currency: str = ""
    properties: Mapping[str, RawProperty] = field(default_factory=dict)


@dataclass(frozen=True)
class Customer:
    customer_id: str
    time_zone: str | None = None
    currency: str | None = None
    properties: Mapping[str, PropertyValue] = field(default_factory=dict)
    create_time: datetime | None = None
    update_time: datetime | None = None


@dataclass(frozen=True)
class EventInput:
    """An event as received, before validation: text fields unparsed."""

    external_id: str
    customer_id: str
    kind: str
    amount: str
    currency: str
    occurred_at: datetime | Unreadable | None
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Event:
    external_id: str
    customer_id: str
    kind: str
    amount: Decimal
    currency: str
    occurred_at: datetime
    attributes: Mapping[str, str] = field(default_factory=dict)
    # Set once stored.
    event_id: int | None = None
    record_time: datetime | None = None


@dataclass(frozen=True)
class Problem:
    index: int
    message: str


# --- single values -------------------------------------------------------------------------

def _id_problem(value: str, name: str, maximum: int) -> str | None:
    if not value:
        return f"{name} is required"
    if len(value) > maximum:
        return f"{name} must be at most {maximum} characters, got {len(value)}"
    if _CONTROL.search(value):
        return f"{name} must not contain control characters"
    return None


def customer_id_problem(customer_id: str) -> str | None:
    return _id_problem(customer_id, "customer_id", MAX_CUSTOMER_ID_LENGTH)


def is_valid_customer_id(customer_id: str) -> bool:
    return customer_id_problem(customer_id) is None


@lru_cache(maxsize=1)
def _time_zones() -> frozenset[str]:
    return frozenset(z for z in zoneinfo.available_timezones() if z.lower() not in NOT_ZONES)


def time_zone_problem(name: str) -> str | None:
    """IANA names only (``Europe/Malta``, ``UTC``); looked up in the installed tz database
    rather than opened, so odd keys such as paths never reach the file system."""
    if name in _time_zones():
        return None
    return f"time_zone must be an IANA time zone name such as 'Europe/Malta', got {name!r}"


def currency_problem(code: str, *, required: bool) -> str | None:
    if not code:
        return "currency is required (ISO 4217, e.g. 'EUR')" if required else None
    if not CURRENCY_PATTERN.fullmatch(code):
        return f"currency must be three uppercase letters (ISO 4217) such as 'EUR', got {code!r}"
    return None


MAX_PROPERTY_NAME = 64


def _property_name_problem(name: str) -> str | None:
    """Property names are the labels operators know them by (seed 004's "Logins count ever"):
    any printable text of 1-64 characters without spaces around it. Formulas read a name that
    is not an identifier as ``customer["Logins count ever"]``; no SQL is built from them."""
    if not 1 <= len(name) <= MAX_PROPERTY_NAME or not name.isprintable() or name != name.strip():
        return (f"property name {name!r} must be 1-{MAX_PROPERTY_NAME} printable characters "
                "without leading or trailing spaces")
    return None


def _name_problem(name: str, what: str) -> str | None:
    if not NAME_PATTERN.fullmatch(name):
        return (f"{what} name {name!r} must be a letter or '_' followed by up to 63 letters, "
                "digits or '_'")
    return None


def _decimal(text: str, field_name: str, problems: list[str]) -> Decimal | None:
    try:
        return parse_decimal(text, field=field_name, allow_negative=True)
    except InvalidArgument as exc:
        problems.append(exc.message)
        return None


def attribute_value(text: str) -> str | Decimal:
    """An event attribute as formulas see it: numeric-looking text is a number, the rest text.

    Attributes arrive as text (``map<string, string>``), so this is the one place that decides
    what is a number. Consequence: a numeric-looking value such as a game id "1234" compares with
    numbers (``game_id = 1234``), not with text (``game_id = "1234"`` never matches)."""
    return Decimal(text) if NUMERIC_ATTRIBUTE.fullmatch(text) else text


def typed_attributes(attributes: Mapping[str, str]) -> dict[str, str | Decimal]:
    return {name: attribute_value(value) for name, value in attributes.items()}


# --- customers -----------------------------------------------------------------------------

def _validate_customer(raw: CustomerInput) -> tuple[Customer | None, list[str]]:
    problems: list[str] = []
    if (p := customer_id_problem(raw.customer_id)) is not None:
        problems.append(p)
    if raw.time_zone and (p := time_zone_problem(raw.time_zone)) is not None:
        problems.append(p)
    if (p := currency_problem(raw.currency, required=False)) is not None:
        problems.append(p)
    if len(raw.properties) > MAX_PROPERTIES:
        problems.append(f"at most {MAX_PROPERTIES} properties, got {len(raw.properties)}")
    properties: dict[str, PropertyValue] = {}
    for name in sorted(raw.properties):
        value = raw.properties[name]
        if (p := _property_name_problem(name)) is not None:
            problems.append(p)
            continue
        if value is None:
            problems.append(f"property {name!r} has no value: set string_value, decimal_value "
                            "or bool_value")
        elif isinstance(value, bool):
            properties[name] = value
        elif isinstance(value, DecimalText):
            number = _decimal(value.text, f"property {name!r}", problems)
            if number is not None:
                properties[name] = number
        elif len(value) > MAX_PROPERTY_TEXT:
            problems.append(f"property {name!r} must be at most {MAX_PROPERTY_TEXT} characters")
        elif (p := nul_problem(value, f"property {name!r}")) is not None:
            problems.append(p)
        else:
            properties[name] = value
    if problems:
        return None, problems
    return Customer(customer_id=raw.customer_id, time_zone=raw.time_zone or None,
                    currency=raw.currency or None, properties=properties), []


def validate_customers(inputs: Sequence[CustomerInput]) -> list[Customer]:
    """Every customer checked; raises one InvalidArgument (INVALID_CUSTOMERS) naming each bad
    one by position, or BATCH_TOO_LARGE / EMPTY_BATCH for the batch's size."""
    check_batch_size(len(inputs), "customers")
    customers: list[Customer] = []
    problems: list[Problem] = []
    first_seen: dict[str, int] = {}
    for index, raw in enumerate(inputs):
        customer, messages = _validate_customer(raw)
        problems += [Problem(index, m) for m in messages]
        if raw.customer_id in first_seen:
            problems.append(Problem(index, f"customer_id {raw.customer_id!r} repeats "
                                           f"customers[{first_seen[raw.customer_id]}]"))
        elif raw.customer_id:
            first_seen[raw.customer_id] = index
        if customer is not None:
            customers.append(customer)
    raise_if_problems(problems, noun="customers", reason="INVALID_CUSTOMERS")
    return customers


# --- events --------------------------------------------------------------------------------

def _validate_event(raw: EventInput, now: datetime) -> tuple[Event | None, list[str]]:
    problems: list[str] = []
    if (p := _id_problem(raw.external_id, "external_id", MAX_EXTERNAL_ID_LENGTH)) is not None:
        problems.append(p)
    if (p := customer_id_problem(raw.customer_id)) is not None:
        problems.append(p)
    kind_ok = bool(KIND_PATTERN.fullmatch(raw.kind))
    if not raw.kind:
        problems.append("kind is required: bet, win, deposit, withdrawal or a custom kind")
    elif not kind_ok:
        problems.append(f"kind must match [a-z][a-z0-9_]{{0,39}} (e.g. 'bet'), got {raw.kind!r}")
    amount = _decimal(raw.amount, "amount", problems)
    if amount is not None and amount < 0 and raw.kind in NON_NEGATIVE_KINDS:
        problems.append(f"amount must not be negative for kind {raw.kind!r}, got {raw.amount!r}")
    if (p := currency_problem(raw.currency, required=True)) is not None:
        problems.append(p)
    occurred_at = raw.occurred_at
    if occurred_at is None:
        problems.append("occurred_at is required")
    elif isinstance(occurred_at, Unreadable):
        problems.append(f"occurred_at is not a valid time: {occurred_at.why}")
    elif occurred_at - now > MAX_FUTURE:
        problems.append(f"occurred_at {occurred_at.isoformat()} is more than 5 minutes after the "
                        f"server's time {now.isoformat()}")
    if len(raw.attributes) > MAX_ATTRIBUTES:
        problems.append(f"at most {MAX_ATTRIBUTES} attributes, got {len(raw.attributes)}")
    for name in sorted(raw.attributes):
        if name in RESERVED_ATTRIBUTES:
            problems.append(f"attribute name {name!r} is reserved for the event's own {name}")
        elif (p := _name_problem(name, "attribute")) is not None:
            problems.append(p)
        elif len(raw.attributes[name]) > MAX_ATTRIBUTE_TEXT:
            problems.append(f"attribute {name!r} must be at most {MAX_ATTRIBUTE_TEXT} characters")
        elif (p := nul_problem(raw.attributes[name], f"attribute {name!r}")) is not None:
            problems.append(p)
    if problems:
        return None, problems
    assert amount is not None and isinstance(occurred_at, datetime)
    return Event(external_id=raw.external_id, customer_id=raw.customer_id, kind=raw.kind,
                 amount=amount, currency=raw.currency, occurred_at=occurred_at,
                 attributes=dict(raw.attributes)), []


def validate_events(inputs: Sequence[EventInput], now: datetime) -> tuple[list[Event],
                                                                          list[Problem]]:
    """Check every event; returns the valid events and the problems (by position), so the
    caller can add problems only the database knows (unknown customers) before raising.

    The batch's size is checked first and raises at once (BATCH_TOO_LARGE / EMPTY_BATCH)."""
    check_batch_size(len(inputs), "events")
    events: list[Event] = []
    problems: list[Problem] = []
    first_seen: dict[str, int] = {}
    for index, raw in enumerate(inputs):
        event, messages = _validate_event(raw, now)
        problems += [Problem(index, m) for m in messages]
        if raw.external_id in first_seen:
            problems.append(Problem(index, f"external_id {raw.external_id!r} repeats "
                                           f"events[{first_seen[raw.external_id]}]"))
        elif raw.external_id:
            first_seen[raw.external_id] = index
        if event is not None:
            events.append(event)
    return events, problems


def unknown_customer_problems(customer_ids: Sequence[str], missing: set[str] | frozenset[str]
                              ) -> list[Problem]:
    """One problem per event (by position) whose customer does not exist."""
    return [Problem(index, f"customer {customer_id!r} does not exist: create it with "
                           "UpsertCustomers first or set create_missing_customers")
            for index, customer_id in enumerate(customer_ids) if customer_id in missing]


# --- batches and reporting -----------------------------------------------------------------

def check_batch_size(count: int, noun: str) -> None:
    if count == 0:
        raise InvalidArgument(f"{noun} is empty: send 1-{MAX_BATCH:,} {noun}",
                              reason="EMPTY_BATCH", metadata={"field": noun})
    if count > MAX_BATCH:
        raise InvalidArgument(
            f"{count:,} {noun} in one batch; at most {MAX_BATCH:,}: split it into several "
            "calls", reason="BATCH_TOO_LARGE",
            metadata={"field": noun, "count": count, "max": MAX_BATCH})


def raise_if_problems(problems: Sequence[Problem], *, noun: str, reason: str) -> None:
    """One InvalidArgument for the whole batch: the first 10 problems in position order, how
    many there are in total, and metadata ``first_index`` and ``count`` (of problems)."""
    if not problems:
        return
    ordered = sorted(problems, key=lambda p: p.index)  # stable: per-item order is kept
    shown = "; ".join(f"{noun}[{p.index}]: {p.message}"
                      for p in ordered[:MAX_REPORTED_PROBLEMS])
    total = len(ordered)
    more = f"; and {total - MAX_REPORTED_PROBLEMS} more" if total > MAX_REPORTED_PROBLEMS else ""
    plural = "problem" if total == 1 else "problems"
    raise InvalidArgument(f"{total} {plural} in {noun}, nothing was written: {shown}{more}",
                          reason=reason,
                          metadata={"field": noun, "first_index": ordered[0].index,
                                    "count": total})
