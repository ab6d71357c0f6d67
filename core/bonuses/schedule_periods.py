"""Whether a schedule's runs can ever read a transaction period (checked when it is saved).

A "today so far" period runs from local midnight until the run. A schedule that runs at 00:00 in
the period's own zone therefore reads an empty period on every run: refuse it when saved rather
than skip each run. Only that certain case is refused; where it depends on the customers (a
period in each customer's zone) or on the date (another zone, whose offset differs part of the
year), the worker leaves out the customers whose period is empty at a run (logged) and skips
a run only when it is empty for all of them.
"""

from __future__ import annotations

from datetime import time

from core.bonuses.rules import Schedule
from core.errors import InvalidArgument
from core.periods import Period, RelativeKind, RelativePeriod


def check_schedule_period(schedule: Schedule, period: Period | None, *,
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
    if period.time_zone == schedule.time_zone and schedule.local_time == time(0):
        raise InvalidArgument(
            f"local_time: definition {schedule.definition_id!r} reads today so far in "
            f"{schedule.time_zone}, which is empty at 00:00 there: every run would read "
            "nothing; run later in the day (or read the last full day)",
            reason="INVALID_PERIOD", metadata={"field": "local_time"})
