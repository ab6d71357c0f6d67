"""Cap periods: which window a grant is charged to, in the promotion's own time zone.

A window is [start, next start) of a local calendar day, ISO week (Monday) or month, converted to
UTC. Computing local midnights with zoneinfo (rather than adding 24 hours) makes DST days 23 or
25 hours long, so no hour is lost or counted twice. LIFETIME has one window that never ends.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from core.catalogue.promotions import CapPeriod

LIFETIME_START = datetime(1970, 1, 1, tzinfo=UTC)


def _local_midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def _first_day(period: CapPeriod, local_day: date) -> date:
    if period is CapPeriod.DAILY:
        return local_day
    if period is CapPeriod.WEEKLY:
        return local_day - timedelta(days=local_day.weekday())
    if period is CapPeriod.MONTHLY:
        return local_day.replace(day=1)
    raise ValueError(period)


def _next_first_day(period: CapPeriod, first: date) -> date:
    if period is CapPeriod.DAILY:
        return first + timedelta(days=1)
    if period is CapPeriod.WEEKLY:
        return first + timedelta(days=7)
    return (first.replace(day=28) + timedelta(days=4)).replace(day=1)


def period_window(period: CapPeriod, now: datetime,
                  time_zone: str) -> tuple[datetime, datetime | None]:
    """The UTC [start, end) of the window containing ``now``; end is None for LIFETIME."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if period is CapPeriod.LIFETIME:
        return LIFETIME_START, None
    zone = ZoneInfo(time_zone)
    first = _first_day(period, now.astimezone(zone).date())
    return _local_midnight(first, zone), _local_midnight(_next_first_day(period, first), zone)


def period_start(period: CapPeriod, now: datetime, time_zone: str) -> datetime:
    return period_window(period, now, time_zone)[0]
