"""Concurrency audit: interleavings the other e2e tests do not cover (it found RevokeGrant
answering INTERNAL when PostgreSQL broke a deadlock with a grant of the same customer; such a
transaction is now run again).

Every test drives the real server(s) and checks the invariants of DESIGN.md ("Invariants that
users pay for") against the database afterwards: no overspend of any cap, at most one reward
per request and one code per customer and pool, counters equal to the live grants.

The assertions hold whatever order the racing calls take (no timing assumptions).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable
from decimal import Decimal

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from promo.v1 import rewards_pb2 as rpb
from promo.v1 import rewards_pb2_grpc as rpb_grpc
from tests.conftest import Api, rpc_error_reason
from tests.e2e.code_helpers import code_promotion, codes_file, pool_counts, upload
from tests.e2e.promo_helpers import (
    cap,
    get_promotion,
    get_reward,
    promotion,
    revoke,
    reward_type,
    single,
)

Reply = rpb.GetRewardResponse | BaseException


def _errors(replies: list[Reply]) -> list[str]:
    return [f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else repr(e)
            for e in replies if isinstance(e, BaseException)]


async def _live_customers(pool: asyncpg.Pool, code: str) -> int:
    count: int = await pool.fetchval(
        """SELECT count(DISTINCT g.customer_id) FROM grants g JOIN promotions p
                  ON p.id = g.promotion_id WHERE p.code = $1 AND g.status = 'GRANTED'""", code)
    return count


async def _counter(pool: asyncpg.Pool, code: str, scope: str) -> Decimal | None:
    used: Decimal | None = await pool.fetchval(
        """SELECT u.used FROM cap_usage u JOIN promotions p ON p.id = u.promotion_id
            WHERE p.code = $1 AND u.scope = $2""", code, scope)
    return used


async def _spent(pool: asyncpg.Pool, code: str, reward_type_name: str) -> Decimal:
    spent: Decimal = await pool.fetchval(
        """SELECT coalesce(sum((r->>'value')::numeric), 0)
             FROM grants g JOIN promotions p ON p.id = g.promotion_id,
                  jsonb_array_elements(g.rewards) r
            WHERE p.code = $1 AND g.status = 'GRANTED' AND r->>'reward_type' = $2""",
        code, reward_type_name)
    return spent


# --- UpdatePromotion lowering a cap while grants are in flight --------------------------------

async def _update(api: Api, request_id: str, promo: ppb.Promotion,
                  paths: list[str]) -> ppb.UpdatePromotionResponse:
    return await ppb_grpc.PromotionServiceStub(api.channel).UpdatePromotion(
        ppb.UpdatePromotionRequest(request_id=request_id, promotion=promo,
                                   update_mask=field_mask_pb2.FieldMask(paths=paths)),
        metadata=api.key())


async def _transition(api: Api, rpc: str, request_id: str, code: str) -> ppb.Promotion:
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    if rpc == "deactivate":
        return (await stub.DeactivatePromotion(ppb.DeactivatePromotionRequest(
            request_id=request_id, promotion_code=code), metadata=api.key())).promotion
    return (await stub.ActivatePromotion(ppb.ActivatePromotionRequest(
        request_id=request_id, promotion_code=code), metadata=api.key())).promotion


async def test_a_cap_cut_during_a_burst_is_never_exceeded_afterwards(
        api: Api, second_server: Api, pool: asyncpg.Pool) -> None:
    """Invariant 1 with UpdatePromotion lowering the customer cap while 300 customers ask on
    two servers (deactivate, cut 1000 -> 30, activate: edits need a deactivated promotion):
    the edit recounts what is out; afterwards grants fill up to the new cap only. So the live
    customers end at most max(30, customers counted by the edit), and the counter equals them."""
    await reward_type(api)
    await promotion(api, "CUT", customer_cap=1000)
    apis = [api, second_server]
    stubs = [rpb_grpc.RewardServiceStub(a.channel) for a in apis]

    async def edit() -> ppb.Promotion:
        await _transition(api, "deactivate", "cut-off", "CUT")
        updated = await _update(api, "cut-1", ppb.Promotion(promotion_code="CUT",
                                                            customer_cap=30), ["customer_cap"])
        await _transition(api, "activate", "cut-on", "CUT")
        return updated.promotion

    async def burst(offset: int) -> list[Reply]:
        return await asyncio.gather(*(
            get_reward(apis[i % 2], f"c{offset + i}", "CUT", stub=stubs[i % 2])
            for i in range(150)), return_exceptions=True)

    first, updated, second = await asyncio.gather(burst(0), edit(), burst(150))
    replies = [*first, *second]
    # A call that saw the promotion change on each of its three tries (deactivate, edit,
    # activate: likely on a loaded machine) is ABORTED "retry it" and granted nothing.
    assert set(_errors(replies)) <= {
        "ABORTED: the promotion changed repeatedly during this call; retry it"}
    live = await _live_customers(pool, "CUT")
    assert await _counter(pool, "CUT", "#customers") == live
    assert live <= max(30, updated.customers), (live, updated.customers)
    after = await get_reward(api, "late", "CUT")
    assert not after.HasField("grant") or live < 30


# --- RevokeGrant racing GetReward of the same customers ---------------------------------------

async def test_revokes_racing_new_grants_of_the_same_customers_under_a_customer_cap(
        api: Api, second_server: Api, pool: asyncpg.Pool) -> None:
    """Invariants 1 and 2 under RevokeGrant racing GetReward for the same customers (new
    request ids) while other customers compete for the freed slots, on two servers: every call
    answers, the customer counter equals the customers holding a live grant, never above the
    cap, each customer holds at most one live grant, and the budget counter equals the live
    spend."""
    await reward_type(api)
    await promotion(api, "RR", customer_cap=120, caps=[cap(ppb.CAP_PERIOD_LIFETIME, "100000")])
    apis = [api, second_server]
    stubs = [rpb_grpc.RewardServiceStub(a.channel) for a in apis]
    first = await asyncio.gather(*(get_reward(apis[i % 2], f"h{i}", "RR", stub=stubs[i % 2])
                                   for i in range(100)))
    grant_ids = [r.grant.grant_id for r in first]
    assert len(set(grant_ids)) == 100

    calls: list[Awaitable[object]] = []
    for i, gid in enumerate(grant_ids):
        calls.append(revoke(apis[i % 2], gid))
        calls.append(get_reward(apis[(i + 1) % 2], f"h{i}", "RR", stub=stubs[(i + 1) % 2]))
    calls.extend(get_reward(apis[i % 2], f"n{i}", "RR", stub=stubs[i % 2]) for i in range(100))
    replies = await asyncio.gather(*calls, return_exceptions=True)
    errors = _errors(replies)  # type: ignore[arg-type]

    live = await _live_customers(pool, "RR")
    customers = await _counter(pool, "RR", "#customers")
    per_customer = await pool.fetchval(
        """SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM grants
            WHERE status = 'GRANTED' GROUP BY customer_id, campaign_key) x""")
    revoked = await pool.fetchval("SELECT count(*) FROM grants WHERE status = 'REVOKED'")
    assert per_customer == 1
    assert customers == live <= 120
    assert await _counter(pool, "RR", "cashback") == await _spent(pool, "RR", "cashback")
    # Every call must answer: a RevokeGrant that deadlocks with a grant batch (promo_revoke
    # locks the customer's row, then the counters; a batch holds the counters, then wants
    # that customer's grant/customer row) comes back INTERNAL, and its grant stays live.
    assert (errors, revoked) == ([], 100)


# --- two reward types, each with its caps, racing for the last units ---------------------------

async def test_last_units_of_two_reward_types_caps_are_all_or_nothing(
        api: Api, second_server: Api, pool: asyncpg.Pool) -> None:
    """One promotion, two rewards (cashback 15, free_spins 7): cashback lifetime 1000 and
    weekly 900, free_spins lifetime 300, a customer cap of 150. 200 customers at once on two
    servers: every grant charges every cap, so exactly
    min(1000 // 15, 300 // 7, 900 // 15) = min(66, 42, 60) = 42 grants; a grant refused by
    the spins cap charges nothing else (no cashback, no customer slot)."""
    await reward_type(api)
    await reward_type(api, "free_spins", category=2)
    await promotion(api, "TWO", customer_cap=150,
                    rewards=[single("cashback", "15"), single("free_spins", "7")],
                    caps=[cap(ppb.CAP_PERIOD_LIFETIME, "1000"),
                          cap(ppb.CAP_PERIOD_WEEKLY, "900"),
                          cap(ppb.CAP_PERIOD_LIFETIME, "300", "free_spins")])
    apis = [api, second_server]
    stubs = [rpb_grpc.RewardServiceStub(a.channel) for a in apis]
    replies = await asyncio.gather(*(get_reward(apis[i % 2], f"c{i}", "TWO", stub=stubs[i % 2])
                                     for i in range(200)), return_exceptions=True)
    assert not _errors(replies)
    answers = [r for r in replies if isinstance(r, rpb.GetRewardResponse)]
    granted = [r for r in answers if r.HasField("grant")]
    denied = Counter((r.denial_reason, r.denied_scope) for r in answers if not r.HasField("grant"))
    assert len(granted) == 42
    assert denied == {(rpb.DENIAL_REASON_BUDGET_CAP_REACHED, "free_spins"): 158}
    rows = await pool.fetch("SELECT scope, period, used, grants FROM cap_usage ORDER BY 1, 2")
    assert [(r["scope"], r["period"], r["used"], r["grants"]) for r in rows] == [
        ("#customers", "LIFETIME", Decimal(42), 42),
        ("cashback", "LIFETIME", Decimal(630), 42),
        ("cashback", "WEEKLY", Decimal(630), 42),
        ("free_spins", "LIFETIME", Decimal(294), 42)]
    assert await pool.fetchval("SELECT count(*) FROM grants") == 42
    assert await pool.fetchval(
        "SELECT count(*) FROM promotion_customers WHERE live_grants > 0") == 42


# --- a code pool running out while requests race -----------------------------------------------

async def test_a_pool_without_fallback_runs_out_exactly_and_denials_charge_nothing(
        api: Api, second_server: Api, pool: asyncpg.Pool) -> None:
    """50 codes, no fallback, a customer cap of 120, 200 customers at once on two servers:
    exactly 50 distinct codes, 150 OUT_OF_CODES; the refused calls took no customer slot."""
    await code_promotion(api, "DRY", customer_cap=120)
    pool_file = codes_file("D", 50)
    await upload(api, "DRY", pool_file, "u1")
    apis = [api, second_server]
    stubs = [rpb_grpc.RewardServiceStub(a.channel) for a in apis]
    replies = await asyncio.gather(*(get_reward(apis[i % 2], f"c{i}", "DRY", stub=stubs[i % 2])
                                     for i in range(200)), return_exceptions=True)
    assert not _errors(replies)
    answers = [r for r in replies if isinstance(r, rpb.GetRewardResponse)]
    codes = [r.grant.promo_code for r in answers if r.HasField("grant")]
    assert sorted(codes) == sorted(pool_file.decode().split())
    assert Counter(r.denial_reason for r in answers if not r.HasField("grant")) == {
        rpb.DENIAL_REASON_OUT_OF_CODES: 150}
    assert await pool_counts(pool, "DRY") == (50, 50, 50)
    assert await _counter(pool, "DRY", "#customers") == 50
    assert await pool.fetchval("SELECT count(*) FROM grants") == 50
    assert await pool.fetchval(
        "SELECT count(*) FROM promotion_customers WHERE live_grants > 0") == 50


async def test_one_customer_asking_many_times_at_once_gets_one_code(
        api: Api, second_server: Api, pool: asyncpg.Pool) -> None:
    """Invariant 2: a customer never gets two codes from one pool. 10 customers each send 20
    GetReward calls with different request ids at once, on two servers (so the same customer
    sits in several grant batches at once): every call answers with that customer's one code,
    10 codes go out, 190 answers are `existing`."""
    await code_promotion(api, "ONE", fallback="FB")
    await upload(api, "ONE", codes_file("O", 100), "u1")
    apis = [api, second_server]
    stubs = [rpb_grpc.RewardServiceStub(a.channel) for a in apis]
    replies = await asyncio.gather(*(
        get_reward(apis[i % 2], f"c{i % 10}", "ONE", stub=stubs[(i // 10) % 2])
        for i in range(200)), return_exceptions=True)
    errors = _errors(replies)
    answers = [r for r in replies if isinstance(r, rpb.GetRewardResponse)]
    by_customer: dict[str, set[str]] = {}
    for r in answers:
        assert r.HasField("grant")
        by_customer.setdefault(r.grant.customer_id, set()).add(r.grant.promo_code)
    assert await pool_counts(pool, "ONE") == (100, 10, 100)
    assert await pool.fetchval("SELECT count(*) FROM grants") == 10
    assert all(len(c) == 1 for c in by_customer.values())
    assert sum(not r.existing for r in answers) == 10
    assert errors == []


async def test_one_request_id_sent_for_many_customers_at_once_gives_one_code(
        api: Api, second_server: Api, pool: asyncpg.Pool) -> None:
    """Invariant 2 for a PERSONALIZED pool across two servers: one request id sent at once for
    40 customers makes one grant and uses one code; the other 39 are REQUEST_ID_REUSED and
    see neither the grant nor the code."""
    await code_promotion(api, "RID", fallback="FB")
    await upload(api, "RID", codes_file("Q", 100), "u1")
    apis = [api, second_server]
    stubs = [rpb_grpc.RewardServiceStub(a.channel) for a in apis]
    calls = [get_reward(apis[i % 2], f"c{i}", "RID", request_id="shared", stub=stubs[i % 2])
             for i in range(40)]
    calls += [get_reward(apis[i % 2], f"o{i}", "RID", stub=stubs[i % 2]) for i in range(60)]
    replies = await asyncio.gather(*calls, return_exceptions=True)
    shared = replies[:40]
    granted = [r for r in shared if isinstance(r, rpb.GetRewardResponse)]
    refused = [r for r in shared if isinstance(r, grpc.RpcError)]
    assert len(granted) == 1 and granted[0].HasField("grant")
    assert Counter(rpc_error_reason(e) for e in refused) == {"REQUEST_ID_REUSED": 39}
    assert not _errors(replies[40:])
    assert await pool_counts(pool, "RID") == (100, 61, 100)
    assert await pool.fetchval("SELECT count(*) FROM grants WHERE request_id = 'shared'") == 1


# --- concurrent uploads ------------------------------------------------------------------------

async def test_the_same_upload_sent_at_once_adds_its_codes_once(api: Api,
                                                                 pool: asyncpg.Pool) -> None:
    """A retry racing the first attempt (same request id, same bytes), 8 at once, while 100
    customers ask for codes: the codes are added once, every attempt gets the same answer."""
    await code_promotion(api, "UPL", fallback="FB")
    data = codes_file("U", 300)
    replies = await asyncio.gather(
        *(upload(api, "UPL", data, "same-upload", chunk=997) for _ in range(8)),
        *(get_reward(api, f"c{i}", "UPL") for i in range(100)), return_exceptions=True)
    assert not _errors(replies)  # type: ignore[arg-type]
    uploads = replies[:8]
    assert len({u.upload_id for u in uploads}) == 1  # type: ignore[union-attr]
    assert {u.codes_added for u in uploads} == {300}  # type: ignore[union-attr]
    total, allocated, rows = await pool_counts(pool, "UPL")
    assert (total, rows) == (300, 300)
    personal = await pool.fetchval("SELECT count(*) FROM grants WHERE promo_code <> 'FB'")
    assert allocated == personal
    assert await pool.fetchval(
        "SELECT count(DISTINCT promo_code) FROM grants WHERE promo_code <> 'FB'") == personal
    assert await pool.fetchval("SELECT count(*) FROM code_uploads") == 1


async def test_overlapping_uploads_at_once_never_put_a_code_in_the_pool_twice(
        api: Api, pool: asyncpg.Pool) -> None:
    """Two different uploads (different request ids) that share 50 codes, sent at once: one
    is accepted, the other is rejected whole (CODE_FILE_REJECTED, already in the pool); the
    pool holds each code once."""
    await code_promotion(api, "OVR", fallback="FB")
    a, b = codes_file("V", 100), codes_file("V", 100, start=51)
    replies = await asyncio.gather(upload(api, "OVR", a, "ua", chunk=501),
                                   upload(api, "OVR", b, "ub", chunk=499),
                                   return_exceptions=True)
    ok = [r for r in replies if not isinstance(r, BaseException)]
    bad = [r for r in replies if isinstance(r, grpc.RpcError)]
    assert len(ok) == 1 and len(bad) == 1
    assert bad[0].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(bad[0]) == "CODE_FILE_REJECTED"
    assert await pool_counts(pool, "OVR") == (100, 0, 100)
    assert await pool.fetchval("SELECT count(DISTINCT code) FROM promo_codes") == 100


async def test_grants_racing_cap_state_reads_show_consistent_caps(
        api: Api, second_server: Api, pool: asyncpg.Pool) -> None:
    """Budget cap per reward type per day and lifetime across two servers, 200 customers: the
    daily cap (300 = 20 grants) binds; GetPromotion afterwards and the database agree, and the
    reconciliation says every counter matches."""
    await reward_type(api)
    await promotion(api, "DAY", time_zone="Europe/Berlin",
                    caps=[cap(ppb.CAP_PERIOD_DAILY, "300"), cap(ppb.CAP_PERIOD_MONTHLY, "1000"),
                          cap(ppb.CAP_PERIOD_LIFETIME, "5000")])
    apis = [api, second_server]
    stubs = [rpb_grpc.RewardServiceStub(a.channel) for a in apis]
    replies = await asyncio.gather(*(get_reward(apis[i % 2], f"c{i}", "DAY", stub=stubs[i % 2])
                                     for i in range(200)), return_exceptions=True)
    assert not _errors(replies)
    answers = [r for r in replies if isinstance(r, rpb.GetRewardResponse)]
    assert sum(r.HasField("grant") for r in answers) == 20
    assert {(r.denied_scope, r.denied_period) for r in answers if not r.HasField("grant")} == {
        ("cashback", ppb.CAP_PERIOD_DAILY)}
    state = await get_promotion(api, "DAY")
    assert sorted((u.period, u.used) for u in state.cap_usage) == sorted([
        (ppb.CAP_PERIOD_DAILY, "300"), (ppb.CAP_PERIOD_MONTHLY, "300"),
        (ppb.CAP_PERIOD_LIFETIME, "300")])
    recon = await ppb_grpc.PromotionServiceStub(api.channel).GetPromotionReconciliation(
        ppb.GetPromotionReconciliationRequest(promotion_code="DAY"), metadata=api.key())
    assert len(recon.rows) == 3 and all(r.counter_matches for r in recon.rows)


async def test_a_fallback_edit_racing_an_upload_of_that_code_is_refused(
        api: Api, pool: asyncpg.Pool) -> None:
    """UploadCodes checks its codes against the fallback code and UpdatePromotion checks a new
    fallback code against the pool: run at once, each could pass its check before the other
    commits. The upload holds the promotion FOR SHARE, so the edit waits for it and then sees
    the uploaded code: the fallback stays, the pool holds the code once, nothing is both."""
    from storage.code_pools import _upload_lock_key

    await code_promotion(api, "RACE", fallback="FB")
    await ppb_grpc.PromotionServiceStub(api.channel).DeactivatePromotion(  # to be editable
        ppb.DeactivatePromotionRequest(request_id="race-off", promotion_code="RACE"),
        metadata=api.key())
    promotion_id = await pool.fetchval("SELECT id FROM promotions WHERE code = 'RACE'")
    async with pool.acquire() as blocker:
        # Pause the upload inside its transaction, after it has read the fallback code.
        await blocker.execute("SELECT pg_advisory_lock($1)", _upload_lock_key(promotion_id))
        uploading = asyncio.ensure_future(upload(api, "RACE", codes_file("R", 10), "race-up"))
        await _until(pool, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                           "AND NOT granted")
        editing = asyncio.ensure_future(
            ppb_grpc.PromotionServiceStub(api.channel).UpdatePromotion(
                ppb.UpdatePromotionRequest(
                    request_id="race-edit", promotion=ppb.Promotion(
                        promotion_code="RACE", fallback_code="R-000003"),
                    update_mask=field_mask_pb2.FieldMask(paths=["fallback_code"])),
                metadata=api.key()))
        # The edit waits on the promotion row the upload holds.
        await _until(pool, "SELECT count(*) FROM pg_locks WHERE locktype = 'tuple' "
                           "OR (locktype = 'transactionid' AND NOT granted)")
        assert not editing.done()
        await blocker.execute("SELECT pg_advisory_unlock($1)", _upload_lock_key(promotion_id))
    assert (await uploading).codes_added == 10
    with pytest.raises(grpc.RpcError) as caught:
        await editing
    assert rpc_error_reason(caught.value) == "INVALID_FALLBACK_CODE"
    assert await pool.fetchval("SELECT fallback_code FROM promotions WHERE code = 'RACE'") == "FB"
    assert await pool_counts(pool, "RACE") == (10, 0, 10)


async def _until(pool: asyncpg.Pool, count_sql: str) -> None:
    """Wait (polling, at most 10 s) until ``count_sql`` counts at least one row."""
    for _ in range(1000):
        if await pool.fetchval(count_sql):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for: {count_sql}")


async def test_one_customer_activated_by_many_campaigns_at_once_holds_one_code(
        api: Api, second_server: Api, pool: asyncpg.Pool) -> None:
    """DESIGN invariant 2, "a customer never receives two codes from one pool": ten campaigns
    activating one customer at once on two servers (ten live grants, one per campaign) all
    answer the same pool code, and the pool counts it once; other customers get their own.
    After every grant of the customer is revoked, the next one takes a new code."""
    await code_promotion(api, "ONECODE")
    await upload(api, "ONECODE", codes_file("K", 50), "one-code-up")
    apis = [api, second_server]
    replies = await asyncio.gather(
        *(get_reward(apis[i % 2], "c1", "ONECODE", campaign_id=f"camp-{i}") for i in range(10)),
        *(get_reward(apis[i % 2], f"other-{i}", "ONECODE") for i in range(10)),
        return_exceptions=True)
    assert not _errors(replies)  # type: ignore[arg-type]
    mine = replies[:10]
    assert {r.grant.promo_code for r in mine} == {mine[0].grant.promo_code}  # type: ignore
    assert not any(r.grant.fallback_code for r in mine)  # type: ignore[union-attr]
    others = {r.grant.promo_code for r in replies[10:]}  # type: ignore[union-attr]
    assert len(others) == 10 and mine[0].grant.promo_code not in others  # type: ignore
    assert await pool_counts(pool, "ONECODE") == (50, 11, 50)
    for reply in mine:
        await revoke(api, reply.grant.grant_id)  # type: ignore[union-attr]
    again = await get_reward(api, "c1", "ONECODE", campaign_id="camp-new")
    assert again.grant.promo_code not in {mine[0].grant.promo_code, *others}  # type: ignore
    assert (await pool_counts(pool, "ONECODE"))[1] == 12
