"""Audit: the .proto files are the contract; every behavioural promise their comments make is
checked through a real server (the `api` fixture: real gRPC, real PostgreSQL, pinned clock).

Method: the comments of protos/promo/v1/*.proto (11 files, about 2,500 lines) were read for
testable statements (defaults, "empty means", limits, orderings, output-only fields being
filled, error reasons, idempotency, time zones and units). 131 statements were listed. 43 were
already covered by the suite and are not repeated here: the page-size defaults/maxima, token
and ordering promises of every List RPC (test_pagination_matrix.py), request-id retries
(test_idempotency_matrix.py), and reasons or fields found by grep in tests/ (denied_scope,
TOO_MANY_ENTRIES, INVALID_EVENTS, INVALID_VARIABLE, JOB_NOT_DEAD, USE_REDELIVER_EVENT,
calculated_after/before, DYNAMIC_FORMULA, first_applied_promotion_ids, cancelled_deliveries,
selection_locked, returns_template, the Berlin 31-day period of RequestBonusCalculation, ...).
A few listed statements are not testable from outside (what GetReward's context logs) and were
left. 84 statements are checked here (some tests restate a covered one on the way, as setup);
each test's docstring names the proto file:line of its promises.

Result: 82 kept, 2 broken; both were comments that said less or other than the server does,
and both comments are now mended (the tests below check the mended wording):

- promotions.proto listed the UpdatePromotion mask paths without code_type, fallback_code
  and code_alerts, which the server accepts (server/promotions.py UPDATABLE).
- rewards.proto promised one grant per customer, promotion and campaign, a second call
  returning the same grant; after RevokeGrant the next call makes a new grant (the unique index
  is on live grants only, storage/migrations/0002_promotions.sql:50-52, as docs/codes.md:75-76
  intends). It now says "one live grant".

Deterministic: the clock is pinned, campaign jobs run through the outbox runner, no sleeps.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as bpb
from promo.v1 import bonuses_pb2_grpc as bpb_grpc
from promo.v1 import campaigns_pb2 as campb
from promo.v1 import campaigns_pb2_grpc as campb_grpc
from promo.v1 import codes_pb2 as codepb
from promo.v1 import codes_pb2_grpc as codepb_grpc
from promo.v1 import customers_pb2 as custpb
from promo.v1 import customers_pb2_grpc as custpb_grpc
from promo.v1 import formulas_pb2 as fpb
from promo.v1 import formulas_pb2_grpc as fpb_grpc
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import listeners_pb2_grpc as lpb_grpc
from promo.v1 import products_pb2 as prodpb
from promo.v1 import products_pb2_grpc as prodpb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from promo.v1 import reward_types_pb2 as rtpb
from promo.v1 import reward_types_pb2_grpc as rtpb_grpc
from tests.conftest import Api, rpc_error_reason
from tests.e2e.campaign_helpers import create_campaign, set_statuses, ts
from tests.e2e.code_helpers import code_promotion, codes_file, upload
from tests.e2e.promo_helpers import (
    cap,
    get_promotion,
    get_reward,
    promotion,
    revoke,
    reward_type,
    single,
)
from workers import campaigns as _campaign_jobs  # noqa: F401  registers the campaign handlers
from workers.outbox import run_outbox_job

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)  # the clock fixture's time (a Sunday)


def rid() -> str:
    return uuid.uuid4().hex


def promotions(api: Api) -> ppb_grpc.PromotionServiceStub:
    return ppb_grpc.PromotionServiceStub(api.channel)


def campaigns(api: Api) -> campb_grpc.CampaignServiceStub:
    return campb_grpc.CampaignServiceStub(api.channel)


def clearance(api: Api) -> campb_grpc.ClearanceServiceStub:
    return campb_grpc.ClearanceServiceStub(api.channel)


def customers_stub(api: Api) -> custpb_grpc.CustomerServiceStub:
    return custpb_grpc.CustomerServiceStub(api.channel)


def products(api: Api) -> prodpb_grpc.ProductPromotionServiceStub:
    return prodpb_grpc.ProductPromotionServiceStub(api.channel)


def bonuses(api: Api) -> bpb_grpc.BonusServiceStub:
    return bpb_grpc.BonusServiceStub(api.channel)


def listeners(api: Api) -> lpb_grpc.ListenerServiceStub:
    return lpb_grpc.ListenerServiceStub(api.channel)


async def refused(call: object) -> grpc.RpcError:
    try:
        await call  # type: ignore[misc]
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call was not refused")


async def execute_due(pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Every due campaign job, once, through the runner (as the arq worker would)."""
    async with pool.acquire() as conn:
        ids = [r["id"] for r in await conn.fetch(
            """SELECT id FROM outbox_jobs WHERE status = 'pending' AND due_at <= $1
                 AND kind LIKE 'campaign.%' ORDER BY due_at, id""", clock.now())]
    ctx: dict[str, Any] = {"pool": pool, "clock": clock, "settings": settings, "redis": None}
    for job_id in ids:
        await run_outbox_job(ctx, job_id)


async def executed_campaign(api: Api, pool: asyncpg.Pool, settings: Settings,
                            clock: FixedClock, customers: list[str],
                            codes: list[str] | None = None) -> None:
    """A plain (not conditional) campaign "camp" of these customers, executed."""
    await create_campaign(api, "camp", clock.now() + timedelta(hours=1), customers=customers,
                          codes=codes, conditional=False)
    clock.advance(timedelta(hours=1, seconds=1))
    await execute_due(pool, settings, clock)
    shown = await campaigns(api).GetCampaign(campb.GetCampaignRequest(campaign_id="camp"),
                                             metadata=api.key())
    assert shown.campaign.status == campb.CAMPAIGN_STATUS_EXECUTED


async def upsert(api: Api, *ids: str) -> None:
    await customers_stub(api).UpsertCustomers(custpb.UpsertCustomersRequest(
        request_id=rid(), customers=[custpb.Customer(customer_id=i) for i in ids]),
        metadata=api.key("runtime"))


async def update_promotion(api: Api, message: ppb.Promotion,
                           *paths: str) -> ppb.Promotion:
    response = await promotions(api).UpdatePromotion(ppb.UpdatePromotionRequest(
        request_id=rid(), promotion=message,
        update_mask=field_mask_pb2.FieldMask(paths=list(paths))), metadata=api.key())
    return response.promotion


# --- promotions.proto -------------------------------------------------------------------------


async def test_cap_windows_are_in_the_time_zone_and_lifetime_has_no_end(api: Api) -> None:
    """promotions.proto:48 (cap windows in the promotion's time zone), :52 (ISO weeks, Monday
    to Monday), :176-178 (period_end unset for LIFETIME)."""
    await reward_type(api)
    shown = await promotion(api, time_zone="Europe/Berlin", caps=[
        cap(ppb.CAP_PERIOD_DAILY, "100"), cap(ppb.CAP_PERIOD_WEEKLY, "500"),
        cap(ppb.CAP_PERIOD_MONTHLY, "900"), cap(ppb.CAP_PERIOD_LIFETIME, "1000")])
    usage = {u.period: u for u in shown.cap_usage}
    daily = usage[ppb.CAP_PERIOD_DAILY]
    # 2026-11-22 10:00 UTC is 11:00 in Berlin (CET): the day starts at 23:00 UTC the day before.
    assert daily.period_start.ToDatetime(UTC) == datetime(2026, 11, 21, 23, 0, tzinfo=UTC)
    assert daily.period_end.ToDatetime(UTC) == datetime(2026, 11, 22, 23, 0, tzinfo=UTC)
    weekly = usage[ppb.CAP_PERIOD_WEEKLY]
    # Sunday 22 November: the ISO week began on Monday 16 November, Berlin midnight.
    assert weekly.period_start.ToDatetime(UTC) == datetime(2026, 11, 15, 23, 0, tzinfo=UTC)
    assert weekly.period_end.ToDatetime(UTC) == datetime(2026, 11, 22, 23, 0, tzinfo=UTC)
    monthly = usage[ppb.CAP_PERIOD_MONTHLY]
    assert monthly.period_start.ToDatetime(UTC) == datetime(2026, 10, 31, 23, 0, tzinfo=UTC)
    assert monthly.period_end.ToDatetime(UTC) == datetime(2026, 11, 30, 23, 0, tzinfo=UTC)
    lifetime = usage[ppb.CAP_PERIOD_LIFETIME]
    assert not lifetime.HasField("period_end")


async def test_time_zone_defaults_to_utc_and_customer_cap_zero_means_none(api: Api) -> None:
    """promotions.proto:191 (time_zone default UTC), :194 (customer_cap 0 means no cap)."""
    await reward_type(api)
    created = (await promotions(api).CreatePromotion(ppb.CreatePromotionRequest(
        request_id=rid(), activate=True, promotion=ppb.Promotion(
            promotion_code="NOZONE", name="No zone", rewards=[single()])),
        metadata=api.key())).promotion
    assert created.time_zone == "UTC"
    assert created.customer_cap == 0
    assert [u.scope for u in created.cap_usage] == []
    for i in range(3):
        assert (await get_reward(api, f"c{i}", "NOZONE")).HasField("grant")


async def test_customers_counts_only_customers_with_a_live_grant(api: Api) -> None:
    """promotions.proto:201-202 (customers: unique customers with a live grant)."""
    await reward_type(api)
    await promotion(api)
    first = await get_reward(api, "c1")
    await get_reward(api, "c1")
    await get_reward(api, "c2")
    assert (await get_promotion(api)).customers == 2
    await revoke(api, first.grant.grant_id)
    assert (await get_promotion(api)).customers == 1


async def test_version_increases_when_a_paid_reward_type_changes(api: Api) -> None:
    """promotions.proto:203-205 (version increases with every change, also of a reward type it
    pays)."""
    await reward_type(api)
    before = (await promotion(api)).version
    await rtpb_grpc.RewardTypeServiceStub(api.channel).UpdateRewardType(
        rtpb.UpdateRewardTypeRequest(request_id=rid(), reward_type=rtpb.RewardType(
            name="cashback", max_value="50"),
            update_mask=field_mask_pb2.FieldMask(paths=["max_value"])), metadata=api.key())
    assert (await get_promotion(api)).version > before


async def test_list_search_is_case_insensitive_on_name_or_code_and_filters_kinds(
        api: Api) -> None:
    """promotions.proto:250 (search: case-insensitive substring of the name or the code), :252-255
    (statuses and reward_kinds filters), :258 (ordered by code)."""
    await reward_type(api)
    await promotion(api, "ZETA1")
    await promotion(api, "alpha2", activate=False)
    await promotions(api).CreatePromotion(ppb.CreatePromotionRequest(
        request_id=rid(), promotion=ppb.Promotion(
            promotion_code="EXT3", name="Summer Splash", rewards=[ppb.PromotionReward(
                reward_type="cashback", kind=ppb.REWARD_KIND_EXTERNAL)])), metadata=api.key())

    async def codes(**kw: object) -> list[str]:
        page = await promotions(api).ListPromotions(ppb.ListPromotionsRequest(**kw),  # type: ignore[arg-type]
                                                    metadata=api.key())
        return [p.promotion_code for p in page.promotions]

    assert await codes(search="zeta") == ["ZETA1"]
    assert await codes(search="ALPHA") == ["alpha2"]
    assert await codes(search="sPLASH") == ["EXT3"]
    assert await codes(search="promotion") == ["ZETA1", "alpha2"]
    assert await codes(statuses=[ppb.PROMOTION_STATUS_DRAFT]) == ["EXT3", "alpha2"]
    assert await codes(reward_kinds=[ppb.REWARD_KIND_EXTERNAL]) == ["EXT3"]
    assert await codes() == ["EXT3", "ZETA1", "alpha2"]


async def test_update_mask_paths_are_the_documented_ones(api: Api) -> None:
    """promotions.proto UpdatePromotionRequest.update_mask (paths among name, description,
    properties, time_zone, rewards, customer_cap, budget_caps, code_type, fallback_code,
    code_alerts; any other is INVALID_UPDATE_MASK)."""
    await code_promotion(api, "FLASH")
    await promotions(api).DeactivatePromotion(ppb.DeactivatePromotionRequest(
        request_id=rid(), promotion_code="FLASH"), metadata=api.key())
    updated = await update_promotion(
        api, ppb.Promotion(promotion_code="FLASH", fallback_code="WELCOME"), "fallback_code")
    assert updated.fallback_code == "WELCOME"
    exc = await refused(update_promotion(
        api, ppb.Promotion(promotion_code="FLASH", status=ppb.PROMOTION_STATUS_ACTIVE),
        "status"))
    assert rpc_error_reason(exc) == "INVALID_UPDATE_MASK"


async def test_lookback_days_defaults_to_thirty(api: Api) -> None:
    """promotions.proto:147 (lookback_days 1-31, default 30)."""
    await reward_type(api)
    shown = await promotion(api, "CALC", rewards=[ppb.PromotionReward(
        reward_type="cashback", kind=ppb.REWARD_KIND_CALCULATED,
        formula="last(deposit.amount) * 10%", rounding=ppb.ROUNDING_MODE_ROUND, decimals=2)])
    assert shown.rewards[0].lookback_days == 30
    exc = await refused(promotion(api, "CALC32", rewards=[ppb.PromotionReward(
        reward_type="cashback", kind=ppb.REWARD_KIND_CALCULATED, lookback_days=32,
        formula="last(deposit.amount) * 10%", rounding=ppb.ROUNDING_MODE_ROUND, decimals=2)]))
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_reconciliation_customers_row_first_and_limit_empty_without_cap(
        api: Api) -> None:
    """promotions.proto:305-308 ("#customers" row listed first while a customer cap is set),
    :322 (limit empty when no cap of this period exists now)."""
    await reward_type(api)
    await promotion(api, customer_cap=5, caps=[cap(ppb.CAP_PERIOD_DAILY, "100")])
    granted = await get_reward(api, "c1")
    await get_reward(api, "c2")
    await revoke(api, granted.grant.grant_id)
    await promotions(api).DeactivatePromotion(ppb.DeactivatePromotionRequest(
        request_id=rid(), promotion_code="VIP25"), metadata=api.key())
    await update_promotion(api, ppb.Promotion(promotion_code="VIP25"), "budget_caps")
    rows = list((await promotions(api).GetPromotionReconciliation(
        ppb.GetPromotionReconciliationRequest(promotion_code="VIP25"),
        metadata=api.key())).rows)
    assert rows[0].scope == "#customers"
    assert (rows[0].granted_count, rows[0].revoked_count, rows[0].net_amount,
            rows[0].limit) == (2, 1, "1", "5")
    daily = [r for r in rows if r.scope == "cashback" and r.period == ppb.CAP_PERIOD_DAILY]
    assert len(daily) == 1
    assert daily[0].limit == ""
    assert (daily[0].granted_count, daily[0].revoked_count) == (2, 1)


# --- rewards.proto ----------------------------------------------------------------------------


async def test_external_reward_without_value_is_empty_and_charges_nothing(api: Api) -> None:
    """rewards.proto:382-384 (without external_values an external reward charges 0), :393
    (value empty for an EXTERNAL reward without an external value)."""
    await reward_type(api)
    await promotion(api, rewards=[ppb.PromotionReward(reward_type="cashback",
                                                      kind=ppb.REWARD_KIND_EXTERNAL)],
                    caps=[cap(ppb.CAP_PERIOD_DAILY, "100")])
    bare = await get_reward(api, "c1")
    assert bare.grant.rewards[0].value == ""
    valued = await get_reward(api, "c2", external_values={"cashback": "30"})
    assert valued.grant.rewards[0].value == "30"
    usage = {u.period: u for u in (await get_promotion(api)).cap_usage}
    assert usage[ppb.CAP_PERIOD_DAILY].used == "30"
    assert usage[ppb.CAP_PERIOD_DAILY].grants == 2


async def test_revoke_twice_says_false_and_frees_the_customer_slot(api: Api) -> None:
    """rewards.proto:346-347 (revoke returns the budget and the customer slot), :444-445
    (revoked false when it was already revoked)."""
    await reward_type(api)
    await promotion(api, customer_cap=1)
    first = await get_reward(api, "c1")
    assert (await get_reward(api, "c2")).denial_reason == 2  # CUSTOMER_CAP_REACHED
    assert (await revoke(api, first.grant.grant_id)).revoked is True
    assert (await revoke(api, first.grant.grant_id)).revoked is False
    assert (await get_reward(api, "c2")).HasField("grant")


async def test_existing_grant_shows_current_display_name_and_properties(api: Api) -> None:
    """rewards.proto:390 (display name as it is now), :407-409 (properties as they are now; id,
    values and code never change), :421-423 (existing)."""
    await reward_type(api)
    await promotion(api, properties={"banner": "old"})
    first = await get_reward(api, "c1")
    assert first.existing is False
    await rtpb_grpc.RewardTypeServiceStub(api.channel).UpdateRewardType(
        rtpb.UpdateRewardTypeRequest(request_id=rid(), reward_type=rtpb.RewardType(
            name="cashback", display_name="Cash back!"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"])), metadata=api.key())
    await promotions(api).DeactivatePromotion(ppb.DeactivatePromotionRequest(
        request_id=rid(), promotion_code="VIP25"), metadata=api.key())
    await update_promotion(api, ppb.Promotion(promotion_code="VIP25",
                                              properties={"banner": "new"},
                                              rewards=[single(value="99")]),
                           "properties", "rewards")
    await promotions(api).ActivatePromotion(ppb.ActivatePromotionRequest(
        request_id=rid(), promotion_code="VIP25"), metadata=api.key())
    again = await get_reward(api, "c1")
    assert again.existing is True
    assert again.grant.grant_id == first.grant.grant_id
    assert again.grant.rewards[0].display_name == "Cash back!"
    assert again.grant.rewards[0].value == "15"
    assert dict(again.grant.properties) == {"banner": "new"}


async def test_request_id_is_scoped_to_the_promotion(api: Api) -> None:
    """rewards.proto:372-375 (same id with another customer is REQUEST_ID_REUSED; on another
    promotion it is another request)."""
    await reward_type(api)
    await promotion(api, "P1")
    await promotion(api, "P2")
    one = await get_reward(api, "c1", "P1", request_id="same")
    other = await get_reward(api, "c1", "P2", request_id="same")
    assert other.grant.promotion_code == "P2"
    assert one.grant.grant_id != other.grant.grant_id
    exc = await refused(get_reward(api, "c2", "P1", request_id="same"))
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(exc) == "REQUEST_ID_REUSED"


# --- codes.proto ------------------------------------------------------------------------------


async def test_inventory_lists_the_most_recent_upload_first(api: Api) -> None:
    """codes.proto:511 (the most recent uploads first), :479-480 (same id and bytes: the first
    answer, nothing added)."""
    await code_promotion(api, "FLASH")
    first = await upload(api, "FLASH", codes_file("A", 3), "u1")
    second = await upload(api, "FLASH", codes_file("B", 2), "u2")
    again = await upload(api, "FLASH", codes_file("A", 3), "u1")
    assert again == first
    inventory = await codepb_grpc.CodePoolServiceStub(api.channel).GetCodeInventory(
        codepb.GetCodeInventoryRequest(promotion_code="FLASH"), metadata=api.key())
    assert [u.upload_id for u in inventory.uploads] == [second.upload_id, first.upload_id]
    assert inventory.inventory.total == 5


# --- campaigns.proto --------------------------------------------------------------------------


async def test_add_targets_ignores_duplicates(api: Api) -> None:
    """campaigns.proto:99-101 (added: customers new to the group, duplicates ignored)."""
    await reward_type(api)
    await promotion(api)
    await create_campaign(api, "camp", NOW + timedelta(days=2), customers=["a", "b"])
    added = await campaigns(api).AddCampaignTargets(campb.AddCampaignTargetsRequest(
        request_id=rid(), campaign_id="camp", customer_ids=["b", "c", "c", "d"]),
        metadata=api.key())
    assert (added.added, added.target_count) == (2, 4)


async def test_execution_at_most_3660_days_ahead(api: Api) -> None:
    """campaigns.proto:53-54 (in the future, EXECUTION_IN_PAST; at most 3,660 days ahead,
    EXECUTION_TOO_FAR)."""
    await reward_type(api)
    await promotion(api)
    ok = await create_campaign(api, "far", NOW + timedelta(days=3660), customers=["a"])
    assert ok.status == campb.CAMPAIGN_STATUS_SCHEDULED
    exc = await refused(create_campaign(api, "too-far", NOW + timedelta(days=3660, seconds=1),
                                        customers=["a"]))
    assert rpc_error_reason(exc) == "EXECUTION_TOO_FAR"
    exc = await refused(create_campaign(api, "past", NOW - timedelta(seconds=1),
                                        customers=["a"]))
    assert rpc_error_reason(exc) == "EXECUTION_IN_PAST"


async def test_statuses_unset_until_sent_duplicates_applied_once_unknown_reported(
        api: Api) -> None:
    """campaigns.proto:187-188 (approved unset if none yet), :206-208 (same status twice applied
    once), :220-223 (updated; unknown_customer_ids)."""
    await reward_type(api)
    await promotion(api)
    await create_campaign(api, "camp", NOW + timedelta(days=2), customers=["a", "b", "c"])
    response = await clearance(api).UpdateCustomerPromotionStatus(
        campb.UpdateCustomerPromotionStatusRequest(
            campaign_id="camp", request_id="s1", statuses=[
                campb.CustomerPromotionStatus(customer_id="a", approved=True),
                campb.CustomerPromotionStatus(customer_id="a", approved=True),
                campb.CustomerPromotionStatus(customer_id="zz", approved=False)]),
        metadata=api.key("listener"))
    assert response.updated == 1
    assert list(response.unknown_customer_ids) == ["zz"]
    page = await clearance(api).GetProcessedCampaignCustomers(
        campb.GetProcessedCampaignCustomersRequest(campaign_id="camp"),
        metadata=api.key("listener"))
    shown = {c.customer_id: (c.approved if c.HasField("approved") else None)
             for c in page.customers}
    assert shown == {"a": True, "b": None, "c": None}
    assert page.clearance_required_by.ToDatetime(UTC) == NOW + timedelta(days=2)
    exc = await refused(clearance(api).UpdateCustomerPromotionStatus(
        campb.UpdateCustomerPromotionStatusRequest(
            campaign_id="camp", request_id="s3", statuses=[
                campb.CustomerPromotionStatus(customer_id="b", approved=True),
                campb.CustomerPromotionStatus(customer_id="b", approved=False)]),
        metadata=api.key("listener")))
    assert rpc_error_reason(exc) == "CONFLICTING_STATUSES"


async def test_forecast_of_approved_so_far_and_negative_remaining(api: Api) -> None:
    """campaigns.proto:229-230 (empty customer_ids: the customers approved so far), :245-248
    (remaining_after negative and fits false when the approvals do not fit), :256-260
    (projected_value for SINGLE; not_estimated for the others)."""
    await reward_type(api)
    await reward_type(api, "spins", category=2)
    await promotion(api, rewards=[single(value="15"), ppb.PromotionReward(
        reward_type="spins", kind=ppb.REWARD_KIND_EXTERNAL)],
        caps=[cap(ppb.CAP_PERIOD_LIFETIME, "40")])
    await create_campaign(api, "camp", NOW + timedelta(days=2), customers=["a", "b", "c"])
    await set_statuses(api, "camp", {"a": True, "b": True, "c": False}, "s1")
    forecast = await clearance(api).ForecastCampaign(
        campb.ForecastCampaignRequest(campaign_id="camp"), metadata=api.key("listener"))
    promo = forecast.promotions[0]
    assert promo.customers == 2
    assert dict(promo.projected_value) == {"cashback": "30"}
    assert list(promo.not_estimated) == ["spins"]
    assert promo.fits is True
    three = await clearance(api).ForecastCampaign(
        campb.ForecastCampaignRequest(campaign_id="camp", customer_ids=["a", "b", "c"]),
        metadata=api.key("listener"))
    lifetime = next(c for c in three.promotions[0].caps if c.scope == "cashback")
    assert (lifetime.projected, lifetime.remaining_after, lifetime.fits) == ("45", "-5", False)
    assert three.fits is False


async def test_forecast_counts_customers_without_a_live_campaign_grant(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """campaigns.proto:254 (customers forecast: approved and without a grant for this campaign
    yet; a revoked grant is replaced by the next GetReward, so its customer counts again)."""
    await reward_type(api)
    await promotion(api)
    await executed_campaign(api, pool, settings, clock, ["a", "b", "c"])

    async def forecast() -> int:
        return (await clearance(api).ForecastCampaign(
            campb.ForecastCampaignRequest(campaign_id="camp"),
            metadata=api.key("listener"))).promotions[0].customers

    granted = await get_reward(api, "a", campaign_id="camp")
    assert await forecast() == 2
    await revoke(api, granted.grant.grant_id)
    assert await forecast() == 3


async def test_one_live_grant_and_a_new_one_after_a_revoke(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """rewards.proto GetReward (one live grant per customer, promotion and campaign: a second
    call returns the same grant; after RevokeGrant the next call makes a new grant)."""
    await reward_type(api)
    await promotion(api)
    await executed_campaign(api, pool, settings, clock, ["a"])
    granted = await get_reward(api, "a", campaign_id="camp")
    second = await get_reward(api, "a", campaign_id="camp")
    assert second.existing is True and second.grant.grant_id == granted.grant.grant_id
    await revoke(api, granted.grant.grant_id)
    again = await get_reward(api, "a", campaign_id="camp")
    assert again.existing is False
    assert again.grant.grant_id != granted.grant.grant_id


async def test_campaign_reconciliation_amounts_sorted_and_zero_when_none_live(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """campaigns.proto:152-159 (net_amount only with one reward type; amounts sorted by reward
    type, "0" when none is live)."""
    await reward_type(api, "zeta")
    await reward_type(api, "alpha")
    await promotion(api, "TWO", rewards=[single("zeta", "5"), single("alpha", "7")])
    await promotion(api, "ONE", rewards=[single("alpha", "3")])
    await executed_campaign(api, pool, settings, clock, ["a", "b"], codes=["TWO", "ONE"])
    await get_reward(api, "a", "TWO", campaign_id="camp")
    one = await get_reward(api, "a", "ONE", campaign_id="camp")
    assert one.HasField("grant"), one
    await revoke(api, one.grant.grant_id)
    rows = {r.promotion_code: r for r in (await campaigns(api).GetCampaignReconciliation(
        campb.GetCampaignReconciliationRequest(campaign_id="camp"),
        metadata=api.key())).promotions}
    two = rows["TWO"]
    assert [(a.reward_type, a.amount) for a in two.amounts] == [("alpha", "7"), ("zeta", "5")]
    assert two.net_amount == ""
    single_type = rows["ONE"]
    assert [(a.reward_type, a.amount) for a in single_type.amounts] == [("alpha", "0")]
    assert single_type.net_amount == "0"
    assert (single_type.approved, single_type.granted, single_type.revoked) == (2, 1, 1)


async def test_statuses_for_a_plain_campaign_are_refused(api: Api) -> None:
    """campaigns.proto:31-32 (without conditional execution: FAILED_PRECONDITION
    CAMPAIGN_NOT_CONDITIONAL)."""
    await reward_type(api)
    await promotion(api)
    await create_campaign(api, "camp", NOW + timedelta(days=2), customers=["a"],
                          conditional=False)
    exc = await refused(set_statuses(api, "camp", {"a": True}, "s1"))
    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_error_reason(exc) == "CAMPAIGN_NOT_CONDITIONAL"


async def test_campaign_of_a_draft_promotion_is_refused(api: Api) -> None:
    """campaigns.proto:10-11 (a draft promotion is FAILED_PRECONDITION PROMOTION_NOT_ACTIVE)."""
    await reward_type(api)
    await promotion(api, activate=False)
    exc = await refused(create_campaign(api, "camp", NOW + timedelta(days=2), customers=["a"]))
    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_error_reason(exc) == "PROMOTION_NOT_ACTIVE"


# --- customers.proto --------------------------------------------------------------------------


async def test_upsert_replaces_the_row_and_counts(api: Api) -> None:
    """customers.proto:335-336 (an omitted time_zone, currency or property is cleared),
    :346-349 (created_count and updated_count)."""
    stub = customers_stub(api)
    first = await stub.UpsertCustomers(custpb.UpsertCustomersRequest(
        request_id=rid(), customers=[custpb.Customer(
            customer_id="c1", time_zone="Europe/Malta", currency="EUR",
            properties={"tier": custpb.PropertyValue(string_value="Gold")})]),
        metadata=api.key("runtime"))
    assert (first.created_count, first.updated_count) == (1, 0)
    second = await stub.UpsertCustomers(custpb.UpsertCustomersRequest(
        request_id=rid(), customers=[custpb.Customer(customer_id="c1"),
                                     custpb.Customer(customer_id="c2")]),
        metadata=api.key("runtime"))
    assert (second.created_count, second.updated_count) == (1, 1)
    shown = (await stub.GetCustomer(custpb.GetCustomerRequest(customer_id="c1"),
                                    metadata=api.key())).customer
    assert (shown.time_zone, shown.currency, dict(shown.properties)) == ("", "", {})


async def test_event_ids_follow_external_id_order_within_a_batch(api: Api) -> None:
    """customers.proto:401-402 (event_id increasing in recording order; within one batch in
    external_id order), :299 (newest first)."""
    stub = customers_stub(api)
    when = NOW - timedelta(hours=1)
    await stub.RecordEvents(custpb.RecordEventsRequest(
        request_id=rid(), create_missing_customers=True, events=[
            custpb.Event(external_id=x, customer_id="c1", kind="deposit", amount="1",
                         currency="EUR", occurred_at=ts(when))
            for x in ["e-c", "e-a", "e-b"]]), metadata=api.key("runtime"))
    listed = (await stub.ListCustomerEvents(custpb.ListCustomerEventsRequest(
        customer_id="c1"), metadata=api.key())).events
    by_id = sorted(listed, key=lambda e: e.event_id)
    assert [e.external_id for e in by_id] == ["e-a", "e-b", "e-c"]
    assert [e.external_id for e in listed] == ["e-c", "e-b", "e-a"]


async def test_occurred_at_at_most_five_minutes_ahead(api: Api) -> None:
    """customers.proto:392 (occurred_at at most 5 minutes after the server's clock)."""
    stub = customers_stub(api)

    def batch(offset: timedelta, external_id: str) -> custpb.RecordEventsRequest:
        return custpb.RecordEventsRequest(
            request_id=rid(), create_missing_customers=True, events=[custpb.Event(
                external_id=external_id, customer_id="c1", kind="bet", amount="1",
                currency="EUR", occurred_at=ts(NOW + offset))])

    ok = await stub.RecordEvents(batch(timedelta(minutes=5), "ok"), metadata=api.key("runtime"))
    assert ok.inserted_count == 1
    exc = await refused(stub.RecordEvents(batch(timedelta(minutes=5, seconds=1), "late"),
                                          metadata=api.key("runtime")))
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_event_kind_attribute_names_and_negative_amounts(api: Api) -> None:
    """customers.proto:384-385 (custom kind [a-z][a-z0-9_]{0,39}), :387-388 (negative only for
    custom kinds), :394-396 (attribute names: not "amount" or "currency")."""
    stub = customers_stub(api)

    async def record(kind: str, amount: str = "1",
                     attributes: dict[str, str] | None = None) -> object:
        return await stub.RecordEvents(custpb.RecordEventsRequest(
            request_id=rid(), create_missing_customers=True, events=[custpb.Event(
                external_id=rid(), customer_id="c1", kind=kind, amount=amount, currency="EUR",
                occurred_at=ts(NOW), attributes=attributes or {})]),
            metadata=api.key("runtime"))

    await record("a" + "b" * 39)
    await record("chargeback", "-5")
    for bad in [dict(kind="a" + "b" * 40), dict(kind="Chargeback"), dict(kind="9lives"),
                dict(kind="bet", amount="-1"),
                dict(kind="bet", attributes={"amount": "3"}),
                dict(kind="bet", attributes={"currency": "USD"})]:
        exc = await refused(record(**bad))  # type: ignore[arg-type]
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, bad


async def test_property_decimal_and_count_limits(api: Api) -> None:
    """customers.proto:310 (decimal at most 14 integer and 6 decimal digits), :326 (at most 100
    properties)."""
    stub = customers_stub(api)

    async def put(properties: dict[str, custpb.PropertyValue]) -> object:
        return await stub.UpsertCustomers(custpb.UpsertCustomersRequest(
            request_id=rid(), customers=[custpb.Customer(customer_id="c1",
                                                         properties=properties)]),
            metadata=api.key("runtime"))

    await put({"x": custpb.PropertyValue(decimal_value="-" + "9" * 14 + "." + "9" * 6)})
    await put({f"p{i}": custpb.PropertyValue(bool_value=True) for i in range(100)})
    for bad in [{"x": custpb.PropertyValue(decimal_value="9" * 15)},
                {"x": custpb.PropertyValue(decimal_value="1." + "1" * 7)},
                {f"p{i}": custpb.PropertyValue(bool_value=True) for i in range(101)},
                {" lead": custpb.PropertyValue(bool_value=True)},
                {"x" * 65: custpb.PropertyValue(bool_value=True)}]:
        exc = await refused(put(bad))
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- reward_types.proto -----------------------------------------------------------------------


async def test_reward_type_bounds_and_ignored_times(api: Api) -> None:
    """reward_types.proto:494-497 (empty means no bound; max not below min), :508
    (create_time and update_time ignored on create), :484 (name characters)."""
    stub = rtpb_grpc.RewardTypeServiceStub(api.channel)
    stamp = ts(datetime(2001, 1, 1, tzinfo=UTC))
    created = (await stub.CreateRewardType(rtpb.CreateRewardTypeRequest(
        request_id=rid(), reward_type=rtpb.RewardType(
            name="a.b-c_1", display_name="A", category=rtpb.REWARD_CATEGORY_AMOUNT,
            create_time=stamp, update_time=stamp)), metadata=api.key())).reward_type
    assert created.create_time.ToDatetime(UTC).year > 2001
    assert (created.min_value, created.max_value) == ("", "")
    for bad in [dict(name="bad", min_value="5", max_value="4"), dict(name="with space"),
                dict(name="x" * 101)]:
        exc = await refused(stub.CreateRewardType(rtpb.CreateRewardTypeRequest(
            request_id=rid(), reward_type=rtpb.RewardType(
                display_name="A", category=rtpb.REWARD_CATEGORY_AMOUNT, **bad)),  # type: ignore[arg-type]
            metadata=api.key()))
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, bad


# --- listeners.proto --------------------------------------------------------------------------


async def test_listener_defaults_and_generated_secret(api: Api) -> None:
    """listeners.proto:535-537 (active unset means true), :546 (secret_rotate_time unset if
    never), :551-553 (channel always set in responses), :571-574 (generated secret: 43 URL-safe
    characters; empty when the caller gave one), :618-620 (rotation with an empty secret)."""
    import re

    stub = listeners(api)
    generated = await stub.RegisterListener(lpb.RegisterListenerRequest(
        request_id=rid(), listener=lpb.Listener(
            event_type=lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN, url="http://127.0.0.1:9/hook")),
        metadata=api.key())
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", generated.generated_secret)
    shown = generated.listener
    assert shown.active is True
    assert shown.channel == lpb.LISTENER_CHANNEL_WEBHOOK
    assert not shown.HasField("secret_rotate_time")
    assert shown.secret == ""
    given = await stub.RegisterListener(lpb.RegisterListenerRequest(
        request_id=rid(), listener=lpb.Listener(
            event_type=lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN, url="http://127.0.0.1:9/hook",
            secret="s" * 16)), metadata=api.key())
    assert given.generated_secret == ""
    rotated = await stub.UpdateListener(lpb.UpdateListenerRequest(
        request_id=rid(), listener=lpb.Listener(listener_id=shown.listener_id),
        update_mask=field_mask_pb2.FieldMask(paths=["secret"])), metadata=api.key())
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", rotated.generated_secret)
    assert rotated.listener.HasField("secret_rotate_time")
    got = (await stub.GetListener(lpb.GetListenerRequest(listener_id=shown.listener_id),
                                  metadata=api.key())).listener
    assert got.secret == ""
    assert got.channel == lpb.LISTENER_CHANNEL_WEBHOOK


async def test_email_listener_without_smtp_is_failed_precondition(api: Api) -> None:
    """listeners.proto:505-507 (EMAIL without the server's SMTP settings: FAILED_PRECONDITION)."""
    exc = await refused(listeners(api).RegisterListener(lpb.RegisterListenerRequest(
        request_id=rid(), listener=lpb.Listener(
            event_type=lpb.EVENT_TYPE_BONUS_ISSUED, channel=lpb.LISTENER_CHANNEL_EMAIL,
            email_recipients=["ops@example.com"])), metadata=api.key()))
    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION


# --- products.proto ---------------------------------------------------------------------------


async def personalized(api: Api, backend_id: str, *, max_distinct: int = 0,
                       lock: bool = False) -> None:
    await products(api).CreatePersonalizedPromotion(prodpb.CreatePersonalizedPromotionRequest(
        request_id=rid(), personalized_promotion=prodpb.PersonalizedPromotion(
            backend_id=backend_id, name=backend_id, max_distinct_products=max_distinct,
            lock_after_first_apply=lock)), metadata=api.key())


async def assign(api: Api, promotion_id: str, customer_ids: list[str], product_ids: list[str],
                 default: str = "") -> prodpb.AssignProductListsResponse:
    return await products(api).AssignProductLists(prodpb.AssignProductListsRequest(
        request_id=rid(), personalized_promotion_id=promotion_id, customer_ids=customer_ids,
        product_ids=product_ids, default_product_id=default), metadata=api.key())


async def select(api: Api, customer: str, promotion_id: str,
                 product_ids: list[str]) -> prodpb.CustomerProductPromotion:
    return (await products(api).SelectProducts(prodpb.SelectProductsRequest(
        request_id=rid(), customer_id=customer, personalized_promotion_id=promotion_id,
        product_ids=product_ids), metadata=api.key("runtime"))).promotion


async def test_default_product_max_zero_and_replacement_keeps_the_choice(api: Api) -> None:
    """products.proto:71 (max_distinct_products 0 means all of the list), :160-162 (empty
    default means the first product), :169-170 (a replaced list keeps the products still on it;
    none left: back to the default), :355-356 (empty clears the choice)."""
    await upsert(api, "c1")
    await personalized(api, "coffee")
    await assign(api, "coffee", ["c1"], ["latte", "mocha", "flat"])
    chosen = await select(api, "c1", "coffee", ["latte", "mocha", "flat"])
    assert chosen.default_product_id == "latte"
    assert list(chosen.selected_product_ids) == ["latte", "mocha", "flat"]
    replaced = await assign(api, "coffee", ["c1"], ["tea", "mocha"])
    assert (replaced.created_count, replaced.replaced_count) == (0, 1)
    view = (await products(api).GetCustomerProductPromotions(
        prodpb.GetCustomerProductPromotionsRequest(customer_id="c1"),
        metadata=api.key("runtime"))).promotions[0]
    assert list(view.chosen_product_ids) == ["mocha"]
    await assign(api, "coffee", ["c1"], ["water"])
    view = (await products(api).GetCustomerProductPromotions(
        prodpb.GetCustomerProductPromotionsRequest(customer_id="c1"),
        metadata=api.key("runtime"))).promotions[0]
    assert list(view.chosen_product_ids) == []
    assert list(view.selected_product_ids) == ["water"]
    cleared = await select(api, "c1", "coffee", [])
    assert list(cleared.selected_product_ids) == ["water"]


async def test_remove_ignores_customers_without_a_list_and_delete_counts(api: Api) -> None:
    """products.proto:180 (ones without a list are ignored), :146-147 (deleted_product_lists)."""
    await upsert(api, "c1", "c2", "c3")
    await personalized(api, "coffee")
    await assign(api, "coffee", ["c1", "c2"], ["latte"])
    removed = await products(api).RemoveProductLists(prodpb.RemoveProductListsRequest(
        request_id=rid(), personalized_promotion_id="coffee", customer_ids=["c1", "c3"]),
        metadata=api.key())
    assert removed.removed_count == 1
    deleted = await products(api).DeletePersonalizedPromotion(
        prodpb.DeletePersonalizedPromotionRequest(request_id=rid(), backend_id="coffee"),
        metadata=api.key())
    assert deleted.deleted_product_lists == 1


def deal(discount_id: str, discount_type: int, value: str, products_: list[str],
         quantity: int = 1, min_total: str = "") -> prodpb.ProductSetDiscount:
    return prodpb.ProductSetDiscount(
        discount_id=discount_id, name=discount_id, discount_type=discount_type, value=value,
        min_basket_total=min_total, product_sets=[prodpb.ProductSet(
            name="set", product_ids=products_, required_quantity=1, gets_discount=True,
            discounted_quantity=quantity)])


async def create_deal(api: Api, message: prodpb.ProductSetDiscount) -> object:
    return await products(api).CreateProductSetDiscount(
        prodpb.CreateProductSetDiscountRequest(request_id=rid(), product_set_discount=message),
        metadata=api.key())


async def test_discount_types_and_outcomes(api: Api) -> None:
    """products.proto:209-215 (percentage more than 0 and at most 100; amount off at most the
    unit's price; fixed price: no discount on a cheaper unit), :248-249 (min_basket_total),
    :391-392 ("0.00" when not applied), :402 (outcomes ordered by discount_id)."""
    await upsert(api, "c1")
    await create_deal(api, deal("z-amount", prodpb.DISCOUNT_TYPE_AMOUNT_OFF, "5.00", ["cheap"]))
    await create_deal(api, deal("m-fixed", prodpb.DISCOUNT_TYPE_FIXED_PRICE, "4.00",
                                ["cheap2", "dear"], quantity=2))
    await create_deal(api, deal("a-min", prodpb.DISCOUNT_TYPE_PERCENTAGE_OFF, "100", ["cheap"],
                                min_total="1000"))
    for bad in ["0", "100.01"]:
        exc = await refused(create_deal(api, deal(
            f"bad{bad}", prodpb.DISCOUNT_TYPE_PERCENTAGE_OFF, bad, ["x"])))
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    evaluation = (await products(api).EvaluateBasket(prodpb.EvaluateBasketRequest(
        customer_id="c1", lines=[
            prodpb.BasketLine(product_id="cheap", quantity=1, unit_price="3.00"),
            prodpb.BasketLine(product_id="cheap2", quantity=1, unit_price="2.00"),
            prodpb.BasketLine(product_id="dear", quantity=1, unit_price="10.00")]),
        metadata=api.key("runtime"))).evaluation
    outcomes = {o.discount_id: o for o in evaluation.outcomes}
    assert [o.discount_id for o in evaluation.outcomes] == ["a-min", "m-fixed", "z-amount"]
    assert (outcomes["a-min"].applied, outcomes["a-min"].amount) == (False, "0.00")
    assert outcomes["z-amount"].amount == "3.00"
    assert outcomes["m-fixed"].amount == "6.00"
    assert (evaluation.basket_total, evaluation.discount_total,
            evaluation.total_after_discounts) == ("15.00", "9.00", "6.00")


async def test_prices_have_at_most_two_decimals(api: Api) -> None:
    """products.proto:14 and :371 (unit_price: at most 2 decimal places, not negative)."""
    await upsert(api, "c1")
    for price in ["1.001", "-1.00"]:
        exc = await refused(products(api).EvaluateBasket(prodpb.EvaluateBasketRequest(
            customer_id="c1", lines=[prodpb.BasketLine(product_id="p", quantity=1,
                                                       unit_price=price)]),
            metadata=api.key("runtime")))
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- bonuses.proto ----------------------------------------------------------------------------


def definition(definition_id: str, **kw: object) -> bpb.BonusDefinition:
    fields: dict[str, object] = dict(
        definition_id=definition_id, display_name=definition_id,
        formula="last(deposit.amount) * 10%", result_type=bpb.BONUS_RESULT_TYPE_AMOUNT,
        data_mode=bpb.BONUS_DATA_MODE_TRANSACTIONS_AND_PROPERTIES,
        period=fpb.TransactionPeriod(time_back=fpb.TransactionPeriod.TimeBack(
            amount=1, unit=fpb.TIME_UNIT_DAYS)),
        approval_mode=bpb.APPROVAL_MODE_MANUAL, rounding=ppb.ROUNDING_MODE_ROUND, decimals=2)
    fields.update(kw)
    return bpb.BonusDefinition(**fields)  # type: ignore[arg-type]


async def create_definition(api: Api, message: bpb.BonusDefinition) -> bpb.BonusDefinition:
    return (await bonuses(api).CreateBonusDefinition(bpb.CreateBonusDefinitionRequest(
        request_id=rid(), definition=message), metadata=api.key())).definition


async def test_default_batch_window_and_distinct_customers(api: Api, settings: object) -> None:
    """bonuses.proto:106 (batch_window_seconds 0: the deployment's window), :162 (1 to 10,000
    distinct customers), :174-177 (window_start and due_time)."""
    await upsert(api, "c1", "c2")
    await create_definition(api, definition("tenpct"))
    response = await bonuses(api).RequestBonusCalculation(bpb.RequestBonusCalculationRequest(
        request_id=rid(), definition_id="tenpct", customer_ids=["c1", "c2"]),
        metadata=api.key("runtime"))
    window = settings.bonus_batch_window_seconds  # type: ignore[attr-defined]
    start = response.window_start.ToDatetime(UTC)
    assert start <= NOW < start + timedelta(seconds=window)
    assert response.due_time.ToDatetime(UTC) - start == timedelta(seconds=window)
    assert response.accepted_count == 2
    exc = await refused(bonuses(api).RequestBonusCalculation(bpb.RequestBonusCalculationRequest(
        request_id=rid(), definition_id="tenpct", customer_ids=["c1", "c1"]),
        metadata=api.key("runtime")))
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_period_required_for_transactions_and_absent_for_properties(api: Api) -> None:
    """bonuses.proto:103 (period required for TRANSACTIONS_AND_PROPERTIES, absent for
    PROPERTIES_ONLY), :99-100 (decimals 0-6, more is INVALID_ROUNDING)."""
    no_period = definition("np")
    no_period.ClearField("period")
    exc = await refused(create_definition(api, no_period))
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    props = definition("props", formula='customer["x"] * 2',
                       data_mode=bpb.BONUS_DATA_MODE_PROPERTIES_ONLY)
    exc = await refused(create_definition(api, props))
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    exc = await refused(create_definition(api, definition("seven", decimals=7)))
    assert rpc_error_reason(exc) == "INVALID_ROUNDING"


async def test_revision_bumps_only_for_changes_that_alter_calculations(api: Api) -> None:
    """bonuses.proto:112-113 (revision: bumped when a change alters calculations)."""
    created = await create_definition(api, definition("rev"))

    async def update(message: bpb.BonusDefinition, *paths: str) -> bpb.BonusDefinition:
        return (await bonuses(api).UpdateBonusDefinition(bpb.UpdateBonusDefinitionRequest(
            request_id=rid(), definition=message,
            update_mask=field_mask_pb2.FieldMask(paths=list(paths))),
            metadata=api.key())).definition

    renamed = await update(bpb.BonusDefinition(definition_id="rev", display_name="New"),
                           "display_name")
    assert renamed.revision == created.revision
    reformulated = await update(bpb.BonusDefinition(
        definition_id="rev", formula="last(deposit.amount) * 20%"), "formula")
    assert reformulated.revision > created.revision


async def test_new_rules_and_schedules_are_active_and_weekday_zero_is_every_day(
        api: Api) -> None:
    """bonuses.proto:373-374 and :422-423 (active is output only on create: a new rule or
    schedule is active), :414-416 (weekday 0: every day, local_time in time_zone)."""
    await upsert(api, "c1")
    await create_definition(api, definition("d1"))
    rule = (await bonuses(api).CreateBonusRule(bpb.CreateBonusRuleRequest(
        request_id=rid(), rule=bpb.BonusRule(
            rule_id="r1", definition_id="d1", event_kind="bet", every=10, active=False)),
        metadata=api.key())).rule
    assert rule.active is True
    schedule = (await bonuses(api).CreateBonusSchedule(bpb.CreateBonusScheduleRequest(
        request_id=rid(), schedule=bpb.BonusSchedule(
            schedule_id="s1", definition_id="d1", customer_ids=["c1"], weekday=0,
            local_time="09:30", time_zone="Europe/Berlin", active=False)),
        metadata=api.key())).schedule
    assert schedule.active is True
    # 10:00 UTC is 11:00 in Berlin: 09:30 today has passed, so the next run is tomorrow.
    assert schedule.next_run_time.ToDatetime(UTC) == datetime(2026, 11, 23, 8, 30, tzinfo=UTC)
    assert not schedule.HasField("last_run_time")


async def test_schedule_for_a_cancelled_campaign_is_refused(api: Api) -> None:
    """bonuses.proto:424-426 (a CANCELLED campaign is FAILED_PRECONDITION CAMPAIGN_CANCELLED)."""
    await reward_type(api)
    await promotion(api)
    await create_definition(api, definition("d1"))
    await create_campaign(api, "camp", NOW + timedelta(days=2), customers=["a"])
    await campaigns(api).CancelCampaign(campb.CancelCampaignRequest(
        request_id=rid(), campaign_id="camp"), metadata=api.key())
    exc = await refused(bonuses(api).CreateBonusSchedule(bpb.CreateBonusScheduleRequest(
        request_id=rid(), schedule=bpb.BonusSchedule(
            schedule_id="s1", definition_id="d1", campaign_id="camp", weekday=1,
            local_time="09:00", time_zone="UTC")), metadata=api.key()))
    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_error_reason(exc) == "CAMPAIGN_CANCELLED"


# --- formulas.proto ---------------------------------------------------------------------------


async def test_dry_run_empty_aggregates_and_utc_window(api: Api, clock: FixedClock) -> None:
    """formulas.proto:601 (aggregate value empty when no event matched, avg/min/max/first/last),
    :626-629 (window in UTC), :530 (time back: the last N hours up to now)."""
    await upsert(api, "c1")
    response = await fpb_grpc.FormulaServiceStub(api.channel).DryRunFormula(
        fpb.DryRunFormulaRequest(
            source="max(deposit.amount) + sum(bet.amount)", customer_id="c1",
            period=fpb.TransactionPeriod(time_back=fpb.TransactionPeriod.TimeBack(
                amount=6, unit=fpb.TIME_UNIT_HOURS))), metadata=api.key())
    values = {a.description: (a.value, a.count) for a in response.aggregates}
    assert values["max(deposit.amount)"] == ("", 0)
    assert response.window_end.ToDatetime(UTC) == clock.now()
    assert response.window_start.ToDatetime(UTC) == clock.now() - timedelta(hours=6)


async def test_dry_run_needs_a_period_only_when_reading_transactions(api: Api) -> None:
    """formulas.proto:577 (period required unless the formula reads no transactions)."""
    await upsert(api, "c1")
    stub = fpb_grpc.FormulaServiceStub(api.channel)
    ok = await stub.DryRunFormula(fpb.DryRunFormulaRequest(source="5", customer_id="c1"),
                                  metadata=api.key())
    assert ok.outcome == fpb.DRY_RUN_OUTCOME_AMOUNT
    exc = await refused(stub.DryRunFormula(fpb.DryRunFormulaRequest(
        source="sum(bet.amount)", customer_id="c1"), metadata=api.key()))
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(("kind", "zone", "start", "end"), [
    (fpb.RELATIVE_KIND_LAST_FULL_DAY, "UTC", datetime(2026, 11, 21), datetime(2026, 11, 22)),
    (fpb.RELATIVE_KIND_LAST_FULL_WEEK, "UTC", datetime(2026, 11, 9), datetime(2026, 11, 16)),
    (fpb.RELATIVE_KIND_LAST_FULL_MONTH, "UTC", datetime(2026, 10, 1), datetime(2026, 11, 1)),
    # Sunday 10:00: this weekend is not completed yet, so the last completed one is the 14th.
    (fpb.RELATIVE_KIND_LAST_WEEKEND, "UTC", datetime(2026, 11, 14), datetime(2026, 11, 16)),
    (fpb.RELATIVE_KIND_TODAY_SO_FAR, "UTC", datetime(2026, 11, 22), datetime(2026, 11, 22, 10)),
    (fpb.RELATIVE_KIND_LAST_FULL_DAY, "Europe/Berlin", datetime(2026, 11, 20, 23),
     datetime(2026, 11, 21, 23)),
])
async def test_relative_periods_and_their_utc_window(api: Api, kind: int, zone: str,
                                                      start: datetime, end: datetime) -> None:
    """formulas.proto:507-517 (calendar periods relative to now: LAST_FULL_WEEK Monday to
    Monday; LAST_WEEKEND the last completed Saturday 00:00 to Monday 00:00), :535-538 (in a
    fixed time zone), :626-629 (the window reported in UTC)."""
    await upsert(api, "c1")
    response = await fpb_grpc.FormulaServiceStub(api.channel).DryRunFormula(
        fpb.DryRunFormulaRequest(source="sum(deposit.amount) + 1", customer_id="c1",
                                 period=fpb.TransactionPeriod(relative=fpb.TransactionPeriod.
                                                              Relative(kind=kind,
                                                                       time_zone=zone))),
        metadata=api.key())
    assert response.window_start.ToDatetime(UTC) == start.replace(tzinfo=UTC)
    assert response.window_end.ToDatetime(UTC) == end.replace(tzinfo=UTC)


async def test_cap_is_reached_when_the_next_grant_does_not_fit(api: Api) -> None:
    """promotions.proto:174-175 (reached: true when no further grant fits), :65-66
    (CAPPED_FOR_PERIOD for a daily cap)."""
    await reward_type(api)
    await promotion(api, caps=[cap(ppb.CAP_PERIOD_DAILY, "20")])
    await get_reward(api, "c1")
    shown = await get_promotion(api)
    assert [(u.used, u.reached) for u in shown.cap_usage] == [("15", True)]
    assert shown.availability == ppb.AVAILABILITY_CAPPED_FOR_PERIOD
    denied = await get_reward(api, "c2")
    assert denied.denial_reason == 3  # BUDGET_CAP_REACHED
    assert (denied.denied_scope, denied.denied_period) == ("cashback", ppb.CAP_PERIOD_DAILY)


async def test_product_set_rules(api: Api) -> None:
    """products.proto:229 (at least one set gets the discount), :231-232 (discounted_quantity
    0 when the set does not get the discount), :246 (1-10 sets)."""
    def sets(*items: prodpb.ProductSet) -> prodpb.ProductSetDiscount:
        return prodpb.ProductSetDiscount(
            discount_id="d", name="d", discount_type=prodpb.DISCOUNT_TYPE_AMOUNT_OFF,
            value="1.00", product_sets=list(items))

    plain = prodpb.ProductSet(name="p", product_ids=["x"], required_quantity=1)
    gets = prodpb.ProductSet(name="g", product_ids=["y"], required_quantity=1,
                             gets_discount=True, discounted_quantity=1)
    counted = prodpb.ProductSet(name="q", product_ids=["z"], required_quantity=1,
                                discounted_quantity=2)
    for bad in [sets(plain), sets(gets, counted), sets(*([gets] * 11))]:
        exc = await refused(create_deal(api, bad))
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    await create_deal(api, sets(plain, gets))


async def test_batch_ids_at_most_once_and_event_kinds_filter(api: Api) -> None:
    """customers.proto:340 (each customer_id at most once), :435 (kinds: empty means every
    kind)."""
    stub = customers_stub(api)
    exc = await refused(stub.UpsertCustomers(custpb.UpsertCustomersRequest(
        request_id=rid(), customers=[custpb.Customer(customer_id="c1"),
                                     custpb.Customer(customer_id="c1")]),
        metadata=api.key("runtime")))
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    await stub.RecordEvents(custpb.RecordEventsRequest(
        request_id=rid(), create_missing_customers=True, events=[
            custpb.Event(external_id=f"e{i}", customer_id="c1", kind=kind, amount="1",
                         currency="EUR", occurred_at=ts(NOW - timedelta(minutes=i)))
            for i, kind in enumerate(["bet", "win", "deposit"])]), metadata=api.key("runtime"))

    async def kinds(*chosen: str) -> list[str]:
        return [e.kind for e in (await stub.ListCustomerEvents(custpb.ListCustomerEventsRequest(
            customer_id="c1", kinds=list(chosen)), metadata=api.key())).events]

    assert await kinds() == ["bet", "win", "deposit"]
    assert await kinds("deposit", "bet") == ["bet", "deposit"]
