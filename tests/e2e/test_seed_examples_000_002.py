"""Seeds 000, 001 and 002: the documented worked examples, rules and limits, asserted through
the real gRPC API (a real server, real PostgreSQL). From an audit of the seeds against the
engine, which found that a campaign could be created with a draft or deactivated promotion and
that a lowered reward type maximum was ignored for up to the cache's 2 seconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from core.clock import FixedClock
from promo.v1 import campaigns_pb2 as cpb
from promo.v1 import campaigns_pb2_grpc as cpb_grpc
from promo.v1 import customers_pb2 as cupb
from promo.v1 import customers_pb2_grpc as cupb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from promo.v1 import reward_types_pb2 as rtpb
from promo.v1 import reward_types_pb2_grpc as rtpb_grpc
from promo.v1 import rewards_pb2 as rpb
from tests.conftest import Api, rpc_error_reason
from tests.e2e.campaign_helpers import create_campaign, set_statuses, ts
from tests.e2e.code_helpers import code_promotion, codes_file, upload
from tests.e2e.promo_helpers import cap, get_promotion, get_reward, promotion, reward_type, single


async def _customer(api: Api, customer_id: str, clock: FixedClock,
                    events: list[tuple[str, str]]) -> None:
    """events: (kind, amount), one per hour before now, the last in the list the latest."""
    stub = cupb_grpc.CustomerServiceStub(api.channel)
    await stub.UpsertCustomers(cupb.UpsertCustomersRequest(
        request_id=f"u-{customer_id}", customers=[cupb.Customer(
            customer_id=customer_id, currency="USD")]), metadata=api.key())
    if events:
        n = len(events)
        await stub.RecordEvents(cupb.RecordEventsRequest(
            request_id=f"e-{customer_id}", events=[
                cupb.Event(external_id=f"{customer_id}-{i}", customer_id=customer_id,
                           kind=kind, amount=amount, currency="USD",
                           occurred_at=ts(clock.now() - timedelta(hours=n - i)))
                for i, (kind, amount) in enumerate(events)]), metadata=api.key())


def _calculated(formula: str, rounding: int = ppb.ROUNDING_MODE_UNSPECIFIED, decimals: int = 0,
                factor: str = "", **kw: object) -> ppb.PromotionReward:
    return ppb.PromotionReward(reward_type="cashback", kind=ppb.REWARD_KIND_CALCULATED,
                               formula=formula, rounding=rounding, decimals=decimals,  # type: ignore[arg-type]
                               rounding_factor=factor, **kw)  # type: ignore[arg-type]


def _value(reply: rpb.GetRewardResponse) -> str:
    assert reply.HasField("grant"), reply
    return reply.grant.rewards[0].value


# --- seed 000: calculated rewards and rounding ----------------------------------------------

async def test_ten_percent_of_the_last_deposit(api: Api, clock: FixedClock) -> None:
    """Seed 000: "10% of the Last Deposit Amount. If a customer's last deposit amount is $100,
    they will get a $10 promotion. ... $200, they will get a $20 promotion"."""
    await reward_type(api)
    await promotion(api, "LASTDEP", rewards=[_calculated("last(deposit.amount) * 10%")])
    await _customer(api, "a", clock, [("deposit", "500"), ("deposit", "100")])
    await _customer(api, "b", clock, [("deposit", "50"), ("deposit", "200")])
    assert _value(await get_reward(api, "a", "LASTDEP")) == "10"
    assert _value(await get_reward(api, "b", "LASTDEP")) == "20"


@pytest.mark.parametrize(("deposit", "rounding", "decimals", "factor", "expected"), [
    # "Setting it to 2 will transform 5.789 into 5.78"; "Setting it to 0 ... into 5"
    ("57.89", ppb.ROUNDING_MODE_ROUND_DOWN, 2, "", "5.78"),
    ("57.89", ppb.ROUNDING_MODE_ROUND_DOWN, 0, "", "5"),
    # "Round Up: Always rounds up", "Round: Rounds to the nearest value"
    ("57.89", ppb.ROUNDING_MODE_ROUND_UP, 0, "", "6"),
    ("57.89", ppb.ROUNDING_MODE_ROUND, 2, "", "5.79"),
    ("57.89", ppb.ROUNDING_MODE_ROUND, 0, "", "6"),
    # "No Round: Keeps the exact calculated value"
    ("57.89", ppb.ROUNDING_MODE_NONE, 0, "", "5.789"),
    # "MROUND (34.75, 0.1) = 34.8", "MROUND (11, 3) = 12"
    ("347.5", ppb.ROUNDING_MODE_MROUND, 1, "0.1", "34.8"),
    ("347.5", ppb.ROUNDING_MODE_MROUND, 0, "0.1", "34.8"),
    ("110", ppb.ROUNDING_MODE_MROUND, 0, "3", "12"),
])
async def test_calculated_reward_rounding_through_get_reward(
        api: Api, clock: FixedClock, deposit: str, rounding: int, decimals: int, factor: str,
        expected: str) -> None:
    await reward_type(api)
    await promotion(api, "ROUNDED", rewards=[_calculated("last(deposit.amount) * 10%", rounding,
                                                         decimals, factor)])
    await _customer(api, "c", clock, [("deposit", deposit)])
    assert _value(await get_reward(api, "c", "ROUNDED")) == expected


async def test_mround_reward_is_stored_and_read_back(api: Api) -> None:
    """Seed 000: "For MROUND, you must also define a Factor": the factor is kept."""
    await reward_type(api)
    created = await promotion(api, "MR", rewards=[_calculated(
        "last(deposit.amount) * 10%", ppb.ROUNDING_MODE_MROUND, 0, "3")])
    [reward] = created.rewards
    assert (reward.rounding, reward.rounding_factor) == (ppb.ROUNDING_MODE_MROUND, "3")


async def test_mround_without_a_factor_is_refused(api: Api) -> None:
    """Seed 000: "For MROUND, you must also define a Factor"."""
    await reward_type(api)
    with pytest.raises(grpc.RpcError) as err:
        await promotion(api, "MRX", rewards=[_calculated(
            "last(deposit.amount) * 10%", ppb.ROUNDING_MODE_MROUND, 0, "")])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- seed 000: constraints ------------------------------------------------------------------

async def test_promotion_overrides_the_reward_types_constraints(api: Api,
                                                                clock: FixedClock) -> None:
    """Seed 000: "Override Existing Constraints: You can modify constraints initially set in the
    Reward Type Settings ... specific to the current promotion"."""
    await reward_type(api, min_value="5", max_value="25")
    await promotion(api, "WIDER", rewards=[_calculated("last(deposit.amount) * 10%",
                                                       min_value="1", max_value="50")])
    await promotion(api, "TYPEBOUNDS", rewards=[_calculated("last(deposit.amount) * 10%")])
    await _customer(api, "big", clock, [("deposit", "1000")])
    await _customer(api, "small", clock, [("deposit", "30")])
    assert _value(await get_reward(api, "big", "WIDER")) == "50"
    assert _value(await get_reward(api, "small", "WIDER")) == "3"
    assert _value(await get_reward(api, "big", "TYPEBOUNDS")) == "25"
    below = await get_reward(api, "small", "TYPEBOUNDS")
    assert below.denial_reason == rpb.DENIAL_REASON_BELOW_MINIMUM


# --- seed 000 / 001: budget and customer caps -----------------------------------------------

async def test_weekly_cap_resets_on_monday(api: Api, clock: FixedClock) -> None:
    """Seed 000: Weekly caps (the proto: ISO weeks, Monday to Monday)."""
    await reward_type(api)
    await promotion(api, caps=[cap(ppb.CAP_PERIOD_WEEKLY, "30")])
    clock.set(datetime(2026, 11, 23, 9, 0, tzinfo=UTC))  # a Monday
    assert (await get_reward(api, "a")).HasField("grant")
    clock.set(datetime(2026, 11, 29, 23, 59, tzinfo=UTC))  # the Sunday after
    assert (await get_reward(api, "b")).HasField("grant")
    third = await get_reward(api, "c")
    assert third.denial_reason == rpb.DENIAL_REASON_BUDGET_CAP_REACHED
    assert third.denied_period == ppb.CAP_PERIOD_WEEKLY
    clock.set(datetime(2026, 11, 30, 0, 0, tzinfo=UTC))  # next Monday
    assert (await get_reward(api, "c")).HasField("grant")


async def test_monthly_cap_resets_on_the_first(api: Api, clock: FixedClock) -> None:
    await reward_type(api)
    await promotion(api, caps=[cap(ppb.CAP_PERIOD_MONTHLY, "15")])
    clock.set(datetime(2026, 11, 30, 23, 0, tzinfo=UTC))
    assert (await get_reward(api, "a")).HasField("grant")
    second = await get_reward(api, "b")
    assert second.denial_reason == rpb.DENIAL_REASON_BUDGET_CAP_REACHED
    assert second.denied_period == ppb.CAP_PERIOD_MONTHLY
    state = await get_promotion(api)
    assert state.availability == ppb.AVAILABILITY_CAPPED_FOR_PERIOD
    clock.set(datetime(2026, 12, 1, 0, 0, tzinfo=UTC))
    assert (await get_reward(api, "b")).HasField("grant")


async def test_layered_daily_and_lifetime_caps(api: Api, clock: FixedClock) -> None:
    """Seed 001: "apply a Daily Cap to pace your spend, combined with a Lifetime Cap as an
    absolute limit"; seed 000: "stopped when the first cap reaches its limit"."""
    await reward_type(api)
    await promotion(api, caps=[cap(ppb.CAP_PERIOD_DAILY, "30"),
                               cap(ppb.CAP_PERIOD_LIFETIME, "45")])
    day = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    clock.set(day)
    assert (await get_reward(api, "a")).HasField("grant")
    assert (await get_reward(api, "b")).HasField("grant")
    assert (await get_reward(api, "c")).denied_period == ppb.CAP_PERIOD_DAILY
    clock.set(day + timedelta(days=1))
    assert (await get_reward(api, "c")).HasField("grant")
    last = await get_reward(api, "d")
    assert last.denial_reason == rpb.DENIAL_REASON_BUDGET_CAP_REACHED
    assert last.denied_period == ppb.CAP_PERIOD_LIFETIME
    assert (await get_promotion(api)).availability == ppb.AVAILABILITY_BUDGET_EXHAUSTED
    clock.set(day + timedelta(days=2))
    assert (await get_reward(api, "d")).denied_period == ppb.CAP_PERIOD_LIFETIME


@pytest.mark.parametrize(("customer_cap", "budget", "granted", "reason", "availability"), [
    (2, "100", 2, rpb.DENIAL_REASON_CUSTOMER_CAP_REACHED,
     ppb.AVAILABILITY_CUSTOMER_CAP_REACHED),
    (10, "30", 2, rpb.DENIAL_REASON_BUDGET_CAP_REACHED, ppb.AVAILABILITY_BUDGET_EXHAUSTED),
])
async def test_first_cap_to_reach_its_limit_stops_the_promotion(
        api: Api, customer_cap: int, budget: str, granted: int, reason: int,
        availability: int) -> None:
    """Seed 000: "If both caps are configured, the promotion will be stopped when the first cap
    reaches its limit"."""
    await reward_type(api)
    await promotion(api, customer_cap=customer_cap, caps=[cap(ppb.CAP_PERIOD_LIFETIME, budget)])
    replies = [await get_reward(api, f"c{i}") for i in range(granted + 1)]
    assert [r.HasField("grant") for r in replies] == [True] * granted + [False]
    assert replies[-1].denial_reason == reason
    assert (await get_promotion(api)).availability == availability


async def test_budget_cap_of_a_second_reward_type(api: Api) -> None:
    """Seed 000: "If multiple reward types are configured in the rewards section, all will be
    available in the Budget Cap section": a cap on the second one stops the promotion, and
    the first one's budget is not charged by the denied grant."""
    await reward_type(api, "cashback")
    await reward_type(api, "spins", category=2)
    await promotion(api, "TWO", rewards=[single("cashback", "10"), single("spins", "20")],
                    caps=[cap(ppb.CAP_PERIOD_LIFETIME, "100", "cashback"),
                          cap(ppb.CAP_PERIOD_LIFETIME, "40", "spins")])
    first = await get_reward(api, "a", "TWO")
    assert [(r.reward_type, r.value) for r in first.grant.rewards] == [("cashback", "10"),
                                                                       ("spins", "20")]
    assert (await get_reward(api, "b", "TWO")).HasField("grant")
    third = await get_reward(api, "c", "TWO")
    assert third.denial_reason == rpb.DENIAL_REASON_BUDGET_CAP_REACHED
    assert (third.denied_scope, third.denied_period) == ("spins", ppb.CAP_PERIOD_LIFETIME)
    state = await get_promotion(api, "TWO")
    usage = {(u.scope, u.period): u.used for u in state.cap_usage}
    assert usage[("cashback", ppb.CAP_PERIOD_LIFETIME)] == "20"
    assert usage[("spins", ppb.CAP_PERIOD_LIFETIME)] == "40"


# --- seed 000: lifecycle --------------------------------------------------------------------

async def test_save_is_draft_and_save_and_activate_is_active(api: Api) -> None:
    """Seed 000: "Save – The promotion is saved as Draft"; "Save and Activate – ... Active"."""
    await reward_type(api)
    draft = await promotion(api, "DRAFTY", activate=False)
    active = await promotion(api, "LIVE", activate=True)
    assert draft.status == ppb.PROMOTION_STATUS_DRAFT
    assert active.status == ppb.PROMOTION_STATUS_ACTIVE
    assert (await get_reward(api, "x", "DRAFTY")).denial_reason == rpb.DENIAL_REASON_NOT_ACTIVE


async def test_deactivated_promotion_edits_details_and_reactivates(api: Api) -> None:
    """Seed 000: "Save and Deactivate ... allowing you to edit most details except for the
    promotion code ... and then re-activate when ready"."""
    await reward_type(api)
    await promotion(api, caps=[cap(ppb.CAP_PERIOD_LIFETIME, "15")])
    assert (await get_reward(api, "a")).HasField("grant")
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    await stub.DeactivatePromotion(ppb.DeactivatePromotionRequest(
        request_id="off", promotion_code="VIP25"), metadata=api.key())
    updated = await stub.UpdatePromotion(ppb.UpdatePromotionRequest(
        request_id="edit", promotion=ppb.Promotion(
            promotion_code="VIP25", description="new", customer_cap=5,
            budget_caps=[cap(ppb.CAP_PERIOD_LIFETIME, "45")], properties={"Country": "DE"}),
        update_mask=field_mask_pb2.FieldMask(paths=["description", "customer_cap",
                                                    "budget_caps", "properties"])),
        metadata=api.key())
    assert updated.promotion.status == ppb.PROMOTION_STATUS_DEACTIVATED
    assert updated.promotion.promotion_code == "VIP25"
    await stub.ActivatePromotion(ppb.ActivatePromotionRequest(
        request_id="on", promotion_code="VIP25"), metadata=api.key())
    b = await get_reward(api, "b")
    assert b.HasField("grant")
    assert dict(b.grant.properties) == {"Country": "DE"}
    assert (await get_reward(api, "c")).HasField("grant")
    assert (await get_reward(api, "d")).denial_reason == rpb.DENIAL_REASON_BUDGET_CAP_REACHED


# --- seed 002: personalized promo codes -----------------------------------------------------

async def test_flash_sale_single_reward_with_personal_codes_and_audience_cap(api: Api) -> None:
    """Seed 002 walkthrough: Personalized Codes, Fallback Code "LOYALTY10", Single Reward of
    "Percentage Off" with value 20, Audience Cap; "Once the limit is reached, the promotion will
    end"."""
    await reward_type(api, "percent_off")
    await ppb_grpc.PromotionServiceStub(api.channel).CreatePromotion(ppb.CreatePromotionRequest(
        request_id="flash", activate=True, promotion=ppb.Promotion(
            promotion_code="FLASH20", name="Loyalty Flash Sale 20%",
            rewards=[single("percent_off", "20")], code_type=ppb.CODE_TYPE_PERSONALIZED,
            fallback_code="LOYALTY10", customer_cap=4)), metadata=api.key())
    await upload(api, "FLASH20", codes_file("LF", 3), "u1")
    replies = [await get_reward(api, f"m{i}", "FLASH20") for i in range(5)]
    grants = [r.grant for r in replies[:4]]
    assert [g.promo_code for g in grants] == ["LF-000001", "LF-000002", "LF-000003",
                                              "LOYALTY10"]
    assert [g.fallback_code for g in grants] == [False, False, False, True]
    assert all([(r.reward_type, r.value) for r in g.rewards] == [("percent_off", "20")]
               for g in grants)
    assert replies[4].denial_reason == rpb.DENIAL_REASON_CUSTOMER_CAP_REACHED
    state = await get_promotion(api, "FLASH20")
    assert state.availability == ppb.AVAILABILITY_CUSTOMER_CAP_REACHED
    assert state.fallback_active
    assert (state.code_inventory.total, state.code_inventory.used,
            state.code_inventory.available) == (3, 3, 0)


async def test_inventory_shows_used_out_of_total(api: Api) -> None:
    """Seed 002: '"43/100" means 43 codes have been used from a pool of 100'."""
    await code_promotion(api, "INV", fallback="FB")
    await upload(api, "INV", codes_file("IV", 100), "u1")
    for i in range(43):
        await get_reward(api, f"c{i}", "INV")
    inventory = (await get_promotion(api, "INV")).code_inventory
    assert (inventory.used, inventory.total, inventory.available) == (43, 100, 57)


@pytest.mark.parametrize("data", [
    b"CODE1,extra\nCODE2,extra\n",  # two columns
    b"CODE1\nCODE1\n",  # not unique
])
async def test_code_file_must_be_one_column_of_unique_codes(api: Api, pool: asyncpg.Pool,
                                                            data: bytes) -> None:
    """Seed 002: "unique promo codes ... The file must be a single column"."""
    await code_promotion(api, "CSV", fallback="FB")
    with pytest.raises(grpc.RpcError) as err:
        await upload(api, "CSV", data, "bad")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await pool.fetchval("SELECT count(*) FROM promo_codes") == 0


async def test_codes_already_in_the_pool_are_not_added_twice(api: Api) -> None:
    """Seed 002: codes are unique and one-time: a second file repeating a code does not put
    it in the pool twice."""
    await code_promotion(api, "DUP", fallback="FB")
    await upload(api, "DUP", codes_file("DP", 3), "u1")
    try:
        await upload(api, "DUP", codes_file("DP", 3, start=3), "u2")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    replies = [await get_reward(api, f"c{i}", "DUP") for i in range(6)]
    personal = [r.grant.promo_code for r in replies if not r.grant.fallback_code]
    assert len(personal) == len(set(personal))


async def test_percentage_alert_threshold(api: Api, pool: asyncpg.Pool) -> None:
    """Seed 001: "Set alerts based on absolute values or percentages of remaining codes";
    "deduplicated and sent once per breach"."""
    await code_promotion(api, "PCT", fallback="FB", alerts=[
        ppb.CodeAlertThreshold(remaining_percent="10")])
    await upload(api, "PCT", codes_file("PC", 20), "u1")
    for i in range(17):  # remaining 19 ... 3; 10% of 20 is 2
        await get_reward(api, f"c{i}", "PCT")
    assert await pool.fetchval("SELECT count(*) FROM code_pool_alerts") == 0
    await get_reward(api, "c17", "PCT")  # remaining 2
    await get_reward(api, "c18", "PCT")  # remaining 1
    rows = await pool.fetch("SELECT kind, remaining FROM code_pool_alerts ORDER BY id")
    assert [(r["kind"], r["remaining"]) for r in rows] == [("THRESHOLD", 2)]


async def test_without_fallback_the_pool_shows_0_available_and_pauses(api: Api) -> None:
    """Seed 001: "If no fallback reward is defined, the promotion will automatically pause when
    codes reach zero"; seed 002: "When the pool is empty, it will show 0 Available"."""
    await code_promotion(api, "ZERO")
    await upload(api, "ZERO", codes_file("ZR", 2), "u1")
    await get_reward(api, "a", "ZERO")
    await get_reward(api, "b", "ZERO")
    state = await get_promotion(api, "ZERO")
    assert state.availability == ppb.AVAILABILITY_OUT_OF_CODES
    assert state.code_inventory.available == 0
    assert (await get_reward(api, "c", "ZERO")).denial_reason == rpb.DENIAL_REASON_OUT_OF_CODES


async def test_promotion_code_is_unchangeable_even_for_a_draft(api: Api) -> None:
    """Seed 000: "Once the promotion is created, you cannot edit the Promotion Code"."""
    await reward_type(api)
    await promotion(api, activate=False)
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    with pytest.raises(grpc.RpcError) as err:
        await stub.UpdatePromotion(ppb.UpdatePromotionRequest(
            request_id="rename", promotion=ppb.Promotion(promotion_code="VIP26"),
            update_mask=field_mask_pb2.FieldMask(paths=["promotion_code"])), metadata=api.key())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err.value) == "INVALID_UPDATE_MASK"


# --- seeds 000 / 002: only active promotions reach campaigns --------------------------------

@pytest.mark.parametrize("deactivate", [False, True])
async def test_a_campaign_cannot_use_a_promotion_that_is_not_active(
        api: Api, clock: FixedClock, deactivate: bool) -> None:
    """Seed 002: "Save: The promotion is saved as a Draft and will not be available for
    campaigns"; seed 000: "Save and Activate – The promotion status becomes Active, making it
    available inside the campaign builder"."""
    await reward_type(api)
    await promotion(api, activate=deactivate)
    if deactivate:
        await ppb_grpc.PromotionServiceStub(api.channel).DeactivatePromotion(
            ppb.DeactivatePromotionRequest(request_id="off", promotion_code="VIP25"),
            metadata=api.key())
    with pytest.raises(grpc.RpcError) as err:
        await create_campaign(api, "spring", clock.now() + timedelta(hours=2),
                              customers=["c1"])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_error_reason(err.value) == "PROMOTION_NOT_ACTIVE"
    status = "DEACTIVATED" if deactivate else "DRAFT"
    assert err.value.details() == (
        f"promotion 'VIP25' is {status}: only an ACTIVE promotion can be used in a campaign "
        "(activate it first)")


# --- seed 000: reward type constraints are live ---------------------------------------------

async def test_a_lowered_reward_type_maximum_applies_to_the_next_grant(
        api: Api, clock: FixedClock) -> None:
    """Seed 000: "Reward Constraints (Optional): Set minimum and/or maximum allowed values for
    this reward type": once the maximum is 10, no grant pays more than 10."""
    await reward_type(api, max_value="25")
    await promotion(api, "LIVEMAX", rewards=[_calculated("last(deposit.amount) * 10%")])
    await _customer(api, "a", clock, [("deposit", "1000")])
    await _customer(api, "b", clock, [("deposit", "1000")])
    assert _value(await get_reward(api, "a", "LIVEMAX")) == "25"
    await rtpb_grpc.RewardTypeServiceStub(api.channel).UpdateRewardType(
        rtpb.UpdateRewardTypeRequest(
            request_id="lower", reward_type=rtpb.RewardType(name="cashback", max_value="10"),
            update_mask=field_mask_pb2.FieldMask(paths=["max_value"])), metadata=api.key())
    assert _value(await get_reward(api, "b", "LIVEMAX")) == "10"


# --- seed 001: audience capping counts unique customers -------------------------------------

async def test_customer_cap_counts_unique_customers_across_campaigns(api: Api) -> None:
    """Seed 001: "Audience Capping (Customer Capping): Limits the total number of unique
    customers who can receive the promotion": the same customer in a second campaign is
    still one customer."""
    await reward_type(api)
    await promotion(api, customer_cap=2)
    assert (await get_reward(api, "a", campaign_id="wave-1")).HasField("grant")
    assert (await get_reward(api, "a", campaign_id="wave-2")).HasField("grant")
    assert (await get_reward(api, "b", campaign_id="wave-2")).HasField("grant")
    assert (await get_reward(api, "c", campaign_id="wave-2")).denial_reason == \
        rpb.DENIAL_REASON_CUSTOMER_CAP_REACHED
    assert (await get_promotion(api)).customers == 2


# --- seed 002: the lobby --------------------------------------------------------------------

async def test_lobby_list_shows_code_inventory_and_default_code_on(api: Api) -> None:
    """Seed 002: "You can track the usage ... from the main Promotions lobby ... The Available
    (Used/Total) column"; "the status may change to indicate that the fallback is now active
    (e.g., "Default Code On")"."""
    await code_promotion(api, "LOBBY", fallback="FB")
    await upload(api, "LOBBY", codes_file("LB", 2), "u1")
    for i in range(3):
        await get_reward(api, f"c{i}", "LOBBY")
    listed = await ppb_grpc.PromotionServiceStub(api.channel).ListPromotions(
        ppb.ListPromotionsRequest(search="LOBBY"), metadata=api.key())
    [row] = listed.promotions
    assert row.code_type == ppb.CODE_TYPE_PERSONALIZED
    assert (row.code_inventory.used, row.code_inventory.total,
            row.code_inventory.available, row.code_inventory.fallback_grants) == (2, 2, 0, 1)
    assert row.fallback_active


async def test_default_code_goes_off_when_codes_are_replenished(api: Api) -> None:
    """Seed 002: the fallback is given "if the list of personalized codes runs out"; once codes
    are uploaded again, customers get personal codes and the fallback is no longer on."""
    await code_promotion(api, "REFILL", fallback="FB")
    await upload(api, "REFILL", codes_file("RF", 1), "u1")
    await get_reward(api, "a", "REFILL")
    assert (await get_reward(api, "b", "REFILL")).grant.promo_code == "FB"
    assert (await get_promotion(api, "REFILL")).fallback_active
    await upload(api, "REFILL", codes_file("RF", 2, start=2), "u2")
    state = await get_promotion(api, "REFILL")
    assert not state.fallback_active
    assert state.code_inventory.available == 2
    c = await get_reward(api, "c", "REFILL")
    assert (c.grant.promo_code, c.grant.fallback_code) == ("RF-000002", False)


@pytest.mark.parametrize(("period", "limit", "first", "still_capped", "next_period"), [
    # 23:00 on 30 November in New York is 04:00 UTC on 1 December: still November there.
    (ppb.CAP_PERIOD_MONTHLY, "15", datetime(2026, 12, 1, 4, 0, tzinfo=UTC),
     datetime(2026, 12, 1, 4, 59, tzinfo=UTC), datetime(2026, 12, 1, 5, 0, tzinfo=UTC)),
    # Sunday 29 November 23:30 in New York is Monday 04:30 UTC: still the old week there.
    (ppb.CAP_PERIOD_WEEKLY, "15", datetime(2026, 11, 30, 4, 30, tzinfo=UTC),
     datetime(2026, 11, 30, 4, 59, tzinfo=UTC), datetime(2026, 11, 30, 5, 0, tzinfo=UTC)),
])
async def test_weekly_and_monthly_caps_follow_the_promotions_time_zone(
        api: Api, clock: FixedClock, period: int, limit: str, first: datetime,
        still_capped: datetime, next_period: datetime) -> None:
    await reward_type(api)
    await promotion(api, time_zone="America/New_York", caps=[cap(period, limit)])
    clock.set(first)
    assert (await get_reward(api, "a")).HasField("grant")
    clock.set(still_capped)
    assert (await get_reward(api, "b")).denied_period == period
    clock.set(next_period)
    assert (await get_reward(api, "b")).HasField("grant")


async def test_a_personal_code_is_never_also_the_shared_fallback_code(api: Api) -> None:
    """Seed 002: personalized codes are "unique, one-time codes ... preventing unintended
    sharing", while the fallback is "a single, default promo code" for everyone once the pool
    runs out: a code cannot be both, or the customer who got it personally shares it."""
    await code_promotion(api, "CLASH", fallback="CL-000001")
    try:
        await upload(api, "CLASH", codes_file("CL", 2), "u1")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        return
    replies = [await get_reward(api, f"c{i}", "CLASH") for i in range(3)]
    personal = [r.grant.promo_code for r in replies if not r.grant.fallback_code]
    assert "CL-000001" not in personal


async def test_depletion_alerts_again_after_a_replenishment(api: Api, pool: asyncpg.Pool) -> None:
    """Seed 001: "If codes are replenished and then drop again, a new alert can trigger. If no
    fallback reward is defined, the promotion will automatically pause when codes reach
    zero"."""
    await code_promotion(api, "AGAIN", alerts=[ppb.CodeAlertThreshold(remaining_codes=1)])
    await upload(api, "AGAIN", codes_file("AG", 2), "u1")
    await get_reward(api, "a", "AGAIN")  # remaining 1: threshold
    await get_reward(api, "b", "AGAIN")  # remaining 0: depleted
    assert (await get_reward(api, "c", "AGAIN")).denial_reason == \
        rpb.DENIAL_REASON_OUT_OF_CODES
    await upload(api, "AGAIN", codes_file("AG", 2, start=3), "u2")  # remaining 2: re-armed
    await get_reward(api, "c", "AGAIN")
    await get_reward(api, "d", "AGAIN")
    rows = await pool.fetch("SELECT kind, remaining FROM code_pool_alerts ORDER BY id")
    assert [(r["kind"], r["remaining"]) for r in rows] == [
        ("THRESHOLD", 1), ("DEPLETED", 0), ("THRESHOLD", 1), ("DEPLETED", 0)]


# --- seed 001: conditional execution --------------------------------------------------------

async def test_processed_customers_carry_clearance_required_by(api: Api,
                                                              clock: FixedClock) -> None:
    """Seed 001: listeners are notified "30 minutes prior to execution (the "Clearance Required
    By" time)" and pull the list with GetProcessedCampaignCustomers; a customer never sent
    with status true is not approved."""
    await reward_type(api)
    await promotion(api)
    execute_at = clock.now() + timedelta(hours=2)
    await create_campaign(api, "spring", execute_at, customers=["c1", "c2", "c3"])
    stub = cpb_grpc.ClearanceServiceStub(api.channel)
    page = await stub.GetProcessedCampaignCustomers(cpb.GetProcessedCampaignCustomersRequest(
        campaign_id="spring"), metadata=api.key("listener"))
    assert page.clearance_required_by.ToDatetime(UTC) == execute_at
    assert page.target_count == 3
    await set_statuses(api, "spring", {"c1": True, "c2": False}, "s1")
    statuses = {c.customer_id: (c.approved if c.HasField("approved") else None)
                for c in (await stub.GetProcessedCampaignCustomers(
                    cpb.GetProcessedCampaignCustomersRequest(campaign_id="spring"),
                    metadata=api.key("listener"))).customers}
    assert statuses == {"c1": True, "c2": False, "c3": None}
