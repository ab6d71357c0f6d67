"""Transaction periods: windows, limits, time zones and DST, stored form."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import InvalidArgument
from core.periods import (
    MAX_PERIOD,
    FixedPeriod,
    RelativeKind,
    RelativePeriod,
    ResolvedWindow,
    TimeBackPeriod,
    empty_period_error,
    period_from_dict,
    period_to_dict,
    resolve_period,
)

BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2026, 3, 11, 9, 30, tzinfo=UTC)  # a Wednesday


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def reason_of(call: object) -> str:
    assert callable(call)
    with pytest.raises(InvalidArgument) as info:
        call()
    return info.value.reason


# --- fixed ---------------------------------------------------------------------------------


def test_fixed_period_resolves_to_utc() -> None:
    start = datetime(2026, 3, 1, tzinfo=BERLIN)
    end = datetime(2026, 3, 8, tzinfo=BERLIN)
    window = resolve_period(FixedPeriod(start, end), now=NOW)
    assert window == ResolvedWindow(utc(2026, 2, 28, 23), utc(2026, 3, 7, 23))
    assert window.start.tzinfo is UTC


def test_fixed_period_needs_aware_datetimes() -> None:
    with pytest.raises(InvalidArgument) as info:
        FixedPeriod(datetime(2026, 3, 1), utc(2026, 3, 2))
    assert info.value.reason == "INVALID_PERIOD"
    assert info.value.metadata["field"] == "start"


@pytest.mark.parametrize("end", [utc(2026, 3, 1), utc(2026, 2, 28)])
def test_fixed_period_must_end_after_it_starts(end: datetime) -> None:
    assert reason_of(lambda: FixedPeriod(utc(2026, 3, 1), end)) == "INVALID_PERIOD"


def test_fixed_period_longer_than_31_days() -> None:
    with pytest.raises(InvalidArgument) as info:
        FixedPeriod(utc(2026, 1, 1), utc(2026, 2, 2, 5))
    assert info.value.reason == "PERIOD_TOO_LONG"
    assert info.value.message == (
        "the transaction period is 32 days and 5 hours long; the limit is 31 days"
    )


def test_fixed_period_of_exactly_31_days_is_allowed() -> None:
    window = resolve_period(FixedPeriod(utc(2026, 1, 1), utc(2026, 2, 1)), now=NOW)
    assert window.length == MAX_PERIOD


def test_fixed_month_in_one_zone_is_measured_on_its_wall_clock() -> None:
    # October 2026 in Berlin is 31 days + 1 hour of absolute time (DST ends on the 25th).
    start = datetime(2026, 10, 1, tzinfo=BERLIN)
    end = datetime(2026, 11, 1, tzinfo=BERLIN)
    window = resolve_period(FixedPeriod(start, end), now=NOW)
    assert window.length == timedelta(days=31, hours=1)
    # The same instants given as plain UTC are measured in absolute time and refused.
    absolute = (start.astimezone(UTC), end.astimezone(UTC))
    assert reason_of(lambda: FixedPeriod(*absolute)) == "PERIOD_TOO_LONG"


# --- time back -----------------------------------------------------------------------------


def test_time_back_period_ends_now() -> None:
    window = resolve_period(TimeBackPeriod(24, "hours"), now=NOW)
    assert window == ResolvedWindow(NOW - timedelta(hours=24), NOW)
    assert resolve_period(TimeBackPeriod(31, "days"), now=NOW).length == MAX_PERIOD


@pytest.mark.parametrize(
    ("amount", "unit", "reason"),
    [
        (32, "days", "PERIOD_TOO_LONG"),
        (745, "hours", "PERIOD_TOO_LONG"),
        (0, "days", "INVALID_PERIOD"),
        (-1, "hours", "INVALID_PERIOD"),
        (3, "weeks", "INVALID_PERIOD"),
    ],
)
def test_time_back_period_limits(amount: int, unit: str, reason: str) -> None:
    assert reason_of(lambda: TimeBackPeriod(amount, unit)) == reason  # type: ignore[arg-type]


def test_time_back_too_long_message_names_length_and_limit() -> None:
    with pytest.raises(InvalidArgument) as info:
        TimeBackPeriod(40, "days")
    assert "40 days" in info.value.message and "limit is 31 days" in info.value.message


# --- relative: calendar boundaries ---------------------------------------------------------


def test_last_full_day_in_utc() -> None:
    window = resolve_period(RelativePeriod(RelativeKind.LAST_FULL_DAY, "UTC"), now=NOW)
    assert window == ResolvedWindow(utc(2026, 3, 10), utc(2026, 3, 11), "UTC")


def test_last_full_week_is_monday_to_monday() -> None:
    window = resolve_period(RelativePeriod(RelativeKind.LAST_FULL_WEEK, "UTC"), now=NOW)
    assert (window.start, window.end) == (utc(2026, 3, 2), utc(2026, 3, 9))
    assert window.start.weekday() == 0 and window.end.weekday() == 0
    # On a Monday the week that just ended is the last full week.
    monday = resolve_period(
        RelativePeriod(RelativeKind.LAST_FULL_WEEK, "UTC"), now=utc(2026, 3, 9, 0, 0)
    )
    assert (monday.start, monday.end) == (utc(2026, 3, 2), utc(2026, 3, 9))


def test_last_full_month_across_a_year_end() -> None:
    window = resolve_period(
        RelativePeriod(RelativeKind.LAST_FULL_MONTH, "UTC"), now=utc(2026, 1, 15)
    )
    assert (window.start, window.end) == (utc(2025, 12, 1), utc(2026, 1, 1))


@pytest.mark.parametrize(
    ("now", "length"),
    [
        (utc(2026, 4, 10), timedelta(days=31, hours=-1)),  # March: DST starts on the 29th
        (utc(2026, 11, 10), timedelta(days=31, hours=1)),  # October: DST ends on the 25th
        (utc(2026, 3, 10), timedelta(days=28)),  # February
    ],
)
def test_last_full_month_in_berlin_is_allowed_across_dst(now: datetime, length: timedelta) -> None:
    window = resolve_period(RelativePeriod(RelativeKind.LAST_FULL_MONTH, "Europe/Berlin"), now=now)
    assert window.length == length
    assert window.start.astimezone(BERLIN).day == 1
    assert window.start.astimezone(BERLIN).hour == 0


def test_today_so_far() -> None:
    window = resolve_period(RelativePeriod(RelativeKind.TODAY_SO_FAR, "Europe/Berlin"), now=NOW)
    assert window == ResolvedWindow(utc(2026, 3, 10, 23), NOW, "Europe/Berlin")


def test_today_so_far_at_local_midnight_is_an_empty_period() -> None:
    period = RelativePeriod(RelativeKind.TODAY_SO_FAR, "UTC")
    assert reason_of(lambda: resolve_period(period, now=utc(2026, 3, 11))) == "INVALID_PERIOD"


def test_an_empty_period_allowed_is_an_empty_window_and_its_error_is_the_same() -> None:
    """Callers resolving many customers' windows take the empty one instead of the error
    (storage.bonuses.add_requests); empty_period_error is what resolve_period raises."""
    period = RelativePeriod(RelativeKind.TODAY_SO_FAR, None)
    midnight_berlin = utc(2026, 3, 10, 23)
    window = resolve_period(period, now=midnight_berlin, customer_time_zone="Europe/Berlin",
                            allow_empty=True)
    assert window == ResolvedWindow(midnight_berlin, midnight_berlin, "Europe/Berlin")
    assert window.is_empty
    with pytest.raises(InvalidArgument) as raised:
        resolve_period(period, now=midnight_berlin, customer_time_zone="Europe/Berlin")
    expected = empty_period_error(period, "Europe/Berlin", midnight_berlin)
    assert (raised.value.message, raised.value.reason) == (expected.message, expected.reason)
    assert raised.value.message == (
        "the today_so_far period in Europe/Berlin is empty at 2026-03-10T23:00:00+00:00")
    # Not empty an instant later, nor for another zone at the same moment.
    later = resolve_period(period, now=midnight_berlin + timedelta(microseconds=1),
                           customer_time_zone="Europe/Berlin", allow_empty=True)
    assert not later.is_empty and later.length == timedelta(microseconds=1)
    assert not resolve_period(period, now=midnight_berlin, customer_time_zone="UTC",
                              allow_empty=True).is_empty


# --- DST -----------------------------------------------------------------------------------


def test_berlin_days_of_23_and_25_hours() -> None:
    period = RelativePeriod(RelativeKind.LAST_FULL_DAY, "Europe/Berlin")
    spring = resolve_period(period, now=datetime(2026, 3, 30, 8, tzinfo=BERLIN))
    autumn = resolve_period(period, now=datetime(2026, 10, 26, 8, tzinfo=BERLIN))
    assert spring == ResolvedWindow(utc(2026, 3, 28, 23), utc(2026, 3, 29, 22), "Europe/Berlin")
    assert spring.length == timedelta(hours=23)
    assert autumn == ResolvedWindow(utc(2026, 10, 24, 22), utc(2026, 10, 25, 23), "Europe/Berlin")
    assert autumn.length == timedelta(hours=25)


@pytest.mark.parametrize(
    ("first_day", "shift"),
    [(date(2026, 3, 24), timedelta(hours=-1)), (date(2026, 10, 20), timedelta(hours=1))],
)
def test_consecutive_days_tile_the_timeline_across_dst(first_day: date, shift: timedelta) -> None:
    period = RelativePeriod(RelativeKind.LAST_FULL_DAY, "Europe/Berlin")
    windows = []
    for offset in range(1, 12):
        # any moment of the following local day selects the day before as "last full day"
        day_after = first_day + timedelta(days=offset)
        now = datetime.combine(day_after, datetime.min.time(), tzinfo=BERLIN) + timedelta(
            hours=(offset * 5) % 23, minutes=offset
        )
        windows.append(resolve_period(period, now=now))
    for earlier, later in itertools.pairwise(windows):
        assert earlier.end == later.start  # no gap, no overlap
    for day, window in enumerate(windows):
        local_start = window.start.astimezone(BERLIN)
        assert (local_start.date(), local_start.hour) == (first_day + timedelta(days=day), 0)
    total = windows[-1].end - windows[0].start
    assert total == sum((w.length for w in windows), timedelta())
    assert total == timedelta(days=len(windows)) + shift  # exactly one DST change inside
    assert sorted({w.length for w in windows}) in (
        [timedelta(hours=23), timedelta(hours=24)],
        [timedelta(hours=24), timedelta(hours=25)],
    )


def test_last_weekend_depends_on_the_customer_time_zone() -> None:
    # Monday 03:00 UTC: already Monday noon in Tokyo, still Sunday evening in New York.
    now = utc(2026, 3, 9, 3)
    period = RelativePeriod(RelativeKind.LAST_WEEKEND)
    tokyo = resolve_period(period, now=now, customer_time_zone="Asia/Tokyo")
    new_york = resolve_period(period, now=now, customer_time_zone="America/New_York")
    # Tokyo: the weekend of March 7-8 is over.
    assert (tokyo.start, tokyo.end) == (utc(2026, 3, 6, 15), utc(2026, 3, 8, 15))
    # New York: that weekend is still running, so the last one is February 28 - March 1.
    assert (new_york.start, new_york.end) == (utc(2026, 2, 28, 5), utc(2026, 3, 2, 5))
    assert tokyo.time_zone == "Asia/Tokyo" and new_york.time_zone == "America/New_York"


def test_last_weekend_across_the_us_dst_change_is_47_hours() -> None:
    period = RelativePeriod(RelativeKind.LAST_WEEKEND, "America/New_York")
    window = resolve_period(period, now=utc(2026, 3, 10, 12))
    assert (window.start, window.end) == (utc(2026, 3, 7, 5), utc(2026, 3, 9, 4))
    assert window.length == timedelta(hours=47)


def test_a_fixed_zone_wins_over_the_customer_zone() -> None:
    period = RelativePeriod(RelativeKind.LAST_FULL_DAY, "Asia/Tokyo")
    window = resolve_period(period, now=NOW, customer_time_zone="America/New_York")
    assert window.time_zone == "Asia/Tokyo"


def test_customer_without_zone_falls_back_to_the_default() -> None:
    period = RelativePeriod(RelativeKind.LAST_FULL_DAY)
    assert resolve_period(period, now=NOW).time_zone == "UTC"
    window = resolve_period(
        period, now=NOW, customer_time_zone=None, default_time_zone="Asia/Tokyo"
    )
    assert window == ResolvedWindow(utc(2026, 3, 9, 15), utc(2026, 3, 10, 15), "Asia/Tokyo")


# "localtime" and the rest are files of the zone database, not zones (the host's own setting).
@pytest.mark.parametrize("zone", ["Mars/Olympus", "", "../etc/passwd", "/etc/localtime",
                                  "localtime", "LocalTime", "posixrules", "Factory"])
def test_unknown_time_zones(zone: str) -> None:
    period = RelativePeriod(RelativeKind.LAST_FULL_DAY)
    call = lambda: resolve_period(period, now=NOW, customer_time_zone=zone or None,  # noqa: E731
                                  default_time_zone=zone)  # fmt: skip
    assert reason_of(call) == "INVALID_TIME_ZONE"
    assert reason_of(lambda: RelativePeriod(RelativeKind.LAST_FULL_DAY, zone)) == (
        "INVALID_TIME_ZONE"
    )


def test_now_must_be_aware() -> None:
    period = TimeBackPeriod(1, "days")
    assert reason_of(lambda: resolve_period(period, now=datetime(2026, 3, 1))) == "INVALID_PERIOD"


ZONES = ["Europe/Berlin", "America/New_York", "Asia/Tokyo", "Australia/Lord_Howe",
         "America/Santiago", "Asia/Kathmandu", "UTC"]  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    now=st.datetimes(
        min_value=datetime(2024, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
    ),
    kind=st.sampled_from(list(RelativeKind)),
)
def test_relative_windows_are_sane_everywhere(zone: str, now: datetime, kind: RelativeKind) -> None:
    period = RelativePeriod(kind, zone)
    try:
        window = resolve_period(period, now=now)
    except InvalidArgument as exc:  # only an empty "today so far" at midnight
        assert kind is RelativeKind.TODAY_SO_FAR and exc.reason == "INVALID_PERIOD"
        return
    assert window.start < window.end <= now
    assert window.length <= MAX_PERIOD + timedelta(hours=1)
    if kind is RelativeKind.LAST_FULL_DAY:
        # the next day's window starts where this one ends
        later = resolve_period(period, now=window.end + timedelta(days=1, hours=1))
        assert later.start == window.end


# --- stored form ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "period",
    [
        FixedPeriod(utc(2026, 1, 1), utc(2026, 1, 8)),
        FixedPeriod(datetime(2026, 10, 1, tzinfo=BERLIN), datetime(2026, 11, 1, tzinfo=BERLIN)),
        TimeBackPeriod(48, "hours"),
        TimeBackPeriod(7, "days"),
        RelativePeriod(RelativeKind.LAST_WEEKEND, None),
        RelativePeriod(RelativeKind.LAST_FULL_MONTH, "Europe/Berlin"),
    ],
)
def test_period_dict_round_trip(period: FixedPeriod | TimeBackPeriod | RelativePeriod) -> None:
    stored = period_to_dict(period)
    again = period_from_dict(stored)
    assert resolve_period(again, now=NOW) == resolve_period(period, now=NOW)
    assert period_to_dict(again) == stored


def test_fixed_period_dict_keeps_the_zone() -> None:
    stored = period_to_dict(
        FixedPeriod(datetime(2026, 10, 1, tzinfo=BERLIN), datetime(2026, 11, 1, tzinfo=BERLIN))
    )
    assert stored == {
        "type": "fixed",
        "start": "2026-10-01T00:00:00+02:00",
        "end": "2026-11-01T00:00:00+01:00",
        "time_zone": "Europe/Berlin",
    }


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        ({"type": "weekly"}, "type", "INVALID_PERIOD"),
        ({"kind": "last_full_day"}, "type", "INVALID_PERIOD"),
        ({"type": "relative", "kind": "yesterday", "time_zone": None}, "kind", "INVALID_PERIOD"),
        ({"type": "relative", "kind": "last_full_day"}, "time_zone", "INVALID_PERIOD"),
        ({"type": "relative", "kind": "last_full_day", "time_zone": 5}, "time_zone",
         "INVALID_PERIOD"),
        ({"type": "relative", "kind": "last_full_day", "time_zone": "Nowhere/City"}, "time_zone",
         "INVALID_TIME_ZONE"),
        ({"type": "relative", "kind": "last_full_day", "time_zone": None, "tz": "UTC"}, "tz",
         "INVALID_PERIOD"),
        ({"type": "time_back", "amount": "3", "unit": "days"}, "amount", "INVALID_PERIOD"),
        ({"type": "time_back", "amount": True, "unit": "days"}, "amount", "INVALID_PERIOD"),
        ({"type": "time_back", "amount": 3, "unit": "weeks"}, "unit", "INVALID_PERIOD"),
        ({"type": "time_back", "unit": "days"}, "amount", "INVALID_PERIOD"),
        ({"type": "fixed", "start": "2026-01-01T00:00:00", "end": "2026-01-02T00:00:00Z"},
         "start", "INVALID_PERIOD"),
        ({"type": "fixed", "start": "yesterday", "end": "2026-01-02T00:00:00Z"}, "start",
         "INVALID_PERIOD"),
        ({"type": "fixed", "start": "2026-01-01T00:00:00Z"}, "end", "INVALID_PERIOD"),
        ({"type": "fixed", "start": "2026-01-01T00:00:00Z", "end": "2026-03-01T00:00:00Z"},
         None, "PERIOD_TOO_LONG"),
    ],
)  # fmt: skip
def test_period_from_dict_rejects_bad_shapes(
    data: dict[str, object], field: str | None, reason: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        period_from_dict(data)
    assert info.value.reason == reason
    if field is not None:
        assert info.value.metadata["field"] == field
        assert field in info.value.message


def test_period_from_dict_rejects_non_objects() -> None:
    assert reason_of(lambda: period_from_dict([1, 2])) == "INVALID_PERIOD"  # type: ignore[arg-type]
