"""Editing automation rules and schedules (UpdateBonusRule / UpdateBonusSchedule with an update
mask): a new counting condition restarts the counts, a new limit applies from the next firing,
a new weekday or time moves the next run, new customers apply to the next run; bad masks and
bad values are refused as create refuses them; a retried request gets the same answer."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as pb
from server.errors import error_info_of
from storage.bonus_triggers import on_events_recorded
from tests.conftest import Api, rpc_error_reason
from tests.e2e.test_bonuses_api import (
    create,
    customers,
    definition,
    events,
    results,
    rule,
    run_due_batches,
    stub,
)
from workers.bonuses import run_due_schedules


async def update_rule(api: Api, request_id: str, *paths: str, **fields: Any) -> pb.BonusRule:
    response = await stub(api).UpdateBonusRule(pb.UpdateBonusRuleRequest(
        request_id=request_id, rule=pb.BonusRule(**fields), update_mask={"paths": list(paths)}),
        metadata=api.key())
    return response.rule


async def update_schedule(api: Api, request_id: str, *paths: str,
                          **fields: Any) -> pb.BonusSchedule:
    response = await stub(api).UpdateBonusSchedule(pb.UpdateBonusScheduleRequest(
        request_id=request_id, schedule=pb.BonusSchedule(**fields),
        update_mask={"paths": list(paths)}), metadata=api.key())
    return response.schedule


async def rule_state(pool: asyncpg.Pool) -> tuple[int, int]:
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT accumulated, fired FROM bonus_rule_states")
    return row["accumulated"], row["fired"]


async def test_a_new_every_counts_only_events_after_the_edit(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    await rule(api, pb.BonusRule(rule_id="hundred", definition_id="bets-10", event_kind="bet",
                                 every=100, period_mode=pb.RULE_PERIOD_MODE_FIRST_TO_LAST))
    await customers(api, ("r1", "EUR", "UTC"))
    t = clock.now() - timedelta(minutes=30)
    await events(api, "old", *[("r1", "bet", "100", t + timedelta(minutes=i), {})
                               for i in range(5)])
    assert await rule_state(pool) == (5, 0)

    edited = await update_rule(api, "every-3", "every", rule_id="hundred", every=3)
    assert (edited.every, edited.event_kind, edited.period_mode, edited.active) == (
        3, "bet", pb.RULE_PERIOD_MODE_FIRST_TO_LAST, True)
    assert edited.create_time == (await stub(api).GetBonusRule(pb.GetBonusRuleRequest(
        rule_id="hundred"), metadata=api.key())).rule.create_time
    assert await rule_state(pool) == (0, 0)  # the 5 old bets no longer count
    assert await update_rule(api, "every-3", "every", rule_id="hundred", every=3) == edited

    await events(api, "new-1", ("r1", "bet", "1", t + timedelta(minutes=10), {}),
                 ("r1", "bet", "2", t + timedelta(minutes=11), {}))
    assert await rule_state(pool) == (2, 0)  # 2 of 3: no firing yet
    await events(api, "new-2", ("r1", "bet", "3", t + timedelta(minutes=12), {}))
    assert await rule_state(pool) == (0, 1)
    clock.advance(timedelta(minutes=5))
    assert await run_due_batches(pool, settings, clock) == 1
    [result] = await results(api)
    # From the first to the last bet counted after the edit: 10% of 1 + 2 + 3.
    assert result.amount == "0.6"
    assert result.period_start.ToDatetime(UTC) == t + timedelta(minutes=10)
    assert result.source == "rule:hundred"

    # A change that is not the counting condition keeps the counts.
    await events(api, "new-3", ("r1", "bet", "4", t + timedelta(minutes=13), {}))
    moved = await update_rule(api, "period", "period_mode", rule_id="hundred",
                              period_mode=pb.RULE_PERIOD_MODE_DEFINITION)
    assert moved.period_mode == pb.RULE_PERIOD_MODE_DEFINITION and moved.every == 3
    assert await rule_state(pool) == (1, 1)
    # A new filter is a new counting condition.
    filtered = await update_rule(api, "filter", "filter", rule_id="hundred",
                                 filter='game = "Gold Quest"')
    assert filtered.filter == 'game = "Gold Quest"'
    assert await rule_state(pool) == (0, 1)  # firing numbers (request keys) are kept


async def test_an_edit_waits_for_a_recording_in_flight_then_resets_its_counts(
        api: Api, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """Events being recorded under the old rule when the edit comes: the edit waits for that
    transaction and resets what it counted (no count made under the old condition survives)."""
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    await rule(api, pb.BonusRule(rule_id="hundred", definition_id="bets-10", event_kind="bet",
                                 every=100))
    await customers(api, ("r1", "EUR", "UTC"))
    async with pool.acquire() as recording:
        transaction = recording.transaction()
        await transaction.start()
        await recording.execute(
            """INSERT INTO events (external_id, customer_id, kind, amount, currency,
                                   occurred_at, attributes)
               SELECT 'flight-' || n, 'r1', 'bet', 1, 'EUR', $1, '{}'::jsonb
                 FROM generate_series(1, 4) AS n""", clock.now())
        await on_events_recorded(recording, ["bet"], [f"flight-{n}" for n in range(1, 5)],
                                 now=clock.now(), default_window=300)
        edit = asyncio.create_task(update_rule(api, "every-3", "every", rule_id="hundred",
                                               every=3))
        await asyncio.sleep(0.3)
        assert not edit.done()  # waits for the recording transaction
        await transaction.commit()
    assert (await edit).every == 3
    assert await rule_state(pool) == (0, 0)


async def test_a_new_execution_limit_applies_from_the_next_firing(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    await create(api, definition("bets-20", "sum(bet.amount) * 20%"))
    await rule(api, pb.BonusRule(
        rule_id="once", definition_id="bets-10", event_kind="bet", every=1,
        qualification_kind="deposit", qualification_min_amount="100", max_executions=1,
        period_mode=pb.RULE_PERIOD_MODE_FIRST_TO_LAST))
    await customers(api, ("q1", "EUR", "UTC"))
    t = clock.now() - timedelta(minutes=30)
    await events(api, "first", ("q1", "deposit", "100", t, {}),
                 ("q1", "bet", "10", t + timedelta(minutes=1), {}),
                 ("q1", "bet", "20", t + timedelta(minutes=2), {}))  # over the limit
    edited = await update_rule(api, "twice", "max_executions", "definition_id",
                               rule_id="once", max_executions=2, definition_id="bets-20")
    assert (edited.max_executions, edited.definition_id, edited.qualification_kind) == (
        2, "bets-20", "deposit")
    # Still qualified by the deposit before the edit: one more firing, then the limit.
    await events(api, "second", ("q1", "bet", "30", t + timedelta(minutes=3), {}),
                 ("q1", "bet", "40", t + timedelta(minutes=4), {}))
    clock.advance(timedelta(minutes=5))
    await run_due_batches(pool, settings, clock)
    found = sorted((r.definition_id, r.amount) for r in await results(api))
    assert found == [("bets-10", "1"), ("bets-20", "6")]


async def test_bad_rule_edits_are_refused_and_change_nothing(api: Api) -> None:
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    created = await rule(api, pb.BonusRule(rule_id="each", definition_id="bets-10",
                                           event_kind="bet", every=1))

    async def refused(request_id: str, *paths: str, **fields: Any) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            await update_rule(api, request_id, *paths, **{"rule_id": "each", **fields})
        return caught.value

    empty = await refused("empty")
    assert (empty.code(), rpc_error_reason(empty), empty.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_UPDATE_MASK",
        "update_mask must name at least one field")
    for path in ("rule_id", "create_time", "evry"):
        error = await refused(f"mask-{path}", path)
        assert rpc_error_reason(error) == "INVALID_UPDATE_MASK"
        assert error.details() == (
            f"update_mask: {path!r} cannot be updated; updatable fields: definition_id, "
            "event_kind, filter, every, qualification_kind, qualification_min_amount, "
            "qualification_filter, max_executions, period_mode, period_end, active, "
            "qualification_currency")
        info = error_info_of(error)
        assert info is not None and info.metadata["path"] == path
    error = await refused("limit", "max_executions", max_executions=3)
    assert (rpc_error_reason(error), error.details()) == (
        "INVALID_BONUS_RULE",
        "max_executions: limits executions per qualification: set a qualification too")
    error = await refused("zero", "every", every=0)
    assert error.details() == "every: must be between 1 and 1000000, got 0"
    error = await refused("filter", "filter", filter="game = Gold")
    assert rpc_error_reason(error) == "FORMULA_SYNTAX"
    error = await refused("definition", "definition_id", definition_id="nope")
    assert (error.code(), rpc_error_reason(error)) == (
        grpc.StatusCode.NOT_FOUND, "BONUS_DEFINITION_NOT_FOUND")
    with pytest.raises(grpc.RpcError) as caught:
        await update_rule(api, "ghost", "every", rule_id="ghost", every=2)
    assert rpc_error_reason(caught.value) == "BONUS_RULE_NOT_FOUND"
    assert (await stub(api).GetBonusRule(pb.GetBonusRuleRequest(rule_id="each"),
                                         metadata=api.key())).rule == created
    await update_rule(api, "two", "every", rule_id="each", every=2)
    reused = await refused("two", "every", every=3)  # the same request id, another request
    assert rpc_error_reason(reused) == "REQUEST_ID_REUSED"


async def test_a_new_weekday_or_time_moves_the_next_run_and_new_customers_get_it(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    at = datetime.fromisoformat
    await create(api, definition("deposits-10", "sum(deposit.amount) * 10%"))
    await customers(api, ("s1", "EUR", "UTC"), ("s2", "EUR", "UTC"))
    created = (await stub(api).CreateBonusSchedule(pb.CreateBonusScheduleRequest(
        request_id="weekly", schedule=pb.BonusSchedule(
            schedule_id="weekly", definition_id="deposits-10", customer_ids=["s1"], weekday=1,
            local_time="12:00", time_zone="UTC")), metadata=api.key())).schedule
    assert created.next_run_time.ToDatetime(UTC) == at("2026-11-23T12:00:00+00:00")  # Monday

    wednesday = await update_schedule(api, "wed", "weekday", schedule_id="weekly", weekday=3)
    assert wednesday.weekday == 3
    assert wednesday.next_run_time.ToDatetime(UTC) == at("2026-11-25T12:00:00+00:00")
    assert await update_schedule(api, "wed", "weekday", schedule_id="weekly",
                                 weekday=3) == wednesday
    berlin = await update_schedule(api, "berlin", "local_time", "time_zone",
                                   schedule_id="weekly", local_time="09:30",
                                   time_zone="Europe/Berlin")
    assert (berlin.local_time, berlin.time_zone, berlin.weekday) == (
        "09:30", "Europe/Berlin", 3)
    assert berlin.next_run_time.ToDatetime(UTC) == at("2026-11-25T08:30:00+00:00")
    daily = await update_schedule(api, "daily", "weekday", schedule_id="weekly")
    assert daily.weekday == 0  # every day: tomorrow 09:30 in Berlin
    assert daily.next_run_time.ToDatetime(UTC) == at("2026-11-23T08:30:00+00:00")
    both = await update_schedule(api, "both", "customer_ids", schedule_id="weekly",
                                 customer_ids=["s1", "s2"])
    assert list(both.customer_ids) == ["s1", "s2"]
    assert both.next_run_time == daily.next_run_time  # not a timing change

    clock.set(at("2026-11-23T08:30:10+00:00"))
    await run_due_schedules({"pool": pool, "clock": clock, "settings": settings})
    clock.set(at("2026-11-23T08:35:00+00:00"))
    await run_due_batches(pool, settings, clock)
    assert sorted(r.customer_id for r in await results(api)) == ["s1", "s2"]
    [after] = (await stub(api).ListBonusSchedules(pb.ListBonusSchedulesRequest(),
                                                  metadata=api.key())).schedules
    assert after.last_run_time.ToDatetime(UTC) == at("2026-11-23T08:30:00+00:00")
    assert after.next_run_time.ToDatetime(UTC) == at("2026-11-24T08:30:00+00:00")


async def test_bad_schedule_edits_are_refused_and_change_nothing(api: Api) -> None:
    await create(api, definition("deposits-10", "sum(deposit.amount) * 10%"))
    await customers(api, ("s1", "EUR", "UTC"))
    created = (await stub(api).CreateBonusSchedule(pb.CreateBonusScheduleRequest(
        request_id="weekly", schedule=pb.BonusSchedule(
            schedule_id="weekly", definition_id="deposits-10", customer_ids=["s1"], weekday=1,
            local_time="12:00", time_zone="UTC")), metadata=api.key())).schedule

    async def refused(request_id: str, *paths: str, **fields: Any) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            await update_schedule(api, request_id, *paths, **{"schedule_id": "weekly", **fields})
        assert caught.value.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                       grpc.StatusCode.NOT_FOUND)
        return caught.value

    assert (await refused("empty")).details() == "update_mask must name at least one field"
    for path in ("schedule_id", "next_run_time", "last_run_time"):
        error = await refused(f"mask-{path}", path)
        assert rpc_error_reason(error) == "INVALID_UPDATE_MASK"
        assert (error.details() or "").startswith(f"update_mask: {path!r} cannot be updated")
    assert (await refused("weekday", "weekday", weekday=9)).details() == (
        "weekday: must be 1 (Monday) to 7 (Sunday), got 9")
    assert (await refused("zone", "time_zone", time_zone="Mars/Olympus")).details() == (
        "unknown time zone 'Mars/Olympus' in time_zone; use an IANA name such as "
        "'Europe/Berlin'")
    assert (await refused("time", "local_time", local_time="25:00")).details() == (
        "local_time must be HH:MM, got '25:00'")
    error = await refused("campaign", "campaign_id", campaign_id="summer")
    assert error.details() == "customer_ids: give customer_ids or campaign_id, not both"
    error = await refused("unknown", "customer_ids", customer_ids=["s1", "ghost"])
    assert rpc_error_reason(error) == "CUSTOMER_NOT_FOUND"
    error = await refused("none", "customer_ids")
    assert error.details() == ("customer_ids: must name at least one customer (or give "
                               "campaign_id)")
    listed = await stub(api).ListBonusSchedules(pb.ListBonusSchedulesRequest(),
                                                metadata=api.key())
    assert list(listed.schedules) == [created]


async def test_a_rule_of_a_properties_only_definition_takes_no_transaction_period(
        api: Api) -> None:
    """A definition reading customer properties only has no transaction period: a rule asking
    for one would be silently ignored, so create and update refuse it and nothing is stored."""
    await create(api, definition("logins", 'customer["logins"] * 2',
                                 data_mode=pb.BONUS_DATA_MODE_PROPERTIES_ONLY, period=None))
    with pytest.raises(grpc.RpcError) as caught:
        await rule(api, pb.BonusRule(rule_id="each-login", definition_id="logins",
                                     event_kind="login", every=1,
                                     period_mode=pb.RULE_PERIOD_MODE_FIRST_TO_LAST))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(caught.value) == "INVALID_PERIOD"
    assert caught.value.details() == (
        "period_mode: FIRST_TO_LAST is a transaction period, but definition 'logins' reads "
        "customer properties only: leave period_mode unset")
    listed = await stub(api).ListBonusRules(pb.ListBonusRulesRequest(), metadata=api.key())
    assert list(listed.rules) == []
    created = await rule(api, pb.BonusRule(rule_id="each-login", definition_id="logins",
                                           event_kind="login", every=1))
    assert created.period_mode == pb.RULE_PERIOD_MODE_DEFINITION
    with pytest.raises(grpc.RpcError) as caught:
        await update_rule(api, "to-first-last", "period_mode", rule_id="each-login",
                          period_mode=pb.RULE_PERIOD_MODE_FIRST_TO_LAST)
    assert rpc_error_reason(caught.value) == "INVALID_PERIOD"
    got = await stub(api).GetBonusRule(pb.GetBonusRuleRequest(rule_id="each-login"),
                                       metadata=api.key())
    assert got.rule == created
