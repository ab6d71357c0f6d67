"""Regression tests for three dynamic-bonus trigger defects found in review, each against the
real stack (server, PostgreSQL, the outbox runner of the batch) with a pinned clock:

- an API request id shaped like a trigger's request key ("rule:x:1") took that key and
  silently absorbed the rule's firing: such ids are now refused (INVALID_REQUEST_ID);
- a rule with a fixed end (FIRST_TO_FIXED_END, QUALIFICATION_TO_FIXED_END, or DEFINITION with
  a fixed-dates definition period) kept counting and firing after the end, and its requests
  were SKIPPED NO_MATCHING_TRANSACTIONS: events from the end on no longer count nor qualify;
- a qualification's minimum amount ignored the currency (100 JPY met "at least 100 EUR"): the
  amount is in the rule's qualification_currency, or else in the customer's own currency.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as pb
from promo.v1 import customers_pb2 as cpb
from promo.v1 import customers_pb2_grpc as cpb_grpc
from promo.v1 import formulas_pb2 as fpb
from tests.conftest import Api, rpc_error_reason
from tests.e2e.campaign_helpers import ts
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


async def _rule_state(pool: asyncpg.Pool, rule_id: str, customer_id: str) -> tuple[int, ...]:
    """(accumulated, fired, executions, qualified) of one customer's progress on a rule."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            """SELECT s.accumulated, s.fired, s.executions, s.qualified_at IS NOT NULL
                 FROM bonus_rule_states s JOIN bonus_rules r ON r.id = s.rule_pk
                WHERE r.rule_id = $1 AND s.customer_id = $2""", rule_id, customer_id)
    return tuple(row) if row is not None else (0, 0, 0, False)


async def _calculate(api: Api, pool: asyncpg.Pool, settings: Settings,
                     clock: FixedClock) -> list[pb.BonusResult]:
    clock.advance(timedelta(minutes=5))
    await run_due_batches(pool, settings, clock)
    return sorted(await results(api), key=lambda r: r.period_end.ToDatetime(UTC))


# --- 1. API request ids never take a trigger's request key ------------------------------------


async def test_an_api_request_id_cannot_take_a_rules_request_key(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Rule x's first firing for c1 is stored under the key "rule:x:1/c1"; an API request with
    request_id "rule:x:1" made the same key before it, so the firing added nothing."""
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    await rule(api, pb.BonusRule(rule_id="x", definition_id="bets-10", event_kind="bet",
                                 every=1))
    await customers(api, ("c1", "EUR", "UTC"))
    for request_id in ("rule:x:1", "schedule:monday:2026-11-23T12:00:00+00:00"):
        with pytest.raises(grpc.RpcError) as caught:
            await request(api, "bets-10", ["c1"], request_id)
        error = caught.value
        assert (error.code(), rpc_error_reason(error), error.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST_ID",
            f"request_id {request_id!r} starts with a prefix reserved for the requests of "
            "automation rules and schedules ('rule:', 'schedule:'); use another request_id")
    # Ids that only look alike are the client's own.
    for request_id in ("Rule:x:1", "rules:x:1", "my-rule:x:1", "rule-x-1"):
        accepted = await request(api, "bets-10", ["c1"], request_id)
        assert accepted.accepted_count == 1
    await events(api, "bet", ("c1", "bet", "10", clock.now() - timedelta(minutes=1), {}))
    found = await _calculate(api, pool, settings, clock)
    assert sorted(r.source for r in found) == ["api"] * 4 + ["rule:x"]
    async with pool.acquire() as conn:
        keys = sorted(r["request_key"] for r in await conn.fetch(
            "SELECT request_key FROM bonus_requests"))
    assert keys == ["Rule:x:1/c1", "my-rule:x:1/c1", "rule-x-1/c1", "rule:x:1/c1",
                    "rules:x:1/c1"]


async def test_request_ids_and_customer_ids_with_slashes_never_share_a_key(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Customer ids may contain '/': request "a" for customer "b/c" and request "a/b" for
    customer "c" are two requests, both computed (the request id's '/' is escaped in the key)."""
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    await customers(api, ("b/c", "EUR", "UTC"), ("c", "EUR", "UTC"))
    assert (await request(api, "bets-10", ["b/c"], "a")).accepted_count == 1
    assert (await request(api, "bets-10", ["c"], "a/b")).accepted_count == 1
    assert (await request(api, "bets-10", ["c"], "a%2Fb")).accepted_count == 1  # not "a/b"
    found = await _calculate(api, pool, settings, clock)
    assert sorted(r.customer_id for r in found) == ["b/c", "c", "c"]
    async with pool.acquire() as conn:
        keys = sorted(r["request_key"] for r in await conn.fetch(
            "SELECT request_key FROM bonus_requests"))
    assert keys == ["a%252Fb/c", "a%2Fb/c", "a/b/c"]


# --- 2. nothing counts from a rule's fixed end on ---------------------------------------------


async def test_first_to_fixed_end_stops_counting_at_the_end(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    end = clock.now() - timedelta(minutes=30)
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    await rule(api, pb.BonusRule(
        rule_id="until-end", definition_id="bets-10", event_kind="bet", every=2,
        period_mode=pb.RULE_PERIOD_MODE_FIRST_TO_FIXED_END, period_end=ts(end)))
    await customers(api, ("c1", "EUR", "UTC"))
    await events(api, "bets",
                 ("c1", "bet", "10", end - timedelta(minutes=20), {}),
                 ("c1", "bet", "20", end - timedelta(minutes=10), {}),  # fires: 10 + 20
                 ("c1", "bet", "40", end - timedelta(minutes=5), {}),  # counted, waits
                 ("c1", "bet", "80", end, {}),  # the end is not in [first, end)
                 ("c1", "bet", "160", end + timedelta(minutes=1), {}),
                 ("c1", "bet", "320", end + timedelta(minutes=2), {}))
    assert await _rule_state(pool, "until-end", "c1") == (1, 1, 1, False)
    [found] = await _calculate(api, pool, settings, clock)
    assert (found.status, found.amount, found.source) == (
        pb.BONUS_STATUS_ISSUED, "7", "rule:until-end")  # 10% of 10 + 20 + 40 (in the window)
    assert found.period_start.ToDatetime(UTC) == end - timedelta(minutes=20)
    assert found.period_end.ToDatetime(UTC) == end


async def test_qualification_to_fixed_end_needs_a_qualification_before_the_end(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    end = clock.now() - timedelta(minutes=30)
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    await rule(api, pb.BonusRule(
        rule_id="qualified-until", definition_id="bets-10", event_kind="bet", every=1,
        qualification_kind="deposit", qualification_min_amount="100",
        period_mode=pb.RULE_PERIOD_MODE_QUALIFICATION_TO_FIXED_END, period_end=ts(end)))
    await customers(api, ("early", "EUR", "UTC"), ("late", "EUR", "UTC"))
    await events(api, "moves",
                 ("early", "deposit", "100", end - timedelta(minutes=20), {}),
                 ("early", "bet", "50", end - timedelta(minutes=10), {}),  # fires
                 ("early", "bet", "60", end + timedelta(minutes=1), {}),  # after the end
                 ("late", "deposit", "100", end + timedelta(minutes=1), {}),  # too late
                 ("late", "bet", "70", end + timedelta(minutes=2), {}))
    assert await _rule_state(pool, "qualified-until", "early") == (0, 1, 1, True)
    assert await _rule_state(pool, "qualified-until", "late") == (0, 0, 0, False)
    [found] = await _calculate(api, pool, settings, clock)
    assert (found.customer_id, found.status, found.amount) == (
        "early", pb.BONUS_STATUS_ISSUED, "5")
    assert found.period_start.ToDatetime(UTC) == end - timedelta(minutes=20)
    assert found.period_end.ToDatetime(UTC) == end


async def test_a_definitions_fixed_dates_end_the_rules_counting(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """DEFINITION mode with fixed dates: every firing computes the same window, so a firing
    after its end would pay the same events again."""
    end = clock.now() - timedelta(minutes=30)
    await create(api, definition(
        "bets-10", "sum(bet.amount) * 10%", period=fpb.TransactionPeriod(
            fixed=fpb.TransactionPeriod.Fixed(start=ts(end - timedelta(days=1)),
                                              end=ts(end)))))
    await rule(api, pb.BonusRule(rule_id="each", definition_id="bets-10", event_kind="bet",
                                 every=1))
    await customers(api, ("c1", "EUR", "UTC"))
    await events(api, "bets", ("c1", "bet", "10", end - timedelta(minutes=10), {}),
                 ("c1", "bet", "20", end, {}),
                 ("c1", "bet", "40", end + timedelta(minutes=10), {}))
    assert await _rule_state(pool, "each", "c1") == (0, 1, 1, False)
    [found] = await _calculate(api, pool, settings, clock)
    assert (found.status, found.amount) == (pb.BONUS_STATUS_ISSUED, "1")


async def test_periods_without_a_fixed_end_keep_counting(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    await rule(api, pb.BonusRule(rule_id="open", definition_id="bets-10", event_kind="bet",
                                 every=1, period_mode=pb.RULE_PERIOD_MODE_FIRST_TO_LAST))
    await customers(api, ("c1", "EUR", "UTC"))
    await events(api, "bets", ("c1", "bet", "10", clock.now() - timedelta(minutes=2), {}),
                 ("c1", "bet", "20", clock.now() - timedelta(minutes=1), {}))
    assert [r.amount for r in await _calculate(api, pool, settings, clock)] == ["1", "2"]


# --- 3. a qualification's minimum amount has a currency ---------------------------------------


async def _money_events(api: Api, request_id: str,
                        *rows: tuple[str, str, str, str, datetime]) -> None:
    """(customer_id, kind, amount, currency, occurred_at) rows."""
    await cpb_grpc.CustomerServiceStub(api.channel).RecordEvents(cpb.RecordEventsRequest(
        request_id=request_id, create_missing_customers=True, events=[
            cpb.Event(external_id=f"{request_id}-{i}", customer_id=c, kind=kind, amount=amount,
                      currency=currency, occurred_at=ts(when))
            for i, (c, kind, amount, currency, when) in enumerate(rows)]), metadata=api.key())


async def test_without_a_rule_currency_the_minimum_is_in_the_customers_currency(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    await rule(api, pb.BonusRule(
        rule_id="deposit-100", definition_id="bets-10", event_kind="bet", every=1,
        qualification_kind="deposit", qualification_min_amount="100"))
    await customers(api, ("eur", "EUR", "UTC"))
    t = clock.now() - timedelta(minutes=30)
    await _money_events(api, "jpy",
                        ("eur", "deposit", "100", "JPY", t),  # 100 JPY is not 100 EUR
                        ("eur", "bet", "10", "EUR", t + timedelta(minutes=1)),
                        # Neither the rule nor the customer names a currency: as it is.
                        ("bare", "deposit", "100", "JPY", t),
                        ("bare", "bet", "10", "JPY", t + timedelta(minutes=1)))
    assert await _rule_state(pool, "deposit-100", "eur") == (0, 0, 0, False)
    assert await _rule_state(pool, "deposit-100", "bare") == (0, 1, 1, True)
    await _money_events(api, "eur", ("eur", "deposit", "100", "EUR", t + timedelta(minutes=2)),
                        ("eur", "bet", "20", "EUR", t + timedelta(minutes=3)))
    assert await _rule_state(pool, "deposit-100", "eur") == (0, 1, 1, True)
    found = await _calculate(api, pool, settings, clock)
    assert sorted((r.customer_id, r.amount) for r in found) == [
        ("bare", "1"), ("eur", "3")]  # 10% of the day's bets: 10; 10 + 20


async def test_a_rule_currency_names_the_minimums_currency(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    created = await rule(api, pb.BonusRule(
        rule_id="eur-100", definition_id="bets-10", event_kind="bet", every=1,
        qualification_kind="deposit", qualification_min_amount="100",
        qualification_currency="EUR"))
    assert created.qualification_currency == "EUR"
    await customers(api, ("yen", "JPY", "Asia/Tokyo"))
    t = clock.now() - timedelta(minutes=30)
    await _money_events(api, "deposits",
                        ("yen", "deposit", "20000", "JPY", t),  # not EUR
                        ("yen", "bet", "10", "JPY", t + timedelta(minutes=1)),
                        ("bare", "deposit", "100", "EUR", t),  # no currency of its own: fine
                        ("bare", "bet", "10", "EUR", t + timedelta(minutes=1)))
    assert await _rule_state(pool, "eur-100", "yen") == (0, 0, 0, False)
    assert await _rule_state(pool, "eur-100", "bare") == (0, 1, 1, True)
    await _money_events(api, "eur", ("yen", "deposit", "100", "EUR", t + timedelta(minutes=2)),
                        ("yen", "bet", "20", "JPY", t + timedelta(minutes=3)))
    assert await _rule_state(pool, "eur-100", "yen") == (0, 1, 1, True)
    # An edit of the currency alone (JPY) applies to the next qualifications.
    edited = (await stub(api).UpdateBonusRule(pb.UpdateBonusRuleRequest(
        request_id="to-jpy", rule=pb.BonusRule(rule_id="eur-100", qualification_currency="JPY"),
        update_mask=FieldMask(paths=["qualification_currency"])), metadata=api.key())).rule
    assert (edited.qualification_currency, edited.qualification_min_amount) == ("JPY", "100")
    got = (await stub(api).GetBonusRule(pb.GetBonusRuleRequest(rule_id="eur-100"),
                                        metadata=api.key())).rule
    assert got == edited


@pytest.mark.parametrize(("fields", "reason", "details"), [
    ({"qualification_kind": "deposit", "qualification_currency": "eur"}, "INVALID_BONUS_RULE",
     "qualification.currency: must be three uppercase letters (ISO 4217) such as 'EUR', "
     "got 'eur'"),
    ({"qualification_currency": "EUR"}, "MISSING_FIELD",
     "qualification_kind is required with a qualification amount, currency or filter"),
])
async def test_a_bad_qualification_currency_is_refused(
        api: Api, fields: dict[str, str], reason: str, details: str) -> None:
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    with pytest.raises(grpc.RpcError) as caught:
        await rule(api, pb.BonusRule(rule_id="bad", definition_id="bets-10", event_kind="bet",
                                     every=1, **fields))
    error = caught.value
    assert (error.code(), rpc_error_reason(error), error.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT, reason, details)
