"""Whether a schedule's runs can ever read a transaction period (checked when it is saved).

A "today so far" period runs from local midnight until the run. A schedule that runs at 00:00 in
the period's own zone therefore reads an empty period on every run: refuse it when saved rather
than skip each run. "The period's own zone" is a matter of clocks, not names: UTC and Etc/UTC,
Europe/Kiev and Europe/Kyiv, or two zones that keep the same time (Europe/London and
Europe/Lisbon), are the same zone here when their midnights coincide on every day of the next
two years. Only that certain case is refused; where it depends on the customers (a period in
each customer's zone) or on the date (another zone, whose offset differs part of the year), the
worker leaves out the customers whose period is empty at a run (logged) and skips a run only
when it is empty for all of them.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta

from core.bonuses.rules import Schedule
from core.errors import InvalidArgument
from core.periods import Period, RelativeKind, RelativePeriod, load_time_zone, local_midnight

# How far ahead "every run" is checked: a little over two years of daily runs (zone rules are
# not known further than their next changes anyway).
SAME_CLOCK_DAYS = 800


def midnights_coincide(run_zone_name: str, period_zone_name: str, *, now: datetime) -> bool:
    """Whether a run at 00:00 in ``run_zone_name`` is the start of the day in
    ``period_zone_name`` (so "today so far" there is empty at the run) on every day from
    ``now`` for SAME_CLOCK_DAYS days: always for one zone under two names, never for zones
    whose offsets differ part of the year. Compared as instants, the way the run time and the
    period are resolved: a 00:00 that a DST jump skips is the instant of the jump in both."""
    if run_zone_name == period_zone_name:
        return True
    run_zone = load_time_zone(run_zone_name)
    period_zone = load_time_zone(period_zone_name)
    first = now.astimezone(run_zone).date()
    for n in range(SAME_CLOCK_DAYS):
        run_at = local_midnight(first + timedelta(days=n), run_zone)
        if local_midnight(run_at.astimezone(period_zone).date(), period_zone) != run_at:
            return False
    return True


def check_schedule_period(schedule: Schedule, period: Period | None, *, now: datetime,
                          reads_transactions: bool = True) -> None:
    """Raise INVALID_ARGUMENT INVALID_PERIOD (field ``local_time``) when every run of the
    active ``schedule`` would find the definition's ``period`` empty; and (field
    ``since_campaign_entrance``) when the schedule picks a transaction period for a definition
    that reads customer properties only, which has none to pick (seed 004: "no Transaction
    period options"; a rule's period_mode is refused alike), instead of ignoring it."""
    if schedule.since_campaign_entrance and not reads_transactions:
        raise InvalidArgument(
            f"since_campaign_entrance: definition {schedule.definition_id!r} reads customer "
            "properties only and has no transaction period to start at the campaign "
            "entrance: leave since_campaign_entrance unset",
            reason="INVALID_PERIOD", metadata={"field": "since_campaign_entrance"})
    if not schedule.active or schedule.since_campaign_entrance:
        return  # a paused schedule does not run; the campaign's own period replaces it
    if not isinstance(period, RelativePeriod) or period.kind is not RelativeKind.TODAY_SO_FAR:
        return
    if period.time_zone is None or schedule.local_time != time(0):
        return  # each customer's own zone, or a run after midnight: something to read
    if midnights_coincide(schedule.time_zone, period.time_zone, now=now):
        same = ("" if period.time_zone == schedule.time_zone
                else f" (the schedule's {schedule.time_zone} keeps the same clock)")
        raise InvalidArgument(
            f"local_time: definition {schedule.definition_id!r} reads today so far in "
            f"{period.time_zone}{same}, which is empty at 00:00 there: every run would read "
            "nothing; run later in the day (or read the last full day)",
            reason="INVALID_PERIOD", metadata={"field": "local_time"})
