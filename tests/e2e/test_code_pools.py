"""Personalized promo codes end to end (seed 002's flash sale, seed 001's alerts): uploads over
a real gRPC stream, allocation under concurrency, fallback and pause, inventory, and the
alerts arriving at a real listener through a real worker."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from grpc import aio

from config.settings import Settings
from promo.v1 import codes_pb2 as cpb
from promo.v1 import codes_pb2_grpc as cpb_grpc
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import listeners_pb2_grpc as lpb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from promo.v1 import rewards_pb2 as rpb
from promo.v1 import rewards_pb2_grpc as rpb_grpc
from tests.conftest import Api, rpc_error_reason
from tests.e2e.code_helpers import (
    code_promotion,
    codes_file,
    get_promotion,
    pool_counts,
    until,
    upload,
)
from tests.e2e.live_server import live_server
from tests.e2e.promo_helpers import get_reward, revoke, reward_type
from tests.webhook_listener import SECRET, WebhookListener

THRESHOLD, DEPLETED, FALLBACK = 101, 102, 103


@pytest.fixture
async def live(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[Api]:
    """A server and a worker on the real clock (the worker delivers the alerts)."""
    async with live_server(settings, pool) as api:
        yield api


async def test_flash_sale_codes_fallback_and_alerts(live: Api, pool: asyncpg.Pool) -> None:
    """N codes, N + 100 customers at once from several clients: N distinct codes, the rest the
    fallback; 0 available; one threshold, one depletion and one fallback alert at a real
    listener."""
    n = 200
    listener = await WebhookListener().start()
    try:
        for event_type in (THRESHOLD, DEPLETED, FALLBACK):
            await lpb_grpc.ListenerServiceStub(live.channel).RegisterListener(
                lpb.RegisterListenerRequest(request_id=f"listener-{event_type}",
                                            listener=lpb.Listener(event_type=event_type,  # type: ignore[arg-type]
                                                                  url=listener.url,
                                                                  secret=SECRET)),
                metadata=live.key())
        await code_promotion(live, "FLASH48", fallback="LOYALTY10", alerts=[
            ppb.CodeAlertThreshold(remaining_percent="25")])  # level 50 of 200
        pool_file = codes_file("FLASH", n)
        uploaded = await upload(live, "FLASH48", pool_file, "upload-1", chunk=1000)
        assert (uploaded.codes_added, uploaded.inventory.available) == (n, n)

        channels = [aio.insecure_channel(live.address) for _ in range(4)]
        try:
            stubs = [rpb_grpc.RewardServiceStub(c) for c in channels]
            replies = await asyncio.gather(*(
                get_reward(live, f"cust-{i}", "FLASH48", request_id=f"req-{i}",
                           stub=stubs[i % 4]) for i in range(n + 100)))
        finally:
            for channel in channels:
                await channel.close()
        grants = [r.grant for r in replies]
        assert all(r.HasField("grant") for r in replies)
        personal = [g.promo_code for g in grants if not g.fallback_code]
        fallback = [g.promo_code for g in grants if g.fallback_code]
        assert len(personal) == n and len(set(personal)) == n
        assert set(personal) == set(pool_file.decode().split())
        assert fallback == ["LOYALTY10"] * 100

        retry = await get_reward(live, "cust-7", "FLASH48", request_id="req-7")
        assert retry.existing and retry.grant.promo_code == grants[7].promo_code

        promotion = await get_promotion(live, "FLASH48")
        assert (promotion.code_inventory.total, promotion.code_inventory.used,
                promotion.code_inventory.available,
                promotion.code_inventory.fallback_grants) == (n, n, 0, 100)
        assert promotion.fallback_active
        assert promotion.availability == ppb.AVAILABILITY_AVAILABLE

        def events(event_type: int) -> list[dict]:  # type: ignore[type-arg]
            return [json.loads(r.body) for r in listener.received
                    if r.verify_error is None and not r.duplicate
                    and json.loads(r.body)["event_type"] == event_type]

        async def all_three() -> bool:
            return all(events(t) for t in (THRESHOLD, DEPLETED, FALLBACK))

        await until(all_three)
        await asyncio.sleep(0.5)  # nothing more arrives
        [threshold] = events(THRESHOLD)
        [depleted] = events(DEPLETED)
        [took_over] = events(FALLBACK)
        assert threshold["data"]["promotion_code"] == "FLASH48"
        assert threshold["data"]["threshold"] == "25%"
        assert (threshold["data"]["level"], threshold["data"]["remaining"],
                threshold["data"]["total"]) == (50, 50, 200)
        assert (depleted["data"]["remaining"], depleted["data"]["fallback_code_active"],
                depleted["data"]["promotion_paused"]) == (0, True, False)
        assert (took_over["data"]["alert"], took_over["data"]["fallback_code"]) == \
            ("FALLBACK_ACTIVE", "LOYALTY10")
    finally:
        await listener.stop()


async def test_without_a_fallback_the_promotion_pauses_until_codes_are_added(
        api: Api, pool: asyncpg.Pool) -> None:
    await code_promotion(api, "NOFALL")
    none_yet = await get_reward(api, "early", "NOFALL")
    assert none_yet.denial_reason == rpb.DENIAL_REASON_OUT_OF_CODES
    await upload(api, "NOFALL", codes_file("NF", 3), "u1")
    got = [await get_reward(api, f"c{i}", "NOFALL") for i in range(3)]
    assert sorted(r.grant.promo_code for r in got) == ["NF-000001", "NF-000002", "NF-000003"]

    paused = await get_reward(api, "c3", "NOFALL")
    assert paused.denial_reason == rpb.DENIAL_REASON_OUT_OF_CODES
    assert "resumes when codes are uploaded" in paused.denial_message
    promotion = await get_promotion(api, "NOFALL")
    assert promotion.availability == ppb.AVAILABILITY_OUT_OF_CODES
    assert not promotion.fallback_active
    assert await pool_counts(pool, "NOFALL") == (3, 3, 3)
    # The denied calls charged nothing: no grant, no customer counted.
    assert await pool.fetchval("SELECT count(*) FROM grants") == 3

    await upload(api, "NOFALL", codes_file("NF", 2, start=4), "u2")
    resumed = await get_reward(api, "c3", "NOFALL")
    assert resumed.grant.promo_code == "NF-000004"
    assert (await get_promotion(api, "NOFALL")).availability == ppb.AVAILABILITY_AVAILABLE


async def test_alerts_fire_once_per_breach_and_rearm_after_replenishment(
        api: Api, pool: asyncpg.Pool) -> None:
    await code_promotion(api, "REARM", fallback="FB", alerts=[
        ppb.CodeAlertThreshold(remaining_codes=2)])
    await upload(api, "REARM", codes_file("RA", 5), "u1")

    async def alerts() -> list[tuple[str, int]]:
        rows = await pool.fetch("SELECT kind, remaining FROM code_pool_alerts ORDER BY id")
        return [(r["kind"], r["remaining"]) for r in rows]

    for i in range(4):  # remaining 4, 3, 2 (alert), 1
        await get_reward(api, f"a{i}", "REARM")
    assert await alerts() == [("THRESHOLD", 2)]
    await upload(api, "REARM", codes_file("RA", 5, start=6), "u2")  # remaining 6: re-armed
    for i in range(6):  # 5, 4, 3, 2 (alert), 1, 0 (depleted)
        await get_reward(api, f"b{i}", "REARM")
    await get_reward(api, "c0", "REARM")  # the fallback takes over
    await get_reward(api, "c1", "REARM")
    assert await alerts() == [("THRESHOLD", 2), ("THRESHOLD", 2), ("DEPLETED", 0),
                              ("FALLBACK_ACTIVE", 0)]

    async def dispatched() -> bool:
        return await pool.fetchval(
            "SELECT count(*) FROM code_pool_alerts WHERE emitted_at IS NULL") == 0

    await until(dispatched)  # the server dispatches right after each grant, in the background
    types = [r["event_type"] for r in await pool.fetch("SELECT event_type FROM webhook_events")]
    assert Counter(types) == Counter({THRESHOLD: 2, DEPLETED: 1, FALLBACK: 1})


async def test_a_new_threshold_already_breached_alerts_once(api: Api,
                                                           pool: asyncpg.Pool) -> None:
    await code_promotion(api, "LATE", fallback="FB")
    await upload(api, "LATE", codes_file("LT", 10), "u1")
    for i in range(8):
        await get_reward(api, f"c{i}", "LATE")
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    await stub.DeactivatePromotion(ppb.DeactivatePromotionRequest(
        request_id="off", promotion_code="LATE"), metadata=api.key())
    for attempt in ("edit-1", "edit-2"):  # the second edit does not alert again
        await stub.UpdatePromotion(ppb.UpdatePromotionRequest(
            request_id=attempt, promotion=ppb.Promotion(
                promotion_code="LATE", name=f"Late {attempt}",
                code_alerts=[ppb.CodeAlertThreshold(remaining_percent="50")]),
            update_mask={"paths": ["code_alerts", "name"]}), metadata=api.key())
    rows = await pool.fetch("SELECT kind, threshold_key, remaining FROM code_pool_alerts")
    assert [(r["kind"], r["threshold_key"], r["remaining"]) for r in rows] == [
        ("THRESHOLD", "percent:50", 2)]


async def test_caps_apply_to_code_promotions_and_denials_use_no_code(
        api: Api, pool: asyncpg.Pool) -> None:
    await code_promotion(api, "CAPPED", customer_cap=3)
    await upload(api, "CAPPED", codes_file("CP", 10), "u1")
    replies = await asyncio.gather(*(get_reward(api, f"c{i}", "CAPPED") for i in range(8)))
    assert sum(r.HasField("grant") for r in replies) == 3
    assert Counter(r.denial_reason for r in replies if not r.HasField("grant")) == Counter(
        {rpb.DENIAL_REASON_CUSTOMER_CAP_REACHED: 5})
    assert await pool_counts(pool, "CAPPED") == (10, 3, 10)


async def test_a_revoked_grant_keeps_its_code_out_of_the_pool(api: Api) -> None:
    await code_promotion(api, "REVOKE", fallback="FB")
    await upload(api, "REVOKE", codes_file("RV", 3), "u1")
    first = await get_reward(api, "alice", "REVOKE")
    await revoke(api, first.grant.grant_id)
    again = await get_reward(api, "alice", "REVOKE")
    assert again.HasField("grant") and not again.existing
    assert again.grant.promo_code != first.grant.promo_code
    others = [await get_reward(api, c, "REVOKE") for c in ("bob", "carol")]
    codes = [first.grant.promo_code, again.grant.promo_code,
             *(o.grant.promo_code for o in others)]
    assert codes[:3] == ["RV-000001", "RV-000002", "RV-000003"] and codes[3] == "FB"


BAD_FILES = [
    (b"OK-1\nOK-2,second\n", "CODE_FILE_REJECTED", "line 2: has more than one column"),
    (b"OK-1\n" + b"L" * 65 + b"\n", "CODE_FILE_REJECTED", "line 2: code is 65 characters"),
    (b"OK-1\nOK-\xc32\n", "CODE_FILE_REJECTED", "line 2: is not valid UTF-8"),
    (b"OK-1\nOK-2\nOK-1\n", "CODE_FILE_REJECTED", "line 3: code 'OK-1' is already on line 1"),
    (b"NEW-1\nPOOL-000002\nNEW-2\n", "CODE_FILE_REJECTED",
     "line 2: code 'POOL-000002' is already in the pool"),
    (b"\n \n", "CODE_FILE_EMPTY", "no codes"),
]


@pytest.mark.parametrize(("data", "reason", "fragment"), BAD_FILES)
async def test_a_malformed_file_is_rejected_whole_and_changes_nothing(
        api: Api, pool: asyncpg.Pool, data: bytes, reason: str, fragment: str) -> None:
    await code_promotion(api, "BAD", fallback="FB")
    await upload(api, "BAD", codes_file("POOL", 3), "u1")
    with pytest.raises(grpc.RpcError) as caught:
        await upload(api, "BAD", data, "bad-upload", chunk=7)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(caught.value) == reason
    assert fragment in (caught.value.details() or "")
    assert await pool_counts(pool, "BAD") == (3, 0, 3)
    assert await pool.fetchval("SELECT count(*) FROM code_uploads") == 1
    # The rejected request id is free again: a corrected file goes through with it.
    fixed = await upload(api, "BAD", b"FIXED-1\n", "bad-upload")
    assert fixed.inventory.total == 4


async def test_a_file_over_10_mb_is_refused_while_streaming(api: Api,
                                                           pool: asyncpg.Pool) -> None:
    await code_promotion(api, "HUGE")
    big = codes_file("HUGE", 10 * 1024 * 1024 // 12 + 10)
    assert len(big) > 10 * 1024 * 1024
    with pytest.raises(grpc.RpcError) as caught:
        await upload(api, "HUGE", big, "huge", chunk=1024 * 1024)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(caught.value) == "CODE_FILE_TOO_LARGE"
    assert await pool_counts(pool, "HUGE") == (0, 0, 0)


async def test_uploads_are_idempotent_and_need_a_personalized_promotion(
        api: Api, pool: asyncpg.Pool) -> None:
    await code_promotion(api, "IDEM")
    first = await upload(api, "IDEM", codes_file("ID", 5), "same")
    again = await upload(api, "IDEM", codes_file("ID", 5), "same")
    assert again == first and await pool_counts(pool, "IDEM") == (5, 0, 5)
    with pytest.raises(grpc.RpcError) as reused:
        await upload(api, "IDEM", codes_file("ID", 5, start=6), "same")
    assert rpc_error_reason(reused.value) == "REQUEST_ID_REUSED"

    await ppb_grpc.PromotionServiceStub(api.channel).CreatePromotion(ppb.CreatePromotionRequest(
        request_id="plain", activate=True, promotion=ppb.Promotion(
            promotion_code="PLAIN", name="Plain",
            rewards=[ppb.PromotionReward(reward_type="percent_off",
                                         kind=ppb.REWARD_KIND_EXTERNAL)])),
        metadata=api.key())
    with pytest.raises(grpc.RpcError) as plain:
        await upload(api, "PLAIN", b"A\n", "plain-upload")
    assert plain.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_error_reason(plain.value) == "NOT_PERSONALIZED"
    with pytest.raises(grpc.RpcError) as runtime:
        await cpb_grpc.CodePoolServiceStub(api.channel).GetCodeInventory(
            cpb.GetCodeInventoryRequest(promotion_code="IDEM"), metadata=api.key("runtime"))
    assert runtime.value.code() == grpc.StatusCode.PERMISSION_DENIED

    inventory = await cpb_grpc.CodePoolServiceStub(api.channel).GetCodeInventory(
        cpb.GetCodeInventoryRequest(promotion_code="IDEM"), metadata=api.key())
    assert (inventory.inventory.total, inventory.inventory.available) == (5, 5)
    assert [u.codes for u in inventory.uploads] == [5]


async def test_pool_settings_are_validated(api: Api) -> None:
    await reward_type(api, "percent_off")
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    with pytest.raises(grpc.RpcError) as caught:
        await stub.CreatePromotion(ppb.CreatePromotionRequest(
            request_id="bad", promotion=ppb.Promotion(
                promotion_code="BADSET", name="Bad",
                rewards=[ppb.PromotionReward(reward_type="percent_off",
                                             kind=ppb.REWARD_KIND_EXTERNAL)],
                code_type=ppb.CODE_TYPE_PERSONALIZED,
                code_alerts=[ppb.CodeAlertThreshold(remaining_percent="150")])),
            metadata=api.key())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(caught.value) == "INVALID_CODE_SETTINGS"
    assert "code_alerts[0].remaining_percent must be between 0 and 100" in (
        caught.value.details() or "")


async def test_grants_during_uploads_never_share_a_code(api: Api, pool: asyncpg.Pool) -> None:
    """Uploads replenishing the pool while 300 customers ask at once: every code goes out at
    most once, the counter equals the codes handed out, and no upload is lost."""
    await code_promotion(api, "RACE", fallback="FB")
    await upload(api, "RACE", codes_file("R", 50), "u0")

    async def uploads() -> None:
        for k in range(1, 6):
            await upload(api, "RACE", codes_file("R", 50, start=1 + 50 * k), f"u{k}", chunk=97)

    replies, _ = await asyncio.gather(
        asyncio.gather(*(get_reward(api, f"c{i}", "RACE") for i in range(300))), uploads())
    codes = [r.grant.promo_code for r in replies if not r.grant.fallback_code]
    assert len(codes) == len(set(codes))
    assert all(r.HasField("grant") for r in replies)
    total, allocated, rows = await pool_counts(pool, "RACE")
    assert (total, rows) == (300, 300)
    assert allocated == len(codes)
    assert await pool.fetchval(
        "SELECT count(*) FROM grants WHERE promo_code <> 'FB'") == len(codes)
