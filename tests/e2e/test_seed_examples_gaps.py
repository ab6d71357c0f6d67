"""Seed worked examples and numbered rules that no other test asserted with their exact numbers,
through the real gRPC API (a real server, real PostgreSQL, a pinned clock). Found by reading
every seed document against tests/e2e/test_seed_examples_000_002.py,
test_seed_examples_003_004.py, tests/unit/test_seed_examples.py and the audits."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as pb
from promo.v1 import campaigns_pb2 as campb
from promo.v1 import campaigns_pb2_grpc as campb_grpc
from promo.v1 import customers_pb2 as cupb
from promo.v1 import customers_pb2_grpc as cupb_grpc
from promo.v1 import formulas_pb2 as fpb
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from promo.v1 import rewards_pb2 as rpb
from tests.conftest import Api, rpc_error_reason
from tests.e2e.campaign_helpers import create_campaign, set_statuses, ts
from tests.e2e.code_helpers import code_promotion, codes_file, until, upload
from tests.e2e.promo_helpers import cap, get_promotion, get_reward, promotion, reward_type
from tests.e2e.test_bonuses_api import (
    create,
    customers,
    definition,
    events,
    ledger,
    request,
    results,
    rule,
    run_due_batches,
    stub,
)
from workers.outbox import run_outbox_job

ISSUED, SKIPPED = pb.BONUS_STATUS_ISSUED, pb.BONUS_STATUS_SKIPPED


# --- helpers ------------------------------------------------------------------------------------


async def _depositor(api: Api, customer_id: str, clock: FixedClock, *amounts: str,
                     properties: dict[str, cupb.PropertyValue] | None = None) -> None:
    """A USD customer whose deposits were made one per hour before now, the last the latest."""
    customer_stub = cupb_grpc.CustomerServiceStub(api.channel)
    await customer_stub.UpsertCustomers(cupb.UpsertCustomersRequest(
        request_id=f"u-{customer_id}", customers=[cupb.Customer(
            customer_id=customer_id, currency="USD", properties=properties or {})]),
        metadata=api.key())
    if amounts:
        n = len(amounts)
        await customer_stub.RecordEvents(cupb.RecordEventsRequest(
            request_id=f"e-{customer_id}", events=[
                cupb.Event(external_id=f"{customer_id}-{i}", customer_id=customer_id,
                           kind="deposit", amount=amount, currency="USD",
                           occurred_at=ts(clock.now() - timedelta(hours=n - i)))
                for i, amount in enumerate(amounts)]), metadata=api.key())


async def _compute(api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
                   definition_id: str, customer_ids: list[str],
                   request_id: str = "r1") -> dict[str, pb.BonusResult]:
    await request(api, definition_id, customer_ids, request_id)
    clock.advance(timedelta(minutes=5))
    assert await run_due_batches(pool, settings, clock) >= 1
    return {r.customer_id: r for r in await results(api, definition_id=definition_id)}


def _outcome(result: pb.BonusResult) -> tuple[int, str, str]:
    return (result.status, result.amount or result.template, result.skip_reason)


async def _event_data(pool: asyncpg.Pool, event_type: int) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT body FROM webhook_events WHERE event_type = $1 ORDER BY id", event_type)
    return [json.loads(r["body"])["data"] for r in rows]


# --- seed 000: the cashback use case at its tier boundaries  --------------------------------------


CASHBACK_TIERS = [
    # "Deposit over $200: Get 30% cashback" / "$101-$200: 20%" / "$50-$100: 10%"
    ppb.Tier(condition="last(deposit.amount) > 200", value="last(deposit.amount) * 30%"),
    ppb.Tier(condition="last(deposit.amount) >= 101", value="last(deposit.amount) * 20%"),
    ppb.Tier(condition="last(deposit.amount) >= 50", value="last(deposit.amount) * 10%"),
]


@pytest.mark.parametrize(("deposit", "expected"), [
    ("50", "5.00"), ("100", "10.00"), ("101", "20.20"), ("200", "40.00"), ("201", "60.30"),
    ("49.99", None)])
async def test_deposit_cashback_tiers_at_their_boundaries(api: Api, clock: FixedClock,
                                                         deposit: str,
                                                         expected: str | None) -> None:
    """Seed 000, "Deliver Personalized Cashback Offers for Big Spenders": "Deposit $50-$100:
    Get 10% cashback. Deposit $101-$200: Get 20% cashback. Deposit over $200: Get 30%
    cashback" -- each boundary of each tier, through GetReward (an earlier, bigger deposit
    must not count: the tiers read the deposit just made)."""
    await reward_type(api)
    await promotion(api, "BIGSPEND", rewards=[ppb.PromotionReward(
        reward_type="cashback", kind=ppb.REWARD_KIND_TIERED, rounding=ppb.ROUNDING_MODE_ROUND,
        decimals=2, tiers=CASHBACK_TIERS)])
    await _depositor(api, "c1", clock, "5000", deposit)
    reply = await get_reward(api, "c1", "BIGSPEND")
    if expected is None:
        assert reply.denial_reason == rpb.DENIAL_REASON_NOT_ELIGIBLE
    else:
        assert reply.HasField("grant"), reply
        assert reply.grant.rewards[0].value == expected


# --- seed 000: rounding, "Round Up: Always rounds up" with decimal places -------------------------


async def test_round_up_with_two_decimal_places(api: Api, clock: FixedClock) -> None:
    """Seed 000: "Round Up: Always rounds up"; "For all rounding options, you can specify
    Decimal places": 10% of 57.89 is 5.789, which rounds up to 5.79 at 2 places (and only
    rounding down gives the seed's 5.78, asserted elsewhere)."""
    await reward_type(api)
    await promotion(api, "UP2", rewards=[ppb.PromotionReward(
        reward_type="cashback", kind=ppb.REWARD_KIND_CALCULATED,
        formula="last(deposit.amount) * 10%", rounding=ppb.ROUNDING_MODE_ROUND_UP,
        decimals=2)])
    await _depositor(api, "c1", clock, "57.89")
    reply = await get_reward(api, "c1", "UP2")
    assert reply.grant.rewards[0].value == "5.79"


# --- seed 000: a promotion overrides the reward type's constraints -------------------------------


async def test_a_single_reward_may_use_the_promotions_wider_constraints(api: Api) -> None:
    """Seed 000: "Override Existing Constraints: You can modify constraints initially set in the
    Reward Type Settings ... specific to the current promotion". The reward type allows at most
    25; a promotion that overrides the maximum to 50 may pay a SINGLE reward of 40, while one
    without the override may not."""
    await reward_type(api, min_value="5", max_value="25")
    created = await promotion(api, "WIDE40", rewards=[ppb.PromotionReward(
        reward_type="cashback", kind=ppb.REWARD_KIND_SINGLE, value="40", max_value="50")])
    assert created.rewards[0].max_value == "50"
    reply = await get_reward(api, "c1", "WIDE40")
    assert reply.HasField("grant"), reply
    assert reply.grant.rewards[0].value == "40"
    with pytest.raises(grpc.RpcError) as caught:
        await promotion(api, "NARROW40", rewards=[ppb.PromotionReward(
            reward_type="cashback", kind=ppb.REWARD_KIND_SINGLE, value="40")])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- seed 002: the flash sale at the seed's scale  ------------------------------------------------


async def test_flash_sale_with_50000_codes_and_an_audience_cap_of_50000(api: Api) -> None:
    """Seed 002's 48-hour flash sale: "50,000 codes for your 50,000 loyalty members" in one .csv
    file, fallback "LOYALTY10", Single Reward "Percentage Off" 20, "an Audience Cap of 50,000";
    the lobby's Available (Used/Total) column then reads 3/50000 after three customers."""
    await reward_type(api, "percent_off")
    created = await ppb_grpc.PromotionServiceStub(api.channel).CreatePromotion(
        ppb.CreatePromotionRequest(request_id="flash", activate=True, promotion=ppb.Promotion(
            promotion_code="FLASH20", name="Loyalty Flash Sale 20%",
            rewards=[ppb.PromotionReward(reward_type="percent_off",
                                         kind=ppb.REWARD_KIND_SINGLE, value="20")],
            code_type=ppb.CODE_TYPE_PERSONALIZED, fallback_code="LOYALTY10",
            customer_cap=50_000)), metadata=api.key())
    assert created.promotion.status == ppb.PROMOTION_STATUS_ACTIVE
    uploaded = await upload(api, "FLASH20", codes_file("LFS", 50_000), "codes-50k",
                            chunk=1024 * 1024)
    assert uploaded.codes_added == 50_000
    replies = [await get_reward(api, f"member-{i}", "FLASH20") for i in range(3)]
    assert [r.grant.promo_code for r in replies] == ["LFS-000001", "LFS-000002", "LFS-000003"]
    assert all([(g.reward_type, g.value) for g in r.grant.rewards] == [("percent_off", "20")]
               for r in replies)
    state = await get_promotion(api, "FLASH20")
    assert (state.code_inventory.used, state.code_inventory.total,
            state.code_inventory.available) == (3, 50_000, 49_997)
    assert (state.customer_cap, state.customers) == (50_000, 3)
    assert not state.fallback_active


async def test_a_file_of_exactly_10_mb_is_accepted(api: Api) -> None:
    """Seed 002: "The file must be a single column with no header, and be no larger than 10MB":
    a file of exactly 10 MB (10 x 1024 x 1024 bytes, the limit docs/codes.md names) is taken
    whole."""
    await code_promotion(api, "TENMB", fallback="FB")
    data = "".join(f"C{i:014d}\n" for i in range(655_360)).encode()
    assert len(data) == 10 * 1024 * 1024
    uploaded = await upload(api, "TENMB", data, "ten-mb", chunk=1024 * 1024)
    assert (uploaded.codes_added, uploaded.inventory.total) == (655_360, 655_360)


async def test_the_first_line_is_a_code_not_a_header(api: Api) -> None:
    """Seed 002: the file has "no header": its first line is a code like any other."""
    await code_promotion(api, "NOHEAD", fallback="FB")
    uploaded = await upload(api, "NOHEAD", b"code\nX-1\n", "u1")
    assert uploaded.codes_added == 2
    assert (await get_reward(api, "a", "NOHEAD")).grant.promo_code == "code"


# --- seed 001: no fallback, the pool empties and the promotion pauses: the alerts say so ----------


async def test_depletion_without_a_fallback_alerts_that_the_promotion_paused(
        api: Api, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """Seed 001: "Set alerts based on absolute values ... of remaining codes"; "If no fallback
    reward is defined, the promotion will automatically pause when codes reach zero". The
    threshold (1 code left) and the depletion events carry their documented data; the depletion
    says the promotion paused and no fallback is active."""
    await code_promotion(api, "PAUSE", alerts=[ppb.CodeAlertThreshold(remaining_codes=1)])
    await upload(api, "PAUSE", codes_file("PS", 2), "u1")
    await get_reward(api, "a", "PAUSE")
    await get_reward(api, "b", "PAUSE")
    assert (await get_reward(api, "c", "PAUSE")).denial_reason == \
        rpb.DENIAL_REASON_OUT_OF_CODES

    async def dispatched() -> bool:
        return await pool.fetchval(
            "SELECT count(*) FROM code_pool_alerts WHERE emitted_at IS NULL") == 0

    await until(dispatched)
    [threshold] = await _event_data(pool, 101)
    [depleted] = await _event_data(pool, 102)
    assert await _event_data(pool, 103) == []
    assert datetime.fromisoformat(threshold.pop("raised_at")) == clock.now()
    assert datetime.fromisoformat(depleted.pop("raised_at")) == clock.now()
    assert threshold == {"promotion_code": "PAUSE", "alert": "THRESHOLD", "threshold": "1",
                         "level": 1, "remaining": 1, "used": 1, "total": 2}
    assert depleted == {"promotion_code": "PAUSE", "alert": "DEPLETED", "remaining": 0,
                        "used": 2, "total": 2, "fallback_code_active": False,
                        "promotion_paused": True}


# --- seed 002: the lobby's filters for Status and Type  -------------------------------------------


async def test_lobby_filters_by_status_and_type(api: Api) -> None:
    """Seed 002: "Use the Search bar and the filters for Status and Type at the top of the page
    to find a specific promotion quickly" (Type: the kind of reward)."""
    await reward_type(api)
    await promotion(api, "A-SINGLE")
    await promotion(api, "B-TIERED", rewards=[ppb.PromotionReward(
        reward_type="cashback", kind=ppb.REWARD_KIND_TIERED, tiers=CASHBACK_TIERS)])
    await promotion(api, "C-DRAFT", activate=False)
    await code_promotion(api, "D-CODES", fallback="FB")
    lobby = ppb_grpc.PromotionServiceStub(api.channel)

    async def listed(**filters: Any) -> list[str]:
        reply = await lobby.ListPromotions(ppb.ListPromotionsRequest(**filters),
                                           metadata=api.key())
        return [p.promotion_code for p in reply.promotions]

    assert await listed(statuses=[ppb.PROMOTION_STATUS_DRAFT]) == ["C-DRAFT"]
    assert await listed(statuses=[ppb.PROMOTION_STATUS_ACTIVE]) == [
        "A-SINGLE", "B-TIERED", "D-CODES"]
    assert await listed(reward_kinds=[ppb.REWARD_KIND_TIERED]) == ["B-TIERED"]
    assert await listed(statuses=[ppb.PROMOTION_STATUS_ACTIVE],
                        reward_kinds=[ppb.REWARD_KIND_SINGLE]) == ["A-SINGLE"]
    assert await listed(reward_kinds=[ppb.REWARD_KIND_EXTERNAL], search="codes") == ["D-CODES"]


# --- seed 004: formula examples not yet run end to end  -------------------------------------------


async def test_net_deposit_and_net_deposit_capped_by_100(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Seed 004: "Calculate Net-Deposit amount" and "Calculate NetDeposit capped by 100":
    deposits 500 + 300 less a withdrawal of 200 is 600, capped 100; 80 - 20 is 60 either way."""
    await create(api, definition("net", "sum(deposit.amount) - sum(withdrawal.amount)"))
    await create(api, definition("net-100",
                                 "cap(sum(deposit.amount) - sum(withdrawal.amount), 100)"))
    await customers(api, ("big", "EUR", "UTC"), ("small", "EUR", "UTC"))
    t = clock.now() - timedelta(hours=3)
    await events(api, "money", ("big", "deposit", "500", t, {}),
                 ("big", "deposit", "300", t + timedelta(minutes=1), {}),
                 ("big", "withdrawal", "200", t + timedelta(minutes=2), {}),
                 ("small", "deposit", "80", t, {}),
                 ("small", "withdrawal", "20", t + timedelta(minutes=1), {}))
    await request(api, "net", ["big", "small"], "r-net")
    await request(api, "net-100", ["big", "small"], "r-net-100")
    clock.advance(timedelta(minutes=5))
    assert await run_due_batches(pool, settings, clock) == 2
    found = {(r.definition_id, r.customer_id): _outcome(r) for r in await results(api)}
    assert found == {("net", "big"): (ISSUED, "600", ""), ("net", "small"): (ISSUED, "60", ""),
                     ("net-100", "big"): (ISSUED, "100", ""),
                     ("net-100", "small"): (ISSUED, "60", "")}


async def test_last_deposit_plus_the_number_of_deposits_and_a_user_property(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Seed 004, "Financial transactions & User properties": "a formula that calculates bonuses
    or points based on the last deposit amount plus the total number of deposits made by the
    user", and one combining such events "with User state properties (e.g., Logins count
    ever)": deposits 20 then 35 give 35 + 2 = 37 points; with 12 logins, 35 + 12 = 47."""
    await create(api, definition("last-plus-count", "last(deposit.amount) + count(deposit)",
                                 result_type=pb.BONUS_RESULT_TYPE_POINTS,
                                 points_target=pb.POINTS_TARGET_BALANCE))
    await create(api, definition("last-plus-logins",
                                 'last(deposit.amount) + customer["Logins count ever"]',
                                 result_type=pb.BONUS_RESULT_TYPE_POINTS,
                                 points_target=pb.POINTS_TARGET_BALANCE))
    await cupb_grpc.CustomerServiceStub(api.channel).UpsertCustomers(cupb.UpsertCustomersRequest(
        request_id="props", customers=[cupb.Customer(
            customer_id="p1", currency="EUR", time_zone="UTC",
            properties={"Logins count ever": cupb.PropertyValue(decimal_value="12")})]),
        metadata=api.key())
    t = clock.now() - timedelta(hours=2)
    await events(api, "deps", ("p1", "deposit", "20", t, {}),
                 ("p1", "deposit", "35", t + timedelta(minutes=30), {}))
    await request(api, "last-plus-count", ["p1"], "r-count")
    await request(api, "last-plus-logins", ["p1"], "r-logins")
    clock.advance(timedelta(minutes=5))
    assert await run_due_batches(pool, settings, clock) == 2
    found = {r.definition_id: _outcome(r) for r in await results(api)}
    assert found == {"last-plus-count": (ISSUED, "37", ""),
                     "last-plus-logins": (ISSUED, "47", "")}
    assert sorted((e.definition_id, e.amount, e.result_type, e.points_target)
                  for e in await ledger(api, "p1")) == [
        ("last-plus-count", "37", pb.BONUS_RESULT_TYPE_POINTS, pb.POINTS_TARGET_BALANCE),
        ("last-plus-logins", "47", pb.BONUS_RESULT_TYPE_POINTS, pb.POINTS_TARGET_BALANCE)]


async def test_diamonds_amount_with_a_minimum(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Seed 004, "Dynamic Points, Gems, or Diamonds ... set the Result type to Points amount /
    Gems amount / Diamonds amount"; "If the dynamic formula's calculated result falls below a
    minimum threshold, reward issuance will be suppressed": 5 diamonds a bet, at least 10."""
    await create(api, definition("diamonds", "count(bet) * 5",
                                 result_type=pb.BONUS_RESULT_TYPE_DIAMONDS, min_allowed="10",
                                 issued_message="You got {{event.bonus_amount}} diamonds"))
    await customers(api, ("a", "EUR", "UTC"), ("b", "EUR", "UTC"))
    t = clock.now() - timedelta(hours=1)
    await events(api, "bets", *[("a", "bet", "1", t + timedelta(seconds=i), {}) for i in range(3)],
                 ("b", "bet", "1", t, {}))
    found = await _compute(api, pool, settings, clock, "diamonds", ["a", "b"])
    assert _outcome(found["a"]) == (ISSUED, "15", "")
    assert _outcome(found["b"]) == (SKIPPED, "", "BELOW_MINIMUM")
    [entry] = await ledger(api, "a")
    assert (entry.amount, entry.result_type, entry.source) == (
        "15", pb.BONUS_RESULT_TYPE_DIAMONDS, "DYNAMIC_FORMULA")
    assert await ledger(api, "b") == []
    [issued] = await _event_data(pool, 112)
    assert (issued["customer_id"], issued["result_type"], issued["amount"],
            issued["bonus_amount"], issued["message"]) == (
        "a", "DIAMONDS", "15", "15", "You got 15 diamonds")
    [skipped] = await _event_data(pool, 110)
    assert (skipped["customer_id"], skipped["reason"]) == ("b", "BELOW_MINIMUM")


async def test_five_percent_of_yesterdays_net_loss_in_each_customers_day(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Seed 004: "a dynamic bonus as 5% of net loss on the bets done "yesterday"" (with
    "different timezones"): at 10:00 UTC on 22 November, yesterday is 21 November in Berlin
    (20 Nov 23:00 - 21 Nov 23:00 UTC) and in New York (21 Nov 05:00 - 22 Nov 05:00 UTC)."""
    await create(api, definition(
        "yesterday-5", "(sum(bet.amount) - sum(win.amount)) * 5%",
        period=fpb.TransactionPeriod(relative=fpb.TransactionPeriod.Relative(
            kind=fpb.RELATIVE_KIND_LAST_FULL_DAY))))
    await customers(api, ("ber", "EUR", "Europe/Berlin"), ("nyc", "EUR", "America/New_York"))
    at = datetime.fromisoformat
    rows = [("bet", "1000", "2026-11-20T22:00:00+00:00"),  # the day before, in both zones
            ("bet", "100", "2026-11-21T12:00:00+00:00"),  # yesterday in both
            ("win", "20", "2026-11-21T12:30:00+00:00"),  # yesterday in both
            ("bet", "60", "2026-11-22T02:00:00+00:00")]  # today in Berlin, yesterday in NY
    await events(api, "bets", *[(c, kind, amount, at(when), {})
                                for c in ("ber", "nyc") for kind, amount, when in rows])
    found = await _compute(api, pool, settings, clock, "yesterday-5", ["ber", "nyc"])
    assert {c: _outcome(r) for c, r in found.items()} == {
        "ber": (ISSUED, "4", ""), "nyc": (ISSUED, "7", "")}
    assert (found["ber"].period_start.ToDatetime(UTC), found["ber"].period_end.ToDatetime(UTC)) \
        == (at("2026-11-20T23:00:00+00:00"), at("2026-11-21T23:00:00+00:00"))
    assert (found["nyc"].period_start.ToDatetime(UTC), found["nyc"].period_end.ToDatetime(UTC)) \
        == (at("2026-11-21T05:00:00+00:00"), at("2026-11-22T05:00:00+00:00"))


async def test_ten_percent_cashback_for_bets_placed_during_the_weekend(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Seed 004: "A weekend promotion where users receive a 10% cashback for bets placed during
    the weekend ... bonuses are calculated on Monday based on weekend betting activity": of bets
    500 (Friday 23:59), 100 (Saturday 00:00), 40 (Sunday 23:59:59) and 70 (Monday 00:00) only
    the weekend's 140 count: 14."""
    clock.set(datetime(2026, 3, 9, 9, 0, tzinfo=UTC))  # Monday
    await create(api, definition("weekend-bets", "sum(bet.amount) * 10%",
                                 period=fpb.TransactionPeriod(
                                     relative=fpb.TransactionPeriod.Relative(
                                         kind=fpb.RELATIVE_KIND_LAST_WEEKEND, time_zone="UTC"))))
    await customers(api, ("w1", "EUR", "UTC"))
    await events(api, "weekend",
                 ("w1", "bet", "500", datetime(2026, 3, 6, 23, 59, tzinfo=UTC), {}),
                 ("w1", "bet", "100", datetime(2026, 3, 7, 0, 0, tzinfo=UTC), {}),
                 ("w1", "bet", "40", datetime(2026, 3, 8, 23, 59, 59, tzinfo=UTC), {}),
                 ("w1", "bet", "70", datetime(2026, 3, 9, 0, 0, tzinfo=UTC), {}))
    found = await _compute(api, pool, settings, clock, "weekend-bets", ["w1"])
    result = found["w1"]
    assert _outcome(result) == (ISSUED, "14", "")
    assert (result.period_start.ToDatetime(UTC), result.period_end.ToDatetime(UTC)) == (
        datetime(2026, 3, 7, tzinfo=UTC), datetime(2026, 3, 9, tzinfo=UTC))


# --- seed 004 FAQ: credits are consumed when results are 0, not defined or negative ---------------


async def test_zero_negative_and_undefined_results_are_still_computed_and_costed(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Seed 004 FAQ: "Are the "credits" consumed when bonus results are 0, not defined, or
    negative? Credits are consumed in all listed cases; computing resources are used regardless".
    A window whose every result is such a case is still a computed batch with its cost: three
    requests, three customers, the four events read (and nothing issued)."""
    await create(api, definition("net", "sum(deposit.amount) - sum(withdrawal.amount)"))
    await customers(api, ("zero", "EUR", "UTC"), ("negative", "EUR", "UTC"),
                    ("undefined", "EUR", "UTC"))
    t = clock.now() - timedelta(hours=1)
    await events(api, "n", ("zero", "deposit", "50", t, {}), ("zero", "withdrawal", "50", t, {}),
                 ("negative", "deposit", "50", t, {}),
                 ("negative", "withdrawal", "80", t, {}),
                 ("undefined", "bet", "10", t, {}))
    found = await _compute(api, pool, settings, clock, "net", ["zero", "negative", "undefined"])
    assert {c: _outcome(r) for c, r in found.items()} == {
        "zero": (SKIPPED, "", "ZERO_OR_NEGATIVE"), "negative": (SKIPPED, "", "ZERO_OR_NEGATIVE"),
        "undefined": (SKIPPED, "", "NO_MATCHING_TRANSACTIONS")}
    [batch] = (await stub(api).ListBonusBatches(pb.ListBonusBatchesRequest(
        definition_id="net"), metadata=api.key())).batches
    assert (batch.request_count, batch.customer_count, batch.events_read) == (3, 3, 4)
    assert len(await _event_data(pool, 110)) == 3
    assert await _event_data(pool, 112) == []


# --- seed 004: the qualification example, whole --------------------------------------------------


async def test_min_deposit_100_eur_then_every_100_gold_quest_bets_three_times(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Seed 004, "Using Qualification in the Automation Rules": "a minimum deposit of 100 EUR,
    combined with the rule of 100 bets on the "Gold Quest" game", and "Restricting
    Qualifications ... a user might receive a bonus three times for every 100 bets. Post this, a
    new deposit is required to re-qualify"; the bonus is "5% of net loss" without Roulette.
    q1 deposits 100 EUR and bets 2 EUR 350 times on Gold Quest (Roulette bets in between do not
    count): bonuses at the 100th, 200th and 300th bet, none after; a new deposit, 100 more bets,
    a fourth. q2 deposits 99.99 EUR: never qualifies."""
    await create(api, definition("net-loss-5", (
        'bets = sum(bet.amount where game_category != "Roulette")\n'
        'wins = sum(win.amount where game_category != "Roulette")\n'
        "(bets - wins) * 5%"), rounding=ppb.ROUNDING_MODE_ROUND, decimals=2))
    await rule(api, pb.BonusRule(
        rule_id="gold-quest-qualified", definition_id="net-loss-5", event_kind="bet",
        filter='game = "Gold Quest"', every=100, qualification_kind="deposit",
        qualification_min_amount="100", qualification_currency="EUR", max_executions=3,
        period_mode=pb.RULE_PERIOD_MODE_QUALIFICATION_TO_LAST))
    await customers(api, ("q1", "EUR", "UTC"), ("q2", "EUR", "UTC"))
    gold = {"game": "Gold Quest", "game_category": "Slots"}
    roulette = {"game": "Lightning", "game_category": "Roulette"}
    t0 = clock.now() - timedelta(hours=3)

    def bets(customer: str, start: datetime, n: int) -> list[tuple[str, str, str, datetime,
                                                                   dict[str, str]]]:
        rows: list[tuple[str, str, str, datetime, dict[str, str]]] = []
        for i in range(n):
            rows.append((customer, "bet", "2", start + timedelta(seconds=10 * i), gold))
            if i % 40 == 0:
                rows.append((customer, "bet", "50", start + timedelta(seconds=10 * i + 5),
                             roulette))
        return rows

    first_deposit = t0
    await events(api, "dep-1", ("q1", "deposit", "100", first_deposit, {}),
                 ("q2", "deposit", "99.99", first_deposit, {}))
    await events(api, "bets-1", *bets("q1", t0 + timedelta(minutes=1), 350),
                 *bets("q2", t0 + timedelta(minutes=1), 100))
    second_deposit = t0 + timedelta(hours=1, minutes=30)
    await events(api, "dep-2", ("q1", "deposit", "150", second_deposit, {}))
    await events(api, "bets-2", *bets("q1", second_deposit + timedelta(minutes=1), 100))
    clock.advance(timedelta(minutes=5))
    assert await run_due_batches(pool, settings, clock) == 1
    found = sorted(await results(api, definition_id="net-loss-5"),
                   key=lambda r: r.period_end.ToDatetime(UTC))
    assert [(r.customer_id, r.period_start.ToDatetime(UTC), r.status, r.amount)
            for r in found] == [
        ("q1", first_deposit, ISSUED, "10"),  # 100 x 2 = 200: 5% = 10
        ("q1", first_deposit, ISSUED, "20"),  # 200 bets since the qualification
        ("q1", first_deposit, ISSUED, "30"),  # 300 bets; then the limit of three
        ("q1", second_deposit, ISSUED, "10")]  # re-qualified: 100 more bets
    assert {r.source for r in found} == {"rule:gold-quest-qualified"}


# --- seed 000: "No Round: Keeps the exact calculated value" ---------------------------------------


async def test_ten_percent_of_the_last_deposit_rounds_nothing_away(api: Api,
                                                                  clock: FixedClock) -> None:
    """Seed 000's calculated reward "10% of the Last Deposit Amount" with no rounding chosen:
    the value is exact ("No Round: Keeps the exact calculated value"): a last deposit of 123.45
    gives 12.345."""
    await reward_type(api)
    await promotion(api, "EXACT", rewards=[ppb.PromotionReward(
        reward_type="cashback", kind=ppb.REWARD_KIND_CALCULATED,
        formula="last(deposit.amount) * 10%")])
    await _depositor(api, "c1", clock, "999", "123.45")
    assert (await get_reward(api, "c1", "EXACT")).grant.rewards[0].value == "12.345"


async def test_no_round_keeps_the_value_to_the_six_places_amounts_are_counted_in(
        api: Api, clock: FixedClock) -> None:
    """Seed 000: "No Round: Keeps the exact calculated value". Amounts are stored and budgets
    counted in 6 decimal places (numeric(20,6)), so an unrounded value keeps those 6 places,
    halves at the 7th rounded up (README, promotions.proto ROUNDING_MODE_NONE): 10% of a last
    deposit of 27.300001 is 2.7300001, granted as 2.73; 10% of 1.234565 is 0.1234565, granted
    as 0.123457 (nothing a budget could not count exactly)."""
    await reward_type(api)
    await promotion(api, "NOROUND", rewards=[ppb.PromotionReward(
        reward_type="cashback", kind=ppb.REWARD_KIND_CALCULATED,
        formula="last(deposit.amount) * 10%", rounding=ppb.ROUNDING_MODE_NONE)])
    await _depositor(api, "c1", clock, "27.300001")
    await _depositor(api, "c2", clock, "1.234565")
    await _depositor(api, "c3", clock, "12.34567")
    assert (await get_reward(api, "c1", "NOROUND")).grant.rewards[0].value == "2.73"
    assert (await get_reward(api, "c2", "NOROUND")).grant.rewards[0].value == "0.123457"
    assert (await get_reward(api, "c3", "NOROUND")).grant.rewards[0].value == "1.234567"


# --- seed 000: Daily, Weekly, Monthly and Lifetime caps on one reward type, all at once ----------


async def test_daily_weekly_monthly_and_lifetime_caps_together(api: Api,
                                                              clock: FixedClock) -> None:
    """Seed 000: "For each section, you can define Daily, Weekly, Monthly, and Lifetime caps,
    and you can set multiple definitions as needed"; "the promotion will be stopped when the
    first cap reaches its limit". Rewards of 15 under daily 30, weekly 60, monthly 75 and
    lifetime 90: each cap in turn is the first to stop the promotion, and each lets it go on
    when its own period turns, until the lifetime cap ends it."""
    await reward_type(api)
    await promotion(api, caps=[cap(ppb.CAP_PERIOD_DAILY, "30"), cap(ppb.CAP_PERIOD_WEEKLY, "60"),
                               cap(ppb.CAP_PERIOD_MONTHLY, "75"),
                               cap(ppb.CAP_PERIOD_LIFETIME, "90")])

    async def day(when: datetime, granted: list[str], denied: str,
                  period: int) -> None:
        clock.set(when)
        for customer in granted:
            assert (await get_reward(api, customer)).HasField("grant"), (when, customer)
        reply = await get_reward(api, denied)
        assert (reply.denial_reason, reply.denied_period) == (
            rpb.DENIAL_REASON_BUDGET_CAP_REACHED, period), (when, denied)

    await day(datetime(2026, 11, 2, 9, tzinfo=UTC), ["a", "b"], "c",
              ppb.CAP_PERIOD_DAILY)  # Monday: 30 a day
    await day(datetime(2026, 11, 3, 9, tzinfo=UTC), ["c", "d"], "e",
              ppb.CAP_PERIOD_DAILY)  # Tuesday: the day is full too, the week now 60
    await day(datetime(2026, 11, 4, 9, tzinfo=UTC), [], "e",
              ppb.CAP_PERIOD_WEEKLY)  # Wednesday: the week is full
    await day(datetime(2026, 11, 9, 9, tzinfo=UTC), ["e"], "f",
              ppb.CAP_PERIOD_MONTHLY)  # next Monday: 75 in November
    await day(datetime(2026, 12, 1, 9, tzinfo=UTC), ["f"], "g",
              ppb.CAP_PERIOD_LIFETIME)  # December: the lifetime 90 is reached
    await day(datetime(2027, 1, 4, 9, tzinfo=UTC), [], "g", ppb.CAP_PERIOD_LIFETIME)
    state = await get_promotion(api)
    assert state.availability == ppb.AVAILABILITY_BUDGET_EXHAUSTED
    assert {u.period: u.used for u in state.cap_usage if u.scope == "cashback"} == {
        ppb.CAP_PERIOD_DAILY: "0", ppb.CAP_PERIOD_WEEKLY: "0", ppb.CAP_PERIOD_MONTHLY: "0",
        ppb.CAP_PERIOD_LIFETIME: "90"}


# --- seed 002: a personalized-code promotion attached to a campaign  ------------------------------


async def test_each_approved_customer_of_a_campaign_gets_a_unique_code(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Seed 002, "Integrating Your Promotion into a Campaign": "select the Personalized Promo
    Code promotion you just activated. Each customer in the target audience will now be
    eligible to receive a unique code"; seed 001: "Optimove will only send the campaign to the
    customers explicitly approved". Four targets, three approved: three distinct codes, the
    rejected one and an outsider get none, the pool shows 3/5, reconciliation 3 approved and 3
    granted."""
    await code_promotion(api, "VIPCODES", fallback="VIP-FALLBACK")
    await upload(api, "VIPCODES", codes_file("VC", 5), "u1")
    execute_at = clock.now() + timedelta(hours=2)
    await create_campaign(api, "loyalty", execute_at, codes=["VIPCODES"],
                          customers=["m1", "m2", "m3", "m4"])
    await set_statuses(api, "loyalty", {"m1": True, "m2": True, "m3": True, "m4": False}, "s1")
    clock.set(execute_at)
    async with pool.acquire() as conn:
        [job_id] = [r["id"] for r in await conn.fetch(
            "SELECT id FROM outbox_jobs WHERE kind = 'campaign.execute'")]
    assert await run_outbox_job({"pool": pool, "clock": clock, "settings": settings},
                                job_id) == "done"
    replies = {c: await get_reward(api, c, "VIPCODES", campaign_id="loyalty")
               for c in ("m1", "m2", "m3", "m4", "outsider")}
    codes = [replies[c].grant.promo_code for c in ("m1", "m2", "m3")]
    assert sorted(codes) == ["VC-000001", "VC-000002", "VC-000003"]
    assert not any(replies[c].grant.fallback_code for c in ("m1", "m2", "m3"))
    assert replies["m4"].denial_reason == rpb.DENIAL_REASON_NOT_ELIGIBLE
    assert replies["outsider"].denial_reason == rpb.DENIAL_REASON_NOT_ELIGIBLE
    inventory = (await get_promotion(api, "VIPCODES")).code_inventory
    assert (inventory.used, inventory.total, inventory.available) == (3, 5, 2)
    report = await campb_grpc.CampaignServiceStub(api.channel).GetCampaignReconciliation(
        campb.GetCampaignReconciliationRequest(campaign_id="loyalty"), metadata=api.key())
    assert [(p.promotion_code, p.approved, p.granted, p.revoked) for p in report.promotions] \
        == [("VIPCODES", 3, 3, 0)]



# --- seed 004: a properties-only formula has no transaction period in campaigns either  -----------


async def test_a_campaign_schedule_of_a_properties_only_formula_takes_no_transaction_period(
        api: Api, clock: FixedClock) -> None:
    """Seed 004, "User properties only": "When this type of formula is used in Automation Rules
    and in Campaigns, there are no Transaction period options". For automation rules the
    service refuses a transaction period (INVALID_PERIOD, test_bonus_trigger_edits.py); the
    campaigns' own period option, "From campaign entrance till now"
    (since_campaign_entrance), must be refused the same way rather than stored and silently
    ignored (the result is then computed without any period)."""
    await reward_type(api)
    await promotion(api)
    await create(api, definition("logins", 'customer["Logins count ever"] * 2',
                                 data_mode=pb.BONUS_DATA_MODE_PROPERTIES_ONLY, period=None))
    await customers(api, ("k1", "EUR", "UTC"))
    await create_campaign(api, "vip", clock.now() + timedelta(hours=2), customers=["k1"])
    with pytest.raises(grpc.RpcError) as caught:
        await stub(api).CreateBonusSchedule(pb.CreateBonusScheduleRequest(
            request_id="since", schedule=pb.BonusSchedule(
                schedule_id="since", definition_id="logins", campaign_id="vip",
                since_campaign_entrance=True, local_time="11:00", time_zone="UTC")),
            metadata=api.key())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(caught.value) == "INVALID_PERIOD"
    listed = await stub(api).ListBonusSchedules(pb.ListBonusSchedulesRequest(),
                                                metadata=api.key())
    assert list(listed.schedules) == []

