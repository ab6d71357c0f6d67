"""core.bonuses.schedule_periods: which schedules are refused because every run would read an
empty period (only 00:00 in the zone of a "today so far" period, or in a zone keeping its
clock)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, time

import pytest

from core.bonuses.rules import Schedule
from core.bonuses.schedule_periods import check_schedule_period
from core.errors import InvalidArgument
from core.periods import Period, RelativeKind, RelativePeriod, TimeBackPeriod

MIDNIGHT_UTC = Schedule(schedule_id="s", definition_id="today", customer_ids=("a1",),
                        weekday=None, local_time=time(0), time_zone="UTC")
TODAY_UTC = RelativePeriod(RelativeKind.TODAY_SO_FAR, "UTC")
NOW = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)


def test_a_run_at_midnight_in_the_periods_zone_is_refused() -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_schedule_period(MIDNIGHT_UTC, TODAY_UTC, now=NOW)
    assert (caught.value.reason, caught.value.metadata) == ("INVALID_PERIOD",
                                                            {"field": "local_time"})
    weekly = replace(MIDNIGHT_UTC, weekday=1)
    with pytest.raises(InvalidArgument):
        check_schedule_period(weekly, TODAY_UTC, now=NOW)


@pytest.mark.parametrize(("schedule", "period"), [
    (replace(MIDNIGHT_UTC, local_time=time(0, 1)), TODAY_UTC),
    (replace(MIDNIGHT_UTC, time_zone="Europe/Berlin"), TODAY_UTC),
    # Same offset half of the year only: the winter runs read an hour.
    (replace(MIDNIGHT_UTC, time_zone="Europe/London"), TODAY_UTC),
    (replace(MIDNIGHT_UTC, time_zone="Europe/Berlin"),
     RelativePeriod(RelativeKind.TODAY_SO_FAR, "Europe/London")),
    (MIDNIGHT_UTC, RelativePeriod(RelativeKind.TODAY_SO_FAR)),  # each customer's zone
    (MIDNIGHT_UTC, RelativePeriod(RelativeKind.LAST_FULL_DAY, "UTC")),
    (MIDNIGHT_UTC, TimeBackPeriod(1, "days")),
    (MIDNIGHT_UTC, None),  # PROPERTIES_ONLY
    (replace(MIDNIGHT_UTC, active=False), TODAY_UTC),  # paused: it does not run
    (replace(MIDNIGHT_UTC, customer_ids=(), campaign_id="c", since_campaign_entrance=True),
     TODAY_UTC),  # the campaign's own period
])
def test_schedules_that_can_read_something_are_accepted(schedule: Schedule,
                                                        period: Period | None) -> None:
    check_schedule_period(schedule, period, now=NOW)


@pytest.mark.parametrize(("run_zone", "period_zone"), [
    ("Etc/UTC", "UTC"),  # one zone, two names
    ("UTC", "Etc/Universal"),
    ("Europe/Kiev", "Europe/Kyiv"),  # renamed in 2022, both names still valid
    ("US/Eastern", "America/New_York"),
    ("Europe/Lisbon", "Europe/London"),  # two zones keeping the same clock
])
def test_midnight_in_a_zone_keeping_the_periods_clock_is_refused(run_zone: str,
                                                                 period_zone: str) -> None:
    """Compared by name, these were accepted and every run was skipped (logged) instead."""
    with pytest.raises(InvalidArgument) as caught:
        check_schedule_period(replace(MIDNIGHT_UTC, time_zone=run_zone),
                              RelativePeriod(RelativeKind.TODAY_SO_FAR, period_zone), now=NOW)
    assert (caught.value.reason, caught.value.metadata) == ("INVALID_PERIOD",
                                                            {"field": "local_time"})
    assert f"the schedule's {run_zone} keeps the same clock" in str(caught.value)
