"""A definition period that is empty for some customers ("today so far" read at the customer's
own midnight) is handled per customer, never by failing everyone's work:

- a schedule run in each customer's zone leaves out only the customers at their midnight (one
  warning naming them) and computes the others; all empty: the run is skipped as a whole;
- a rule firing at the customer's midnight does not fail the events' recording: its request is
  stored and its result is SKIPPED INVALID_PERIOD, saying the period is empty;
- a pending request whose definition's period was edited to "today so far" is SKIPPED
  INVALID_PERIOD when its period is empty at its request time; the batch goes on (it used to
  fail on every retry, leaving the window's requests pending);
- an API request for such a customer is still refused as a whole, nothing stored.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest

from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as pb
from promo.v1 import formulas_pb2 as fpb
from tests.conftest import Api, rpc_error_reason
from tests.e2e.test_bonuses_api import (
    create,
    customers,
    definition,
    events,
    request,
    results,
    rule,
    run_due_batches,
    stub,
)
from workers.bonuses import run_due_schedules

MIDNIGHT_UTC = datetime(2026, 11, 23, 0, 0, tzinfo=UTC)


def _today_so_far(time_zone: str = "") -> fpb.TransactionPeriod:
    """Today so far, in ``time_zone`` (empty: each customer's own zone)."""
    return fpb.TransactionPeriod(relative=fpb.TransactionPeriod.Relative(
        kind=fpb.RELATIVE_KIND_TODAY_SO_FAR, time_zone=time_zone))


def _extras(record: logging.LogRecord, *names: str) -> tuple[object, ...]:
    return tuple(vars(record)[name] for name in names)


async def test_a_schedule_run_leaves_out_only_the_customers_at_their_midnight(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        caplog: pytest.LogCaptureFixture) -> None:
    """00:00 UTC is 01:00 in Malta (November): the Maltese customer has an hour of "today"
    (a bet of 40 at 23:30 UTC, 00:30 there: 10% = 4), the two in UTC have nothing yet. Before,
    the UTC customers' empty period skipped the run for the Maltese one too."""
    await create(api, definition("today", "sum(bet.amount) * 10%", period=_today_so_far()))
    await customers(api, ("u1", "EUR", "UTC"), ("m1", "EUR", "Europe/Malta"),
                    ("u2", "EUR", "UTC"))
    clock.set(MIDNIGHT_UTC - timedelta(minutes=1))
    await events(api, "bets", ("m1", "bet", "40", MIDNIGHT_UTC - timedelta(minutes=30), {}),
                 ("u1", "bet", "70", MIDNIGHT_UTC - timedelta(minutes=30), {}))
    await stub(api).CreateBonusSchedule(pb.CreateBonusScheduleRequest(
        request_id="nightly", schedule=pb.BonusSchedule(
            schedule_id="nightly", definition_id="today", customer_ids=["u1", "m1", "u2"],
            local_time="00:00", time_zone="UTC")), metadata=api.key())
    clock.set(MIDNIGHT_UTC + timedelta(seconds=1))
    with caplog.at_level(logging.WARNING, logger="promo.bonuses"):
        await run_due_schedules({"pool": pool, "clock": clock, "settings": settings})
    async with pool.acquire() as conn:
        made = await conn.fetch("SELECT customer_id, source FROM bonus_requests ORDER BY id")
        last_run = await conn.fetchval("SELECT last_run_at FROM bonus_schedules")
    assert [(r["customer_id"], r["source"]) for r in made] == [("m1", "schedule:nightly")]
    assert last_run == MIDNIGHT_UTC
    [logged] = [r for r in caplog.records if r.name == "promo.bonuses"]
    assert (logged.levelno, logged.getMessage()) == (
        logging.WARNING, "bonus schedule run left out 2 customer(s) whose period is empty at "
        "the run time: 'u1', 'u2'")
    assert _extras(logged, "schedule_id", "definition_id", "run_time", "reason", "count") == (
        "nightly", "today", "2026-11-23T00:00:00+00:00", "INVALID_PERIOD", 2)
    clock.advance(timedelta(minutes=10))
    assert await run_due_batches(pool, settings, clock) == 1
    [result] = await results(api, definition_id="today")
    assert (result.customer_id, result.status, result.amount) == (
        "m1", pb.BONUS_STATUS_ISSUED, "4")
    assert result.period_start.ToDatetime(UTC) == MIDNIGHT_UTC - timedelta(hours=1)
    assert result.period_end.ToDatetime(UTC) == MIDNIGHT_UTC


async def test_a_schedule_run_where_every_period_is_empty_is_skipped_as_a_whole(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        caplog: pytest.LogCaptureFixture) -> None:
    """Everyone at their midnight: no request, the run is skipped with the period's error (as
    a run whose definition's zone is fixed), and the schedule moves on."""
    await create(api, definition("today", "sum(bet.amount) * 10%", period=_today_so_far()))
    await customers(api, ("u1", "EUR", "UTC"), ("u2", "EUR", "UTC"))
    clock.set(MIDNIGHT_UTC - timedelta(minutes=1))
    await stub(api).CreateBonusSchedule(pb.CreateBonusScheduleRequest(
        request_id="nightly", schedule=pb.BonusSchedule(
            schedule_id="nightly", definition_id="today", customer_ids=["u1", "u2"],
            local_time="00:00", time_zone="UTC")), metadata=api.key())
    clock.set(MIDNIGHT_UTC + timedelta(seconds=1))
    with caplog.at_level(logging.WARNING, logger="promo.bonuses"):
        await run_due_schedules({"pool": pool, "clock": clock, "settings": settings})
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM bonus_requests") == 0
        assert await conn.fetchval("SELECT last_run_at FROM bonus_schedules") == MIDNIGHT_UTC
    [logged] = [r for r in caplog.records if r.name == "promo.bonuses"]
    assert logged.getMessage() == ("bonus schedule run skipped: the today_so_far period in UTC "
                                   "is empty at 2026-11-23T00:00:00+00:00")


async def test_a_rule_firing_at_the_customers_midnight_is_a_skipped_result(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """A deposit recorded at exactly 00:00 in the customer's zone fires a rule whose
    definition reads today so far: the recording succeeds (it used to be INVALID_ARGUMENT for
    the whole call, every event of it lost), the firing is a SKIPPED INVALID_PERIOD result and
    the other customer's firing in the same call is computed."""
    await create(api, definition("today-deposits", "sum(deposit.amount) * 50%",
                                 period=_today_so_far()))
    await rule(api, pb.BonusRule(rule_id="each-deposit", definition_id="today-deposits",
                                 event_kind="deposit", every=1,
                                 period_mode=pb.RULE_PERIOD_MODE_DEFINITION))
    await customers(api, ("u1", "EUR", "UTC"), ("m1", "EUR", "Europe/Malta"))
    clock.set(MIDNIGHT_UTC)
    await events(api, "deposits", ("u1", "deposit", "100", MIDNIGHT_UTC, {}),
                 ("m1", "deposit", "60", MIDNIGHT_UTC - timedelta(minutes=1), {}))
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM events") == 2
    clock.advance(timedelta(minutes=10))
    assert await run_due_batches(pool, settings, clock) == 1
    found = {r.customer_id: r for r in await results(api, definition_id="today-deposits")}
    assert (found["m1"].status, found["m1"].amount) == (pb.BONUS_STATUS_ISSUED, "30")
    skipped = found["u1"]
    assert (skipped.status, skipped.skip_reason, skipped.skip_detail) == (
        pb.BONUS_STATUS_SKIPPED, "INVALID_PERIOD",
        "the transaction period is empty: it starts and ends at 2026-11-23T00:00:00+00:00")


async def test_a_period_edited_to_today_so_far_skips_a_request_made_at_midnight(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """A request made at 00:00 UTC under a one-day period; before its batch the period becomes
    "today so far", which is empty at that request's time: that request is SKIPPED
    INVALID_PERIOD and the one made at 00:02 is computed (the batch used to fail with the
    period's INVALID_ARGUMENT on every retry)."""
    await create(api, definition("bets", "sum(bet.amount) * 10%"))
    await customers(api, ("u1", "EUR", "UTC"), ("u2", "EUR", "UTC"))
    clock.set(MIDNIGHT_UTC)
    await events(api, "bets", ("u1", "bet", "70", MIDNIGHT_UTC - timedelta(hours=2), {}),
                 ("u2", "bet", "30", MIDNIGHT_UTC + timedelta(minutes=1), {}))
    await request(api, "bets", ["u1"], "at-midnight")
    clock.set(MIDNIGHT_UTC + timedelta(minutes=2))
    await request(api, "bets", ["u2"], "two-past")
    await stub(api).UpdateBonusDefinition(pb.UpdateBonusDefinitionRequest(
        request_id="today", definition=pb.BonusDefinition(
            definition_id="bets", period=_today_so_far("UTC")),
        update_mask={"paths": ["period"]}), metadata=api.key())
    clock.advance(timedelta(minutes=10))
    assert await run_due_batches(pool, settings, clock) == 1
    found = {r.customer_id: r for r in await results(api, definition_id="bets")}
    assert (found["u1"].status, found["u1"].skip_reason) == (
        pb.BONUS_STATUS_SKIPPED, "INVALID_PERIOD")
    assert (found["u2"].status, found["u2"].amount) == (pb.BONUS_STATUS_ISSUED, "3")
    async with pool.acquire() as conn:
        assert await conn.fetchval(
            "SELECT count(*) FROM bonus_requests WHERE status = 'PENDING'") == 0


async def test_an_api_request_at_the_customers_midnight_is_refused_as_a_whole(
        api: Api, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """The caller asked for these customers now: an empty period is its error to see
    (INVALID_ARGUMENT INVALID_PERIOD), and nothing is stored for the others either."""
    await create(api, definition("today", "sum(bet.amount) * 10%", period=_today_so_far()))
    await customers(api, ("u1", "EUR", "UTC"), ("m1", "EUR", "Europe/Malta"))
    clock.set(MIDNIGHT_UTC)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await request(api, "today", ["m1", "u1"], "both")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(caught.value) == "INVALID_PERIOD"
    assert caught.value.details() == (
        "the today_so_far period in UTC is empty at 2026-11-23T00:00:00+00:00")
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM bonus_requests") == 0
