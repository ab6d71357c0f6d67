"""TIERED and CALCULATED rewards through GetReward, with customer data recorded over the API:
the seeds' use cases (seed 000) pay the documented amounts."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import grpc
import pytest

from core.clock import FixedClock
from core.formula import compile_formula
from core.formula.model import FORMULA_LANGUAGE_VERSION
from promo.v1 import customers_pb2 as cpb
from promo.v1 import customers_pb2_grpc as cpb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from promo.v1 import rewards_pb2 as rpb
from tests.conftest import Api, rpc_error_reason
from tests.e2e.campaign_helpers import ts
from tests.e2e.promo_helpers import cap, get_reward, promotion, reward_type


async def _customer(api: Api, customer_id: str, clock: FixedClock, *,
                    properties: dict[str, str] | None = None,
                    events: list[tuple[str, str, int]] = ()) -> None:  # type: ignore[assignment]
    """events: (kind, amount, days ago)."""
    stub = cpb_grpc.CustomerServiceStub(api.channel)
    await stub.UpsertCustomers(cpb.UpsertCustomersRequest(
        request_id=f"u-{customer_id}", customers=[cpb.Customer(
            customer_id=customer_id, currency="USD",
            properties={k: cpb.PropertyValue(string_value=v)
                        for k, v in (properties or {}).items()})]), metadata=api.key())
    if events:
        await stub.RecordEvents(cpb.RecordEventsRequest(request_id=f"e-{customer_id}", events=[
            cpb.Event(external_id=f"{customer_id}-{i}", customer_id=customer_id, kind=kind,
                      amount=amount, currency="USD",
                      occurred_at=ts(clock.now() - timedelta(days=days, minutes=i)))
            for i, (kind, amount, days) in enumerate(events)]), metadata=api.key())


def _tier(condition: str, value: str) -> ppb.Tier:
    return ppb.Tier(condition=condition, value=value)


async def _value(api: Api, customer: str, code: str) -> str | rpb.GetRewardResponse:
    response = await get_reward(api, customer, code)
    return response.grant.rewards[0].value if response.HasField("grant") else response


async def test_tiered_cashback_on_the_last_deposit(api: Api, clock: FixedClock) -> None:
    await reward_type(api)
    last = "last(deposit.amount)"
    await promotion(api, "CASHBACK", rewards=[ppb.PromotionReward(
        reward_type="cashback", kind=ppb.REWARD_KIND_TIERED, rounding=ppb.ROUNDING_MODE_ROUND,
        decimals=2, tiers=[_tier(f"{last} >= 50 and {last} <= 100", f"{last} * 10%"),
                           _tier(f"{last} >= 101 and {last} <= 200", f"{last} * 20%"),
                           _tier(f"{last} > 200", f"{last} * 30%")])])
    cases = {"a": "75", "b": "150", "c": "300", "d": "40", "e": "75.55"}
    for customer, amount in cases.items():
        # An older, bigger deposit must not count: "last" is the latest one.
        await _customer(api, customer, clock, events=[("deposit", "9999", 5),
                                                      ("deposit", amount, 1)])
    assert await _value(api, "a", "CASHBACK") == "7.50"
    assert await _value(api, "b", "CASHBACK") == "30.00"
    assert await _value(api, "c", "CASHBACK") == "90.00"
    assert await _value(api, "e", "CASHBACK") == "7.56"  # 7.555 rounds half up
    below = await _value(api, "d", "CASHBACK")
    assert isinstance(below, rpb.GetRewardResponse)
    assert below.denial_reason == rpb.DENIAL_REASON_NOT_ELIGIBLE
    nobody = await _value(api, "stranger", "CASHBACK")  # no data at all: no tier matches
    assert isinstance(nobody, rpb.GetRewardResponse)
    assert "NO_MATCHING_TRANSACTIONS" in nobody.denial_message


async def test_loyalty_tiers_pay_a_share_of_the_last_order(api: Api, clock: FixedClock) -> None:
    await reward_type(api, "points", category=2)
    await promotion(api, "LOYAL", rewards=[ppb.PromotionReward(
        reward_type="points", kind=ppb.REWARD_KIND_TIERED, rounding=ppb.ROUNDING_MODE_ROUND_DOWN,
        decimals=0, tiers=[_tier('customer.tier == "Gold"', "last(order.amount) * 25%"),
                           _tier('customer.tier == "Silver"', "last(order.amount) * 20%"),
                           _tier('customer.tier == "Bronze"', "last(order.amount) * 15%")])])
    for name, tier in (("g", "Gold"), ("s", "Silver"), ("b", "Bronze"), ("n", "None")):
        await _customer(api, name, clock, properties={"tier": tier},
                        events=[("order", "200", 2), ("order", "99", 1)])
    assert [await _value(api, c, "LOYAL") for c in "gsb"] == ["24", "19", "14"]
    untiered = await _value(api, "n", "LOYAL")
    assert isinstance(untiered, rpb.GetRewardResponse)
    assert untiered.denial_reason == rpb.DENIAL_REASON_NOT_ELIGIBLE


async def test_calculated_reward_with_bounds_window_and_budget(api: Api,
                                                              clock: FixedClock) -> None:
    await reward_type(api, min_value="5", max_value="25")
    await promotion(api, "TENPCT", rewards=[ppb.PromotionReward(
        reward_type="cashback", kind=ppb.REWARD_KIND_CALCULATED,
        formula="last(deposit.amount) * 10%", lookback_days=7)],
        caps=[cap(ppb.CAP_PERIOD_LIFETIME, "50")])
    await _customer(api, "x", clock, events=[("deposit", "100", 1)])
    await _customer(api, "big", clock, events=[("deposit", "1000", 1)])
    await _customer(api, "small", clock, events=[("deposit", "30", 1)])
    await _customer(api, "old", clock, events=[("deposit", "100", 10)])  # outside 7 days
    await _customer(api, "y", clock, events=[("deposit", "200", 1)])
    assert await _value(api, "x", "TENPCT") == "10"
    assert await _value(api, "big", "TENPCT") == "25"  # cut to the reward type's maximum
    small = await _value(api, "small", "TENPCT")
    assert isinstance(small, rpb.GetRewardResponse)
    assert small.denial_reason == rpb.DENIAL_REASON_BELOW_MINIMUM
    old = await _value(api, "old", "TENPCT")
    assert isinstance(old, rpb.GetRewardResponse)
    assert old.denial_reason == rpb.DENIAL_REASON_NOT_ELIGIBLE
    over = await _value(api, "y", "TENPCT")  # 10 + 25 + 20 > 50: the budget holds
    assert isinstance(over, rpb.GetRewardResponse)
    assert over.denial_reason == rpb.DENIAL_REASON_BUDGET_CAP_REACHED


@pytest.mark.parametrize(("reward", "field", "fragment"), [
    (ppb.PromotionReward(reward_type="cashback", kind=ppb.REWARD_KIND_CALCULATED,
                         formula="last(deposit.amount) *"),
     "rewards[0].formula", "line 1, column 23"),
    (ppb.PromotionReward(reward_type="cashback", kind=ppb.REWARD_KIND_TIERED,
                         tiers=[_tier("customer.tier = \"Gold\"", "1")]),
     "rewards[0].tiers[0].condition", "line 1, column 15"),
    (ppb.PromotionReward(reward_type="cashback", kind=ppb.REWARD_KIND_CALCULATED,
                         formula='template("spins")'),
     "rewards[0].formula", "must compute an amount"),
])
async def test_bad_formulas_are_rejected_with_positions(api: Api, reward: ppb.PromotionReward,
                                                       field: str, fragment: str) -> None:
    await reward_type(api)
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    with pytest.raises(grpc.RpcError) as err:
        await stub.CreatePromotion(ppb.CreatePromotionRequest(request_id="x", promotion=(
            ppb.Promotion(promotion_code="BAD", name="Bad", rewards=[reward]))),
            metadata=api.key())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err.value) in ("FORMULA_SYNTAX", "FORMULA_INVALID")
    assert (err.value.details() or "").startswith(field)
    assert fragment in (err.value.details() or "")


async def test_formulas_are_kept_in_their_validated_versioned_form(
        api: Api, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """The promotion row keeps each formula's compiled form next to its source; GetReward runs
    that form (no parsing), and a row without it (saved before it was kept) still works."""
    await reward_type(api)
    await promotion(api, "TENPCT", rewards=[ppb.PromotionReward(
        reward_type="cashback", kind=ppb.REWARD_KIND_CALCULATED,
        formula="last(deposit.amount) * 10%", lookback_days=7)])
    stored = await pool.fetchval("SELECT formulas FROM promotions WHERE code = 'TENPCT'")
    form = stored["cashback"]
    assert (form["format"], form["version"]) == ("promo.formula", FORMULA_LANGUAGE_VERSION)
    assert form["source"] == "last(deposit.amount) * 10%"
    assert form == compile_formula("last(deposit.amount) * 10%").to_stored()

    # The stored form is what runs: make it say 20% while the source still says 10%.
    twenty = compile_formula("last(deposit.amount) * 20%").to_stored()
    await pool.execute("UPDATE promotions SET formulas = jsonb_build_object('cashback', $1::jsonb)"
                       " WHERE code = 'TENPCT'", twenty)
    await _customer(api, "a", clock, events=[("deposit", "100", 1)])
    assert await _value(api, "a", "TENPCT") == "20"

    # Without a stored form, the source is compiled: 10%. (The version bump makes the
    # server's cached copy STALE, as any saved change does.)
    await pool.execute("UPDATE promotions SET formulas = '{}', version = version + 1"
                       " WHERE code = 'TENPCT'")
    await _customer(api, "b", clock, events=[("deposit", "100", 1)])
    assert await _value(api, "b", "TENPCT") == "10"


async def test_a_computed_value_beyond_the_largest_amount_is_not_handed_out(
        api: Api, clock: FixedClock) -> None:
    """Without a max_value a formula can compute any value (the fuzz audit got a 723-digit
    grant). Beyond the largest amount stored anywhere (14 integer digits) the grant is denied,
    saying how to bound it; a max_value cuts it as before."""
    await reward_type(api)
    await reward_type(api, "bounded", max_value="500")
    await promotion(api, "HUGE", rewards=[ppb.PromotionReward(
        reward_type="cashback", kind=ppb.REWARD_KIND_CALCULATED,
        formula="last(deposit.amount) * 10000000000000", lookback_days=7)])
    await promotion(api, "CUT", rewards=[ppb.PromotionReward(
        reward_type="bounded", kind=ppb.REWARD_KIND_CALCULATED,
        formula="last(deposit.amount) * 10000000000000", lookback_days=7)])
    await _customer(api, "ok", clock, events=[("deposit", "9", 1)])
    await _customer(api, "rich", clock, events=[("deposit", "100", 1)])
    assert await _value(api, "ok", "HUGE") == "90000000000000"
    denied = await _value(api, "rich", "HUGE")
    assert isinstance(denied, rpb.GetRewardResponse)
    assert denied.denial_reason == rpb.DENIAL_REASON_NOT_ELIGIBLE
    assert denied.denial_message == (
        "cashback: computed value 1.000000E+15 is beyond the largest amount "
        "99999999999999.999999; give the reward or its type a max_value")
    assert await _value(api, "rich", "CUT") == "500"


async def test_an_unrounded_value_of_0_at_6_places_is_no_reward(api: Api,
                                                                 clock: FixedClock) -> None:
    """Rounding NONE keeps 6 places: 10% of a deposit of 0.000004 is 0.0000004, 0 there. That
    was granted as a reward of "0" and used up the customer's cap (customer_cap 1); now it is
    denied NOT_ELIGIBLE, as a bonus result is SKIPPED ZERO_OR_NEGATIVE, and the customer can
    still get the reward for a real deposit."""
    await reward_type(api)
    await promotion(api, "TINY", rewards=[ppb.PromotionReward(
        reward_type="cashback", kind=ppb.REWARD_KIND_CALCULATED,
        formula="last(deposit.amount) * 10%")], customer_cap=1)
    await _customer(api, "c1", clock, events=[("deposit", "0.000004", 1)])
    denied = await get_reward(api, "c1", "TINY")
    assert not denied.HasField("grant"), denied
    assert denied.denial_reason == rpb.DENIAL_REASON_NOT_ELIGIBLE
    assert denied.denial_message == (
        "cashback: no reward, ZERO_OR_NEGATIVE (the calculated value 0.0000004 is 0 at 6 "
        "decimal places)")
    await cpb_grpc.CustomerServiceStub(api.channel).RecordEvents(cpb.RecordEventsRequest(
        request_id="e-c1-real", events=[cpb.Event(
            external_id="c1-real", customer_id="c1", kind="deposit", amount="50",
            currency="USD", occurred_at=ts(clock.now() - timedelta(minutes=1)))]),
        metadata=api.key())
    assert await _value(api, "c1", "TINY") == "5"
