"""Campaign and clearance RPCs with a pinned clock (no worker): the approval rules."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import grpc
import pytest

from core.clock import FixedClock
from promo.v1 import campaigns_pb2 as cpb
from promo.v1 import campaigns_pb2_grpc as cpb_grpc
from promo.v1 import rewards_pb2 as rpb
from server.errors import error_info_of
from tests.conftest import Api, rpc_error_reason
from tests.e2e.campaign_helpers import all_customers, create_campaign, set_statuses, ts
from tests.e2e.promo_helpers import get_reward, promotion, reward_type


async def _setup(api: Api, clock: FixedClock, customers: int = 10,
                 conditional: bool = True) -> cpb.Campaign:
    await reward_type(api)
    await promotion(api)
    return await create_campaign(api, "spring", clock.now() + timedelta(hours=2),
                                 customers=[f"c{i:03d}" for i in range(customers)],
                                 conditional=conditional)


async def test_create_schedules_notification_and_execution(api: Api, clock: FixedClock,
                                                           pool: asyncpg.Pool) -> None:
    campaign = await _setup(api, clock)
    assert campaign.status == cpb.CAMPAIGN_STATUS_SCHEDULED
    assert campaign.target_count == 10
    assert list(campaign.promotion_codes) == ["VIP25"]
    jobs = await pool.fetch("SELECT kind, due_at FROM outbox_jobs ORDER BY due_at")
    execute_at = clock.now() + timedelta(hours=2)
    assert [(j["kind"], j["due_at"]) for j in jobs] == [
        ("campaign.notify", execute_at - timedelta(minutes=30)),
        ("campaign.execute", execute_at)]


async def test_paging_through_targets_and_adding_chunks(api: Api, clock: FixedClock) -> None:
    await _setup(api, clock, customers=25)
    stub = cpb_grpc.CampaignServiceStub(api.channel)
    added = await stub.AddCampaignTargets(cpb.AddCampaignTargetsRequest(
        request_id="more", campaign_id="spring", customer_ids=["c000", "x1", "x2"]),
        metadata=api.key())
    assert (added.added, added.target_count) == (2, 27)
    customers = await all_customers(api, "spring", page_size=4)
    assert [c.customer_id for c in customers] == sorted(
        [f"c{i:03d}" for i in range(25)] + ["x1", "x2"])
    assert all(list(c.promotion_codes) == ["VIP25"] and not c.HasField("approved")
               for c in customers)


async def test_statuses_latest_call_wins_unknown_reported_and_limit(
        api: Api, clock: FixedClock) -> None:
    await _setup(api, clock)
    first = await set_statuses(api, "spring", {"c001": True, "c002": True, "ghost": True}, "s1")
    assert (first.updated, list(first.unknown_customer_ids)) == (2, ["ghost"])
    again = await set_statuses(api, "spring", {"c001": True, "c002": True, "ghost": True}, "s1")
    assert again == first  # a retry with the same request id: the same answer
    await set_statuses(api, "spring", {"c002": False}, "s2")
    statuses = {c.customer_id: c.approved for c in await all_customers(api, "spring")
                if c.HasField("approved")}
    assert statuses == {"c001": True, "c002": False}
    too_many = {f"n{i}": True for i in range(10_001)}
    with pytest.raises(grpc.RpcError) as err:
        await set_statuses(api, "spring", too_many, "s3")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err.value) == "TOO_MANY_ENTRIES"
    exactly = await set_statuses(api, "spring", {f"n{i}": True for i in range(10_000)}, "s4")
    assert len(exactly.unknown_customer_ids) == 10_000


async def test_one_customer_approved_and_rejected_in_one_call_is_refused(
        api: Api, clock: FixedClock, pool: asyncpg.Pool) -> None:
    """A customer twice with the same status is a resend (applied once); approved here and
    rejected there in one call is refused naming both positions, and nothing of the call is
    applied (it used to be settled by whichever came last)."""
    await _setup(api, clock)
    stub = cpb_grpc.ClearanceServiceStub(api.channel)

    def call(request_id: str, *statuses: tuple[str, bool]) -> object:
        return stub.UpdateCustomerPromotionStatus(cpb.UpdateCustomerPromotionStatusRequest(
            campaign_id="spring", request_id=request_id, statuses=[
                cpb.CustomerPromotionStatus(customer_id=c, approved=a) for c, a in statuses]),
            metadata=api.key("listener"))

    resent = await call("dup", ("c001", True), ("c002", False), ("c001", True))
    assert (resent.updated, list(resent.unknown_customer_ids)) == (2, [])
    with pytest.raises(grpc.RpcError) as err:
        await call("conflict", ("c003", True), ("c004", True), ("c003", False))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == (
        "statuses[2] ('c003'): approved is false here and true at statuses[0]; send one "
        "status per customer")
    info = error_info_of(err.value)
    assert info is not None and (info.reason, dict(info.metadata)) == (
        "CONFLICTING_STATUSES", {"field": "statuses[2]", "customer_id": "c003"})
    statuses = {r["customer_id"]: r["approved"] for r in await pool.fetch(
        "SELECT customer_id, approved FROM campaign_targets WHERE approved IS NOT NULL")}
    assert statuses == {"c001": True, "c002": False}  # c004 was not applied either


async def test_approvals_close_at_clearance_required_by(api: Api, clock: FixedClock) -> None:
    await _setup(api, clock)
    clock.advance(timedelta(hours=2))
    with pytest.raises(grpc.RpcError) as err:
        await set_statuses(api, "spring", {"c001": True}, "late")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_error_reason(err.value) == "CLEARANCE_CLOSED"


async def test_get_reward_before_execution_is_not_eligible(api: Api, clock: FixedClock) -> None:
    await _setup(api, clock)
    await set_statuses(api, "spring", {"c001": True}, "s1")
    response = await get_reward(api, "c001", campaign_id="spring")
    assert response.denial_reason == rpb.DENIAL_REASON_NOT_ELIGIBLE
    assert "SCHEDULED" in response.denial_message
    free = await get_reward(api, "c001", campaign_id="not-a-campaign-of-ours")
    assert free.HasField("grant")  # an unknown campaign id is only a grouping key


async def test_cancel(api: Api, clock: FixedClock) -> None:
    await _setup(api, clock)
    stub = cpb_grpc.CampaignServiceStub(api.channel)
    cancelled = await stub.CancelCampaign(cpb.CancelCampaignRequest(
        request_id="x", campaign_id="spring"), metadata=api.key())
    assert cancelled.campaign.status == cpb.CAMPAIGN_STATUS_CANCELLED
    with pytest.raises(grpc.RpcError) as err:
        await stub.CancelCampaign(cpb.CancelCampaignRequest(request_id="y",
                                                            campaign_id="spring"),
                                  metadata=api.key())
    assert rpc_error_reason(err.value) == "CAMPAIGN_NOT_OPEN"
    with pytest.raises(grpc.RpcError) as err:
        await set_statuses(api, "spring", {"c001": True}, "s")
    assert rpc_error_reason(err.value) == "CLEARANCE_CLOSED"


@pytest.mark.parametrize(("campaign", "reason"), [
    (cpb.Campaign(campaign_id="bad id", name="x", promotion_codes=["VIP25"]),
     "INVALID_CAMPAIGN_ID"),
    (cpb.Campaign(campaign_id="c", name="", promotion_codes=["VIP25"]), "INVALID_NAME"),
    (cpb.Campaign(campaign_id="c", name="x"), "MISSING_PROMOTIONS"),
])
async def test_bad_campaigns(api: Api, clock: FixedClock, campaign: cpb.Campaign,
                             reason: str) -> None:
    await reward_type(api)
    await promotion(api)
    campaign.execute_at.CopyFrom(ts(clock.now() + timedelta(hours=1)))
    stub = cpb_grpc.CampaignServiceStub(api.channel)
    with pytest.raises(grpc.RpcError) as err:
        await stub.CreateCampaign(cpb.CreateCampaignRequest(request_id="r", campaign=campaign),
                                  metadata=api.key())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err.value) == reason


async def test_past_execution_and_unknown_promotion(api: Api, clock: FixedClock) -> None:
    await reward_type(api)
    await promotion(api)
    with pytest.raises(grpc.RpcError) as err:
        await create_campaign(api, "old", clock.now() - timedelta(minutes=1), customers=[])
    assert rpc_error_reason(err.value) == "EXECUTION_IN_PAST"
    with pytest.raises(grpc.RpcError) as err:
        await create_campaign(api, "c2", clock.now() + timedelta(hours=1), customers=[],
                              codes=["NOPE"])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:  # the listener role cannot schedule campaigns
        await cpb_grpc.CampaignServiceStub(api.channel).GetCampaign(
            cpb.GetCampaignRequest(campaign_id="c2"), metadata=api.key("listener"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_forecast_against_remaining_caps(api: Api, clock: FixedClock) -> None:
    from promo.v1 import promotions_pb2 as ppb
    from tests.e2e.promo_helpers import cap

    await reward_type(api)
    await promotion(api, customer_cap=8, caps=[cap(ppb.CAP_PERIOD_LIFETIME, "100"),
                                               cap(ppb.CAP_PERIOD_DAILY, "1000")])
    await get_reward(api, "c000")  # already a customer of the promotion (no campaign)
    await create_campaign(api, "spring", clock.now() + timedelta(hours=2),
                          customers=[f"c{i:03d}" for i in range(10)])
    await set_statuses(api, "spring", {f"c{i:03d}": i < 6 for i in range(10)}, "s1")
    stub = cpb_grpc.ClearanceServiceStub(api.channel)
    current = await stub.ForecastCampaign(cpb.ForecastCampaignRequest(campaign_id="spring"),
                                          metadata=api.key("listener"))
    [promo] = current.promotions
    assert (promo.customers, dict(promo.projected_value)) == (6, {"cashback": "90"})
    caps = {(c.scope, c.period): (c.used, c.projected, c.remaining_after, c.fits)
            for c in promo.caps}
    assert caps == {
        ("#customers", ppb.CAP_PERIOD_LIFETIME): ("1", "5", "2", True),
        ("cashback", ppb.CAP_PERIOD_LIFETIME): ("15", "90", "-5", False),
        ("cashback", ppb.CAP_PERIOD_DAILY): ("15", "90", "895", True),  # same day as now
    }
    assert not current.fits
    fewer = await stub.ForecastCampaign(cpb.ForecastCampaignRequest(
        campaign_id="spring", customer_ids=["c001", "c002"]), metadata=api.key("listener"))
    assert fewer.fits and fewer.promotions[0].customers == 2
