"""Schedule runs missed while no worker was up are each made once, late, oldest first.

Each run covers its own period ("yesterday" as of its own time), so making only one of them
(as before: the oldest, with the next run moved past now) lost the bonuses of every other
missed day (found by tests/e2e/test_seed_examples_gaps.py's audit). Back to 31 days (the
longest period); older runs are skipped, logged.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as pb
from promo.v1 import formulas_pb2 as fpb
from promo.v1 import promotions_pb2 as ppb
from tests.conftest import Api
from tests.e2e.test_bonuses_api import (
    create,
    customers,
    definition,
    events,
    results,
    run_due_batches,
    stub,
)
from workers.bonuses import run_due_schedules

at = datetime.fromisoformat


async def _daily_yesterday(api: Api) -> None:
    await create(api, definition(
        "daily-10", "sum(deposit.amount) * 10%", rounding=ppb.ROUNDING_MODE_ROUND, decimals=2,
        period=fpb.TransactionPeriod(relative=fpb.TransactionPeriod.Relative(
            kind=fpb.RELATIVE_KIND_LAST_FULL_DAY, time_zone="UTC"))))
    await customers(api, ("c1", "EUR", "UTC"))
    await stub(api).CreateBonusSchedule(pb.CreateBonusScheduleRequest(
        request_id="daily", schedule=pb.BonusSchedule(
            schedule_id="daily", definition_id="daily-10", customer_ids=["c1"],
            local_time="06:00", time_zone="UTC")), metadata=api.key())


async def _schedule_times(api: Api) -> tuple[datetime, datetime]:
    [listed] = (await stub(api).ListBonusSchedules(pb.ListBonusSchedulesRequest(),
                                                   metadata=api.key())).schedules
    return (listed.last_run_time.ToDatetime(UTC), listed.next_run_time.ToDatetime(UTC))


async def test_each_run_missed_while_no_worker_was_up_is_made_for_its_own_day(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    await _daily_yesterday(api)  # the clock: Sunday 22 Nov 10:00 UTC; first run Mon 06:00
    clock.set(at("2026-11-25T09:00:00+00:00"))  # Wednesday: Mon, Tue and Wed 06:00 missed
    await events(api, "deposits",
                 ("c1", "deposit", "100", at("2026-11-22T12:00:00+00:00"), {}),  # Sunday
                 ("c1", "deposit", "200", at("2026-11-23T12:00:00+00:00"), {}),  # Monday
                 ("c1", "deposit", "300", at("2026-11-24T12:00:00+00:00"), {}))  # Tuesday
    sweep = {"pool": pool, "clock": clock, "settings": settings}
    await run_due_schedules(sweep)
    await run_due_schedules(sweep)  # nothing more is due: each run is made once
    assert await _schedule_times(api) == (at("2026-11-25T06:00:00+00:00"),
                                          at("2026-11-26T06:00:00+00:00"))
    clock.set(at("2026-11-25T09:10:00+00:00"))
    # Requests are made as of each run's time, so each run is in a window of its own.
    assert await run_due_batches(pool, settings, clock) == 3
    found = sorted((r.period_start.ToDatetime(UTC), r.amount) for r in await results(api))
    assert found == [(at("2026-11-22T00:00:00+00:00"), "10"),
                     (at("2026-11-23T00:00:00+00:00"), "20"),
                     (at("2026-11-24T00:00:00+00:00"), "30")]


@pytest.mark.parametrize("days_down", [40, 400])
async def test_runs_older_than_31_days_are_skipped(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        days_down: int) -> None:
    await _daily_yesterday(api)
    now = at("2026-11-23T09:00:00+00:00") + timedelta(days=days_down)
    clock.set(now)
    sweep = {"pool": pool, "clock": clock, "settings": settings}
    await run_due_schedules(sweep)
    last, following = await _schedule_times(api)
    assert following == now.replace(hour=6) + timedelta(days=1)
    assert last == now.replace(hour=6)
    runs = await pool.fetchval("SELECT count(*) FROM bonus_requests")
    assert runs == 31  # the days from 31 days back to today, one request each
