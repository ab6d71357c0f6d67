"""Transaction periods: the window of a customer's events that a dynamic-bonus formula reads.

Three kinds of period exist, as in the vendor's "Period of time, for which to take
transactions" option:

* ``FixedPeriod(start, end)``: fixed dates, given as time-zone-aware datetimes.
* ``TimeBackPeriod(amount, unit)``: the last N hours or days, ending at the calculation time.
* ``RelativePeriod(kind, time_zone)``: a calendar period relative to the calculation time: the
  last full day, the last full week (Monday 00:00 to Monday 00:00), the last full month, the
  last weekend (Saturday 00:00 to Monday 00:00) or today so far, in a fixed time zone or, with
  ``time_zone=None``, in each customer's own time zone.

Every window is half-open, ``[start, end)``, and resolved to UTC datetimes, so consecutive
windows tile the timeline: an event at exactly midnight belongs to the day that starts then.

Time zones
    Calendar boundaries are local midnights computed with :mod:`zoneinfo`, so a day in
    Europe/Berlin is 23 hours long on 2026-03-29 and 25 hours on 2026-10-25; nothing is lost or
    counted twice. A midnight that does not exist locally (a DST gap at 00:00) starts at the
    transition instant; an ambiguous one uses its first occurrence (``fold=0``). With
    ``time_zone=None`` the customer's zone (passed to :func:`resolve_period`) is used; a customer
    without a zone falls back to ``default_time_zone`` (UTC unless the caller says otherwise,
    typically the promotion's zone). An unknown zone name is an ``INVALID_TIME_ZONE`` error, never
    a silent fallback, because a wrong window means a wrong bonus.

Length limit
    A window may be at most 31 days (``MAX_PERIOD``), the vendor's limit; longer is
    ``PERIOD_TOO_LONG``. Relative periods are measured in local calendar days, so a full
    31-day month is allowed even when a DST change makes it 31 days +/- 1 hour in UTC. Fixed
    and time-back periods are measured in absolute time, with one refinement: a fixed period
    whose two ends carry the same zoneinfo zone is measured in that zone's wall-clock time, so
    "2026-10-01 to 2026-11-01, Europe/Berlin" is the 31-day month it looks like. A "day" of a
    time-back period is 24 hours.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Literal, cast
from zoneinfo import ZoneInfo

from core.errors import InvalidArgument

MAX_PERIOD = timedelta(days=31)
MAX_PERIOD_DAYS = 31

TimeUnit = Literal["hours", "days"]
_UNITS: dict[str, timedelta] = {"hours": timedelta(hours=1), "days": timedelta(days=1)}


class RelativeKind(enum.Enum):
    """Calendar periods relative to the calculation time, in a local time zone."""

    LAST_FULL_DAY = "last_full_day"
    """Yesterday, local midnight to local midnight."""
    LAST_FULL_WEEK = "last_full_week"
    """The last completed Monday 00:00 to Monday 00:00 week."""
    LAST_FULL_MONTH = "last_full_month"
    """The last completed calendar month."""
    LAST_WEEKEND = "last_weekend"
    """The last *completed* weekend, Saturday 00:00 to Monday 00:00; on a Saturday or Sunday
    this is the weekend before, because the current one is not over yet."""
    TODAY_SO_FAR = "today_so_far"
    """Local midnight today until now."""


# Files of the zone database that are not zones (lower-cased): "localtime" is the host's own
# setting, so boundaries would move with the server's configuration; "Factory" has no offset.
NOT_ZONES = frozenset({"localtime", "posixrules", "factory"})


def load_time_zone(name: str, *, field: str = "time_zone") -> ZoneInfo:
    """Look up an IANA time zone, turning every failure into INVALID_TIME_ZONE.

    ZoneInfo raises several exception types for bad keys (not found, malformed path, empty);
    callers should only ever see the domain error.
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgument(
            f"{field} must be an IANA time zone name such as 'Europe/Berlin', got {name!r}",
            reason="INVALID_TIME_ZONE",
            metadata={"field": field},
        )
    if name.lower() in NOT_ZONES:
        raise InvalidArgument(
            f"{name!r} in {field} is not a named time zone; use an IANA name such as "
            "'Europe/Berlin'", reason="INVALID_TIME_ZONE",
            metadata={"field": field, "value": name})
    try:
        return ZoneInfo(name)
    except Exception as exc:  # ZoneInfoNotFoundError, ValueError, OSError...
        raise InvalidArgument(
            f"unknown time zone {name!r} in {field}; use an IANA name such as 'Europe/Berlin'",
            reason="INVALID_TIME_ZONE",
            metadata={"field": field, "value": name},
        ) from exc


def _require_aware(value: object, field: str) -> datetime:
    if not isinstance(value, datetime):
        raise InvalidArgument(
            f"{field} must be a datetime, got {type(value).__name__}",
            reason="INVALID_PERIOD",
            metadata={"field": field},
        )
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidArgument(
            f"{field} must carry a time zone (got the naive datetime {value.isoformat()})",
            reason="INVALID_PERIOD",
            metadata={"field": field},
        )
    return value


def describe_length(length: timedelta) -> str:
    """Say a duration the way an operator reads it: '32 days and 5 hours'."""
    total_minutes = int(length.total_seconds() // 60)
    days, rest = divmod(total_minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    parts = []
    if days:
        parts.append(f"{days} day{'s' if days != 1 else ''}")
    if hours:
        parts.append(f"{hours} hour{'s' if hours != 1 else ''}")
    if minutes or not parts:
        parts.append(f"{minutes} minute{'s' if minutes != 1 else ''}")
    return " and ".join(parts)


def _too_long(length_text: str) -> InvalidArgument:
    return InvalidArgument(
        f"the transaction period is {length_text} long; the limit is {MAX_PERIOD_DAYS} days",
        reason="PERIOD_TOO_LONG",
        metadata={"limit_days": MAX_PERIOD_DAYS},
    )


def _same_zone_key(a: datetime, b: datetime) -> str | None:
    za, zb = a.tzinfo, b.tzinfo
    if isinstance(za, ZoneInfo) and isinstance(zb, ZoneInfo) and za.key == zb.key:
        return za.key
    return None


def _fixed_length(start: datetime, end: datetime) -> timedelta:
    """Absolute length, or wall-clock length when both ends share one zoneinfo zone."""
    if _same_zone_key(start, end) is not None:
        return end.replace(tzinfo=None) - start.replace(tzinfo=None)
    return end.astimezone(UTC) - start.astimezone(UTC)


def _check_absolute_window(start: datetime, end: datetime, length: timedelta) -> None:
    # As instants: two datetimes sharing one tzinfo compare by wall clock, so inside the hour a
    # fall-back repeats, 02:30 CET (the second one) would not count as after 02:30 CEST.
    if end.astimezone(UTC) <= start.astimezone(UTC):
        raise InvalidArgument(
            f"the period must end after it starts (start {start.isoformat()}, "
            f"end {end.isoformat()})",
            reason="INVALID_PERIOD",
            metadata={"field": "end"},
        )
    if length > MAX_PERIOD:
        raise _too_long(describe_length(length))


@dataclass(frozen=True)
class FixedPeriod:
    """Fixed dates. Both ends must be aware; the window is [start, end)."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        start = _require_aware(self.start, "start")
        end = _require_aware(self.end, "end")
        _check_absolute_window(start, end, _fixed_length(start, end))

    @property
    def time_zone(self) -> str | None:
        """The IANA zone both ends are given in, whose wall clock measures the length; None
        for instants with a plain UTC offset (measured in absolute time, i.e. as UTC)."""
        return _same_zone_key(self.start, self.end)


@dataclass(frozen=True)
class TimeBackPeriod:
    """The last ``amount`` hours or days before the calculation time."""

    amount: int
    unit: TimeUnit

    def __post_init__(self) -> None:
        if isinstance(self.amount, bool) or not isinstance(self.amount, int) or self.amount < 1:
            raise InvalidArgument(
                f"amount must be a whole number of at least 1, got {self.amount!r}",
                reason="INVALID_PERIOD",
                metadata={"field": "amount"},
            )
        if self.unit not in _UNITS:
            raise InvalidArgument(
                f"unit must be 'hours' or 'days', got {self.unit!r}",
                reason="INVALID_PERIOD",
                metadata={"field": "unit"},
            )
        try:
            length = self.length
        except OverflowError:  # more days than timedelta holds: far past the limit anyway
            raise _too_long(f"{self.amount} {self.unit}") from None
        if length > MAX_PERIOD:
            raise _too_long(f"{self.amount} {self.unit} ({describe_length(length)})")

    @property
    def length(self) -> timedelta:
        """The window's absolute length (a day is 24 hours)."""
        return self.amount * _UNITS[self.unit]


@dataclass(frozen=True)
class RelativePeriod:
    """A calendar period relative to now; ``time_zone=None`` means each customer's own zone."""

    kind: RelativeKind
    time_zone: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, RelativeKind):
            raise InvalidArgument(
                f"kind must be one of {', '.join(k.value for k in RelativeKind)}, "
                f"got {self.kind!r}",
                reason="INVALID_PERIOD",
                metadata={"field": "kind"},
            )
        if self.time_zone is not None:
            load_time_zone(self.time_zone)


Period = FixedPeriod | TimeBackPeriod | RelativePeriod


@dataclass(frozen=True)
class ResolvedWindow:
    """A concrete half-open window [start, end) in UTC.

    ``time_zone`` names the zone whose calendar produced it (relative periods only), so a
    calculation can be explained ("last full day in Europe/Berlin").
    """

    start: datetime
    end: datetime
    time_zone: str | None = None

    @property
    def is_empty(self) -> bool:
        """Nothing can fall in it (start = end)."""
        return self.end <= self.start

    @property
    def length(self) -> timedelta:
        """Absolute length of the window."""
        return self.end - self.start

    def contains(self, moment: datetime) -> bool:
        """Whether an aware instant falls in [start, end)."""
        return self.start <= moment < self.end


def local_midnight(day: date, zone: tzinfo) -> datetime:
    """The first instant of ``day`` in ``zone`` as UTC (fold=0; a DST gap starts at the jump)."""
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def _relative_bounds(kind: RelativeKind, today: date) -> tuple[date, date | None]:
    """Local calendar dates of the window's ends; None as end means 'now'."""
    if kind is RelativeKind.LAST_FULL_DAY:
        return today - timedelta(days=1), today
    if kind is RelativeKind.TODAY_SO_FAR:
        return today, None
    this_monday = today - timedelta(days=today.weekday())
    if kind is RelativeKind.LAST_FULL_WEEK:
        return this_monday - timedelta(days=7), this_monday
    if kind is RelativeKind.LAST_WEEKEND:
        return this_monday - timedelta(days=2), this_monday
    first_of_month = today.replace(day=1)
    previous = (first_of_month - timedelta(days=1)).replace(day=1)
    return previous, first_of_month


def empty_period_error(period: RelativePeriod, zone_name: str | None,
                       now: datetime) -> InvalidArgument:
    """The error for a relative period that has not started yet at ``now`` in ``zone_name``
    (the only way a period resolves empty: "today so far" at local midnight)."""
    return InvalidArgument(
        f"the {period.kind.value} period in {zone_name} is empty at {now.isoformat()}",
        reason="INVALID_PERIOD",
        metadata={"field": "kind"},
    )


def resolve_period(
    period: Period,
    *,
    now: datetime,
    customer_time_zone: str | None = None,
    default_time_zone: str = "UTC",
    allow_empty: bool = False,
) -> ResolvedWindow:
    """Turn a period into the concrete UTC window to read, as of ``now``.

    ``now`` must be aware (a naive clock is ambiguous across zones). ``customer_time_zone`` only
    matters for relative periods without a fixed zone; when it is None or empty,
    ``default_time_zone`` is used. Raises InvalidArgument with reason INVALID_PERIOD,
    INVALID_TIME_ZONE or PERIOD_TOO_LONG. "Today so far" read at local midnight is empty: with
    ``allow_empty`` that gives an empty window (``is_empty``, start = end) instead of the
    error, for callers resolving many customers' windows at once (one customer's midnight must
    not fail the others'); :func:`empty_period_error` is then the error it would have been.
    """
    now = _require_aware(now, "now")
    now_utc = now.astimezone(UTC)
    if isinstance(period, FixedPeriod):
        start, end = period.start, period.end
        _check_absolute_window(start, end, _fixed_length(start, end))
        return ResolvedWindow(start.astimezone(UTC), end.astimezone(UTC))
    if isinstance(period, TimeBackPeriod):
        return ResolvedWindow(now_utc - period.length, now_utc)
    if not isinstance(period, RelativePeriod):
        raise InvalidArgument(
            f"unsupported period {period!r}",
            reason="INVALID_PERIOD",
            metadata={"field": "period"},
        )
    if period.time_zone is not None:
        zone_name = period.time_zone
        zone = load_time_zone(zone_name)
    elif customer_time_zone:
        zone_name = customer_time_zone
        zone = load_time_zone(zone_name, field="customer_time_zone")
    else:
        zone_name = default_time_zone
        zone = load_time_zone(zone_name, field="default_time_zone")
    today = now_utc.astimezone(zone).date()
    first_day, last_day = _relative_bounds(period.kind, today)
    start = local_midnight(first_day, zone)
    end = now_utc if last_day is None else local_midnight(last_day, zone)
    if end <= start:
        if allow_empty:
            return ResolvedWindow(start, start, zone_name)
        raise empty_period_error(period, zone_name, now)
    calendar_days = ((last_day or today) - first_day).days
    if calendar_days > MAX_PERIOD_DAYS:  # pragma: no cover - no relative kind is that long
        raise _too_long(f"{calendar_days} days")
    return ResolvedWindow(start, end, zone_name)


# --- stored form ---------------------------------------------------------------------------

_FIELDS = {
    "fixed": {"type", "start", "end", "time_zone"},
    "time_back": {"type", "amount", "unit"},
    "relative": {"type", "kind", "time_zone"},
}


def _bad(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(
        f"period.{field}: {message}", reason="INVALID_PERIOD", metadata={"field": field}
    )


def _get(d: Mapping[str, object], field: str, kind: type) -> object:
    if field not in d:
        raise _bad(field, "is required")
    value = d[field]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _bad(field, f"must be {kind.__name__}, got {type(value).__name__}")
    return value


def _parse_instant(d: Mapping[str, object], field: str, zone: ZoneInfo | None) -> datetime:
    text = cast(str, _get(d, field, str))
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise _bad(field, f"is not an ISO 8601 date-time: {text!r}") from exc
    if value.tzinfo is None:
        raise _bad(field, f"must include a UTC offset, e.g. {text}+00:00")
    return value.astimezone(zone) if zone is not None else value


def period_from_dict(d: Mapping[str, object]) -> Period:
    """Rebuild a period from its stored JSON form, validating every field.

    Shapes: ``{"type": "fixed", "start": ISO, "end": ISO, "time_zone"?: str}``,
    ``{"type": "time_back", "amount": int, "unit": "hours"|"days"}``,
    ``{"type": "relative", "kind": "last_full_day"|..., "time_zone": str|null}``.
    Unknown or missing fields are errors naming the field: a typo must not silently widen a
    window.
    """
    if not isinstance(d, Mapping):
        raise _bad("type", f"a period must be an object, got {type(d).__name__}")
    kind_name = _get(d, "type", str)
    if kind_name not in _FIELDS:
        raise _bad("type", f"must be one of {', '.join(sorted(_FIELDS))}, got {kind_name!r}")
    unknown = sorted(str(k) for k in d if k not in _FIELDS[kind_name])
    if unknown:
        raise _bad(unknown[0], f"is not a field of a {kind_name} period")
    if kind_name == "fixed":
        zone: ZoneInfo | None = None
        if d.get("time_zone") is not None:
            zone = load_time_zone(cast(str, _get(d, "time_zone", str)))
        return FixedPeriod(_parse_instant(d, "start", zone), _parse_instant(d, "end", zone))
    if kind_name == "time_back":
        amount = cast(int, _get(d, "amount", int))
        unit = cast(str, _get(d, "unit", str))
        if unit not in _UNITS:
            raise _bad("unit", f"must be 'hours' or 'days', got {unit!r}")
        return TimeBackPeriod(amount, cast(TimeUnit, unit))
    kind_value = cast(str, _get(d, "kind", str))
    try:
        relative_kind = RelativeKind(kind_value)
    except ValueError as exc:
        known = ", ".join(k.value for k in RelativeKind)
        raise _bad("kind", f"must be one of {known}, got {kind_value!r}") from exc
    if "time_zone" not in d:
        raise _bad("time_zone", "is required (null means each customer's own time zone)")
    tz = d["time_zone"]
    if tz is not None and not isinstance(tz, str):
        raise _bad("time_zone", f"must be text or null, got {type(tz).__name__}")
    return RelativePeriod(relative_kind, tz)


def period_to_dict(p: Period) -> dict[str, object]:
    """The JSON-able stored form of a period (the inverse of :func:`period_from_dict`)."""
    if isinstance(p, FixedPeriod):
        out: dict[str, object] = {
            "type": "fixed",
            "start": p.start.isoformat(),
            "end": p.end.isoformat(),
        }
        if p.time_zone is not None:
            out["time_zone"] = p.time_zone
        return out
    if isinstance(p, TimeBackPeriod):
        return {"type": "time_back", "amount": p.amount, "unit": p.unit}
    if isinstance(p, RelativePeriod):
        return {"type": "relative", "kind": p.kind.value, "time_zone": p.time_zone}
    raise InvalidArgument(
        f"unsupported period {p!r}", reason="INVALID_PERIOD", metadata={"field": "type"}
    )
