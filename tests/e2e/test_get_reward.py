"""GetReward through real servers: exact caps under concurrency, retries, periods, revoke."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from core.clock import FixedClock
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from promo.v1 import rewards_pb2 as rpb
from promo.v1 import rewards_pb2_grpc as rpb_grpc
from tests.conftest import Api, rpc_error_reason
from tests.e2e.promo_helpers import (
    cap,
    get_promotion,
    get_reward,
    promotion,
    revoke,
    reward_type,
    single,
)


async def _burst(apis: list[Api], customers: list[str], code: str = "VIP25"
                 ) -> list[rpb.GetRewardResponse]:
    stubs = [rpb_grpc.RewardServiceStub(a.channel) for a in apis]
    return await asyncio.gather(*(
        get_reward(apis[i % len(apis)], c, code, stub=stubs[i % len(stubs)])
        for i, c in enumerate(customers)))


async def test_single_reward_grant_and_retries(api: Api) -> None:
    await reward_type(api)
    await promotion(api, properties={"expires": "2026-12-31"})
    first = await get_reward(api, "c1", request_id="req-1")
    assert first.grant.grant_id and not first.existing
    assert [(r.reward_type, r.value, r.display_name) for r in first.grant.rewards] == [
        ("cashback", "15", "Cashback")]
    assert first.grant.promo_code == "VIP25"
    assert dict(first.grant.properties) == {"expires": "2026-12-31"}
    retry = await get_reward(api, "c1", request_id="req-1")
    assert retry.existing and retry.grant.grant_id == first.grant.grant_id
    again = await get_reward(api, "c1", request_id="req-2")  # same customer, new request
    assert again.existing and again.grant.grant_id == first.grant.grant_id
    other_campaign = await get_reward(api, "c1", request_id="req-3", campaign_id="camp-7")
    assert not other_campaign.existing
    assert other_campaign.grant.campaign_id == "camp-7"


async def test_500_concurrent_requests_against_customer_cap_of_100(
        api: Api, second_server: Api) -> None:
    await reward_type(api)
    await promotion(api, customer_cap=100)
    responses = await _burst([api, second_server], [f"cust-{i}" for i in range(500)])
    granted = [r for r in responses if r.HasField("grant")]
    denied = Counter(r.denial_reason for r in responses if not r.HasField("grant"))
    assert len(granted) == 100
    assert denied == {rpb.DENIAL_REASON_CUSTOMER_CAP_REACHED: 400}
    state = await get_promotion(api)
    assert state.customers == 100
    assert state.availability == ppb.AVAILABILITY_CUSTOMER_CAP_REACHED
    customers_cap = next(u for u in state.cap_usage if u.scope == "#customers")
    assert (customers_cap.used, customers_cap.limit, customers_cap.reached) == ("100", "100", True)


async def test_budget_of_1000_with_rewards_of_15_never_overspends(
        api: Api, second_server: Api, pool: asyncpg.Pool) -> None:
    await reward_type(api)
    await promotion(api, caps=[cap(ppb.CAP_PERIOD_LIFETIME, "1000")])
    responses = await _burst([api, second_server], [f"cust-{i}" for i in range(200)])
    granted = [r for r in responses if r.HasField("grant")]
    assert len(granted) == 66  # 66 * 15 = 990; a 67th would make 1005
    denied = [r for r in responses if not r.HasField("grant")]
    assert {r.denial_reason for r in denied} == {rpb.DENIAL_REASON_BUDGET_CAP_REACHED}
    assert {(r.denied_scope, r.denied_period) for r in denied} == {
        ("cashback", ppb.CAP_PERIOD_LIFETIME)}
    spent = await pool.fetchval("SELECT sum((r->>'value')::numeric) FROM grants, "
                                "jsonb_array_elements(rewards) r WHERE status = 'GRANTED'")
    assert spent == Decimal(990)
    state = await get_promotion(api)
    assert state.availability == ppb.AVAILABILITY_BUDGET_EXHAUSTED


async def test_daily_cap_resumes_the_next_day_in_the_promotions_time_zone(
        api: Api, clock: FixedClock) -> None:
    await reward_type(api)
    await promotion(api, time_zone="America/New_York",
                    caps=[cap(ppb.CAP_PERIOD_DAILY, "30"), cap(ppb.CAP_PERIOD_LIFETIME, "100")])
    # 23:00 in New York on Nov 22 is 04:00 UTC on Nov 23.
    clock.set(datetime(2026, 11, 23, 4, 0, tzinfo=UTC))
    assert (await get_reward(api, "a")).HasField("grant")
    assert (await get_reward(api, "b")).HasField("grant")
    third = await get_reward(api, "c")
    assert third.denial_reason == rpb.DENIAL_REASON_BUDGET_CAP_REACHED
    assert third.denied_period == ppb.CAP_PERIOD_DAILY
    state = await get_promotion(api)
    assert state.availability == ppb.AVAILABILITY_CAPPED_FOR_PERIOD
    # 04:59 UTC is still Nov 22 in New York: still capped.
    clock.set(datetime(2026, 11, 23, 4, 59, tzinfo=UTC))
    assert not (await get_reward(api, "c")).HasField("grant")
    # 05:00 UTC is midnight in New York: a new day.
    clock.set(datetime(2026, 11, 23, 5, 0, tzinfo=UTC))
    assert (await get_reward(api, "c")).HasField("grant")
    state = await get_promotion(api)
    daily = next(u for u in state.cap_usage if u.period == ppb.CAP_PERIOD_DAILY)
    assert (daily.used, daily.grants) == ("15", 1)
    assert daily.period_start.ToDatetime(UTC) == datetime(2026, 11, 23, 5, 0, tzinfo=UTC)
    lifetime = next(u for u in state.cap_usage if u.period == ppb.CAP_PERIOD_LIFETIME)
    assert lifetime.used == "45"


async def test_dst_day_is_23_hours_long(api: Api, clock: FixedClock) -> None:
    await reward_type(api)
    await promotion(api, time_zone="Europe/Berlin", caps=[cap(ppb.CAP_PERIOD_DAILY, "15")])
    clock.set(datetime(2026, 3, 29, 0, 30, tzinfo=UTC))  # 01:30 CET, the spring-forward day
    assert (await get_reward(api, "a")).HasField("grant")
    clock.set(datetime(2026, 3, 29, 21, 59, tzinfo=UTC))  # 23:59 CEST, same local day
    assert not (await get_reward(api, "b")).HasField("grant")
    clock.set(datetime(2026, 3, 29, 22, 0, tzinfo=UTC))  # midnight CEST: next day, 23 h later
    assert (await get_reward(api, "b")).HasField("grant")


async def test_revoke_restores_budget_and_customer_slot(api: Api, pool: asyncpg.Pool) -> None:
    await reward_type(api)
    await promotion(api, customer_cap=2, caps=[cap(ppb.CAP_PERIOD_LIFETIME, "30")])
    a = await get_reward(api, "a")
    await get_reward(api, "b")
    assert (await get_reward(api, "c")).denial_reason == \
        rpb.DENIAL_REASON_CUSTOMER_CAP_REACHED
    assert (await revoke(api, a.grant.grant_id)).revoked
    assert not (await revoke(api, a.grant.grant_id)).revoked  # idempotent
    c = await get_reward(api, "c")
    assert c.HasField("grant") and not c.existing
    again = await get_reward(api, "a")  # a's slot went back: a new request is denied now
    assert again.denial_reason == rpb.DENIAL_REASON_CUSTOMER_CAP_REACHED
    old = await get_reward(api, "a", request_id=None)
    assert not old.HasField("grant")
    rows = await pool.fetch("SELECT scope, used, grants FROM cap_usage ORDER BY scope")
    assert [(r["scope"], r["used"], r["grants"]) for r in rows] == [
        ("#customers", Decimal(2), 2), ("cashback", Decimal(30), 2)]
    with pytest.raises(grpc.RpcError) as err:
        await revoke(api, "999999")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        await revoke(api, "not-a-number")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_revoke_racing_grants_keeps_counters_exact(api: Api, pool: asyncpg.Pool) -> None:
    await reward_type(api)
    await promotion(api, caps=[cap(ppb.CAP_PERIOD_LIFETIME, "600")])
    first = await _burst([api], [f"a{i}" for i in range(40)])
    grant_ids = [r.grant.grant_id for r in first if r.HasField("grant")]
    assert len(grant_ids) == 40
    results = await asyncio.gather(
        *(revoke(api, g) for g in grant_ids[:20]),
        *(get_reward(api, f"b{i}") for i in range(30)))
    granted_b = sum(1 for r in results[20:] if r.HasField("grant"))  # type: ignore[union-attr]
    live = await pool.fetchval("SELECT count(*) FROM grants WHERE status = 'GRANTED'")
    used = await pool.fetchval("SELECT used FROM cap_usage WHERE scope = 'cashback'")
    assert live == 20 + granted_b
    assert used == Decimal(15) * live <= Decimal(600)


async def test_lifecycle_and_denials(api: Api) -> None:
    await reward_type(api)
    await promotion(api, activate=False)
    draft = await get_reward(api, "x", request_id="r-x")
    assert draft.denial_reason == rpb.DENIAL_REASON_NOT_ACTIVE
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    await stub.ActivatePromotion(ppb.ActivatePromotionRequest(request_id="a1",
                                                              promotion_code="VIP25"),
                                 metadata=api.key())
    granted = await get_reward(api, "x", request_id="r-x")
    assert granted.HasField("grant")
    with pytest.raises(grpc.RpcError) as err:
        await stub.UpdatePromotion(ppb.UpdatePromotionRequest(
            request_id="u1", promotion=ppb.Promotion(promotion_code="VIP25", name="New"),
            update_mask=field_mask_pb2.FieldMask(paths=["name"])), metadata=api.key())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_error_reason(err.value) == "PROMOTION_NOT_EDITABLE"
    await stub.DeactivatePromotion(ppb.DeactivatePromotionRequest(request_id="d1",
                                                                  promotion_code="VIP25"),
                                   metadata=api.key())
    assert (await get_reward(api, "y")).denial_reason == rpb.DENIAL_REASON_NOT_ACTIVE
    assert (await get_reward(api, "x")).existing  # the earlier grant still answers
    updated = await stub.UpdatePromotion(ppb.UpdatePromotionRequest(
        request_id="u2", promotion=ppb.Promotion(promotion_code="VIP25", name="New name",
                                                 rewards=[single(value="20")]),
        update_mask=field_mask_pb2.FieldMask(paths=["name", "rewards"])), metadata=api.key())
    assert updated.promotion.name == "New name"
    assert updated.promotion.version == 4  # created, activated, deactivated, updated
    with pytest.raises(grpc.RpcError) as err:
        await stub.UpdatePromotion(ppb.UpdatePromotionRequest(
            request_id="u3", promotion=ppb.Promotion(promotion_code="VIP25"),
            update_mask=field_mask_pb2.FieldMask(paths=["promotion_code"])), metadata=api.key())
    assert "never changes" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        await stub.DeactivatePromotion(ppb.DeactivatePromotionRequest(
            request_id="d2", promotion_code="VIP25"), metadata=api.key())
    assert rpc_error_reason(err.value) == "INVALID_STATUS_TRANSITION"
    await stub.ActivatePromotion(ppb.ActivatePromotionRequest(request_id="a2",
                                                              promotion_code="VIP25"),
                                 metadata=api.key())
    assert [r.value for r in (await get_reward(api, "z")).grant.rewards] == ["20"]


async def test_cached_config_is_never_used_stale(api: Api, second_server: Api) -> None:
    await reward_type(api)
    await promotion(api)
    assert (await get_reward(second_server, "a")).HasField("grant")  # warms its cache
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    await stub.DeactivatePromotion(ppb.DeactivatePromotionRequest(request_id="d",
                                                                  promotion_code="VIP25"),
                                   metadata=api.key())
    denied = await get_reward(second_server, "b")
    assert denied.denial_reason == rpb.DENIAL_REASON_NOT_ACTIVE


async def test_unknown_promotion_and_bad_input(api: Api) -> None:
    with pytest.raises(grpc.RpcError) as err:
        await get_reward(api, "c", "NOPE")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error_reason(err.value) == "PROMOTION_NOT_FOUND"
    await reward_type(api)
    await promotion(api)
    for kwargs, reason in (({"customer": ""}, "MISSING_FIELD"),
                           ({"customer": "c", "request_id": ""}, "INVALID_REQUEST_ID"),
                           # PostgreSQL cannot store NUL: refused up front, not INTERNAL
                           ({"customer": "c\x00d"}, "INVALID_ID"),
                           ({"customer": "c", "campaign_id": "camp\x00"}, "INVALID_ID")):
        with pytest.raises(grpc.RpcError) as err:
            await get_reward(api, **kwargs)  # type: ignore[arg-type]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert rpc_error_reason(err.value) == reason
    with pytest.raises(grpc.RpcError) as err:
        await get_reward(api, "c", external_values={"cashback": "5"})
    assert rpc_error_reason(err.value) == "INVALID_EXTERNAL_VALUE"
    with pytest.raises(grpc.RpcError) as err:  # GetReward needs the runtime role
        await rpb_grpc.RewardServiceStub(api.channel).GetReward(
            rpb.GetRewardRequest(promotion_code="VIP25", customer_id="c", request_id="r"),
            metadata=api.key("listener"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(("promo", "reason", "fragment"), [
    (ppb.Promotion(promotion_code="P1", name="x", rewards=[single("nope")]),
     "REWARD_TYPE_NOT_FOUND", "names no reward type"),
    (ppb.Promotion(promotion_code="P1", name="x", rewards=[single()],
                   budget_caps=[cap(ppb.CAP_PERIOD_DAILY, "0")]), "INVALID_CAP", "positive"),
    (ppb.Promotion(promotion_code="P1", name="x", rewards=[single()],
                   budget_caps=[cap(ppb.CAP_PERIOD_DAILY, "10"), cap(ppb.CAP_PERIOD_DAILY, "20")]),
     "DUPLICATE_CAP", "already has a DAILY cap"),
    (ppb.Promotion(promotion_code="P1", name="x", rewards=[single()], time_zone="Mars/Base"),
     "INVALID_TIME_ZONE", "IANA"),
    (ppb.Promotion(promotion_code="bad code", name="x", rewards=[single()]),
     "INVALID_PROMOTION_CODE", "1-64 characters"),
    (ppb.Promotion(promotion_code="P1", name="x"), "MISSING_REWARDS", "at least one reward"),
    (ppb.Promotion(promotion_code="P1", name="x", rewards=[single(value="5000")]),
     "INVALID_VALUE", "above the maximum"),
])
async def test_bad_promotions_are_rejected(api: Api, promo: ppb.Promotion, reason: str,
                                           fragment: str) -> None:
    await reward_type(api, max_value="100")
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    with pytest.raises(grpc.RpcError) as err:
        await stub.CreatePromotion(ppb.CreatePromotionRequest(request_id="c", promotion=promo),
                                   metadata=api.key())
    assert err.value.code() == (grpc.StatusCode.NOT_FOUND if reason == "REWARD_TYPE_NOT_FOUND"
                                else grpc.StatusCode.INVALID_ARGUMENT)
    assert rpc_error_reason(err.value) == reason
    assert fragment in (err.value.details() or "")


async def test_list_search_filters_and_pages(api: Api) -> None:
    await reward_type(api)
    for i in range(7):
        await promotion(api, f"SPRING{i}", activate=i % 2 == 0)
    await promotion(api, "AUTUMN")
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    listed = await stub.ListPromotions(ppb.ListPromotionsRequest(
        search="spring", statuses=[ppb.PROMOTION_STATUS_ACTIVE], page_size=2),
        metadata=api.key())
    codes = [p.promotion_code for p in listed.promotions]
    while listed.next_page_token:
        listed = await stub.ListPromotions(ppb.ListPromotionsRequest(
            search="spring", statuses=[ppb.PROMOTION_STATUS_ACTIVE], page_size=2,
            page_token=listed.next_page_token), metadata=api.key())
        codes += [p.promotion_code for p in listed.promotions]
    assert codes == ["SPRING0", "SPRING2", "SPRING4", "SPRING6"]
    by_kind = await stub.ListPromotions(ppb.ListPromotionsRequest(
        reward_kinds=[ppb.REWARD_KIND_EXTERNAL]), metadata=api.key())
    assert list(by_kind.promotions) == []


async def test_list_shows_each_promotions_own_live_state(api: Api) -> None:
    """A page's live state is read for all its promotions at once: nothing may leak across."""
    await reward_type(api)
    await promotion(api, "CAPPED", customer_cap=2)
    await promotion(api, "BUDGET", caps=[cap(ppb.CAP_PERIOD_LIFETIME, "30")])
    await promotion(api, "PLAIN")
    for customer in ("a", "b", "c"):
        await get_reward(api, customer, "CAPPED")
    for customer in ("a", "b"):
        await get_reward(api, customer, "BUDGET")
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    listed = await stub.ListPromotions(ppb.ListPromotionsRequest(), metadata=api.key())
    shown = {p.promotion_code: p for p in listed.promotions}
    assert [(code, shown[code].customers, shown[code].availability)
            for code in ("BUDGET", "CAPPED", "PLAIN")] == [
        ("BUDGET", 2, ppb.AVAILABILITY_BUDGET_EXHAUSTED),
        ("CAPPED", 2, ppb.AVAILABILITY_CUSTOMER_CAP_REACHED),
        ("PLAIN", 0, ppb.AVAILABILITY_AVAILABLE)]
    assert [(u.scope, u.used, u.limit, u.reached) for u in shown["BUDGET"].cap_usage] == [
        ("cashback", "30", "30", True)]
    assert [(u.scope, u.used, u.reached) for u in shown["CAPPED"].cap_usage] == [
        ("#customers", "2", True)]
    assert list(shown["PLAIN"].cap_usage) == []
    for code in shown:  # get agrees with list
        assert await get_promotion(api, code) == shown[code]


async def test_reconciliation_matches_counters(api: Api, clock: FixedClock) -> None:
    await reward_type(api)
    await promotion(api, caps=[cap(ppb.CAP_PERIOD_DAILY, "45"), cap(ppb.CAP_PERIOD_LIFETIME,
                                                                    "1000")])
    grants = [await get_reward(api, f"c{i}") for i in range(3)]
    await revoke(api, grants[0].grant.grant_id)
    clock.advance(timedelta(days=1))
    await get_reward(api, "d")
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    report = await stub.GetPromotionReconciliation(
        ppb.GetPromotionReconciliationRequest(promotion_code="VIP25"), metadata=api.key())
    rows = [(r.period, r.granted_count, r.granted_amount, r.revoked_count, r.net_amount, r.limit,
             r.counter_matches) for r in report.rows]
    assert rows == [
        (ppb.CAP_PERIOD_DAILY, 3, "45", 1, "30", "45", True),
        (ppb.CAP_PERIOD_DAILY, 1, "15", 0, "15", "45", True),
        (ppb.CAP_PERIOD_LIFETIME, 4, "60", 1, "45", "1000", True),
    ]
