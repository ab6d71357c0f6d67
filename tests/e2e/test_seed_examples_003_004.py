"""Seeds 003 and 004: worked examples, numbers, limits and period options checked end to end
through the real gRPC API with a pinned clock (an audit of the seeds against the engine; it
found that a "last full month" across a DST change was skipped as over 31 days, that the seed's
"Logins count ever" property could not be stored, and that a result's details listed events its
formula's filters excluded)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest

from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as pb
from promo.v1 import customers_pb2 as cpb
from promo.v1 import customers_pb2_grpc as cpb_grpc
from promo.v1 import formulas_pb2 as fpb
from promo.v1 import products_pb2 as prpb
from promo.v1 import products_pb2_grpc as prpb_grpc
from promo.v1 import promotions_pb2 as ppb
from tests.conftest import Api, rpc_error_reason
from tests.e2e.campaign_helpers import ts
from tests.e2e.test_bonuses_api import (
    create,
    customers,
    definition,
    events,
    ledger,
    request,
    results,
    run_due_batches,
    stub,
)

# --- helpers ------------------------------------------------------------------------------


async def compute(api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
                  definition_id: str, customer_ids: list[str],
                  request_id: str = "r1") -> dict[str, pb.BonusResult]:
    await request(api, definition_id, customer_ids, request_id)
    clock.advance(timedelta(minutes=5))
    assert await run_due_batches(pool, settings, clock) >= 1
    return {r.customer_id: r for r in await results(api, definition_id=definition_id)}


def outcome(result: pb.BonusResult) -> tuple[int, str, str]:
    return (result.status, result.amount or result.template, result.skip_reason)


ISSUED, SKIPPED, CALCULATED = (pb.BONUS_STATUS_ISSUED, pb.BONUS_STATUS_SKIPPED,
                               pb.BONUS_STATUS_CALCULATED)


# --- seed 004: rounding options for the bonus amount ---------------------------------------------


@pytest.mark.parametrize(("mode", "decimals", "value", "expected"), [
    # "Round Down (e.g. 2.735 -> 2.73) / Round Up (e.g. 2.735 -> 2.74) / Round to Nearest
    # (e.g. 2.735 -> 2.74, 2.734 -> 2.73)"
    (ppb.ROUNDING_MODE_ROUND_DOWN, 2, "2.735", "2.73"),
    (ppb.ROUNDING_MODE_ROUND_UP, 2, "2.735", "2.74"),
    (ppb.ROUNDING_MODE_ROUND, 2, "2.735", "2.74"),
    (ppb.ROUNDING_MODE_ROUND, 2, "2.734", "2.73"),
    # "If you setup the value to 0 ... Round Down (2.735 -> 2) Round Up (-> 3) Nearest (-> 3)"
    (ppb.ROUNDING_MODE_ROUND_DOWN, 0, "2.735", "2"),
    (ppb.ROUNDING_MODE_ROUND_UP, 0, "2.735", "3"),
    (ppb.ROUNDING_MODE_ROUND, 0, "2.735", "3"),
    # "setting the decimal precision to 3 means that a value like 2.735 will be rounded ... to 3
    # decimal places"
    (ppb.ROUNDING_MODE_ROUND_DOWN, 3, "2.735", "2.735"),
    (ppb.ROUNDING_MODE_ROUND_UP, 3, "2.735", "2.735"),
    (ppb.ROUNDING_MODE_ROUND, 3, "2.735", "2.735"),
    (ppb.ROUNDING_MODE_ROUND_UP, 3, "2.7351", "2.736"),
])
async def test_rounding_worked_examples_in_a_batch(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        mode: int, decimals: int, value: str, expected: str) -> None:
    await create(api, definition("r", "last(deposit.amount)", rounding=mode, decimals=decimals,
                                 issued_message="{{event.bonus_amount}}"))
    await customers(api, ("c1", "EUR", "UTC"))
    await events(api, "d", ("c1", "deposit", value, clock.now() - timedelta(minutes=1), {}))
    found = await compute(api, pool, settings, clock, "r", ["c1"])
    assert outcome(found["c1"]) == (ISSUED, expected, "")
    [entry] = await ledger(api, "c1")
    assert entry.amount == expected
    async with pool.acquire() as conn:
        bodies = [json.loads(r["body"])["data"] for r in await conn.fetch(
            "SELECT body FROM webhook_events WHERE event_type = 112")]
    [issued] = bodies
    # Messages write the amount with the definition's decimals.
    assert issued["message"] == (expected if decimals == 0 else
                                 f"{float(expected):.{decimals}f}")


# --- seed 004: formula examples -------------------------------------------------------------------


async def test_tiered_bets_five_three_one_percent(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """ "5% of bets if the total bet amount is above 500, 3% if above 300, and 1% otherwise"."""
    await create(api, definition("tiered", (
        "b = sum(bet.amount)\n"
        "if b > 500 then b * 5%\n"
        "elif b > 300 then b * 3%\n"
        "else b * 1%")))
    rows = {"a": "600", "b": "500", "c": "301", "d": "300", "e": "100"}
    await customers(api, *[(c, "EUR", "UTC") for c in rows])
    await events(api, "bets", *[(c, "bet", amount, clock.now() - timedelta(hours=1), {})
                                for c, amount in rows.items()])
    found = await compute(api, pool, settings, clock, "tiered", list(rows))
    assert {c: r.amount for c, r in found.items()} == {
        "a": "30", "b": "15", "c": "9.03", "d": "3", "e": "1"}


async def test_tiered_deposit_bonus_with_max_and_else_zero(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """ "50% of the deposit, if above 500, max 1000 / 30% of the deposit, if above 300 /
    10$ deposit, if above 100 / else 0"; a zero is not issued (FAQ: "returning zero")."""
    await create(api, definition("tiered-dep", (
        "d = sum(deposit.amount)\n"
        "if d > 500 then cap(d * 50%, 1000)\n"
        "elif d > 300 then d * 30%\n"
        "elif d > 100 then 10\n"
        "else 0")))
    rows = {"a": "3000", "b": "600", "c": "400", "d": "150", "e": "100"}
    await customers(api, *[(c, "EUR", "UTC") for c in rows])
    await events(api, "deps", *[(c, "deposit", amount, clock.now() - timedelta(hours=1), {})
                                for c, amount in rows.items()])
    found = await compute(api, pool, settings, clock, "tiered-dep", list(rows))
    assert {c: outcome(r) for c, r in found.items()} == {
        "a": (ISSUED, "1000", ""), "b": (ISSUED, "300", ""), "c": (ISSUED, "120", ""),
        "d": (ISSUED, "10", ""), "e": (SKIPPED, "", "ZERO_OR_NEGATIVE")}


async def test_deposit_count_tiers_skip_otherwise(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """ "10% of total deposits capped at 500 for users who made more than five deposits ...
    Skip giving a bonus otherwise"."""
    await create(api, definition("count-tier", (
        "if count(deposit) > 5 then cap(sum(deposit.amount) * 10%, 500)\n"
        "else skip")))
    await customers(api, ("six", "EUR", "UTC"), ("five", "EUR", "UTC"), ("big", "EUR", "UTC"))
    t = clock.now() - timedelta(hours=2)
    await events(api, "deps",
                 *[("six", "deposit", "100", t + timedelta(minutes=i), {}) for i in range(6)],
                 *[("five", "deposit", "100", t + timedelta(minutes=i), {}) for i in range(5)],
                 *[("big", "deposit", "1000", t + timedelta(minutes=i), {}) for i in range(6)])
    found = await compute(api, pool, settings, clock, "count-tier", ["six", "five", "big"])
    assert {c: outcome(r) for c, r in found.items()} == {
        "six": (ISSUED, "60", ""), "five": (SKIPPED, "", "EXPLICIT_SKIP"),
        "big": (ISSUED, "500", "")}


async def test_net_deposit_capped_by_100(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """ "Calculate NetDeposit capped by 100" (a customer without withdrawals nets all deposits;
    one who withdrew more than deposited gets nothing)."""
    await create(api, definition("net-dep", (
        "cap(sum(deposit.amount) - sum(withdrawal.amount), 100)")))
    await customers(api, ("a", "EUR", "UTC"), ("b", "EUR", "UTC"), ("c", "EUR", "UTC"))
    t = clock.now() - timedelta(hours=1)
    await events(api, "n", ("a", "deposit", "300", t, {}), ("a", "withdrawal", "150", t, {}),
                 ("b", "deposit", "80", t, {}),
                 ("c", "deposit", "50", t, {}), ("c", "withdrawal", "70", t, {}))
    found = await compute(api, pool, settings, clock, "net-dep", ["a", "b", "c"])
    assert {c: outcome(r) for c, r in found.items()} == {
        "a": (ISSUED, "100", ""), "b": (ISSUED, "80", ""),
        "c": (SKIPPED, "", "ZERO_OR_NEGATIVE")}


async def test_template_when_net_deposit_above_100_otherwise_nothing(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """ "if NetDeposit > 100$, then give template "10 Free Spins on Golden Quest", otherwise
    don't give any bonus"."""
    await create(api, definition("spins", (
        "net = sum(deposit.amount) - sum(withdrawal.amount)\n"
        'if net > 100 then template("10 Free Spins on Golden Quest")'),
        result_type=pb.BONUS_RESULT_TYPE_BONUS_TEMPLATE))
    await customers(api, ("a", "EUR", "UTC"), ("b", "EUR", "UTC"))
    t = clock.now() - timedelta(hours=1)
    await events(api, "n", ("a", "deposit", "150", t, {}), ("b", "deposit", "100", t, {}))
    found = await compute(api, pool, settings, clock, "spins", ["a", "b"])
    assert outcome(found["a"]) == (ISSUED, "10 Free Spins on Golden Quest", "")
    assert found["b"].status == SKIPPED
    [entry] = await ledger(api, "a")
    assert (entry.template, entry.source) == ("10 Free Spins on Golden Quest", "DYNAMIC_FORMULA")
    assert await ledger(api, "b") == []


# --- seed 004: limits -----------------------------------------------------------------------------


async def test_cap_and_min_allowed(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """ "if the cap is set to 200 and the bonus amount is 1000, the bonus issued will be 200";
    "bonuses with amounts lower than defined will be treated as invalid" (equal is not lower)."""
    await create(api, definition("limits", "sum(deposit.amount)", cap_amount="200",
                                 min_allowed="5"))
    rows = {"big": "1000", "edge": "5", "low": "4.99", "mid": "199.99"}
    await customers(api, *[(c, "EUR", "UTC") for c in rows])
    await events(api, "l", *[(c, "deposit", a, clock.now() - timedelta(hours=1), {})
                             for c, a in rows.items()])
    found = await compute(api, pool, settings, clock, "limits", list(rows))
    assert {c: outcome(r) for c, r in found.items()} == {
        "big": (ISSUED, "200", ""), "edge": (ISSUED, "5", ""),
        "low": (SKIPPED, "", "BELOW_MINIMUM"), "mid": (ISSUED, "199.99", "")}


async def test_points_below_min_allowed_are_suppressed_and_manual_points_wait(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Points: "If the dynamic formula's calculated result falls below a minimum threshold,
    reward issuance will be suppressed"; "If Auto Approval is disabled, points must be manually
    approved in the Approval Queue"; logged "under the new source type: Dynamic Formula"."""
    await create(api, definition("pts", "count(bet) * 10", result_type=pb.BONUS_RESULT_TYPE_POINTS,
                                 points_target=pb.POINTS_TARGET_LEVEL_PROGRESS, min_allowed="30",
                                 approval_mode=pb.APPROVAL_MODE_MANUAL))
    await customers(api, ("a", "EUR", "UTC"), ("b", "EUR", "UTC"))
    t = clock.now() - timedelta(hours=1)
    await events(api, "b", *[("a", "bet", "1", t + timedelta(seconds=i), {}) for i in range(4)],
                 *[("b", "bet", "1", t + timedelta(seconds=i), {}) for i in range(2)])
    found = await compute(api, pool, settings, clock, "pts", ["a", "b"])
    assert outcome(found["a"]) == (CALCULATED, "40", "")
    assert outcome(found["b"]) == (SKIPPED, "", "BELOW_MINIMUM")
    assert await ledger(api, "a") == []
    await stub(api).ApproveBonusResults(pb.ApproveBonusResultsRequest(
        request_id="ok", bonus_ids=[found["a"].bonus_id]), metadata=api.key())
    [entry] = await ledger(api, "a")
    assert (entry.amount, entry.source, entry.result_type, entry.points_target) == (
        "40", "DYNAMIC_FORMULA", pb.BONUS_RESULT_TYPE_POINTS, pb.POINTS_TARGET_LEVEL_PROGRESS)


async def test_switching_manual_to_automatic_issues_only_new_bonuses(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """FAQ: "Only new bonuses will be issued automatically. All bonuses that were calculated
    before need to be manually issued by the operator from the Approval queue"."""
    await create(api, definition("m", "sum(deposit.amount) * 10%",
                                 approval_mode=pb.APPROVAL_MODE_MANUAL))
    await customers(api, ("a", "EUR", "UTC"), ("b", "EUR", "UTC"))
    await events(api, "d", ("a", "deposit", "100", clock.now() - timedelta(hours=1), {}),
                 ("b", "deposit", "50", clock.now() - timedelta(hours=1), {}))
    first = await compute(api, pool, settings, clock, "m", ["a"], "first")
    assert outcome(first["a"]) == (CALCULATED, "10", "")
    await stub(api).UpdateBonusDefinition(pb.UpdateBonusDefinitionRequest(
        request_id="auto", definition=pb.BonusDefinition(
            definition_id="m", approval_mode=pb.APPROVAL_MODE_AUTOMATIC),
        update_mask={"paths": ["approval_mode"]}), metadata=api.key())
    # Recalculating the waiting one (an operator action) does not issue it either.
    await stub(api).RecalculateBonusResults(pb.RecalculateBonusResultsRequest(
        request_id="recalc", definition_id="m"), metadata=api.key())
    after = await compute(api, pool, settings, clock, "m", ["b"], "second")
    assert outcome(after["a"]) == (CALCULATED, "10", "")
    assert outcome(after["b"]) == (ISSUED, "5", "")
    assert await ledger(api, "a") == []


# --- seed 004: the 31-day limit -------------------------------------------------------------------


async def test_31_days_is_allowed_and_longer_is_refused(api: Api, clock: FixedClock) -> None:
    """FAQ: "The maximum time period is 31 days ... you can calculate the bonus based on all
    game activities for the previous month"."""
    def back(amount: int, unit: int) -> fpb.TransactionPeriod:
        return fpb.TransactionPeriod(time_back=fpb.TransactionPeriod.TimeBack(amount=amount,
                                                                              unit=unit))

    await create(api, definition("days-31", "sum(bet.amount)", period=back(31, fpb.TIME_UNIT_DAYS)))
    await create(api, definition("hours-744", "sum(bet.amount)",
                                 period=back(744, fpb.TIME_UNIT_HOURS)))
    with pytest.raises(grpc.RpcError) as caught:
        await create(api, definition("hours-745", "sum(bet.amount)",
                                     period=back(745, fpb.TIME_UNIT_HOURS)))
    assert rpc_error_reason(caught.value) == "PERIOD_TOO_LONG"
    start = datetime(2026, 10, 1, tzinfo=UTC)
    await create(api, definition("fixed-31", "sum(bet.amount)", period=fpb.TransactionPeriod(
        fixed=fpb.TransactionPeriod.Fixed(start=ts(start), end=ts(start + timedelta(days=31))))))
    with pytest.raises(grpc.RpcError) as caught:
        await create(api, definition("fixed-32", "sum(bet.amount)", period=fpb.TransactionPeriod(
            fixed=fpb.TransactionPeriod.Fixed(
                start=ts(start), end=ts(start + timedelta(days=31, seconds=1))))))
    assert rpc_error_reason(caught.value) == "PERIOD_TOO_LONG"
    await create(api, definition("month", "sum(bet.amount)", period=fpb.TransactionPeriod(
        relative=fpb.TransactionPeriod.Relative(kind=fpb.RELATIVE_KIND_LAST_FULL_MONTH))))
    await customers(api, ("c1", "EUR", "UTC"))
    ok = await request(api, "days-31", ["c1"], "explicit-31",
                       period_start=ts(clock.now() - timedelta(days=31)),
                       period_end=ts(clock.now()))
    assert ok.accepted_count == 1


# --- seed 004: relative periods in a fixed time zone ----------------------------------------------


@pytest.mark.parametrize(("kind", "start", "end"), [
    # 2026-11-22 10:00 UTC is Sunday 11:00 in Berlin.
    (fpb.RELATIVE_KIND_LAST_FULL_DAY, "2026-11-20T23:00:00+00:00", "2026-11-21T23:00:00+00:00"),
    (fpb.RELATIVE_KIND_LAST_FULL_WEEK, "2026-11-08T23:00:00+00:00",
     "2026-11-15T23:00:00+00:00"),
    # October 2026 in Berlin: starts at UTC+2, ends at UTC+1 (DST ends on the 25th).
    (fpb.RELATIVE_KIND_LAST_FULL_MONTH, "2026-09-30T22:00:00+00:00",
     "2026-10-31T23:00:00+00:00"),
    (fpb.RELATIVE_KIND_LAST_WEEKEND, "2026-11-13T23:00:00+00:00", "2026-11-15T23:00:00+00:00"),
])
async def test_relative_periods_in_a_fixed_zone(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        kind: int, start: str, end: str) -> None:
    """ "relative time periods ... "Last full month", "Last full week", "Last weekend", "Last
    full day" ... aligned to a fixed time zone"."""
    await create(api, definition("rel", "sum(deposit.amount)", period=fpb.TransactionPeriod(
        relative=fpb.TransactionPeriod.Relative(kind=kind, time_zone="Europe/Berlin"))))
    await customers(api, ("c1", "EUR", "Pacific/Auckland"))
    at = datetime.fromisoformat
    s, e = at(start), at(end)
    await events(api, "d", ("c1", "deposit", "1", s - timedelta(seconds=1), {}),
                 ("c1", "deposit", "10", s, {}),
                 ("c1", "deposit", "100", e - timedelta(seconds=1), {}),
                 ("c1", "deposit", "1000", e, {}))
    found = await compute(api, pool, settings, clock, "rel", ["c1"])
    result = found["c1"]
    assert (result.period_start.ToDatetime(UTC), result.period_end.ToDatetime(UTC)) == (s, e)
    assert (result.amount, result.skip_reason, result.skip_detail) == ("110", "", "")


async def test_the_previous_month_across_a_dst_change_in_the_customers_zone(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """FAQ: "The maximum time period is 31 days. For example, you can calculate the bonus based
    on all game activities for the previous month"; "Last full month ... relative to the user's
    time zone". October 2026 in Berlin is 31 days (31 days and 1 hour in UTC, DST ends)."""
    await create(api, definition("month", "sum(bet.amount) * 10%", period=fpb.TransactionPeriod(
        relative=fpb.TransactionPeriod.Relative(kind=fpb.RELATIVE_KIND_LAST_FULL_MONTH))))
    await customers(api, ("ber", "EUR", "Europe/Berlin"), ("utc", "EUR", "UTC"))
    at = datetime.fromisoformat
    await events(api, "oct", ("ber", "bet", "100", at("2026-10-15T12:00:00+00:00"), {}),
                 ("utc", "bet", "100", at("2026-10-15T12:00:00+00:00"), {}))
    found = await compute(api, pool, settings, clock, "month", ["ber", "utc"])
    assert (found["utc"].status, found["utc"].amount) == (ISSUED, "10")
    ber = found["ber"]
    assert (ber.period_start.ToDatetime(UTC), ber.period_end.ToDatetime(UTC)) == (
        at("2026-09-30T22:00:00+00:00"), at("2026-10-31T23:00:00+00:00"))
    assert (ber.status, ber.amount, ber.skip_reason, ber.skip_detail) == (ISSUED, "10", "", "")


async def test_fixed_dates_of_a_31_day_month_in_a_zone_with_a_dst_change(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """"Fixed dates" are a period option and 31 days the limit: 1 to 31 October in
    Europe/Berlin (31 days on the calendar) is accepted when saved and must then be computed."""
    at = datetime.fromisoformat
    start, end = at("2026-10-01T00:00:00+02:00"), at("2026-11-01T00:00:00+01:00")
    created = await create(api, definition(
        "october", "sum(bet.amount) * 10%", period=fpb.TransactionPeriod(
            fixed=fpb.TransactionPeriod.Fixed(start=ts(start), end=ts(end),
                                              time_zone="Europe/Berlin"))))
    assert created.period.fixed.time_zone == "Europe/Berlin"
    await customers(api, ("c1", "EUR", "UTC"))
    await events(api, "oct", ("c1", "bet", "100", at("2026-10-15T12:00:00+00:00"), {}))
    found = await compute(api, pool, settings, clock, "october", ["c1"])
    result = found["c1"]
    assert (result.period_start.ToDatetime(UTC), result.period_end.ToDatetime(UTC)) == (
        start.astimezone(UTC), end.astimezone(UTC))
    assert (result.status, result.amount, result.skip_reason, result.skip_detail) == (
        ISSUED, "10", "", "")


@pytest.mark.parametrize(("name", "formula"), [
    ("Logins count ever", 'customer["Logins count ever"] * 2'),
    ("logins_count_ever", "customer.logins_count_ever * 2")])
async def test_user_properties_only_gems_from_a_login_count(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock, name: str,
        formula: str) -> None:
    """ "User properties only ... the 'Logins count ever' property can be included to create a
    formula based on the total number of times a user has logged in": no transaction period,
    the formula reads only user state properties (the seed's name as written, or an
    identifier); Gems as the result type."""
    await create(api, definition(
        "logins", formula, result_type=pb.BONUS_RESULT_TYPE_GEMS,
        data_mode=pb.BONUS_DATA_MODE_PROPERTIES_ONLY, period=None))
    await cpb_grpc.CustomerServiceStub(api.channel).UpsertCustomers(cpb.UpsertCustomersRequest(
        request_id="props", customers=[
            cpb.Customer(customer_id="a", currency="EUR", time_zone="UTC", properties={
                name: cpb.PropertyValue(decimal_value="12")}),
            cpb.Customer(customer_id="b", currency="EUR", time_zone="UTC")]),
        metadata=api.key())
    found = await compute(api, pool, settings, clock, "logins", ["a", "b"])
    assert outcome(found["a"]) == (ISSUED, "24", "")
    assert outcome(found["b"]) == (SKIPPED, "", "MISSING_PROPERTY")
    assert not found["a"].HasField("period_start")
    [entry] = await ledger(api, "a")
    assert (entry.amount, entry.result_type) == ("24", pb.BONUS_RESULT_TYPE_GEMS)


# --- seed 003: personalized product promotions ----------------------------------------------------


def products(api: Api) -> prpb_grpc.ProductPromotionServiceStub:
    return prpb_grpc.ProductPromotionServiceStub(api.channel)


async def select(api: Api, request_id: str,
                 product_ids: list[str]) -> prpb.CustomerProductPromotion:
    return (await products(api).SelectProducts(prpb.SelectProductsRequest(
        request_id=request_id, customer_id="c1", personalized_promotion_id="coffee",
        product_ids=product_ids), metadata=api.key("runtime"))).promotion


def basket_line(product: str, quantity: int, price: str) -> prpb.BasketLine:
    return prpb.BasketLine(product_id=product, quantity=quantity, unit_price=price)


async def test_without_lock_the_choice_changes_freely_and_one_product_gets_the_discount(
        api: Api) -> None:
    """Seed 003: "If this option [Lock after first apply] is not selected, customers can change
    their product choice freely"; "This many products get the discount ... could ... have a
    different value than the Maximum distinct products"; "Required Amount of Products: the
    minimum number of products a customer must order from the identified list"."""
    await customers(api, ("c1", "EUR", "UTC"))
    await products(api).CreatePersonalizedPromotion(prpb.CreatePersonalizedPromotionRequest(
        request_id="pp", personalized_promotion=prpb.PersonalizedPromotion(
            backend_id="coffee", name="Your coffee", max_distinct_products=3)),
        metadata=api.key())
    await products(api).AssignProductLists(prpb.AssignProductListsRequest(
        request_id="pl", personalized_promotion_id="coffee", customer_ids=["c1"],
        product_ids=["espresso", "latte", "mocha", "tea"]), metadata=api.key())
    await products(api).CreateProductSetDiscount(prpb.CreateProductSetDiscountRequest(
        request_id="d", product_set_discount=prpb.ProductSetDiscount(
            discount_id="two-coffees", name="Two coffees, one half price",
            discount_type=prpb.DISCOUNT_TYPE_PERCENTAGE_OFF, value="50", product_sets=[
                prpb.ProductSet(name="Your coffee", personalized_promotion_id="coffee",
                                required_quantity=2, gets_discount=True,
                                discounted_quantity=1)])), metadata=api.key())
    assert list((await select(api, "s1", ["latte", "mocha", "espresso"])).chosen_product_ids) \
        == ["latte", "mocha", "espresso"]

    async def apply(request_id: str, lines: list[prpb.BasketLine]) -> prpb.BasketEvaluation:
        return (await products(api).ApplyBasket(prpb.ApplyBasketRequest(
            request_id=request_id, customer_id="c1", lines=lines),
            metadata=api.key("runtime"))).evaluation

    one = await apply("o1", [basket_line("latte", 1, "4.00")])
    assert list(one.discount_lines) == [] and one.discount_total == "0.00"  # 1 of 2 required
    three = await apply("o2", [basket_line("latte", 1, "4.00"), basket_line("mocha", 1, "5.00"),
                               basket_line("espresso", 1, "3.00")])
    assert sum(d.quantity for d in three.discount_lines) == 1  # one product gets it
    assert three.discount_total == "1.50"
    # Not locked: the choice changes after the applies.
    assert list((await select(api, "s2", ["tea"])).chosen_product_ids) == ["tea"]
    tea = await apply("o3", [basket_line("tea", 2, "2.00"), basket_line("latte", 1, "4.00")])
    assert [(d.product_id, d.quantity, d.amount) for d in tea.discount_lines] == [
        ("tea", 1, "1.00")]


async def test_the_details_show_the_transactions_used_in_the_calculation(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """ "For every calculated bonus, you can check the details of the underlying transactions
    used in the calculation" (the formula excludes Roulette: a Roulette bet is not used)."""
    await create(api, definition("no-roulette", (
        'sum(bet.amount where game_category != "Roulette") * 10%')))
    await customers(api, ("c1", "EUR", "UTC"))
    t = clock.now() - timedelta(hours=1)
    await events(api, "b", ("c1", "bet", "10", t, {"game_category": "Slots"}),
                 ("c1", "bet", "50", t + timedelta(minutes=1), {"game_category": "Roulette"}))
    found = await compute(api, pool, settings, clock, "no-roulette", ["c1"])
    assert outcome(found["c1"]) == (ISSUED, "1", "")
    detail = await stub(api).GetBonusResult(pb.GetBonusResultRequest(
        bonus_id=found["c1"].bonus_id), metadata=api.key())
    assert [(e.amount, e.attributes["game_category"]) for e in detail.events] == [
        ("10.000000", "Slots")]
