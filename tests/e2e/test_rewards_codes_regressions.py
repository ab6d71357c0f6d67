"""GetReward, RevokeGrant, promotions' caps and personalized codes: regressions of a review,
each against the real stack (a real server, PostgreSQL, gRPC clients).

Guaranteed here: a request id answers only the request that used it first (GetReward and
RevokeGrant alike); a cap removed and set again counts the live grants and customers; a
revoke frees a customer slot only while a customer cap is set; bad ids, enums and caps are
INVALID_ARGUMENT; a pool that never had codes raises no fallback alert; GetReward's context
is logged (bounded, credentials redacted); the promotion search matches its text literally."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import timedelta
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
from server.activation_context import MAX_VALUE_LENGTH, REDACTED
from tests.conftest import Api, rpc_error_reason
from tests.e2e.code_helpers import code_promotion, codes_file, upload
from tests.e2e.promo_helpers import (
    cap,
    get_promotion,
    get_reward,
    promotion,
    revoke,
    reward_type,
)


async def _refused(call: Awaitable[object]) -> grpc.RpcError:
    """The error the call must end with; fails with what it answered instead."""
    try:
        answer = await call
    except grpc.RpcError as exc:
        return exc
    pytest.fail(f"the call was not refused; it answered:\n{answer}")


async def _edit(api: Api, code: str, request_id: str, paths: list[str],
                **fields: object) -> None:
    """Deactivate, update the masked fields, activate again (edits need a stopped promotion)."""
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    await stub.DeactivatePromotion(ppb.DeactivatePromotionRequest(
        request_id=f"{request_id}-off", promotion_code=code), metadata=api.key())
    await stub.UpdatePromotion(ppb.UpdatePromotionRequest(
        request_id=request_id,
        promotion=ppb.Promotion(promotion_code=code, **fields),  # type: ignore[arg-type]
        update_mask=field_mask_pb2.FieldMask(paths=paths)), metadata=api.key())
    await stub.ActivatePromotion(ppb.ActivatePromotionRequest(
        request_id=f"{request_id}-on", promotion_code=code), metadata=api.key())


async def _revoke_with(api: Api, request_id: str, grant_id: str,
                       reason: str = "credit failed") -> rpb.RevokeGrantResponse:
    return await rpb_grpc.RewardServiceStub(api.channel).RevokeGrant(rpb.RevokeGrantRequest(
        request_id=request_id, grant_id=grant_id, reason=reason),
        metadata=api.key("runtime"))


async def _granted_values(pool: asyncpg.Pool) -> Decimal:
    """The value of every live grant, whatever the counters say."""
    spent = await pool.fetchval(
        "SELECT coalesce(sum((r->>'value')::numeric), 0) FROM grants, "
        "jsonb_array_elements(rewards) r WHERE status = 'GRANTED'")
    assert isinstance(spent, Decimal)
    return spent


# --- idempotency of GetReward and RevokeGrant ------------------------------------------------

async def test_get_reward_refuses_a_request_id_reused_for_another_customer(api: Api) -> None:
    """README: "reusing an id for a different request is INVALID_ARGUMENT (REQUEST_ID_REUSED)".
    Bob's call under alice's request id gets neither her grant nor her personalized code; a
    retry of alice's call gets her grant back, as stored; bob's own call gets the next code."""
    await code_promotion(api, "FLASH", fallback="FB")
    await upload(api, "FLASH", codes_file("FL", 5), "u1")
    alice = await get_reward(api, "alice", "FLASH", request_id="activation-1")
    assert (alice.grant.promo_code, alice.grant.customer_id, alice.existing) == \
        ("FL-000001", "alice", False)
    err = await _refused(get_reward(api, "bob", "FLASH", request_id="activation-1"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err) == "REQUEST_ID_REUSED"
    assert "alice" not in (err.details() or "") and "FL-000001" not in (err.details() or "")
    retry = await get_reward(api, "alice", "FLASH", request_id="activation-1")
    assert retry.existing and retry.grant == alice.grant
    bob = await get_reward(api, "bob", "FLASH", request_id="activation-2")
    assert (bob.grant.promo_code, bob.grant.customer_id, bob.existing) == \
        ("FL-000002", "bob", False)


@pytest.mark.parametrize("changed", [{"campaign_id": "spring-campaign"},
                                     {"external_values": {"percent_off": "20"}}])
async def test_get_reward_refuses_a_request_id_reused_with_another_payload(
        api: Api, changed: dict[str, object]) -> None:
    """The same customer and request id with another campaign or another external value is a
    different request: REQUEST_ID_REUSED, and no grant is made for it."""
    await code_promotion(api, "FLASH", fallback="FB")
    await upload(api, "FLASH", codes_file("FL", 5), "u1")
    await get_reward(api, "alice", "FLASH", request_id="activation-1")
    err = await _refused(get_reward(api, "alice", "FLASH", request_id="activation-1",
                                    **changed))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err) == "REQUEST_ID_REUSED"
    state = await get_promotion(api, "FLASH")
    assert (state.customers, state.code_inventory.used) == (1, 1)


async def test_get_reward_retry_with_the_same_external_value_gets_the_first_grant(
        api: Api) -> None:
    """External values are compared as amounts: "20" and "20.00" are the same request."""
    await code_promotion(api, "FLASH", fallback="FB")
    await upload(api, "FLASH", codes_file("FL", 5), "u1")
    first = await get_reward(api, "alice", "FLASH", request_id="activation-1",
                             external_values={"percent_off": "20"})
    retry = await get_reward(api, "alice", "FLASH", request_id="activation-1",
                             external_values={"percent_off": "20.00"})
    assert retry.existing and retry.grant == first.grant
    assert [r.value for r in retry.grant.rewards] == ["20"]


async def test_a_request_id_reused_in_one_grant_batch_gets_one_grant(api: Api) -> None:
    """Concurrent calls share transactions (group commit); the calls that reuse one request id
    for different customers still get one grant between them, the others REQUEST_ID_REUSED,
    exactly as one after the other."""
    await reward_type(api)
    await promotion(api)
    stub = rpb_grpc.RewardServiceStub(api.channel)
    calls = [get_reward(api, f"c{i}", stub=stub,
                        request_id="shared" if i % 3 == 0 else f"own-{i}") for i in range(24)]
    answers = await asyncio.gather(*calls, return_exceptions=True)
    shared = [a for i, a in enumerate(answers) if i % 3 == 0]
    granted = [a for a in shared if isinstance(a, rpb.GetRewardResponse)]
    refused = [a for a in shared if isinstance(a, grpc.RpcError)]
    assert len(granted) == 1 and not granted[0].existing
    assert [rpc_error_reason(e) for e in refused] == ["REQUEST_ID_REUSED"] * 7
    own = [a for i, a in enumerate(answers) if i % 3 != 0]
    assert all(isinstance(a, rpb.GetRewardResponse) and a.HasField("grant") for a in own)
    assert (await get_promotion(api)).customers == 17


async def test_revoke_retry_with_the_same_request_id_returns_the_first_answer(
        api: Api) -> None:
    """README: "Retrying with the same id returns the first answer"; RevokeGrant runs once per
    request id: the retry of the call that revoked the grant says revoked=true again, while a
    new request id for the same grant says revoked=false (it was already revoked)."""
    await reward_type(api)
    await promotion(api)
    granted = await get_reward(api, "alice")
    first = await _revoke_with(api, "revoke-1", granted.grant.grant_id)
    assert first.revoked
    retry = await _revoke_with(api, "revoke-1", granted.grant.grant_id)
    assert retry.revoked, "a retry of the call that revoked the grant must say so again"
    again = await _revoke_with(api, "revoke-2", granted.grant.grant_id)
    assert not again.revoked


@pytest.mark.parametrize("other", ["grant", "reason"])
async def test_revoke_refuses_a_request_id_reused_for_another_request(
        api: Api, pool: asyncpg.Pool, other: str) -> None:
    """README: reusing an id for a different request (another grant, another reason) is
    INVALID_ARGUMENT (REQUEST_ID_REUSED) and changes nothing."""
    await reward_type(api)
    await promotion(api)
    alice = await get_reward(api, "alice")
    bob = await get_reward(api, "bob")
    assert (await _revoke_with(api, "revoke-1", alice.grant.grant_id)).revoked
    second = (bob.grant.grant_id, "credit failed") if other == "grant" \
        else (alice.grant.grant_id, "another reason")
    err = await _refused(_revoke_with(api, "revoke-1", second[0], second[1]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err) == "REQUEST_ID_REUSED"
    rows = await pool.fetch("SELECT id, status, revoke_reason FROM grants ORDER BY id")
    assert [(r["status"], r["revoke_reason"]) for r in rows] == \
        [("REVOKED", "credit failed"), ("GRANTED", None)]


# --- caps edited on a promotion ----------------------------------------------------------------

async def test_customer_cap_removed_and_added_again_counts_every_live_customer(
        api: Api) -> None:
    """A customer cap set again counts every customer holding a live grant, including those
    granted while it was off: the cap of 3 admits no 4th customer."""
    await reward_type(api)
    await promotion(api, customer_cap=3)
    assert (await get_reward(api, "a")).HasField("grant")
    await _edit(api, "VIP25", "cap-off", ["customer_cap"], customer_cap=0)
    assert (await get_reward(api, "b")).HasField("grant")
    assert (await get_reward(api, "c")).HasField("grant")
    await _edit(api, "VIP25", "cap-on", ["customer_cap"], customer_cap=3)
    late = [await get_reward(api, c) for c in ("d", "e")]
    state = await get_promotion(api)
    customers = next(u for u in state.cap_usage if u.scope == "#customers")
    assert (state.customers, customers.used, customers.limit, customers.reached) == \
        (3, "3", "3", True), "the cap of 3 customers was exceeded"
    assert [r.denial_reason for r in late] == [rpb.DENIAL_REASON_CUSTOMER_CAP_REACHED] * 2


async def test_revoking_while_the_customer_cap_is_off_keeps_the_count(
        api: Api, pool: asyncpg.Pool) -> None:
    """A revoke frees a customer slot only while a customer cap is set (grants made without a
    cap took none): the counter left by the cap is untouched, and the cap set again counts the
    live customers, a and c of 2."""
    await reward_type(api)
    await promotion(api, customer_cap=2)
    assert (await get_reward(api, "a")).HasField("grant")
    await _edit(api, "VIP25", "cap-off", ["customer_cap"], customer_cap=0)
    b = await get_reward(api, "b")
    await revoke(api, b.grant.grant_id)  # b was never counted
    used = await pool.fetchval("SELECT used FROM cap_usage WHERE scope = '#customers'")
    assert used == 1, "a revoke without a customer cap gave a slot back"
    await _edit(api, "VIP25", "cap-on", ["customer_cap"], customer_cap=2)
    assert (await get_reward(api, "c")).HasField("grant")  # a and c: 2 customers
    late = await get_reward(api, "d")
    assert late.denial_reason == rpb.DENIAL_REASON_CUSTOMER_CAP_REACHED
    assert (await get_promotion(api)).customers == 2


async def test_revoking_under_the_customer_cap_frees_a_slot(api: Api) -> None:
    """With the cap set, the customer whose last live grant is revoked gives the slot back."""
    await reward_type(api)
    await promotion(api, customer_cap=1)
    a = await get_reward(api, "a")
    assert (await get_reward(api, "b")).denial_reason == \
        rpb.DENIAL_REASON_CUSTOMER_CAP_REACHED
    await revoke(api, a.grant.grant_id)
    assert (await get_reward(api, "b")).HasField("grant")


async def test_budget_cap_removed_and_added_again_counts_the_live_spend(
        api: Api, pool: asyncpg.Pool) -> None:
    """A lifetime budget cap set again counts the value of every live grant of its reward type,
    including what was granted while it was off: a cap of 45 with 45 out admits nothing more."""
    await reward_type(api)
    await promotion(api, caps=[cap(ppb.CAP_PERIOD_LIFETIME, "30")])
    assert (await get_reward(api, "a")).HasField("grant")
    assert (await get_reward(api, "b")).HasField("grant")
    await _edit(api, "VIP25", "caps-off", ["budget_caps"])
    assert (await get_reward(api, "c")).HasField("grant")  # 45 live now
    await _edit(api, "VIP25", "caps-on", ["budget_caps"],
                budget_caps=[cap(ppb.CAP_PERIOD_LIFETIME, "45")])
    late = await get_reward(api, "d")
    spent = await _granted_values(pool)
    assert spent == Decimal(45), f"the lifetime cap of 45 was exceeded: {spent} granted"
    assert late.denial_reason == rpb.DENIAL_REASON_BUDGET_CAP_REACHED
    lifetime = next(u for u in (await get_promotion(api)).cap_usage if u.scope == "cashback")
    assert (lifetime.used, lifetime.grants, lifetime.reached) == ("45", 3, True)


async def test_daily_cap_set_again_counts_only_the_live_grants_of_its_window(
        api: Api, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """A daily cap set again counts the live grants made inside today's window (in the
    promotion's time zone): yesterday's grants and revoked ones are not in it."""
    await reward_type(api)
    await promotion(api, caps=[cap(ppb.CAP_PERIOD_DAILY, "30")])
    assert (await get_reward(api, "a")).HasField("grant")       # yesterday: 15
    await _edit(api, "VIP25", "caps-off", ["budget_caps"])
    clock.set(clock.now() + timedelta(days=1))
    assert (await get_reward(api, "b")).HasField("grant")       # today: 15
    gone = await get_reward(api, "c")                            # today, revoked
    await revoke(api, gone.grant.grant_id)
    await _edit(api, "VIP25", "caps-on", ["budget_caps"],
                budget_caps=[cap(ppb.CAP_PERIOD_DAILY, "30")])
    daily = next(u for u in (await get_promotion(api)).cap_usage if u.scope == "cashback")
    assert (daily.used, daily.grants, daily.reached) == ("15", 1, False)
    assert (await get_reward(api, "d")).HasField("grant")       # today: 30
    assert (await get_reward(api, "e")).denial_reason == rpb.DENIAL_REASON_BUDGET_CAP_REACHED
    assert await _granted_values(pool) == Decimal(45)


@pytest.mark.parametrize("customer_cap", [2**31, 3_000_000_000, -1])
async def test_customer_cap_beyond_the_database_column_is_invalid_argument(
        api: Api, customer_cap: int) -> None:
    """customer_cap is int64 on the wire but counted in integer columns: 1 to 2**31 - 1, else
    INVALID_ARGUMENT (INVALID_CAP); the largest one is accepted."""
    await reward_type(api)
    err = await _refused(promotion(api, customer_cap=customer_cap))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err) == "INVALID_CAP"
    created = await promotion(api, "LARGEST", customer_cap=2**31 - 1)
    assert created.customer_cap == 2**31 - 1


# --- personalized codes --------------------------------------------------------------------

async def test_fallback_from_a_pool_that_never_had_codes_raises_no_alert(
        api: Api, pool: asyncpg.Pool) -> None:
    """docs/codes.md: FALLBACK_CODE_ACTIVE (103) is sent when "the first fallback code is
    handed out after a depletion"; a pool that never had a code raises nothing, even when its
    fallback code goes out. After an upload runs out, the first fallback code alerts once."""
    await code_promotion(api, "EARLY", fallback="WELCOME5")
    granted = await get_reward(api, "alice", "EARLY")
    assert (granted.grant.promo_code, granted.grant.fallback_code) == ("WELCOME5", True)
    rows = await pool.fetch("SELECT kind, total FROM code_pool_alerts")
    assert [(r["kind"], r["total"]) for r in rows] == []
    await upload(api, "EARLY", codes_file("EA", 1), "u1")
    assert (await get_reward(api, "bob", "EARLY")).grant.promo_code == "EA-000001"
    for customer in ("carol", "dave"):
        assert (await get_reward(api, customer, "EARLY")).grant.promo_code == "WELCOME5"
    rows = await pool.fetch("SELECT kind, total FROM code_pool_alerts "
                            "WHERE kind = 'FALLBACK_ACTIVE'")
    assert [(r["kind"], r["total"]) for r in rows] == [("FALLBACK_ACTIVE", 1)]


# --- GetReward's context --------------------------------------------------------------------

async def test_get_reward_context_is_logged_with_the_request(
        api: Api, caplog: pytest.LogCaptureFixture) -> None:
    """rewards.proto, GetRewardRequest.context: logged with the call, in one record that names
    the promotion and customer; long values are cut, credentials never logged."""
    await reward_type(api)
    await promotion(api)
    caplog.set_level("INFO", logger="promo.rewards")
    granted = await get_reward(api, "alice", context={
        "channel": "sms-campaign-42", "api_token": "tok-very-secret",
        "note": "x" * 1000})
    assert granted.HasField("grant")
    logged = [r for r in caplog.records if r.getMessage() == "get reward context"]
    assert len(logged) == 1
    record = logged[0]
    assert (record.promotion_code, record.customer_id) == ("VIP25", "alice")  # type: ignore[attr-defined]
    shown = record.activation_context  # type: ignore[attr-defined]
    assert shown["channel"] == "sms-campaign-42"
    assert shown["api_token"] == REDACTED
    assert len(shown["note"]) == MAX_VALUE_LENGTH
    assert not any("tok-very-secret" in str(v) for r in caplog.records
                   for v in (r.getMessage(), *vars(r).values()))


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("grant_id", ["\u00b2", "\u0661\u0662", "12\n", "+12", " 12", "1" * 19])
async def test_revoke_refuses_grant_ids_that_are_not_ascii_digits(api: Api, pool: asyncpg.Pool,
                                                                  grant_id: str) -> None:
    """A grant id is 1-18 ASCII digits: "²", Arabic-Indic "١٢" and the like are
    INVALID_ARGUMENT (INVALID_ID) and revoke nothing (grant 12 exists)."""
    await reward_type(api)
    await promotion(api)
    for customer in range(12):  # grant 12 exists
        await get_reward(api, f"c{customer}")
    err = await _refused(revoke(api, grant_id))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err) == "INVALID_ID"
    assert await pool.fetchval("SELECT count(*) FROM grants WHERE status = 'REVOKED'") == 0


async def test_an_unknown_rounding_mode_is_invalid_argument(api: Api) -> None:
    """A CALCULATED reward's rounding mode this server does not know is INVALID_ARGUMENT
    (INVALID_ENUM), as for kind, period and code type; only UNSPECIFIED means NONE."""
    await reward_type(api)
    err = await _refused(promotion(api, "ROUNDED", rewards=[ppb.PromotionReward(
        reward_type="cashback", kind=ppb.REWARD_KIND_CALCULATED,
        formula="last(deposit.amount) * 10%", rounding=42, decimals=2)]))  # type: ignore[arg-type]
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err) == "INVALID_ENUM"
    created = await promotion(api, "UNROUNDED", rewards=[ppb.PromotionReward(
        reward_type="cashback", kind=ppb.REWARD_KIND_CALCULATED,
        formula="last(deposit.amount) * 10%")])
    assert created.rewards[0].rounding == ppb.ROUNDING_MODE_NONE


async def test_list_search_matches_the_text_literally(api: Api) -> None:
    """ListPromotions searches names and codes for the text, case-insensitively; "_" and "%"
    are characters of codes and names, not wildcards."""
    await reward_type(api)
    await promotion(api, "SALE_1")  # named "Promotion SALE_1"
    await promotion(api, "SALEX1")
    stub = ppb_grpc.PromotionServiceStub(api.channel)

    async def search(text: str) -> list[str]:
        found = await stub.ListPromotions(ppb.ListPromotionsRequest(search=text),
                                          metadata=api.key())
        return [p.promotion_code for p in found.promotions]

    assert await search("sale_") == ["SALE_1"]
    assert await search("n sale_1") == ["SALE_1"]  # in the name
    assert await search("%") == []
    assert await search("sale%") == []
    assert set(await search("sale")) == {"SALE_1", "SALEX1"}  # in the collation's order
