"""The conditional-execution handshake end to end, on the real clock with a short lead time:
a real worker sends the signed scheduled-campaign event (type 5) to a real HTTP listener on
loopback; the listener pages the target group over gRPC and approves half; at
ClearanceRequiredBy the campaign executes and only the approved half can obtain the reward."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest

from config.settings import Settings
from promo.v1 import campaigns_pb2 as cpb
from promo.v1 import campaigns_pb2_grpc as cpb_grpc
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import listeners_pb2_grpc as lpb_grpc
from promo.v1 import rewards_pb2 as rpb
from tests.conftest import Api, rpc_error_reason
from tests.e2e.campaign_helpers import all_customers, create_campaign, set_statuses
from tests.e2e.live_server import live_server
from tests.e2e.promo_helpers import get_reward, promotion, reward_type
from tests.webhook_listener import SECRET, WebhookListener

LEAD_SECONDS = 2.0


@pytest.fixture
async def live(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[Api]:
    """A server and a worker on the real clock, with a 2-second clearance lead."""
    fast = settings.model_copy(update={"clearance_lead_seconds": LEAD_SECONDS})
    async with live_server(fast, pool) as api:
        yield api


async def _register(api: Api, url: str, event_type: int) -> None:
    await lpb_grpc.ListenerServiceStub(api.channel).RegisterListener(lpb.RegisterListenerRequest(
        request_id=f"listener-{event_type}", listener=lpb.Listener(
            event_type=event_type, url=url, secret=SECRET)), metadata=api.key())  # type: ignore[arg-type]


async def _until(check: Callable[[], Awaitable[bool]], within: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def _events(listener: WebhookListener, event_type: int) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(r.body) for r in listener.received
            if r.verify_error is None and not r.duplicate
            and json.loads(r.body)["event_type"] == event_type]


async def test_handshake_only_approved_customers_get_the_reward(live: Api) -> None:
    listener = await WebhookListener().start()
    try:
        await _register(live, listener.url, 5)
        await _register(live, listener.url, 100)
        await reward_type(live)
        await promotion(live)
        customers = [f"cust-{i:02d}" for i in range(20)]
        execute_at = datetime.now(UTC) + timedelta(seconds=LEAD_SECONDS + 2)
        await create_campaign(live, "weekend", execute_at, customers=customers)

        async def notified() -> bool:
            return bool(_events(listener, 5))

        await _until(notified)
        [event] = _events(listener, 5)
        assert event["data"]["campaign_id"] == "weekend"
        assert event["data"]["target_count"] == 20
        assert event["data"]["promotion_codes"] == ["VIP25"]
        required_by = datetime.fromisoformat(event["data"]["clearance_required_by"])
        assert abs((required_by - execute_at).total_seconds()) < 0.001
        assert datetime.now(UTC) < required_by  # the event came before the deadline
        campaign = await cpb_grpc.CampaignServiceStub(live.channel).GetCampaign(
            cpb.GetCampaignRequest(campaign_id="weekend"), metadata=live.key())
        assert campaign.campaign.status == cpb.CAMPAIGN_STATUS_AWAITING_CLEARANCE

        # The listener pages the target group and approves half (rejects some, ignores others).
        paged = await all_customers(live, "weekend", page_size=7)
        assert [c.customer_id for c in paged] == customers
        approved = {c.customer_id for c in paged[::2]}
        statuses = {c.customer_id: c.customer_id in approved for c in paged[:15]}
        statuses.update({c: True for c in approved})  # 10 approved, 5 rejected, 5 never said
        reply = await set_statuses(live, "weekend", statuses, "listener-call-1")
        assert reply.updated == 17 and list(reply.unknown_customer_ids) == []

        async def executed() -> bool:
            return bool(_events(listener, 100))

        await _until(executed)
        [done] = _events(listener, 100)
        assert (done["data"]["approved_count"], done["data"]["rejected_count"]) == (10, 10)
        campaign = await cpb_grpc.CampaignServiceStub(live.channel).GetCampaign(
            cpb.GetCampaignRequest(campaign_id="weekend"), metadata=live.key())
        assert campaign.campaign.status == cpb.CAMPAIGN_STATUS_EXECUTED
        assert (campaign.campaign.approved_count, campaign.campaign.rejected_count) == (10, 10)

        results = {c: await get_reward(live, c, campaign_id="weekend") for c in customers}
        assert {c for c, r in results.items() if r.HasField("grant")} == approved
        assert {r.denial_reason for c, r in results.items() if c not in approved} == {
            rpb.DENIAL_REASON_NOT_ELIGIBLE}
        with pytest.raises(grpc.RpcError) as err:
            await set_statuses(live, "weekend", {"cust-01": True}, "too-late")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert rpc_error_reason(err.value) == "CLEARANCE_CLOSED"
        report = await cpb_grpc.CampaignServiceStub(live.channel).GetCampaignReconciliation(
            cpb.GetCampaignReconciliationRequest(campaign_id="weekend"), metadata=live.key())
        assert [(p.promotion_code, p.approved, p.granted, p.revoked, p.net_amount)
                for p in report.promotions] == [("VIP25", 10, 10, 0, "150")]
    finally:
        await listener.stop()


async def test_unconditional_campaign_executes_for_the_whole_group(live: Api) -> None:
    listener = await WebhookListener().start()
    try:
        await _register(live, listener.url, 5)
        await reward_type(live)
        await promotion(live)
        execute_at = datetime.now(UTC) + timedelta(seconds=1)
        await create_campaign(live, "atl", execute_at, customers=["a", "b"], conditional=False)

        async def executed() -> bool:
            reply = await cpb_grpc.CampaignServiceStub(live.channel).GetCampaign(
                cpb.GetCampaignRequest(campaign_id="atl"), metadata=live.key())
            return reply.campaign.status == cpb.CAMPAIGN_STATUS_EXECUTED

        await _until(executed)
        assert (await get_reward(live, "a", campaign_id="atl")).HasField("grant")
        outsider = await get_reward(live, "zed", campaign_id="atl")
        assert outsider.denial_reason == rpb.DENIAL_REASON_NOT_ELIGIBLE
        assert _events(listener, 5) == []  # no clearance needed, so no clearance event
    finally:
        await listener.stop()
